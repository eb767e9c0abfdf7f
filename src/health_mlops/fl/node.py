"""A hospital node: dials out to the aggregator, does each task on the hospital's own rows, sends back only
aggregates and model weights.

The worker long-polls `GET /v1/tasks/next`, keeps the task's lease alive with heartbeats while it computes,
and submits the result. It never crashes on the aggregator being away (it backs off and retries) and treats
a refused result (409: the lease was lost, 422: the update was invalid) as the end of that task. The node
API (`/healthz`, `/readyz`, `/v1/status`) lets the hospital's IT team see what the node is doing and what
left the hospital: anyone who reaches it sees a summary; what was sent, request by request (the round-0 sums,
sums of squares and histograms in them), only whoever presents the hospital's own token.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import PlainTextResponse
from fastapi_offline import FastAPIOffline  # /docs from packaged Swagger UI assets, no CDN
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from health_mlops.data.hospital import HospitalData
from health_mlops.data.split import split_frame
from health_mlops.errors import CredentialError
from health_mlops.fl.client import HospitalClient
from health_mlops.fl.hospital import HospitalWorker
from health_mlops.fl.messages import TaskMessage, decode_weights, describe_result, encode_result
from health_mlops.fl.metadata import StatsMetadata
from health_mlops.fl.secagg import SecAggError
from health_mlops.fl.secure_fit import ConsortiumIdentity, ParticipationPolicy, SecureFitSession
from health_mlops.fl.state import TaskKind, TaskResult
from health_mlops.fl.stats import suppressed_cells
from health_mlops.fl.strategies import Weights
from health_mlops.monitoring import NodeMetrics
from health_mlops.spec import DatasetSpec
from health_mlops.trust.credentials import ClientCredential
from health_mlops.web.server import BackgroundServer, protocol_options

log = logging.getLogger("health_mlops.node")

# Back-off while the aggregator cannot be reached: start small (a restart takes a second), cap it.
_BACKOFF_START_S = 0.2
_BACKOFF_MAX_S = 5.0
# Requests kept in the status's list of what left the hospital: a whole 20-round run is a few hundred.
SENT_LOG_LIMIT = 5000


class IdentityMismatch(CredentialError):
    """The node's credential belongs to another hospital than its data."""


class SentLog:
    """Every request the node sent to the aggregator (the hospital's outbound traffic), newest last: method, path,
    header names, body size, and for a result what its body holds (tensor shapes, metadata). Kept for the last
    `limit` requests, with running totals; written by the worker and heartbeat threads."""

    def __init__(self, limit: int = SENT_LOG_LIMIT) -> None:
        self._entries: deque[dict[str, Any]] = deque(maxlen=limit)
        self._lock = threading.Lock()
        self.requests = 0
        self.body_bytes = 0

    def record(self, request: httpx.Request) -> None:
        body = request.content
        entry: dict[str, Any] = {"at": time.time(), "method": request.method,
                                 "path": request.url.raw_path.decode("ascii"),
                                 "headers": sorted(request.headers.keys()), "body_bytes": len(body)}
        if body:
            entry["content"] = describe_result(body)  # the header only: no tensor is copied
        with self._lock:
            self._entries.append(entry)
            self.requests += 1
            self.body_bytes += len(body)

    def view(self) -> dict[str, Any]:
        with self._lock:
            return {"requests": self.requests, "body_bytes": self.body_bytes, "kept": len(self._entries),
                    "log": list(self._entries)}


@dataclass
class NodeStatus:
    """What `/v1/status` shows; updated by the worker thread, read by the API."""

    central_reachable: bool = False
    last_contact: float | None = None
    last_task: dict[str, Any] | None = None
    current_task: str | None = None
    fatal: str | None = None  # why the worker stopped for good (a credential for another hospital)
    outcomes: dict[str, int] = field(default_factory=dict)
    sent: dict[str, int] = field(default_factory=dict)  # results accepted, by kind
    suppressed: dict[str, Any] | None = None  # cells the last stats result withheld as too small
    transmissions: SentLog = field(default_factory=SentLog)


class HospitalNode:
    def __init__(self, *, data: HospitalData, spec: DatasetSpec, node_id: str, city: str, central_url: str,
                 credential: ClientCredential, split_seed: int, test_fraction: float, stratify: bool = True,
                 poll_wait_s: float = 20.0, policy: ParticipationPolicy | None = None,
                 metrics: NodeMetrics | None = None) -> None:
        self.hospital_id = data.hospital_id
        self.policy = policy or ParticipationPolicy()
        self.node_id = node_id
        self.city = city
        self.central_url = central_url
        self.data = data
        self.poll_wait_s = poll_wait_s
        train, test = split_frame(data.frame, spec, data.hospital_id, seed=split_seed, test_fraction=test_fraction,
                                  stratify=stratify)
        self.worker = HospitalWorker(data.hospital_id, spec, data.frame.iloc[train].reset_index(drop=True),
                                     data.frame.iloc[test].reset_index(drop=True),
                                     rows_quarantined=data.rows_quarantined)
        if self.worker.train.empty:
            log.warning("%s/%s: no valid training rows (%d quarantined): the aggregator will leave this hospital "
                        "out of runs; see the data quality report", data.hospital_id, node_id, data.rows_quarantined)
        self.metrics = metrics or NodeMetrics(data.hospital_id, node_id, city)
        self.metrics.data_rows.labels(self.hospital_id, "valid").set(data.rows_valid)
        self.metrics.data_rows.labels(self.hospital_id, "quarantined").set(data.rows_quarantined)
        self.status = NodeStatus()
        self._credential = credential
        self._client = HospitalClient(central_url, credential, node_id=node_id, poll_wait_s=poll_wait_s,
                                      on_request=self.status.transmissions.record,
                                      on_response=lambda _: self._reachable())
        self._weights: tuple[tuple[str, int], Weights] | None = None  # the last round's weights, by (run, round)
        self._lease_renewed = time.monotonic()  # when the current task's lease was last granted or renewed

    # --- the worker loop ------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Poll for tasks and do them until `stop` is set. Only a credential for another hospital ends it."""
        backoff = _BACKOFF_START_S
        checked_identity = False
        while not stop.is_set():
            try:
                if not checked_identity:
                    self.check_identity()
                    checked_identity = True
                task = self.poll()
            except IdentityMismatch as error:
                log.error("%s/%s: %s", self.hospital_id, self.node_id, error)
                self.status.fatal = str(error)
                return
            except httpx.TransportError as error:
                self._unreachable(error)
                stop.wait(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX_S)
                continue
            except Exception as error:  # an answer we cannot use: say so, wait, and keep serving
                detail = _detail(error.response) if isinstance(error, httpx.HTTPStatusError) else repr(error)
                log.error("%s/%s: cannot use the aggregator's answer: %s", self.hospital_id, self.node_id, detail)
                stop.wait(_BACKOFF_MAX_S)
                continue
            backoff = _BACKOFF_START_S
            if task is not None:
                self.work(task)

    def check_identity(self) -> None:
        """Refuse to serve this hospital's data under another hospital's credential. A 401 is not final (the
        aggregator may not have read a newly provisioned credential yet); a 403 is: token and certificate
        belong to different holders."""
        try:
            hospital = self._client.whoami()
        except httpx.HTTPStatusError as error:
            if error.response.status_code == 403:
                raise IdentityMismatch(f"the aggregator refuses this node's credential: {_detail(error.response)}; "
                                       f"give it {self.hospital_id}'s token and certificate") from None
            raise
        if hospital != self.hospital_id:
            raise IdentityMismatch(f"this node serves {self.hospital_id}'s data but its credential is "
                                   f"{hospital or 'the admin'}'s; give it {self.hospital_id}'s token")

    def close(self) -> None:
        self._client.close()

    def poll(self) -> TaskMessage | None:
        return self._client.next_task()

    def work(self, task: TaskMessage) -> str:
        """Do one task and submit its result; returns the outcome (also counted in metrics and status)."""
        self.status.current_task = task.id
        started = time.time()
        self._lease_renewed = time.monotonic()
        outcome = "failed"
        secure: SecureFitSession | None = None
        try:
            if (refusal := self.policy.refusal(task)) is not None:  # before anything is downloaded or computed
                raise SecAggError(refusal)
            weights = self._round_weights(task)
            with _Heartbeat(self, task):
                if task.kind is TaskKind.fit and task.config.secure_aggregation:
                    secure = SecureFitSession(self._client, ConsortiumIdentity.of(self._credential),
                                              self.hospital_id, task, self.policy)
                    secure.start(weights)  # keys, shares and masks while it trains
                result = self.worker.handle(task.kind, task.config, weights, task.preprocessing, task.round)
                if secure is not None:
                    result.tensors = secure.masked(result.tensors, weights, result.metadata["num_examples"],
                                                   task.config.update_norm_bound)
                    if secure.clipped:
                        log.info("%s/%s: %s: update clipped to the norm bound %g before masking", self.hospital_id,
                                 self.node_id, task.id, task.config.update_norm_bound)
            self.metrics.task_duration.labels(self.hospital_id, task.kind.value).observe(
                result.metadata["compute_seconds"])
            if task.kind is TaskKind.stats:
                self._report_suppression(task, result)
            outcome = self._submit(task, result)
            if secure is not None and outcome == "succeeded":
                secure.reveal()
        except httpx.TransportError as error:
            self._unreachable(error)
            outcome = "unreachable"
        except httpx.HTTPStatusError as error:
            log.warning("%s/%s: %s: %s", self.hospital_id, self.node_id, task.id, _detail(error.response))
        except SecAggError as error:  # what the aggregator asked or passed on does not check out: nothing is sent
            log.error("%s/%s: %s: refused the task: %s", self.hospital_id, self.node_id, task.id, error)
            if secure is not None:
                secure.refuse(error)
            outcome = "refused"
        except Exception:  # a bad task or a failure in local compute ends this task, not the node
            log.exception("%s/%s: %s failed", self.hospital_id, self.node_id, task.id)
        finally:
            self.status.current_task = None
            self.status.outcomes[outcome] = self.status.outcomes.get(outcome, 0) + 1
            self.status.last_task = {"id": task.id, "run_id": task.run_id, "round": task.round,
                                     "kind": task.kind.value, "outcome": outcome, "started_at": started,
                                     "finished_at": time.time()}
            self.metrics.tasks.labels(self.hospital_id, task.kind.value, outcome).inc()
            self.metrics.last_task_timestamp.labels(self.hospital_id).set(time.time())
        log.info("%s/%s: %s %s round %d: %s", self.hospital_id, self.node_id, task.run_id, task.kind.value,
                 task.round, outcome)
        return outcome

    def _report_suppression(self, task: TaskMessage, result: TaskResult) -> None:
        cells = suppressed_cells(StatsMetadata.model_validate(result.metadata))
        self.status.suppressed = {"run_id": task.run_id, **cells}
        log.info("%s/%s: %s stats withhold %d categories and %d histogram bins held by fewer than %d patients",
                 self.hospital_id, self.node_id, task.run_id, cells["categories"], cells["histogram_bins"],
                 self.worker.small_cell_threshold)

    def _round_weights(self, task: TaskMessage) -> Weights:
        if task.weights_path is None:
            return {}
        key = (task.run_id, task.round)
        if self._weights is None or self._weights[0] != key:
            self._weights = (key, decode_weights(self._client.weights(task.weights_path))[0])
        return self._weights[1]

    def _submit(self, task: TaskMessage, result: TaskResult) -> str:
        """Post the result; retried while the aggregator is unreachable and the lease may still be valid."""
        body = encode_result(result, task.id)
        backoff = _BACKOFF_START_S
        while True:
            try:
                response = self._client.submit_result(task.id, body)
                break
            except httpx.TransportError as error:
                self._unreachable(error)
                if time.monotonic() > self._lease_renewed + 2 * task.lease_s:
                    return "unreachable"  # the task has surely been handed to another replica by now
                time.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX_S)
        if response.status_code == 200:
            self.status.sent[task.kind.value] = self.status.sent.get(task.kind.value, 0) + 1
            return "succeeded"
        if response.status_code == 409:
            log.info("%s/%s: %s: %s", self.hospital_id, self.node_id, task.id, _detail(response))
            return "conflict"
        if response.status_code == 422:
            log.warning("%s/%s: %s refused: %s", self.hospital_id, self.node_id, task.id, _detail(response))
            return "rejected"
        response.raise_for_status()
        return "failed"

    def _reachable(self) -> None:
        self.status.central_reachable = True
        self.status.last_contact = time.time()
        self.metrics.central_reachable.labels(self.hospital_id).set(1)

    def _unreachable(self, error: Exception) -> None:
        if self.status.central_reachable:
            log.warning("%s/%s: aggregator at %s unreachable: %s", self.hospital_id, self.node_id,
                        self.central_url, error)
        self.status.central_reachable = False
        self.metrics.central_reachable.labels(self.hospital_id).set(0)

    def heartbeat(self, task: TaskMessage) -> bool:
        """Renew the lease; False once it is lost (taken over, or the aggregator no longer knows the task)."""
        try:
            status = self._client.heartbeat(task.id)
        except httpx.TransportError as error:
            self._unreachable(error)
            return True  # keep trying: the aggregator may be restarting
        if status == 200:
            self._lease_renewed = time.monotonic()
            return True
        return status not in (403, 404, 409)  # anything else may pass: keep beating

    # --- what the node API shows ----------------------------------------------------------------------

    def owns(self, authorization: str | None) -> bool:
        """Whether `authorization` presents this hospital's own token (`Authorization: Bearer <token>`)."""
        scheme, _, token = (authorization or "").partition(" ")
        presented = hashlib.sha256(token.strip().encode()).digest()
        return scheme.lower() == "bearer" and hmac.compare_digest(
            presented, hashlib.sha256(self._credential.token.encode()).digest())

    def status_view(self, *, full: bool) -> dict[str, Any]:
        """What the node is doing; with `full` (the hospital's own operator), also every request it sent."""
        sent = self.status.transmissions.view()
        return {
            "hospital": self.hospital_id, "node": self.node_id, "city": self.city, "central_url": self.central_url,
            "central_reachable": self.status.central_reachable, "last_contact": self.status.last_contact,
            "current_task": self.status.current_task, "last_task": self.status.last_task,
            "fatal": self.status.fatal,
            "tasks_by_outcome": self.status.outcomes, "results_sent_by_kind": self.status.sent,
            "suppressed": self.status.suppressed,
            "sent": sent if full else {key: sent[key] for key in ("requests", "body_bytes")} | {
                "log": "present this hospital's token (Authorization: Bearer) to see each request"},
            "data": {"rows_valid": self.data.rows_valid, "rows_quarantined": self.data.rows_quarantined,
                     "rows_train": len(self.worker.train), "rows_test": len(self.worker.test),
                     "files": [{"file": r.file, "rows_read": r.rows_read, "rows_valid": r.rows_valid,
                                "rows_quarantined": r.rows_quarantined, "reasons": r.reasons}
                               for r in self.data.reports]},
            "leaves_the_hospital": "model weights, example counts, metrics on the local test split, and "
                                   "per-column counts/sums/sums of squares with small cells suppressed; "
                                   "`sent` lists every request",
        }


class _Heartbeat:
    """Renews a task's lease every third of its length while the task computes (a background thread)."""

    def __init__(self, node: HospitalNode, task: TaskMessage) -> None:
        self._node, self._task = node, task
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{task.id}", daemon=True)

    def _beat(self) -> None:
        while not self._done.wait(self._task.lease_s / 3):
            if not self._node.heartbeat(self._task):
                log.info("%s: lease lost while computing", self._task.id)
                return

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._done.set()
        self._thread.join()


def _detail(response: httpx.Response) -> str:
    try:
        return str(response.json().get("detail", response.text))
    except ValueError:
        return f"HTTP {response.status_code} {response.text[:200]}"


def create_node_app(node: HospitalNode, worker: threading.Thread) -> FastAPI:
    """The node API: health, readiness (data loaded and the worker running), status, metrics."""
    app = FastAPIOffline(title=f"Health MLOps node {node.hospital_id}/{node.node_id}", version="1", redoc_url=None)

    @app.get("/healthz", response_class=PlainTextResponse)
    async def healthz() -> str:
        return "ok"

    @app.get("/readyz", response_class=PlainTextResponse)
    async def readyz() -> Response:
        if not worker.is_alive():
            return PlainTextResponse(f"the worker has stopped: {node.status.fatal or 'see the log'}", status_code=503)
        return PlainTextResponse("ready")

    @app.get("/v1/status")
    async def status(request: Request) -> dict[str, Any]:
        return node.status_view(full=node.owns(request.headers.get("authorization")))

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(node.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def create_metrics_app(node: HospitalNode) -> FastAPI:
    """The metrics port: `/metrics` alone, for Prometheus."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(node.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def serve(node: HospitalNode, *, host: str, api_port: int, metrics_port: int) -> None:
    """Run the worker, the node API and the metrics endpoint until SIGINT/SIGTERM (what a node container runs).
    Both ports are served by the same guarded HTTP protocol as every other server (`web/server.py`)."""
    stop = threading.Event()
    worker = threading.Thread(target=node.run, args=(stop,), name="worker", daemon=True)
    worker.start()
    try:
        with BackgroundServer(create_metrics_app(node), host=host, port=metrics_port):
            uvicorn.run(create_node_app(node, worker), host=host, port=api_port, log_level="warning",
                        timeout_graceful_shutdown=2, **protocol_options(None))
    finally:
        stop.set()
        worker.join(timeout=2)  # a long poll in flight is abandoned; its lease, if any, expires
        node.close()
