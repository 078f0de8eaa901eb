"""The trainer configs of one comparison run, built from the grid: an `AMFTConfig`, or for `two_stage` TRL's
`SFTConfig` then `GRPOConfig`.

Its own module, so that the grid's up-front validation (`amft_trl.compare.grid`) and the runs
(`amft_trl.compare.runs`) both use it without importing each other.
"""

from __future__ import annotations

import math
import os
from dataclasses import fields
from typing import Any

from amft_trl.compare.methods import METHODS, TWO_STAGE_FIELDS, Budget

__all__ = ["build_configs"]


def _run_fields(output_dir: str, max_steps: int, seed: int, checkpoint_every: int) -> dict[str, Any]:
    return {
        "output_dir": output_dir,
        "max_steps": max_steps,
        "seed": seed,
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_steps": checkpoint_every,
        "save_total_limit": 1,
        "report_to": [],
    }


def build_configs(
    grid: Any, method: str, trial: dict[str, Any] | None, *, budget: Budget, output_dir: str, seed: int
) -> list[Any]:
    """The configs of one run of `grid` (an `amft_trl.compare.grid.Grid`, not imported here: the grid imports this
    module to validate every method's config up front): `[AMFTConfig]`, or `[SFTConfig, GRPOConfig]` for `two_stage`."""
    from trl import GRPOConfig, SFTConfig

    from amft_trl import AMFTConfig

    settings = grid.settings(method, trial, budget=budget)
    every = min(grid.checkpoint_every, budget.max_steps)
    if METHODS[method].trainer == "amft":
        return [AMFTConfig(**settings, **_run_fields(output_dir, budget.max_steps, seed, every))]

    sft_lr = settings.pop(TWO_STAGE_FIELDS[0], None)
    if sft_lr is not None and not (
        isinstance(sft_lr, int | float)
        and not isinstance(sft_lr, bool)
        and math.isfinite(sft_lr)
        and sft_lr >= 0
    ):
        raise ValueError(f"`sft_learning_rate` must be a finite number >= 0, got {sft_lr!r}.")
    # the AMFT-only fields are dropped; bf16 as AMFTConfig resolves it (float32 without a bf16 accelerator)
    amft = AMFTConfig(**settings, output_dir=output_dir)
    grpo_names = {f.name for f in fields(GRPOConfig)}
    shared = {k: v for k, v in settings.items() if k in grpo_names}
    shared["bf16"] = amft.bf16
    rl_steps = budget.max_steps - budget.sft_steps
    rl = GRPOConfig(
        **shared, **_run_fields(os.path.join(output_dir, "rl"), rl_steps, seed, min(every, rl_steps))
    )
    sft_names = {f.name for f in fields(SFTConfig)}
    trainer_fields = (
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "learning_rate",
        "lr_scheduler_type",
        "lr_scheduler_kwargs",
        "warmup_steps",
        "warmup_ratio",
        "weight_decay",
        "optim",
        "adam_beta1",
        "adam_beta2",
        "adam_epsilon",
        "max_grad_norm",
        "gradient_checkpointing",
        "model_init_kwargs",
        "bf16",
        "fp16",
    )
    sft_settings = {k: v for k, v in shared.items() if k in trainer_fields and k in sft_names}
    if amft.sft_per_device_train_batch_size:
        sft_settings["per_device_train_batch_size"] = amft.sft_per_device_train_batch_size
    if sft_lr is not None:
        sft_settings["learning_rate"] = sft_lr
    if amft.max_sft_length:
        sft_settings["max_length"] = amft.max_sft_length
    sft = SFTConfig(
        **sft_settings,
        **_run_fields(os.path.join(output_dir, "sft"), budget.sft_steps, seed, min(every, budget.sft_steps)),
    )
    return [sft, rl]
