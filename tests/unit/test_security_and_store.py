"""Credentials (provisioning, identification) and the checkpoint store."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from health_mlops.fl.store import CheckpointError, CheckpointStore
from health_mlops.system.files import commit_atomically, open_atomically, write_atomically
from health_mlops.trust.credentials import (ADMIN, REGISTRY_FILE_NAME, AccessDenied, CredentialError, FailureThrottle,
                                            Gatekeeper, Identity, TokenAuthority, bearer, provision, read_token,
                                            revoke_token, rotate_token, token_path)
from health_mlops.trust.pki import cert_path, load_certificate, rotate


def test_provision_issues_private_tokens_and_the_registry_holds_only_digests(tmp_path: Path) -> None:
    holders = [ADMIN, "hospital-1", "hospital-2"]
    assert provision(tmp_path, ["hospital-1", "hospital-2"]) == [*holders, "aggregator", "dashboard", "audit.key"]
    tokens = {name: read_token(token_path(tmp_path, name)) for name in holders}
    assert len(set(tokens.values())) == 3
    for name in holders:
        assert stat.S_IMODE(token_path(tmp_path, name).stat().st_mode) == 0o600
    registry = (tmp_path / REGISTRY_FILE_NAME).read_text()
    assert not any(token in registry for token in tokens.values())
    authority = TokenAuthority.from_directory(tmp_path)
    assert authority.identify(bearer(tokens["hospital-2"])["Authorization"]) == Identity("hospital", "hospital-2")
    assert authority.identify(bearer(tokens[ADMIN])["Authorization"]) == Identity(ADMIN)
    assert authority.identify("Bearer " + tokens["hospital-1"] + "x") is None
    assert authority.identify("Basic " + tokens["hospital-1"]) is None
    assert authority.identify(None) is None


def test_provisioning_again_keeps_existing_tokens_and_adds_new_hospitals(tmp_path: Path) -> None:
    provision(tmp_path, ["hospital-1"])
    first = read_token(token_path(tmp_path, "hospital-1"))
    assert provision(tmp_path, ["hospital-1", "hospital-2"]) == ["hospital-2"]
    assert read_token(token_path(tmp_path, "hospital-1")) == first
    assert TokenAuthority.from_directory(tmp_path).hospitals == ["hospital-1", "hospital-2"]


def test_unusable_credentials_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(CredentialError, match="registry.json"):
        TokenAuthority.from_directory(tmp_path)
    (tmp_path / REGISTRY_FILE_NAME).write_text("{not json")
    with pytest.raises(CredentialError, match="registry.json"):
        TokenAuthority.from_directory(tmp_path)
    with pytest.raises(CredentialError, match="hospital-7.token"):
        read_token(token_path(tmp_path, "hospital-7"))


def test_checkpoints_replace_the_previous_one_whole(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    assert store.load_state() is None
    store.save_state({"runs": [1], "tasks": [], "results": {}})
    store.save_state({"runs": [1, 2], "tasks": [], "results": {}})
    assert store.load_state() == {"runs": [1, 2], "tasks": [], "results": {}}
    assert [p.name for p in store.state_path.parent.iterdir()] == ["state.json"]  # no temporary left behind
    store.save_weights("run-1", 3, b"weights")
    assert store.load_weights("run-1", 3) == b"weights" and store.load_weights("run-1", 4) is None


def test_an_interrupted_write_leaves_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "state.json"
    write_atomically(path, json.dumps({"round": 1}).encode())

    def crash(*_: object) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr("health_mlops.system.files.os.replace", crash)
    with pytest.raises(OSError):
        write_atomically(path, json.dumps({"round": 2}).encode())
    assert json.loads(path.read_text()) == {"round": 1}


@pytest.mark.parametrize("content", ["{truncated", "[]", '{"runs": []}'])
def test_an_unreadable_checkpoint_is_an_error_naming_the_file(tmp_path: Path, content: str) -> None:
    store = CheckpointStore(tmp_path)
    store.state_path.parent.mkdir(parents=True)
    store.state_path.write_text(content)
    with pytest.raises(CheckpointError, match="state.json"):
        store.load_state()


def test_deleting_a_token_and_provisioning_again_revokes_it(tmp_path: Path) -> None:
    provision(tmp_path, ["hospital-1", "hospital-2"])
    old = read_token(token_path(tmp_path, "hospital-1"))
    token_path(tmp_path, "hospital-1").unlink()
    assert provision(tmp_path, ["hospital-1"]) == ["hospital-1"]
    authority = TokenAuthority.from_directory(tmp_path)
    assert authority.identify(bearer(old)["Authorization"]) is None
    assert authority.identify(bearer(read_token(token_path(tmp_path, "hospital-1")))["Authorization"]) == Identity(
        "hospital", "hospital-1")
    assert authority.hospitals == ["hospital-1", "hospital-2"]


def test_the_gatekeeper_binds_a_token_to_its_holders_certificate(tmp_path: Path) -> None:
    provision(tmp_path, ["hospital-1", "hospital-2"])
    gatekeeper = Gatekeeper(tmp_path, require_certificate=True)
    token = bearer(read_token(token_path(tmp_path, "hospital-1")))["Authorization"]
    own, other = (load_certificate(cert_path(tmp_path, name)) for name in ("hospital-1", "hospital-2"))
    assert gatekeeper.identify(token, own) == Identity("hospital", "hospital-1")
    for certificate, status in ((other, 403), (None, 401)):
        with pytest.raises(AccessDenied) as denied:
            gatekeeper.identify(token, certificate)
        assert denied.value.status == status
    assert Gatekeeper(tmp_path, require_certificate=False).identify(token, None) == Identity("hospital", "hospital-1")


def test_the_gatekeeper_sees_rotation_and_revocation_without_being_rebuilt(tmp_path: Path) -> None:
    provision(tmp_path, ["hospital-1", "hospital-2"])
    gatekeeper = Gatekeeper(tmp_path, require_certificate=True)
    old_token = bearer(read_token(token_path(tmp_path, "hospital-1")))["Authorization"]
    old_certificate = load_certificate(cert_path(tmp_path, "hospital-1"))
    assert gatekeeper.identify(old_token, old_certificate).hospital == "hospital-1"
    rotate_token(tmp_path, "hospital-1")
    rotate(tmp_path, "hospital-1")
    new_token = bearer(read_token(token_path(tmp_path, "hospital-1")))["Authorization"]
    with pytest.raises(AccessDenied, match="unknown bearer token"):
        gatekeeper.identify(old_token, old_certificate)
    with pytest.raises(AccessDenied, match="revoked"):
        gatekeeper.identify(new_token, old_certificate)
    assert gatekeeper.identify(new_token, load_certificate(cert_path(tmp_path, "hospital-1"))).hospital == "hospital-1"
    revoke_token(tmp_path, "hospital-2")
    assert gatekeeper.hospitals == ["hospital-1"]


def test_an_unreadable_registry_keeps_the_gatekeepers_last_good_one(tmp_path: Path) -> None:
    provision(tmp_path, ["hospital-1"])
    gatekeeper = Gatekeeper(tmp_path, require_certificate=False)
    token = bearer(read_token(token_path(tmp_path, "hospital-1")))["Authorization"]
    (tmp_path / REGISTRY_FILE_NAME).write_text("{not json")
    assert gatekeeper.identify(token, None).hospital == "hospital-1"
    with pytest.raises(CredentialError, match="no certificate revocation list"):
        (tmp_path / "crl.pem").unlink()
        Gatekeeper(tmp_path, require_certificate=True)


def test_repeated_failures_from_a_source_are_slowed_down_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    throttle = FailureThrottle(free=3, base_delay_s=0.1, max_delay_s=1.0, window_s=60, clock=lambda: now[0])
    with caplog.at_level("WARNING", logger="health_mlops.trust.credentials"):
        delays = [throttle.failed("10.0.0.7", "unknown token") for _ in range(9)]
    assert delays == [0, 0, 0, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert throttle.failed("10.0.0.8", "unknown token") == 0  # another source is not slowed down
    assert len([r for r in caplog.records if "10.0.0.7" in r.getMessage()]) == 1
    now[0] = 61.0  # a new window
    assert throttle.failed("10.0.0.7", "unknown token") == 0


def test_the_throttle_remembers_a_bounded_number_of_sources() -> None:
    throttle = FailureThrottle(free=0, base_delay_s=0.1, max_sources=100)
    assert throttle.failed("10.9.9.9", "unknown token") == 0.1
    assert throttle.failed("10.9.9.9", "unknown token") == 0.2  # remembered
    for i in range(100):  # a hundred newer sources push it out
        throttle.failed(f"10.0.0.{i}", "unknown token")
    assert throttle.failed("10.9.9.9", "unknown token") == 0.1


def test_what_the_aggregator_keeps_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    """States, weights, run records, history and results hold patient-derived numbers: 0600 files in 0700 folders
    from their creation, and made 0600 again over a file left world-readable."""
    store = CheckpointStore(tmp_path / "models")
    store.save_state({"runs": [], "tasks": [], "results": {}})
    store.save_weights("run-1", 1, b"weights")
    store.append_history("run-1", [{"round": 0}])
    handle = open_atomically(store.result_path("run-1", "hospital-1.r1"))
    handle.write(b"update")
    commit_atomically(handle, store.result_path("run-1", "hospital-1.r1"))
    files = [p for p in (tmp_path / "models").rglob("*") if p.is_file() and p.name != ".lock"]
    folders = [p for p in (tmp_path / "models").rglob("*") if p.is_dir()] + [tmp_path / "models"]
    assert len(files) == 4
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == dict.fromkeys((p.name for p in files), 0o600)
    assert {stat.S_IMODE(p.stat().st_mode) for p in folders} == {0o700}
    store.state_path.chmod(0o644)
    store.save_state({"runs": [1], "tasks": [], "results": {}})
    store.history_path("run-1").chmod(0o644)
    store.append_history("run-1", [{"round": 1}])
    assert {stat.S_IMODE(p.stat().st_mode) for p in (store.state_path, store.history_path("run-1"))} == {0o600}
