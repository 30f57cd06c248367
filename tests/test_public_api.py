"""The public API at the top of the package: short names, loaded lazily, each documented.

``import rnncap`` must stay cheap (the command line, notebooks and programs all start
there): it imports neither torch nor NumPy, and every name in ``__all__`` loads on first
use. The time is checked against a peer measured in the same run (importing NumPy in a
fresh interpreter), never against a fixed number of seconds.
"""
import importlib
import json
import subprocess
import sys

import pytest

import rnncap

# Names whose arguments or results are arrays: their docstrings give shapes.
ARRAYS = {"CaptioningModel", "AttentionCaptioningModel", "TransformerCaptioningModel", "Ensemble", "Vocab", "extract_features", "load_features",
          "Trainer", "load_checkpoint", "save_checkpoint", "Captioner", "greedy_decode",
          "sample_decode", "beam_search", "evaluate_split"}

PROBE = """
import json, sys, time
t = time.perf_counter()
import {module}
elapsed = time.perf_counter() - t
print(json.dumps({{"s": elapsed, "modules": sorted(sys.modules)}}))
"""


def fresh_import(module):
    out = subprocess.run([sys.executable, "-c", PROBE.format(module=module)], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout)


def test_import_rnncap_loads_neither_torch_nor_numpy_nor_any_submodule():
    before = set(fresh_import("json")["modules"])
    loaded = set(fresh_import("rnncap")["modules"]) - before
    assert loaded == {"rnncap"}, sorted(loaded)


def test_import_rnncap_is_cheaper_than_importing_numpy():
    # best of three each, side by side in this run: a busy machine slows both alike
    ours = min(fresh_import("rnncap")["s"] for _ in range(3))
    numpy = min(fresh_import("numpy")["s"] for _ in range(3))
    assert ours < numpy, f"import rnncap {ours * 1e3:.1f} ms, import numpy {numpy * 1e3:.1f} ms"


@pytest.mark.parametrize("name", [n for n in rnncap.__all__ if n != "__version__"])
def test_each_public_name_is_the_deep_one_and_documented(name):
    value = getattr(rnncap, name)
    deep = getattr(importlib.import_module(rnncap._WHERE[name]), name)
    assert value is deep
    doc = value.__doc__ or ""
    assert len(doc.strip()) > 40, f"{name} has no real docstring"
    if name in ARRAYS:
        assert "(N" in doc or "(D" in doc or "(T" in doc, f"{name}'s docstring gives no shapes"


def test_unknown_names_raise_attribute_error_and_dir_lists_the_api():
    with pytest.raises(AttributeError, match="no_such_name"):
        rnncap.no_such_name  # noqa: B018
    assert set(rnncap.__all__) <= set(dir(rnncap))
    from rnncap import Captioner, CaptioningModel  # the short form the README uses  # noqa: F401


def test_the_readme_python_api_uses_the_short_names():
    import pathlib

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Python API", 1)[1].split("\n## ", 1)[0]
    assert "from rnncap import" in section
    code = [line for line in section.splitlines() if line.startswith(("from rnncap.", "import rnncap."))]
    assert not code, f"deep imports in the README's Python API section: {code}"
