"""Who may use the dashboard: local accounts with roles, their sessions, and role-bound API keys.

Three roles, each allowed what the one before it is and more: a clinician predicts and scores batches; an operator
also follows training, the hospitals and monitoring and reads the model reports; an admin also promotes and rolls
back. People log in with a password, kept only as an argon2id hash; programs present a bearer key, kept only as
its SHA-256 digest, each key bound to a role. Both live in one accounts file (a Secret in Kubernetes), written by
`health-mlops dashboard-account` and re-read by the dashboard when it changes: a removed user's sessions end on
their next request, a changed role applies at once.

Layout of the accounts file (JSON, 0600):
    {"users": {"<name>": {"role": "operator", "password_hash": "$argon2id$..."}},
     "keys":  {"<sha256 of the key>": {"name": "<what uses it>", "role": "clinician"}}}

The core here does no I/O beyond that file; the dashboard's edge (`serving/access_edge.py`) applies it.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, cast, get_args

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from health_mlops.errors import CredentialError
from health_mlops.system.files import write_atomically

Role = Literal["clinician", "operator", "admin"]
ROLES: Final[tuple[Role, ...]] = get_args(Role)
ACCOUNTS_FILE_NAME = "dashboard-accounts.json"
MIN_PASSWORD_LENGTH = 12
ACCOUNT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")

# argon2-cffi's defaults are RFC 9106's second recommendation (argon2id, 3 passes over 64 MiB, 4 lanes).
_HASHER = PasswordHasher()
# Checked against when the name is unknown, so an unknown name costs what a wrong password does: the answer's
# timing does not tell which names exist.
_DECOY_HASH = _HASHER.hash(secrets.token_hex(16))


def allows(role: Role, needed: Role) -> bool:
    """Whether `role` may do what `needed` may (roles are ordered: clinician < operator < admin)."""
    return ROLES.index(role) >= ROLES.index(needed)


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class KeyHolder:
    name: str
    role: Role


@dataclass(frozen=True)
class Accounts:
    """The accounts file as loaded: user -> (role, password hash), key digest -> holder."""

    users: dict[str, tuple[Role, str]] = field(default_factory=dict)
    keys: dict[str, KeyHolder] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> Accounts:
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CredentialError(f"{path}: no dashboard accounts; add one with `health-mlops dashboard-account "
                                  "add <name> --role admin`") from None
        except (OSError, ValueError) as exc:
            raise CredentialError(f"{path}: not a readable accounts file ({exc})") from None
        if not isinstance(raw, dict):
            raise CredentialError(f"{path}: expected a JSON object with \"users\" and \"keys\"")
        users: dict[str, tuple[Role, str]] = {}
        for name, entry in dict(raw.get("users") or {}).items():
            role, password_hash = _role_of(path, f"user {name!r}", entry), entry.get("password_hash")
            if not isinstance(password_hash, str) or not password_hash.startswith("$argon2id$"):
                raise CredentialError(f"{path}: user {name!r} has no argon2id password hash")
            users[name] = (role, password_hash)
        keys = {digest: KeyHolder(str(entry.get("name") or "?"), _role_of(path, f"key {digest[:8]}…", entry))
                for digest, entry in dict(raw.get("keys") or {}).items()}
        return cls(users, keys)

    def role_of(self, user: str) -> Role | None:
        account = self.users.get(user)
        return account[0] if account else None

    def check_password(self, user: str, password: str) -> Role | None:
        """The user's role if `password` is theirs, else None; as slow for an unknown user as for a wrong
        password."""
        role, password_hash = self.users.get(user, (None, _DECOY_HASH))
        try:
            _HASHER.verify(password_hash, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return None
        return role

    def holder_of(self, key: str) -> KeyHolder | None:
        # Looked up by digest: what a lookup's timing could tell is about the digest, which no caller controls.
        return self.keys.get(key_digest(key))


def _role_of(path: Path, what: str, entry: Any) -> Role:
    role = entry.get("role") if isinstance(entry, dict) else None
    if role not in ROLES:
        raise CredentialError(f"{path}: {what} has no valid role (one of {', '.join(ROLES)})")
    return cast(Role, role)


def _read_raw(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"users": {}, "keys": {}}
    Accounts.load(path)  # refuses to rewrite a file it cannot read
    raw: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    raw.setdefault("users", {})
    raw.setdefault("keys", {})
    return raw


def _write_raw(path: Path, raw: dict[str, Any]) -> None:
    # Whole or not at all: a dashboard re-reading the file never sees half of it.
    write_atomically(path, (json.dumps(raw, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def check_account_name(name: str) -> str:
    if not ACCOUNT_NAME.match(name):
        raise CredentialError(f"{name!r}: an account name is 1 to 64 letters, digits, '.', '_', '@' or '-', "
                              "starting with a letter or digit")
    return name


def set_user(path: Path, name: str, role: Role, password: str) -> bool:
    """Add the user, or give an existing one this role and password; True if the user is new."""
    check_account_name(name)
    if len(password) < MIN_PASSWORD_LENGTH:
        raise CredentialError(f"a password has at least {MIN_PASSWORD_LENGTH} characters")
    raw = _read_raw(path)
    new = name not in raw["users"]
    raw["users"][name] = {"role": role, "password_hash": _HASHER.hash(password)}
    _write_raw(path, raw)
    return new


def remove_user(path: Path, name: str) -> None:
    raw = _read_raw(path)
    if raw["users"].pop(name, None) is None:
        raise CredentialError(f"{path}: no user {name!r}")
    _write_raw(path, raw)


def issue_key(path: Path, name: str, role: Role) -> str:
    """A new API key for `name` with `role`, replacing any key `name` had; the key itself is returned, once, and
    only its digest is kept."""
    check_account_name(name)
    raw = _read_raw(path)
    raw["keys"] = {digest: entry for digest, entry in raw["keys"].items() if entry.get("name") != name}
    key = secrets.token_urlsafe(32)
    raw["keys"][key_digest(key)] = {"name": name, "role": role}
    _write_raw(path, raw)
    return key


def revoke_key(path: Path, name: str) -> None:
    raw = _read_raw(path)
    kept = {digest: entry for digest, entry in raw["keys"].items() if entry.get("name") != name}
    if len(kept) == len(raw["keys"]):
        raise CredentialError(f"{path}: no API key named {name!r}")
    raw["keys"] = kept
    _write_raw(path, raw)


@dataclass
class Session:
    user: str
    role: Role
    last_active: float


class SessionStore:
    """Logged-in sessions, each behind a random token (the session cookie), ended by logout or by `idle_s` without
    activity. In memory: a dashboard replica keeps its own (the Services' client-IP affinity keeps a browser on
    one replica, as Gradio's own session state already needs). At most `max_sessions`; the least recently active
    is ended first."""

    def __init__(self, idle_s: float, *, max_sessions: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.idle_s, self.max_sessions, self.clock = idle_s, max_sessions, clock
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._lock = threading.Lock()

    def open(self, user: str, role: Role) -> str:
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._sessions[token] = Session(user, role, self.clock())
            while len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)
        return token

    def find(self, token: str | None, *, activity: bool) -> Session | None:
        """The live session behind `token`, or None; `activity` (something the user did, not a page's periodic
        refresh) restarts its idle time."""
        if not token:
            return None
        now = self.clock()
        with self._lock:
            session = self._sessions.get(token)
            if session is None:
                return None
            if now - session.last_active >= self.idle_s:
                del self._sessions[token]
                return None
            if activity:
                session.last_active = now
                self._sessions.move_to_end(token)
            return session

    def close(self, token: str | None) -> Session | None:
        with self._lock:
            return self._sessions.pop(token, None) if token else None

    def __len__(self) -> int:
        return len(self._sessions)
