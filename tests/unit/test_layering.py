"""The package's layers, read from its source: every import, at the top of a module or inside a function.

The core (`data/`, `ml/`, the `fl/` core, `metrics`, `spec`, `errors`) imports no service, harness or CLI module,
so it is tested in milliseconds without them; a service imports no harness (`experiments/`, `demo/`) or CLI
module, so an image runs none of their code; `data/` imports nothing of training, and the leaves nothing of the
project at all."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "health_mlops"

SERVICES = ("health_mlops.serving", "health_mlops.fl.aggregator", "health_mlops.fl.node", "health_mlops.fl.client",
            "health_mlops.fl.secure_fit", "health_mlops.fl.publish", "health_mlops.registry",
            "health_mlops.http_server", "health_mlops.http_edge")
HARNESSES = ("health_mlops.experiments", "health_mlops.demo")
CLI = ("health_mlops.cli",)
FL_CORE = ("run_config", "strategies", "state", "coordinator", "admission", "privacy_budget", "snapshot", "hospital",
           "stats", "privacy", "report", "mapped", "metadata", "errors", "messages", "secagg", "secure_round",
           "secure_steps")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module of the project `path` imports, wherever in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return {name for name in found if name.startswith("health_mlops")}


MODULES = {module_name(path): imports_of(path) for path in sorted(PACKAGE.rglob("*.py"))}


def within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def modules(*prefixes: str) -> list[str]:
    return [name for name in MODULES if within(name, prefixes)]


# (what, the modules, what they must not import)
RULES = [
    ("the core", [*modules("health_mlops.data", "health_mlops.ml", "health_mlops.metrics", "health_mlops.spec",
                           "health_mlops.errors"), *(f"health_mlops.fl.{name}" for name in FL_CORE)],
     SERVICES + HARNESSES + CLI),
    ("a service", modules(*SERVICES), HARNESSES + CLI),
    ("data", modules("health_mlops.data"), ("health_mlops.ml", "health_mlops.fl")),
    ("ml", modules("health_mlops.ml"), ("health_mlops.fl",)),
    ("a leaf", modules("health_mlops.metrics", "health_mlops.errors", "health_mlops.strict_json"), ("health_mlops",)),
]


@pytest.mark.parametrize(("layer", "members", "forbidden"), RULES, ids=[rule[0] for rule in RULES])
def test_no_module_imports_across_its_layer(layer: str, members: list[str], forbidden: tuple[str, ...]) -> None:
    assert members, f"{layer}: no modules found (a package moved?)"
    crossings = {member: sorted(name for name in MODULES[member] if within(name, forbidden) and name != member)
                 for member in members}
    assert {member: names for member, names in crossings.items() if names} == {}


def test_the_rules_see_a_crossing() -> None:
    """The walk finds an import inside a function too (the CLI's are all there)."""
    assert "health_mlops.experiments.loopback" in MODULES["health_mlops.cli.training"]
    assert within("health_mlops.cli.training", CLI) and not within("health_mlops.client", CLI)
