"""The module graph: no import cycles (function-level imports count), one shared contract."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fedimg", "autocloud_ami")


def module_imports() -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its body."""
    graph: dict[str, set[str]] = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).glob("*.py")):
            name = pkg if path.stem == "__init__" else f"{pkg}.{path.stem}"
            found: set[str] = set()
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    found.add(node.module)
                    found.update(f"{node.module}.{alias.name}" for alias in node.names)
                elif isinstance(node, ast.Import):
                    found.update(alias.name for alias in node.names)
            graph[name] = found
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found: list[list[str]] = []
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        for dep in sorted(graph[node]):
            if dep in path:
                found.append([*path[path.index(dep) :], dep])
            elif dep not in done:
                visit(dep, [*path, dep])
        done.add(node)

    for module in sorted(graph):
        visit(module, [module])
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_itself_back() -> None:
    graph = module_imports()
    assert "fedimg.engine" in graph and "fedimg.plan" in graph["fedimg.engine"]
    assert cycles(graph) == []


def test_autocloud_ami_imports_only_the_contract_and_the_aws_seam_from_fedimg() -> None:
    graph = module_imports()
    shared = {
        dep
        for module, deps in graph.items()
        if module.startswith("autocloud_ami")
        for dep in deps
        if dep.startswith("fedimg")
    }
    assert shared <= {
        "fedimg.messages",
        "fedimg.aws",
        "fedimg.settings",
        "fedimg.backlog",
        "fedimg.fmcallback",
        "fedimg.locks",
        "fedimg",
    }


def test_the_plan_is_pure() -> None:
    graph = module_imports()
    io_modules = {"fedimg.aws", "fedimg.observe", "fedimg.engine", "fedimg.stage", "fedimg.promote"}
    for pure in ("fedimg.plan", "fedimg.facts", "fedimg.gate"):
        assert not graph[pure] & io_modules, pure
