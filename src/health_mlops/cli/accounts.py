"""`dashboard-account add|remove|key|revoke-key|list`: who may use the dashboard (`trust/access.py`), each change
audited.

Who can write the accounts file decides who uses the dashboard; these commands are for whoever holds the
consortium's credentials folder (in Kubernetes the file then becomes the dashboard's `dashboard-accounts` Secret).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from health_mlops.cli.app import accounts_app, operator_name
from health_mlops.cli.output import fail, out
from health_mlops.config import get_settings, settings_audit_log
from health_mlops.errors import CredentialError
from health_mlops.trust.access import ROLES, Accounts, Role

RoleOption = Annotated[str, typer.Option(help="clinician (predict, batches), operator (also training, hospitals, "
                                              "monitoring, model reports) or admin (also promote and roll back)")]


def _role(value: str) -> Role:
    if value not in ROLES:
        fail(f"--role {value!r}: one of {', '.join(ROLES)}")
    return value


def _password(password_file: Path | None) -> str:
    """The new password: from the file, else typed twice at a terminal, else the first line of stdin."""
    if password_file is not None:
        try:
            return password_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            fail(f"{password_file}: cannot read the password ({exc.strerror})")
    if sys.stdin.isatty():
        return str(typer.prompt("password", hide_input=True, confirmation_prompt=True))
    return sys.stdin.readline().rstrip("\n")


def _audit(action: str, **details: str) -> None:
    settings_audit_log(get_settings()).append(f"dashboard-account {action}", f"{operator_name()} (cli)", **details)


@accounts_app.command("add")
def add(name: Annotated[str, typer.Argument(help="the user's login name")], role: RoleOption,
        password_file: Annotated[Path | None, typer.Option(help="a file holding the password (else typed, or "
                                                                "read from stdin)")] = None) -> None:
    """Add a user, or give an existing one a new role and password (their sessions then take the new role)."""
    from health_mlops.trust.access import set_user

    path = get_settings().dashboard_accounts
    new = set_user(path, name, _role(role), _password(password_file))
    _audit("add" if new else "change", user=name, role=role)
    out.print(f"{'added' if new else 'changed'} {name} ({role}) in {path}", soft_wrap=True)


@accounts_app.command("remove")
def remove(name: Annotated[str, typer.Argument(help="the user's login name")]) -> None:
    """Remove a user: their sessions end at their next request."""
    from health_mlops.trust.access import remove_user

    remove_user(get_settings().dashboard_accounts, name)
    _audit("remove", user=name)
    out.print(f"removed {name}")


@accounts_app.command("key")
def key(name: Annotated[str, typer.Argument(help="what uses the key (a program, a partner)")],
        role: RoleOption = "clinician") -> None:
    """Issue an API key for the REST API (/api/v1), bound to a role; printed once, only its digest is kept. A key
    issued again under the same name replaces the old one."""
    from health_mlops.trust.access import issue_key

    issued = issue_key(get_settings().dashboard_accounts, name, _role(role))
    _audit("key", key=name, role=role)
    typer.echo(issued)


@accounts_app.command("revoke-key")
def revoke_key(name: Annotated[str, typer.Argument(help="the key's name")]) -> None:
    """Revoke an API key: it stops working at once."""
    from health_mlops.trust.access import revoke_key as revoke

    revoke(get_settings().dashboard_accounts, name)
    _audit("revoke-key", key=name)
    out.print(f"revoked the key {name}")


@accounts_app.command("list")
def list_accounts() -> None:
    """The users and API keys, with their roles (never a password hash or a key)."""
    path = get_settings().dashboard_accounts
    try:
        accounts = Accounts.load(path)
    except CredentialError as error:
        fail(str(error))
    table = Table(title=str(path))
    for column in ("kind", "name", "role"):
        table.add_column(column)
    for user, (user_role, _) in sorted(accounts.users.items()):
        table.add_row("user", user, user_role)
    for holder in sorted(accounts.keys.values(), key=lambda h: h.name):
        table.add_row("API key", holder.name, holder.role)
    out.print(table)
