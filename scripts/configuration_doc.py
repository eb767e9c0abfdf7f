"""Writes docs/configuration.md: every setting of `src/health_mlops/config.py` with its environment variable, type,
default and description, one table per settings class.

    .venv/bin/python scripts/configuration_doc.py           # rewrite the page
    .venv/bin/python scripts/configuration_doc.py --check   # exit 1 when the page is not what the settings say

The classes are found in the module, not listed here, so a new settings class gets its table without a change to
this script; tests/unit/test_docs.py fails when the page is stale.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
from pathlib import Path

from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

from health_mlops import config

CONFIGURATION_PAGE = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
REGENERATE = ".venv/bin/python scripts/configuration_doc.py"


def settings_classes() -> list[type[BaseSettings]]:
    """Every pydantic-settings class defined in config.py, in the order the module defines them."""
    return [value for value in vars(config).values()
            if inspect.isclass(value) and issubclass(value, BaseSettings) and value.__module__ == config.__name__]


def environment_variable(settings_class: type[BaseSettings], name: str, field: FieldInfo) -> str:
    """The variable pydantic-settings reads the field from: its alias, else the class's prefix and the field's name
    (matched without case; written upper-case, as the manifests set them)."""
    alias = field.validation_alias
    if alias is None:
        return (settings_class.model_config.get("env_prefix", "") + name).upper()
    if not isinstance(alias, str):  # AliasChoices or AliasPath: several names or a path, not one variable to print
        raise TypeError(f"{settings_class.__name__}.{name}: only a plain string alias names one environment variable")
    return alias


def type_name(annotation: object) -> str:
    """`int`, `Path | None`, `dict[str, str]`: the annotation without module prefixes."""
    if inspect.isclass(annotation):  # not `Path | None` nor `dict[str, str]`: those print themselves
        return annotation.__name__
    return re.sub(r"\b(?:\w+\.)+(\w+)", r"\1", str(annotation))


def default_text(field: FieldInfo) -> str:
    """The default as it would be written in the environment (`true`, `{}` as JSON), or "unset"."""
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, dict):
        return f"`{json.dumps(value)}`"
    if value == "":
        return '`""`'
    return f"`{value}`"


def table_cell(text: str) -> str:
    """A pipe would end the cell, even inside backticks (GitHub's tables)."""
    return text.replace("|", "\\|")


def settings_table(settings_class: type[BaseSettings]) -> str:
    rows = ["| environment variable | type | default | description |", "|---|---|---|---|"]
    for name, field in settings_class.model_fields.items():
        cells = [f"`{environment_variable(settings_class, name, field)}`", f"`{type_name(field.annotation)}`",
                 default_text(field), field.description or ""]
        rows.append("| " + " | ".join(table_cell(cell) for cell in cells) + " |")
    return "\n".join(rows)


def configuration_page() -> str:
    """The whole page, as the settings in config.py define it now."""
    parts = [
        "# Configuration",
        f"_Generated from `src/health_mlops/config.py` by `scripts/configuration_doc.py`: do not edit; change the "
        f"settings there and run `{REGENERATE}`._",
        "Every setting the services and commands read from the environment, one table per settings class. For "
        "training, a dataset spec may add its own (`training:`) and a command's flags win "
        "([Training defaults](training.md#training-defaults)).",
    ]
    for settings_class in settings_classes():
        # __doc__, not inspect.getdoc: a class without a docstring would get BaseSettings' own.
        summary = inspect.cleandoc(settings_class.__doc__) if settings_class.__doc__ else ""
        parts += [f"## {settings_class.__name__}", summary, settings_table(settings_class)]
    return "\n\n".join(part for part in parts if part) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="exit 1 when the page is stale, without writing it")
    check = parser.parse_args().check
    page = configuration_page()
    if check:
        current = CONFIGURATION_PAGE.read_text(encoding="utf-8") if CONFIGURATION_PAGE.exists() else ""
        if current != page:
            print(f"{CONFIGURATION_PAGE} is stale: run {REGENERATE}", file=sys.stderr)
            return 1
        return 0
    CONFIGURATION_PAGE.write_text(page, encoding="utf-8")
    print(f"wrote {CONFIGURATION_PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
