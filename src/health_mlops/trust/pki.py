"""The consortium's certificates: a CA, the aggregator's and the dashboard's server certificates, one client
certificate per hospital and one for the admin, and a certificate revocation list. `health-mlops provision`
keeps them in the credentials folder beside the tokens (`credentials.py`); keys are written 0600.

    ca.crt, ca.key             the consortium CA (the key stays with whoever provisions)
    aggregator.crt/.key        the aggregator's server certificate: every name it is reached by
    dashboard.crt/.key         the dashboard's (when it serves TLS itself, as in Kubernetes)
    admin.crt/.key             the admin's client certificate
    hospital-1.crt/.key, ...   a client certificate per hospital, its id in the subject's common name
    crl.pem                    the serial numbers revoked so far, signed by the CA

Keys are ECDSA P-256: as strong as RSA-3072 for TLS and generated in a millisecond.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from health_mlops.errors import PkiError
from health_mlops.system.files import write_atomically, write_private

CA = "ca"
SERVER = "aggregator"
DASHBOARD = "dashboard"
CRL_FILE_NAME = "crl.pem"
ORGANISATION = "Health MLOps consortium"
CA_VALIDITY = dt.timedelta(days=3650)
LEAF_VALIDITY = dt.timedelta(days=397)  # the longest browsers accept; rotation is `provision --rotate`
# TLS stacks refuse a CRL past its next update. Nothing fetches ours from a distribution point (the aggregator
# re-reads the file, and every `provision` re-signs it), so a short validity would only risk refusing everyone.
CRL_VALIDITY = LEAF_VALIDITY
# The names the aggregator is reached by: loopback for the demo, its Service in Kubernetes (k8s/07-aggregator.yaml).
DEFAULT_DASHBOARD_NAMES = ("localhost", "127.0.0.1", "::1", "dashboard", "dashboard.health-mlops-central",
                           "dashboard.health-mlops-central.svc", "dashboard.health-mlops-central.svc.cluster.local")
DEFAULT_SERVER_NAMES = ("localhost", "127.0.0.1", "::1", "aggregator", "aggregator.health-mlops-central",
                        "aggregator.health-mlops-central.svc", "aggregator.health-mlops-central.svc.cluster.local")


def cert_path(directory: Path, name: str) -> Path:
    return directory / f"{name}.crt"


def key_path(directory: Path, name: str) -> Path:
    return directory / f"{name}.key"


@dataclass(frozen=True)
class _Issuer:
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode("ascii")


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANISATION),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def load_certificate(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as exc:
        raise PkiError(f"{path}: cannot read the certificate ({exc.strerror})") from None
    except ValueError as exc:
        raise PkiError(f"{path}: not a PEM certificate ({exc})") from None


def _load_issuer(directory: Path) -> _Issuer:
    path = key_path(directory, CA)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise PkiError(f"{path}: cannot read the CA key ({exc.strerror})") from None
    except ValueError as exc:
        raise PkiError(f"{path}: not a PEM private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{path}: the CA key is not an EC key")
    return _Issuer(load_certificate(cert_path(directory, CA)), key)


def _ensure_ca(directory: Path) -> _Issuer:
    if cert_path(directory, CA).exists():
        return _load_issuer(directory)
    key = _new_key()
    name = _name(f"{ORGANISATION} CA")
    now = _now()
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + CA_VALIDITY)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                content_commitment=False, key_encipherment=False,
                                                data_encipherment=False, key_agreement=False,
                                                encipher_only=False, decipher_only=False), critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                   .sign(key, hashes.SHA256()))
    write_private(key_path(directory, CA), _key_pem(key))
    write_atomically(cert_path(directory, CA), certificate.public_bytes(serialization.Encoding.PEM))
    return _Issuer(certificate, key)


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _issue(directory: Path, issuer: _Issuer, name: str, *, server_names: list[str] | None) -> None:
    """A new key and certificate for `name`: a server certificate for `server_names`, else a client one."""
    key = _new_key()
    now = _now()
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server_names is not None else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(issuer.certificate.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + LEAF_VALIDITY)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_agreement=True, key_cert_sign=False,
                                            crl_sign=False, content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, encipher_only=False, decipher_only=False),
                              critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
                              critical=False))
    if server_names is not None:
        builder = builder.add_extension(_san(server_names), critical=False)
    certificate = builder.sign(issuer.key, hashes.SHA256())
    write_private(key_path(directory, name), _key_pem(key))
    write_atomically(cert_path(directory, name), certificate.public_bytes(serialization.Encoding.PEM))


def _load_crl(directory: Path) -> x509.CertificateRevocationList:
    path = directory / CRL_FILE_NAME
    try:
        crl = x509.load_pem_x509_crl(path.read_bytes())
    except OSError as exc:
        raise PkiError(f"{path}: cannot read the CRL ({exc.strerror})") from None
    except ValueError as exc:
        raise PkiError(f"{path}: not a PEM CRL ({exc})") from None
    ca = load_certificate(cert_path(directory, CA))
    if not crl.is_signature_valid(ca.public_key()):  # type: ignore[arg-type]
        raise PkiError(f"{path}: not signed by the consortium CA")
    return crl


def _write_crl(directory: Path, issuer: _Issuer, *, revoke: x509.Certificate | None = None) -> None:
    """Re-sign the CRL: what it revoked already (the CRL is the one record of that), and `revoke` if given."""
    now = _now()
    previous = _load_crl(directory) if (directory / CRL_FILE_NAME).exists() else None
    last_update = now - dt.timedelta(minutes=5)
    if previous is not None:
        # Strictly later than the CRL it replaces: a TLS context holding both (`tls.follow_crl`) checks against the
        # one with the later lastUpdate, and keeps the first it loaded when they are equal (two within a second).
        last_update = max(last_update, previous.last_update_utc + dt.timedelta(seconds=1))
    builder = (x509.CertificateRevocationListBuilder().issuer_name(issuer.certificate.subject)
               .last_update(last_update).next_update(now + CRL_VALIDITY))
    for entry in previous or []:
        builder = builder.add_revoked_certificate(entry)
    if revoke is not None:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(revoke.serial_number).revocation_date(now).build())
    crl = builder.sign(issuer.key, hashes.SHA256())
    write_atomically(directory / CRL_FILE_NAME, crl.public_bytes(serialization.Encoding.PEM))


def _current(directory: Path, name: str, action: str) -> x509.Certificate:
    path = cert_path(directory, name)
    if not path.exists():
        raise PkiError(f"{path}: no certificate to {action}")
    return load_certificate(path)


def ensure_certificates(directory: Path, clients: list[str], *, server_names: list[str] | None = None) -> list[str]:
    """Issue whatever is missing: the CA, the aggregator's certificate (its default names and `server_names`),
    the dashboard's, and a client certificate for each of `clients`; return the names newly issued. Existing
    certificates are kept. The CRL is re-signed each time."""
    directory.mkdir(parents=True, exist_ok=True)
    issuer = _ensure_ca(directory)
    issued = []
    servers = {SERVER: [*DEFAULT_SERVER_NAMES, *(server_names or [])], DASHBOARD: list(DEFAULT_DASHBOARD_NAMES)}
    for name, names in servers.items():
        if not cert_path(directory, name).exists():
            _issue(directory, issuer, name, server_names=list(dict.fromkeys(names)))
            issued.append(name)
    for name in dict.fromkeys(clients):
        if not cert_path(directory, name).exists():
            _issue(directory, issuer, name, server_names=None)
            issued.append(name)
    _write_crl(directory, issuer)
    return issued


def rotate(directory: Path, name: str, *, server_names: list[str] | None = None) -> None:
    """A new key and certificate for `name`; the old certificate is revoked."""
    issuer = _load_issuer(directory)
    current = _current(directory, name, "rotate")
    if name in (SERVER, DASHBOARD):
        kept = [str(n.value) for n in current.extensions.get_extension_for_class(x509.SubjectAlternativeName).value]
        server_names = list(dict.fromkeys([*kept, *((server_names or []) if name == SERVER else [])]))
    _issue(directory, issuer, name, server_names=server_names if name in (SERVER, DASHBOARD) else None)
    _write_crl(directory, issuer, revoke=current)


def revoke(directory: Path, name: str) -> None:
    """Revoke `name`'s certificate and remove it and its key: that identity can no longer connect."""
    issuer = _load_issuer(directory)
    _write_crl(directory, issuer, revoke=_current(directory, name, "revoke"))
    cert_path(directory, name).unlink()
    key_path(directory, name).unlink(missing_ok=True)


def revoked_serials(directory: Path) -> set[int]:
    """The serial numbers the CA's current CRL revokes (its signature checked)."""
    return {entry.serial_number for entry in _load_crl(directory)}
