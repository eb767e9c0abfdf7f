"""The `health-mlops` command and its groups; each module of this package adds its commands to them."""

from __future__ import annotations

import os
from typing import Annotated

import typer
import typer.rich_utils

from health_mlops.cli.output import out

# Help piped into a file or a pager: typer's console would wrap at rich's 80 columns and cut choices such as
# [pooled|local|federated] in two; it gets the tables' width instead, unless the environment sets one.
if typer.rich_utils.MAX_WIDTH is None and not out.is_terminal and "COLUMNS" not in os.environ:
    typer.rich_utils.MAX_WIDTH = out.width

app = typer.Typer(help="Health MLOps: federated health-risk models for hospital consortia.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Generate and validate hospital data.", no_args_is_help=True)
app.add_typer(data_app, name="data")
registry_app = typer.Typer(help="Model versions in the registry: list, promote, roll back.", no_args_is_help=True)
app.add_typer(registry_app, name="registry")
accounts_app = typer.Typer(help="Who may use the dashboard: users with a role and a password, API keys with a role.",
                           no_args_is_help=True)
app.add_typer(accounts_app, name="dashboard-account")
audit_app = typer.Typer(help="The audit log: verify that no line was changed, removed, inserted or reordered.",
                        no_args_is_help=True)
app.add_typer(audit_app, name="audit")


def operator_name() -> str:
    """Who ran this command, for the audit log: the login name, or the uid where there is none (a container)."""
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


def _print_version(asked: bool) -> None:
    if asked:
        from importlib.metadata import version

        out.print(f"health-mlops {version('health-mlops')}")
        raise typer.Exit()


@app.callback()
def main(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                               help="print the version and exit")] = False) -> None:
    """Health MLOps: federated health-risk models for hospital consortia."""
    from health_mlops.config import get_settings, use_mlflow_login

    use_mlflow_login(get_settings())  # every command that talks to MLflow does so as the configured login
