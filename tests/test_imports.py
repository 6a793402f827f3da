"""No import circle among our modules: each one can be read, and imported, on its own.

Imports under ``if TYPE_CHECKING:`` never run and are left out; imports inside functions
run and count (a circle hidden in a function is still a circle).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("orchestrator", "orchestrator_server")


def module_files() -> dict[str, Path]:
    files: dict[str, Path] = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join(parts)] = path
    return files


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The modules of ours that ``path`` imports when it runs."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit_node(other)
            else:
                visit_node(child)

    def visit_node(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in modules else node.module)
        visit(node)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return found & modules


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """A circle in ``graph`` as the modules along it, or ``None``."""
    done: set[str] = set()

    def walk(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return [*path[path.index(module) :], module]
        if module in done:
            return None
        for imported in sorted(graph[module]):
            circle = walk(imported, [*path, module])
            if circle is not None:
                return circle
        done.add(module)
        return None

    for module in sorted(graph):
        circle = walk(module, [])
        if circle is not None:
            return circle
    return None


def test_our_modules_import_each_other_without_a_circle() -> None:
    files = module_files()
    graph = {name: imports_of(path, set(files)) - {name} for name, path in files.items()}
    assert graph["orchestrator.enhanced.rate_limit"]  # the scan sees imports at all
    assert find_circle(graph) is None, " -> ".join(find_circle(graph) or [])


@pytest.mark.parametrize(
    ("graph", "circle"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
        ({"a": {"b"}, "b": {"a"}}, ["a", "b", "a"]),
        ({"a": {"b"}, "b": {"c"}, "c": {"b"}}, ["b", "c", "b"]),
    ],
)
def test_find_circle(graph: dict[str, set[str]], circle: list[str] | None) -> None:
    assert find_circle(graph) == circle


def test_an_import_inside_a_function_counts_and_one_for_type_checking_does_not(
    tmp_path: Path,
) -> None:
    source = tmp_path / "m.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from orchestrator.types import SessionId\n"
        "def f():\n"
        "    from orchestrator.enhanced import rate_limit\n",
        encoding="utf-8",
    )
    modules = {"orchestrator.types", "orchestrator.enhanced", "orchestrator.enhanced.rate_limit"}
    assert imports_of(source, modules) == {"orchestrator.enhanced.rate_limit"}
