"""The two-phase learning-rate schedule: an SFT warm-up with a schedule of its own, then the rest of the run.

AMFT's Algorithm 2 starts with an SFT warm-up (`sft_warmup_steps`); `sft_warmup_learning_rate` gives it its own peak
rate and `reset_optimizer_after_warmup` a fresh optimizer after it. The schedule is then two schedules of
`lr_scheduler_type`, each with its own warm-up (`warmup_ratio` / `warmup_steps` of its own length): the first over
the warm-up steps at `sft_warmup_learning_rate`, the second over the remaining steps at `learning_rate`.

`two_phase_lr_lambda` is a pure function of the config and the lengths; `AMFTTrainer.create_scheduler` wraps it in a
`LambdaLR`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import get_scheduler


def _phase(args: Any, length: int) -> Callable[[int], float]:
    """The multiplier of `lr_scheduler_type` over `length` steps, with its warm-up of that length."""
    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer=dummy,
        num_warmup_steps=args.get_warmup_steps(length),
        num_training_steps=length,
        scheduler_specific_kwargs=args.lr_scheduler_kwargs,
    )
    if not isinstance(scheduler, LambdaLR):
        raise ValueError(
            f"`lr_scheduler_type={args.lr_scheduler_type!r}` cannot be split into a warm-up phase and a "
            "later phase (sft_warmup_learning_rate / reset_optimizer_after_warmup need a LambdaLR schedule "
            "such as linear, cosine or constant)."
        )
    return scheduler.lr_lambdas[0]


def two_phase_lr_lambda(args: Any, warmup_steps: int, num_training_steps: int) -> Callable[[int], float]:
    """The learning-rate multiplier (of `args.learning_rate`) at each step of a run with an SFT warm-up.

    Steps `0 .. warmup_steps - 1`: the warm-up phase, scaled so that its peak is `args.sft_warmup_learning_rate`
    (or `learning_rate` when unset). Later steps: a fresh schedule over the `num_training_steps - warmup_steps`
    remaining steps (at least 1).
    """
    rest = max(num_training_steps - warmup_steps, 1)
    peak = args.sft_warmup_learning_rate
    factor = 1.0 if peak is None else peak / args.learning_rate
    first, second = _phase(args, warmup_steps), _phase(args, rest)
    return lambda step: factor * first(step) if step < warmup_steps else second(step - warmup_steps)
