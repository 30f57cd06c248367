"""No import cycles among the model modules (rnncap/models/): an AST walk of every
import, at module level or inside a function, resolved to the module it names. The
registry (rnncap.models.registry) is fed by every model module and imports none."""
from __future__ import annotations

import ast
from pathlib import Path

import rnncap

PACKAGE = Path(rnncap.__file__).parent
MODELS = PACKAGE / "models"


def _module_name(path):
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path, name=None):
    """Module names the file ``path`` (module ``name``, by default its name in rnncap)
    imports; ``from . import x`` counts as importing the module x when it is one."""
    name = name or _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = base[:len(base) - (node.level - 1)] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            for a in node.names:
                sub = f"{mod}.{a.name}"
                out.add(sub if (PACKAGE.parent / sub.replace(".", "/")).with_suffix(".py").exists() else mod)
    return out


def model_graph():
    files = [p for p in MODELS.glob("*.py") if p.name != "__init__.py"]
    names = {_module_name(p) for p in files}
    return {_module_name(p): imports_of(p) & names for p in files}


def find_cycle(graph):
    """A list of modules forming a cycle, or None (depth-first search)."""
    state, stack = {}, []

    def visit(u):
        state[u] = "open"
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            if state.get(v) == "open":
                return stack[stack.index(v):] + [v]
            if v not in state:
                found = visit(v)
                if found:
                    return found
        stack.pop()
        state[u] = "done"
        return None

    for u in sorted(graph):
        if u not in state:
            found = visit(u)
            if found:
                return found
    return None


def test_no_import_cycles_among_the_model_modules():
    graph = model_graph()
    assert "rnncap.models.transformer" in graph and "rnncap.models.registry" in graph
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    assert graph["rnncap.models.registry"] == set()  # fed by the models, imports none


def test_the_walk_sees_imports_inside_functions_and_finds_a_cycle(tmp_path):
    """The check can fail: the old lazy import of attention inside model.model_class,
    and a cycle made up by hand, are seen."""
    src = tmp_path / "model.py"
    src.write_text("import numpy\n\ndef model_class():\n    from .attention import AttentionCaptioningModel\n"
                   "    from . import registry\n")
    assert imports_of(src, "rnncap.models.model") == {"numpy", "rnncap.models.attention",
                                                      "rnncap.models.registry"}
    graph = model_graph()
    graph["rnncap.models.model"] = graph["rnncap.models.model"] | {"rnncap.models.attention"}
    assert find_cycle(graph) is not None
