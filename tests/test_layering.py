"""Imports flow one way through the pipeline's stages, and no module imports itself back through a circle.

Every import is read from the source (module-level and the lazy ones inside functions alike), so a lazy import
that runs back up the stack fails here just as a top-level one does.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TOP_PACKAGES = ("atlas", "ingest", "app", "atlas_cli")

# Stage order, bottom first: a module may import its own stage or any stage listed before it, never one after it.
# A stage not listed here fails the test, so a new stage has to say where it sits.
STAGES: tuple[str, ...] = (
    "atlas.config",
    "atlas.models",
    "atlas.transcoders",
    "atlas.training",
    "atlas.attribution",
    "atlas.validation",
    "atlas.storage",
    "atlas.analysis",
    "atlas.diff",
    "ingest",
    "app",
    "atlas_cli",
)


def module_files() -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for package in TOP_PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The project modules `path` imports anywhere in its body (absolute imports; the project uses no others)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in known)
    return found


def stage_of(module: str) -> str:
    matches = [stage for stage in STAGES if module == stage or module.startswith(stage + ".")]
    if not matches:
        if module in TOP_PACKAGES or module == "atlas.__init__":
            return module
        raise AssertionError(f"{module} belongs to no stage in STAGES; add its stage in pipeline order")
    return max(matches, key=len)


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imported_modules(path, set(modules)) - {name} for name, path in modules.items()}


def test_every_module_belongs_to_a_stage() -> None:
    for module in import_graph():
        if module not in TOP_PACKAGES:
            stage_of(module)


def test_no_import_runs_back_up_the_pipeline() -> None:
    rank = {stage: i for i, stage in enumerate(STAGES)}
    backwards = []
    for module, imports in import_graph().items():
        if module in TOP_PACKAGES:
            continue
        for target in imports:
            if target in TOP_PACKAGES:  # a package's __init__: ranked as the package's lowest stage
                target_rank = min(rank[s] for s in STAGES if s == target or s.startswith(target + "."))
            else:
                target_rank = rank[stage_of(target)]
            if target_rank > rank[stage_of(module)]:
                backwards.append(f"{module} -> {target}")
    assert not backwards, "imports running back up the pipeline:\n" + "\n".join(sorted(backwards))


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = defaultdict(int)  # 0 unseen, 1 on the stack, 2 done
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if state[target] == 1:
                return [*stack[stack.index(target) :], target]
            if state[target] == 0 and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if state[module] == 0 and (cycle := visit(module)):
            return cycle
    return None


def test_no_module_imports_itself_through_a_circle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
        ({"a": {"b"}, "b": {"a"}}, ["a", "b", "a"]),
        ({"a": {"b"}, "b": {"c"}, "c": {"b"}}, ["b", "c", "b"]),
    ],
)
def test_the_circle_finder_finds_circles(graph: dict[str, set[str]], expected: list[str] | None) -> None:
    assert find_cycle(graph) == expected
