"""examples/walkthrough.ipynb: the notebook matches its percent-format
source (examples/walkthrough.py) and every code cell runs, in order, in one
namespace, as a notebook kernel would run them."""
import json
import os
import runpy

from conftest import ROOT

EXAMPLES = os.path.join(ROOT, "examples")


def test_notebook_is_generated_from_its_source():
    conv = runpy.run_path(os.path.join(ROOT, "scripts", "notebook.py"))
    with open(os.path.join(EXAMPLES, "walkthrough.py")) as f:
        want = conv["render"](f.read())
    with open(os.path.join(EXAMPLES, "walkthrough.ipynb")) as f:
        got = f.read()
    assert got == want, "examples/walkthrough.ipynb is stale: run python scripts/notebook.py examples/walkthrough.py"


def test_walkthrough_cells_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open(os.path.join(EXAMPLES, "walkthrough.ipynb")) as f:
        nb = json.load(f)
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert len(code) >= 10
    ns = {"__name__": "__walkthrough__"}
    for i, cell in enumerate(code):
        exec(compile("".join(cell["source"]), f"walkthrough.ipynb code cell {i + 1}", "exec"), ns)
    # What the last cells left behind: a quantized, saved, served model.
    assert ns["record"]["quantize"] == "int8"
    assert os.path.exists(os.path.join(ns["workdir"], "iris", "manifest.json"))
    assert ns["served"].shape == (5, 3)
