"""Transport security: the TLS contexts of the aggregator and its clients, and the client certificate handed to
the application.

The aggregator requires a consortium client certificate (mutual TLS): a connection without one fails in the
handshake. uvicorn verifies it, but does not tell the application whose certificate it was: it does not
implement the ASGI TLS extension (https://asgi.readthedocs.io/en/latest/specs/tls.html; encode/uvicorn#1530).
`web.server.GuardedHttpProtocol`
is uvicorn's own HTTP protocol plus that extension: when a TLS connection is made, it reads the verified peer
certificate from the connection's `SSLObject` once and adds `scope["extensions"]["tls"]` to every request on
that connection. Everything else (parsing, keep-alive, flow control, timeouts) stays uvicorn's. We chose this
over terminating TLS in a proxy in front of the aggregator: the certificate would then reach the application
as a header, which anything that can reach the aggregator's plain port could forge.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from cryptography import x509

from health_mlops.errors import TlsError
from health_mlops.system.files import file_signature

log = logging.getLogger(__name__)

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2
CRL_CHECK_INTERVAL_S = 1.0  # how soon a revocation reaches the aggregator's handshakes
_TLS_VERSION_CODES = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}  # as the ASGI TLS extension numbers them


def _existing(*paths: Path) -> None:
    for path in paths:
        if not path.is_file():
            raise TlsError(f"{path}: missing; run `health-mlops provision` to issue the consortium's certificates")


def server_context(certificate: Path, key: Path, *, client_ca: Path | None,
                   crl: Path | None = None) -> ssl.SSLContext:
    """A server's side: its certificate, and with `client_ca` (the aggregator) a client certificate signed by
    that CA required; with `crl`, one that CRL does not revoke (checked in the handshake: a revoked client reaches
    nothing of the application). `follow_crl` keeps the CRL current."""
    _existing(certificate, key, *([client_ca] if client_ca else []), *([crl] if crl else []))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_VERSION
    try:
        context.load_cert_chain(certificate, key)
        if client_ca is not None:
            context.load_verify_locations(client_ca)
        if crl is not None:
            context.load_verify_locations(crl)
            context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    except ssl.SSLError as exc:
        raise TlsError(f"{certificate}, {key}, {client_ca} or {crl}: not a usable certificate, key, CA and CRL "
                       f"({exc})") from None
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
    return context


# OpenSSL's verification codes (X509_V_ERR_*) for why a peer's certificate was refused, in words.
_VERIFY_REASONS = {23: "revoked", 10: "expired", 9: "not yet valid", 2: "untrusted", 18: "untrusted",
                   19: "untrusted", 20: "untrusted", 21: "untrusted", 7: "untrusted"}


def refusal_reason(error: ssl.SSLError) -> str:
    """A refused handshake's reason, from a short fixed list (a metric's label)."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return _VERIFY_REASONS.get(error.verify_code, "certificate refused")
    if error.reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        return "no certificate"
    return "other"


def count_refused_handshakes(context: ssl.SSLContext, refused: Callable[[str], None]) -> None:
    """Call `refused(reason)` for every handshake `context` refuses (a revoked, expired, foreign or missing client
    certificate, a client that does not speak TLS): refused connections reach nothing of the application, so this
    count, not a log or audit line per attempt, is what shows them."""

    class CountedHandshakes(ssl.SSLObject):
        def do_handshake(self) -> None:
            try:
                super().do_handshake()
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):  # the handshake waits for more bytes
                raise
            except ssl.SSLError as error:
                refused(refusal_reason(error))
                raise

    context.sslobject_class = CountedHandshakes  # what the event loop's TLS wraps each connection in


def follow_crl(context: ssl.SSLContext, crl: Path, *, interval_s: float = CRL_CHECK_INTERVAL_S) -> threading.Event:
    """Load `crl` into the live `context` again whenever its file changes (checked every `interval_s`, in a daemon
    thread), so that a certificate revoked while the server runs fails its next handshake; set the returned event
    to stop. OpenSSL keeps each CRL loaded and checks against the newest: a certificate once revoked stays so."""
    stop = threading.Event()

    def follow() -> None:
        loaded = file_signature(crl)
        while not stop.wait(interval_s):
            current = file_signature(crl)
            if current is None or current == loaded:
                continue
            try:
                context.load_verify_locations(crl)
                log.info("%s: loaded into the TLS handshake's checks", crl)
            except ssl.SSLError as exc:  # a CRL being replaced by hand: the last good one stays in force
                log.error("%s: not loaded, the previous CRL stays in force: %s", crl, exc)
            loaded = current

    threading.Thread(target=follow, name="crl-follower", daemon=True).start()
    return stop


def client_context(certificate: Path, key: Path, ca: Path, *, crl: Path | None = None) -> ssl.SSLContext:
    """A client's side: the aggregator verified against the consortium CA (host name included) and, with `crl`,
    not revoked by it (an impostor serving a revoked aggregator certificate fails the handshake), and this
    client's certificate presented."""
    _existing(certificate, key, ca, *([crl] if crl else []))
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    context.minimum_version = MINIMUM_VERSION
    try:
        context.load_cert_chain(certificate, key)
        if crl is not None:
            context.load_verify_locations(crl)
            context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    except ssl.SSLError as exc:
        raise TlsError(f"{certificate}, {key} or {crl}: not a usable certificate, key and CRL ({exc})") from None
    return context


def tls_extension(ssl_object: ssl.SSLObject) -> dict[str, Any]:
    """The ASGI TLS extension's scope entry for a connection whose handshake verified the peer."""
    der = ssl_object.getpeercert(binary_form=True)
    chain = [ssl.DER_cert_to_PEM_cert(der)] if der else []
    name = x509.load_der_x509_certificate(der).subject.rfc4514_string() if der else None
    version = ssl_object.version()
    return {"server_cert": None, "client_cert_chain": chain, "client_cert_name": name, "client_cert_error": None,
            "tls_version": _TLS_VERSION_CODES.get(version or ""), "cipher_suite": None}


@lru_cache(maxsize=1024)
def _parse(pem: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem.encode("ascii"))


def peer_certificate(scope: Mapping[str, Any]) -> x509.Certificate | None:
    """The client certificate the TLS handshake verified, or None (plain HTTP, or no certificate)."""
    chain = ((scope.get("extensions") or {}).get("tls") or {}).get("client_cert_chain") or []
    return _parse(chain[0]) if chain else None
