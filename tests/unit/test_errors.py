"""Every error the project raises on purpose belongs to one tree (`health_mlops.errors`), so a caller can catch
the project's refusals apart from a bug's, and the CLI turns each into a message and an exit code."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

from health_mlops.errors import HealthMlopsError

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "health_mlops"


def test_every_exception_the_package_defines_is_a_health_mlops_error() -> None:
    outside = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.stem == "__main__":  # importing it runs the CLI
            continue
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        module = importlib.import_module(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
        outside += [f"{module.__name__}.{name}" for name, value in vars(module).items()
                    if inspect.isclass(value) and issubclass(value, BaseException)
                    and value.__module__ == module.__name__ and not issubclass(value, HealthMlopsError)]
    assert outside == []
