"""The errors a person is told about: one root and one family per concern.

Each says what went wrong and where (the file, the row, the field), in words the reader can act on. The CLI
turns any of them into its message and exit code in one place (`health_mlops.cli.main`); the services answer
with them where they are raised. A leaf module: it imports nothing of the project, so anything may raise them.
"""

from __future__ import annotations

from pathlib import Path


class HealthMlopsError(Exception):
    """The root. `exit_code` is what the CLI exits with: 2, the command cannot use what it was given."""

    exit_code = 2


class DataError(HealthMlopsError):
    """A data file or folder that cannot be used at all; the message names it and says why."""

    def __init__(self, path: Path | str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = Path(path)
        self.problem = problem


class SpecError(HealthMlopsError):
    """A spec that cannot be found or does not describe a valid task."""


class CredentialError(HealthMlopsError):
    """A credentials folder, token, certificate or key that cannot be used, with the file and the reason."""


class PkiError(CredentialError):
    """A certificate or key of the consortium's CA that cannot be issued or read, naming the file."""


class TlsError(CredentialError):
    """A certificate or key a TLS context cannot be built from, naming the file."""


class AuditError(HealthMlopsError):
    """An audit log or key that cannot be used, naming the file."""


class CheckpointError(HealthMlopsError):
    """A checkpoint that exists but cannot be read; the message names the file."""


class RegistryError(HealthMlopsError):
    """A registry action that cannot be done (unknown version, nothing to roll back to, ...)."""


class FederationError(HealthMlopsError):
    """A run that was refused or ended without a model. Exit code 1: what was asked was valid, the run did not
    give it."""

    exit_code = 1


class DemoError(HealthMlopsError):
    """Something the demo cannot get past; the message says what and where to look."""
