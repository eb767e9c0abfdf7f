"""Settings come from the environment under the names the manifests set, and bad values are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from health_mlops.config import get_federation_defaults, get_settings


def test_federation_parameters_come_from_their_env_vars(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEALTH_MLOPS_FL_ROUNDS", "7")
    monkeypatch.setenv("HEALTH_MLOPS_FL_STRATEGY", "fedyogi")
    monkeypatch.setenv("HEALTH_MLOPS_AGGREGATOR_URL", "http://aggregator:8080")
    federation = get_federation_defaults()
    assert (federation.rounds, federation.strategy, federation.local_epochs) == (7, "fedyogi", 1)
    assert get_settings().aggregator_url == "http://aggregator:8080"


def test_an_unknown_strategy_or_zero_rounds_is_refused_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEALTH_MLOPS_FL_STRATEGY", "fedmagic")
    with pytest.raises(ValidationError, match="fedmagic.*fedavg"):
        get_federation_defaults()
    monkeypatch.setenv("HEALTH_MLOPS_FL_STRATEGY", "median")
    monkeypatch.setenv("HEALTH_MLOPS_FL_ROUNDS", "0")
    with pytest.raises(ValidationError, match="rounds"):
        get_federation_defaults()


def test_the_audit_log_lives_in_home_unless_placed_elsewhere(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HEALTH_MLOPS_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HEALTH_MLOPS_AUDIT_LOG", raising=False)
    assert get_settings().audit_log == tmp_path / "home" / "audit.log"
    monkeypatch.setenv("HEALTH_MLOPS_AUDIT_LOG", str(tmp_path / "volume" / "audit.log"))  # the aggregator's volume
    assert get_settings().audit_log == tmp_path / "volume" / "audit.log"
