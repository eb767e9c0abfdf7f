"""The consortium's certificates work for mutual TLS with Python's own ssl module: the aggregator's server
certificate for the names it is reached by, a client certificate per hospital, refusal of strangers and of
revoked certificates, rotation, and private keys only their owner can read."""

from __future__ import annotations

import shutil
import socket
import ssl
import time
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509

from health_mlops.trust.pki import (CA, CRL_FILE_NAME, SERVER, PkiError, cert_path, ensure_certificates, key_path,
                                    load_certificate, revoke, revoked_serials, rotate)


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    directory = tmp_path / "credentials"
    ensure_certificates(directory, ["admin", "hospital-1", "hospital-2"])
    return directory


def server_context(directory: Path, *, check_crl: bool = False) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path(directory, SERVER), key_path(directory, SERVER))
    context.load_verify_locations(cert_path(directory, CA))
    context.verify_mode = ssl.CERT_REQUIRED
    if check_crl:
        context.load_verify_locations(directory / CRL_FILE_NAME)
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return context


def client_context(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(ca)
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


def handshake(server: ssl.SSLContext, client: ssl.SSLContext, server_hostname: str = "localhost") -> str:
    """Connects the two over a socket pair; returns the common name the server saw, or raises ssl.SSLError."""
    near, far = socket.socketpair()
    near.settimeout(10)
    far.settimeout(10)
    seen: list[str] = []

    def serve() -> None:
        try:
            with server.wrap_socket(far, server_side=True) as tls:
                subject = dict(item[0] for item in tls.getpeercert()["subject"])
                seen.append(subject["commonName"])
                tls.sendall(b"ok")
        except (ssl.SSLError, OSError):
            far.close()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client.wrap_socket(near, server_hostname=server_hostname) as tls:
            if tls.recv(2) != b"ok":  # TLS 1.3 reports a refused client certificate on the first read
                raise ssl.SSLError("the server closed the connection")
    finally:
        thread.join(10)
    return seen[0]


def test_a_hospital_connects_with_its_certificate_and_is_known_by_it(pki: Path) -> None:
    client = client_context(cert_path(pki, CA), cert_path(pki, "hospital-1"), key_path(pki, "hospital-1"))
    for name in ("localhost", "127.0.0.1", "aggregator.health-mlops-central.svc"):
        assert handshake(server_context(pki), client, name) == "hospital-1"


def test_strangers_are_refused(pki: Path, tmp_path: Path) -> None:
    with pytest.raises((ssl.SSLError, OSError)):
        handshake(server_context(pki), client_context(cert_path(pki, CA)))  # no client certificate
    other = tmp_path / "other-consortium"
    ensure_certificates(other, ["hospital-1"])
    with pytest.raises((ssl.SSLError, OSError)):
        handshake(server_context(pki), client_context(cert_path(pki, CA), cert_path(other, "hospital-1"),
                                                      key_path(other, "hospital-1")))
    with pytest.raises(ssl.SSLCertVerificationError):  # nor does a node trust another consortium's aggregator
        handshake(server_context(other), client_context(cert_path(pki, CA), cert_path(pki, "hospital-1"),
                                                        key_path(pki, "hospital-1")))


def test_a_revoked_certificate_is_refused_and_removed(pki: Path, tmp_path: Path) -> None:
    kept = tmp_path / "hospital-2-copy"
    kept.mkdir()
    shutil.copy(cert_path(pki, "hospital-2"), kept / "hospital-2.crt")
    shutil.copy(key_path(pki, "hospital-2"), kept / "hospital-2.key")
    serial = load_certificate(cert_path(pki, "hospital-2")).serial_number
    assert handshake(server_context(pki, check_crl=True),
                     client_context(cert_path(pki, CA), kept / "hospital-2.crt", kept / "hospital-2.key"))
    revoke(pki, "hospital-2")
    assert not cert_path(pki, "hospital-2").exists() and not key_path(pki, "hospital-2").exists()
    assert serial in revoked_serials(pki)
    with pytest.raises((ssl.SSLError, OSError)):
        handshake(server_context(pki, check_crl=True),
                  client_context(cert_path(pki, CA), kept / "hospital-2.crt", kept / "hospital-2.key"))
    client = client_context(cert_path(pki, CA), cert_path(pki, "hospital-1"), key_path(pki, "hospital-1"))
    assert handshake(server_context(pki, check_crl=True), client) == "hospital-1"
    with pytest.raises(PkiError, match="no certificate to revoke"):
        revoke(pki, "hospital-2")


def test_rotation_issues_a_new_certificate_and_revokes_the_old(pki: Path) -> None:
    old = load_certificate(cert_path(pki, "hospital-1")).serial_number
    rotate(pki, "hospital-1")
    new = load_certificate(cert_path(pki, "hospital-1")).serial_number
    assert new != old and old in revoked_serials(pki) and new not in revoked_serials(pki)
    ensure_certificates(pki, ["hospital-3"])  # re-signs the CRL: what it revoked stays revoked
    assert old in revoked_serials(pki)
    client = client_context(cert_path(pki, CA), cert_path(pki, "hospital-1"), key_path(pki, "hospital-1"))
    assert handshake(server_context(pki, check_crl=True), client) == "hospital-1"


def test_the_server_certificate_names_every_address_and_keeps_them_on_rotation(tmp_path: Path) -> None:
    directory = tmp_path / "credentials"
    ensure_certificates(directory, [], server_names=["fl.hospital-consortium.example"])
    rotate(directory, SERVER, server_names=["10.0.0.8"])
    names = load_certificate(cert_path(directory, SERVER)).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert {"localhost", "aggregator", "fl.hospital-consortium.example"} <= set(names.get_values_for_type(x509.DNSName))
    assert {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1", "10.0.0.8"}


def test_provisioning_again_keeps_what_exists_and_keys_are_private(pki: Path) -> None:
    serial = load_certificate(cert_path(pki, "hospital-1")).serial_number
    assert ensure_certificates(pki, ["hospital-1", "hospital-3"]) == ["hospital-3"]
    assert load_certificate(cert_path(pki, "hospital-1")).serial_number == serial
    for name in (CA, SERVER, "admin", "hospital-1", "hospital-3"):
        assert stat.S_IMODE(key_path(pki, name).stat().st_mode) == 0o600, name


def test_a_client_refuses_an_impostor_serving_the_revoked_aggregator_certificate(pki: Path, tmp_path: Path) -> None:
    """The aggregator's certificate rotated (the old one revoked): whoever kept the old certificate and key can no
    longer pass for the aggregator with a client holding the consortium's CRL, as every client's credential does
    (`ClientCredential.from_directory`, the context `fl.client` builds)."""
    from health_mlops.trust.credentials import ClientCredential
    from health_mlops.trust.tls import client_context as product_client_context

    impostor = tmp_path / "impostor"
    impostor.mkdir()
    for path in (cert_path(pki, SERVER), key_path(pki, SERVER), cert_path(pki, CA)):
        shutil.copy(path, impostor / path.name)
    rotate(pki, SERVER)
    credential = ClientCredential.from_directory(pki, "hospital-1", token="hospital-1's token")
    assert credential.crl == pki / CRL_FILE_NAME

    def client(crl: Path | None) -> ssl.SSLContext:
        return product_client_context(credential.certificate, credential.key, credential.ca, crl=crl)

    assert handshake(server_context(impostor), client(None)) == "hospital-1"  # CA-signed, in date: only the CRL says
    with pytest.raises(ssl.SSLCertVerificationError, match="revoked"):
        handshake(server_context(impostor), client(credential.crl))
    assert handshake(server_context(pki), client(credential.crl)) == "hospital-1"  # the new certificate is fine


def test_a_running_client_refuses_the_aggregator_certificate_revoked_after_it_started(pki: Path,
                                                                                      tmp_path: Path) -> None:
    """A node runs for months: the CRL it holds is re-read when `crl.pem` changes, so an aggregator certificate
    revoked after the node started fails the node's next handshake, without a restart."""
    from health_mlops.fl.client import HospitalClient
    from health_mlops.trust.credentials import ClientCredential

    impostor = tmp_path / "impostor"
    impostor.mkdir()
    for path in (cert_path(pki, SERVER), key_path(pki, SERVER), cert_path(pki, CA)):
        shutil.copy(path, impostor / path.name)
    credential = ClientCredential.from_directory(pki, "hospital-1", token="hospital-1's token")
    with HospitalClient("https://localhost:1", credential, node_id="hospital-1-a", poll_wait_s=1.0) as client:
        assert client.tls is not None
        assert handshake(server_context(impostor), client.tls) == "hospital-1"  # today's aggregator certificate
        rotate(pki, SERVER)  # the old one revoked: crl.pem re-signed beside the node's credential
        deadline = time.monotonic() + 60
        while True:
            try:
                handshake(server_context(impostor), client.tls)
            except ssl.SSLCertVerificationError as error:
                assert "revoked" in str(error)
                break
            assert time.monotonic() < deadline, "the client never read the new CRL"
            time.sleep(0.2)
        assert handshake(server_context(pki), client.tls) == "hospital-1"  # the rotated certificate is fine


def test_each_crl_is_later_than_the_one_it_replaces_even_within_a_second(pki: Path) -> None:
    """A TLS context that loaded the old CRL checks against the newest it holds, and keeps the first of two with
    the same lastUpdate: a CRL re-signed within the same second as the last must still say it is later."""
    updates = []
    for _ in range(3):
        rotate(pki, SERVER)
        updates.append(x509.load_pem_x509_crl((pki / CRL_FILE_NAME).read_bytes()).last_update_utc)
    assert updates == sorted(set(updates))
