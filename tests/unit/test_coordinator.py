"""The coordinator's rules, driven by hand with a fake clock: leases, replicas, quorum, retries, restore."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pytest

from health_mlops.data.preprocess import GlobalPreprocessing
from health_mlops.fl.coordinator import Conflict, Coordinator, Forbidden, NotFound, Rejected
from health_mlops.fl.snapshot import round_record_to_dict
from health_mlops.fl.state import (ResultAccepted, ResultRejected, RoundClosed, RoundOpened, RunEnded, RunStarted,
                                   RunStatus, Task, TaskKind, TaskResult)
from health_mlops.fl.metadata import StatsMetadata
from health_mlops.fl.run_config import RunConfig, StrategyConfig

HOSPITALS = ["hospital-1", "hospital-2", "hospital-3"]
INITIAL = {"w": np.zeros(3), "b": np.zeros(1)}


def stats(count: int = 10) -> dict:
    return {"count": count, "sums": [1.0], "sums_of_squares": [1.0], "target_sum": 1.0, "target_sum_of_squares": 1.0}


def fitted(examples: int = 10, auc: float = 0.7) -> dict:
    return {"num_examples": examples, "num_test_examples": 5, "metrics": {"auc": auc}}


def stats_reducer(metadata: list[StatsMetadata]) -> GlobalPreprocessing:
    return GlobalPreprocessing(count=sum(m.count for m in metadata), mean=[0.0], scale=[1.0])


def start(config: RunConfig | None = None, now: float = 0.0) -> Coordinator:
    coordinator = Coordinator(stats_reducer)
    coordinator.start_run("run-1", config or RunConfig(rounds=2, min_hospitals=2, round_deadline_s=60, lease_s=10),
                          HOSPITALS, INITIAL, now)
    return coordinator


def answer(coordinator: Coordinator, hospital: str, now: float, value: float = 1.0, node: str = "a") -> None:
    task = coordinator.next_task(hospital, node, now)
    assert task is not None, f"{hospital} got no task"
    if task.kind is TaskKind.stats:
        result = TaskResult(stats(10))
    elif task.kind is TaskKind.fit:
        result = TaskResult(fitted(10, 0.7),
                            {"w": np.full(3, value), "b": np.full(1, value)})
    else:
        result = TaskResult(fitted(10, 0.8))
    coordinator.submit(task.id, hospital, node, result, now)


@dataclass
class Kept:
    """What the service's files hold (`fl.snapshot.SavedState`), read from a live coordinator: each running run's
    weights and optimiser moments entering its current round (or, when a test kept them, the weights entering each
    round) and its closed rounds as JSON; and the ended runs' records a test gives."""

    coordinator: Coordinator
    ended: list[dict] = field(default_factory=list)
    weights_entering: dict[int, dict] | None = None

    def round_arrays(self, run_id: str, round_number: int) -> tuple[dict, dict, dict]:
        if self.weights_entering is not None:
            return self.weights_entering[round_number], {}, {}
        run = self.coordinator.runs[run_id]
        assert round_number == run.round
        return run.weights, run.optimiser.first_moment, run.optimiser.second_moment

    def round_history(self, run_id: str, rounds: int) -> list[dict]:
        return json.loads(json.dumps([round_record_to_dict(h) for h in self.coordinator.runs[run_id].history[:rounds]]))

    def result_tensors(self, task: Task, reference: str) -> dict:
        raise AssertionError(f"{task.id}: these tests snapshot no accepted fit result")

    def ended_runs(self) -> list[dict]:
        return self.ended


def test_a_run_goes_stats_fit_evaluate_and_completes() -> None:
    coordinator = start()
    run = coordinator.runs["run-1"]
    for round_number, kind in enumerate([TaskKind.stats, TaskKind.fit, TaskKind.fit, TaskKind.evaluate]):
        assert run.round == round_number and run.kind_of(run.round) is kind
        for i, hospital in enumerate(HOSPITALS):
            answer(coordinator, hospital, now=1.0, value=float(i))
    assert run.status is RunStatus.completed
    assert [h.kind for h in run.history] == [TaskKind.stats, TaskKind.fit, TaskKind.fit, TaskKind.evaluate]
    assert run.preprocessing.count == 30
    np.testing.assert_allclose(run.weights["w"], [1.0, 1.0, 1.0])  # equal examples: the mean of 0, 1, 2
    assert coordinator.next_task("hospital-1", "a", 2.0) is None


def test_two_replicas_of_a_hospital_count_once() -> None:
    coordinator = start()
    first = coordinator.next_task("hospital-1", "replica-a", now=0.0)
    assert first is not None
    assert coordinator.next_task("hospital-1", "replica-b", now=1.0) is None  # the lease is held
    taken_over = coordinator.next_task("hospital-1", "replica-b", now=11.0)  # lease expired at 10
    assert taken_over is not None and taken_over.id == first.id and taken_over.holder == "replica-b"
    with pytest.raises(Conflict, match="lease not held by replica-a"):
        coordinator.submit(first.id, "hospital-1", "replica-a", TaskResult(stats(10)), now=12.0)
    coordinator.submit(first.id, "hospital-1", "replica-b", TaskResult(stats(10)), now=12.0)
    with pytest.raises(Conflict, match="already has a result"):
        coordinator.submit(first.id, "hospital-1", "replica-b", TaskResult(stats(10)), now=12.5)
    for hospital in HOSPITALS[1:]:
        answer(coordinator, hospital, now=13.0)
    assert coordinator.runs["run-1"].preprocessing.count == 30  # hospital-1 counted once


def test_heartbeats_keep_a_lease_alive_until_they_stop() -> None:
    coordinator = start()
    task = coordinator.next_task("hospital-1", "a", now=0.0)
    assert task is not None
    coordinator.heartbeat(task.id, "hospital-1", "a", now=8.0)
    assert coordinator.next_task("hospital-1", "b", now=15.0) is None  # extended to 18
    with pytest.raises(Conflict):
        coordinator.heartbeat(task.id, "hospital-1", "a", now=19.0)


def test_a_hospital_cannot_answer_another_hospitals_task() -> None:
    coordinator = start()
    task = coordinator.next_task("hospital-1", "a", now=0.0)
    assert task is not None
    with pytest.raises(Forbidden):
        coordinator.submit(task.id, "hospital-2", "a", TaskResult(stats(1)), now=1.0)


@pytest.mark.parametrize(("tensors", "reason"), [
    ({"w": np.array([np.nan, 0, 0]), "b": np.zeros(1)}, "non_finite"),
    ({"w": np.zeros(4), "b": np.zeros(1)}, "wrong_shape"),
    ({"w": np.zeros(3)}, "wrong_tensors"),
    ({"w": np.full(3, 1e6), "b": np.zeros(1)}, "norm_exceeded"),
])
def test_invalid_updates_are_refused_counted_and_the_round_closes_without_them(tensors: dict, reason: str) -> None:
    coordinator = start()
    for hospital in HOSPITALS:
        answer(coordinator, hospital, now=1.0)  # stats
    task = coordinator.next_task("hospital-3", "a", now=2.0)
    assert task is not None
    with pytest.raises(Rejected) as info:
        coordinator.submit(task.id, "hospital-3", "a", TaskResult(fitted(), tensors), now=2.0)
    assert info.value.reason == reason
    answer(coordinator, "hospital-1", now=3.0, value=2.0)
    answer(coordinator, "hospital-2", now=3.0, value=4.0)
    run = coordinator.runs["run-1"]
    assert run.rejected == {reason: 1}
    assert run.round == 2 and set(run.history[-1].hospitals) == {"hospital-1", "hospital-2"}
    np.testing.assert_allclose(run.weights["w"], [3.0, 3.0, 3.0])


def test_deadline_closes_with_a_quorum_and_retries_then_fails_without() -> None:
    coordinator = start(RunConfig(rounds=1, min_hospitals=2, round_deadline_s=60, lease_s=10, max_round_retries=1))
    run = coordinator.runs["run-1"]
    answer(coordinator, "hospital-1", now=1.0)
    answer(coordinator, "hospital-2", now=1.0)
    coordinator.tick(now=59.0)
    assert run.round == 0
    coordinator.tick(now=60.0)  # hospital-3 silent, but 2 of 3 is a quorum
    assert run.round == 1 and run.attempt == 0
    answer(coordinator, "hospital-1", now=61.0)
    coordinator.tick(now=121.0)  # only 1 answer: retry the round with fresh tasks
    assert run.round == 1 and run.attempt == 1 and run.status is RunStatus.running
    retried = coordinator.next_task("hospital-1", "a", now=122.0)
    assert retried is not None and retried.attempt == 1
    coordinator.tick(now=181.0)
    assert run.status is RunStatus.failed
    assert "round 1 had 0 valid result(s) after 2 attempt(s); 2 needed" in run.reason


def test_snapshot_and_restore_resume_the_same_run() -> None:
    def drive(coordinator: Coordinator, rounds: range) -> None:
        for _ in rounds:
            for i, hospital in enumerate(HOSPITALS):
                answer(coordinator, hospital, now=5.0, value=float(i + coordinator.runs["run-1"].round))

    config = RunConfig(rounds=3, min_hospitals=3, strategy=StrategyConfig(name="fedadam"))
    undisturbed = start(config)
    drive(undisturbed, range(5))
    interrupted = start(config)
    drive(interrupted, range(2))
    snapshot = json.loads(json.dumps(interrupted.snapshot()))  # through JSON, as the checkpoint file is
    assert "weights" not in json.dumps(snapshot) and "moment" not in json.dumps(snapshot)  # arrays: in files
    assert "history" not in snapshot["runs"][0] and snapshot["runs"][0]["history_length"] == 2  # in its file
    restored = Coordinator.restore(snapshot, stats_reducer, Kept(interrupted))
    assert restored.runs["run-1"].round == 2 and restored.runs["run-1"].optimiser.steps == 1
    drive(restored, range(3))
    final, reference = restored.runs["run-1"], undisturbed.runs["run-1"]
    assert final.status is RunStatus.completed
    assert [h.round for h in final.history] == [0, 1, 2, 3, 4]
    for name in reference.weights:
        np.testing.assert_array_equal(final.weights[name], reference.weights[name])


def test_a_cancelled_run_hands_out_no_more_work() -> None:
    coordinator = start()
    held = coordinator.next_task("hospital-1", "a", now=0.0)
    assert held is not None
    run = coordinator.cancel_run("run-1")
    assert run.status is RunStatus.cancelled and run.reason == "cancelled by an admin"
    assert coordinator.next_task("hospital-2", "a", now=1.0) is None
    with pytest.raises(Conflict):
        coordinator.submit(held.id, "hospital-1", "a", TaskResult(stats(1)), now=1.0)


def test_old_rounds_tasks_are_forgotten_but_a_late_duplicate_is_still_a_conflict() -> None:
    coordinator = start(RunConfig(rounds=4, min_hospitals=3, round_deadline_s=60, lease_s=10))
    run = coordinator.runs["run-1"]
    late = None
    for round_number in range(4):
        for hospital in HOSPITALS:
            task = coordinator.next_task(hospital, "a", now=1.0)
            assert task is not None
            if round_number == 3 and hospital == "hospital-1":
                late = task
            answer_task = TaskResult(stats(10)) if task.kind is TaskKind.stats else TaskResult(
                fitted(), {"w": np.ones(3), "b": np.ones(1)})
            coordinator.submit(task.id, hospital, "a", answer_task, now=1.0)
    assert run.round == 4
    assert {t.round for t in coordinator.tasks.values()} == {3, 4}  # the closed round and the open one
    assert late is not None
    with pytest.raises(Conflict):
        coordinator.submit(late.id, "hospital-1", "a", TaskResult(fitted(), {"w": np.ones(3), "b": np.ones(1)}),
                           now=2.0)
    # A result for a round long closed (its task forgotten): still a conflict, never averaged, never "not found".
    forgotten = "run-1.r1.a0.hospital-2"
    assert forgotten not in coordinator.tasks
    with pytest.raises(Conflict, match="round 1 of run-1 has closed"):
        coordinator.submit(forgotten, "hospital-2", "a", TaskResult(fitted(), {"w": np.ones(3)}), now=2.0)
    with pytest.raises(Conflict):
        coordinator.heartbeat(forgotten, "hospital-2", "a", now=2.0)
    for unknown, hospital in [("run-1.r9.a0.hospital-2", "hospital-2"), ("run-9.r1.a0.hospital-2", "hospital-2"),
                              (forgotten, "hospital-3"), ("garbage", "hospital-2")]:
        with pytest.raises(NotFound):
            coordinator.heartbeat(unknown, hospital, "a", now=2.0)


def test_a_hospital_without_training_rows_is_left_out_with_its_reason() -> None:
    coordinator = start(RunConfig(rounds=1, min_hospitals=2, round_deadline_s=60, lease_s=10))
    run = coordinator.runs["run-1"]
    for hospital, count in zip(HOSPITALS, [10, 0, 10], strict=True):
        task = coordinator.next_task(hospital, "a", 1.0)
        assert task is not None
        coordinator.submit(task.id, hospital, "a", TaskResult(stats(count)), 1.0)
    assert run.status is RunStatus.running and run.round == 1
    assert run.excluded == {"hospital-2": "no valid training rows (0 counted in round 0)"}
    assert run.preprocessing.count == 20  # from the hospitals that have rows
    assert coordinator.next_task("hospital-2", "a", 2.0) is None  # no work for it in this run
    for hospital in ("hospital-1", "hospital-3"):
        answer(coordinator, hospital, now=2.0)
    for hospital in ("hospital-1", "hospital-3"):
        answer(coordinator, hospital, now=3.0)
    assert run.status is RunStatus.completed and sorted(run.history[-1].hospitals) == ["hospital-1", "hospital-3"]
    restored = Coordinator.restore(json.loads(json.dumps(coordinator.snapshot())), stats_reducer,
                                   Kept(coordinator, ended=[json.loads(json.dumps(coordinator.run_record("run-1")))]))
    assert restored.runs["run-1"].excluded == run.excluded


def test_too_few_hospitals_with_rows_or_stats_that_cannot_be_combined_end_the_run_with_the_reason() -> None:
    coordinator = start(RunConfig(rounds=1, min_hospitals=2, round_deadline_s=60, lease_s=10))
    for hospital, count in zip(HOSPITALS, [10, 0, 0], strict=True):
        task = coordinator.next_task(hospital, "a", 1.0)
        assert task is not None
        coordinator.submit(task.id, hospital, "a", TaskResult(stats(count)), 1.0)
    run = coordinator.runs["run-1"]
    assert run.status is RunStatus.failed
    assert run.reason.startswith("round 0: 1 hospital(s) have training rows, 2 needed (hospital-2: no valid")

    def unusable(metadata: list[StatsMetadata]) -> GlobalPreprocessing:
        raise ValueError("the sums do not describe the same columns")

    broken = Coordinator(unusable)
    broken.start_run("run-2", RunConfig(rounds=1, min_hospitals=3), HOSPITALS, INITIAL, 0.0)
    for hospital in HOSPITALS:
        task = broken.next_task(hospital, "a", 1.0)
        assert task is not None
        broken.submit(task.id, hospital, "a", TaskResult(stats(10)), 1.0)  # answered, not raised at the hospital
    assert broken.runs["run-2"].status is RunStatus.failed
    assert "cannot be combined: the sums do not describe the same columns" in broken.runs["run-2"].reason


def test_every_operation_reports_what_happened() -> None:
    coordinator = start(RunConfig(rounds=1, min_hospitals=2, round_deadline_s=60, lease_s=10))
    assert coordinator.take_events() == [RunStarted("run-1"), RoundOpened("run-1", 0, 0)]
    assert coordinator.take_events() == []  # each event is taken once
    for hospital in HOSPITALS:
        answer(coordinator, hospital, now=1.0)
    events = coordinator.take_events()
    assert events[:3] == [ResultAccepted("run-1", f"run-1.r0.a0.{h}", TaskKind.stats) for h in HOSPITALS]
    assert [type(e) for e in events[3:]] == [RoundClosed, RoundOpened]
    assert events[3].record is coordinator.runs["run-1"].history[0] and events[4] == RoundOpened("run-1", 1, 0)
    task = coordinator.next_task("hospital-1", "a", 2.0)
    assert task is not None and coordinator.take_events() == []  # a lease changes nothing durable
    with pytest.raises(Rejected):
        coordinator.submit(task.id, "hospital-1", "a", TaskResult(fitted(), {"w": np.full(3, np.nan),
                                                                            "b": np.ones(1)}), 2.0)
    assert coordinator.take_events() == [ResultRejected("run-1", task.id, TaskKind.fit, "non_finite")]
    coordinator.cancel_run("run-1")
    assert coordinator.take_events() == [RunEnded("run-1", RunStatus.cancelled, "cancelled by an admin")]


def test_the_snapshot_holds_running_runs_only_and_ended_ones_come_back_from_their_records() -> None:
    coordinator = Coordinator(stats_reducer)
    config = RunConfig(rounds=1, min_hospitals=3, round_deadline_s=60, lease_s=10)
    sizes = []
    for number in range(1, 4):  # three runs, each completed before the next starts
        coordinator.start_run(f"run-{number}", config, HOSPITALS, INITIAL, now=float(number))
        for _ in range(3):
            for hospital in HOSPITALS:
                answer(coordinator, hospital, now=float(number))
        assert coordinator.runs[f"run-{number}"].status is RunStatus.completed
        sizes.append(len(json.dumps(coordinator.snapshot())))
    assert sizes[0] == sizes[1] == sizes[2] and json.loads(json.dumps(coordinator.snapshot()))["runs"] == []
    coordinator.start_run("run-4", config, HOSPITALS, INITIAL, now=4.0)
    records = [json.loads(json.dumps(coordinator.run_record(f"run-{n}"))) for n in range(1, 4)]
    restored = Coordinator.restore(json.loads(json.dumps(coordinator.snapshot())), stats_reducer,
                                   Kept(coordinator, ended=records))
    assert list(restored.runs) == ["run-1", "run-2", "run-3", "run-4"]
    for number in range(1, 4):
        ended, original = restored.runs[f"run-{number}"], coordinator.runs[f"run-{number}"]
        assert ended.status is RunStatus.completed and ended.history == original.history
        assert ended.weights == {}  # an ended run's arrays are in the service's files, not in memory
    assert restored.runs["run-4"].round == 0 and restored.take_events() == []
    with pytest.raises(ValueError, match="running"):
        coordinator.run_record("run-4")
    coordinator.release_arrays("run-1")
    assert coordinator.runs["run-1"].weights == {}


def validated(coordinator: Coordinator, losses: dict[int, float]) -> dict[int, dict]:
    """Drive a run whose hospitals report `losses[round]` as the mean validation loss of the model entering that
    round (10 validation rows each; each round's update moves every weight to the round's number). Returns the
    weights that entered each round, as the service's files keep them."""
    run = coordinator.runs["run-1"]
    entered: dict[int, dict] = {}
    while run.status is RunStatus.running:
        entered[run.round] = {k: v.copy() for k, v in run.weights.items()}
        for hospital in HOSPITALS:
            task = coordinator.next_task(hospital, "a", 1.0)
            assert task is not None
            checked = {"validation_rows": 10, "validation_loss_sum": 10 * losses.get(task.round, 0.0)}
            if task.kind is TaskKind.stats:
                result = TaskResult(stats(10))
            elif task.kind is TaskKind.fit:
                result = TaskResult({**fitted(), **checked}, {"w": np.full(3, float(task.round)),
                                                              "b": np.full(1, float(task.round))})
            else:
                result = TaskResult({**fitted(), **checked})
            coordinator.submit(task.id, hospital, "a", result, 1.0)
    return entered


def test_the_run_keeps_the_round_with_the_least_validation_loss_and_scores_it_last() -> None:
    coordinator = start(RunConfig(rounds=3, min_hospitals=3))
    entered = validated(coordinator, {1: 0.9, 2: 0.3, 3: 0.5, 4: 0.6})  # the model entering round 2 is the best
    run = coordinator.runs["run-1"]
    assert run.status is RunStatus.completed
    assert [(h.round, h.kind) for h in run.history] == [(0, TaskKind.stats), (1, TaskKind.fit), (2, TaskKind.fit),
                                                        (3, TaskKind.fit), (4, TaskKind.evaluate),
                                                        (5, TaskKind.evaluate)]
    assert run.final_round == 5 and run.selected_round == 2 and run.best_loss == pytest.approx(0.3)
    np.testing.assert_array_equal(run.weights["w"], np.ones(3))  # after round 1: what entered round 2
    np.testing.assert_array_equal(entered[5]["w"], entered[2]["w"])  # round 5 scored that model


def test_a_run_whose_last_model_validates_best_ends_with_it() -> None:
    coordinator = start(RunConfig(rounds=3, min_hospitals=3))
    validated(coordinator, {1: 0.9, 2: 0.7, 3: 0.5, 4: 0.4})
    run = coordinator.runs["run-1"]
    assert run.status is RunStatus.completed and run.final_round == 4 and run.selected_round == 4
    assert len(run.history) == 5
    np.testing.assert_array_equal(run.weights["w"], np.full(3, 3.0))


def test_a_run_without_validation_rows_ends_with_its_last_model() -> None:
    coordinator = start(RunConfig(rounds=2, min_hospitals=3))
    for _ in range(4):
        for i, hospital in enumerate(HOSPITALS):
            answer(coordinator, hospital, now=1.0, value=float(i))
    run = coordinator.runs["run-1"]
    assert run.status is RunStatus.completed and run.best_round is None and run.final_round == 3


def test_a_restored_run_still_knows_its_best_model() -> None:
    coordinator = start(RunConfig(rounds=3, min_hospitals=3))
    losses = {1: 0.9, 2: 0.3, 3: 0.5, 4: 0.6}
    run = coordinator.runs["run-1"]
    entered: dict[int, dict] = {}
    for _ in range(4):  # stats and the three fit rounds: the evaluate round is open
        entered[run.round] = {k: v.copy() for k, v in run.weights.items()}
        for hospital in HOSPITALS:
            task = coordinator.next_task(hospital, "a", 1.0)
            assert task is not None
            checked = {"validation_rows": 10, "validation_loss_sum": 10 * losses.get(task.round, 0.0)}
            result = (TaskResult(stats(10)) if task.kind is TaskKind.stats else
                      TaskResult({**fitted(), **checked}, {"w": np.full(3, float(task.round)),
                                                           "b": np.full(1, float(task.round))}))
            coordinator.submit(task.id, hospital, "a", result, 1.0)
    entered[run.round] = {k: v.copy() for k, v in run.weights.items()}
    snapshot = json.loads(json.dumps(coordinator.snapshot()))
    restored = Coordinator.restore(snapshot, stats_reducer, Kept(coordinator, weights_entering=entered))
    validated(restored, losses)
    final = restored.runs["run-1"]
    assert final.status is RunStatus.completed and final.selected_round == 2
    np.testing.assert_array_equal(final.weights["w"], np.ones(3))
