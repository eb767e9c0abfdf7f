"""The dashboard process: the REST API and, at `/`, the Gradio dashboard, over one predictor and registry."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import gradio as gr
from fastapi import FastAPI

from health_mlops.config import Settings, settings_audit_log
from health_mlops.monitoring import ServingMetrics
from health_mlops.registry import Registry
from health_mlops.serving.access_edge import (LOGIN_PATH, MAX_LOGIN_BYTES, UPLOAD_PATH, USER_SCOPE_KEY,
                                              SessionGate)
from health_mlops.serving.api import create_serving_app
from health_mlops.serving.model import ChampionWatcher
from health_mlops.serving.predictor import Predictor
from health_mlops.serving.sources import DashboardSources
from health_mlops.serving.ui import Dashboard, build_dashboard, function_rules
from health_mlops.spec import DatasetSpec
from health_mlops.trust.access import Accounts, SessionStore
from health_mlops.trust.credentials import Reloading, admin_credential
from health_mlops.web.edge import KIB, MIB, BlockedPaths, BodyLimit


# What a request body may hold: one patient, a batch up to the row limit (about 320 bytes a row), a CSV upload
# of the same size; anything else (Gradio's queue messages) 1 MiB.
MAX_PREDICT_BYTES = 64 * KIB
MAX_BATCH_BYTES = 64 * MIB
MAX_OTHER_BYTES = 1 * MIB
# Gradio routes the dashboard does not use (its UI talks over the queue, uploads and file routes): developer
# reload and "vibe" editing, the URL proxy, run history, screen recording, custom components, media streams,
# its own monitoring page, its login (`/login/`: ours is `/login`, answered by the session gate), its component
# server (none of our components has one), and the programmatic call routes (one answers 500 to an empty body):
# every Gradio function runs through the queue, where the session gate checks the caller's role. Each is in the
# authorization matrix as 404.
BLOCKED_GRADIO_PATHS = ("/gradio_api/dev/", "/gradio_api/vibe-", "/gradio_api/undo-vibe-edit", "/gradio_api/proxy=",
                        "/gradio_api/run-history/", "/gradio_api/runs", "/gradio_api/process_recording",
                        "/gradio_api/custom_component/", "/gradio_api/stream/", "/gradio_api/call/",
                        "/gradio_api/api/", "/gradio_api/run/", "/gradio_api/component_server", "/monitoring",
                        "/login/")


def dashboard_body_limit(path: str) -> int:
    if path == LOGIN_PATH:
        return MAX_LOGIN_BYTES
    if path == "/api/v1/predict":
        return MAX_PREDICT_BYTES
    if path in ("/api/v1/predict/batch", UPLOAD_PATH):
        return MAX_BATCH_BYTES
    return MAX_OTHER_BYTES


def scratch_folder(settings: Settings) -> Path:
    """This dashboard process's private folder (0700) for uploaded files and batch results: patient rows."""
    folder = settings.home / "scratch" / f"dashboard-{os.getpid()}"
    folder.mkdir(parents=True, mode=0o700)
    return folder


def create_dashboard_app(settings: Settings, spec: DatasetSpec, *, poll_s: float) -> BlockedPaths:
    """The dashboard behind its byte limits and its session gate (`serving/access_edge.py`). Uploads and batch
    results go to a private scratch folder, which is removed when the app stops (Gradio's own sweep removes an
    upload an hour after it arrived). Without a readable accounts file it does not start: it has no open mode."""
    accounts = Reloading(settings.dashboard_accounts, Accounts.load, Accounts.load(settings.dashboard_accounts))
    scratch = scratch_folder(settings)
    # Gradio reads its upload folder from the environment each time it stores a file; this process is the
    # dashboard, so setting it here points every upload into the private folder.
    os.environ["GRADIO_TEMP_DIR"] = str(scratch / "uploads")
    registry = Registry(settings.home, spec.name, audit=settings_audit_log(settings))
    # Its own registry client (it polls from a thread), with the audit key: it checks each champion's attestation.
    watcher = ChampionWatcher(Registry(settings.home, spec.name, audit=settings_audit_log(settings)), poll_s=poll_s)
    metrics = ServingMetrics()  # the predictions' and the session gate's
    predictor = Predictor(spec, watcher, metrics)
    app = create_serving_app(spec, watcher, predictor=predictor)
    sources = DashboardSources(registry, spec.primary_metric, settings.aggregator_url,
                               admin_credential(settings.admin_token, settings.credentials_dir))
    links = {name: url for name, url in (("MLflow", settings.mlflow_ui_url), ("Prometheus", settings.prometheus_url))
             if url}
    dashboard = Dashboard(spec, predictor, registry, sources, lambda user: accounts.get().role_of(user),
                          scratch=scratch / "results", links=links, node_links=settings.node_status_urls)
    with suppress(Exception):  # the champion now, if any, so the Predict form starts at a typical patient
        watcher.refresh()
    blocks = build_dashboard(dashboard, refresh_s=poll_s)
    # Gradio checks the files an event names (an input must be one of this server's uploads; an output must lie in
    # `allowed_paths`) in `processing_utils._check_allowed`, which skips both checks for an app that has not
    # "launched", and mounting never sets that flag: an event naming a file on this host had it read. Mounted is
    # launched here. Outputs come from the private results folder (each batch's in a folder of its own with an
    # unguessable name: Gradio's file route serves `allowed_paths` to whoever names the file); the credentials are
    # blocked even where Gradio allows by default (the working directory, the system's temporary folder).
    # Gradio's own checks see the user the session gate let in (its routes then refuse a request without one).
    # No footer: its "Use via API" and "Settings" are not for a clinician (the programmatic routes are blocked).
    mounted = gr.mount_gradio_app(app, blocks, path="/", max_file_size=MAX_BATCH_BYTES, footer_links=[],
                                  allowed_paths=[str(scratch / "results")],
                                  blocked_paths=[str(settings.credentials_dir)],
                                  auth_dependency=lambda request: request.scope.get(USER_SCOPE_KEY))
    blocks.has_launched = True
    rules = function_rules(blocks)
    gradio_lifespan = mounted.router.lifespan_context

    @asynccontextmanager
    async def lifespan(served: FastAPI) -> AsyncIterator[None]:
        try:
            async with gradio_lifespan(served):
                yield
        finally:
            sources.close()
            shutil.rmtree(scratch, ignore_errors=True)

    mounted.router.lifespan_context = lifespan
    gate = SessionGate(mounted, accounts=accounts.get, sessions=SessionStore(60 * settings.session_idle_minutes),
                       function_rules=lambda: rules, audit=registry.audit, metrics=metrics,
                       secure_cookie=settings.session_cookie_secure)
    return BlockedPaths(BodyLimit(gate, dashboard_body_limit), BLOCKED_GRADIO_PATHS)
