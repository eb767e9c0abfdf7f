"""The audit log: one JSON line per admin action, refused attempt, run start and end, registration, promotion
and rollback, appended and never rewritten, and able to prove it.

Each line carries its sequence number, the hash of the line before it and its own hash (SHA-256 over its
canonical JSON), and, when `provision` has issued an audit key (`audit.key` in the credentials folder), an
HMAC of its hash with that key. `verify_audit` walks the chain and names the first line that was changed,
removed, inserted or reordered. Without a key, the chain proves the log against careless or partial edits; a
forger who rewrites every later line consistently is caught only by the key, which the log's readers do not
have. The log records; it never decides: rollback follows MLflow's own version history (`registry.py`).

Appends from several processes (aggregator, dashboard, CLI) are serialised by an exclusive lock on the file.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import secrets
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from health_mlops.errors import AuditError
from health_mlops.files import write_private

GENESIS = "0" * 64  # the "previous hash" of the first line
KEY_FILE_NAME = "audit.key"
_RESERVED = ("seq", "time", "action", "actor", "outcome", "prev", "hash", "mac")
_TAIL_CHUNK = 64 * 1024


def issue_audit_key(credentials_dir: Path) -> bool:
    """Write a random audit key (0600) unless there is one; True if it was issued now."""
    path = credentials_dir / KEY_FILE_NAME
    if path.exists():
        return False
    write_private(path, secrets.token_hex(32) + "\n")
    return True


def load_audit_key(credentials_dir: Path) -> bytes | None:
    path = credentials_dir / KEY_FILE_NAME
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise AuditError(f"{path}: cannot read the audit key ({exc.strerror})") from None
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise AuditError(f"{path}: not a hexadecimal audit key") from None


def record_hash(record: dict[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k not in ("hash", "mac")}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _mac(key: bytes, digest: str) -> str:
    return hmac.new(key, digest.encode("ascii"), hashlib.sha256).hexdigest()


def _last_line(fd: int) -> bytes:
    """The file's last non-empty line, read backwards from its end."""
    end = os.lseek(fd, 0, os.SEEK_END)
    tail = b""
    position = end
    while position > 0:
        step = min(_TAIL_CHUNK, position)
        position -= step
        os.lseek(fd, position, os.SEEK_SET)
        tail = os.read(fd, step) + tail
        stripped = tail.rstrip(b"\n")
        if b"\n" in stripped:
            return stripped.rsplit(b"\n", 1)[1]
    return tail.rstrip(b"\n")


class AuditLog:
    """Appends to and reads one audit log file."""

    def __init__(self, path: Path, key: bytes | None = None) -> None:
        self.path, self.key = path, key

    def append(self, action: str, actor: str, *, outcome: str = "ok", **details: Any) -> None:
        clash = sorted(set(details) & set(_RESERVED))
        if clash:
            raise ValueError(f"audit details may not be named {clash}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.fchmod(fd, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)  # released when the descriptor closes
            last = _last_line(fd)
            previous = json.loads(last) if last else None
            record: dict[str, Any] = {"seq": previous["seq"] + 1 if previous else 1, "time": time.time(),
                                      "action": action, "actor": actor, "outcome": outcome, **details,
                                      "prev": previous["hash"] if previous else GENESIS}
            record["hash"] = record_hash(record)
            if self.key is not None:
                record["mac"] = _mac(self.key, record["hash"])
            os.write(fd, (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)

    def entries(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]


@dataclass(frozen=True)
class AuditProblem:
    line: int  # 1-based line number in the file
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


def _seq_of(raw: str) -> Any:
    try:
        return json.loads(raw).get("seq")
    except (ValueError, AttributeError):
        return None


def verify_audit(path: Path, key: bytes | None = None) -> tuple[int, AuditProblem | None]:
    """(lines checked, the first problem or None). With `key`, every line must carry a valid MAC."""
    if not path.exists():
        return 0, None
    lines = path.read_text(encoding="utf-8").splitlines()
    seqs = [_seq_of(raw) for raw in lines]
    later = Counter(seqs)  # the seqs of the lines after the current one: a gap is a removal only if the missing
    previous: dict[str, Any] | None = None  # number does not turn up further down
    for number, raw in enumerate(lines, start=1):
        later[seqs[number - 1]] -= 1
        try:
            record = json.loads(raw)
            seq, prev, own = record["seq"], record["prev"], record["hash"]
        except (ValueError, KeyError, TypeError):
            return number, AuditProblem(number, "changed: not an audit record")
        if record_hash(record) != own:
            return number, AuditProblem(number, "changed: its content does not match its hash")
        if key is not None and not hmac.compare_digest(str(record.get("mac", "")), _mac(key, own)):
            return number, AuditProblem(number, "forged or changed: its MAC does not match the audit key")
        expected = previous["seq"] + 1 if previous else 1
        if seq > expected and later[expected] > 0:
            return number, AuditProblem(number, f"inserted or reordered: seq {seq} where seq {expected} belongs")
        if seq > expected:
            return number, AuditProblem(number, f"{seq - expected} line(s) removed before it (seq {expected}"
                                                f"{'' if seq - expected == 1 else f'..{seq - 1}'} missing)")
        if seq < expected:
            return number, AuditProblem(number, f"inserted or reordered: seq {seq} after seq {expected - 1}")
        if prev != (previous["hash"] if previous else GENESIS):
            return number, AuditProblem(number, "does not follow the line before it: that line was changed, or this "
                                                "one was inserted in its place")
        previous = record
    return len(lines), None
