"""The walkthrough notebook executes top to bottom (tiny offline model, a few steps), so it cannot rot.

The notebook's cell tagged `parameters` is kept and a cell after it overrides the values (as papermill does), so the
notebook's own defaults (the embedded model) are never executed here. A cell appended at the end checks, in the
notebook's kernel, what its visual section (General Points-VL on the tiny VLM) computed.
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

# Run in the notebook's kernel after its last cell: the visual section's training, verifier and evaluation.
VISUAL_CHECKS = """\
steps = [h for h in visual_trainer.state.log_history if "amft/mu" in h]
assert visual_trainer.state.global_step == 2 and len(steps) == 2, steps
assert all("amft/sft_loss" in h for h in steps), steps  # the card-image demonstrations trained at both steps
assert "reward" not in steps[0] and "amft/val_reward" in steps[1], steps  # warm-up; mixed + meta step
assert steps[1]["reward"] == -1.5, steps  # the random VLM reads no card: every rollout scores the wrong reading
# right, cards misread, every card but the wrong result, a number not on the cards (and one unused), no JSON
assert list(verdicts["reward"]) == [5.0, -1.5, -1.0, -4.0, -1.5], verdicts
assert {n: m["num_problems"] for n, m in gp_vl_results.metrics.items()} == {
    "gp_vl_id": 2, "gp_vl_ood_rule": 2, "gp_vl_ood_visual": 2
}
# amft-eval's gp_vl_id deals the test hands of build_general_points_visual_datasets' eval_id
dealt = [json.loads(p["gold"])["cards"] for p in gp_vl_results.benchmarks["gp_vl_id"].problems]
assert dealt == visual_data.eval_id["cards"], (dealt, visual_data.eval_id["cards"])
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

    notebook.cells.append(nbformat.v4.new_code_cell(VISUAL_CHECKS))
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

    # Section 9's cell displays the comparison table; section 10's first cell shows the card image.
    assert "GRPO only" in _shown(notebook, "## 9. Comparison", "text/plain")
    assert "ID acc. after" in _shown(notebook, "## 9. Comparison", "text/plain")
    assert _shown(notebook, "## 10. A visual task", "image/png")


def _shown(notebook, heading: str, mime: str) -> str:
    """What the first code cell after the markdown cell starting with `heading` displayed as `mime`."""
    (start,) = [
        i for i, c in enumerate(notebook.cells) if c.cell_type == "markdown" and c.source.startswith(heading)
    ]
    cell = next(c for c in notebook.cells[start:] if c.cell_type == "code")
    return "".join(str(o.get("data", {}).get(mime, "")) for o in cell["outputs"])
