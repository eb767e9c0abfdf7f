"""Every setting the project reads, with its environment variable: the one place they are defined.

Settings are read from the environment each time `get_settings()` is called, so a test or a subprocess
that sets `HEALTH_MLOPS_HOME` sees its own value.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class TrainingDefaults(BaseSettings):
    """Local training hyper-parameters, shared by pooled, local and federated training."""

    model_config = SettingsConfigDict(env_prefix="HEALTH_MLOPS_TRAIN_")

    epochs: int = Field(8, ge=1, description="local epochs per training call (per round in federated mode)")
    learning_rate: float = Field(0.001, gt=0)
    batch_size: int = Field(64, ge=1)
    weight_decay: float = Field(1e-4, ge=0)
    seed: int = 0


class Settings(BaseSettings):
    """Process-wide settings; env vars are `HEALTH_MLOPS_<NAME>`."""

    model_config = SettingsConfigDict(env_prefix="HEALTH_MLOPS_")

    home: Path = Field(Path(".health-mlops"), description="all local state of a run lives here")
    split_seed: int = Field(42, description="seed of every hospital's train/test split")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="share of a hospital's rows held out for test")
    torch_threads: int = Field(1, ge=1, description="small models train fastest on one thread")

    @property
    def quality_dir(self) -> Path:
        """Where validation reports and quarantined rows are written."""
        return self.home / "quality"


def get_settings() -> Settings:
    return Settings()


def get_training_defaults() -> TrainingDefaults:
    return TrainingDefaults()
