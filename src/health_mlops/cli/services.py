"""The long-running services (`aggregator`, `node`, `dashboard`), the credentials they need (`provision`), and
starting a run on a running aggregator (`start-run`)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from health_mlops.cli.app import app, operator_name
from health_mlops.cli.options import (DpClip, DpDelta, DpEpsilon, DpNoise, JsonOption, SecureAggregation,
                                      SecureColluding, SpecOption, Strategy, run_config_from_options)
from health_mlops.cli.output import err, fail, out, print_json
from health_mlops.config import get_settings, settings_audit_log
from health_mlops.errors import CredentialError
from health_mlops.spec import load_spec
from health_mlops.system import faults


def configure_logging() -> None:
    """INFO for what an operator needs: the services' own events. Not a line per HTTP request (the dashboard
    looks at the aggregator every second, a node long-polls it) nor MLflow's download progress bars."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@app.command("start-run")
def start_run(
    rounds: Annotated[int | None, typer.Option(min=1, help="env HEALTH_MLOPS_FL_ROUNDS (20)")] = None,
    strategy: Annotated[Strategy | None, typer.Option(help="env HEALTH_MLOPS_FL_STRATEGY (fedavg)")] = None,
    hospital: Annotated[list[str] | None, typer.Option(help="a hospital to enrol (repeat); default: every "
                                                           "provisioned hospital")] = None,
    dp_epsilon: DpEpsilon = None,
    dp_delta: DpDelta = 1e-5,
    dp_noise_multiplier: DpNoise = None,
    dp_max_grad_norm: DpClip = 1.0,
    secure_aggregation: SecureAggregation = False,
    secure_colluding_hospitals: SecureColluding = 0,
    json_output: JsonOption = False,
) -> None:
    """Ask the aggregator (HEALTH_MLOPS_AGGREGATOR_URL, admin token) to start a federated run."""
    import httpx
    from pydantic import ValidationError

    from health_mlops.config import get_federation_defaults
    from health_mlops.fl.client import AdminClient
    from health_mlops.fl.messages import RunRequest
    from health_mlops.trust.credentials import admin_credential

    if secure_colluding_hospitals and not secure_aggregation:
        fail("--secure-colluding-hospitals needs --secure-aggregation")
    settings = get_settings()
    try:
        federation = get_federation_defaults()
    except ValidationError as exc:
        problem = exc.errors()[0]
        fail(f"HEALTH_MLOPS_FL_{str(problem['loc'][0]).upper()}: {problem['msg']}")
    credential = admin_credential(settings.admin_token, settings.credentials_dir)
    if credential is None:
        fail(f"no admin token: set HEALTH_MLOPS_ADMIN_TOKEN or put admin.token in {settings.credentials_dir}")
    dataset = load_spec(settings.spec)
    config = run_config_from_options(
        dataset, len(hospital) if hospital else federation.min_hospitals, epsilon=dp_epsilon, delta=dp_delta,
        noise_multiplier=dp_noise_multiplier, max_grad_norm=dp_max_grad_norm, rounds=rounds or federation.rounds,
        local_epochs=federation.local_epochs, strategy=strategy.value if strategy else federation.strategy,
        secure_aggregation=secure_aggregation, secure_colluding_hospitals=secure_colluding_hospitals)
    request = RunRequest(config=config, hospitals=hospital or None)
    try:
        with AdminClient(settings.aggregator_url, credential) as admin:
            run = admin.start_run(request)
    except httpx.TransportError as exc:
        fail(f"cannot reach the aggregator at {settings.aggregator_url}: {exc}", code=1)
    if json_output:
        print_json(run.model_dump(mode="json"))
        return
    privacy = run.config.privacy
    out.print(f"started {run.id}: {run.config.rounds} rounds of {run.config.strategy.name} "
              f"over {', '.join(run.hospitals)}" + ("" if privacy is None else
                                                      f", differential privacy ε ≤ {privacy.epsilon:g} at "
                                                      f"δ = {privacy.delta:g} per hospital")
              + (f", secure aggregation (tolerating {run.config.secure_colluding_hospitals} colluding hospital(s))"
                 if run.config.secure_colluding_hospitals else
                 ", secure aggregation" if run.config.secure_aggregation else ""), soft_wrap=True)


@app.command()
def provision(
    hospitals: Annotated[int | None, typer.Option(min=1, max=1000, help="issue for hospital-1 .. hospital-N")] = None,
    hospital: Annotated[list[str] | None, typer.Option(help="issue for this hospital (repeatable)")] = None,
    server_name: Annotated[list[str] | None, typer.Option(help="another DNS name or IP address the aggregator "
                                                                "is reached by (repeatable)")] = None,
    rotate: Annotated[list[str] | None, typer.Option(
        help="new token and certificate for this hospital, 'admin' or 'aggregator'; the old ones stop "
             "working")] = None,
    revoke: Annotated[list[str] | None, typer.Option(help="revoke this hospital's token and certificate")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="default: the credentials folder of "
                                                                "$HEALTH_MLOPS_HOME")] = None,
) -> None:
    """Issue credentials once: the consortium CA, the aggregator's server certificate, and for the admin and
    each hospital a token and a client certificate (existing ones are kept); rotate or revoke one."""
    from health_mlops.data.synthetic import hospital_ids
    from health_mlops.trust.audit import AuditLog, load_audit_key
    from health_mlops.trust.credentials import ADMIN, revoke_token, rotate_token
    from health_mlops.trust.credentials import provision as issue
    from health_mlops.trust.pki import DASHBOARD, SERVER
    from health_mlops.trust.pki import revoke as revoke_certificate
    from health_mlops.trust.pki import rotate as rotate_certificate

    names = [*(hospital_ids(hospitals) if hospitals else []), *(hospital or [])]
    if not (names or rotate or revoke or server_name):
        fail("name the hospitals (--hospitals N or --hospital NAME), or --rotate or --revoke one")
    settings = get_settings()
    directory = out_dir or settings.credentials_dir
    done: list[tuple[str, str]] = []  # (action, whose credential), audited once the audit key exists
    try:
        for name in revoke or []:
            if name in (ADMIN, SERVER, DASHBOARD):
                raise CredentialError(f"{name}: cannot be revoked, only rotated (--rotate {name})")
            revoke_token(directory, name)
            revoke_certificate(directory, name)
            done.append(("provision revoke", name))
            out.print(f"revoked {name}: its token and certificate no longer work")
        for name in rotate or []:
            if name not in (SERVER, DASHBOARD):
                rotate_token(directory, name)
            rotate_certificate(directory, name, server_names=server_name)
            done.append(("provision rotate", name))
            out.print(f"rotated {name}: give it the new {name}.crt/.key" + ("" if name in (SERVER, DASHBOARD) else
                                                                           f" and {name}.token"))
        new = issue(directory, names, server_names=server_name)
        done += [("provision issue", name) for name in new]
    finally:
        audit = AuditLog(settings.audit_log, load_audit_key(directory), name=settings.audit_log_name)
        for action, name in done:
            audit.append(action, f"{operator_name()} (provision)", credential=name)
    out.print(f"credentials in {directory}: " + (f"issued {', '.join(new)}" if new else "nothing new to issue"),
              soft_wrap=True)
    out.print("give each hospital only ca.crt, crl.pem and its own <hospital>.token, .crt and .key; the aggregator "
              "needs registry.json, ca.crt, crl.pem and aggregator.crt/.key", soft_wrap=True)


@app.command("mlflow-auth")
def mlflow_auth(
    dashboard_password_file: Annotated[Path, typer.Option(help="the password the dashboards log in to MLflow with")],
    spec: SpecOption = None,
    wait_seconds: Annotated[float, typer.Option(min=0, help="how long to wait for MLflow to answer")] = 300.0,
) -> None:
    """As MLflow's admin (MLFLOW_TRACKING_URI, _USERNAME, _PASSWORD): create or update the dashboards' MLflow user,
    which reads everything and may edit only the model's registered model (`trust/mlflow_auth.py`)."""
    import time

    from mlflow.exceptions import MlflowException

    from health_mlops.registry import default_tracking_uri
    from health_mlops.trust.credentials import read_token
    from health_mlops.trust.mlflow_auth import set_up_dashboard_user

    settings = get_settings()
    tracking_uri = default_tracking_uri(settings.home)
    if not tracking_uri.startswith(("http://", "https://")):
        fail(f"MLFLOW_TRACKING_URI must name an MLflow server started with --app-name basic-auth, not {tracking_uri}")
    password = read_token(dashboard_password_file)
    model = load_spec(spec or settings.spec).name
    deadline = time.monotonic() + wait_seconds
    with err.status(f"waiting for MLflow at {tracking_uri}"):
        while True:
            try:
                done = set_up_dashboard_user(tracking_uri, model, password)
                break
            except MlflowException as error:
                if any(f"error code {status}" in str(error) for status in (401, 403)):  # an answer: no retry
                    fail(f"{tracking_uri}: MLflow refused its admin: {error}")
                if time.monotonic() > deadline:
                    fail(f"{tracking_uri}: MLflow did not answer within {wait_seconds:.0f} s ({error})", 1)
                time.sleep(2)
    out.print(done, soft_wrap=True)


@app.command()
def aggregator(
    host: Annotated[str, typer.Option(help="interface to listen on (0.0.0.0 in a container)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="the API, over mutual TLS")] = 8080,
    ops_port: Annotated[int, typer.Option(help="/healthz, /readyz and /metrics, plain HTTP for the kubelet and "
                                               "Prometheus")] = 8081,
    plain_http: Annotated[bool, typer.Option(help="serve the API without TLS (loopback experiments only)")] = False,
    spec: Annotated[str | None, typer.Option(help="built-in spec name or YAML path (default: settings)")] = None,
) -> None:
    """Run the aggregator service: runs, rounds, checkpoints (resumes from the last one on restart)."""
    from health_mlops.fl.aggregator import serve
    from health_mlops.registry import QualityGate, Registry

    settings = get_settings()
    configure_logging()
    dataset = load_spec(spec or settings.spec)
    audit = settings_audit_log(settings)
    try:
        faults.arm(settings.crash_at)
        serve(dataset, settings.models_dir, settings.credentials_dir, host=host, port=port, ops_port=ops_port,
              plain_http=plain_http, registry_factory=lambda: Registry(settings.home, dataset.name, audit=audit),
              quality_gate=QualityGate(settings.quality_gate_tolerance, settings.quality_gate_calibration),
              audit=audit)
    except ValueError as exc:  # a setting the service cannot run with (a crash point, a port)
        fail(str(exc))


@app.command()
def node(
    hospital_id: Annotated[str | None, typer.Option(help="env HOSPITAL_ID")] = None,
    node_id: Annotated[str | None, typer.Option(help="this replica's name; env NODE_ID (default: host name)")] = None,
    city: Annotated[str | None, typer.Option(help="env CITY_NAME")] = None,
    central_url: Annotated[str | None, typer.Option(help="the aggregator; env CENTRAL_URL")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="this hospital's data folder; env DATA_DIR")] = None,
    token_file: Annotated[Path | None, typer.Option(help="default: env HEALTH_MLOPS_TOKEN, else "
                                                         "<credentials>/<hospital>.token")] = None,
    host: Annotated[str, typer.Option(help="interface for the node API and metrics")] = "127.0.0.1",
    api_port: Annotated[int | None, typer.Option(help="node API; env NODE_API_PORT (5001)")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Prometheus metrics; env METRICS_PORT (8001)")] = None,
    require_secure_aggregation: Annotated[bool | None, typer.Option(
        "--require-secure-aggregation", help="refuse the fit tasks of runs without secure aggregation: no update "
                                             "leaves in the clear; env REQUIRE_SECURE_AGGREGATION")] = None,
    min_colluding_hospitals: Annotated[int | None, typer.Option(
        min=0, max=1000, help="take part only in secure rounds whose threshold tolerates this many hospitals "
                              "colluding with the aggregator; env MIN_COLLUDING_HOSPITALS (0)")] = None,
    insecure_plain_http: Annotated[bool, typer.Option(
        "--insecure-plain-http", help="allow an http:// central URL: the hospital's token and updates then travel "
                                      "in clear (a test bench only)")] = False,
    spec: SpecOption = None,
) -> None:
    """Run one hospital node: validate the local data, then take tasks from the aggregator."""
    import socket
    from urllib.parse import urlsplit

    import torch

    from health_mlops.config import get_node_settings
    from health_mlops.data.hospital import load_hospital
    from health_mlops.fl.node import HospitalNode, serve
    from health_mlops.fl.secure_fit import ParticipationPolicy
    from health_mlops.trust.credentials import ClientCredential, read_token

    settings, env = get_settings(), get_node_settings()
    torch.set_num_threads(settings.torch_threads)
    configure_logging()
    hospital_name = hospital_id or env.hospital_id
    folder = data_dir or env.data_dir
    if not hospital_name or folder is None:
        fail("a node needs --hospital-id (HOSPITAL_ID) and --data-dir (DATA_DIR)")
    central = central_url or env.central_url
    scheme = urlsplit(central).scheme.lower()
    if scheme not in ("https", "http"):
        fail(f"--central-url {central!r}: not an https:// URL")
    if scheme == "http":
        if not insecure_plain_http:
            fail(f"--central-url {central}: plain http would send {hospital_name}'s token and updates in clear; use "
                 "https://, or --insecure-plain-http on a test bench")
        logging.getLogger("health_mlops.node").warning(
            "central URL %s is plain http (--insecure-plain-http): the token and updates travel in clear", central)
    # The credential first: without it, reading the data is wasted.
    credential = ClientCredential.from_directory(
        settings.credentials_dir, hospital_name, token=read_token(token_file) if token_file else settings.token)
    dataset = load_spec(spec or settings.spec)
    data = load_hospital(folder, dataset, hospital_id=hospital_name, quality_dir=settings.quality_dir / hospital_name)
    worker = HospitalNode(data=data, spec=dataset, node_id=node_id or env.node_id or socket.gethostname(),
                          city=city or env.city_name, central_url=central,
                          credential=credential, split_seed=settings.split_seed, test_fraction=settings.test_fraction,
                          stratify=settings.stratified_split, poll_wait_s=settings.poll_wait_s,
                          policy=ParticipationPolicy(
                              require_secure_aggregation=require_secure_aggregation or env.require_secure_aggregation,
                              min_colluding_hospitals=(env.min_colluding_hospitals if min_colluding_hospitals is None
                                                       else min_colluding_hospitals)))
    serve(worker, host=host, api_port=api_port or env.api_port, metrics_port=metrics_port or env.metrics_port)


@app.command()
def dashboard(
    host: Annotated[str, typer.Option(help="interface to listen on (0.0.0.0 in a container)")] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 7860,
    poll_seconds: Annotated[float, typer.Option(min=0.1, help="how often to look for a new champion")] = 2.0,
    spec: SpecOption = None,
) -> None:
    """Serve the champion model: the dashboard at / and the REST API at /api/v1 (one process, one worker)."""
    import gc

    import uvicorn

    from health_mlops.errors import TlsError
    from health_mlops.serving.app import create_dashboard_app
    from health_mlops.trust.tls import server_context
    from health_mlops.web.server import protocol_options

    settings = get_settings()
    configure_logging()
    dataset = load_spec(spec or settings.spec)
    os.umask(0o077)  # uploads and batch results hold patient rows: every file this process writes is 0600
    tls = None
    if settings.dashboard_tls_cert or settings.dashboard_tls_key:
        if not (settings.dashboard_tls_cert and settings.dashboard_tls_key):
            raise TlsError("HEALTH_MLOPS_DASHBOARD_TLS_CERT and HEALTH_MLOPS_DASHBOARD_TLS_KEY go together")
        tls = server_context(settings.dashboard_tls_cert, settings.dashboard_tls_key, client_ca=None)
    served = create_dashboard_app(settings, dataset, poll_s=poll_seconds)
    # What is loaded now (MLflow, Gradio, their modules: ~380,000 objects) lives as long as the process. A full
    # garbage collection walks all of it, 210 ms during which no request is answered; frozen, it is skipped.
    gc.collect()
    gc.freeze()
    # One worker: the dashboard's sessions live in the process. No access log and no proxy-header parsing:
    # both cost every prediction, and the API logs nothing per request.
    uvicorn.run(served, host=host, port=port, log_level="warning", access_log=False, proxy_headers=False,
                **protocol_options(tls))
