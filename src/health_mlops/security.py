"""Who is calling: credentials issued once by `health-mlops provision`, checked by the aggregator.

A credential today is a bearer token: one per hospital and one for the consortium's admin. The aggregator
keeps only SHA-256 digests of the tokens (`registry.json`), maps a presented token to an `Identity`, and
takes a hospital's name from that identity, never from the request. This module is the one place that knows
what a credential is, so moving to provisioned certificates and TLS changes this file and its callers'
transport settings, nothing else.

Layout of a credentials folder (in Kubernetes: Secrets mounted as files or env vars):
    registry.json            digest -> identity; what the aggregator needs
    admin.token              the admin's token
    hospital-1.token, ...    one token per hospital; each goes only to that hospital's nodes
The same folder holds the consortium's certificates (`pki.py`).
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from health_mlops.files import write_private

REGISTRY_FILE_NAME = "registry.json"
ADMIN = "admin"


class CredentialError(Exception):
    """A credentials folder or token file that cannot be used, with the file and the reason."""


@dataclass(frozen=True)
class Identity:
    role: Literal["hospital", "admin"]
    hospital: str | None = None  # set for hospitals only

    @property
    def name(self) -> str:
        return self.hospital or ADMIN


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def token_path(directory: Path, name: str) -> Path:
    return directory / f"{name}.token"


def read_token(path: Path) -> str:
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise CredentialError(f"{path}: cannot read the token ({exc.strerror})") from None
    if not token:
        raise CredentialError(f"{path}: the token file is empty")
    return token


def provision(directory: Path, hospitals: list[str]) -> list[str]:
    """Issue tokens for the admin and for every hospital that has none yet; return the names newly issued.

    Existing tokens are kept, so running it again to add a hospital does not lock the others out. The
    registry is rebuilt from the token files present (`revoke_token` and `rotate_token` change one).
    """
    directory.mkdir(parents=True, exist_ok=True)
    issued: list[str] = []
    for name in dict.fromkeys([ADMIN, *hospitals]):
        path = token_path(directory, name)
        if not path.exists():
            write_private(path, secrets.token_urlsafe(32) + "\n")
            issued.append(name)
    _write_registry(directory)
    return issued


def rotate_token(directory: Path, name: str) -> None:
    """A new token for `name`; the old one is no longer in the registry."""
    if not token_path(directory, name).exists():
        raise CredentialError(f"{token_path(directory, name)}: no token to rotate")
    write_private(token_path(directory, name), secrets.token_urlsafe(32) + "\n")
    _write_registry(directory)


def revoke_token(directory: Path, name: str) -> None:
    """Remove `name`'s token and take it out of the registry."""
    if not token_path(directory, name).exists():
        raise CredentialError(f"{token_path(directory, name)}: no token to revoke")
    token_path(directory, name).unlink()
    _write_registry(directory)


def _write_registry(directory: Path) -> None:
    """The registry holds the digests of the token files present, and nothing else."""
    registry: dict[str, dict[str, str | None]] = {}
    for path in sorted(directory.glob("*.token")):
        name = path.name.removesuffix(".token")
        identity = Identity(ADMIN) if name == ADMIN else Identity("hospital", name)
        registry[_digest(read_token(path))] = {"role": identity.role, "hospital": identity.hospital}
    write_private(directory / REGISTRY_FILE_NAME, json.dumps(registry, indent=2, sort_keys=True) + "\n")


def load_registry_entries(path: Path) -> dict[str, dict[str, str | None]]:
    if not path.exists():
        return {}
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CredentialError(f"{path}: not a readable credentials registry ({exc})") from None
    if not isinstance(entries, dict):
        raise CredentialError(f"{path}: expected a JSON object of digest -> identity")
    return entries


class TokenAuthority:
    """Maps bearer tokens to identities; knows digests only."""

    def __init__(self, identities: dict[str, Identity]) -> None:
        self._by_digest = identities

    @classmethod
    def from_directory(cls, directory: Path) -> TokenAuthority:
        path = directory / REGISTRY_FILE_NAME
        if not path.exists():
            raise CredentialError(f"{path}: no credentials registry; run `health-mlops provision` first")
        identities = {}
        for digest, raw in load_registry_entries(path).items():
            role = raw.get("role")
            if role not in ("hospital", ADMIN) or (role == "hospital" and not raw.get("hospital")):
                raise CredentialError(f"{path}: entry {digest[:8]}… has no valid role/hospital")
            identities[digest] = Identity(role, raw.get("hospital"))  # type: ignore[arg-type]
        return cls(identities)

    @property
    def hospitals(self) -> list[str]:
        return sorted({i.hospital for i in self._by_digest.values() if i.hospital})

    def identify(self, authorization: str | None) -> Identity | None:
        """The identity behind an `Authorization: Bearer <token>` header, or None."""
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return self._by_digest.get(_digest(token.strip()))


def admin_token(configured: str | None, credentials_dir: Path) -> str | None:
    """The admin token: as configured (a mounted Secret's value), else the credentials folder's, else None."""
    if configured:
        return configured
    try:
        return read_token(token_path(credentials_dir, ADMIN))
    except CredentialError:
        return None


def bearer(token: str) -> dict[str, str]:
    """The request headers that present `token`."""
    return {"Authorization": f"Bearer {token}"}
