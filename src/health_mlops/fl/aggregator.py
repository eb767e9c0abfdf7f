"""The aggregator service: the coordinator behind DESIGN.md's `/v1` HTTP API.

One asyncio event loop owns the coordinator, so its state changes one request at a time without locks. Every
accepted result and every change that opens or closes a round, starts or ends a run is checkpointed
(atomically, fsynced, in order by one writer thread) before the request that caused it is answered, so a
restarted aggregator resumes at the last durably closed round with the results it had acknowledged, and never
applies a round twice. Nodes long-poll `GET /v1/tasks/next`; they are woken the moment a round opens. A
completed run's model is exported and registered in a worker thread.

The API is served over mutual TLS: who a caller is comes from its token and its client certificate together
(`security.Gatekeeper`). Probes and metrics are on a separate plain-HTTP operations port (`create_ops_app`).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import uvicorn
from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from health_mlops.audit import AuditLog
from health_mlops.data.preprocess import encoded_columns
from health_mlops.faults import crash_point
from health_mlops.fl.coordinator import (Conflict, Coordinator, Event, Forbidden, NotFound, Rejected, ResultAccepted,
                                         ResultRejected, RoundClosed, RoundOpened, Run, RunEnded, RunStarted,
                                         RunStatus, Task, TaskKind, TaskResult, privacy_report)
from health_mlops.fl.hospital import reduce_stats, suppressed_cells
from health_mlops.fl.messages import (SAFETENSORS_MEDIA_TYPE, LeaseMessage, MessageError, OpenTaskView,
                                      ResultReceipt, RoundView, RunRequest, RunView, TaskMessage, decode_result,
                                      decode_weights, encode_weights, map_result, weighted_metrics)
from health_mlops.fl.simulation import initial_weights
from health_mlops.fl.store import CheckpointError, CheckpointStore
from health_mlops.fl.strategies import Weights
from health_mlops.http_edge import KIB, BodyLimit
from health_mlops.http_errors import install_validation_handler
from health_mlops.monitoring import AggregatorMetrics
from health_mlops.http_server import BackgroundServer, protocol_options
from health_mlops.pki import CA, SERVER, cert_path, key_path
from health_mlops.security import AccessDenied, FailureThrottle, Gatekeeper, Identity
from health_mlops.spec import DatasetSpec
from health_mlops.tls import peer_certificate, server_context

if TYPE_CHECKING:  # MLflow is imported only by an aggregator that registers models
    from health_mlops.fl.publish import Publisher
    from health_mlops.registry import Registry

T = TypeVar("T")
log = logging.getLogger("health_mlops.aggregator")

# How often deadlines and expired leases are looked at when no request comes in.
TICK_SECONDS = 0.25
MAX_NODE_ID_LENGTH = 128
# A result is one model's weights; far beyond any model this task trains, small enough to refuse abuse.
DEFAULT_MAX_RESULT_BYTES = 64 * 1024 * 1024
MAX_RUN_REQUEST_BYTES = 64 * KIB  # a run's config and hospital list
MAX_OTHER_BODY_BYTES = 1 * KIB  # heartbeat and cancel take no body


def body_limit(path: str, max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES) -> int:
    """The most bytes a request body to `path` may hold."""
    if path.startswith("/v1/tasks/") and path.endswith("/result"):
        return max_result_bytes
    return MAX_RUN_REQUEST_BYTES if path == "/v1/runs" else MAX_OTHER_BODY_BYTES


class AggregatorService:
    """The coordinator plus what a service needs around it: persistence, wake-ups, metrics."""

    def __init__(self, spec: DatasetSpec, store: CheckpointStore, gatekeeper: Gatekeeper,
                 metrics: AggregatorMetrics | None = None, clock: Callable[[], float] = time.time,
                 publisher: Publisher | None = None, audit: AuditLog | None = None,
                 throttle: FailureThrottle | None = None) -> None:
        self.spec = spec
        self.audit_log = audit
        self.publisher = publisher
        self.registrations: dict[str, dict[str, Any]] = {}
        self.store = store
        self.gatekeeper = gatekeeper
        self.throttle = throttle or FailureThrottle()
        self.metrics = metrics or AggregatorMetrics()
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
        self._weights_cache: dict[tuple[str, int], bytes] = {}
        self._wakeup = asyncio.Event()
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")  # one: writes stay in order
        self._update_gauges()
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

    async def receive_result(self, task: Task, body: AsyncIterator[bytes]) -> TaskResult:
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
            size = await asyncio.get_running_loop().run_in_executor(self._writer, self.store.commit_result,
                                                                    task.run_id, reference, handle)
            self.metrics.checkpoint_bytes.labels("result").inc(size)
            result = map_result(self.store.result_path(task.run_id, reference))
        except BaseException:  # unreadable, cut short by the client or the body limit, or cancelled
            self._results_in_flight.discard(written)
            self._result_files_written.discard(written)
            self.store.remove_result(*written)
            raise
        result.reference = reference
        return result

    async def submit(self, task: Task, hospital: str, node: str, result: TaskResult) -> Task:
        """Offer a result to the coordinator and checkpoint (a fit result comes from `receive_result`)."""
        def offer(now: float) -> Task:
            self._results_in_flight.discard((task.run_id, result.reference))
            return self.coordinator.submit(task.id, hospital, node, result, now)

        accepted = await self.change(offer, checkpoint=True)
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
        for run in ended:
            self.coordinator.release_arrays(run.id)
        snapshot = self.coordinator.snapshot()  # taken now, in the loop; written in order by one thread
        obsolete = self._result_files_written - self._result_files() - self._results_in_flight
        self._result_files_written -= obsolete
        self.wake_waiters()
        try:  # what follows only reports the change, and must not break the service
            self._report(events)
        except Exception:
            log.exception("reporting a state change failed")
        await asyncio.get_running_loop().run_in_executor(self._writer, self._write, weights, records, snapshot,
                                                         obsolete)

    def _write(self, weights: list[tuple[Run, int, bytes]], records: list[tuple[str, int, dict[str, Any]]],
               snapshot: dict[str, Any], obsolete: set[tuple[str, str]]) -> None:
        started = time.perf_counter()
        if weights:
            crash_point("round_closed_weights_unwritten")
        for run, round_number, body in weights:
            self.store.save_weights(run.id, round_number, body)
            self.metrics.checkpoint_bytes.labels("weights").inc(len(body))
            if run.optimiser.steps:  # the moments of that round: replaced, never changed, by the next close
                self.metrics.checkpoint_bytes.labels("optimiser").inc(self.store.save_optimiser(
                    run.id, round_number, run.optimiser.first_moment, run.optimiser.second_moment))
        for run_id, _, record in records:  # before the state that no longer holds them
            self.metrics.checkpoint_bytes.labels("run").inc(self.store.save_run_record(run_id, record))
        self.metrics.checkpoint_bytes.labels("state").inc(self.store.save_state(snapshot))
        for run_id, reference in obsolete:  # only once the state that no longer names them is durable
            self.store.remove_result(run_id, reference)
        for run_id, last_round, _ in records:
            self.store.compact_run(run_id, last_round)
        self.metrics.checkpoint_duration.observe(time.perf_counter() - started)

    def _report(self, events: list[Event]) -> None:
        runs = self.coordinator.runs
        for event in events:
            match event:
                case RunStarted(run_id=run_id):
                    log.info("%s: started with %s", run_id, ", ".join(runs[run_id].hospitals))
                case RoundClosed(run_id=run_id, record=record):
                    self._observe_round(record.kind, record.closed_at - record.opened_at, record.hospitals)
                    log.info("%s: round %d (%s) closed with %d/%d hospitals in %.3f s", run_id, record.round,
                             record.kind.value, len(record.hospitals), len(runs[run_id].hospitals),
                             record.closed_at - record.opened_at)
                case ResultAccepted(kind=kind):
                    self.metrics.results.labels(kind.value, "accepted").inc()
                case ResultRejected(kind=kind, reason=reason):
                    self.metrics.results.labels(kind.value, "rejected").inc()
                    self.metrics.updates_rejected.labels(reason).inc()
                case RunEnded(run_id=run_id, status=status, reason=reason):
                    self.metrics.runs_ended.labels(status.value).inc()
                    log.info("%s: %s %s", run_id, status.value, reason)
                    self.audit("run_ended", "aggregator", run=run_id, status=status.value, reason=reason)
                    if status is RunStatus.completed:
                        self._publish(runs[run_id])
        self._update_gauges()

    def audit(self, action: str, actor: str, *, outcome: str = "ok", **details: Any) -> None:
        if self.audit_log is not None:
            self.audit_log.append(action, actor, outcome=outcome, **details)

    async def refuse(self, request: Request, status: int, reason: str, actor: str | None) -> HTTPException:
        """A refused credential: counted, audited (who it claimed to be, from where, for what), slowed down
        per source when it repeats, and answered."""
        self.metrics.auth_failures.labels(str(status)).inc()
        source = request.client.host if request.client else "unknown"
        self.audit(f"{request.method} {request.url.path}", actor or "unknown", outcome=f"refused {status}",
                   reason=reason, source=source)
        delay = self.throttle.failed(source, reason)
        if delay:
            await asyncio.sleep(delay)
        return HTTPException(status, reason, headers={"WWW-Authenticate": "Bearer"} if status == 401 else None)

    def _publish(self, run: Run) -> None:
        """Register the run's final model in a worker thread; the event loop keeps serving meanwhile."""
        if self.publisher is None:
            return
        self.registrations[run.id] = {"status": "registering"}
        # A completed run no longer changes, so the worker thread may read it.
        future = asyncio.get_running_loop().run_in_executor(None, self.publisher.publish, run, self.spec)

        def done(finished: asyncio.Future[dict[str, Any]]) -> None:
            self.registrations[run.id] = outcome = finished.result()
            log.info("%s: model %s", run.id, outcome)

        future.add_done_callback(done)

    def _observe_round(self, kind: TaskKind, seconds: float, hospitals: dict[str, dict[str, Any]]) -> None:
        self.metrics.rounds_closed.labels(kind.value).inc()
        self.metrics.round_duration.labels(kind.value).observe(seconds)
        self.metrics.round_closed_timestamp.set(self.clock())
        self.metrics.hospitals_reporting.set(len(hospitals))
        if kind is TaskKind.stats:
            return
        for name, value in weighted_metrics(hospitals).items():
            self.metrics.global_metric.labels(name).set(value)
        for hospital, metadata in hospitals.items():
            for name, value in (metadata.get("metrics") or {}).items():
                if value is not None:  # names were checked against the allowed metrics when the result came in
                    self.metrics.hospital_metric.labels(hospital, name).set(value)

    def _update_gauges(self) -> None:
        runs = list(self.coordinator.runs.values())
        self.metrics.runs_active.set(sum(r.status is RunStatus.running for r in runs))
        if runs:
            newest = runs[-1]
            self.metrics.round.set(newest.round)
            self.metrics.hospitals_enrolled.set(len(newest.hospitals))

    def wake_waiters(self) -> None:
        self._wakeup.set()
        self._wakeup = asyncio.Event()

    def _encoded_weights(self, run: Run) -> bytes:
        key = (run.id, run.round)
        if key not in self._weights_cache:
            self._weights_cache = {key: encode_weights(run.weights)}  # only the open round's stays in memory
        return self._weights_cache[key]

    # --- operations the routes call -------------------------------------------------------------------

    async def start_run(self, request: RunRequest) -> Run:
        provisioned = self.gatekeeper.hospitals
        enrolled = request.hospitals if request.hospitals is not None else provisioned
        unknown = sorted(set(enrolled) - set(provisioned))
        if unknown:
            raise HTTPException(422, f"hospitals: {unknown} have no credentials; provisioned: {provisioned}")
        if not enrolled:
            raise HTTPException(422, "hospitals: no hospital is provisioned or named")
        if request.config.min_hospitals > len(enrolled):
            raise HTTPException(422, f"config.min_hospitals: {request.config.min_hospitals} exceeds the "
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
            if remaining <= 0:
                return None
            try:
                await asyncio.wait_for(wakeup.wait(), timeout=remaining)
            except TimeoutError:
                pass

    def weights(self, run_id: str, round_number: int, identity: Identity) -> bytes:
        run = self.coordinator.runs.get(run_id)
        if run is None:
            raise HTTPException(404, f"no run {run_id}")
        if identity.hospital is not None and identity.hospital not in run.hospitals:
            raise Forbidden(f"{identity.hospital} is not enrolled in {run_id}")
        if round_number == run.round and run.status is RunStatus.running:
            return self._encoded_weights(run)
        if round_number > run.round:
            raise HTTPException(404, f"round {round_number} of {run_id} has not opened yet")
        body = self.store.load_weights(run_id, round_number)
        if body is None:
            raise HTTPException(404, f"no weights kept for round {round_number} of {run_id}")
        return body

    def view(self, run: Run) -> RunView:
        open_tasks = [OpenTaskView(hospital=t.hospital, status=t.status.value, holder=t.holder,
                                   lease_expires=t.lease_expires)
                      for t in self.coordinator.tasks.values()
                      if t.run_id == run.id and t.round == run.round and t.attempt == run.attempt
                      and run.status is RunStatus.running]
        history = [RoundView(round=h.round, kind=h.kind, attempts=h.attempts, opened_at=h.opened_at,
                             closed_at=h.closed_at, hospitals=h.hospitals, nodes=h.nodes,
                             global_metrics={} if h.kind is TaskKind.stats else weighted_metrics(h.hospitals))
                   for h in run.history]
        return RunView(id=run.id, status=run.status.value, reason=run.reason, round=run.round, attempt=run.attempt,
                       final_round=run.final_round, hospitals=run.hospitals, config=run.config,
                       preprocessing=run.preprocessing, rejected=run.rejected, open_tasks=open_tasks,
                       history=history, model=self.registrations.get(run.id),
                       suppressed={h: suppressed_cells(m) for r in run.history if r.kind is TaskKind.stats
                                   for h, m in r.hospitals.items()},
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
    columns = len(encoded_columns(spec))
    saved = store.load_state() or {"runs": [], "tasks": [], "results": {}}  # a first start: nothing

    def round_arrays(run_id: str, round_number: int) -> tuple[Weights, Weights, Weights]:
        body = store.load_weights(run_id, round_number)
        if body is None:
            raise CheckpointError(f"{store.weights_path(run_id, round_number)}: missing, and the checkpoint "
                                  f"resumes {run_id} at round {round_number}")
        return (decode_weights(body)[0], *store.load_optimiser(run_id, round_number))

    def result_tensors(task: Task, reference: str) -> Weights:
        path = store.result_path(task.run_id, reference)
        try:
            return map_result(path).tensors
        except MessageError as error:
            raise CheckpointError(f"{path}: an accepted result the checkpoint names cannot be read "
                                  f"({error})") from None

    try:
        return Coordinator.restore(saved, reduce_stats, stats_columns=columns, round_arrays=round_arrays,
                                   result_tensors=result_tensors, ended_runs=store.load_run_records())
    except (KeyError, TypeError, ValueError, MessageError) as error:
        raise CheckpointError(f"{store.state_path}: not a checkpoint this version can resume "
                              f"({type(error).__name__}: {error})") from None


async def _service(request: Request) -> AggregatorService:
    service: AggregatorService | None = getattr(request.app.state, "service", None)
    if service is None:
        raise HTTPException(503, "the aggregator is still loading its checkpoint")
    return service


Service = Annotated[AggregatorService, Depends(_service)]


async def _caller(request: Request, svc: Service, authorization: Annotated[str | None, Header()] = None) -> Identity:
    try:
        return svc.gatekeeper.identify(authorization, peer_certificate(request.scope))
    except AccessDenied as denied:
        raise await svc.refuse(request, denied.status, str(denied), denied.claimed) from None


Caller = Annotated[Identity, Depends(_caller)]


async def _hospital(request: Request, svc: Service, identity: Caller) -> str:
    if identity.hospital is None:
        raise await svc.refuse(request, 403, "this endpoint is for hospital nodes; the admin cannot use it",
                               identity.name)
    return identity.hospital


async def _admin(request: Request, svc: Service, identity: Caller) -> Identity:
    if identity.role != "admin":
        raise await svc.refuse(request, 403, "this endpoint needs the admin credential", identity.name)
    return identity


async def _node_id(x_node_id: Annotated[str, Header(min_length=1, max_length=MAX_NODE_ID_LENGTH)] = "node") -> str:
    """The replica's name: tells replicas of one hospital apart; identity comes from the token only."""
    return x_node_id


Hospital = Annotated[str, Depends(_hospital)]
Admin = Annotated[Identity, Depends(_admin)]
NodeId = Annotated[str, Depends(_node_id)]


async def _refusal(svc: AggregatorService, request: Request, error: Exception, actor: str) -> HTTPException:
    """The answer to a coordinator's refusal; one that touches another hospital's task or a run the caller is
    not enrolled in is refused like a bad credential (audited, counted, slowed down)."""
    if isinstance(error, NotFound):
        return HTTPException(404, str(error))
    if isinstance(error, Forbidden):
        return await svc.refuse(request, 403, str(error), actor)
    return HTTPException(409, str(error))


def _run_of(svc: AggregatorService, run_id: str) -> Run:
    run = svc.coordinator.runs.get(run_id)
    if run is None:
        raise HTTPException(404, f"no run {run_id}")
    return run


def create_app(service_factory: Callable[[], AggregatorService],
               max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES) -> BodyLimit:
    """The FastAPI app behind its byte limits; the service is built inside the app's event loop (its wake-ups
    belong to it)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.service = service = service_factory()
        app.state.ticker = ticker = asyncio.create_task(service.tick_forever())
        try:
            yield
        finally:
            ticker.cancel()

    app = FastAPI(title="Health MLOps aggregator", version="1", lifespan=lifespan)
    install_validation_handler(app)

    run_request_body = {"requestBody": {"required": True, "content": {"application/json": {
        "schema": RunRequest.model_json_schema(ref_template="#/components/schemas/{model}")}}}}

    @app.post("/v1/runs", status_code=201, response_model=RunView, openapi_extra=run_request_body)
    async def start_run(request: Request, svc: Service, identity: Admin) -> RunView:
        # The body is read only now, after the credential was checked (a declared body parameter would be
        # read and parsed first); `BodyLimit` has bounded its size.
        try:
            run_request = RunRequest.model_validate_json(await request.body())
        except ValidationError as error:
            raise RequestValidationError([{**e, "loc": ["body", *e["loc"]]} for e in error.errors()]) from None
        run = await svc.start_run(run_request)
        svc.audit("start_run", identity.name, run=run.id, hospitals=run.hospitals, config=run.config.model_dump())
        return svc.view(run)

    @app.get("/v1/runs")
    async def list_runs(svc: Service, _: Admin) -> list[RunView]:
        return [svc.view(r) for r in svc.coordinator.runs.values()]

    @app.get("/v1/runs/{run_id}")
    async def get_run(run_id: str, svc: Service, _: Admin) -> RunView:
        return svc.view(_run_of(svc, run_id))

    @app.post("/v1/runs/{run_id}/cancel")
    async def cancel_run(run_id: str, svc: Service, identity: Admin) -> RunView:
        _run_of(svc, run_id)
        run = await svc.change(lambda now: svc.coordinator.cancel_run(run_id))
        svc.audit("cancel_run", identity.name, run=run_id)
        return svc.view(run)

    @app.get("/v1/whoami")
    async def whoami(identity: Caller) -> dict[str, str | None]:
        """Who the credential says the caller is (a node checks it matches the data it serves)."""
        return {"role": identity.role, "hospital": identity.hospital}

    @app.get("/v1/tasks/next", response_model=TaskMessage, responses={204: {"description": "no task yet"}})
    async def next_task(svc: Service, hospital: Hospital, node: NodeId,
                        wait: Annotated[float, Query(ge=0, le=300)] = 0.0) -> Any:
        task = await svc.next_task(hospital, node, wait)
        return Response(status_code=204) if task is None else task

    @app.get("/v1/runs/{run_id}/rounds/{round_number}/weights")
    async def round_weights(run_id: str, round_number: int, request: Request, svc: Service,
                            identity: Caller) -> Response:
        try:
            return Response(svc.weights(run_id, round_number, identity), media_type=SAFETENSORS_MEDIA_TYPE)
        except Forbidden as error:
            raise await _refusal(svc, request, error, identity.name) from None

    @app.post("/v1/tasks/{task_id}/heartbeat")
    async def heartbeat(task_id: str, request: Request, svc: Service, hospital: Hospital,
                        node: NodeId) -> LeaseMessage:
        try:
            task = await svc.change(lambda now: svc.coordinator.heartbeat(task_id, hospital, node, now))
        except (NotFound, Forbidden, Conflict) as error:
            raise await _refusal(svc, request, error, hospital) from None
        return LeaseMessage(task_id=task.id, lease_expires=task.lease_expires)

    @app.post("/v1/tasks/{task_id}/result")
    async def submit_result(task_id: str, request: Request, svc: Service, hospital: Hospital, node: NodeId) -> Any:
        owned = svc.coordinator.tasks.get(task_id)
        if owned is None or owned.hospital != hospital:  # before reading the body: another's task is not ours
            raise await _refusal(svc, request, svc.coordinator.unknown_task(task_id, hospital) if owned is None
                                 else Forbidden(f"task {task_id} belongs to another hospital"), hospital)
        kind = owned.kind.value  # accepted and rejected results are counted from the coordinator's events
        try:  # the body's size is bounded by `BodyLimit`
            if owned.kind is TaskKind.fit:
                result = await svc.receive_result(owned, request.stream())
            else:
                result = decode_result(await request.body())
        except MessageError as error:
            svc.metrics.results.labels(kind, "unreadable").inc()
            return JSONResponse({"detail": str(error), "reason": "unreadable"}, status_code=422)
        try:
            task = await svc.submit(owned, hospital, node, result)
        except Rejected as error:
            return JSONResponse({"detail": str(error), "reason": error.reason}, status_code=422)
        except (NotFound, Forbidden, Conflict) as error:
            svc.metrics.results.labels(kind, "refused").inc()
            raise await _refusal(svc, request, error, hospital) from None
        return ResultReceipt(task_id=task.id, round=task.round, run_round=svc.coordinator.runs[task.run_id].round)

    return BodyLimit(app, lambda path: body_limit(path, max_result_bytes))


def create_ops_app(api: BodyLimit) -> FastAPI:
    """The operations port's app: liveness and readiness for the kubelet, metrics for Prometheus. It carries no
    credential and holds every hospital's model metrics, so it is plain HTTP on its own port, which only the
    monitoring stack and the kubelet may reach (k8s/06-autoscaling-ingress.yaml); hospitals reach the API only.
    """
    ops = FastAPI(title="Health MLOps aggregator operations", version="1", docs_url=None, redoc_url=None,
                  openapi_url=None)

    @ops.get("/healthz", response_class=PlainTextResponse)
    async def healthz() -> str:
        return "ok"

    @ops.get("/readyz", response_class=PlainTextResponse)
    async def readyz() -> Response:
        if getattr(api.state, "service", None) is None:
            return PlainTextResponse("the aggregator is still loading its checkpoint", status_code=503)
        if api.state.ticker.done():  # deadlines would no longer be applied
            return PlainTextResponse("the deadline ticker has stopped", status_code=503)
        return PlainTextResponse("ready")

    @ops.get("/metrics")
    async def metrics() -> Response:
        service: AggregatorService | None = getattr(api.state, "service", None)
        if service is None:
            return PlainTextResponse("the aggregator is still loading its checkpoint", status_code=503)
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return ops


def serve(spec: DatasetSpec, models_dir: Path, credentials_dir: Path, *, host: str, port: int, ops_port: int,
          plain_http: bool, registry_factory: Callable[[], Registry], quality_gate_tolerance: float,
          audit: AuditLog) -> None:
    """Run the aggregator until SIGINT/SIGTERM (what `health-mlops aggregator` and its container run): the API
    on `port` over mutual TLS (plain HTTP if `plain_http`), health and metrics on `ops_port`."""
    # Everything that can be wrong with the folders fails now, with the file named, not per request.
    gatekeeper = Gatekeeper(credentials_dir, require_certificate=not plain_http)
    tls = None if plain_http else server_context(cert_path(credentials_dir, SERVER), key_path(credentials_dir, SERVER),
                                                 client_ca=cert_path(credentials_dir, CA))
    store = CheckpointStore(models_dir)
    store.lock()  # one aggregator per models directory
    restore_coordinator(store, spec)  # likewise: an unusable checkpoint stops the start with its path named
    from health_mlops.fl.publish import Publisher

    if plain_http:
        log.warning("serving the API over plain HTTP: tokens travel in the clear and no client certificate is "
                    "checked; for loopback experiments only")
    publisher = Publisher(registry_factory, store, quality_gate_tolerance)
    app = create_app(lambda: AggregatorService(spec, store, gatekeeper, publisher=publisher, audit=audit))
    with BackgroundServer(create_ops_app(app), host=host, port=ops_port):
        uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=2,
                    **protocol_options(tls))
