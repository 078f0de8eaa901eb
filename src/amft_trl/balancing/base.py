"""What a balancing strategy is: the interface between `AMFTTrainer` and the rule that weighs SFT against RL.

Every strategy optimises, at optimizer step t,

    L_t = w_RL(t) * L_RL + w_SFT(t) * L_SFT

where `L_RL` is TRL's GRPO loss on this step's on-policy rollouts (whatever `loss_type`) and `L_SFT` the token-mean
NLL of a batch of demonstrations (AMFT paper, Eq. 2). The strategy decides, once per step and before it runs,
what the step does (`plan` -> `StepPlan`): the two scalar weights, whether rollouts are generated at all, whether an
SFT batch is drawn, and which measurements it wants. The base class plans the shared SFT warm-up (`sft_warmup_steps`
of pure SFT, Algorithm 2 of the AMFT paper, lines 6-10) for every strategy; a strategy plans only the steps after it
(`plan_after_warmup`). It may refine the scalars per token of the demonstrations
(`sft_token_weights`, e.g. CHORD's phi) and per rollout (`rl_advantages`, e.g. SRFT's entropy weights, HPT's gate):
per-rollout weights act through GRPO's advantages, so TRL's loss is reused as it is. After
the step the trainer hands the strategy what it measured (`record`), and the strategy updates itself in
`on_step_end`, after the optimizer step (it is a `TrainerCallback`).

A strategy owns its state: `state_dict` / `load_state_dict` are saved in every checkpoint (`amft_state.json`), so a
resumed run continues exactly. What it wants logged goes through `log_values` (per step, under `amft/*`).

To add a strategy: subclass `BalancingStrategy` and implement `plan_after_warmup` (or subclass `MuStrategy` for the
`(1 - mu, mu)` family and implement `mu_at`) in one module of this package, add it to the registry in
`balancing/__init__.py`, add its fields to `AMFTConfig`, and test it. The trainer does not change.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from transformers import TrainerCallback


@dataclass(frozen=True)
class StepPlan:
    """What one optimizer step does, fixed before its first micro-step.

    Attributes:
        rl_weight: w_RL, the factor on GRPO's loss.
        sft_weight: w_SFT, the factor on the SFT loss.
        rl: generate rollouts and take GRPO's loss. False: no rollouts are generated this step.
        sft: run the SFT term on demonstrations this step (a forward, and a backward when `sft_weight > 0`).
        warmup: an SFT warm-up step (Algorithm 2 of the AMFT paper, lines 6-10); logged as `amft/mu = 1`.
        measure_entropy: measure H_t, the token entropy (temperature 1) on the step's SFT batch.
        measure_target_entropy: measure H* on a fixed subset of the demonstrations before the step (once).
        meta: take the meta-gradient of Eq. 25 (validation rollouts, grad U) this step.
    """

    rl_weight: float
    sft_weight: float
    rl: bool = True
    sft: bool = True
    warmup: bool = False
    measure_entropy: bool = False
    measure_target_entropy: bool = False
    meta: bool = False

    @staticmethod
    def warmup_step() -> StepPlan:
        """A pure-SFT warm-up step: no rollouts, SFT at weight 1."""
        return StepPlan(rl_weight=0.0, sft_weight=1.0, rl=False, sft=True, warmup=True)


@dataclass
class StepMeasurements:
    """What the trainer measured during one optimizer step (scalars, global over processes; None: not measured)."""

    entropy: float | None = None  # H_t: token-mean entropy (temperature 1) on this step's SFT batch
    meta_gradient: float | None = None  # raw g_mu of Eq. 25 (None: not a meta step, or skipped)
    grad_utility_dot_direction: float | None = None  # <grad U, grad L_SFT - grad L_RL>
    grad_utility_norm: float | None = None  # |grad U|
    direction_norm: float | None = None  # |grad L_SFT - grad L_RL| (only with `meta_diagnostics`)
    cosine: float | None = None  # cos(grad U, -(grad L_SFT - grad L_RL)) (only with `meta_diagnostics`)
    val_reward: float | None = None  # mean reward of the validation rollouts (NaN: every reward was None/NaN)
    sft_weight_mean: float | None = None  # mean effective SFT weight per demonstration token trained
    sft_prompt_fraction: float | None = (
        None  # fraction of the step's RL prompts trained on their demonstration
    )
    plan: StepPlan | None = None  # the plan the step ran (set by the trainer before `record`)


@dataclass
class RolloutBatch:
    """What a strategy may read about one micro-batch of this process's rollouts, to weight them.

    Attributes:
        advantages: (B,) GRPO's advantages (group-normalised rewards, as TRL computed them).
        rewards: (B,) total reward of each rollout (the reward functions' weighted sum), NaN when unscorable.
        group_rewards: (B, G) the total rewards of each rollout's whole group (its prompt's `num_generations`
            rollouts, on every process).
        completion_mask: (B, C) the completion tokens of each rollout.
        entropies: (B, C) per-token entropies of the rollouts under the current policy (at the sampling
            temperature), only when the strategy sets `rl_weights_need_entropy`; None otherwise.
        demonstrations: one demonstration per rollout, from the RL dataset's column (strategies whose
            `sft_source` is `"train_column"`), else None.
    """

    advantages: torch.Tensor
    rewards: torch.Tensor
    group_rewards: torch.Tensor
    completion_mask: torch.Tensor
    entropies: torch.Tensor | None = None
    prompts: list[Any] | None = None
    demonstrations: list[Any] | None = None


class BalancingStrategy(TrainerCallback):
    """Base class of the balancing strategies (see the module docstring).

    Class attributes a strategy sets:
        name: its registry name (`AMFTConfig.balancing`).
        config_fields: the `AMFTConfig` fields it reads besides the shared ones; the config warns when a field of
            another strategy is set away from its default (it would be ignored).
        sft_source: where demonstrations come from. `"dataset"`: `AMFTTrainer(sft_dataset=...)`, drawn in a seeded
            stream. `"train_column"`: one demonstration per RL prompt, from a column of `train_dataset` (HPT); which
            optimizer step trains which is `amft_trl.attached_demonstrations`' rule.
        sft_token_weights_need_entropy / rl_weights_need_entropy: whether `sft_token_weights` / `rl_advantages`
            read entropies (the trainer then computes them in the same forward pass).
    """

    name: ClassVar[str] = ""
    config_fields: ClassVar[tuple[str, ...]] = ()
    sft_source: ClassVar[str] = "dataset"
    sft_token_weights_need_entropy: ClassVar[bool] = False
    rl_weights_need_entropy: ClassVar[bool] = False

    def __init__(self, sft_warmup_steps: int = 0):
        if not isinstance(sft_warmup_steps, int) or sft_warmup_steps < 0:
            raise ValueError(f"`sft_warmup_steps` must be an integer >= 0, got {sft_warmup_steps!r}.")
        self.sft_warmup_steps = sft_warmup_steps
        self._pending: StepMeasurements | None = None
        self._logs: dict[str, list[float]] = defaultdict(list)

    # ---- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, args: Any) -> BalancingStrategy:
        """Build the strategy from an `AMFTConfig` (its `sft_warmup_steps` already resolved)."""
        return cls(sft_warmup_steps=args.sft_warmup_steps)

    @classmethod
    def check_config(cls, args: Any) -> None:
        """Validate this strategy's `AMFTConfig` fields; raise a `ValueError` that names the field. Called by the config."""

    @classmethod
    def check_run_length(
        cls, sft_warmup_steps: int, total_steps: int, source: str, stacklevel: int = 2
    ) -> None:
        """Warn when the SFT warm-up covers the whole run: `total_steps` optimizer steps, all of them warm-up, so no
        rollout is ever generated. Called by `AMFTConfig` when `max_steps` is set, else at `train()` once the step
        count is known (`source` says where it comes from). `SFTThenRLStrategy` refuses a stage longer than the
        run."""
        if 0 < total_steps <= sft_warmup_steps:
            warnings.warn(
                no_rl_step_message(cls.name, sft_warmup_steps, total_steps, source), stacklevel=stacklevel
            )

    @classmethod
    def default_sft_warmup_steps(cls) -> int | None:
        """`sft_warmup_steps` when the config leaves it None (None: the strategy needs it set explicitly)."""
        return 0

    @property
    def needs_sft_dataset(self) -> bool:
        """Whether `AMFTTrainer(sft_dataset=...)` is required: the SFT warm-up, if any, draws from it, and so may the
        steps after it (`needs_sft_dataset_after_warmup`)."""
        return self.sft_warmup_steps > 0 or self.needs_sft_dataset_after_warmup

    @property
    def needs_sft_dataset_after_warmup(self) -> bool:
        """Whether the steps after the warm-up draw demonstrations from `sft_dataset` (default: the strategy's
        `sft_source` is `"dataset"`). Override it to say "never" (e.g. mu pinned at 0, or demonstrations from the
        RL dataset); the warm-up's need is the base class's."""
        return self.sft_source == "dataset"

    @property
    def uses_rollouts(self) -> bool:
        """Whether any step generates rollouts (so `train_dataset` must feed the reward functions)."""
        return True

    @property
    def needs_val_dataset(self) -> bool:
        """Whether `AMFTTrainer(val_dataset=...)` is required (the meta-gradient of Eq. 25)."""
        return False

    def check_datasets(self, *, train_dataset: Any, sft_dataset: Any, val_dataset: Any) -> None:
        """Strategy-specific dataset checks at construction (e.g. a column it reads); raise a `ValueError`."""

    # ---- what the trainer asks, per step ------------------------------------------------------------------------
    def is_warmup_step(self, global_step: int) -> bool:
        """Whether optimizer step `global_step` (0-based, the one about to run) is an SFT warm-up step."""
        return global_step < self.sft_warmup_steps

    def plan(self, global_step: int) -> StepPlan:
        """What optimizer step `global_step` (0-based) does: the SFT warm-up plan (`StepPlan.warmup_step`) during the
        first `sft_warmup_steps` steps, `plan_after_warmup(global_step)` after them. Strategies implement
        `plan_after_warmup`, not this."""
        if self.is_warmup_step(global_step):
            return StepPlan.warmup_step()
        return self.plan_after_warmup(global_step)

    def plan_after_warmup(self, global_step: int) -> StepPlan:
        """What optimizer step `global_step` (0-based, `>= sft_warmup_steps`) does: the strategy's own rule. Must
        depend only on the step and the saved state; `global_step` counts the warm-up steps too."""
        raise NotImplementedError(f"{type(self).__name__} must implement `plan_after_warmup`.")

    def sft_token_weights(
        self, logps: torch.Tensor, entropies: torch.Tensor | None, mask: torch.Tensor
    ) -> torch.Tensor | None:
        """Per-token weights (B, C) on the demonstrations' NLL, detached, on top of `StepPlan.sft_weight`.

        `logps` are the tokens' log-probabilities (temperature 1), `entropies` the per-token entropies (only when
        `sft_token_weights_need_entropy`), `mask` the completion mask. None: every token weighs 1.
        """
        return None

    def rl_advantages(self, rollouts: RolloutBatch) -> torch.Tensor | None:
        """The advantages (B,) GRPO's loss uses for this micro-batch, on top of `StepPlan.rl_weight`; None: GRPO's own.

        Per-rollout weights w_i are `rollouts.advantages * w`; a strategy may also replace the advantages (SRFT).
        TRL's loss is unchanged otherwise: its clipping, its normalisation over the generation batch's tokens, and its
        KL term (`beta > 0`), which no per-rollout weight touches.
        """
        return None

    def sft_gate(self, rollouts: RolloutBatch) -> torch.Tensor:
        """(B,) bool: which rollouts' prompts are trained on their own demonstration (strategies whose `sft_source`
        is `"train_column"`), decided once per generation batch; each prompt counts once however many rollouts it
        has, and is trained at the optimizer step that owns it (`amft_trl.attached_demonstrations`)."""
        raise NotImplementedError(f"{type(self).__name__} takes its demonstrations from sft_dataset.")

    def buffered_demonstrations(self) -> list[tuple[Any, Any]] | None:
        """The (prompt, demonstration) pairs the step just planned trains on instead of an `sft_dataset` batch (ReLIFT's
        buffer); None: the step's SFT batch, if any, comes from `sft_dataset`. Asked once per step, after `plan`."""
        return None

    def set_target_entropy(self, value: float) -> None:
        """Receive H*, measured when the plan asked for it (`measure_target_entropy`)."""
        raise NotImplementedError(f"{type(self).__name__} does not use a target entropy.")

    # ---- what the trainer tells ---------------------------------------------------------------------------------
    def record(self, measurements: StepMeasurements) -> None:
        """This step's measurements (`measurements.plan` is its plan), handed over before the optimizer step of every
        step that is not a warm-up step; consumed by the next `on_step_end`."""
        self._pending = measurements

    def update(self, measurements: StepMeasurements) -> None:
        """Update the strategy's state after the optimizer step of a step it planned (not called in warm-up)."""

    def on_train_begin(self, args, state, control, **kwargs):
        # the step count of an epoch-based run is known only now; a set `max_steps` was checked by AMFTConfig
        if not (args.max_steps > 0 and getattr(args, "sft_warmup_steps", None) == self.sft_warmup_steps):
            self.check_run_length(
                self.sft_warmup_steps,
                state.max_steps,
                f"the run's length at train(): {args.num_train_epochs} epochs of the training set"
                if args.max_steps <= 0
                else "max_steps",
                stacklevel=3,
            )
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self._pending is not None:
            measurements, self._pending = self._pending, None
            self.update(measurements)
        return control

    # ---- logging ------------------------------------------------------------------------------------------------
    def log(self, key: str, value: float) -> None:
        """Queue `value` for the metric `amft/<key>` (logged at the trainer's next log call)."""
        self._logs[key].append(float(value))

    def log_values(self) -> dict[str, list[float]]:
        """The queued per-step values, emptied (the trainer logs them under `amft/<key>`)."""
        logs, self._logs = dict(self._logs), defaultdict(list)
        return logs

    def logged_mu(self, plan: StepPlan, measurements: StepMeasurements) -> float:
        """What `amft/mu` reports for a step: the SFT weight it used, i.e. the mean effective weight per token."""
        if plan.warmup:
            return 1.0
        if measurements.sft_weight_mean is not None:
            return measurements.sft_weight_mean
        return plan.sft_weight if plan.sft else 0.0

    # ---- checkpointing ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly (JSON-serialisable)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = None


class MuStrategy(BalancingStrategy):
    """The `(1 - mu, mu)` family of Eq. 3: `L = (1 - mu) * L_RL + mu * L_SFT`, after `sft_warmup_steps` of pure SFT.

    A subclass only says what mu is at a step (`mu_at`). At mu = 0 no SFT batch is drawn and no SFT forward runs;
    at mu = 1 no rollouts are generated.
    """

    def mu_at(self, global_step: int) -> float:
        """The SFT weight mu of optimizer step `global_step` (a mixed step, after the warm-up)."""
        raise NotImplementedError(f"{type(self).__name__} must implement `mu_at`.")

    def plan_after_warmup(self, global_step: int) -> StepPlan:
        mu = float(self.mu_at(global_step))
        return StepPlan(rl_weight=1.0 - mu, sft_weight=mu, rl=mu < 1.0, sft=mu > 0.0)


def no_rl_step_message(name: str, sft_warmup_steps: int, total_steps: int, source: str) -> str:
    """What `check_run_length` says when the warm-up leaves no step of the strategy (naming both numbers)."""
    strategy = f"balancing={name!r}" if name else "the strategy"
    return (
        f"sft_warmup_steps={sft_warmup_steps} covers the whole run of {total_steps} optimizer steps ({source}): "
        f"every step is an SFT warm-up step, so {strategy} never runs and no rollout is generated. Set "
        f"sft_warmup_steps below {total_steps} (amft and fixed default to 50, the paper's W), or train for more "
        "steps."
    )


def check_fraction(args: Any, name: str) -> None:
    """Raise a `ValueError` naming `name` unless `args.<name>` is a number in [0, 1] (config checks)."""
    value = getattr(args, name)
    if not (isinstance(value, int | float) and 0.0 <= value <= 1.0):
        raise ValueError(f"`{name}` must be a number in [0, 1], got {value!r}.")


def check_nonnegative(args: Any, name: str, allow_none: bool = False, note: str = "") -> None:
    """Raise a `ValueError` naming `name` unless `args.<name>` is a finite number >= 0 (or None, if allowed)."""
    value = getattr(args, name)
    if value is None and allow_none:
        return
    if not (
        isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    ):
        expected = "None or a finite number >= 0" if allow_none else "a finite number >= 0"
        raise ValueError(f"`{name}` must be {expected}{note}, got {value!r}.")


def check_demonstration_column_field(args: Any, strategy: str) -> None:
    """Raise a `ValueError` unless `args.<strategy>_demonstration_column` names a column (a non-empty string): the
    config check of a strategy that reads each prompt's demonstration from a column of `train_dataset`."""
    field = f"{strategy}_demonstration_column"
    value = getattr(args, field)
    if not isinstance(value, str) or not value:
        raise ValueError(
            f"balancing={strategy!r} needs `{field}`: the column of train_dataset that holds each prompt's "
            f"demonstration; got {value!r}."
        )


def check_demonstration_column_in_dataset(train_dataset: Any, column: str, strategy: str) -> None:
    """Raise a `ValueError` naming `<strategy>_demonstration_column` and the dataset's columns when `train_dataset` (if
    given) has no column `column`: the dataset check of a strategy that reads demonstrations from it."""
    columns = list(getattr(train_dataset, "column_names", None) or [])
    if train_dataset is not None and column not in columns:
        raise ValueError(
            f"balancing={strategy!r} reads each prompt's demonstration from train_dataset[{column!r}] "
            f"(`{strategy}_demonstration_column`), but train_dataset has the columns {columns}."
        )
