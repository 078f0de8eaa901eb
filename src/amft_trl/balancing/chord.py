"""`balancing="chord"`: CHORD's scheduled mu and optional per-token phi weighting (arXiv 2508.11408).

CHORD ("On-Policy RL Meets Off-Policy Experts: Harmonizing Supervised Fine-Tuning and Reinforcement Learning via
Dynamic Weighting") optimises `(1 - mu) * L_GRPO + mu * L_SFT` with mu on a schedule. The field names are
ms-swift's (`chord_mu_warmup_steps`, `chord_mu_decay_steps`, `chord_mu_peak`, `chord_mu_valley`,
`chord_enable_phi_function`), so a CHORD config ports as is.

- `chord_mu`: mu at optimizer step t (0-based `global_step` at the start of the step), warm-up W, decay D:
  `t / W * peak` for t < W; `valley + (peak - valley) * 0.5 * (1 + cos(pi * (t - W) / D))` for W <= t < W + D;
  `valley` after. (CHORD's own warm-up rises from 0; it is not the pure-SFT warm-up `sft_warmup_steps`, which
  defaults to 0 here. If set, those first steps are pure SFT and the schedule still reads the global step t.)
- `chord_phi`: with `chord_enable_phi_function`, each demonstration token's NLL is weighted by `p * (1 - p)`, p the
  token's probability under the current policy, detached (CHORD-phi): tokens the policy already predicts with
  certainty (p ~ 1) and tokens far off its distribution (p ~ 0) weigh little.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from .base import MuStrategy, StepMeasurements, check_fraction


def chord_mu(step: int, warmup_steps: int, decay_steps: int, peak: float, valley: float) -> float:
    """CHORD's mu at optimizer step `step` (0-based): linear warm-up to `peak`, cosine decay to `valley`, then flat."""
    if step < warmup_steps:
        return step / warmup_steps * peak
    if step >= warmup_steps + decay_steps:
        return valley
    progress = (step - warmup_steps) / decay_steps
    return valley + (peak - valley) * 0.5 * (1.0 + math.cos(math.pi * progress))


def chord_phi(logps: torch.Tensor) -> torch.Tensor:
    """CHORD's per-token weight `phi = p * (1 - p)`, with p = exp(logp) detached (no gradient flows through it)."""
    p = logps.detach().exp()
    return p * (1.0 - p)


class CHORDStrategy(MuStrategy):
    """mu on CHORD's schedule (`chord_mu`), optionally with the per-token phi weights (`chord_phi`)."""

    name: ClassVar[str] = "chord"
    config_fields: ClassVar[tuple[str, ...]] = (
        "chord_mu_warmup_steps",
        "chord_mu_decay_steps",
        "chord_mu_peak",
        "chord_mu_valley",
        "chord_enable_phi_function",
    )

    def __init__(
        self,
        mu_warmup_steps: int,
        mu_decay_steps: int,
        mu_peak: float,
        mu_valley: float,
        enable_phi_function: bool = False,
        sft_warmup_steps: int = 0,
    ):
        super().__init__(sft_warmup_steps=sft_warmup_steps)
        self.mu_warmup_steps = mu_warmup_steps
        self.mu_decay_steps = mu_decay_steps
        self.mu_peak = mu_peak
        self.mu_valley = mu_valley
        self.enable_phi_function = enable_phi_function

    @classmethod
    def from_config(cls, args: Any) -> CHORDStrategy:
        return cls(
            mu_warmup_steps=args.chord_mu_warmup_steps,
            mu_decay_steps=args.chord_mu_decay_steps,
            mu_peak=args.chord_mu_peak,
            mu_valley=args.chord_mu_valley,
            enable_phi_function=args.chord_enable_phi_function,
            sft_warmup_steps=args.sft_warmup_steps,
        )

    @classmethod
    def check_config(cls, args: Any) -> None:
        for name in ("chord_mu_warmup_steps", "chord_mu_decay_steps"):
            value = getattr(args, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"`{name}` must be an integer >= 0, got {value!r}.")
        for name in ("chord_mu_peak", "chord_mu_valley"):
            check_fraction(args, name)
        if args.chord_mu_valley > args.chord_mu_peak:
            raise ValueError(
                f"`chord_mu_valley` ({args.chord_mu_valley}) must not exceed `chord_mu_peak` ({args.chord_mu_peak})."
            )

    def mu_at(self, global_step: int) -> float:
        return chord_mu(global_step, self.mu_warmup_steps, self.mu_decay_steps, self.mu_peak, self.mu_valley)

    def sft_token_weights(
        self, logps: torch.Tensor, entropies: torch.Tensor | None, mask: torch.Tensor
    ) -> torch.Tensor | None:
        return chord_phi(logps) if self.enable_phi_function else None

    def record(self, measurements: StepMeasurements) -> None:
        super().record(measurements)
        if measurements.plan is not None:  # the schedule's mu (amft/mu is mu times the mean phi)
            self.log("chord_mu", measurements.plan.sft_weight)
