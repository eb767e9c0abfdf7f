"""The coordinator: runs, rounds and leased tasks, as a pure state machine (no network, no clock of its own).

Every call takes `now` (seconds), so tests drive time by hand and the aggregator service passes the wall
clock. The rules it enforces:

- Work is a task per (run, round, attempt, hospital). One replica of a hospital claims it with a lease and
  keeps it alive with heartbeats; if the lease expires, the next request from any replica of that hospital
  takes the task over. A hospital's replicas therefore count once.
- A result is accepted once: a duplicate, or a result from a replica whose lease was lost, is refused with
  `Conflict` and never averaged twice. A result that fails validation (wrong tensors, non-finite values,
  an update too large) is refused with its reason and counted; the round goes on without it.
- A round closes when every enrolled hospital has answered, or at its deadline when at least
  `min_hospitals` have; otherwise it is retried with fresh tasks, and after `max_round_retries` the run
  fails with a clear reason.
- Every operation reports what it did as events (`take_events()`: a run started or ended, a round opened or
  closed, a result accepted or rejected), which the service persists, logs and counts.
- `snapshot()` captures the running runs but their closed rounds (each `RoundClosed` event carries its
  record, which the service appends to a file once); an ended run's record (`run_record`) is kept apart too,
  so the snapshot grows neither with rounds closed nor with runs completed. `Coordinator.restore()` brings
  them all back, so a restarted aggregator resumes at the last closed round.

Round 0 collects statistics (`stats`), rounds 1..R train (`fit`, each hospital first evaluating the
incoming global model on its own test and validation rows), and round R+1 evaluates the last model
(`evaluate`). The run's model is the one with the least validation loss over all hospitals: when that is an
earlier round's, round R+2 evaluates it too, and it is the model the run ends with.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from health_mlops.data.preprocess import GlobalPreprocessing
from health_mlops.fl.admission import validate_masked, validate_update
from health_mlops.fl.errors import Conflict, CoordinatorError, Forbidden, Invalid, NotFound, Rejected
from health_mlops.fl.metadata import FitMetadata, ResultMetadata, StatsMetadata, check_metadata
from health_mlops.fl.run_config import RunConfig
from health_mlops.fl.secagg import SecAggError, default_threshold
from health_mlops.fl.secure_round import SecurePhase, SecureRound, flatten
from health_mlops.fl.secure_steps import SecureSteps
from health_mlops.fl.snapshot import SavedState, as_sent, run_from_dict, run_to_dict
from health_mlops.fl.state import (TASK_ID, AcceptedResult, Event, ResultAccepted, ResultRejected, RoundClosed,
                                   RoundOpened, RoundRecord, Run, RunEnded, RunStarted, RunStatus, Task, TaskKind,
                                   TaskResult, TaskStatus, task_id_of, validation_loss)
from health_mlops.fl.stats import count_round_zero
from health_mlops.fl.strategies import ClientUpdate, RoundAggregation, ServerOptimiserState, Weights, apply_mean
from health_mlops.fl.strategy_table import STRATEGIES

__all__ = ["Conflict", "Coordinator", "CoordinatorError", "Forbidden", "NotFound", "Rejected"]


# Turns the hospitals' stats results into the run's preprocessing.
StatsReducer = Callable[[list[StatsMetadata]], GlobalPreprocessing]
# Maps a run's aggregated weights back into the spec's allowed set, in place (`ml.directions`: a server optimiser's
# step may leave it; a mean does not).
WeightConstraint = Callable[[Weights, GlobalPreprocessing], None]


class Coordinator:
    def __init__(self, stats_reducer: StatsReducer, *, stats_columns: int | None = None,
                 constrain: WeightConstraint | None = None) -> None:
        self._stats_columns = stats_columns  # how many columns a stats result must describe, when known
        self._constrain = constrain
        self.runs: dict[str, Run] = {}
        self.tasks: dict[str, Task] = {}
        self.results: dict[str, AcceptedResult] = {}  # accepted results of open rounds, by task id
        # run id -> its open fit round's aggregation, fed as results are accepted (rebuilt from `results` on
        # restore, so it is never checkpointed)
        self._aggregations: dict[str, RoundAggregation] = {}
        self.secure: dict[str, SecureRound] = {}  # run id -> its open securely aggregated fit round
        self._stats_reducer = stats_reducer
        self._events: list[Event] = []
        self.secure_steps = SecureSteps(self)  # a secure round's steps, taken by the replica holding a fit task

    def take_events(self) -> list[Event]:
        """What happened since the last call, in order."""
        events, self._events = self._events, []
        return events

    # --- runs -----------------------------------------------------------------------------------------

    def start_run(self, run_id: str, config: RunConfig, hospitals: list[str], initial_weights: Weights,
                  now: float) -> Run:
        if run_id in self.runs:
            raise Conflict(f"run {run_id} exists")
        if not hospitals:
            raise ValueError("a run needs at least one enrolled hospital")
        if config.min_hospitals > len(hospitals):
            raise ValueError(f"min_hospitals {config.min_hospitals} exceeds the {len(hospitals)} enrolled")
        threshold = default_threshold(len(hospitals), config.secure_colluding_hospitals)
        if config.secure_aggregation and threshold > len(hospitals):
            raise Invalid(f"config.secure_colluding_hospitals: {config.secure_colluding_hospitals} colluding of "
                          f"{len(hospitals)} enrolled hospitals needs {threshold} of them to unmask a round: more "
                          "than there are")
        run = Run(run_id, config, sorted(hospitals), started_at=now, weights=as_sent(initial_weights))
        self.runs[run_id] = run
        self._events.append(RunStarted(run_id))
        self._open_round(run, now)
        return run

    def cancel_run(self, run_id: str) -> Run:
        run = self._run(run_id)
        if run.status is RunStatus.running:
            self._end(run, RunStatus.cancelled, "cancelled by an admin")
        return run

    def _run(self, run_id: str) -> Run:
        try:
            return self.runs[run_id]
        except KeyError:
            raise NotFound(f"no run {run_id}") from None

    def _open_round(self, run: Run, now: float) -> None:
        run.round_opened_at = now
        run.round_deadline = now + run.config.round_deadline_s
        kind = run.kind_of(run.round)
        for hospital in run.hospitals:
            if hospital in run.excluded:
                continue
            task_id = task_id_of(run.id, run.round, run.attempt, hospital)
            self.tasks[task_id] = Task(task_id, run.id, run.round, run.attempt, kind, hospital)
        if kind is TaskKind.fit and run.config.secure_aggregation:
            enrolled = tuple(sorted(h for h in run.hospitals if h not in run.excluded))
            self.secure[run.id] = SecureRound(run.id, run.round, run.attempt, enrolled, run.config.min_hospitals,
                                              now + run.config.secure_phase_s,
                                              colluders=run.config.secure_colluding_hospitals)
        self._events.append(RoundOpened(run.id, run.round, run.attempt))

    def unknown_task(self, task_id: str, hospital: str) -> CoordinatorError:
        """Why a task this coordinator does not hold is refused. Tasks of closed rounds are forgotten (a
        long-lived aggregator must not grow without bound), but their ids say whose and which round they
        were: a late answer to one is a `Conflict`, like any result from a replica that lost its lease, and is
        never averaged. Any other id is `NotFound`."""
        found = TASK_ID.fullmatch(task_id)
        run = self.runs.get(found["run"]) if found else None
        if found and run is not None and found["hospital"] == hospital and (
                int(found["round"]) < run.round or run.status is not RunStatus.running):
            return Conflict(f"task {task_id}: round {found['round']} of {run.id} has closed; a late result is "
                            "never averaged")
        return NotFound(f"no task {task_id}")

    def _round_tasks(self, run: Run) -> list[Task]:
        return [t for t in self.tasks.values()
                if t.run_id == run.id and t.round == run.round and t.attempt == run.attempt]

    def _clear_round(self, run: Run) -> None:
        """Drop the open round's stored results and aggregation, and abandon its unanswered tasks."""
        self._aggregations.pop(run.id, None)
        self.secure.pop(run.id, None)
        for task in self._round_tasks(run):
            self.results.pop(task.id, None)
            if task.status in (TaskStatus.pending, TaskStatus.leased):
                task.status = TaskStatus.abandoned

    def _forget_tasks_before(self, run: Run, round_number: int) -> None:
        """Drop the tasks of rounds before `round_number`: a long-lived aggregator must not grow without bound.
        The closing round's tasks stay, so a late duplicate still gets `Conflict` rather than `NotFound`."""
        for task_id in [t.id for t in self.tasks.values() if t.run_id == run.id and t.round < round_number]:
            del self.tasks[task_id]

    def _end(self, run: Run, status: RunStatus, reason: str) -> None:
        run.status, run.reason = status, reason
        self._clear_round(run)
        self._forget_tasks_before(run, run.round + 1)  # any late answer is a Conflict (`unknown_task`)
        self._events.append(RunEnded(run.id, status, reason))

    def release_arrays(self, run_id: str) -> None:
        """Drop an ended run's weights and optimiser moments from memory (the service keeps them in files)."""
        run = self._run(run_id)
        if run.status is RunStatus.running:
            raise ValueError(f"{run_id} is running: its arrays are needed")
        run.weights, run.best_weights, run.optimiser = {}, {}, ServerOptimiserState(steps=run.optimiser.steps)

    # --- tasks ----------------------------------------------------------------------------------------

    def next_task(self, hospital: str, node: str, now: float) -> Task | None:
        """Lease the oldest open task of this hospital to `node`: a pending one, or one whose lease expired."""
        self.tick(now)
        for task in self.tasks.values():
            if task.hospital != hospital or self.runs[task.run_id].status is not RunStatus.running:
                continue
            expired = task.status is TaskStatus.leased and task.lease_expires <= now
            if expired and self._keys_sent(task):
                continue  # its round's keys are the lost replica's: the hospital is out of this attempt
            if task.status is TaskStatus.pending or expired:
                task.status, task.holder = TaskStatus.leased, node
                task.lease_expires = now + self.runs[task.run_id].config.lease_s
                return task
        return None

    def _held_task(self, task_id: str, hospital: str, node: str, now: float) -> Task:
        task = self.tasks.get(task_id)
        if task is None:
            raise self.unknown_task(task_id, hospital)
        if task.hospital != hospital:
            raise Forbidden(f"task {task_id} belongs to another hospital")
        if task.status is TaskStatus.done:
            raise Conflict(f"task {task_id} already has a result")
        if task.status is not TaskStatus.leased or task.holder != node or task.lease_expires <= now:
            raise Conflict(f"task {task_id}: lease not held by {node} (expired or taken over)")
        return task

    def heartbeat(self, task_id: str, hospital: str, node: str, now: float) -> Task:
        task = self._held_task(task_id, hospital, node, now)
        task.lease_expires = now + self.runs[task.run_id].config.lease_s
        return task

    def submit(self, task_id: str, hospital: str, node: str, result: TaskResult, now: float) -> Task:
        """Accept a result once; raises Conflict, Rejected, Forbidden or NotFound otherwise."""
        task = self._held_task(task_id, hospital, node, now)
        run = self.runs[task.run_id]
        secure = self.secure.get(run.id) if task.kind is TaskKind.fit else None
        if secure is not None:
            secure.expect(SecurePhase.masked, hospital)  # too early or too late is a Conflict, not a rejection
        try:
            metadata = self._check_result(run, task, result)
        except Rejected as refusal:
            task.status = TaskStatus.rejected
            run.rejected[refusal.reason] = run.rejected.get(refusal.reason, 0) + 1
            self._events.append(ResultRejected(run.id, task.id, task.kind, refusal.reason))
            self.settle(run, now)
            raise
        task.status = TaskStatus.done
        self._accept(run, task, result, metadata)
        self._events.append(ResultAccepted(run.id, task.id, task.kind))
        self.settle(run, now)
        return task

    def _accept(self, run: Run, task: Task, result: TaskResult, metadata: ResultMetadata, *,
                restoring: bool = False) -> None:
        """Keep an accepted result; a fit result's update goes into the round's aggregation now (closing the
        round then costs one pass, not one per hospital). A weighted strategy keeps nothing of the tensors once
        folded (the service has the result in its own file, for a restore), and they are taken from `result`
        too, so that the caller holding it while its answer waits for a checkpoint keeps nothing alive."""
        secure = self.secure.get(run.id) if task.kind is TaskKind.fit else None
        if secure is not None:
            assert isinstance(metadata, FitMetadata)
            masked = flatten(result.tensors)
            (secure.restore_masked if restoring else secure.add_masked)(task.hospital, masked, metadata.num_examples)
            result.tensors = {}
        elif task.kind is TaskKind.fit:
            if run.id not in self._aggregations:
                self._aggregations[run.id] = RoundAggregation(run.config.strategy, run.weights)
            aggregation = self._aggregations[run.id]
            assert isinstance(metadata, FitMetadata)
            aggregation.add(ClientUpdate(result.tensors, metadata.num_examples))
            if not aggregation.keeps_updates:
                result.tensors = {}
        self.results[task.id] = AcceptedResult(metadata, result.tensors, result.reference)

    def _check_result(self, run: Run, task: Task, result: TaskResult) -> ResultMetadata:
        """The result's metadata, checked; raises `Rejected` with the reason unless the whole result is valid."""
        metadata = check_metadata(task.kind.value, result.metadata, columns=self._stats_columns)
        if not isinstance(metadata, FitMetadata):
            if result.tensors:
                raise Rejected("wrong_tensors", f"a {task.kind.value} result carries no tensors")
            return metadata
        # A hospital weighs in FedAvg by its examples: it may not claim more than it counted in round 0.
        limit = run.example_limits.get(task.hospital, max(run.example_limits.values(), default=None))
        if limit is not None and metadata.num_examples > limit:
            raise Rejected("bad_metadata",
                           f"num_examples {metadata.num_examples} exceeds the {limit} rows counted in round 0")
        if run.config.secure_aggregation:  # masked: only its form can be checked (the hospital clipped its update)
            validate_masked(run.weights, result.tensors)
        else:
            validate_update(run.weights, result.tensors, run.config.update_norm_bound)
        return metadata

    # --- rounds ---------------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Apply deadlines: close rounds (or a secure round's phases) that have a quorum, retry or fail those that
        do not."""
        for run in list(self.runs.values()):
            secure = self.secure.get(run.id)
            deadline = run.round_deadline if secure is None else secure.phase_deadline
            if run.status is RunStatus.running and now >= deadline:
                self.settle(run, now, deadline_passed=True)

    def settle(self, run: Run, now: float, deadline_passed: bool = False) -> None:
        """Close the run's round (or its secure round's open phase) if it can close now."""
        secure = self.secure.get(run.id)
        if secure is not None:
            self._advance_secure(run, secure, now)
            return
        tasks = self._round_tasks(run)
        answered = [t for t in tasks if t.status is TaskStatus.done]
        settled = all(t.status in (TaskStatus.done, TaskStatus.rejected) for t in tasks)
        if not settled and not deadline_passed:
            return
        if len(answered) >= run.config.min_hospitals:
            self._close_round(run, answered, now)
        else:
            self._retry_or_fail(run, len(answered), now)

    def _retry_or_fail(self, run: Run, answered: int, now: float, *, needed: int | None = None,
                       what: str = "valid result(s)") -> None:
        self._clear_round(run)
        if run.attempt >= run.config.max_round_retries:
            self._end(run, RunStatus.failed,
                      f"round {run.round} had {answered} {what} after {run.attempt + 1} attempt(s); "
                      f"{run.config.min_hospitals if needed is None else needed} needed")
            return
        run.attempt += 1
        self._open_round(run, now)

    def _advance_secure(self, run: Run, secure: SecureRound, now: float) -> None:
        """Close the secure round's open phase when it can close: with enough hospitals, move on (the last phase
        unmasks the sum and closes the round); with too few, retry the round with new keys."""
        while secure.ready(now):
            if not secure.enough():
                self._retry_or_fail(run, len(secure.answered()), now, needed=max(secure.quorum, secure.threshold),
                                    what=f"hospital(s) in its secure aggregation's {secure.phase.value} phase")
                return
            if secure.phase is SecurePhase.reveal:
                try:
                    mean = secure.unmasked_mean(run.weights)
                except SecAggError as error:
                    self._retry_or_fail(run, len(secure.answered()), now, needed=secure.threshold,
                                        what=f"reveal(s) that could not unmask the sum ({error})")
                    return
                answered = [t for t in self._round_tasks(run) if t.hospital in secure.masked_from
                            and t.status is TaskStatus.done]
                self._close_round(run, answered, now, secure_mean=mean)
                return
            # The masked phase is the round's training: it has the round's deadline.
            secure.advance(now + (run.config.round_deadline_s if secure.phase is SecurePhase.shares
                                  else run.config.secure_phase_s))

    def _keys_sent(self, task: Task) -> bool:
        secure = self.secure.get(task.run_id)
        return (secure is not None and task.kind is TaskKind.fit and task.round == secure.round
                and task.attempt == secure.attempt and task.hospital in secure.advertisements)

    def _close_round(self, run: Run, answered: list[Task], now: float, *, secure_mean: Weights | None = None) -> None:
        # Compute everything first, change state after (aggregating consumes the round's running sum: if it
        # fails, the run ends with the reason).
        hospitals = {t.hospital: self.results[t.id].metadata for t in answered}
        nodes = {t.hospital: t.holder or "" for t in answered}
        kind = run.kind_of(run.round)
        loss = validation_loss(hospitals) if not run.reevaluate else None
        if loss is not None and loss < run.best_loss:  # the model that entered this round (aggregation replaces it)
            run.best_round, run.best_loss, run.best_weights = run.round, loss, run.weights
        if kind is TaskKind.stats:
            stats = {h: m for h, m in hospitals.items() if isinstance(m, StatsMetadata)}
            counted = count_round_zero(run.config, stats, self._stats_reducer)
            if isinstance(counted, str):  # the run cannot train: it ends before any hospital trains
                self._end(run, RunStatus.failed, counted)
                return
            run.example_limits, run.excluded, run.preprocessing = counted
        elif kind is TaskKind.fit:
            try:
                if secure_mean is not None:
                    aggregated, run.optimiser = apply_mean(run.config.strategy, run.weights, secure_mean, run.optimiser)
                else:
                    aggregated, run.optimiser = self._aggregations[run.id].finish(run.optimiser)
                run.weights = as_sent(aggregated)
                # A server optimiser's step can leave the allowed set; a mean, median or trimmed mean of weights
                # inside it stays there (secure aggregation's sum to its fixed point), so those are left exact.
                if (self._constrain is not None and run.preprocessing is not None
                        and STRATEGIES[run.config.strategy.name].server_state):
                    self._constrain(run.weights, run.preprocessing)
            except (ValueError, FloatingPointError) as error:  # the running sum is spent: the round cannot close
                self._end(run, RunStatus.failed, f"round {run.round}: aggregation failed: {error}")
                return
        secure = self.secure.get(run.id)
        # Under secure aggregation the norm bound is the hospitals' to keep: each clipped its update before masking.
        summary = None if secure is None else {**secure.summary(), "clipped_to_norm": run.config.update_norm_bound}
        self._clear_round(run)
        run.history.append(RoundRecord(run.round, kind, hospitals, nodes, run.round_opened_at, now, run.attempt + 1,
                                       summary))
        self._events.append(RoundClosed(run.id, run.history[-1]))
        self._forget_tasks_before(run, run.round)
        last_is_not_best = run.best_round is not None and run.best_round < run.round
        if run.round == run.final_round and last_is_not_best and not run.reevaluate:
            run.reevaluate, run.weights = True, run.best_weights  # one more evaluate round scores the best
        elif run.round == run.final_round:
            self._end(run, RunStatus.completed, "")
            return
        run.round += 1
        run.attempt = 0
        self._open_round(run, now)

    # --- snapshot -------------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The running runs' state as JSON-able data but its arrays, which the service keeps in files of their own
        and `restore` reads back: each run's weights and server optimiser moments entering its round, and each
        accepted result's tensors; and each run's closed rounds (`RoundClosed` events carry them, for a file the
        service appends to) but their number. A snapshot is therefore small, whatever the model's size and the
        rounds closed, and ended runs are not in it (their records, `run_record`, are kept apart): it does not grow
        with the runs completed."""
        return {"runs": [run_to_dict(r, with_history=False) for r in self.runs.values()
                         if r.status is RunStatus.running],
                "tasks": [{**vars(t), "kind": t.kind.value, "status": t.status.value} for t in self.tasks.values()],
                "results": {k: {"metadata": r.metadata.model_dump(mode="json"), "reference": r.reference}
                            for k, r in self.results.items()},
                "secure": [s.to_json() for s in self.secure.values()]}

    def run_record(self, run_id: str) -> dict[str, Any]:
        """An ended run as JSON-able data (its history, outcome and settings; no arrays), for `restore`."""
        run = self._run(run_id)
        if run.status is RunStatus.running:
            raise ValueError(f"{run_id} is running: its state is in the snapshot")
        return run_to_dict(run, with_history=True)

    @classmethod
    def restore(cls, data: Mapping[str, Any], stats_reducer: StatsReducer, saved: SavedState, *,
                stats_columns: int | None = None, constrain: WeightConstraint | None = None) -> Coordinator:
        """The coordinator `snapshot` captured, with what it left out read from `saved` (the running runs' arrays
        and closed rounds, the accepted fit results' tensors, the ended runs' records; runs in the order they
        started). Ended runs come back without arrays."""
        coordinator = cls(stats_reducer, stats_columns=stats_columns, constrain=constrain)
        running = {raw["id"] for raw in data["runs"]}
        for raw in sorted([*data["runs"], *(r for r in saved.ended_runs() if r["id"] not in running)],
                          key=lambda raw: raw.get("started_at", 0.0)):  # stable: ties keep their order
            run = run_from_dict(raw, saved)
            coordinator.runs[run.id] = run
        for raw in data["tasks"]:
            task = Task(**{**raw, "kind": TaskKind(raw["kind"]), "status": TaskStatus(raw["status"])})
            coordinator.tasks[task.id] = task
        for raw in data.get("secure", []):  # before the results: a secure round's masked inputs fold into it
            coordinator.secure[raw["run_id"]] = SecureRound.from_json(raw)
        for task_id, raw in data["results"].items():  # in the order they were accepted
            task = coordinator.tasks[task_id]
            reference = raw.get("reference", "")
            tensors = saved.result_tensors(task, reference) if task.kind is TaskKind.fit else {}
            result = TaskResult(raw["metadata"], tensors, reference)
            coordinator._accept(coordinator.runs[task.run_id], task, result,
                                check_metadata(task.kind.value, result.metadata, columns=None), restoring=True)
        coordinator._events.clear()  # what restoring replayed had happened before
        return coordinator

    def resume(self, now: float) -> None:
        """After a restore: give every open round a full deadline from now, so an outage of the aggregator
        does not count against the hospitals (a secure round's open phase too); a round whose every task was
        answered before the outage (its closing was lost) closes now rather than at that deadline."""
        for run in list(self.runs.values()):
            if run.status is RunStatus.running:
                run.round_deadline = now + run.config.round_deadline_s
                secure = self.secure.get(run.id)
                if secure is not None:
                    secure.phase_deadline = now + (run.config.round_deadline_s if secure.phase is SecurePhase.masked
                                                   else run.config.secure_phase_s)
                self.settle(run, now)
