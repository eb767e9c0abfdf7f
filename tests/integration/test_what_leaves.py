"""Proof of what leaves a hospital: every byte hospital-1's node sends during a whole federated run is recorded
and searched for its patients.

The node is a real process and talks mutual TLS; the recorder is a man in the middle (`mitm.RecordingProxy`) that
keeps the plaintext of everything the node sends (every request: stats, fits, evaluations, heartbeats, polls,
weights and identity checks). The test then checks that

- no patient's exact value appears anywhere in it: not as text, not as a JSON number, not as a float32 or float64
  in the tensors;
- every category and histogram bin held by 1 to 4 of the hospital's patients (a rare group, which could single
  them out) was sent as null, and the node, the run record and the recording agree on how many were withheld;
- the node's `GET /v1/status` list of what it sent is the recording, request for request.
"""

from __future__ import annotations

import json
import re
import struct
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest

from health_mlops.data.preprocess import encoded_columns, feature_histograms
from health_mlops.data.split import split_frame
from health_mlops.fl.messages import RESULT_TASK_KEY, decode_weights
from health_mlops.fl.metadata import StatsMetadata
from health_mlops.fl.stats import suppressed_cells
from health_mlops.spec import load_spec
from health_mlops.trust.credentials import bearer, read_token, token_path
from tests.conftest import run_cli
from tests.integration.mitm import RecordingProxy
from tests.integration.test_federation_processes import Cluster

pytestmark = pytest.mark.process

SPEC = load_spec("health-risk")
WATCHED = "hospital-1"
SMALL_CELL = 5  # the nodes' small-cell threshold: a group of 1..4 patients is withheld
RARE_SMOKERS = 3  # current smokers at the watched hospital, all in its training rows


def prepare_watched_hospital(data: Path) -> pd.DataFrame:
    """Make smoking rare at the watched hospital (RARE_SMOKERS current smokers, all in its training rows); return
    those training rows, as its node will split them."""
    path = data / WATCHED / "patient_days.csv"
    frame = pd.read_csv(path, dtype={"asthma_copd": str, "diabetes": str, "cardiovascular": str})
    train, _ = split_frame(frame, SPEC, WATCHED, seed=42, test_fraction=0.2, stratify=True)
    frame.loc[frame["smoker"] == "current", "smoker"] = "former"
    frame.loc[train[:RARE_SMOKERS], "smoker"] = "current"
    frame.to_csv(path, index=False)
    return frame.iloc[train].reset_index(drop=True)


@pytest.fixture
def recorded_run(tmp_path: Path, empty_mlflow_db: Path) -> Iterator[tuple[Cluster, RecordingProxy, pd.DataFrame, str]]:
    data = tmp_path / "data"
    run_cli("data", "generate", "--out", str(data), "--hospitals", "3", "--rows-per-hospital", "600", "--seed", "11",
            home=tmp_path / "generate-home")
    train = prepare_watched_hospital(data)
    cluster = Cluster(tmp_path / "home", data, empty_mlflow_db)
    try:
        cluster.start_aggregator()
        with RecordingProxy(cluster.credentials, WATCHED, cluster.base + 9, cluster.base) as proxy:
            cluster.start_node(WATCHED, "watched", central_url=f"https://127.0.0.1:{proxy.port}")
            cluster.start_node("hospital-2", "hospital-2-a")
            cluster.start_node("hospital-3", "hospital-3-a")
            # Enough local epochs that the watched node heartbeats while it trains (every lease_s / 3).
            run_id = cluster.start_run(rounds=2, local_epochs=300, lease_s=1.5)
            final = cluster.wait_for(run_id, lambda v: v.status != "running", timeout_s=300)
            assert final.status == "completed", final.reason
            yield cluster, proxy, train, run_id
    finally:
        cluster.admin.close()
        cluster.processes.stop_all()


def node_status(cluster: Cluster, hospital: str | None = WATCHED) -> dict[str, Any]:
    """The watched node's status page, as `hospital`'s operator (its token) sees it, or anyone (None)."""
    api_port, _ = cluster.node_ports["watched"]
    headers = bearer(read_token(token_path(cluster.credentials, hospital))) if hospital else {}
    return httpx.get(f"http://127.0.0.1:{api_port}/v1/status", headers=headers, timeout=10).json()


def test_the_requests_a_node_sent_are_listed_to_its_own_hospital_only(
        recorded_run: tuple[Cluster, RecordingProxy, pd.DataFrame, str]) -> None:
    """The round-0 sums, sums of squares and histograms a node sent are its hospital's: whoever reaches its port
    sees a summary, another hospital's token too."""
    cluster, *_ = recorded_run
    own = node_status(cluster)
    assert own["sent"]["log"] and any("content" in entry for entry in own["sent"]["log"])
    for stranger in (None, "hospital-2"):
        summary = node_status(cluster, stranger)
        assert summary["hospital"] == WATCHED and summary["data"]["rows_train"] == own["data"]["rows_train"]
        assert summary["sent"]["requests"] >= 1 and set(summary["sent"]) == {"requests", "body_bytes", "log"}
        assert "present this hospital's token" in summary["sent"]["log"]  # no entry, no content


def test_only_aggregates_leave_and_the_node_lists_every_request(
        recorded_run: tuple[Cluster, RecordingProxy, pd.DataFrame, str]) -> None:
    cluster, proxy, train, run_id = recorded_run
    asked_at = time.time()
    status = node_status(cluster)
    listed = Counter((e["method"], e["path"], tuple(e["headers"]), e["body_bytes"]) for e in status["sent"]["log"])
    assert status["sent"]["requests"] == status["sent"]["kept"] == sum(listed.values())

    # The list and the recording are the same requests: everything listed reached the wire (allowing a request
    # in flight when the status was read to arrive), and everything that arrived before the status was read is
    # listed.
    deadline = time.monotonic() + 30
    while listed - Counter(r.signature() for r in proxy.requests()) and time.monotonic() < deadline:
        time.sleep(0.2)
    recording = proxy.requests()
    assert not listed - Counter(r.signature() for r in recording), "listed but never sent"
    assert not Counter(r.signature() for r in recording if r.at < asked_at) - listed, "sent but not listed"

    # Every kind of traffic was recorded: the whole run went through the recorder.
    paths = [(r.method, re.sub(r"\.r\d+\.a\d+\.", ".<round>.", r.path)) for r in recording]
    results = [r for r in recording if r.path.endswith("/result")]
    assert {m for m, _ in paths} == {"GET", "POST"}
    assert any(p.startswith("/v1/tasks/next") for _, p in paths) and ("GET", "/v1/whoami") in paths
    assert any(p.endswith("/heartbeat") for _, p in paths) and any("/weights" in p for _, p in paths)
    sent = [decode_weights(r.body) for r in results]
    # Each result names the task it answers (the path's), and besides it carries only aggregates.
    assert [metadata.pop(RESULT_TASK_KEY) for _, metadata in sent] == [r.path.split("/")[3] for r in results]
    stats = next(metadata for tensors, metadata in sent if "count" in metadata)
    fits = [metadata for tensors, metadata in sent if tensors]
    assert len(fits) >= 2 and all("train_loss" in m for m in fits)  # tensors travel only with fits
    assert any("num_examples" in m and not tensors for tensors, m in sent)  # the evaluation

    # No patient's exact value, anywhere in what was sent.
    text = b"".join(f"{r.method} {r.path}\r\n".encode() + json.dumps(r.headers).encode() + r.body
                    for r in recording)
    numbers = {number for _, metadata in sent for number in _json_numbers(metadata)}
    tensor_bytes = b"".join(t.tobytes() for tensors, _ in sent for t in tensors.values())
    numeric = [f.name for f in SPEC.features if f.type == "numeric"]
    # A value of one or two significant digits (0.5) is also what a ratio of small counts is (a sensitivity of 1/2
    # on a hospital's test rows) and singles no one out: the search is for values with three digits or more.
    values = {float(v) for v in train[numeric].to_numpy().ravel()
              if float(v) != round(float(v)) and len(f"{float(v):g}".replace(".", "").lstrip("0-")) >= 3}
    assert len(values) > 500  # the search has something to find
    for value in values:
        assert value not in numbers, f"patient value {value} sent as a number"
        written = f"{value:g}".encode()
        assert not re.search(rb"(?<![0-9.])" + re.escape(written) + rb"(?![0-9])", text), f"{value} sent as text"
        assert struct.pack("<f", value) not in tensor_bytes and struct.pack("<d", value) not in tensor_bytes

    # Rare groups were withheld, and the node, the run record and the recording say how many.
    columns = encoded_columns(SPEC)
    assert stats["sums"][columns.index("smoker=current")] is None  # 3 current smokers: never sent
    for j, name in enumerate(columns):
        if "=" in name:
            feature, category = name.split("=", 1)
            held = int((train[feature].astype(str) == category).sum())
            assert (stats["sums"][j] is None) == (0 < held < SMALL_CELL), name
    for feature, counts in feature_histograms(train, SPEC).items():
        sent = stats["histograms"][feature]
        assert [c is None for c in sent] == [bool(0 < c < SMALL_CELL) for c in counts], feature
        assert all(s == c for s, c in zip(sent, counts, strict=True) if s is not None), feature
    withheld = suppressed_cells(StatsMetadata.model_validate(stats))
    assert withheld["categories"] >= 1 and withheld["histogram_bins"] >= 1
    assert {k: status["suppressed"][k] for k in withheld} == withheld and status["suppressed"]["run_id"] == run_id
    assert cluster.view(run_id).suppressed[WATCHED] == withheld


def _json_numbers(value: object) -> Iterator[float]:
    if isinstance(value, bool):
        return
    if isinstance(value, int | float):
        yield float(value)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _json_numbers(item)
    elif isinstance(value, list):
        for item in value:
            yield from _json_numbers(item)


def test_patient_values_would_be_found_if_they_were_sent() -> None:
    """The search above can fail: a body carrying a patient's value is caught by each of its checks."""
    value = 36.88
    assert re.search(rb"(?<![0-9.])" + re.escape(f"{value:g}".encode()) + rb"(?![0-9])", b'{"t": 36.88}')
    assert value in set(_json_numbers({"rows": [[1, 36.88]]}))
    assert struct.pack("<f", value) in np.array([0.5, value], dtype=np.float32).tobytes()
