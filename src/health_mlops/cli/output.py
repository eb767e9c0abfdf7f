"""What the CLI prints: rich tables on stdout for people, strict JSON for scripts, progress and problems on
stderr."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from health_mlops.web import strict_json

out = Console(highlight=False)
if not out.is_terminal:
    out.width = 120  # piped or captured output: rich's default of 80 columns truncates the tables
err = Console(stderr=True, highlight=False)


# What an exit code says, in the JSON error object a `--json` command prints when it fails.
EXIT_REASONS = {1: "refused or did not complete: what was asked for did not happen",
                2: "unusable input: a file, an option, a spec or a credential the command cannot use"}


def say_error(message: str, code: int = 2) -> None:
    """`error: message` on stderr; with `--json` on the command line, also a JSON error object on stdout (a
    script reading stdout gets a document either way)."""
    err.print(f"[bold red]error:[/] {escape(message)}", markup=True, soft_wrap=True)
    if "--json" in sys.argv[1:]:
        print_json({"error": message, "exit_code": code, "reason": EXIT_REASONS.get(code, "failed")})


def fail(message: str, code: int = 2) -> NoReturn:
    """End the command with `error: message` on stderr and exit code `code` (2: what the command was given
    cannot be used; 1: it was valid, but what it asked for did not happen)."""
    say_error(message, code)
    raise typer.Exit(code)


def warn(hospital: str, warning: str) -> None:
    err.print(f"[yellow]{escape(hospital)}[/]: warning: {escape(warning)}", markup=True, soft_wrap=True)


def progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err, transient=True)


def models_progress(bars: Progress, description: str, models: int) -> Callable[[str, float], None]:
    """A bar over `models` trainings (the pooled model, or each hospital's local one) and the hook that moves it:
    called with (model's name, share of its training done), as `experiments.baselines` reports it."""
    task = bars.add_task(description, total=models)
    shares: dict[str, float] = {}

    def advance(name: str, share: float) -> None:
        shares[name] = share
        bars.update(task, completed=sum(shares.values()))
    return advance


def print_json(document: object) -> None:
    """Strict JSON: an undefined value (NaN, infinite) is null, which every parser reads."""
    sys.stdout.write(strict_json.dumps(document, indent=2) + "\n")
