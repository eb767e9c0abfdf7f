"""The audit log proves itself: a hash chain (and MACs with a key) that names the first line changed, removed,
inserted or reordered; appends from several processes at once stay one chain."""

from __future__ import annotations

import json
import multiprocessing
import stat
from pathlib import Path

import pytest

from health_mlops.trust.audit import Anchor, AuditLog, issue_audit_key, load_audit_key, record_hash, verify_audit

KEY = bytes(range(32))


def write_log(path: Path, lines: int = 6, key: bytes | None = None) -> list[str]:
    log = AuditLog(path, key)
    for i in range(lines):
        log.append("promote", "admin", model="health-risk", version=i + 1, reason="by hand")
    return path.read_text(encoding="utf-8").splitlines()


def rewrite(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def test_an_untouched_log_verifies_and_is_private(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    lines = write_log(path)
    assert verify_audit(path) == (6, None)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    records = [json.loads(line) for line in lines]
    assert [r["seq"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(r["prev"] == p["hash"] for p, r in zip(records, records[1:]))
    assert verify_audit(tmp_path / "absent.log") == (0, None)


def edited(lines: list[str], how: str) -> list[str]:
    changed = list(lines)
    if how == "changed":
        changed[2] = changed[2].replace('"version": 3', '"version": 5')
    elif how == "removed":
        del changed[2]
    elif how == "inserted":
        changed.insert(2, changed[4])
    elif how == "reordered":
        changed[2], changed[3] = changed[3], changed[2]
    elif how == "changed, hash recomputed":
        record = json.loads(changed[2])
        record["version"] = 5
        record["hash"] = record_hash(record)
        changed[2] = json.dumps(record)
    return changed


@pytest.mark.parametrize(("how", "line", "says"), [
    ("changed", 3, "changed"),
    ("removed", 3, "removed"),
    ("inserted", 3, "inserted or reordered"),
    ("reordered", 3, "inserted or reordered"),
    ("changed, hash recomputed", 4, "does not follow"),  # the next line no longer chains to it
])
def test_verify_names_the_first_line_changed_removed_inserted_or_reordered(tmp_path: Path, how: str, line: int,
                                                                            says: str) -> None:
    path = tmp_path / "audit.log"
    rewrite(path, edited(write_log(path), how))
    _, problem = verify_audit(path)
    assert problem is not None and problem.line == line and says in problem.reason, problem


def test_a_consistently_forged_chain_is_caught_by_the_key_only(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_log(path, lines=3, key=KEY)
    assert verify_audit(path, KEY) == (3, None)
    forged = tmp_path / "forged.log"  # someone without the key writes a whole new, consistent chain
    write_log(forged, lines=3)
    assert verify_audit(forged) == (3, None)
    _, problem = verify_audit(forged, KEY)
    assert problem is not None and problem.line == 1 and "MAC" in problem.reason


def test_the_key_is_issued_once_private_and_read_back(tmp_path: Path) -> None:
    assert load_audit_key(tmp_path) is None
    assert issue_audit_key(tmp_path) is True
    key = load_audit_key(tmp_path)
    assert key is not None and len(key) == 32
    assert issue_audit_key(tmp_path) is False and load_audit_key(tmp_path) == key
    assert stat.S_IMODE((tmp_path / "audit.key").stat().st_mode) == 0o600


def _append_many(path: str, writer: int) -> None:
    log = AuditLog(Path(path), KEY)
    for i in range(40):
        log.append("start_run", f"writer-{writer}", run=f"run-{writer}-{i}")


def test_appends_from_several_processes_stay_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_append_many, args=(str(path), w)) for w in range(4)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=120)
        assert writer.exitcode == 0
    assert verify_audit(path, KEY) == (160, None)


def test_details_cannot_overwrite_the_chain_fields(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="prev"):
        AuditLog(tmp_path / "audit.log").append("promote", "admin", prev="0" * 64)


def test_a_log_cut_short_or_emptied_fails_against_what_was_seen_outside_it(tmp_path: Path) -> None:
    """A truncated log is a valid chain: only what a witness outside the log saw (MLflow's anchor of a
    registration, Prometheus' highest line) shows that lines were cut off the end."""
    path = tmp_path / "audit.log"
    lines = write_log(path, key=KEY)
    assert AuditLog(path).head() == 6 and AuditLog(tmp_path / "absent.log").head() == 0
    seen = Anchor(5, json.loads(lines[4])["hash"], "MLflow (health-risk v5)")
    assert verify_audit(path, KEY, [seen, Anchor(6, None, "Prometheus")]) == (6, None)
    rewrite(path, lines[:4])
    assert verify_audit(path, KEY) == (4, None)  # alone, the chain cannot tell
    checked, problem = verify_audit(path, KEY, [seen])
    assert problem is not None and problem.line == 5
    assert "cut short: MLflow (health-risk v5) saw line 5, but the log ends at line 4" in str(problem)
    rewrite(path, [])
    assert verify_audit(path, KEY, [Anchor(6, None, "Prometheus")])[1] is not None
    path.unlink()
    assert "cut short" in str(verify_audit(path, KEY, [seen])[1])


def test_an_anchored_line_rewritten_consistently_fails_against_its_anchor(tmp_path: Path) -> None:
    """Without the key, whoever rewrites a line can rewrite every hash after it; the anchor still has the old."""
    path = tmp_path / "audit.log"
    lines = write_log(path)
    seen = Anchor(3, json.loads(lines[2])["hash"], "MLflow (health-risk v3)")
    forged = AuditLog(tmp_path / "forged.log")
    for i in range(6):
        forged.append("promote", "admin", model="health-risk", version=99 if i == 2 else i + 1, reason="by hand")
    rewrite(path, (tmp_path / "forged.log").read_text().splitlines())
    assert verify_audit(path)[1] is None
    assert "rewritten: MLflow (health-risk v3) saw another line here" in str(verify_audit(path, None, [seen])[1])
