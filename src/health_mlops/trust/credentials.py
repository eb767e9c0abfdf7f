"""Who is calling: credentials issued by `health-mlops provision`, checked by the aggregator.

A credential is a bearer token and a client certificate (`pki.py`), one pair per hospital and one for the
consortium's admin. The aggregator keeps only SHA-256 digests of the tokens (`registry.json`), maps a
presented token to an `Identity`, and takes a hospital's name from that identity, never from the request.
Under mutual TLS the token must belong to the certificate's holder, and the certificate must not be revoked.
`Gatekeeper` re-reads the registry and the CRL when `provision` changes them, so a rotation or revocation
takes effect on the next request, without a restart.

Layout of a credentials folder (in Kubernetes: Secrets mounted as files or env vars):
    registry.json            digest -> identity; what the aggregator needs
    admin.token              the admin's token
    hospital-1.token, ...    one token per hospital; each goes only to that hospital's nodes
The same folder holds the consortium's certificates (`pki.py`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Generic, Literal, TypeVar

from cryptography import x509
from cryptography.x509.oid import NameOID

from health_mlops.errors import CredentialError
from health_mlops.system.files import file_signature, write_private
from health_mlops.trust import pki
from health_mlops.trust.audit import KEY_FILE_NAME, issue_audit_key

T = TypeVar("T")
log = logging.getLogger(__name__)

REGISTRY_FILE_NAME = "registry.json"
ADMIN: Final = "admin"


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


def provision(directory: Path, hospitals: list[str], *, server_names: list[str] | None = None) -> list[str]:
    """Issue what is missing: a token and a client certificate for the admin and every hospital, the CA and
    the aggregator's certificate (`pki.ensure_certificates`, with `server_names` beside the default names),
    and the audit log's key; return the names newly issued.

    Existing credentials are kept, so running it again to add a hospital does not lock the others out. The
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
    holders = [path.name.removesuffix(".token") for path in sorted(directory.glob("*.token"))]
    certified = pki.ensure_certificates(directory, holders, server_names=server_names)
    audit_key = [KEY_FILE_NAME] if issue_audit_key(directory) else []
    return list(dict.fromkeys([*issued, *certified, *audit_key]))


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
        return cls.from_path(directory / REGISTRY_FILE_NAME)

    @classmethod
    def from_path(cls, path: Path) -> TokenAuthority:
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


def bearer(token: str) -> dict[str, str]:
    """The request headers that present `token`."""
    return {"Authorization": f"Bearer {token}"}


@dataclass(frozen=True)
class ClientCredential:
    """What a client of the aggregator presents: its token, and for mutual TLS its certificate and key, with
    the CA that the aggregator's certificate must be signed by."""

    name: str
    token: str
    certificate: Path
    key: Path
    ca: Path
    crl: Path | None = None  # the consortium's CRL, where the folder has one: the aggregator must not be revoked

    @classmethod
    def from_directory(cls, directory: Path, name: str, *, token: str | None = None) -> ClientCredential:
        """`name`'s credential in a credentials folder (`token` given: that token instead of `name.token`)."""
        crl = directory / pki.CRL_FILE_NAME
        return cls(name, token or read_token(token_path(directory, name)), pki.cert_path(directory, name),
                   pki.key_path(directory, name), pki.cert_path(directory, pki.CA), crl if crl.exists() else None)


def admin_credential(configured_token: str | None, credentials_dir: Path) -> ClientCredential | None:
    """The admin's credential: the token as configured (a mounted Secret's value), else the credentials
    folder's, with the admin certificate from that folder; None without a token."""
    try:
        return ClientCredential.from_directory(credentials_dir, ADMIN, token=configured_token)
    except CredentialError:
        return None


def admin_refusal(token: str | None, credentials_dir: Path) -> str | None:
    """Why `token` is not the admin's by the credentials registry in `credentials_dir`, or None when it is (the
    check of the admin actions outside the aggregator: the CLI's registry commands and the dashboard's)."""
    try:
        authority = TokenAuthority.from_directory(credentials_dir)
    except CredentialError as error:
        return f"admin actions are unavailable: {error}"
    identity = authority.identify(f"Bearer {token.strip()}") if token and token.strip() else None
    return None if identity is not None and identity.role == ADMIN else "that is not the admin token"


class AccessDenied(CredentialError):
    """A caller the aggregator refuses: `status` 401 (no valid credential) or 403 (a credential that does not
    match)."""

    def __init__(self, status: int, reason: str, *, claimed: str | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.claimed = claimed  # whose the token was, if it was a valid one


class Reloading(Generic[T]):
    """A value loaded from a file, loaded again when the file changes. A file that cannot be loaded keeps the
    last good value (and says so once), so a half-provisioned folder never locks everyone out."""

    def __init__(self, path: Path, load: Callable[[Path], T], empty: T) -> None:
        """Loads `path` now (its errors raised: a service should not start on an unusable file); `empty` if it
        does not exist yet."""
        self.path, self._load, self._value = path, load, empty
        self._signature = file_signature(path)
        if self._signature is not None:
            self._value = load(path)

    def get(self) -> T:
        signature = file_signature(self.path)
        if signature is not None and signature != self._signature:
            self._signature = signature
            try:
                self._value = self._load(self.path)
                log.info("%s: loaded", self.path)
            except (CredentialError, pki.PkiError) as error:
                log.error("%s: keeping the previous version: %s", self.path, error)
        return self._value


def common_name(certificate: x509.Certificate) -> str | None:
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


class Gatekeeper:
    """Decides who a caller is, from the credentials folder as it is now.

    With `require_certificate` (the aggregator over mutual TLS), a token is accepted only together with a
    certificate that is not revoked and names the token's holder: hospital-2's certificate with hospital-1's
    token is refused. Without it (plain HTTP in tests and benchmarks on loopback), the token alone decides.
    """

    def __init__(self, directory: Path, *, require_certificate: bool) -> None:
        registry = directory / REGISTRY_FILE_NAME
        if not registry.exists():
            raise CredentialError(f"{registry}: no credentials registry; run `health-mlops provision` first")
        if require_certificate and not (directory / pki.CRL_FILE_NAME).exists():
            raise CredentialError(f"{directory / pki.CRL_FILE_NAME}: no certificate revocation list; run "
                                  "`health-mlops provision` to issue the consortium's certificates")
        self.require_certificate = require_certificate
        self._tokens = Reloading(registry, TokenAuthority.from_path, TokenAuthority({}))
        self._revoked = Reloading(directory / pki.CRL_FILE_NAME, lambda _: pki.revoked_serials(directory),
                                   set[int]())

    @property
    def hospitals(self) -> list[str]:
        return self._tokens.get().hospitals

    def identify(self, authorization: str | None, certificate: x509.Certificate | None) -> Identity:
        identity = self._tokens.get().identify(authorization)
        if identity is None:
            raise AccessDenied(401, "missing or unknown bearer token")
        if not self.require_certificate:
            return identity
        if certificate is None:
            raise AccessDenied(401, "a consortium client certificate is required", claimed=identity.name)
        if certificate.serial_number in self._revoked.get():
            raise AccessDenied(401, f"the client certificate of {common_name(certificate)} has been revoked",
                               claimed=identity.name)
        if common_name(certificate) != identity.name:
            raise AccessDenied(403, f"the token is {identity.name}'s but the client certificate is "
                                    f"{common_name(certificate)}'s", claimed=identity.name)
        return identity


class FailureThrottle:
    """Slows down a source that keeps presenting bad credentials, and says so once.

    Per source (an IP address), failures within `window_s` are counted; past `free` of them, each further
    refusal waits `base_delay_s` doubled per failure, up to `max_delay_s`, before it is answered. The first
    failure in a window is logged (WARNING); the rest are only counted, so a guessing attack cannot flood the
    log. Memory is bounded: at most `max_sources` sources are remembered, the stalest forgotten first.
    """

    def __init__(self, *, free: int = 5, base_delay_s: float = 0.1, max_delay_s: float = 2.0,
                 window_s: float = 60.0, max_sources: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.free, self.base_delay_s, self.max_delay_s = free, base_delay_s, max_delay_s
        self.window_s, self.max_sources, self.clock = window_s, max_sources, clock
        self._failures: OrderedDict[str, tuple[float, int]] = OrderedDict()  # source -> (window start, count)

    def failed(self, source: str, reason: str) -> float:
        """Record a failure from `source`; the seconds to wait before answering it."""
        now = self.clock()
        started, count = self._failures.pop(source, (now, 0))
        if now - started > self.window_s:
            started, count = now, 0
        count += 1
        self._failures[source] = (started, count)
        while len(self._failures) > self.max_sources:
            self._failures.popitem(last=False)
        if count == 1:
            log.warning("refused a credential from %s: %s (further failures from it in the next %.0f s are "
                        "counted in health_mlops_auth_failures_total, not logged)", source, reason, self.window_s)
        if count <= self.free:
            return 0.0
        return min(self.base_delay_s * 2 ** (count - self.free - 1), self.max_delay_s)
