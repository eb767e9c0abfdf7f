"""The aggregator as a process: the operations port (probes and metrics) and `serve`, what `health-mlops
aggregator` and its container run."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import uvicorn
from fastapi import FastAPI, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from health_mlops.fl.aggregator.routes import create_app
from health_mlops.fl.aggregator.service import AggregatorService, restore_coordinator
from health_mlops.fl.store import CheckpointStore
from health_mlops.spec import DatasetSpec
from health_mlops.trust.audit import AuditLog
from health_mlops.trust.credentials import Gatekeeper
from health_mlops.trust.pki import CA, CRL_FILE_NAME, SERVER, cert_path, key_path
from health_mlops.trust.tls import count_refused_handshakes, follow_crl, server_context
from health_mlops.web.edge import BodyLimit
from health_mlops.web.server import BackgroundServer, protocol_options

if TYPE_CHECKING:  # MLflow is imported only by an aggregator that registers models
    from health_mlops.registry import QualityGate, Registry

log = logging.getLogger("health_mlops.aggregator")


class _StoppingServer(uvicorn.Server):
    """uvicorn's server that, told to stop, first answers the nodes' waiting long polls: otherwise they hold the
    stop for the whole grace period and uvicorn cancels them with an ERROR, on every clean stop."""

    def __init__(self, config: uvicorn.Config, on_stop: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_stop = on_stop

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._on_stop()
        await super().shutdown(sockets)


def create_ops_app(api: BodyLimit, api_listening: Callable[[], bool]) -> FastAPI:
    """The operations port's app: liveness and readiness for the kubelet, metrics for Prometheus. It carries no
    credential and holds every hospital's model metrics, so it is plain HTTP on its own port, which only the
    monitoring stack and the kubelet may reach (k8s/06-autoscaling-ingress.yaml); hospitals reach the API only.
    Ready means the API accepts connections: uvicorn runs the app's startup (the checkpoint loaded) before it
    opens its socket, and a client sent there in between is refused.
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
        if not api_listening():
            return PlainTextResponse("the API is not yet accepting connections", status_code=503)
        return PlainTextResponse("ready")

    @ops.get("/metrics")
    async def metrics() -> Response:
        service: AggregatorService | None = getattr(api.state, "service", None)
        if service is None:
            return PlainTextResponse("the aggregator is still loading its checkpoint", status_code=503)
        if service.reporting.audit_log is not None:
            service.metrics.audit_sequence.set(await run_in_threadpool(service.reporting.audit_log.head))
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return ops


def serve(spec: DatasetSpec, models_dir: Path, credentials_dir: Path, *, host: str, port: int, ops_port: int,
          plain_http: bool, registry_factory: Callable[[], Registry], quality_gate: QualityGate,
          audit: AuditLog) -> None:
    """Run the aggregator until SIGINT/SIGTERM (what `health-mlops aggregator` and its container run): the API
    on `port` over mutual TLS (plain HTTP if `plain_http`), health and metrics on `ops_port`."""
    # Everything that can be wrong with the folders fails now, with the file named, not per request.
    gatekeeper = Gatekeeper(credentials_dir, require_certificate=not plain_http)
    crl = credentials_dir / CRL_FILE_NAME
    tls = None if plain_http else server_context(cert_path(credentials_dir, SERVER), key_path(credentials_dir, SERVER),
                                                 client_ca=cert_path(credentials_dir, CA), crl=crl)
    services: list[AggregatorService] = []  # the one the app builds in its event loop
    if tls is not None:
        follow_crl(tls, crl)  # a daemon thread, for the life of the process

        def count_refused(reason: str) -> None:
            for running in services[-1:]:
                running.metrics.handshakes_refused.labels(reason).inc()

        count_refused_handshakes(tls, count_refused)
    store = CheckpointStore(models_dir)
    store.lock()  # one aggregator per models directory
    restore_coordinator(store, spec)  # likewise: an unusable checkpoint stops the start with its path named
    from health_mlops.fl.publish import Publisher

    if plain_http:
        log.warning("serving the API over plain HTTP: tokens travel in the clear and no client certificate is "
                    "checked; for loopback experiments only")
    publisher = Publisher(registry_factory, store, quality_gate)

    def service() -> AggregatorService:
        services.append(AggregatorService(spec, store, gatekeeper, publisher=publisher, audit=audit))
        return services[-1]

    app = create_app(service)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=2,
                            **protocol_options(tls))
    def stop_waiting() -> None:
        for running in services:
            running.stop_waiting()

    server = _StoppingServer(config, on_stop=stop_waiting)
    with BackgroundServer(create_ops_app(app, api_listening=lambda: server.started), host=host, port=ops_port):
        server.run()
