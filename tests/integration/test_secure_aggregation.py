"""Secure aggregation with the real services: the loopback federation (`train --mode federated`, mutual TLS)
trains the same model with and without it; a federation of processes survives a hospital's node dying in the
middle of a secure round; and with every node behind a man in the middle (`mitm.RecordingProxy`), everything the
aggregator receives and stores in a secure run is recorded and shown to hold no hospital's update, and a node
whose peer's key the aggregator substitutes refuses the round."""

from __future__ import annotations

import base64
import json
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from health_mlops.fl.messages import decode_weights
from health_mlops.fl.secure_round import flatten
from health_mlops.fl.strategies import Weights
from health_mlops.spec import ModelDefaults, load_spec, spec_to_yaml
from tests.conftest import run_cli_json
from tests.integration.mitm import RecordingProxy, Request
from tests.integration.test_federation_processes import HOSPITALS, Cluster, start_standard_nodes

pytestmark = pytest.mark.process


def test_the_secure_federation_trains_the_plain_federations_model(data: Path, tmp_path: Path) -> None:
    options = ["train", "--data", str(data), "--mode", "federated", "--rounds", "2"]
    plain = run_cli_json(*options, home=tmp_path / "plain")
    secure = run_cli_json(*options, "--secure-aggregation", home=tmp_path / "secure")
    assert (plain["run"]["config"]["secure_aggregation"], secure["run"]["config"]["secure_aggregation"]) == (False,
                                                                                                            True)
    # The same updates summed in fixed point (2^-24) instead of float: the same model to float32's precision.
    for metric in ("auc", "brier", "log_loss"):
        assert secure["mean_over_hospitals"][metric] == pytest.approx(plain["mean_over_hospitals"][metric], abs=1e-5)


@pytest.fixture
def cluster(tmp_path: Path, data: Path, empty_mlflow_db: Path) -> Cluster:
    cluster = Cluster(tmp_path / "home", data, empty_mlflow_db)
    yield cluster
    cluster.admin.close()
    cluster.processes.stop_all()


def test_a_node_dying_in_a_secure_round_leaves_the_others_to_finish_the_run(cluster: Cluster) -> None:
    cluster.start_aggregator()
    start_standard_nodes(cluster)  # hospital-1 has two replicas: a secure round's steps are one replica's
    # A dead hospital holds each later phase up to its deadline; the heartbeats keep the living ones' leases.
    run_id = cluster.start_run(secure_aggregation=True, min_hospitals=2, rounds=3, lease_s=10, round_deadline_s=20,
                               secure_phase_s=8)
    cluster.wait_for(run_id, lambda v: v.round >= 2, timeout_s=300)
    cluster.nodes["hospital-3-a"].process.send_signal(signal.SIGKILL)  # mid-round, in whichever phase
    final = cluster.wait_for(run_id, lambda v: v.status != "running", timeout_s=600)
    assert final.status == "completed", final.reason
    fits = [r for r in final.history if r.kind.value == "fit"]
    assert all(r.secure_aggregation is not None and r.secure_aggregation["threshold"] == 2 for r in fits)
    first = fits[0].secure_aggregation
    assert first is not None and "hospital-3" in first["masked"]  # alive in round 1
    after = fits[-1].secure_aggregation
    assert after is not None and after["masked"] == ["hospital-1", "hospital-2"]  # hospital-3 is gone
    assert "hospital-3" not in fits[-1].hospitals
    assert final.history[-1].global_metrics["auc"] > 0.6
    log = cluster.aggregator.log_path.read_text(encoding="utf-8")
    assert " ERROR " not in log and "Traceback" not in log


# --- everything the aggregator receives and stores --------------------------------------------------------------

# A model of about 1.03M parameters: the correlation of a random vector with an update is then ~N(0, 0.001), so
# the bound 0.01 stands ten standard deviations away.
WIDE = ModelDefaults(kind="mlp", hidden=(1000, 1000))
SMALL_BODY = 64 * 1024  # every other request a hospital sends in a secure round (keys, shares, reveal) is smaller


@dataclass
class Witnessed:
    """A federation of processes, each hospital's node behind its own man in the middle."""

    cluster: Cluster
    proxies: dict[str, RecordingProxy]

    def sent(self, run_id: str, round_number: int, hospital: str) -> list[Request]:
        """What `hospital`'s node sent about its task of a round of `run_id` (its first attempt)."""
        return [r for r in self.proxies[hospital].requests()
                if r.path.startswith(f"/v1/tasks/{run_id}.r{round_number}.a0.{hospital}/")]

    def result(self, run_id: str, round_number: int, hospital: str) -> Request:
        [result] = [r for r in self.sent(run_id, round_number, hospital) if r.path.endswith("/result")]
        return result

    def weights(self, run_id: str, round_number: int) -> Weights:
        """A round's global weights, as the aggregator serves them."""
        response = self.cluster.admin.get(f"/v1/runs/{run_id}/rounds/{round_number}/weights").raise_for_status()
        return decode_weights(response.content)[0]

    def first_fit_round(self, *, while_open: Callable[[str], None] | None = None, **config: object
                        ) -> tuple[str, np.ndarray, np.ndarray]:
        """A run taken through its first fit round (`while_open(run_id)` called once it started), then cancelled:
        its id, and its global model before and after the round (flattened)."""
        run_id = self.cluster.start_run(rounds=1, local_epochs=1, **config)
        if while_open is not None:
            while_open(run_id)
        self.cluster.wait_for(run_id, lambda v: v.round >= 2, timeout_s=300)
        before, after = (flatten(self.weights(run_id, r)) for r in (1, 2))  # a cancelled run keeps its last only
        self.cluster.admin.post(f"/v1/runs/{run_id}/cancel").raise_for_status()
        return run_id, before, after


@pytest.fixture(scope="module")
def witnessed(tmp_path_factory: pytest.TempPathFactory, data: Path, empty_mlflow_db: Path) -> Iterator[Witnessed]:
    root = tmp_path_factory.mktemp("witnessed")
    spec = root / "health-risk-wide.yaml"
    spec.write_text(spec_to_yaml(load_spec("health-risk").model_copy(update={"model": WIDE})), encoding="utf-8")
    cluster = Cluster(root / "home", data, empty_mlflow_db)
    cluster.processes.env["HEALTH_MLOPS_SPEC"] = str(spec)
    try:
        with ExitStack() as proxies:
            cluster.start_aggregator()
            witnessed = Witnessed(cluster, {})
            for index, hospital in enumerate(HOSPITALS):
                proxy = proxies.enter_context(RecordingProxy(cluster.credentials, hospital, cluster.base + 7 + index,
                                                             cluster.base))
                witnessed.proxies[hospital] = proxy
                cluster.start_node(hospital, f"{hospital}-a", central_url=f"https://127.0.0.1:{proxy.port}")
            yield witnessed
    finally:
        cluster.admin.close()
        cluster.processes.stop_all()


@dataclass
class StoreSampler:
    """Every version of every file under the aggregator's models folder, read every 10 ms while a run goes on and
    whenever `sample` is called: what a thief with read access would see (a version replaced between two reads is
    missed; the test calls `sample` while the round is held open with every masked input on disk)."""

    folder: Path
    versions: dict[tuple[str, int, int], bytes] = field(default_factory=dict)  # (path, mtime_ns, size) -> content
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __enter__(self) -> StoreSampler:
        self._thread = threading.Thread(target=self._sample_until_stopped, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def _sample_until_stopped(self) -> None:
        while not self._stop.wait(0.01):
            self.sample()

    def sample(self) -> None:
        """Read every file not read in this version yet."""
        with self._lock:
            for path in self.folder.rglob("*"):
                try:
                    stat = path.stat()
                    if path.is_file() and (key := (str(path), stat.st_mtime_ns, stat.st_size)) not in self.versions:
                        self.versions[key] = path.read_bytes()
                except FileNotFoundError:  # replaced or removed between the listing and the read
                    continue


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.astype(np.float64), b.astype(np.float64))[0, 1])


@pytest.mark.xdist_group("witnessed")  # one witnessed federation for these tests
def test_the_aggregator_receives_and_stores_only_masked_inputs_and_their_exact_sum(witnessed: Witnessed) -> None:
    cluster = witnessed.cluster
    config = {"min_hospitals": 3, "update_norm_bound": 1e6}
    # The plain run's first fit round: each hospital's update, as the aggregator sees without secure aggregation.
    # The secure run's first round trains the same: the same initial model (seed 0), the same preprocessing, and
    # each node's training seeded by the round.
    plain, initial, _ = witnessed.first_fit_round(**config)
    trained, examples = {}, {}
    for hospital in HOSPITALS:
        tensors, metadata = decode_weights(witnessed.result(plain, 1, hospital).body)
        trained[hospital], examples[hospital] = flatten(tensors).astype(np.float64), metadata["num_examples"]

    # hospital-1's reveal is held back: the round cannot close, and the masked inputs stay in the aggregator's
    # files, until the sampler has read them all (whatever the machine's speed).
    release = witnessed.proxies["hospital-1"].hold(b"/secure/reveal")

    def sample_all_masked_inputs(run_id: str) -> None:
        try:
            deadline = time.monotonic() + 300
            # The others reveal once the masked phase closed: every masked input is then durable.
            while not all(any(r.path.endswith("/secure/reveal") for r in witnessed.sent(run_id, 1, h))
                          for h in HOSPITALS[1:]):
                assert time.monotonic() < deadline, "the secure round did not reach its reveal phase"
                time.sleep(0.05)
            stored.sample()
        finally:
            release.set()

    with StoreSampler(cluster.home / "models") as stored:
        secure, secure_initial, model = witnessed.first_fit_round(secure_aggregation=True,
                                                                  while_open=sample_all_masked_inputs, **config)
    assert np.array_equal(secure_initial, initial)
    history = cluster.view(secure).history
    assert history[1].secure_aggregation is not None and history[1].secure_aggregation["revealed"] == HOSPITALS

    # The sum is exact: the secure round's model is FedAvg of the plain updates, to the fixed point's error
    # (2^-25 per hospital's weighed value, over the examples) and float32's rounding of the model.
    total = sum(examples.values())
    fedavg = sum(examples[h] * trained[h] for h in HOSPITALS) / total
    bound = len(HOSPITALS) * 2.0 ** -25 / total + np.abs(fedavg) * 2.0 ** -24
    assert np.all(np.abs(model.astype(np.float64) - fedavg) <= bound)
    assert np.abs(model - initial).max() > 1e-4  # and the round moved the model

    # What the aggregator received in the secure round: from each hospital one masked input, uniformly random to
    # it (its bits balanced, uncorrelated with the update and the weights), and nothing else large enough to hold
    # an update.
    masked = {}
    for hospital in HOSPITALS:
        result = witnessed.result(secure, 1, hospital)
        tensors, _ = decode_weights(result.body)
        assert {t.dtype for t in tensors.values()} == {np.dtype(np.uint64)}
        masked[hospital] = vector = flatten(tensors)
        assert len(vector) == len(initial) > 1_000_000
        update = trained[hospital] - initial
        for plain_value in (update, trained[hospital], examples[hospital] * trained[hospital]):
            assert abs(correlation(vector.view(np.int64), plain_value)) < 0.01
        assert abs(np.unpackbits(vector.view(np.uint8)).mean() - 0.5) < 0.001
        others = [r for r in witnessed.sent(secure, 1, hospital) if r != result]  # about the secure round's task
        assert others and all(len(r.body) < SMALL_BODY for r in others)
        assert {re.sub(r"^/v1/tasks/[^/]+", "", r.path) for r in others if r.method == "POST"} >= {
            "/secure/keys", "/secure/shares", "/secure/reveal"}

    # What it stored: the masked inputs as received, the rounds' global models, files too small to hold an update
    # (the state, the history), and files being written (small, or the start of a masked input as received or of
    # the global model it becomes: the state, rewritten at every step, may be replaced before it is read). No
    # plain update in any of them, nor in what was received: runs of four of each hospital's trained float32
    # weights, where training changed them, are searched for.
    plain_run_folder = str(cluster.home / "models" / "runs" / plain)
    versions = {key: content for key, content in stored.versions.items() if not key[0].startswith(plain_run_folder)}
    by_path: dict[str, list[bytes]] = {}
    for (path, _, _), content in versions.items():
        by_path.setdefault(path, []).append(content)
    received = [witnessed.result(secure, 1, h).body for h in HOSPITALS]
    kept_masked = 0
    for path, contents in by_path.items():
        name = Path(path).name
        if name.startswith(".") and name.endswith(".tmp"):  # being written: small, or the start of what it becomes
            final = by_path.get(str(Path(path).with_name(name[1:-len(".tmp")])), [])
            assert all(len(partial) < SMALL_BODY or any(f.startswith(partial) for f in [*final, *received])
                       for partial in contents), path
        elif "/results/" in path:
            kept_masked += 1
            assert all(any(np.array_equal(flatten(decode_weights(c)[0]), m) for m in masked.values())
                       for c in contents), path
        elif re.search(r"/round-\d+\.safetensors$", path):
            assert all(any(np.array_equal(flatten(decode_weights(c)[0]), m) for m in (initial, model))
                       for c in contents), path
        else:
            assert all(len(c) < SMALL_BODY for c in contents), path
    assert kept_masked == len(HOSPITALS)
    haystack = b"".join([*versions.values(), *(r.body for h in HOSPITALS for r in witnessed.proxies[h].requests()
                                               if secure in r.path)])
    rng = np.random.default_rng(0)
    for hospital in HOSPITALS:
        weights = trained[hospital].astype(np.float32)
        changed = np.flatnonzero(weights != initial)
        runs = [start for start in rng.choice(changed, 200, replace=False) if np.all(weights[start:start + 4] !=
                                                                                     initial[start:start + 4])][:20]
        assert len(runs) == 20
        for start in runs:
            assert weights[start:start + 4].tobytes() not in haystack
        # The search can find them: each is in what the plain run's node sent.
        assert all(weights[start:start + 4].tobytes() in witnessed.result(plain, 1, hospital).body for start in runs)


def substitute_s_key(victim: str) -> tuple[bytes, Callable[[bytes], bytes]]:
    """A dishonest aggregator's rewrite of the secure round's view: `victim`'s mask key replaced by one it holds
    the private half of (to learn the masks `victim` shares). Returns the forged key and the rewrite."""
    forged = X25519PrivateKey.generate().public_key().public_bytes_raw()

    def rewrite(body: bytes) -> bytes:
        try:
            view = json.loads(body)
        except ValueError:  # weights, and anything else that is not JSON
            return body
        if not isinstance(view, dict) or not isinstance(view.get("keys"), list):
            return body
        for keys in view["keys"]:
            if keys["hospital"] == victim:
                keys["s_public"] = base64.b64encode(forged).decode("ascii")
        return json.dumps(view).encode()

    return forged, rewrite


@pytest.mark.xdist_group("witnessed")  # one witnessed federation for these tests
def test_a_node_refuses_a_round_in_which_the_aggregator_substituted_a_key(witnessed: Witnessed) -> None:
    cluster, proxy = witnessed.cluster, witnessed.proxies["hospital-1"]
    forged, rewrite = substitute_s_key("hospital-2")
    proxy.rewrite = rewrite  # what hospital-1 reads of the round: hospital-2's key replaced
    try:
        run_id, _, _ = witnessed.first_fit_round(secure_aggregation=True, min_hospitals=2)
    finally:
        proxy.rewrite = None
    summary = cluster.view(run_id).history[1].secure_aggregation
    assert summary is not None and summary["keys"] == HOSPITALS
    assert summary["shares"] == summary["masked"] == ["hospital-2", "hospital-3"]
    # hospital-1 advertised its keys, read the forged one, sent nothing more for the round but its refusal, and
    # the aggregator's record (and log) says why: the round did not wait for it.
    assert [r.path.rsplit("/", 1)[-1] for r in witnessed.sent(run_id, 1, "hospital-1") if r.method == "POST"
            and not r.path.endswith("/heartbeat")] == ["keys", "refuse"]
    assert summary["refused"] == {"hospital-1": "keys from hospital-2: the signature does not match (substituted "
                                                "keys?)"}
    assert "hospital-1 refused the secure round of" in cluster.aggregator.log_path.read_text(encoding="utf-8")
    log = cluster.nodes["hospital-1-a"].log_path.read_text(encoding="utf-8")
    assert re.search(rf"{re.escape(run_id)}\.r1\.a0\.hospital-1: refused the task: keys from "
                     r"hospital-2: the signature does not match", log), log[-3000:]
    assert base64.b64encode(forged).decode() not in "".join(r.body.decode("latin-1") for r in proxy.requests())
