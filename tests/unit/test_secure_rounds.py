"""Securely aggregated fit rounds through the coordinator: each hospital runs the node's own session
(`SecureFitSession`) in a thread, over a channel that calls the coordinator as the aggregator's routes do. The
clock is the test's: a phase's deadline passes when the test says so, never with the machine's speed."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from pydantic import BaseModel

from health_mlops.data.preprocess import GlobalPreprocessing
from health_mlops.fl.coordinator import Coordinator
from health_mlops.fl.errors import Conflict, Invalid
from health_mlops.fl.messages import (AdvertisedKeys, SecureRefusal, SecureReveal, SecureRoundView, SecureShares,
                                      SignedSurvivors, TaskMessage)
from health_mlops.fl.metadata import StatsMetadata
from health_mlops.fl.run_config import RunConfig, StrategyConfig
from health_mlops.fl.secagg import FRACTION_BITS, Reveal, SecAggError
from health_mlops.fl.secure_fit import ConsortiumIdentity, ParticipationPolicy, SecureFitSession
from health_mlops.fl.secure_round import SecurePhase, flatten
from health_mlops.fl.state import Run, RunStatus, Task, TaskKind, TaskResult
from health_mlops.trust.credentials import ClientCredential
from health_mlops.trust.pki import ensure_certificates

HOSPITALS = [f"hospital-{i}" for i in range(1, 6)]
SHAPES = {"layer.weight": (40, 250), "layer.bias": (40,)}
CONFIG = RunConfig(rounds=1, min_hospitals=3, secure_aggregation=True, round_deadline_s=600, lease_s=300,
                   update_norm_bound=1e6)
STATS = {"count": 1000, "sums": [1.0], "sums_of_squares": [1.0], "target_sum": 1.0, "target_sum_of_squares": 1.0}


def reducer(stats: list[StatsMetadata]) -> GlobalPreprocessing:
    return GlobalPreprocessing(count=sum(s.count for s in stats), mean=[0.0], scale=[1.0])


@dataclass
class World:
    """The aggregator's state as the hospitals' threads reach it: one lock, as the service's event loop."""

    coordinator: Coordinator
    now: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)
    reveals: list[Reveal] = field(default_factory=list)  # every reveal the hospitals sent, as sent

    def call(self, operation: Callable[[Coordinator, float], object]) -> object:
        with self.lock:
            return operation(self.coordinator, self.now)

    def run(self) -> Run:
        return self.coordinator.runs["run-1"]

    def secure(self) -> object:
        return self.coordinator.secure["run-1"]

    def pass_deadline(self) -> None:
        """The open phase's deadline passes (the test's clock), and the coordinator applies it."""
        with self.lock:
            self.now = self.coordinator.secure["run-1"].phase_deadline
            self.coordinator.tick(self.now)


class InProcessChannel:
    """`HospitalClient`'s secure calls, made on the coordinator directly (what the routes do with them)."""

    def __init__(self, world: World, hospital: str, node: str, before_reveal: threading.Event | None = None,
                 tamper: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
        self.world, self.hospital, self.node, self.before_reveal = world, hospital, node, before_reveal
        self.tamper = tamper  # what a dishonest aggregator makes of the round's view for this hospital

    def secure_round(self, task_id: str, *, after: str | None = None) -> SecureRoundView:
        while True:  # a long poll: asked again until the phase moves (or the round is gone: Conflict)
            view = self.world.call(lambda c, now: c.secure_steps.view(task_id, self.hospital, self.node, now))
            assert isinstance(view, dict)
            if after is None or view["phase"] != after:
                return SecureRoundView.model_validate(view if self.tamper is None else self.tamper(view))
            time.sleep(0.002)

    def secure_send(self, task_id: str, step: str, body: BaseModel) -> None:
        h, node = self.hospital, self.node
        if isinstance(body, AdvertisedKeys):
            self.world.call(lambda c, now: c.secure_steps.keys(task_id, h, node, body.advertisement(h),
                                                               body.certificate, now))
        elif isinstance(body, SecureShares):
            self.world.call(lambda c, now: c.secure_steps.shares(task_id, h, node, body.encrypted(h), now))
        elif isinstance(body, SignedSurvivors):
            self.world.call(lambda c, now: c.secure_steps.consistency(task_id, h, node, body.signed(), now))
        elif isinstance(body, SecureRefusal):
            self.world.call(lambda c, now: c.secure_steps.refuse(task_id, h, node, body.reason, now))
        else:
            assert isinstance(body, SecureReveal)
            if self.before_reveal is not None:
                assert self.before_reveal.wait(timeout=120)
            reveal = body.reveal(h)
            self.world.call(lambda c, now: c.secure_steps.reveal(task_id, h, node, reveal, now))
            self.world.reveals.append(reveal)


@pytest.fixture(scope="module")
def identities(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ConsortiumIdentity]:
    folder = tmp_path_factory.mktemp("pki")
    ensure_certificates(folder, HOSPITALS)
    return {h: ConsortiumIdentity.of(ClientCredential(h, "token", folder / f"{h}.crt", folder / f"{h}.key",
                                                      folder / "ca.crt")) for h in HOSPITALS}


def initial() -> dict[str, np.ndarray]:
    return {name: np.zeros(shape, dtype=np.float32) for name, shape in SHAPES.items()}


def started(config: RunConfig = CONFIG) -> World:
    """A run past round 0: its first fit round is open, in its keys phase."""
    world = World(Coordinator(reducer))
    world.coordinator.start_run("run-1", config, HOSPITALS, initial(), 0.0)
    for hospital in HOSPITALS:
        task = world.coordinator.next_task(hospital, f"{hospital}-a", 0.0)
        assert task is not None and task.kind is TaskKind.stats
        world.coordinator.submit(task.id, hospital, f"{hospital}-a", TaskResult(dict(STATS)), 0.0)
    assert world.run().kind_of(world.run().round) is TaskKind.fit and world.secure().phase is SecurePhase.keys
    return world


def trained_weights(seed: int) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {h: {name: rng.normal(0, 0.3, shape).astype(np.float32) for name, shape in SHAPES.items()}
            for h in HOSPITALS}


EXAMPLES = {h: 200 * (i + 1) for i, h in enumerate(HOSPITALS)}


@dataclass
class Hospital:
    """One hospital's thread: what it trained, where it stops (None: it does every step)."""

    name: str
    weights: dict[str, np.ndarray]
    stop_before: str | None = None  # "masked": drops after its shares; "reveal": after its masked input
    before_reveal: threading.Event | None = None  # set by the test when the hospital may send its reveal
    tamper: Callable[[dict[str, Any]], dict[str, Any]] | None = None  # the aggregator's lie to this hospital
    policy: ParticipationPolicy = ParticipationPolicy()  # the hospital's own terms
    error: BaseException | None = None
    sent_masked: dict[str, np.ndarray] | None = None

    def run(self, world: World, identity: ConsortiumIdentity) -> None:
        try:
            node = f"{self.name}-a"
            task = world.call(lambda c, now: c.next_task(self.name, node, now))
            assert task is not None and task.kind is TaskKind.fit
            message = TaskMessage.of(task, world.run())
            channel = InProcessChannel(world, self.name, node, self.before_reveal, self.tamper)
            session = SecureFitSession(channel, identity, self.name, message, self.policy)
            try:
                self.steps(world, session, task.id, node)
            except SecAggError as error:  # as the node does: say so, and send nothing more
                session.refuse(error)
                raise
        except BaseException as error:  # noqa: BLE001 - reported by the test
            self.error = error


    def steps(self, world: World, session: SecureFitSession, task_id: str, node: str) -> None:
        current = {name: np.asarray(w) for name, w in world.run().weights.items()}
        session.prepare(current)
        if self.stop_before == "masked":
            return
        self.sent_masked = session.masked(self.weights, current, EXAMPLES[self.name], CONFIG.update_norm_bound)
        metadata = {"num_examples": EXAMPLES[self.name], "num_test_examples": 10, "metrics": {"auc": 0.7}}
        world.call(lambda c, now: c.submit(task_id, self.name, node, TaskResult(metadata, self.sent_masked), now))
        if self.stop_before == "reveal":
            return
        session.reveal()


def start_hospitals(world: World, identities: dict[str, ConsortiumIdentity],
                    hospitals: list[Hospital]) -> list[threading.Thread]:
    threads = [threading.Thread(target=h.run, args=(world, identities[h.name]), daemon=True) for h in hospitals]
    for thread in threads:
        thread.start()
    return threads


def wait_until(condition: Callable[[], bool], world: World) -> None:
    """Until the hospitals' threads have done their part (a safety bound only: no test is timed)."""
    give_up = time.monotonic() + 120
    while True:
        with world.lock:
            if condition():
                return
        assert time.monotonic() < give_up, "the hospitals' threads stopped making progress"
        time.sleep(0.005)


def fedavg(weights: dict[str, dict[str, np.ndarray]], hospitals: list[str]) -> dict[str, np.ndarray]:
    total = sum(EXAMPLES[h] for h in hospitals)
    return {name: sum(EXAMPLES[h] * weights[h][name].astype(np.float64) for h in hospitals) / total
            for name in SHAPES}


def bound(hospitals: list[str]) -> float:
    """Quantization (each n·w rounded to 2^-25) plus the float32 the weights are kept in."""
    return len(hospitals) * 2.0 ** -(FRACTION_BITS + 1) / sum(EXAMPLES[h] for h in hospitals) + 2e-7


@dataclass
class KeptFiles:
    """What the service's files hold at the restart (`fl.snapshot.SavedState`): the run's arrays entering its round
    and each masked input it accepted; no round closed yet, no run ended."""

    arrays: tuple[dict, dict, dict]
    tensors: dict[str, dict[str, np.ndarray]]

    def round_arrays(self, run_id: str, round_number: int) -> tuple[dict, dict, dict]:
        return self.arrays

    def round_history(self, run_id: str, rounds: int) -> list[dict]:
        return []

    def result_tensors(self, task: Task, reference: str) -> dict[str, np.ndarray]:
        return self.tensors[reference]

    def ended_runs(self) -> list[dict]:
        return []


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_secure_round_ends_with_fedavg_of_the_updates_to_the_quantization_error(
        identities: dict[str, ConsortiumIdentity], seed: int) -> None:
    world = started()
    weights = trained_weights(seed)
    hospitals = [Hospital(h, weights[h]) for h in HOSPITALS]
    for thread in start_hospitals(world, identities, hospitals):
        thread.join(timeout=120)
    assert [h.error for h in hospitals] == [None] * 5
    run = world.run()
    assert run.round == 2 and run.kind_of(run.round) is TaskKind.evaluate  # the fit round closed on its own
    expected = fedavg(weights, HOSPITALS)
    for name in SHAPES:
        np.testing.assert_allclose(run.weights[name], expected[name], rtol=0, atol=bound(HOSPITALS))
    record = run.history[-1]
    assert record.secure_aggregation == {"fraction_bits": 24, "modulus_bits": 64, "threshold": 3, "keys": HOSPITALS,
                                         "shares": HOSPITALS, "masked": HOSPITALS, "signed": [],  # no colluders
                                         "revealed": HOSPITALS, "refused": {},
                                         "clipped_to_norm": CONFIG.update_norm_bound}
    assert sorted(record.hospitals) == HOSPITALS and record.evaluations()["hospital-1"].metrics == {"auc": 0.7}


def test_hospitals_dropping_before_and_after_masking_leave_the_others_sum(
        identities: dict[str, ConsortiumIdentity]) -> None:
    world = started()
    weights = trained_weights(3)
    hospitals = [Hospital(h, weights[h], stop_before={"hospital-2": "masked", "hospital-4": "reveal"}.get(h))
                 for h in HOSPITALS]
    threads = start_hospitals(world, identities, hospitals)
    wait_until(lambda: len(world.secure().masked_from) == 4, world)  # hospital-2 never sends its masked input
    # hospital-2 has done its part (keys, shares, its masks) before its deadline passes: on a busy machine its
    # thread may still be asking for the round's shares when the others have sent their masked inputs.
    threads[HOSPITALS.index("hospital-2")].join(timeout=120)
    world.pass_deadline()  # the masked phase closes with 4: hospital-2 dropped
    wait_until(lambda: len(world.secure().reveals) == 3, world)  # hospital-4 left after its masked input
    world.pass_deadline()  # the reveal phase closes with 3 reveals: the threshold
    for thread in threads:
        thread.join(timeout=120)
    assert [h.error for h in hospitals] == [None] * 5
    run = world.run()
    counted = ["hospital-1", "hospital-3", "hospital-4", "hospital-5"]
    assert run.kind_of(run.round) is TaskKind.evaluate and sorted(run.history[-1].hospitals) == counted
    expected = fedavg(weights, counted)
    for name in SHAPES:
        np.testing.assert_allclose(run.weights[name], expected[name], rtol=0, atol=bound(counted))
    assert run.history[-1].secure_aggregation["revealed"] == ["hospital-1", "hospital-3", "hospital-5"]
    # Neither dropped hospital's update was revealed: hospital-4's mask key (which with its self mask, revealed
    # for the survivors, would unmask its input alone) was not, and hospital-2 sent no input to unmask.
    assert len(world.reveals) == 3
    assert all(not set(r.self_seed_shares) & set(r.s_key_shares) for r in world.reveals)
    assert [sorted(r.s_key_shares) for r in world.reveals] == [["hospital-2"]] * 3
    assert all("hospital-2" not in r.self_seed_shares for r in world.reveals)


def test_what_the_aggregator_holds_of_a_secure_round_tells_nothing_of_one_update(
        identities: dict[str, ConsortiumIdentity]) -> None:
    """Its state (the snapshot it writes) and the masked inputs it receives (the result files it keeps): each
    masked input is uncorrelated with its hospital's update, and the snapshot holds no update value."""
    world = started()
    weights = trained_weights(4)
    hospitals = [Hospital(h, weights[h], stop_before="reveal") for h in HOSPITALS]  # stop before unmasking
    for thread in start_hospitals(world, identities, hospitals):
        thread.join(timeout=120)
    assert [h.error for h in hospitals] == [None] * 5
    snapshot = json.dumps(world.coordinator.snapshot())
    for hospital in hospitals:
        assert hospital.sent_masked is not None
        masked = flatten(hospital.sent_masked).view(np.int64).astype(np.float64)
        plain = EXAMPLES[hospital.name] * flatten(hospital.weights).astype(np.float64)
        assert abs(np.corrcoef(masked, plain)[0, 1]) < 0.05  # 10,040 values: the noise is 0.01
        assert f"{float(hospital.weights['layer.bias'][0]):.6g}" not in snapshot


def test_a_restarted_aggregator_resumes_a_secure_round_in_its_reveal_phase(
        identities: dict[str, ConsortiumIdentity]) -> None:
    world = started()
    weights = trained_weights(5)
    may_reveal = threading.Event()
    hospitals = [Hospital(h, weights[h], before_reveal=may_reveal) for h in HOSPITALS]
    kept: dict[str, dict[str, np.ndarray]] = {}  # the result files: what the service keeps of each masked input
    original_submit = world.coordinator.submit

    def keeping(task_id: str, hospital: str, node: str, result: TaskResult, now: float) -> object:
        kept[task_id] = {k: v.copy() for k, v in result.tensors.items()}
        result.reference = task_id
        return original_submit(task_id, hospital, node, result, now)

    world.coordinator.submit = keeping  # type: ignore[method-assign]
    threads = start_hospitals(world, identities, hospitals)
    wait_until(lambda: world.secure().phase is SecurePhase.reveal, world)
    with world.lock:  # the aggregator restarts from its checkpoint, before any reveal is taken
        saved = json.loads(json.dumps(world.coordinator.snapshot()))
        run = world.coordinator.runs["run-1"]
        arrays = (dict(run.weights), dict(run.optimiser.first_moment), dict(run.optimiser.second_moment))
        restored = Coordinator.restore(saved, reducer, KeptFiles(arrays, kept))
        world.now += 3600  # the aggregator was away an hour: the phase's deadline is given again from now
        restored.resume(world.now)
        assert restored.secure["run-1"].phase is SecurePhase.reveal
        assert restored.secure["run-1"].phase_deadline == world.now + CONFIG.secure_phase_s
        world.coordinator = restored  # the hospitals' next calls reach the restarted aggregator
    may_reveal.set()
    for thread in threads:
        thread.join(timeout=120)
    assert [h.error for h in hospitals] == [None] * 5
    expected = fedavg(weights, HOSPITALS)
    for name in SHAPES:
        np.testing.assert_allclose(world.run().weights[name], expected[name], rtol=0, atol=bound(HOSPITALS))


def test_a_round_without_enough_hospitals_in_a_phase_is_retried_with_new_keys(
        identities: dict[str, ConsortiumIdentity]) -> None:
    world = started()
    weights = trained_weights(6)
    hospitals = [Hospital(h, weights[h]) for h in HOSPITALS[:2]]  # 2 advertise keys: 3 are needed
    threads = start_hospitals(world, identities, hospitals)
    wait_until(lambda: len(world.secure().advertisements) == 2, world)
    world.pass_deadline()
    for thread in threads:
        thread.join(timeout=120)
    assert all(isinstance(h.error, Conflict) for h in hospitals)  # their round is gone; the next attempt is theirs
    run = world.run()
    assert (run.round, run.attempt, run.status) == (1, 1, RunStatus.running)
    assert world.secure().attempt == 1 and world.secure().advertisements == {}


def test_a_hospital_reveals_only_with_the_thresholds_signatures_of_the_survivors_it_signed(
        identities: dict[str, ConsortiumIdentity]) -> None:
    """In a run tolerating one colluder (threshold 4 of 5, and the consistency check), the aggregator passes on to
    hospital-1 no signature but its own: hospital-1 reveals nothing; the 4 others unmask the round, hospital-1's
    masked input included."""
    world = started(CONFIG.model_copy(update={"secure_colluding_hospitals": 1}))
    weights = trained_weights(7)

    def only_its_own_signature(view: dict[str, Any]) -> dict[str, Any]:
        if view["phase"] == "reveal":
            view["signatures"] = {h: s for h, s in view["signatures"].items() if h == "hospital-1"}
        return view

    hospitals = [Hospital(h, weights[h], tamper=only_its_own_signature if h == "hospital-1" else None)
                 for h in HOSPITALS]
    threads = start_hospitals(world, identities, hospitals)
    # hospital-1 says it refuses: no phase waits for it (no deadline passes in this test)
    for thread in threads:
        thread.join(timeout=120)
    assert isinstance(hospitals[0].error, SecAggError) and "1 survivors (hospital-1) signed" in str(hospitals[0].error)
    assert [h.error for h in hospitals[1:]] == [None] * 4
    assert sorted(r.hospital for r in world.reveals) == HOSPITALS[1:]
    record = world.run().history[-1]
    assert record.secure_aggregation["signed"] == HOSPITALS and record.secure_aggregation["revealed"] == HOSPITALS[1:]
    assert record.secure_aggregation["refused"] == {"hospital-1": str(hospitals[0].error)}
    for name in SHAPES:
        np.testing.assert_allclose(world.run().weights[name], fedavg(weights, HOSPITALS)[name], rtol=0,
                                   atol=bound(HOSPITALS))


def test_a_run_tolerating_a_colluder_raises_the_threshold_and_its_hospitals_hold_the_aggregator_to_it(
        identities: dict[str, ConsortiumIdentity]) -> None:
    """With one hospital that may collude, 4 of 5 must unmask. The aggregator shows hospital-1 a threshold of 3:
    hospital-1 takes no part; the 4 others complete the round."""
    world = started(CONFIG.model_copy(update={"secure_colluding_hospitals": 1}))
    assert world.secure().threshold == 4
    weights = trained_weights(8)

    def lowered(view: dict[str, Any]) -> dict[str, Any]:
        return {**view, "threshold": 3}

    hospitals = [Hospital(h, weights[h], tamper=lowered if h == "hospital-1" else None) for h in HOSPITALS]
    threads = start_hospitals(world, identities, hospitals)
    # hospital-1 says it refuses: the keys phase does not wait for it
    for thread in threads:
        thread.join(timeout=120)
    assert isinstance(hospitals[0].error, SecAggError)
    assert "threshold 3 for 5 hospitals, 1 of which may collude: below 4" in str(hospitals[0].error)
    assert [h.error for h in hospitals[1:]] == [None] * 4
    record = world.run().history[-1]
    assert record.secure_aggregation["threshold"] == 4 and record.secure_aggregation["revealed"] == HOSPITALS[1:]
    for name in SHAPES:
        np.testing.assert_allclose(world.run().weights[name], fedavg(weights, HOSPITALS[1:])[name], rtol=0,
                                   atol=bound(HOSPITALS[1:]))
    # More colluders than the hospitals could outvote: the run is refused when started.
    with pytest.raises(Invalid, match="secure_colluding_hospitals: 5 colluding of 5 enrolled hospitals needs 6"):
        Coordinator(reducer).start_run("run-2", CONFIG.model_copy(update={"secure_colluding_hospitals": 5}),
                                       HOSPITALS, initial(), 0.0)
    with pytest.raises(ValueError, match="secure_colluding_hospitals: applies to secure aggregation, which is off"):
        RunConfig(secure_colluding_hospitals=1)


def test_a_hospital_holds_a_round_to_its_own_floor_of_colluders(identities: dict[str, ConsortiumIdentity]) -> None:
    """hospital-1 takes part only if a round tolerates one colluder (4 of 5 to unmask); the run asks none (3): it
    stays out, and the 4 others complete the round."""
    world = started()
    weights = trained_weights(9)
    hospitals = [Hospital(h, weights[h], policy=ParticipationPolicy(min_colluding_hospitals=1) if h == "hospital-1"
                          else ParticipationPolicy()) for h in HOSPITALS]
    threads = start_hospitals(world, identities, hospitals)
    for thread in threads:
        thread.join(timeout=120)
    assert isinstance(hospitals[0].error, SecAggError)
    assert "threshold 3 for 5 hospitals, 1 of which may collude: below 4" in str(hospitals[0].error)
    record = world.run().history[-1].secure_aggregation
    assert record["keys"] == record["revealed"] == HOSPITALS[1:] and list(record["refused"]) == ["hospital-1"]


def test_a_hospital_requiring_secure_aggregation_refuses_only_the_fit_tasks_of_plain_runs() -> None:
    policy = ParticipationPolicy(require_secure_aggregation=True)

    def task(kind: TaskKind, config: RunConfig) -> TaskMessage:
        return TaskMessage(id="run-1.r1.a0.hospital-1", run_id="run-1", round=1, attempt=0, kind=kind, config=config,
                           preprocessing=None, weights_path=None, lease_expires=0.0, lease_s=15.0)

    plain = RunConfig()
    assert "only in securely aggregated rounds" in (policy.refusal(task(TaskKind.fit, plain)) or "")
    assert policy.refusal(task(TaskKind.fit, CONFIG)) is None  # secure
    assert policy.refusal(task(TaskKind.stats, plain)) is None  # aggregates, small cells withheld
    assert policy.refusal(task(TaskKind.evaluate, plain)) is None  # metrics
    assert ParticipationPolicy().refusal(task(TaskKind.fit, plain)) is None  # the default takes part in any run
    assert policy.colluders(task(TaskKind.fit, CONFIG.model_copy(update={"secure_colluding_hospitals": 2}))) == 2
    assert ParticipationPolicy(min_colluding_hospitals=1).colluders(task(TaskKind.fit, CONFIG)) == 1


def test_secure_aggregation_is_refused_with_a_strategy_that_needs_each_update() -> None:
    with pytest.raises(ValueError, match="secure_aggregation: the aggregator sees only the sum"):
        RunConfig(secure_aggregation=True, strategy=StrategyConfig(name="median"))
    assert RunConfig(secure_aggregation=True, strategy=StrategyConfig(name="fedyogi")).secure_aggregation
