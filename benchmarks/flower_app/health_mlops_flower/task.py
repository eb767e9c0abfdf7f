"""What the ServerApp and the ClientApp share: the partition a SuperNode holds and the run's settings.

Each SuperNode is started with `--node-config 'partition-dir="..."'`, a folder the benchmark's driver wrote from
the same split health-mlops' nodes make (`train.parquet`, `test.parquet`, `hospital.json`). The hospital's work
is health-mlops' own `HospitalWorker`: exactly what a health-mlops node computes for the same task.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pandas as pd
from flwr.app import ConfigRecord

from health_mlops.fl.hospital import HospitalWorker
from health_mlops.fl.run_config import RunConfig
from health_mlops.spec import load_spec


def load_worker(partition_dir: str) -> HospitalWorker:
    """The hospital of this SuperNode, over its own train and test rows."""
    folder = Path(partition_dir)
    meta = json.loads((folder / "hospital.json").read_text(encoding="utf-8"))
    return HospitalWorker(meta["hospital_id"], load_spec(meta["spec"]), pd.read_parquet(folder / "train.parquet"),
                          pd.read_parquet(folder / "test.parquet"), rows_quarantined=int(meta["rows_quarantined"]))


def run_config(config: ConfigRecord) -> RunConfig:
    """health-mlops' run configuration from the values the ServerApp sends with each message."""
    return RunConfig(rounds=int(config["rounds"]), local_epochs=int(config["local-epochs"]),
                     learning_rate=float(config["learning-rate"]), batch_size=int(config["batch-size"]),
                     weight_decay=float(config["weight-decay"]), min_hospitals=int(config["min-nodes"]))


def process_age_seconds() -> float:
    """Seconds since this process started (Linux): for a ClientApp, what Flower spent starting it (a new process
    per message: interpreter, imports, the app bundle installed and loaded) before the message reached the app."""
    with open("/proc/self/stat", encoding="ascii") as stat:
        start_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime", encoding="ascii") as uptime:
        now = float(uptime.read().split()[0])
    return now - start_ticks / os.sysconf("SC_CLK_TCK")


def now() -> float:
    return time.perf_counter()
