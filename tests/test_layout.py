"""The package's layout: no two modules of rnncap import each other, directly or round a
longer loop. Every import counts, the ones inside functions too: a cycle hidden in a
function is still a cycle in the design, and the next refactor trips on it.

The graph comes from the source (an AST walk), so this test imports nothing it checks.
"""
import ast
import pathlib


PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "rnncap"

def module_name(path):
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules():
    """{dotted name: path} of every module in the package."""
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name, path, known):
    """The package's modules that ``name`` imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: climb level - 1 packages from this one
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # `from pkg import sub` imports the module pkg.sub where there is one
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            # `import rnncap.a.b` runs rnncap.a.b; keep the longest prefix that is a module
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def import_graph():
    mods = modules()
    return {name: imports_of(name, path, mods) for name, path in mods.items()}


def cycles(graph):
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(frozenset(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [frozenset("abc")]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_walk_sees_imports_inside_functions_and_every_form():
    graph = import_graph()
    # a function-level relative import (train.run -> scst) and a `from .. import x` form
    assert "rnncap.training.scst" in graph["rnncap.training.train"]
    assert "rnncap.data.synth" in graph["rnncap.demo"]
    assert "rnncap.errors" in graph["rnncap.cli"]


def test_no_import_cycles_in_the_package():
    found = [sorted(c) for c in cycles(import_graph())]
    assert not found, f"modules that import each other: {found}"
