"""The package's layers, read from its source: every import, at the top of a module or inside a function.

Every module has a layer, and imports only from its own layer and those below it:

- leaves (`errors`, `metrics`, `monitoring`, `system/`, `web.strict_json`) import nothing of the project;
- `trust/` (certificates, credentials, accounts, audit) stands on the leaves alone;
- the core (`config`, `spec`, `data/`, `ml/`, the `fl/` core) does no network I/O and loads no service, so it is
  tested in milliseconds; within it `data/` imports nothing of training and `ml/` nothing of the federation;
- `web/` is the HTTP edge the services share;
- services (`serving/`, the aggregator, the node, `fl.store`, `registry`) import no harness or CLI module, so an
  image runs none of their code;
- harnesses (`experiments/`, `demo/`) drive services; the CLI is on top.

And no two modules import each other at run time (a cycle is a layer that has not been named)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "health_mlops"

FL_CORE = ("run_config", "strategy_table", "strategies", "state", "coordinator", "admission", "privacy_budget",
           "snapshot", "hospital", "stats", "privacy", "report", "mapped", "metadata", "errors", "messages", "secagg",
           "secure_round", "secure_steps")
# Lowest first: (layer, the modules and packages in it).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("leaf", ("health_mlops", "health_mlops.errors", "health_mlops.metrics", "health_mlops.monitoring",
              "health_mlops.system", "health_mlops.web.strict_json")),
    ("trust", ("health_mlops.trust",)),
    ("core", ("health_mlops.config", "health_mlops.spec", "health_mlops.data", "health_mlops.ml", "health_mlops.fl",
              *(f"health_mlops.fl.{name}" for name in FL_CORE))),
    ("web", ("health_mlops.web",)),
    ("service", ("health_mlops.serving", "health_mlops.fl.aggregator", "health_mlops.fl.node", "health_mlops.fl.client",
                 "health_mlops.fl.secure_fit", "health_mlops.fl.publish", "health_mlops.fl.store",
                 "health_mlops.registry")),
    ("harness", ("health_mlops.experiments", "health_mlops.demo")),
    ("cli", ("health_mlops.cli",)),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, *, at_run_time: bool = False) -> set[str]:
    """Every module of the project `path` imports, wherever in the file (`at_run_time`: but under `if
    TYPE_CHECKING`)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {id(inner) for node in ast.walk(tree)
                   if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
                   for statement in node.body for inner in ast.walk(statement)} if at_run_time else set()
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return {name for name in found if name.startswith("health_mlops")}


MODULES = {module_name(path): imports_of(path) for path in sorted(PACKAGE.rglob("*.py"))}
RUN_TIME_IMPORTS = {module_name(path): imports_of(path, at_run_time=True) for path in sorted(PACKAGE.rglob("*.py"))}


def within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def layer_of(name: str) -> int:
    """The index in LAYERS of the most specific entry naming `name` (`fl.store` is a service in the core's `fl`)."""
    matches = [(len(prefix), index) for index, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
               if name == prefix or name.startswith(prefix + ".") and prefix != "health_mlops"]
    if not matches:
        raise KeyError(name)
    return max(matches)[1]


def test_every_module_has_a_layer() -> None:
    unplaced = []
    for name in MODULES:
        try:
            layer_of(name)
        except KeyError:
            unplaced.append(name)
    assert unplaced == []


def test_no_module_imports_from_a_layer_above_its_own() -> None:
    upward = {name: sorted(f"{imported} ({LAYERS[layer_of(imported)][0]})" for imported in imports
                           if imported in MODULES and layer_of(imported) > layer_of(name))
              for name, imports in MODULES.items()}
    assert {name: found for name, found in upward.items() if found} == {}


# (what, the modules, what they must not import) within a layer
RULES = [
    ("data", [name for name in MODULES if within(name, ("health_mlops.data",))],
     ("health_mlops.ml", "health_mlops.fl")),
    ("ml", [name for name in MODULES if within(name, ("health_mlops.ml",))], ("health_mlops.fl",)),
]


@pytest.mark.parametrize(("layer", "members", "forbidden"), RULES, ids=[rule[0] for rule in RULES])
def test_no_module_imports_across_its_layer(layer: str, members: list[str], forbidden: tuple[str, ...]) -> None:
    assert members, f"{layer}: no modules found (a package moved?)"
    crossings = {member: sorted(name for name in MODULES[member] if within(name, forbidden) and name != member)
                 for member in members}
    assert {member: names for member, names in crossings.items() if names} == {}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterated over a stack)."""
    index: dict[str, int] = {}
    lowest: dict[str, int] = {}
    stack: list[str] = []
    cycles = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = lowest[root] = len(index)
        stack.append(root)
        while work:
            node, successors = work[-1]
            successor = next(successors, None)
            if successor is not None:
                if successor not in index:
                    index[successor] = lowest[successor] = len(index)
                    stack.append(successor)
                    work.append((successor, iter(sorted(graph[successor]))))
                elif successor in stack:
                    lowest[node] = min(lowest[node], index[successor])
                continue
            work.pop()
            if work:
                lowest[work[-1][0]] = min(lowest[work[-1][0]], lowest[node])
            if lowest[node] == index[node]:
                component = []
                while (member := stack.pop()) != node:
                    component.append(member)
                if component:
                    cycles.append(sorted([node, *component]))
    return cycles


def test_no_two_modules_import_each_other_at_run_time() -> None:
    graph = {name: {imported for imported in imports if imported in MODULES and imported != name}
             for name, imports in RUN_TIME_IMPORTS.items()}
    assert import_cycles(graph) == []


def test_the_rules_see_a_crossing_and_a_cycle() -> None:
    """The walk finds an import inside a function too (the CLI's are all there); a cycle is found."""
    assert "health_mlops.experiments.loopback" in MODULES["health_mlops.cli.training"]
    assert LAYERS[layer_of("health_mlops.fl.store")][0] == "service"
    assert LAYERS[layer_of("health_mlops.fl.run_config")][0] == "core"
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
