"""A comparison grid: methods x seeds on one task, read from YAML and checked before anything trains.

```yaml
task: toy_addition              # amft_trl.compare.grid_tasks.TASKS
task_options: {pretrain_steps: 150}
model: toy                      # toy (amft_trl.toy's tiny Qwen2), embedded (SmolLM2-135M-Instruct), a path or hub id
model_options: {hidden_size: 64}  # toy only
seeds: [0, 1, 2, 3, 4]
budget: {max_steps: 40, sft_steps: 10, warmup_steps: 10, eval_every: 10}
training: {learning_rate: 1.0e-3, per_device_train_batch_size: 16, num_generations: 8}  # AMFTConfig, shared
evaluation: {batch_size: 128}   # amft_trl.evaluation.EvalConfig fields
tuning: {seed: 100, max_steps: 40}   # trials run on this seed and budget, scored on the validation split
methods:
  two_stage: {tune: {sft_learning_rate: [1.0e-3, 3.0e-3]}}
  fixed: {args: {mu_init: 0.3}, tune: {mu_init: [0.1, 0.3, 0.5]}}
  amft: {tune: [{meta_learning_rate: 0.05, entropy_learning_rate: 0.05}, {meta_learning_rate: 0.1}]}
  srft: {sweep: {srft_sft_coef: [0.25, 0.5, 1.0]}}   # a knob grid: every value on every seed, nothing chosen
```

A method's settings are, in order of precedence: its tuned value, its `args`, what makes it that method
(`methods.METHODS`), the shared `training`. `tune` is a mapping of field to candidate values (every combination is a
trial) or a list of explicit trials.

`sweep` takes the same two forms, but is a knob grid without tuning: every point runs on every seed of the grid,
on the grid's budget, and nothing is selected; the report gives each method's best, mean and worst accuracy over its
points and the accuracy at its default (`amft_trl.compare.sensitivity`). Besides the method's fields, a point may
set `budget.sft_steps` or `budget.warmup_steps` (e.g. the length of `two_stage`'s SFT stage). A method either
sweeps or tunes (`sweep` with `tune` is refused): to sweep at a tuned value, write that value into `args`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from amft_trl.compare.grid_tasks import TaskError, build_task
from amft_trl.compare.methods import METHODS, REFERENCE, TWO_STAGE_FIELDS, Budget


class GridError(ValueError):
    """A grid that cannot run as written; the message names the entry and what was expected."""


#: `AMFTConfig` fields the runner sets itself for every run (a grid setting them would be silently ignored).
RUNNER_FIELDS = (
    "output_dir",
    "max_steps",
    "num_train_epochs",
    "seed",
    "data_seed",
    "balancing",
    "logging_steps",
    "logging_strategy",
    "save_strategy",
    "save_steps",
    "save_total_limit",
    "report_to",
    "eval_strategy",
    "push_to_hub",
    "overwrite_output_dir",
    "resume_from_checkpoint",
)
TOP_LEVEL = (
    "name",
    "task",
    "task_options",
    "model",
    "model_options",
    "seeds",
    "budget",
    "training",
    "evaluation",
    "tuning",
    "methods",
    "reference",
    "checkpoint_every",
)
MODEL_OPTIONS = ("hidden_size", "num_layers", "vocab_size")


@dataclass
class MethodEntry:
    """One method of a grid: its name, its own settings and its tuning trials (empty: not tuned)."""

    name: str
    args: dict[str, Any] = field(default_factory=dict)
    trials: list[dict[str, Any]] = field(default_factory=list)
    sweep: list[dict[str, Any]] = field(default_factory=list)  # knob points, each run on every seed


#: The budget fields a sweep point may set (`budget.sft_steps: [10, 20, 40]`), for the placement of the SFT phases.
SWEEP_BUDGET_FIELDS = ("budget.sft_steps", "budget.warmup_steps")


@dataclass
class Grid:
    """A checked grid (see the module docstring)."""

    task: str
    task_options: dict[str, Any]
    model: str
    model_options: dict[str, Any]
    seeds: list[int]
    budget: Budget
    training: dict[str, Any]
    evaluation: dict[str, Any]
    methods: dict[str, MethodEntry]
    tuning_seed: int
    tuning_max_steps: int
    reference: str | None
    checkpoint_every: int
    name: str = "comparison"
    raw: dict[str, Any] = field(default_factory=dict)

    def settings(
        self, method: str, trial: dict[str, Any] | None = None, *, budget: Budget | None = None
    ) -> dict:
        """The `AMFTConfig` settings (plus `two_stage`'s own fields) of `method` under `trial`."""
        entry = self.methods[method]
        return {
            **self.training,
            **METHODS[method].settings(budget or self.budget),
            **entry.args,
            **(trial or {}),
        }

    def sweep_point(self, point: dict[str, Any]) -> tuple[dict[str, Any], Budget]:
        """A sweep point's settings (the trial passed to `settings`) and its budget (`budget.*` fields applied)."""
        b = self.budget
        sft = point.get("budget.sft_steps", b.sft_steps)
        warmup = point.get("budget.warmup_steps", b.warmup_steps)
        trial = {k: v for k, v in point.items() if k not in SWEEP_BUDGET_FIELDS}
        return trial, Budget(b.max_steps, sft, warmup, b.eval_every)

    def tuning_budget(self) -> Budget:
        b = self.budget
        return Budget(self.tuning_max_steps, b.sft_steps, b.warmup_steps, self.tuning_max_steps)


def _fail(message: str) -> GridError:
    return GridError(message)


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(f"`{where}` must be a mapping, got {type(value).__name__}.")
    return dict(value)


def _int(value: Any, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _fail(f"`{where}` must be an integer >= {minimum}, got {value!r}.")
    return value


def _amft_fields() -> set[str]:
    from amft_trl import AMFTConfig

    return {f.name for f in fields(AMFTConfig)}


def _check_fields(settings: dict[str, Any], where: str, allowed: set[str]) -> None:
    for key in settings:
        if key in RUNNER_FIELDS:
            raise _fail(f"`{where}.{key}` is set by the runner for every run; remove it from the grid.")
        if key not in allowed:
            raise _fail(f"`{where}.{key}` is not an AMFTConfig field (unknown field).")


def _trials(value: Any, where: str) -> list[dict[str, Any]]:
    if value is None:
        return []
    if isinstance(value, dict):
        keys = list(value)
        for key in keys:
            if not isinstance(value[key], list) or not value[key]:
                raise _fail(f"`{where}.{key}` must be a non-empty list of candidate values.")
        return [dict(zip(keys, combo)) for combo in itertools.product(*(value[k] for k in keys))]
    if isinstance(value, list) and value and all(isinstance(t, dict) and t for t in value):
        return [dict(t) for t in value]
    raise _fail(f"`{where}` must map fields to lists of values, or list trials as mappings; got {value!r}.")


def parse_grid(raw: dict[str, Any]) -> Grid:
    """Check a grid given as a mapping (a YAML file's content) and return it; a `GridError` on the first problem."""
    if not isinstance(raw, dict):
        raise _fail(f"a grid must be a YAML mapping, got {type(raw).__name__}.")
    unknown = sorted(set(raw) - set(TOP_LEVEL))
    if unknown:
        raise _fail(f"unknown grid entry {unknown[0]!r}; a grid has {list(TOP_LEVEL)}.")
    for key in ("task", "seeds", "budget", "methods"):
        if key not in raw:
            raise _fail(f"the grid has no `{key}` entry.")

    seeds = raw["seeds"]
    if not isinstance(seeds, list) or not seeds:
        raise _fail(f"`seeds` must be a non-empty list of integers, got {seeds!r}.")
    seeds = [_int(s, "seeds", 0) for s in seeds]
    if len(set(seeds)) != len(seeds):
        raise _fail(f"`seeds` repeats a seed: {seeds}.")

    b = _mapping(raw["budget"], "budget")
    for key in b:
        if key not in ("max_steps", "sft_steps", "warmup_steps", "eval_every"):
            raise _fail(
                f"unknown field `budget.{key}`; a budget has max_steps, sft_steps, warmup_steps, eval_every."
            )
    if "max_steps" not in b:
        raise _fail("`budget.max_steps` is required: the optimizer steps every method gets.")
    max_steps = _int(b["max_steps"], "budget.max_steps", 1)
    sft_steps = _int(b.get("sft_steps", max(1, max_steps // 4)), "budget.sft_steps", 0)
    warmup = _int(b.get("warmup_steps", sft_steps), "budget.warmup_steps", 0)
    eval_every = _int(b.get("eval_every", max_steps), "budget.eval_every", 1)
    for key, value in (("sft_steps", sft_steps), ("warmup_steps", warmup)):
        if value >= max_steps:
            raise _fail(
                f"`budget.{key}` = {value} must be < budget.max_steps = {max_steps}: no RL steps would be left."
            )
    budget = Budget(max_steps, sft_steps, warmup, eval_every)

    methods_raw = raw["methods"]
    if isinstance(methods_raw, list):
        methods_raw = {m: None for m in methods_raw}
    methods_raw = _mapping(methods_raw, "methods")
    if not methods_raw:
        raise _fail("`methods` is empty.")
    allowed = _amft_fields()
    training = _mapping(raw.get("training"), "training")
    _check_fields(training, "training", allowed)
    methods: dict[str, MethodEntry] = {}
    for name, spec in methods_raw.items():
        if name not in METHODS:
            raise _fail(f"unknown method {name!r}; known methods: {sorted(METHODS)}.")
        spec = _mapping(spec, f"methods.{name}")
        extra = sorted(set(spec) - {"args", "tune", "sweep"})
        if extra:
            raise _fail(
                f"unknown field `methods.{name}.{extra[0]}`; a method takes `args`, `tune` and `sweep`."
            )
        if spec.get("tune") is not None and spec.get("sweep") is not None:
            raise _fail(
                f"`methods.{name}` has both `tune` and `sweep`: a sweep runs every value on every seed and selects "
                "nothing. Sweep at a tuned value by writing it into `args`, or tune without sweeping."
            )
        own = allowed | (set(TWO_STAGE_FIELDS) if METHODS[name].trainer == "two_stage" else set())
        args = _mapping(spec.get("args"), f"methods.{name}.args")
        _check_fields(args, f"methods.{name}.args", own)
        trials = _trials(spec.get("tune"), f"methods.{name}.tune")
        for trial in trials:
            _check_fields(trial, f"methods.{name}.tune", own)
        sweep = _trials(spec.get("sweep"), f"methods.{name}.sweep")
        for point in sweep:
            _check_fields(
                {k: v for k, v in point.items() if k not in SWEEP_BUDGET_FIELDS}, f"methods.{name}.sweep", own
            )
        if len({yaml.safe_dump(p, sort_keys=True) for p in sweep}) != len(sweep):
            raise _fail(f"`methods.{name}.sweep` repeats a point: {sweep}.")
        methods[name] = MethodEntry(name, args, trials, sweep)
    for name, entry in methods.items():
        for point in entry.sweep:
            for key in SWEEP_BUDGET_FIELDS:
                if key in point:
                    value = _int(point[key], f"methods.{name}.sweep.{key}", 0)
                    if value >= max_steps:
                        raise _fail(
                            f"`methods.{name}.sweep.{key}` = {value} must be < budget.max_steps = {max_steps}: "
                            "no RL steps would be left."
                        )
    reference = raw.get("reference")
    if reference is not None and reference not in methods:
        raise _fail(f"`reference` = {reference!r} must be one of the grid's methods {list(methods)}.")
    if reference is None and REFERENCE in methods:
        reference = REFERENCE  # paired differences are taken to two-stage SFT->RL when the grid runs it

    tuning = _mapping(raw.get("tuning"), "tuning")
    extra = sorted(set(tuning) - {"seed", "max_steps"})
    if extra:
        raise _fail(f"unknown field `tuning.{extra[0]}`; tuning has `seed` and `max_steps`.")
    tuning_seed = _int(tuning.get("seed", max(seeds) + 1), "tuning.seed", 0)
    tuning_steps = _int(tuning.get("max_steps", max_steps), "tuning.max_steps", 1)
    if any(m.trials for m in methods.values()):
        needs_sft_phase = [m for m in methods if m in ("two_stage", "sft_then_rl") and methods[m].trials]
        if needs_sft_phase and tuning_steps <= sft_steps:
            raise _fail(
                f"`tuning.max_steps` = {tuning_steps} must exceed budget.sft_steps = {sft_steps}: the tuning trials of "
                f"{needs_sft_phase} would have no RL stage."
            )

    model = raw.get("model", "toy")
    if not isinstance(model, str) or not model:
        raise _fail(f"`model` must be 'toy', 'embedded', a path or a hub id, got {model!r}.")
    model_options = _mapping(raw.get("model_options"), "model_options")
    for key in model_options:
        if model != "toy" or key not in MODEL_OPTIONS:
            raise _fail(f"unknown field `model_options.{key}`; only model: toy takes {list(MODEL_OPTIONS)}.")

    evaluation = _mapping(raw.get("evaluation"), "evaluation")
    from amft_trl.evaluation import EvalConfig

    eval_fields = {f.name for f in fields(EvalConfig)} - {"output_dir", "model_label", "progress", "resume"}
    for key in evaluation:
        if key not in eval_fields:
            raise _fail(f"unknown field `evaluation.{key}`; see amft_trl.evaluation.EvalConfig.")

    checkpoint_every = _int(raw.get("checkpoint_every", max(1, max_steps // 4)), "checkpoint_every", 1)
    task_options = _mapping(raw.get("task_options"), "task_options")
    if not isinstance(raw["task"], str):
        raise _fail(f"`task` must be a task name, got {raw['task']!r}.")
    try:
        build_task(raw["task"], task_options)
    except TaskError as error:
        raise _fail(str(error)) from None
    return Grid(
        task=raw["task"],
        task_options=task_options,
        model=model,
        model_options=model_options,
        seeds=seeds,
        budget=budget,
        training=training,
        evaluation=evaluation,
        methods=methods,
        tuning_seed=tuning_seed,
        tuning_max_steps=tuning_steps,
        reference=reference,
        checkpoint_every=checkpoint_every,
        name=str(raw.get("name", "comparison")),
        raw=raw,
    )


def load_grid(path: str | Path) -> Grid:
    """Read and check a grid YAML file."""
    path = Path(path)
    if not path.is_file():
        raise _fail(f"grid file {str(path)!r} does not exist.")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise _fail(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
    return parse_grid(raw)


def check_against_data(grid: Grid, data: Any) -> None:
    """The checks that need the task's data: demonstrations for the methods that train on them, and sizes.

    Every run's configuration is also built once here (`AMFTConfig`, and the two TRL configs of `two_stage`), with the
    optimizer and learning-rate schedule its trainer will build (`amft_trl.config.check_optimizer_settings`), so a
    setting that the configs, torch or transformers refuse stops the grid before the first run, naming the method,
    rather than in the middle of it.
    """
    for name in grid.methods:
        method = METHODS[name]
        if method.needs_demonstrations and not data.has_demonstrations:
            raise _fail(f"method {name!r} trains on demonstrations, but task {grid.task!r} has none.")
        if method.needs_demonstration_column and not data.has_demonstration_column:
            raise _fail(
                f"method {name!r} reads one demonstration per RL prompt, but task {grid.task!r}'s prompts have no "
                "`demonstration` column."
            )
    from amft_trl.compare.configs import build_configs
    from amft_trl.config import check_optimizer_settings

    for name, entry in grid.methods.items():
        if entry.sweep:
            cases = [(*grid.sweep_point(p), p) for p in entry.sweep]
        else:
            budgets = (grid.budget, grid.tuning_budget()) if entry.trials else (grid.budget,)
            cases = [(trial, budget, trial) for trial in entry.trials or [None] for budget in budgets]
        for trial, budget, shown in cases:
            where = f"method {name!r}" + (
                f" ({'sweep point' if entry.sweep else 'trial'} {shown})" if shown else ""
            )
            try:
                configs = build_configs(grid, name, trial, budget=budget, output_dir="/nonexistent", seed=0)
            except (ValueError, TypeError) as error:
                raise _fail(f"{where}: {str(error).splitlines()[0]}") from None
            for config in configs:  # AMFTConfig checks its own at construction; TRL's configs do not
                try:
                    check_optimizer_settings(config, config.max_steps)
                except ValueError as error:
                    stage = f", its {type(config).__name__} stage" if len(configs) > 1 else ""
                    raise _fail(f"{where}{stage}: {str(error).splitlines()[0]}") from None
            rl = configs[-1]
            per_step = rl.per_device_train_batch_size * rl.gradient_accumulation_steps
            prompts_per_step = max(1, per_step // rl.num_generations)
            if prompts_per_step > len(data.train):
                raise _fail(
                    f"method {name!r}: a step needs {prompts_per_step} RL prompts but the task has "
                    f"{len(data.train)}."
                )
            val_batch = getattr(rl, "meta_val_batch_size", 0)
            if method_needs_val(name, rl) and val_batch > len(data.val):
                raise _fail(
                    f"method {name!r}: meta_val_batch_size = {val_batch} exceeds the {len(data.val)} validation "
                    "prompts of the task."
                )


def method_needs_val(name: str, config: Any) -> bool:
    return METHODS[name].needs_val and getattr(config, "meta_learning_rate", 0) > 0
