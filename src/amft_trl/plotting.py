"""Training-dynamics plots of an AMFT run, the ones the paper draws, from a log history in one call.

```python
from amft_trl.plotting import plot_training_dynamics

plot_training_dynamics(trainer)            # -> <output_dir>/training_dynamics.png
plot_training_dynamics("outputs/run")      # reads trainer_state.json (or that of the latest checkpoint-*)
plot_training_dynamics(trainer.state.log_history, "dynamics.png", extra={"held-out accuracy": [(0, 0.1), (400, 0.8)]})
```

Two panels over optimizer steps: (1) train reward, validation reward (`amft/val_reward`) and any logged
`eval_*accuracy*` or user-supplied series, with the weights on a second y-axis: mu (`amft/mu`, the SFT weight each
step used, for every strategy) and the strategy's own signals (CHORD's scheduled mu, HPT's fraction of prompts sent
to SFT, SRFT's positive-rollout weight, LUFFY's off-policy token share and mean shaped weight, ReLIFT's buffer fill and its SFT steps); (2) the token entropy H_t on demonstrations (`amft/entropy`) with the
target H* (`amft/target_entropy`) dashed, or, for strategies that do not measure it, the rollouts' entropy that TRL
logs. The SFT warm-up (logged steps with mu but neither reward nor entropy, before the first that has one) is
shaded.

Needs matplotlib (`pip install amft-trl[plot]`). The figure is drawn with matplotlib's object API on an Agg
canvas, so it needs no display and leaves pyplot's global state and backend alone.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

DEFAULT_FILENAME = "training_dynamics.png"

_REWARD_SERIES = (
    ("reward", "train reward"),
    ("amft/val_reward", "validation reward (meta steps)"),
    ("eval_reward", "eval reward"),
)
_EVAL_ACCURACY = re.compile(r"^eval_.*accuracy.*$")
# The weights' axis: `amft/mu` for every strategy, then each strategy's own signals (drawn when logged).
_WEIGHT_SERIES = (
    ("amft/chord_mu", "CHORD: scheduled mu", "tab:brown"),
    ("amft/hpt_sft_fraction", "HPT: prompts sent to SFT", "tab:olive"),
    ("amft/srft_rl_weight", "SRFT: positive-rollout weight", "tab:cyan"),
    ("amft/luffy_off_policy_fraction", "LUFFY: off-policy token share", "tab:pink"),
    ("amft/luffy_importance_weight", "LUFFY: mean weight p/(p+gamma)", "tab:green"),
    ("amft/relift_buffer_fill", "ReLIFT: buffer fill", "tab:red"),
    ("amft/relift_sft_step", "ReLIFT: SFT step", "tab:orange"),
)


def plot_training_dynamics(
    source: Any,
    output_path: str | os.PathLike | None = None,
    *,
    title: str | None = None,
    extra: Mapping[str, Sequence[tuple[int, float]]] | None = None,
) -> Path:
    """Draw mu, reward/accuracy and entropy over steps of an AMFT run to a PNG, and return its path.

    Args:
        source: the run's log history: a list of log dicts (`trainer.state.log_history`), a `Trainer` or
            `TrainerState`, or a path: an output directory (its `trainer_state.json`, else that of its latest
            `checkpoint-*`), a `trainer_state.json`, or a JSON list of log dicts (e.g. a saved `log_history`).
            An output directory has a `trainer_state.json` only when the run wrote one: `trainer.save_state()`
            after training, or a checkpoint (`save_strategy` other than `"no"`).
        output_path: the PNG to write. Default: `training_dynamics.png` in the output directory when `source`
            is a directory or a `Trainer` (its `args.output_dir`), next to the file when `source` is a file;
            required for a list or a `TrainerState`.
        title: figure title.
        extra: more series for the reward panel, `{label: [(step, value), ...]}` (e.g. held-out accuracy
            measured by a script at a few steps).

    Raises:
        ValueError: the history has no AMFT metrics (`amft/...`), or `output_path` is needed and missing.
        FileNotFoundError: a path source holds no trainer state.
        ImportError: matplotlib is not installed.
    """
    history, default_dir = _load_history(source)
    if not any(isinstance(key, str) and key.startswith("amft/") for entry in history for key in entry):
        raise ValueError(
            "no amft/mu in log history: is this an AMFTTrainer run? "
            f"({len(history)} log entries, none with the amft/* metrics the plot draws)"
        )

    if output_path is None:
        if default_dir is None:
            raise ValueError(
                f"output_path is required when the source is a {type(source).__name__} "
                "(it defaults to <output dir>/training_dynamics.png only for a directory, file or Trainer)"
            )
        output_path = Path(default_dir) / DEFAULT_FILENAME
    output_path = Path(output_path)

    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "plot_training_dynamics needs matplotlib: `pip install matplotlib` or `pip install amft-trl[plot]`"
        ) from error

    fig = Figure(figsize=(8, 6.5), layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True)

    warmup_end = _warmup_end(history)
    for axis in (top, bottom):
        if warmup_end is not None:
            axis.axvspan(0, warmup_end, color="0.92", zorder=0, label="SFT warm-up" if axis is top else None)
        axis.grid(True, alpha=0.3)

    # Panel 1: reward / accuracy, mu on a twin axis.
    drawn = False
    for key, label in _REWARD_SERIES:
        drawn |= _draw(top, _series(history, key), label=label, marker_if_sparse=True)
    accuracy_keys = sorted(
        {k for entry in history for k in entry if isinstance(k, str) and _EVAL_ACCURACY.match(k)}
    )
    for key in accuracy_keys:
        drawn |= _draw(
            top, _series(history, key), label=key.removeprefix("eval_").replace("_", " "), marker="s"
        )
    for label, points in (extra or {}).items():
        points = sorted((int(s), float(v)) for s, v in points if v is not None and math.isfinite(float(v)))
        drawn |= _draw(top, points, label=label, marker="o", linestyle=":", linewidth=1.5)
    top.set_ylabel("reward / accuracy")
    if not drawn:
        top.text(
            0.5, 0.5, "no reward logged yet", transform=top.transAxes, ha="center", va="center", color="0.5"
        )

    mu_axis = top.twinx()
    mu = _series(history, "amft/mu")
    _draw(mu_axis, mu, label="mu (SFT weight)", color="black", linestyle="--")
    highest = max([1.0] + [v for _, v in mu])
    for key, label, color in _WEIGHT_SERIES:
        points = _series(history, key)
        if _draw(mu_axis, points, label=label, color=color, linestyle="-.", marker_if_sparse=True):
            highest = max([highest] + [v for _, v in points])
    mu_axis.set_ylim(-0.03, highest + 0.03)
    mu_axis.set_ylabel("mu (SFT weight) / strategy weights")
    handles, labels = [], []
    for axis in (top, mu_axis):
        h, lab = axis.get_legend_handles_labels()
        handles += h
        labels += lab
    # Above the panel: inside it, the legend would hide mu at 1.0 during the warm-up.
    top.legend(
        handles,
        labels,
        loc="lower left",
        bbox_to_anchor=(0.0, 1.01, 1.0, 0.1),
        mode="expand",
        ncol=3,
        fontsize="small",
        frameon=False,
    )

    # Panel 2: entropy H_t and its target H* (or, when H_t is not measured, the rollouts' entropy TRL logs).
    entropy = _series(history, "amft/entropy")
    _draw(bottom, entropy, label="entropy H_t", color="tab:purple")
    if not entropy:
        entropy = _series(history, "entropy")
        _draw(bottom, entropy, label="rollout entropy (TRL)", color="tab:gray")
    target = _series(history, "amft/target_entropy")
    if target:
        values = {value for _, value in target}
        if len(values) == 1:
            bottom.axhline(
                target[0][1], color="tab:red", linestyle="--", label=f"target H* = {target[0][1]:.3f}"
            )
        else:
            _draw(bottom, target, label="target H*", color="tab:red", linestyle="--")
    if entropy or target:
        bottom.legend(loc="best", fontsize="small", framealpha=0.85)
    else:
        bottom.text(
            0.5,
            0.5,
            "no entropy logged (warm-up only?)",
            transform=bottom.transAxes,
            ha="center",
            color="0.5",
        )
    bottom.set_ylabel("nats / token")
    bottom.set_xlabel("optimizer step")
    bottom.set_title(
        "token entropy on demonstrations" if _series(history, "amft/entropy") else "token entropy",
        fontsize="medium",
    )
    if title:
        fig.suptitle(title)

    output_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output_path, dpi=110)
    return output_path


def _load_history(source: Any) -> tuple[list[dict], Path | None]:
    """(log history, directory for the default output) from any accepted source."""
    if isinstance(source, (str, os.PathLike)):
        return _history_from_path(Path(source))
    state = getattr(source, "state", None)
    if state is not None and hasattr(state, "log_history"):  # a Trainer
        output_dir = getattr(getattr(source, "args", None), "output_dir", None)
        return list(state.log_history), Path(output_dir) if output_dir else None
    if hasattr(source, "log_history"):  # a TrainerState
        return list(source.log_history), None
    if isinstance(source, Sequence) and all(isinstance(entry, Mapping) for entry in source):
        return list(source), None
    raise TypeError(
        "source must be a list of log dicts, a Trainer, a TrainerState, an output directory or a "
        f"trainer_state.json path, got {type(source).__name__}"
    )


def _history_from_path(path: Path) -> tuple[list[dict], Path]:
    if path.is_dir():
        state_file = path / "trainer_state.json"
        if not state_file.is_file():
            checkpoints = [
                c for c in path.glob("checkpoint-*") if c.name.split("-")[-1].isdigit() and c.is_dir()
            ]
            checkpoints = [c for c in checkpoints if (c / "trainer_state.json").is_file()]
            if not checkpoints:
                raise FileNotFoundError(
                    f"no trainer_state.json in {path} or in a checkpoint-* directory under it: the run's log history "
                    "is written there by `trainer.save_state()` (call it after `trainer.train()`) or with every "
                    "checkpoint (a save_strategy other than 'no'; the CPU recipes set 'no'). Without it, plot from the "
                    "training script: plot_training_dynamics(trainer), or pass trainer.state.log_history."
                )
            state_file = max(checkpoints, key=lambda c: int(c.name.split("-")[-1])) / "trainer_state.json"
        return _read_history(state_file), path
    if path.is_file():
        return _read_history(path), path.parent
    raise FileNotFoundError(f"{path} does not exist: expected an output directory or a trainer_state.json")


def _read_history(path: Path) -> list[dict]:
    data = json.loads(path.read_text())
    if isinstance(data, dict) and isinstance(data.get("log_history"), list):
        return data["log_history"]
    if isinstance(data, list):
        return data
    raise ValueError(f"{path} holds neither a trainer state (with log_history) nor a list of log dicts")


def _series(history: list[dict], key: str) -> list[tuple[int, float]]:
    points = []
    for entry in history:
        value = entry.get(key)
        if "step" not in entry or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            points.append((int(entry["step"]), float(value)))
    return points


def _warmup_end(history: list[dict]) -> int | None:
    """Last logged step of the SFT warm-up: entries with mu but neither reward nor entropy, before the first that
    has one. None if there is no such entry, or if no entry ever has reward or entropy (then it cannot be told
    from an SFT-only run)."""
    last = None
    for entry in history:
        if "amft/mu" not in entry or "step" not in entry:
            continue
        if "reward" in entry or "amft/entropy" in entry:
            return last
        last = int(entry["step"])
    return None


def _draw(axis, points: list[tuple[int, float]], *, marker_if_sparse: bool = False, **kwargs) -> bool:
    if not points:
        return False
    steps, values = zip(*points)
    if marker_if_sparse and "marker" not in kwargs and len(points) <= 20:
        kwargs["marker"] = "."
    if len(points) == 1 and "marker" not in kwargs:
        kwargs["marker"] = "o"
    axis.plot(steps, values, **kwargs)
    return True
