"""What the aggregator writes durably, over real loopback HTTPS (the service in a thread, restarted on the same
models directory): each accepted fit result in its own file before the hospital is answered, a state that
holds no tensors, result files removed once their round's closing is durable, and a restart mid-round that
aggregates exactly what an undisturbed aggregator would.

The hospitals are played by hand with leases far longer than the test, so nothing here depends on speed.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest

from health_mlops.data.hospital import load_hospitals
from health_mlops.data.split import split_hospitals
from health_mlops.data.synthetic import generate_dataset
from health_mlops.fl.aggregator import AggregatorService, create_app, create_ops_app
from health_mlops.fl.hospital import HospitalWorker
from health_mlops.fl.mapped import mapping_of
from health_mlops.fl.messages import TaskMessage, decode_weights, encode_result
from health_mlops.fl.run_config import StrategyConfig
from health_mlops.fl.state import TaskKind, TaskResult
from health_mlops.fl.store import CheckpointStore
from health_mlops.fl.strategies import ClientUpdate, ServerOptimiserState, aggregate, aggregate_fedavg
from health_mlops.ml.directions import Directions
from health_mlops.spec import load_spec
from health_mlops.trust.credentials import ADMIN, Gatekeeper, bearer, provision, read_token, token_path
from health_mlops.trust.pki import CA, SERVER, cert_path, key_path
from health_mlops.trust.tls import client_context, server_context
from health_mlops.web.server import BackgroundServer

# One set of hospitals for the module (`workers`): its tests run on one xdist worker.
pytestmark = pytest.mark.xdist_group("checkpoints")

SPEC = load_spec("health-risk")
HOSPITALS = ["hospital-1", "hospital-2", "hospital-3"]
CONFIG = {"rounds": 2, "min_hospitals": 3, "lease_s": 3600, "round_deadline_s": 7200}


class Aggregator:
    """The service on a models directory; `restart()` stops it and starts a new one on the same directory."""

    def __init__(self, root: Path) -> None:
        self.credentials, self.models = root / "credentials", root / "models"
        provision(self.credentials, HOSPITALS)
        self.store = CheckpointStore(self.models)

    @contextmanager
    def serving(self) -> Iterator[tuple[str, str]]:
        gatekeeper = Gatekeeper(self.credentials, require_certificate=True)
        tls = server_context(cert_path(self.credentials, SERVER), key_path(self.credentials, SERVER),
                             client_ca=cert_path(self.credentials, CA))
        app = create_app(lambda: AggregatorService(SPEC, CheckpointStore(self.models), gatekeeper))
        with BackgroundServer(app, tls=tls) as server, BackgroundServer(
                create_ops_app(app, api_listening=lambda: server.started)) as ops:
            self.service: AggregatorService = app.state.service
            yield server.url, ops.url

    def start_run(self, url: str) -> str:
        with self.client(url, ADMIN) as admin:
            return str(admin.post("/v1/runs", json={"config": CONFIG}).json()["id"])

    def client(self, url: str, who: str) -> httpx.Client:
        tls = client_context(cert_path(self.credentials, who), key_path(self.credentials, who),
                             cert_path(self.credentials, CA))
        return httpx.Client(base_url=url, timeout=30, verify=tls,
                            headers={**bearer(read_token(token_path(self.credentials, who))), "X-Node-Id": who})

    def result_files(self, run_id: str) -> list[Path]:
        return sorted((self.models / "runs" / run_id / "results").glob("*.safetensors"))


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, HospitalWorker]:
    root = tmp_path_factory.mktemp("checkpoint-data")
    generate_dataset(root, n_hospitals=3, rows_per_hospital=300, seed=2, split_seed=42, test_fraction=0.2)
    splits = split_hospitals(load_hospitals(root, SPEC), SPEC, seed=42, test_fraction=0.2)
    return {s.hospital_id: HospitalWorker(s.hospital_id, SPEC, s.train, s.test) for s in splits}


def next_task(client: httpx.Client) -> TaskMessage:
    response = client.get("/v1/tasks/next")
    assert response.status_code == 200, response.text
    return TaskMessage.model_validate(response.json())


def result_body(client: httpx.Client, worker: HospitalWorker, task: TaskMessage) -> bytes:
    weights = decode_weights(client.get(task.weights_path).content)[0] if task.weights_path else {}
    return encode_result(worker.handle(task.kind, task.config, weights, task.preprocessing, task.round), task.id)


def answer(aggregator: Aggregator, url: str, hospital: str, worker: HospitalWorker) -> bytes:
    with aggregator.client(url, hospital) as client:
        task = next_task(client)
        body = result_body(client, worker, task)
        response = client.post(f"/v1/tasks/{task.id}/result", content=body)
        assert response.status_code == 200, response.text
    return body


def test_each_result_has_its_own_file_and_a_restart_mid_round_aggregates_the_same(
        tmp_path: Path, workers: dict[str, HospitalWorker]) -> None:
    aggregator = Aggregator(tmp_path)
    with aggregator.serving() as (url, ops):
        run_id = aggregator.start_run(url)
        for hospital in HOSPITALS:  # round 0: stats, no tensors, no result files
            answer(aggregator, url, hospital, workers[hospital])
        assert aggregator.result_files(run_id) == []
        state_before = aggregator.store.state_path.stat().st_size
        sent = {h: answer(aggregator, url, h, workers[h]) for h in HOSPITALS[:2]}  # round 1: two of three fits
        files = aggregator.result_files(run_id)
        assert len(files) == 2 and sorted(f.read_bytes() for f in files) == sorted(sent.values())  # as sent
        # The state names the files and holds the results' metadata only: it grew by far less than one result.
        assert aggregator.store.state_path.stat().st_size - state_before < min(map(len, sent.values())) / 4
        assert '"tensors"' not in aggregator.store.state_path.read_text()
        metrics = httpx.get(f"{ops}/metrics").text
        assert f'health_mlops_checkpoint_bytes_total{{file="result"}} {float(sum(map(len, sent.values())))}' in metrics

    # Stray files a crash could leave (written, never accepted) go at the next start; accepted ones stay.
    stray = aggregator.result_files(run_id)[0].with_name(f"{run_id}.r1.a0.hospital-3.deadbeef.safetensors")
    stray.write_bytes(b"written before a crash")
    partial = stray.with_name(f".{run_id}.r1.a0.hospital-3.cafebabe.safetensors.tmp")
    partial.write_bytes(b"half a body, cut by a crash")
    with aggregator.serving() as (url, _):
        assert aggregator.result_files(run_id) == files and not partial.exists()
        sent["hospital-3"] = answer(aggregator, url, "hospital-3", workers["hospital-3"])  # closes round 1
        with aggregator.client(url, ADMIN) as admin:
            view = admin.get(f"/v1/runs/{run_id}").json()
            entering_round_2 = decode_weights(admin.get(f"/v1/runs/{run_id}/rounds/2/weights").content)[0]
    assert view["round"] == 2 and [r["round"] for r in view["history"]] == [0, 1]
    assert aggregator.result_files(run_id) == []  # removed once the closing was durable
    updates = [ClientUpdate(decode_weights(body)[0], int(decode_weights(body)[1]["num_examples"]))
               for body in sent.values()]
    expected = aggregate_fedavg(updates)  # what an aggregator that never stopped computes
    for name, tensor in expected.items():
        np.testing.assert_allclose(entering_round_2[name], tensor.astype(np.float32), rtol=1e-6, atol=1e-7)


def test_an_open_rounds_weights_are_read_from_their_durable_file_not_held_in_memory(
        tmp_path: Path, workers: dict[str, HospitalWorker]) -> None:
    aggregator = Aggregator(tmp_path)
    with aggregator.serving() as (url, _):
        run_id = aggregator.start_run(url)
        for hospital in HOSPITALS:  # round 0 closes: round 1 opens, its weights written before the last answer
            answer(aggregator, url, hospital, workers[hospital])
        run = aggregator.service.coordinator.runs[run_id]
        assert run.round == 1 and all(mapping_of(tensor) is not None for tensor in run.weights.values())
        with aggregator.client(url, "hospital-1") as client:
            downloaded = client.get(next_task(client).weights_path)
        on_disk = aggregator.store.weights_path(run_id, 1).read_bytes()
        assert downloaded.content == on_disk and downloaded.headers["content-length"] == str(len(on_disk))
        for name, tensor in decode_weights(on_disk)[0].items():
            np.testing.assert_array_equal(run.weights[name], tensor)


def test_a_refused_result_leaves_no_file(tmp_path: Path, workers: dict[str, HospitalWorker]) -> None:
    aggregator = Aggregator(tmp_path)
    with aggregator.serving() as (url, _):
        run_id = aggregator.start_run(url)
        for hospital in HOSPITALS:
            answer(aggregator, url, hospital, workers[hospital])
        with aggregator.client(url, "hospital-1") as client:
            task = next_task(client)
            assert task.kind is TaskKind.fit
            tensors, metadata = decode_weights(result_body(client, workers["hospital-1"], task))
            tensors = {name: np.full_like(t, np.nan) for name, t in tensors.items()}
            body = encode_result(TaskResult(metadata, tensors), task.id)
            refused = client.post(f"/v1/tasks/{task.id}/result", content=body)
            assert refused.status_code == 422 and refused.json()["reason"] == "non_finite"
        assert aggregator.result_files(run_id) == []
        answer(aggregator, url, "hospital-2", workers["hospital-2"])
        with aggregator.client(url, "hospital-2") as late:  # a duplicate of an accepted result: 409, no file
            accepted = aggregator.result_files(run_id)
            assert len(accepted) == 1
            duplicate = late.post(f"/v1/tasks/{run_id}.r1.a0.hospital-2/result", content=accepted[0].read_bytes())
            assert duplicate.status_code == 409
        assert aggregator.result_files(run_id) == accepted


def test_a_restart_resumes_the_server_optimiser_from_its_own_file(tmp_path: Path,
                                                                  workers: dict[str, HospitalWorker]) -> None:
    aggregator = Aggregator(tmp_path)
    config = StrategyConfig(name="fedyogi")
    with aggregator.serving() as (url, _):
        with aggregator.client(url, ADMIN) as admin:
            run_id = admin.post("/v1/runs", json={"config": {**CONFIG, "strategy": {"name": "fedyogi"}}}).json()["id"]
            for hospital in HOSPITALS:
                answer(aggregator, url, hospital, workers[hospital])
            entering = [decode_weights(admin.get(f"/v1/runs/{run_id}/rounds/1/weights").content)[0]]
        first_round = [answer(aggregator, url, h, workers[h]) for h in HOSPITALS]
    state_text = aggregator.store.state_path.read_text()
    assert '"weights"' not in state_text and "moment" not in state_text  # arrays live in their own files
    assert aggregator.store.optimiser_path(run_id, 2).is_file()
    with aggregator.serving() as (url, _):  # restarted between the two fit rounds
        second_round = [answer(aggregator, url, h, workers[h]) for h in HOSPITALS]
        with aggregator.client(url, ADMIN) as admin:
            final = decode_weights(admin.get(f"/v1/runs/{run_id}/rounds/3/weights").content)[0]

    def updates(bodies: list[bytes]) -> list[ClientUpdate]:
        return [ClientUpdate(decode_weights(b)[0], int(decode_weights(b)[1]["num_examples"])) for b in bodies]

    # What an aggregator that never stopped computes: two FedYogi steps, the second from the first's moments,
    # each step's weights projected back into the spec's directions (a server optimiser's step can leave them).
    scale = np.asarray(json.loads(state_text)["runs"][0]["preprocessing"]["scale"])
    directions = Directions.of(SPEC)
    assert directions is not None
    weights, state = aggregate(config, entering[0], updates(first_round), ServerOptimiserState())
    weights = {name: tensor.astype(np.float32) for name, tensor in weights.items()}  # as sent and kept
    directions.project_weights(weights, scale)
    expected, _ = aggregate(config, weights, updates(second_round), state)
    expected = {name: tensor.astype(np.float32) for name, tensor in expected.items()}
    directions.project_weights(expected, scale)
    for name, tensor in expected.items():
        np.testing.assert_allclose(final[name], tensor, rtol=1e-6, atol=1e-7)


def test_a_fit_result_cut_short_or_unreadable_leaves_no_file_and_the_task_open(
        tmp_path: Path, workers: dict[str, HospitalWorker]) -> None:
    """A fit result is written to disk as it arrives: a body that is not a result, half a result, or one the
    client abandons midway leaves nothing behind (not even a partial file), and the hospital can still answer."""
    aggregator = Aggregator(tmp_path)
    with aggregator.serving() as (url, _):
        run_id = aggregator.start_run(url)
        results = aggregator.models / "runs" / run_id / "results"
        for hospital in HOSPITALS:  # round 0: stats
            answer(aggregator, url, hospital, workers[hospital])
        with aggregator.client(url, "hospital-1") as client:
            task = next_task(client)
            assert task.kind is TaskKind.fit
            body = result_body(client, workers["hospital-1"], task)
            for unreadable in (b"garbage", body[:len(body) // 2]):
                response = client.post(f"/v1/tasks/{task.id}/result", content=unreadable)
                assert response.status_code == 422 and response.json()["reason"] == "unreadable", response.text
                assert [p for p in results.rglob("*") if p.is_file()] == []

            def abandoned() -> Iterator[bytes]:
                yield body[:1024]
                raise ConnectionAbortedError("the hospital went away")

            with pytest.raises(ConnectionAbortedError):
                client.post(f"/v1/tasks/{task.id}/result", content=abandoned())
            # The aggregator notices the connection drop on its own time: wait for its clean-up, however long.
            while [p for p in results.rglob("*") if p.is_file()]:
                time.sleep(0.05)
            response = client.post(f"/v1/tasks/{task.id}/result", content=body)
            assert response.status_code == 200, response.text
        assert [p.read_bytes() for p in aggregator.result_files(run_id)] == [body]


def test_completed_runs_leave_the_state_and_keep_their_record_and_final_model(
        tmp_path: Path, workers: dict[str, HospitalWorker]) -> None:
    aggregator = Aggregator(tmp_path)
    config = {**CONFIG, "rounds": 1}
    state_sizes, run_ids = [], []
    with aggregator.serving() as (url, _):
        for _ in range(3):  # three runs one after the other, each to completion (stats, fit, evaluate)
            with aggregator.client(url, ADMIN) as admin:
                run_ids.append(admin.post("/v1/runs", json={"config": config}).json()["id"])
            for _ in range(3):
                for hospital in HOSPITALS:
                    answer(aggregator, url, hospital, workers[hospital])
            state_sizes.append(aggregator.store.state_path.stat().st_size)
        with aggregator.client(url, ADMIN) as admin:
            before = {run_id: admin.get(f"/v1/runs/{run_id}").json() for run_id in run_ids}
            final = admin.get(f"/v1/runs/{run_ids[0]}/rounds/2/weights").content
    assert all(view["status"] == "completed" for view in before.values())
    assert state_sizes[0] == state_sizes[1] == state_sizes[2]  # the state does not grow with completed runs
    for run_id in run_ids:  # compacted: the record, the final model; no other round's arrays, no result file
        folder = aggregator.models / "runs" / run_id
        assert sorted(p.name for p in folder.iterdir()) == ["round-2.safetensors", "run.json"]
    with aggregator.serving() as (url, _):  # restarted: the ended runs are read back from their records
        with aggregator.client(url, ADMIN) as admin:
            after = {run_id: admin.get(f"/v1/runs/{run_id}").json() for run_id in run_ids}
            assert [view["id"] for view in admin.get("/v1/runs").json()] == run_ids
            assert admin.get(f"/v1/runs/{run_ids[0]}/rounds/2/weights").content == final
            assert admin.get(f"/v1/runs/{run_ids[0]}/rounds/1/weights").status_code == 404
    assert after == before


class HeldStore(CheckpointStore):
    """A store whose state writes can be held at the door, to see which changes a write covers."""

    def __init__(self, models_dir: Path) -> None:
        super().__init__(models_dir)
        self.state_writes = 0
        self.hold = threading.Event()
        self.hold.set()
        self.holding = threading.Event()

    def save_state(self, snapshot: dict) -> int:
        self.state_writes += 1
        if not self.hold.is_set():
            self.holding.set()
            self.hold.wait()
        return super().save_state(snapshot)


def test_one_state_write_covers_every_result_accepted_while_the_previous_one_was_under_way(
        tmp_path: Path, workers: dict[str, HospitalWorker]) -> None:
    aggregator = Aggregator(tmp_path)
    store = HeldStore(aggregator.models)
    gatekeeper = Gatekeeper(aggregator.credentials, require_certificate=True)
    tls = server_context(cert_path(aggregator.credentials, SERVER), key_path(aggregator.credentials, SERVER),
                         client_ca=cert_path(aggregator.credentials, CA))
    app = create_app(lambda: AggregatorService(SPEC, store, gatekeeper))
    with BackgroundServer(app, tls=tls) as server:
        url = server.url
        run_id = aggregator.start_run(url)
        for hospital in HOSPITALS:  # round 0
            answer(aggregator, url, hospital, workers[hospital])
        posts = {}
        for hospital in HOSPITALS:
            with aggregator.client(url, hospital) as client:
                task = next_task(client)
                posts[hospital] = (task.id, result_body(client, workers[hospital], task))
        answers: dict[str, int] = {}

        def post(hospital: str) -> None:
            with aggregator.client(url, hospital) as client:
                task_id, body = posts[hospital]
                answers[hospital] = client.post(f"/v1/tasks/{task_id}/result", content=body).status_code

        store.hold.clear()
        first = threading.Thread(target=post, args=("hospital-1",))
        first.start()
        store.holding.wait()  # hospital-1's acceptance is being written, and held there
        writes_before = store.state_writes
        others = [threading.Thread(target=post, args=(h,)) for h in HOSPITALS[1:]]
        for thread in others:
            thread.start()
        with aggregator.client(url, ADMIN) as admin:  # both accepted in memory: the round closed
            deadline = time.monotonic() + 300  # far beyond any machine; only a hang reaches it
            while admin.get(f"/v1/runs/{run_id}").json()["round"] != 2:
                assert time.monotonic() < deadline, "the results were not accepted while a state write was held"
                time.sleep(0.05)
        store.hold.set()
        for thread in [first, *others]:
            thread.join()
    assert answers == {hospital: 200 for hospital in HOSPITALS}
    # Two results and the round's closing, made durable by one write after the held one.
    assert store.state_writes == writes_before + 1


def test_closed_rounds_are_appended_once_and_a_line_the_state_does_not_count_is_dropped(
        tmp_path: Path, workers: dict[str, HospitalWorker]) -> None:
    aggregator = Aggregator(tmp_path)
    with aggregator.serving() as (url, _):
        run_id = aggregator.start_run(url)
        for _ in range(2):  # rounds 0 and 1
            for hospital in HOSPITALS:
                answer(aggregator, url, hospital, workers[hospital])
        with aggregator.client(url, ADMIN) as admin:
            before = admin.get(f"/v1/runs/{run_id}").json()
    history = aggregator.store.history_path(run_id)
    assert [json.loads(line)["round"] for line in history.read_text().splitlines()] == [0, 1]
    state = json.loads(aggregator.store.state_path.read_text())
    assert state["runs"][0]["history_length"] == 2 and "history" not in state["runs"][0]
    with history.open("a") as handle:  # appended before a crash stopped the state that would have counted it
        handle.write(history.read_text().splitlines()[-1] + "\n")
    with aggregator.serving() as (url, _):
        with aggregator.client(url, ADMIN) as admin:
            assert admin.get(f"/v1/runs/{run_id}").json()["history"] == before["history"]
        assert len(history.read_text().splitlines()) == 2
        for _ in range(2):  # round 2 (fit) and the final evaluation
            for hospital in HOSPITALS:
                answer(aggregator, url, hospital, workers[hospital])
        with aggregator.client(url, ADMIN) as admin:
            after = admin.get(f"/v1/runs/{run_id}").json()
    assert after["status"] == "completed" and [r["round"] for r in after["history"]] == [0, 1, 2, 3]
    assert not history.exists()  # the ended run's record holds its history
