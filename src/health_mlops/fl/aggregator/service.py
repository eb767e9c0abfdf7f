"""The aggregator's service: the coordinator with what a long-lived process needs around it.

One asyncio event loop owns the coordinator, so its state changes one request at a time without locks. Every
change the coordinator reports (its events: a result accepted or rejected, a round opened or closed, a run
started or ended) is checkpointed (atomically, fsynced, in order by one writer thread) before the request that
caused it is answered, so a restarted aggregator resumes at the last durably closed round with the results it
had acknowledged, and never applies a round twice. Nodes long-poll for tasks; they are woken the moment a round
opens. A fit result is streamed to its own file as it arrives and read back memory-mapped. A completed run's
model is exported and registered in a worker thread. Nothing here speaks HTTP: refusals are the coordinator's
errors (fl/errors.py), which the routes map to answers.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

from health_mlops.data.preprocess import encoded_columns
from health_mlops.errors import CheckpointError
from health_mlops.fl.aggregator.reporting import Reporting
from health_mlops.fl.coordinator import Conflict, Coordinator, Forbidden, NotFound
from health_mlops.fl.errors import Invalid
from health_mlops.fl.messages import (MessageError, OpenTaskView, RoundView, RunRequest, RunView, TaskMessage,
                                      check_result_task, decode_result, encode_weights, map_result, weighted_metrics,
                                      weights_view)
from health_mlops.fl.privacy_budget import privacy_report
from health_mlops.fl.secure_round import SecurePhase
from health_mlops.fl.snapshot import round_record_to_dict
from health_mlops.fl.state import Event, RoundClosed, RoundOpened, Run, RunEnded, RunStatus, Task, TaskKind, TaskResult
from health_mlops.fl.stats import reduce_stats, suppressed_cells
from health_mlops.fl.store import CheckpointStore
from health_mlops.ml.directions import weight_constraint
from health_mlops.ml.initial_weights import initial_weights
from health_mlops.monitoring import AggregatorMetrics
from health_mlops.spec import DatasetSpec
from health_mlops.system.faults import crash_point
from health_mlops.system.memory import return_free_memory
from health_mlops.trust.audit import AuditLog
from health_mlops.trust.credentials import FailureThrottle, Gatekeeper, Identity

if TYPE_CHECKING:  # MLflow is imported only by an aggregator that registers models
    from health_mlops.fl.publish import Publisher

log = logging.getLogger("health_mlops.aggregator")

T = TypeVar("T")


@dataclass
class _Checkpoint:
    """What one write makes durable: weights of rounds that opened, records of rounds that closed and of runs
    that ended, the latest state, and result files no longer named by it; `written` resolves once it is
    durable."""

    weights: list[tuple[Run, int, memoryview]] = field(default_factory=list)
    history: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    records: list[tuple[str, int, dict[str, Any]]] = field(default_factory=list)
    obsolete: set[tuple[str, str]] = field(default_factory=set)
    snapshot: dict[str, Any] = field(default_factory=dict)
    written: asyncio.Future[None] | None = None


# How often deadlines and expired leases are looked at when no request comes in.
TICK_SECONDS = 0.25
# A result body from this size on leaves enough freed buffers to be worth giving back (a small model's are reused).
RETURN_MEMORY_AFTER_BYTES = 8 * 1024 * 1024


class AggregatorService:
    """The coordinator plus what a service needs around it: persistence, wake-ups, reporting, registration."""

    def __init__(self, spec: DatasetSpec, store: CheckpointStore, gatekeeper: Gatekeeper,
                 metrics: AggregatorMetrics | None = None, clock: Callable[[], float] = time.time,
                 publisher: Publisher | None = None, audit: AuditLog | None = None,
                 throttle: FailureThrottle | None = None) -> None:
        self.spec = spec
        self.publisher = publisher
        self.registrations: dict[str, dict[str, Any]] = {}
        self.store = store
        self.gatekeeper = gatekeeper
        self.throttle = throttle or FailureThrottle()
        self.metrics = metrics or AggregatorMetrics()
        self.reporting = Reporting(self.metrics, audit, clock)
        self.clock = clock
        self.coordinator = restore_coordinator(store, spec)
        # Runs that ended before the restart: each has its record (a state from before records were kept still
        # holds them) and is compacted (the restart may have cut its compaction short).
        for run in self.coordinator.runs.values():
            if run.status is not RunStatus.running:
                if not store.run_record_path(run.id).exists():
                    store.save_run_record(run.id, self.coordinator.run_record(run.id))
                store.compact_run(run.id, run.round)
        # Rounds settled before the restart close now; their events are persisted by the first change (the
        # deadline ticker's, within TICK_SECONDS).
        self.coordinator.resume(clock())
        # Result files on disk (removed once no durable state names them), and those written whose result the
        # coordinator has not yet been offered (never removed meanwhile).
        self._result_files_written = self._result_files()
        self._results_in_flight: set[tuple[str, str]] = set()
        for run_id, reference in store.result_references() - self._result_files_written:
            store.remove_result(run_id, reference)  # written, but its acceptance never became durable
        # run -> its open round and its weights as sent, until their file is durable (then read from the file)
        self._weights_cache: dict[str, tuple[int, memoryview]] = {}
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")  # one: writes stay in order
        # Result files are made durable apart, several at a time: one is named by a state only once it is
        # durable, so it need not wait for the state writes in the queue.
        self._result_writer = ThreadPoolExecutor(max_workers=4, thread_name_prefix="results")
        self._gathering = threading.Lock()  # between the event loop adding changes and the writer taking them
        self._next_checkpoint: _Checkpoint | None = None
        self.reporting.gauges(self.coordinator.runs)
        for run in self.coordinator.runs.values():
            if run.status is RunStatus.completed:
                outcome = store.load_registration(run.id)
                if outcome is None:
                    self._publish(run)  # it completed just before a restart
                else:
                    self.registrations[run.id] = outcome

    # --- state changes --------------------------------------------------------------------------------

    def _result_files(self) -> set[tuple[str, str]]:
        """(run, reference) of every accepted result the coordinator holds: their files must be kept."""
        return {(self.coordinator.tasks[task_id].run_id, result.reference)
                for task_id, result in self.coordinator.results.items() if result.reference}

    def held_task(self, task_id: str, hospital: str) -> Task:
        """`hospital`'s open task `task_id`, checked before its result's body is read."""
        task = self.coordinator.tasks.get(task_id)
        if task is None:
            raise self.coordinator.unknown_task(task_id, hospital)
        if task.hospital != hospital:
            raise Forbidden(f"task {task_id} belongs to another hospital")
        return task

    async def read_result(self, task: Task, body: AsyncIterator[bytes]) -> TaskResult:
        """A result from its body (bounded by the HTTP layer); MessageError for an unreadable one."""
        try:
            if task.kind is TaskKind.fit:
                return await self._receive_fit_result(task, body)
            result = decode_result(b"".join([chunk async for chunk in body]))
            check_result_task(result, task.id)
            return result
        except MessageError:
            self.reporting.result(task.kind, "unreadable")
            raise

    async def _receive_fit_result(self, task: Task, body: AsyncIterator[bytes]) -> TaskResult:
        """A fit result, streamed to its own file as its body arrives (a name new for each submission, so a
        duplicate never touches the accepted one's file), made durable, then read back memory-mapped: the
        aggregator never holds a whole update in memory. Once no state names the file (refused, or its round
        closed) and that state is durable, it is removed; an unreadable one (MessageError) at once."""
        reference = f"{task.id}.{secrets.token_hex(4)}"
        written = (task.run_id, reference)
        self._results_in_flight.add(written)
        self._result_files_written.add(written)
        try:
            handle = self.store.open_result(task.run_id, reference)
            try:
                async for chunk in body:
                    handle.write(chunk)  # into the page cache: brief; made durable by the writer thread
            except BaseException:
                handle.close()
                raise
            size = await asyncio.get_running_loop().run_in_executor(self._result_writer, self.store.commit_result,
                                                                    task.run_id, reference, handle)
            self.metrics.checkpoint_bytes.labels("result").inc(size)
            result = map_result(self.store.result_path(task.run_id, reference))
            check_result_task(result, task.id)
        except BaseException:  # unreadable, cut short by the client or the body limit, or cancelled
            self._results_in_flight.discard(written)
            self._result_files_written.discard(written)
            self.store.remove_result(*written)
            raise
        result.reference = reference
        if size >= RETURN_MEMORY_AFTER_BYTES:
            return_free_memory()  # the body's read buffers, freed amid other connections' (system/memory.py)
        return result

    async def submit(self, task: Task, hospital: str, node: str, result: TaskResult) -> Task:
        """Offer a result to the coordinator and checkpoint (a fit result comes from `receive_result`)."""
        def offer(now: float) -> Task:
            self._results_in_flight.discard((task.run_id, result.reference))
            return self.coordinator.submit(task.id, hospital, node, result, now)

        try:
            accepted = await self.change(offer, checkpoint=True)
        except (NotFound, Forbidden, Conflict):
            self.reporting.result(task.kind, "refused")
            raise
        crash_point("result_accepted")
        return accepted

    async def change(self, operation: Callable[[float], T], *, checkpoint: bool = False) -> T:
        """Run one coordinator operation; if it did anything durable (its events) or `checkpoint` (it took a
        result), write the checkpoint before answering. Waiting nodes are woken first: a new round's tasks go
        out while the checkpoint is written (if that write is lost in a crash, so are those tasks; the restored
        round is handed out again).

        The checkpoint is written even when the operation raised (a rejected update can close a round).
        """
        try:
            return operation(self.clock())
        finally:
            events = self.coordinator.take_events()
            if checkpoint or events:
                await self._persist(events)

    async def _persist(self, events: list[Event]) -> None:
        runs = self.coordinator.runs
        # A run entering a new round: its weights and optimiser moments, which the state does not hold (a retry
        # of the round has the same ones).
        weights = [(runs[e.run_id], e.round, self._encoded_weights(runs[e.run_id])) for e in events
                   if isinstance(e, RoundOpened) and e.attempt == 0 and runs[e.run_id].round == e.round
                   and runs[e.run_id].status is RunStatus.running]
        # A run that ended: its record leaves the state for a file of its own, and its arrays leave memory
        # (its last round's weights are in their file).
        ended = [runs[e.run_id] for e in events if isinstance(e, RunEnded)]
        records = [(run.id, run.round, self.coordinator.run_record(run.id)) for run in ended]
        # A running run's closed round: appended once to its history file (an ended run's is in its record).
        history = [(e.run_id, round_record_to_dict(e.record)) for e in events
                   if isinstance(e, RoundClosed) and runs[e.run_id].status is RunStatus.running]
        for run in ended:
            self.coordinator.release_arrays(run.id)
            self._weights_cache.pop(run.id, None)
        snapshot = self.coordinator.snapshot()  # taken now, in the loop; written in order by one thread
        obsolete = self._result_files_written - self._result_files() - self._results_in_flight
        self._result_files_written -= obsolete
        self.wake_waiters()
        try:  # what follows only reports the change, and must not break the service
            self.reporting.events(events, runs)
        except Exception:
            log.exception("reporting a state change failed")
        for run in ended:
            if run.status is RunStatus.completed:
                self._publish(run)
        with self._gathering:
            checkpoint = self._next_checkpoint
            if checkpoint is None:  # the writer has begun the last one: this change goes into a new one
                checkpoint = self._next_checkpoint = _Checkpoint()
                checkpoint.written = asyncio.get_running_loop().run_in_executor(self._writer, self._write, checkpoint)
            checkpoint.weights += weights
            checkpoint.history += history
            checkpoint.records += records
            checkpoint.obsolete |= obsolete
            checkpoint.snapshot = snapshot  # the latest state holds every earlier change
            written = checkpoint.written
        assert written is not None  # set when the checkpoint was made, above
        await asyncio.shield(written)
        for run, round_number, _ in weights:
            self._weights_written(run, round_number)

    def _write(self, checkpoint: _Checkpoint) -> None:
        """In the writer thread: make a checkpoint durable. From the moment it begins, the changes that follow
        gather in the next one, so that one write (and one fsync of the state) covers every change made
        while the previous write was under way."""
        with self._gathering:
            if self._next_checkpoint is checkpoint:
                self._next_checkpoint = None
        weights, history, records, snapshot, obsolete = (checkpoint.weights, checkpoint.history,
                                                         checkpoint.records, checkpoint.snapshot, checkpoint.obsolete)
        started = time.perf_counter()
        if weights:
            crash_point("round_closed_weights_unwritten")
        for run, round_number, body in weights:
            self.store.save_weights(run.id, round_number, body)
            self.metrics.checkpoint_bytes.labels("weights").inc(len(body))
            if run.optimiser.steps:  # the moments of that round: replaced, never changed, by the next close
                self.metrics.checkpoint_bytes.labels("optimiser").inc(self.store.save_optimiser(
                    run.id, round_number, run.optimiser.first_moment, run.optimiser.second_moment))
        for run_id in dict.fromkeys(run_id for run_id, _ in history):  # before the state that counts them
            self.metrics.checkpoint_bytes.labels("history").inc(
                self.store.append_history(run_id, [record for owner, record in history if owner == run_id]))
        for run_id, _, record in records:  # before the state that no longer holds them
            self.metrics.checkpoint_bytes.labels("run").inc(self.store.save_run_record(run_id, record))
        self.metrics.checkpoint_bytes.labels("state").inc(self.store.save_state(snapshot))
        for run_id, reference in obsolete:  # only once the state that no longer names them is durable
            self.store.remove_result(run_id, reference)
        for run_id, last_round, _ in records:
            self.store.compact_run(run_id, last_round)
        self.metrics.checkpoint_duration.observe(time.perf_counter() - started)

    def _publish(self, run: Run) -> None:
        """Register the run's final model in a worker thread; the event loop keeps serving meanwhile."""
        if self.publisher is None:
            return
        self.registrations[run.id] = {"status": "registering"}
        # A completed run no longer changes, so the worker thread may read it.
        future = asyncio.get_running_loop().run_in_executor(None, self.publisher.publish, run, self.spec)

        def done(finished: asyncio.Future[dict[str, Any]]) -> None:
            self.registrations[run.id] = outcome = finished.result()
            self.reporting.model_registered(run.id, outcome)

        future.add_done_callback(done)

    def wake_waiters(self) -> None:
        self._wakeup.set()
        self._wakeup = asyncio.Event()

    def stop_waiting(self) -> None:
        """The server is stopping: every waiting long poll answers now, as at its deadline (no task), so that the
        stop is neither held up for the grace period nor ends in cancelled requests."""
        self._stopping = True
        self.wake_waiters()

    def _encoded_weights(self, run: Run) -> memoryview:
        """A running run's weights entering the round that just opened, as sent. The run's weights then become
        read-only views of these bytes: the model is held once in memory, not twice."""
        self._weights_cache.pop(run.id, None)  # the previous round's bytes go before the next are made
        body = encode_weights(run.weights)
        run.weights = weights_view(body)
        self._weights_cache[run.id] = (run.round, body)
        return body

    def _weights_written(self, run: Run, round_number: int) -> None:
        """Once a round's weights file is durable, the run's weights are read from it (mapped a block at a time:
        a round holds none of the model in memory) and it is what hospitals download."""
        cached = self._weights_cache.get(run.id)
        if cached is None or cached[0] != round_number or run.round != round_number:
            return  # the run has moved on (or ended) since
        run.weights = map_result(self.store.weights_path(run.id, round_number)).tensors
        del self._weights_cache[run.id]

    # --- operations the routes call -------------------------------------------------------------------

    async def start_run(self, request: RunRequest) -> Run:
        provisioned = self.gatekeeper.hospitals
        enrolled = request.hospitals if request.hospitals is not None else provisioned
        unknown = sorted(set(enrolled) - set(provisioned))
        if unknown:
            raise Invalid(f"hospitals: {unknown} have no credentials; provisioned: {provisioned}")
        if not enrolled:
            raise Invalid("hospitals: no hospital is provisioned or named")
        if request.config.min_hospitals > len(enrolled):
            raise Invalid(f"config.min_hospitals: {request.config.min_hospitals} exceeds the "
                          f"{len(enrolled)} enrolled hospitals")
        run_id = f"run-{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"
        weights = initial_weights(self.spec, request.config.seed)
        return await self.change(lambda now: self.coordinator.start_run(run_id, request.config, list(enrolled), weights,
                                                                  now))

    async def next_task(self, hospital: str, node: str, wait_s: float) -> TaskMessage | None:
        deadline = time.monotonic() + wait_s
        while True:
            wakeup = self._wakeup
            task = await self.change(lambda now: self.coordinator.next_task(hospital, node, now))
            if task is not None:
                return TaskMessage.of(task, self.coordinator.runs[task.run_id])
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._stopping:
                return None
            try:
                await asyncio.wait_for(wakeup.wait(), timeout=remaining)
            except TimeoutError:
                pass

    async def secure_view(self, task_id: str, hospital: str, node: str, after: SecurePhase | None,
                          wait_s: float) -> dict[str, Any]:
        """A secure round as the task's holder sees it; with `after`, once the round has left that phase, or when
        `wait_s` has passed (a long poll, as `next_task`)."""
        deadline = time.monotonic() + wait_s
        while True:
            wakeup = self._wakeup
            view = await self.change(lambda now: self.coordinator.secure_steps.view(task_id, hospital, node, now))
            remaining = deadline - time.monotonic()
            if after is None or view["phase"] != after.value or remaining <= 0 or self._stopping:
                return view
            try:
                await asyncio.wait_for(wakeup.wait(), timeout=remaining)
            except TimeoutError:
                pass

    def run(self, run_id: str) -> Run:
        run = self.coordinator.runs.get(run_id)
        if run is None:
            raise NotFound(f"no run {run_id}")
        return run

    def weights(self, run_id: str, round_number: int, identity: Identity) -> memoryview | BinaryIO:
        """A round's global weights as sent: in memory until their file is durable, then that file, opened (it
        stays readable if compaction removes it while it is being sent)."""
        run = self.run(run_id)
        if identity.hospital is not None and identity.hospital not in run.hospitals:
            raise Forbidden(f"{identity.hospital} is not enrolled in {run_id}")
        if round_number > run.round:
            raise NotFound(f"round {round_number} of {run_id} has not opened yet")
        cached = self._weights_cache.get(run_id)
        if cached is not None and cached[0] == round_number:
            return cached[1]
        handle = self.store.open_weights(run_id, round_number)
        if handle is None:
            raise NotFound(f"no weights kept for round {round_number} of {run_id}")
        return handle

    def view(self, run: Run) -> RunView:
        open_tasks = [OpenTaskView(hospital=t.hospital, status=t.status.value, holder=t.holder,
                                   lease_expires=t.lease_expires)
                      for t in self.coordinator.tasks.values()
                      if t.run_id == run.id and t.round == run.round and t.attempt == run.attempt
                      and run.status is RunStatus.running]
        history = [RoundView(round=h.round, kind=h.kind, attempts=h.attempts, opened_at=h.opened_at,
                             closed_at=h.closed_at, hospitals=h.hospitals, nodes=h.nodes,
                             global_metrics=weighted_metrics(h.evaluations()),
                             secure_aggregation=h.secure_aggregation)
                   for h in run.history]
        return RunView(id=run.id, status=run.status.value, reason=run.reason, round=run.round, attempt=run.attempt,
                       final_round=run.final_round, hospitals=run.hospitals, config=run.config,
                       selected_round=run.selected_round,
                       validation_loss=None if run.best_round is None else run.best_loss,
                       preprocessing=run.preprocessing, rejected=run.rejected, open_tasks=open_tasks,
                       history=history, model=self.registrations.get(run.id),
                       suppressed={h: suppressed_cells(m) for r in run.history for h, m in r.stats().items()},
                       privacy=privacy_report(run), excluded=run.excluded)

    async def tick_forever(self) -> None:
        while True:
            try:
                await self.change(self.coordinator.tick)
            except Exception:
                log.exception("applying deadlines failed; trying again")
            self.wake_waiters()  # an expired lease can be taken over by a replica that is waiting
            await asyncio.sleep(TICK_SECONDS)


def restore_coordinator(store: CheckpointStore, spec: DatasetSpec) -> Coordinator:
    """The coordinator as last checkpointed (a fresh one on a first start)."""
    saved = store.load_state() or {"runs": [], "tasks": [], "results": {}}  # a first start: nothing
    try:
        return Coordinator.restore(saved, partial(reduce_stats, spec), store, stats_columns=len(encoded_columns(spec)),
                                   constrain=weight_constraint(spec))
    except (KeyError, TypeError, ValueError, MessageError) as error:
        raise CheckpointError(f"{store.state_path}: not a checkpoint this version can resume "
                              f"({type(error).__name__}: {error})") from None
