"""The registry and audit commands as a user runs them: registry changes need the admin credential (a refusal is
audited), and `audit verify` proves the log or names the first bad line."""

from __future__ import annotations

from pathlib import Path

import pytest

from health_mlops.registry import QualityGate, Registry
from health_mlops.trust.audit import AuditLog, load_audit_key
from health_mlops.trust.credentials import provision
from tests.conftest import run_cli, with_empty_mlflow_db
from tests.unit.test_registry import record

pytestmark = pytest.mark.process


@pytest.fixture
def registry(home: Path, monkeypatch: pytest.MonkeyPatch, empty_mlflow_db: Path) -> Registry:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("HEALTH_MLOPS_ADMIN_TOKEN", raising=False)
    with_empty_mlflow_db(home, empty_mlflow_db)
    provision(home / "credentials", ["hospital-1"])
    registry = Registry(home, "health-risk", audit=AuditLog(home / "audit.log", load_audit_key(home / "credentials")))
    registry.register(record("run-a", 0.80), gate=QualityGate(tolerance=0.0))
    registry.register(record("run-b", 0.70), gate=QualityGate(tolerance=0.0))  # a challenger
    return registry


def test_registry_changes_need_the_admin_credential(registry: Registry, home: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    hospital_token = home / "credentials" / "hospital-1.token"
    refused = run_cli("registry", "promote", "2", "--admin-token-file", str(hospital_token), home=home, check=False)
    assert refused.returncode == 2 and "needs the admin credential" in refused.stderr
    monkeypatch.setenv("HEALTH_MLOPS_ADMIN_TOKEN", "guessed")
    guessed = run_cli("registry", "rollback", home=home, check=False)
    assert guessed.returncode == 2 and "not the admin token" in guessed.stderr
    assert registry.champion() is not None and registry.champion().version == 1  # nothing changed
    monkeypatch.delenv("HEALTH_MLOPS_ADMIN_TOKEN")

    assert "v2 is now champion" in run_cli("registry", "promote", "2", home=home).stdout
    again = run_cli("registry", "promote", "2", home=home, check=False)  # a no-op is said, and not audited
    assert again.returncode == 2 and "v2 is already the champion: nothing to promote" in again.stderr
    assert "v1 is champion again" in run_cli("registry", "rollback", home=home).stdout
    entries = registry.audit_entries()
    refusals = [(e["action"], e["outcome"]) for e in entries if e["outcome"] != "ok"]
    assert refusals == [("registry promote", "refused 401"), ("registry rollback", "refused 401")]
    changes = [(e["action"], e["version"], e["actor"].split(" (")[0]) for e in entries[-2:]]
    assert changes == [("promote", 2, "admin"), ("rollback", 1, "admin")]


def test_audit_verify_passes_an_intact_log_and_names_a_tampered_line(registry: Registry, home: Path) -> None:
    intact = run_cli("audit", "verify", home=home)
    assert "the chain is intact and every MAC matches the audit key" in intact.stdout
    lines = (home / "audit.log").read_text().splitlines()
    lines[1] = lines[1].replace('"actor": "quality-gate"', '"actor": "admin"')
    (home / "audit.log").write_text("\n".join(lines) + "\n")
    tampered = run_cli("audit", "verify", home=home, check=False)
    assert tampered.returncode == 1 and "line 2: changed" in tampered.stderr


def test_audit_verify_fails_a_log_cut_short_or_emptied_against_the_registrys_anchors(registry: Registry,
                                                                                     home: Path) -> None:
    """Deleting the last lines (the promotion of v2) or emptying the log leaves a valid chain; MLflow still holds
    each registration's and promotion's line, and verify finds the log shorter than what MLflow saw."""
    run_cli("registry", "promote", "2", home=home)
    intact = run_cli("audit", "verify", home=home)
    assert "every line of 2 seen outside the log is in it" in intact.stdout
    lines = (home / "audit.log").read_text().splitlines()
    for kept in (lines[:-1], []):
        (home / "audit.log").write_text("".join(line + "\n" for line in kept))
        cut = run_cli("audit", "verify", home=home, check=False)
        assert cut.returncode == 1, cut.stdout
        assert f"cut short: MLflow (health-risk v2) saw line {len(lines)}, but the log ends at line {len(kept)}" \
            in cut.stderr


def test_audit_verify_without_the_key_refuses_to_say_intact_unless_asked_for_hashes_only(registry: Registry,
                                                                                         home: Path) -> None:
    """Without the key, a log rewritten with fresh hashes would pass: verify says so and exits 2, not 'intact'."""
    (home / "credentials" / "audit.key").rename(home / "audit.key.elsewhere")
    refused = run_cli("audit", "verify", home=home, check=False)
    assert refused.returncode == 2 and "no audit key" in refused.stderr and "--hashes-only" in refused.stderr
    assert "intact" not in refused.stdout
    hashes = run_cli("audit", "verify", "--hashes-only", home=home)
    assert "the chain is intact (no audit key in the credentials folder: hashes checked, MACs not)" in hashes.stdout


def test_dashboard_accounts_are_managed_from_the_command_line_and_every_change_is_audited(home: Path,
                                                                                          tmp_path: Path) -> None:
    provision(home / "credentials", [])
    password = tmp_path / "password"
    password.write_text("short\n")
    refused = run_cli("dashboard-account", "add", "cleo", "--role", "clinician", "--password-file", str(password),
                      home=home, check=False)
    assert refused.returncode == 2 and "at least 12 characters" in refused.stderr
    wrong_role = run_cli("dashboard-account", "add", "cleo", "--role", "root", "--password-file", str(password),
                         home=home, check=False)
    assert wrong_role.returncode == 2 and "one of clinician, operator, admin" in wrong_role.stderr
    password.write_text("a clinician's passphrase\n")
    run_cli("dashboard-account", "add", "cleo", "--role", "clinician", "--password-file", str(password), home=home)
    run_cli("dashboard-account", "add", "cleo", "--role", "operator", "--password-file", str(password), home=home)
    key = run_cli("dashboard-account", "key", "lab-system", home=home).stdout.strip()
    listed = run_cli("dashboard-account", "list", home=home).stdout
    assert "cleo" in listed and "operator" in listed and "lab-system" in listed
    assert "argon2" not in listed and key not in listed
    run_cli("dashboard-account", "revoke-key", "lab-system", home=home)
    run_cli("dashboard-account", "remove", "cleo", home=home)
    missing = run_cli("dashboard-account", "remove", "cleo", home=home, check=False)
    assert missing.returncode == 2 and "no user 'cleo'" in missing.stderr
    entries = AuditLog(home / "audit.log").entries()
    assert [(e["action"], e.get("user") or e.get("key"), e.get("role")) for e in entries] == [
        ("dashboard-account add", "cleo", "clinician"), ("dashboard-account change", "cleo", "operator"),
        ("dashboard-account key", "lab-system", "clinician"), ("dashboard-account revoke-key", "lab-system", None),
        ("dashboard-account remove", "cleo", None)]
    assert run_cli("audit", "verify", home=home).returncode == 0
