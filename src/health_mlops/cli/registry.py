"""`registry list|promote|rollback` (changes need the admin credential and are audited) and `audit verify`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from health_mlops.cli.app import audit_app, registry_app
from health_mlops.cli.options import AdminTokenOption, JsonOption
from health_mlops.cli.output import err, fail, out, print_json
from health_mlops.config import get_settings, settings_audit_log
from health_mlops.errors import CredentialError
from health_mlops.spec import load_spec

if TYPE_CHECKING:  # the registry imports MLflow
    from health_mlops.registry import Registry
    from health_mlops.trust.audit import Anchor

ModelSpecOption = Annotated[str | None, typer.Option("--spec", help="the task whose model (built-in name or YAML "
                                                                    "path)")]


def _registry(spec: str | None) -> Registry:
    from health_mlops.registry import Registry

    settings = get_settings()
    dataset = load_spec(spec or settings.spec)
    return Registry(settings.home, dataset.name, audit=settings_audit_log(settings))


def _cli_user() -> str:
    import getpass
    import socket

    return f"cli: {getpass.getuser()}@{socket.gethostname()}"


def _admin_actor(registry: Registry, action: str, token_file: Path | None) -> str:
    """The actor of a registry change: the admin, proven by the admin token (`--admin-token-file`,
    HEALTH_MLOPS_ADMIN_TOKEN or the credentials folder's) checked against the credentials registry. A refusal
    is audited and ends the command with exit code 2."""
    from health_mlops.trust.credentials import ADMIN, admin_refusal, read_token, token_path

    settings = get_settings()
    try:
        token = (read_token(token_file) if token_file else settings.admin_token
                 or read_token(token_path(settings.credentials_dir, ADMIN)))
    except CredentialError as exc:
        problem: str | None = str(exc)
    else:
        problem = admin_refusal(token, settings.credentials_dir)
    if problem is not None:
        registry.audit.append(f"registry {action}", f"unknown ({_cli_user()})", outcome="refused 401",
                              model=registry.model_name, reason=problem)
        fail(f"{action} needs the admin credential: {problem}")
    return f"admin ({_cli_user()})"


@registry_app.command("list")
def registry_list(spec: ModelSpecOption = None, json_output: JsonOption = False) -> None:
    """Every registered version with its aliases and federated test metric."""
    from datetime import datetime

    registry = _registry(spec)
    if json_output:
        print_json([v.to_json() for v in registry.versions()])
        return
    table = Table(title=f"{registry.model_name} in {registry.tracking_uri}")
    for column in ("version", "aliases", "metric", "privacy", "federation run", "created"):
        table.add_column(column, justify="right" if column in ("version", "metric") else "left")
    for v in registry.versions():
        table.add_row(str(v.version), ", ".join(v.aliases), f"{v.metric_name} {v.metric:.4f}", v.privacy_text(),
                      v.federation_run, f"{datetime.fromtimestamp(v.created_at):%Y-%m-%d %H:%M:%S}")
    out.print(table)


@registry_app.command("promote")
def registry_promote(version: Annotated[int, typer.Argument(min=1)], spec: ModelSpecOption = None,
                     admin_token_file: AdminTokenOption = None) -> None:
    """Make VERSION the champion (needs the admin credential; written to the audit log)."""
    registry = _registry(spec)
    promoted = registry.promote(version, actor=_admin_actor(registry, "promote", admin_token_file))
    out.print(f"v{promoted.version} is now champion; audit log: {registry.audit_log}")


@registry_app.command("rollback")
def registry_rollback(spec: ModelSpecOption = None, admin_token_file: AdminTokenOption = None) -> None:
    """Make the previous champion (by MLflow's version history) champion again (needs the admin credential;
    written to the audit log)."""
    registry = _registry(spec)
    restored = registry.rollback(actor=_admin_actor(registry, "rollback", admin_token_file))
    out.print(f"rolled back: v{restored.version} is champion again; audit log: {registry.audit_log}")


@audit_app.command("verify")
def audit_verify(
    log: Annotated[Path | None, typer.Option(help="default: $HEALTH_MLOPS_HOME/audit.log")] = None,
    hashes_only: Annotated[bool, typer.Option(
        "--hashes-only", help="without the audit key: check the hash chain alone (a rewritten chain passes)")] = False,
    prometheus: Annotated[str | None, typer.Option(
        help="a Prometheus that scrapes the aggregator: the log must reach the highest line it ever saw")] = None,
    spec: ModelSpecOption = None,
) -> None:
    """Check the audit log's hash chain and every line's MAC with the audit key (in the credentials folder), and that
    every line the registry (and, with --prometheus, Prometheus) saw is still there; exit 1 naming the first line
    that was changed, removed, inserted or reordered, or where the log was cut short."""
    from health_mlops.trust.audit import KEY_FILE_NAME, load_audit_key, verify_audit

    settings = get_settings()
    path = log or settings.audit_log
    key = load_audit_key(settings.credentials_dir)
    anchors = _registry(spec).audit_anchors(settings.audit_log_name)
    if prometheus:
        anchors.append(_prometheus_anchor(prometheus))
    if key is None and not hashes_only:
        fail(f"no audit key ({settings.credentials_dir / KEY_FILE_NAME}): without it only the hashes can be checked, "
             "and whoever rewrites the log can rewrite its hashes too; verify where the key is, or pass "
             "--hashes-only to check the hashes alone")
    checked, problem = verify_audit(path, key, anchors)
    if problem is not None:
        err.print(f"[bold red]{escape(str(path))}:[/] {escape(str(problem))}", markup=True, soft_wrap=True)
        raise typer.Exit(1)
    out.print(f"{path}: {checked} lines, the chain is intact" + (" and every MAC matches the audit key" if key else
              " (no audit key in the credentials folder: hashes checked, MACs not)")
              + f"; every line of {len(anchors)} seen outside the log is in it", soft_wrap=True)


def _prometheus_anchor(url: str) -> Anchor:
    """The highest audit line Prometheus ever saw the aggregator publish (it keeps the history the log's writer
    cannot roll back)."""
    import httpx

    from health_mlops.trust.audit import Anchor

    query = "max(max_over_time(health_mlops_audit_log_sequence[400d]))"
    try:
        answer = httpx.get(f"{url.rstrip('/')}/api/v1/query", params={"query": query}, timeout=30)
        result = answer.raise_for_status().json()["data"]["result"]
    except (httpx.HTTPError, ValueError, KeyError) as error:
        fail(f"{url}: cannot ask Prometheus for the audit log's highest line ({error})")
    if not result:
        fail(f"{url}: Prometheus has no health_mlops_audit_log_sequence: does it scrape the aggregator?")
    return Anchor(int(float(result[0]["value"][1])), None, f"Prometheus ({url})")
