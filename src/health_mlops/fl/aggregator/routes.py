"""DESIGN.md's `/v1` API over the service, and how the coordinator's refusals become HTTP answers: one
exception handler per kind of refusal, so no route maps errors itself."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any, BinaryIO

from fastapi import FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi_offline import FastAPIOffline  # /docs from packaged Swagger UI assets, no CDN
from pydantic import ValidationError

from health_mlops.fl.aggregator.dependencies import Admin, Caller, Hospital, NodeId, Service, refuse
from health_mlops.fl.aggregator.service import AggregatorService
from health_mlops.fl.errors import Conflict, Forbidden, Invalid, NotFound, Rejected
from health_mlops.fl.messages import (SAFETENSORS_MEDIA_TYPE, AdvertisedKeys, LeaseMessage, MessageError,
                                      ResultReceipt, RunRequest, RunView, SecureRefusal, SecureReveal, SecureRoundView,
                                      SecureShares, SignedSurvivors, TaskMessage)
from health_mlops.fl.secure_round import SecurePhase
from health_mlops.web.edge import KIB, BodyLimit
from health_mlops.web.errors import install_validation_handler

log = logging.getLogger("health_mlops.aggregator")

# A result is one model's weights; far beyond any model this task trains, small enough to refuse abuse.
DEFAULT_MAX_RESULT_BYTES = 64 * 1024 * 1024
MAX_RUN_REQUEST_BYTES = 64 * KIB  # a run's config and hospital list
MAX_SECURE_BODY_BYTES = 4 * 1024 * KIB  # secure aggregation's keys, shares and reveals: a few KiB per hospital
MAX_OTHER_BODY_BYTES = 1 * KIB  # heartbeat and cancel take no body


# Weights are sent a piece at a time, each once the connection has taken the one before: 50 hospitals downloading
# a large model at once hold 50 pieces in the aggregator's send buffers, not 50 models.
PIECE_BYTES = 256 * KIB


async def _pieces(body: memoryview | BinaryIO) -> AsyncIterator[bytes | memoryview]:
    """A body in PIECE_BYTES pieces: from memory, or read from an open file (closed at the end). The file was
    written moments ago, so a piece comes from the page cache in tens of microseconds: read in the loop, as
    result bodies are written, rather than paying a thread hop per piece."""
    if isinstance(body, memoryview):
        for start in range(0, len(body), PIECE_BYTES):
            yield body[start:start + PIECE_BYTES]
        return
    with body:
        while piece := body.read(PIECE_BYTES):
            yield piece


def body_limit(path: str, max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES) -> int:
    """The most bytes a request body to `path` may hold."""
    if path.startswith("/v1/tasks/") and path.endswith("/result"):
        return max_result_bytes
    if path.startswith("/v1/tasks/") and "/secure/" in path:
        return MAX_SECURE_BODY_BYTES
    return MAX_RUN_REQUEST_BYTES if path == "/v1/runs" else MAX_OTHER_BODY_BYTES


def install_refusal_handlers(app: FastAPI) -> None:
    """The coordinator's refusals as answers. One that touches another hospital's task or a run the caller is
    not enrolled in (Forbidden) is refused like a bad credential: audited, counted, slowed down."""

    @app.exception_handler(NotFound)
    async def not_found(request: Request, error: NotFound) -> Response:
        return JSONResponse({"detail": str(error)}, status_code=404)

    @app.exception_handler(Forbidden)
    async def forbidden(request: Request, error: Forbidden) -> Response:
        refused = await refuse(request.app.state.service, request, 403, str(error),
                               getattr(request.state, "actor", None))
        return JSONResponse({"detail": refused.detail}, status_code=refused.status_code)

    @app.exception_handler(Conflict)
    async def conflict(request: Request, error: Conflict) -> Response:
        return JSONResponse({"detail": str(error)}, status_code=409)

    @app.exception_handler(Rejected)
    async def rejected(request: Request, error: Rejected) -> Response:
        return JSONResponse({"detail": str(error), "reason": error.reason}, status_code=422)

    @app.exception_handler(MessageError)
    async def unreadable(request: Request, error: MessageError) -> Response:
        return JSONResponse({"detail": str(error), "reason": "unreadable"}, status_code=422)

    @app.exception_handler(Invalid)
    async def invalid(request: Request, error: Invalid) -> Response:
        return JSONResponse({"detail": str(error)}, status_code=422)


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

    app = FastAPIOffline(title="Health MLOps aggregator", version="1", redoc_url=None, lifespan=lifespan)
    install_validation_handler(app)
    install_refusal_handlers(app)

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
        svc.reporting.audit("start_run", identity.name, run=run.id, hospitals=run.hospitals,
                            config=run.config.model_dump())
        return svc.view(run)

    @app.get("/v1/runs")
    async def list_runs(svc: Service, _: Admin) -> list[RunView]:
        return [svc.view(r) for r in svc.coordinator.runs.values()]

    @app.get("/v1/runs/{run_id}")
    async def get_run(run_id: str, svc: Service, _: Admin) -> RunView:
        return svc.view(svc.run(run_id))

    @app.post("/v1/runs/{run_id}/cancel")
    async def cancel_run(run_id: str, svc: Service, identity: Admin) -> RunView:
        svc.run(run_id)
        run = await svc.change(lambda now: svc.coordinator.cancel_run(run_id))
        svc.reporting.audit("cancel_run", identity.name, run=run_id)
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
    async def round_weights(run_id: str, round_number: int, svc: Service, identity: Caller) -> Response:
        body = svc.weights(run_id, round_number, identity)
        size = len(body) if isinstance(body, memoryview) else os.fstat(body.fileno()).st_size
        return StreamingResponse(_pieces(body), media_type=SAFETENSORS_MEDIA_TYPE,
                                 headers={"content-length": str(size)})

    @app.post("/v1/tasks/{task_id}/heartbeat")
    async def heartbeat(task_id: str, svc: Service, hospital: Hospital, node: NodeId) -> LeaseMessage:
        task = await svc.change(lambda now: svc.coordinator.heartbeat(task_id, hospital, node, now))
        return LeaseMessage(task_id=task.id, lease_expires=task.lease_expires)

    @app.post("/v1/tasks/{task_id}/result")
    async def submit_result(task_id: str, request: Request, svc: Service, hospital: Hospital,
                            node: NodeId) -> ResultReceipt:
        held = svc.held_task(task_id, hospital)  # before reading the body: another's task is not ours
        result = await svc.read_result(held, request.stream())  # its size bounded by `BodyLimit`
        task = await svc.submit(held, hospital, node, result)
        return ResultReceipt(task_id=task.id, round=task.round, run_round=svc.coordinator.runs[task.run_id].round)

    @app.get("/v1/tasks/{task_id}/secure", response_model=SecureRoundView)
    async def secure_round(task_id: str, svc: Service, hospital: Hospital, node: NodeId,
                           after: SecurePhase | None = None,
                           wait: Annotated[float, Query(ge=0, le=300)] = 0.0) -> Any:
        """The secure round of a task, for the replica holding it; with `after`, waits up to `wait` seconds for
        the round to leave that phase."""
        return await svc.secure_view(task_id, hospital, node, after, wait)

    async def secure_step(svc: AggregatorService, step: Callable[[float], None]) -> Response:
        await svc.change(step, checkpoint=True)  # a phase's answers survive a restart
        return Response(status_code=204)

    @app.post("/v1/tasks/{task_id}/secure/keys", status_code=204)
    async def secure_keys(task_id: str, body: AdvertisedKeys, svc: Service, hospital: Hospital,
                          node: NodeId) -> Response:
        advertisement = body.advertisement(hospital)
        return await secure_step(svc, lambda now: svc.coordinator.secure_steps.keys(
            task_id, hospital, node, advertisement, body.certificate, now))

    @app.post("/v1/tasks/{task_id}/secure/shares", status_code=204)
    async def secure_shares(task_id: str, body: SecureShares, svc: Service, hospital: Hospital,
                            node: NodeId) -> Response:
        shares = body.encrypted(hospital)
        return await secure_step(svc, lambda now: svc.coordinator.secure_steps.shares(
            task_id, hospital, node, shares, now))

    @app.post("/v1/tasks/{task_id}/secure/consistency", status_code=204)
    async def secure_consistency(task_id: str, body: SignedSurvivors, svc: Service, hospital: Hospital,
                                 node: NodeId) -> Response:
        signature = body.signed()
        return await secure_step(svc, lambda now: svc.coordinator.secure_steps.consistency(
            task_id, hospital, node, signature, now))

    @app.post("/v1/tasks/{task_id}/secure/refuse", status_code=204)
    async def secure_refuse(task_id: str, body: SecureRefusal, svc: Service, hospital: Hospital,
                            node: NodeId) -> Response:
        answer = await secure_step(svc, lambda now: svc.coordinator.secure_steps.refuse(
            task_id, hospital, node, body.reason, now))
        log.warning("%s refused the secure round of %s: %r", hospital, task_id, body.reason)  # tampering shows here
        return answer

    @app.post("/v1/tasks/{task_id}/secure/reveal", status_code=204)
    async def secure_reveal(task_id: str, body: SecureReveal, svc: Service, hospital: Hospital,
                            node: NodeId) -> Response:
        reveal = body.reveal(hospital)
        return await secure_step(svc, lambda now: svc.coordinator.secure_steps.reveal(
            task_id, hospital, node, reveal, now))

    return BodyLimit(app, lambda path: body_limit(path, max_result_bytes))
