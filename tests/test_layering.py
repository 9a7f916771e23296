"""The package's layering, read from its source with `ast` (nothing is imported).

- No import cycles among fedclip's modules: imports at module level, inside functions and
  under `if TYPE_CHECKING:` all count (a lazy import that closes a cycle is still a cycle,
  only hidden). `from fedclip.x import y` is an import of the module fedclip.x.y when that is
  a module, else of fedclip.x; a package is its __init__.py. Importing a submodule also runs
  its package's __init__, but that edge is left out: every package that re-exports its
  submodules would otherwise be a cycle with each of them.
- No module of the package imports fedclip.cli: the commands sit on top of everything.
- Every exception class is defined in fedclip/errors.py.
"""

from __future__ import annotations

import ast
import builtins
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fedclip"

# Cycles being removed in parallel work, as the sets of modules of each strongly connected
# component. Empty this at merge: then any cycle fails test_no_import_cycles.
KNOWN_CYCLES: list[frozenset[str]] = []

# Exception classes still defined outside errors.py, as (module, class); empty at merge.
KNOWN_EXCEPTIONS: set[tuple[str, str]] = set()


def _modules() -> dict[str, Path]:
    """{dotted module name: file} of every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _target(name: str) -> str | None:
    """`name` or its closest enclosing module of the package (fedclip.x.Y -> fedclip.x)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> set[str]:
    """The package's modules that `module` imports anywhere in its source."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "fedclip" or alias.name.startswith("fedclip."):
                    out.add(_target(alias.name) or alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package, one level up per extra dot
                base = module.split(".") if _is_package(module) else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            if not (source == "fedclip" or source.startswith("fedclip.")):
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                found = sub if sub in MODULES else _target(source)
                if found is not None:
                    out.add(found)
    out.discard(module)
    return out


def import_graph() -> dict[str, set[str]]:
    return {m: imports_of(m) for m in MODULES}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module (the cycles)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def cycle_in(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One cycle through the component's first module, as a path a -> b -> ... -> a."""
    members, start = set(component), component[0]
    paths = {start: [start]}
    frontier = [start]
    while frontier:  # breadth first: the shortest way back to start
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    return [*paths[v], start]
                if w not in paths:
                    paths[w] = [*paths[v], w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle in {component}")


def test_the_walk_sees_the_imports():
    """Guards the walk itself: known edges of each kind are found."""
    assert len(MODULES) > 20 and "fedclip.cli" in MODULES
    graph = import_graph()
    assert "fedclip.config" in graph["fedclip.cli"]  # module level, from-import of names
    assert "fedclip.federation" in graph["fedclip.cli"]  # inside a function
    assert "fedclip.errors" in graph["fedclip.checkpoint"]
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycle_in({"a": {"b"}, "b": {"a", "c"}, "c": set()}, ["a", "b"]) == ["a", "b", "a"]


def test_no_import_cycles():
    graph = import_graph()
    cycles = [c for c in strongly_connected(graph) if frozenset(c) not in KNOWN_CYCLES]
    assert not cycles, "import cycles: " + "; ".join(
        " -> ".join(cycle_in(graph, c)) for c in cycles
    )


@pytest.mark.parametrize(
    "known",
    [
        pytest.param(c, id="+".join(sorted(c)), marks=pytest.mark.xfail(strict=True))
        for c in KNOWN_CYCLES
    ],
)
def test_known_cycle_is_gone(known):
    """Fails (expected) while a known cycle is there; passes, and so fails as strict xfail,
    once it is gone: then remove it from KNOWN_CYCLES."""
    assert known not in {frozenset(c) for c in strongly_connected(import_graph())}


def test_nothing_imports_the_cli():
    importers = sorted(m for m, deps in import_graph().items() if "fedclip.cli" in deps)
    assert not importers, f"fedclip.cli is imported by {importers}"


def _exception_classes() -> set[tuple[str, str]]:
    """(module, class) of every class of the package that derives from an exception: a
    builtin one, one whose name says so (…Error, …Exception, …Warning), or one of these."""
    builtin = {n for n, v in vars(builtins).items() if isinstance(v, type)}
    builtin = {n for n in builtin if issubclass(getattr(builtins, n), BaseException)}
    classes: dict[tuple[str, str], list[str]] = {}
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = [ast.unparse(b).rpartition(".")[2] for b in node.bases]
                classes[(module, node.name)] = bases

    def says_exception(name: str) -> bool:
        return name in builtin or name.endswith(("Error", "Exception", "Warning"))

    found = {key for key, bases in classes.items() if any(map(says_exception, bases))}
    while True:  # subclasses of the package's own exceptions, by name
        names = {name for _, name in found}
        more = {k for k, bases in classes.items() if k not in found and set(bases) & names}
        if not more:
            return found
        found |= more


def test_exceptions_are_defined_in_errors_py():
    found = _exception_classes()
    assert ("fedclip.errors", "FedclipError") in found  # the scan sees the real ones
    assert ("fedclip.errors", "ConfigError") in found
    outside = sorted(k for k in found if k[0] != "fedclip.errors" and k not in KNOWN_EXCEPTIONS)
    assert not outside, f"exception classes outside fedclip/errors.py: {outside}"
