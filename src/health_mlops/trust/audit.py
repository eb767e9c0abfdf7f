"""The audit log: one JSON line per admin action, refused attempt, run start and end, registration, promotion
and rollback, appended and never rewritten, and able to prove it.

Each line carries its sequence number, the hash of the line before it and its own hash (SHA-256 over its
canonical JSON), and, when `provision` has issued an audit key (`audit.key` in the credentials folder), an
HMAC of its hash with that key. `verify_audit` walks the chain and names the first line that was changed,
removed, inserted or reordered. Without a key, the chain proves the log against careless or partial edits; a
forger who rewrites every later line consistently is caught only by the key, which the log's readers do not
have. The log records; it never decides: rollback follows MLflow's own version history (`registry.py`).

A log cut short (its last lines deleted, or emptied) is still a valid chain. So the chain's head is also kept where
the log's writer cannot quietly roll it back, as `Anchor`s: every registration, promotion and rollback records its
audit line's sequence number and hash on the model version in MLflow (`registry.py`), and the aggregator's
operations port publishes the log's last sequence number (`health_mlops_audit_log_sequence`), whose history
Prometheus keeps. `verify_audit` checks the log against every anchor it is given: a line an anchor saw must still
be there, with the hash it saw.

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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from health_mlops.errors import AuditError
from health_mlops.system.files import write_private

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


DEFAULT_LOG_NAME = "local"


class AuditLog:
    """Appends to and reads one audit log file. `name` tells the logs of one consortium apart where there are
    several (in Kubernetes, the aggregator's and each dashboard replica's): an anchor names the log it is of."""

    def __init__(self, path: Path, key: bytes | None = None, *, name: str = DEFAULT_LOG_NAME) -> None:
        self.path, self.key, self.name = path, key, name

    def append(self, action: str, actor: str, *, outcome: str = "ok", **details: Any) -> dict[str, Any]:
        """Append one line; the record as written (its `seq` and `hash` anchor it elsewhere)."""
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
        return record

    def head(self) -> int:
        """The sequence number of the log's last line (0: empty or absent)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return 0
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # not while a line is half written
            last = _last_line(fd)
        finally:
            os.close(fd)
        return int(_seq_of(last.decode("utf-8", "replace")) or 0) if last else 0

    def entries(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]


@dataclass(frozen=True)
class Anchor:
    """A line of the log as a witness outside it saw it: its sequence number and (where known) its hash."""

    seq: int
    hash: str | None
    witness: str  # who saw it, for the message: "MLflow (health-risk v3)"


def attestation(key: bytes, model: str, version: int, seq: int, digest: str) -> str:
    """The MAC that binds an audit line (seq, hash) to a model version becoming champion: written beside the
    champion alias by the registry, checked by every dashboard before it serves that version. MLflow's own
    users cannot write it: they do not hold the audit key."""
    return hmac.new(key, f"champion|{model}|{version}|{seq}|{digest}".encode(), hashlib.sha256).hexdigest()


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


def verify_audit(path: Path, key: bytes | None = None,
                 anchors: Sequence[Anchor] = ()) -> tuple[int, AuditProblem | None]:
    """(lines checked, the first problem or None). With `key`, every line must carry a valid MAC; every anchor's
    line must be in the log with the anchor's hash (a log cut short, or emptied, fails here)."""
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    checked, problem = _verify_chain(lines, key)
    if problem is not None:
        return checked, problem
    hashes = {record["seq"]: record["hash"] for record in map(json.loads, lines)}
    missing = [anchor for anchor in anchors if anchor.seq not in hashes]
    if missing:  # named by the furthest line a witness saw: how much was cut
        furthest = max(missing, key=lambda a: a.seq)
        return checked, AuditProblem(len(lines) + 1, f"cut short: {furthest.witness} saw line {furthest.seq}, "
                                                      f"but the log ends at line {len(lines)}")
    for anchor in sorted(anchors, key=lambda a: a.seq):
        if anchor.hash is not None and hashes[anchor.seq] != anchor.hash:
            return checked, AuditProblem(anchor.seq, f"rewritten: {anchor.witness} saw another line here")
    return checked, None


def _verify_chain(lines: list[str], key: bytes | None) -> tuple[int, AuditProblem | None]:
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
