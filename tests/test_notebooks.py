"""The notebooks in notebooks/: each runs top to bottom without an error, none is committed
with outputs, and each is what notebooks/build.py writes.

Every notebooks/*.ipynb found is executed (a new one is picked up without editing this
file) with nbclient on the ``python3`` kernel of this interpreter, from the notebooks
folder, as Jupyter runs it. Their work files go to a temporary folder
(RNNCAP_NOTEBOOK_OUT). 03 is also run with its data pointed at a folder that does not
exist, which must skip cleanly.
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
FLICKR8K = ROOT.parent / "shared" / "data" / "flickr8k"

nbformat = pytest.importorskip("nbformat", reason="the notebooks extra: pip install 'rnncap[notebooks]'")
nbclient = pytest.importorskip("nbclient", reason="the notebooks extra: pip install 'rnncap[notebooks]'")
pytest.importorskip("ipykernel", reason="the notebooks extra: pip install 'rnncap[notebooks]'")


def execute(path, env, timeout=600):
    """Run the notebook in a kernel whose environment is this process's plus ``env``."""
    nb = nbformat.read(path, as_version=4)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits the environment at its start
    os.environ.setdefault("MPLBACKEND", "Agg")
    try:
        client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                         resources={"metadata": {"path": str(path.parent)}})
        client.execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb


def outputs_text(nb):
    return "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


def test_there_are_notebooks():
    assert {p.name for p in NOTEBOOKS} >= {"01_layers.ipynb", "02_captioning_model.ipynb",
                                           "03_real_photos.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebooks_have_no_outputs(path):
    nb = json.loads(path.read_text())
    dirty = [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"
             and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, f"{path.name}: cells {dirty} hold outputs; clear them (python notebooks/build.py)"


def test_notebooks_are_what_the_build_script_writes():
    out = subprocess.run([sys.executable, str(ROOT / "notebooks" / "build.py"), "--check"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_top_to_bottom(path, tmp_path):
    if path.name.startswith("03") and not FLICKR8K.exists():
        pytest.skip(f"{FLICKR8K} is absent (the run without data is tested below)")
    env = {"RNNCAP_NOTEBOOK_OUT": str(tmp_path)}
    if path.name.startswith("03"):
        env["RNNCAP_FLICKR8K"] = str(FLICKR8K)
    nb = execute(path, env)
    assert "skipped" not in outputs_text(nb)


def test_real_photos_notebook_skips_cleanly_without_the_data(tmp_path):
    path = ROOT / "notebooks" / "03_real_photos.ipynb"
    nb = execute(path, {"RNNCAP_NOTEBOOK_OUT": str(tmp_path),
                        "RNNCAP_FLICKR8K": str(tmp_path / "no-flickr8k-here")})
    text = outputs_text(nb)
    assert "is not at" in text and "rnncap download flickr8k" in text
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert all("skipped: no Flickr8k" in outputs_text(nbformat.v4.new_notebook(cells=[c]))
               for c in code_cells[1:])
    assert not any(tmp_path.iterdir()), "the skipped notebook wrote files"
