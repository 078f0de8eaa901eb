"""Starting checkpoints shipped with the package, so that a published toy comparison starts from the same weights
on any machine.

`model: toy` builds its starting model (a tiny random Qwen2 and a tokenizer trained on the fly, then the task's short
SFT pre-training). That build is bit-reproducible on one host, but not across hosts (floating-point kernels and
thread counts differ): rerun elsewhere, the toy grids' starting model came out different (issue 25). The committed
toy grids' starting model is therefore shipped here, as it was built on the host that made the published results,
with its recipe (task, resolved task options, resolved toy model options) and its parameter checksum
(`amft_trl.compare.runs.parameter_checksum`, the `start_checksum` of their `base_eval.json`). A grid whose recipe
is a shipped one starts from the shipped checkpoint; any other recipe is built as before.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
MANIFEST = HERE / "shipped.json"


def recipe(task_name: str, task: Any, model_options: dict[str, Any]) -> dict[str, Any]:
    """What a toy starting model is built from, every default resolved: the task, its options, the model's options."""
    from amft_trl import toy

    defaults = {
        name: p.default
        for fn in (toy.build_model, toy.build_tokenizer)
        for name, p in inspect.signature(fn).parameters.items()
        if p.default is not inspect.Parameter.empty and name != "seed"
    }
    return json.loads(
        json.dumps(
            {
                "task": task_name,
                "task_options": asdict(task.options),
                "model_options": {**defaults, **model_options},
            }
        )
    )


def shipped() -> dict[str, dict[str, Any]]:
    """The shipped checkpoints: directory name -> {"recipe": ..., "checksum": ...}."""
    return json.loads(MANIFEST.read_text())


def find(task_name: str, task: Any, model_options: dict[str, Any]) -> tuple[Path, str] | None:
    """(the shipped checkpoint's directory, its parameter checksum) for this recipe, or None."""
    wanted = recipe(task_name, task, model_options)
    for name, entry in shipped().items():
        if entry["recipe"] == wanted:
            return HERE / name, entry["checksum"]
    return None
