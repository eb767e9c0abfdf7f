"""Transport security: the TLS contexts of the aggregator and its clients, and the client certificate handed to
the application.

The aggregator requires a consortium client certificate (mutual TLS): a connection without one fails in the
handshake. uvicorn verifies it, but does not tell the application whose certificate it was: it does not
implement the ASGI TLS extension (https://asgi.readthedocs.io/en/latest/specs/tls.html; encode/uvicorn#1530).
`http_server.GuardedHttpProtocol`
is uvicorn's own HTTP protocol plus that extension: when a TLS connection is made, it reads the verified peer
certificate from the connection's `SSLObject` once and adds `scope["extensions"]["tls"]` to every request on
that connection. Everything else (parsing, keep-alive, flow control, timeouts) stays uvicorn's. We chose this
over terminating TLS in a proxy in front of the aggregator: the certificate would then reach the application
as a header, which anything that can reach the aggregator's plain port could forge.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from cryptography import x509

from health_mlops.errors import TlsError

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2
_TLS_VERSION_CODES = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}  # as the ASGI TLS extension numbers them


def _existing(*paths: Path) -> None:
    for path in paths:
        if not path.is_file():
            raise TlsError(f"{path}: missing; run `health-mlops provision` to issue the consortium's certificates")


def server_context(certificate: Path, key: Path, *, client_ca: Path | None) -> ssl.SSLContext:
    """A server's side: its certificate, and with `client_ca` (the aggregator) a client certificate signed by
    that CA required."""
    _existing(certificate, key, *([client_ca] if client_ca else []))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_VERSION
    try:
        context.load_cert_chain(certificate, key)
        if client_ca is not None:
            context.load_verify_locations(client_ca)
    except ssl.SSLError as exc:
        raise TlsError(f"{certificate}, {key} or {client_ca}: not a usable certificate, key and CA ({exc})") from None
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(certificate: Path, key: Path, ca: Path) -> ssl.SSLContext:
    """A client's side: the aggregator verified against the consortium CA (host name included), and this
    client's certificate presented."""
    _existing(certificate, key, ca)
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    context.minimum_version = MINIMUM_VERSION
    try:
        context.load_cert_chain(certificate, key)
    except ssl.SSLError as exc:
        raise TlsError(f"{certificate} or {key}: not a usable certificate and key ({exc})") from None
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
