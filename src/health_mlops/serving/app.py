"""The dashboard process: the REST API and, at `/`, the Gradio dashboard, over one predictor and registry."""

from __future__ import annotations

from contextlib import suppress

import gradio as gr

from health_mlops.config import Settings, settings_audit_log
from health_mlops.http_edge import KIB, MIB, BodyLimit
from health_mlops.monitoring import ServingMetrics
from health_mlops.registry import Registry
from health_mlops.security import admin_credential
from health_mlops.serving.api import create_serving_app
from health_mlops.serving.model import ChampionWatcher
from health_mlops.serving.predictor import Predictor
from health_mlops.serving.sources import DashboardSources
from health_mlops.serving.ui import Dashboard, build_dashboard
from health_mlops.spec import DatasetSpec


# What a request body may hold: one patient, a batch up to the row limit (about 320 bytes a row), a CSV upload
# of the same size; anything else (Gradio's queue messages) 1 MiB.
MAX_PREDICT_BYTES = 64 * KIB
MAX_BATCH_BYTES = 64 * MIB
MAX_OTHER_BYTES = 1 * MIB
UPLOAD_PATH = "/gradio_api/upload"


def dashboard_body_limit(path: str) -> int:
    if path == "/api/v1/predict":
        return MAX_PREDICT_BYTES
    if path in ("/api/v1/predict/batch", UPLOAD_PATH):
        return MAX_BATCH_BYTES
    return MAX_OTHER_BYTES


def create_dashboard_app(settings: Settings, spec: DatasetSpec, *, poll_s: float) -> BodyLimit:
    registry = Registry(settings.home, spec.name, audit=settings_audit_log(settings))
    watcher = ChampionWatcher(Registry(settings.home, spec.name), poll_s=poll_s)
    predictor = Predictor(spec, watcher, ServingMetrics())
    app = create_serving_app(spec, watcher, predictor=predictor)
    sources = DashboardSources(registry, spec.primary_metric, settings.aggregator_url,
                               admin_credential(settings.admin_token, settings.credentials_dir))
    dashboard = Dashboard(spec, predictor, registry, sources, settings.credentials_dir)
    with suppress(Exception):  # the champion now, if any, so the Predict form starts at a typical patient
        watcher.refresh()
    mounted = gr.mount_gradio_app(app, build_dashboard(dashboard, refresh_s=poll_s), path="/",
                                  max_file_size=MAX_BATCH_BYTES)
    return BodyLimit(mounted, dashboard_body_limit)
