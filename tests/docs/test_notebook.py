"""The walkthrough notebook executes top to bottom (tiny offline model, a few steps), so it cannot rot.

The notebook's cell tagged `parameters` is kept and a cell after it overrides the values (as papermill does), so the
notebook's own defaults (the embedded model) are never executed here.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import nbclient
import nbformat

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "amft_walkthrough.ipynb"

TINY_PARAMETERS = """\
MODEL = "tiny"
OUTPUT_DIR = "nb_out"
MAX_STEPS = 3
SFT_WARMUP_STEPS = 1
META_UPDATE_STEPS = 1
PROMPTS_PER_STEP = 2
NUM_GENERATIONS = 2
MAX_COMPLETION_LENGTH = 8
NUM_TRAIN, NUM_VALIDATION, NUM_EVAL = 8, 4, 4
"""


def _with_tiny_parameters(notebook):
    tagged = [i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, (
        f"expected exactly one cell tagged 'parameters' in {NOTEBOOK}, found {len(tagged)}"
    )
    injected = nbformat.v4.new_code_cell(TINY_PARAMETERS)
    injected.metadata["tags"] = ["injected-parameters"]
    notebook.cells.insert(tagged[0] + 1, injected)
    return notebook


def test_notebook_parameters_cell_defaults_to_the_embedded_model():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    (cell,) = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    namespace: dict = {}
    exec(cell.source, namespace)  # plain assignments only
    assert namespace["MODEL"] is None
    assert namespace["SFT_WARMUP_STEPS"] < namespace["MAX_STEPS"]


def test_notebook_executes(tmp_path, monkeypatch):
    notebook = _with_tiny_parameters(nbformat.read(NOTEBOOK, as_version=4))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # One thread: the tiny model is far faster so on a busy CPU (2 threads spin against other processes).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # The kernel must import amft_trl from this checkout even when it is not installed (e.g. PYTHONPATH=src runs).
    src = str(Path(__file__).resolve().parents[2] / "src")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])))

    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, with the failing cell and traceback, on any error

    errors = [o for c in notebook.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors

    out = tmp_path / "nb_out"
    for name in ("amft_dynamics.png", "comparison.png", "comparison.csv"):
        path = out / name
        assert path.is_file() and path.stat().st_size > 0, f"the notebook did not write {path}"
    with open(out / "comparison.csv") as handle:
        rows = {row["run"]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"AMFT", "GRPO only"}
    assert all(int(row["steps"]) == 3 for row in rows.values())  # the same budget for both runs
    assert int(rows["AMFT"]["validation rollouts"]) > 0  # AMFT took meta steps, GRPO-only none
    assert int(rows["GRPO only"]["validation rollouts"]) == 0

    # The last cell displays the comparison table.
    last_outputs = [c for c in notebook.cells if c.cell_type == "code"][-1]["outputs"]
    shown = "".join(str(o.get("data", {}).get("text/plain", "")) for o in last_outputs)
    assert "GRPO only" in shown and "ID acc. after" in shown
