"""The `health-mlops` command: one subcommand per job, one module per concern.

Human output is rich tables on stdout and progress bars on stderr; `--json` prints one JSON document on
stdout instead, for scripts. Every error of the platform (`health_mlops.errors`) ends a command here, in `main`,
with its message and its family's exit code: 2 when what the command was given cannot be used (a file, a spec,
a credential), 1 when a run was refused or ended without a model.

Only typer, rich, pydantic and the settings load before a command runs: `--help` answers at once, and each
command imports what it uses (torch, pandas, MLflow, Gradio) itself.
"""

from __future__ import annotations

import sys

from health_mlops.cli import accounts, data, training, services, registry, demo  # noqa: F401 - each adds its commands
from health_mlops.cli.app import app
from health_mlops.cli.output import say_error
from health_mlops.errors import HealthMlopsError

__all__ = ["app", "main"]


def main() -> None:
    """The console script: the command line, with the platform's errors as messages and exit codes."""
    try:
        app()
    except HealthMlopsError as exc:
        say_error(str(exc), exc.exit_code)
        sys.exit(exc.exit_code)
