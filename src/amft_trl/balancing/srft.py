"""`balancing="srft"`: SRFT's entropy-aware weights (arXiv 2506.19767, "SRFT: A Single-Stage Method with Supervised
and Reinforcement Fine-Tuning for Reasoning").

The paper's objective (Eq. 13) is `L_SFT^demo + L_RL^demo + L_RL^self`, with the policy's entropy H stopping
gradients everywhere it appears:

- Eq. 8, imitation: `w_SFT * NLL(demonstration)`, `w_SFT = 0.5 * sg(exp(-H))`: a confident (low-entropy) policy
  imitates more. Implemented on the shared SFT batch, with the per-token weights `srft_sft_weights`.
- Eq. 11-12, self-rollouts: REINFORCE with a binary reward, split by its sign:
  `w_RL * E_{y+}[-log pi(y+)] + E_{y-}[log pi(y-)]`, `w_RL = 0.1 * sg(exp(H))`. Implemented by giving every rollout
  the advantage `srft_rollout_advantages`: `w_RL` for a positive reward, -1 otherwise (0 for an unscorable one), so
  TRL's loss is reused: on-policy its ratio is 1 and its gradient is exactly `-A * grad log pi` per token, normalised
  the way the configured `loss_type` normalises (the reimplementation divides by a constant 8192 instead).

  **The rollout weight grows exponentially with the entropy**: `0.1 exp(H)` is 0.27 at H = 1 nat per token, 2 at
  H = 3, and about 30 at H = 5.7, which small models, or any model sampling at a high temperature, reach: their
  positive rollouts then weigh 30 times a negative one, and the gradient norms run about 10x those of the other
  strategies (clipped by `max_grad_norm`, but the direction is still dominated by those rollouts). That is the
  paper's rule and stays the default; `srft_rl_weight_max` caps the weight, `min(0.1 exp(H), srft_rl_weight_max)`,
  and the logged `amft/srft_rl_weight` shows where it sits.
- Eq. 9-10, off-policy RL on the demonstrations, is **not implemented**: it needs each demonstration inside its own
  prompt's rollout group (Eq. 6-7 normalise advantages over that augmented group), and the demonstrations here come
  from the shared `sft_dataset` stream, not aligned with the RL prompts, so that every strategy trains on the same
  data path. This is the one term of the paper we leave out; `docs/source/strategies.md` says so.

Where the paper is silent we follow the public reimplementation (TsinghuaC3I/Unify-Post-Training, `mix_actor.py`):
H is **per sequence**, the detached mean token entropy of that demonstration or rollout over its own tokens (the
demonstrations' at temperature 1, the rollouts' at the sampling temperature, which the reimplementation runs at 1);
"positive" means a reward > 0 (the reimplementation: reward == 1 under {0, 1} rewards). Both scalar weights of the
step are 1 (Eq. 13 sums the terms). The paper's and the reimplementation's `exp(-H)` on demonstrations is what we
implement; the authors' own code reportedly uses `exp(+H)` there (unverified: their repository could not be read).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from .base import BalancingStrategy, RolloutBatch, StepMeasurements, StepPlan, check_nonnegative


def sequence_entropy(entropies: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) detached mean token entropy of each sequence over its own tokens (0 for an empty sequence)."""
    mask = mask.to(entropies.dtype)
    return ((entropies.detach() * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).detach()


def srft_sft_weights(entropies: torch.Tensor, mask: torch.Tensor, coef: float = 0.5) -> torch.Tensor:
    """SRFT Eq. 8: per-token weights (B, C) on the demonstrations' NLL, `coef * exp(-H_i)` for every token of
    demonstration i, H_i its detached mean token entropy."""
    w = coef * torch.exp(-sequence_entropy(entropies, mask))
    return w.unsqueeze(1).expand_as(entropies)


def srft_rollout_advantages(
    rewards: torch.Tensor,
    entropies: torch.Tensor,
    mask: torch.Tensor,
    coef: float = 0.1,
    max_weight: float | None = None,
) -> torch.Tensor:
    """SRFT Eq. 11-12 as advantages (B,): `coef * exp(H_i)` for a rollout with a positive reward, -1 otherwise, 0 for
    an unscorable one (NaN reward). H_i is the rollout's detached mean token entropy. `max_weight` (None: no cap, the
    paper's rule) caps the positive weight: `min(coef * exp(H_i), max_weight)`."""
    positive = coef * torch.exp(sequence_entropy(entropies, mask))
    if max_weight is not None:
        positive = positive.clamp(max=max_weight)
    rewards = rewards.to(positive.device)
    advantages = torch.where(rewards > 0, positive, torch.full_like(positive, -1.0))
    return torch.where(torch.isnan(rewards), torch.zeros_like(advantages), advantages)


class SRFTStrategy(BalancingStrategy):
    """SRFT: both losses at scalar weight 1, per-demonstration and per-rollout weights from the policy's entropy."""

    name: ClassVar[str] = "srft"
    config_fields: ClassVar[tuple[str, ...]] = ("srft_sft_coef", "srft_rl_coef", "srft_rl_weight_max")
    sft_token_weights_need_entropy: ClassVar[bool] = True
    rl_weights_need_entropy: ClassVar[bool] = True

    def __init__(
        self,
        sft_coef: float = 0.5,
        rl_coef: float = 0.1,
        sft_warmup_steps: int = 0,
        rl_weight_max: float | None = None,
    ):
        super().__init__(sft_warmup_steps=sft_warmup_steps)
        self.sft_coef, self.rl_coef = float(sft_coef), float(rl_coef)
        self.rl_weight_max = None if rl_weight_max is None else float(rl_weight_max)
        self._step_positive: list[float] = []  # the step's positive-rollout weights, for logging

    @classmethod
    def from_config(cls, args: Any) -> SRFTStrategy:
        return cls(
            sft_coef=args.srft_sft_coef,
            rl_coef=args.srft_rl_coef,
            sft_warmup_steps=args.sft_warmup_steps,
            rl_weight_max=args.srft_rl_weight_max,
        )

    @classmethod
    def check_config(cls, args: Any) -> None:
        for name in ("srft_sft_coef", "srft_rl_coef"):
            check_nonnegative(args, name)
        cap = args.srft_rl_weight_max
        if cap is not None and not (
            isinstance(cap, int | float) and not isinstance(cap, bool) and math.isfinite(cap) and cap > 0
        ):
            raise ValueError(
                f"`srft_rl_weight_max` must be None (no cap, the paper's rule) or a finite number > 0, got {cap!r}."
            )

    def plan_after_warmup(self, global_step: int) -> StepPlan:
        return StepPlan(rl_weight=1.0, sft_weight=1.0, rl=True, sft=True)

    def sft_token_weights(
        self, logps: torch.Tensor, entropies: torch.Tensor | None, mask: torch.Tensor
    ) -> torch.Tensor | None:
        return srft_sft_weights(entropies, mask, self.sft_coef)

    def rl_advantages(self, rollouts: RolloutBatch) -> torch.Tensor | None:
        advantages = srft_rollout_advantages(
            rollouts.rewards, rollouts.entropies, rollouts.completion_mask, self.rl_coef, self.rl_weight_max
        )
        positive = rollouts.rewards.to(advantages.device) > 0
        self._step_positive.extend(advantages[positive].tolist())
        return advantages

    def record(self, measurements: StepMeasurements) -> None:
        super().record(measurements)
        if self._step_positive:  # this process's positive rollouts (a diagnostic: not reduced over processes)
            self.log("srft_rl_weight", sum(self._step_positive) / len(self._step_positive))
        self._step_positive = []
