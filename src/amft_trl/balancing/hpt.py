"""`balancing="hpt"`: HPT's per-prompt switch between SFT and RL (arXiv 2509.04419, "Towards a Unified View of Large
Language Model Post-Training", Algorithm 1, Hybrid Post-Training).

For each RL prompt, its own `num_generations` rollouts are scored; their accuracy P is the fraction that are correct
(reward >= `hpt_success_reward`). If `P <= hpt_accuracy_threshold` (the paper's gate gamma: 0 for Qwen, 2/8 for
Llama) the prompt is trained on its demonstration, `beta * NLL`, and its rollouts are dropped from the RL loss;
otherwise it is trained on its rollouts with GRPO. In the paper's notation (alpha, beta) = (1, 0) if P > gamma and
(0, 1) if P <= gamma, with beta = `hpt_sft_coef` (1.0 for 7B models, 0.3 for 1.5B in the reference scripts).

Each prompt's demonstration comes from a column of the RL dataset (`hpt_demonstration_column`), not from
`sft_dataset`. How the losses are formed here, and where that follows the public reimplementation
(TsinghuaC3I/Unify-Post-Training, `mix_trainer.py` / `mix_actor.py`):

- the gate counts rollouts whose reward reaches `hpt_success_reward` (the reimplementation: reward == 1, the success
  value of its verifier) and compares with `<=`;
- a gated prompt's rollouts get advantage 0 (the reimplementation removes them from the batch; TRL's token
  normaliser still counts their tokens, so the RL term is scaled by the fraction of tokens kept);
- each optimizer step owns a fixed share of the generation batch's prompts (prompt q goes to step q mod K of the K
  steps the batch is trained over; `amft_trl.attached_demonstrations`), whatever TRL's shuffle does with their
  rollout rows. Its SFT term is `beta` times the token-mean NLL of the demonstrations of its own gated prompts,
  over all processes (the reimplementation takes a token mean per micro-batch); a step with none runs no SFT
  forward;
- image prompts (a VLM, an `image`/`images` column): a demonstration is trained with its row's images, through TRL's
  VLM collation (`amft_trl.sft_data.vision_demonstration`); one whose prompt and image tokens leave no completion
  token within `max_sft_length` is skipped, like a text one that truncation empties;
- logged: `amft/hpt_sft_fraction`, the fraction of the step's prompts sent to SFT, and `amft/mu`, the SFT weight the
  step applied: `beta` when it trained a demonstration, 0 otherwise.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .base import (
    BalancingStrategy,
    RolloutBatch,
    StepMeasurements,
    StepPlan,
    check_demonstration_column_field,
    check_demonstration_column_in_dataset,
    check_nonnegative,
)


def hpt_gate(group_rewards: torch.Tensor, success_reward: float, threshold: float) -> torch.Tensor:
    """HPT's switch (B,) bool: True where the rollout's prompt goes to SFT, i.e. the accuracy of the prompt's group
    (fraction of its rollouts with reward >= `success_reward`; NaN counts as wrong) is <= `threshold`."""
    accuracy = (group_rewards >= success_reward).float().mean(dim=1)
    return accuracy <= threshold + 1e-9


class HPTStrategy(BalancingStrategy):
    """HPT: per prompt, SFT on its demonstration when its rollouts' accuracy is <= the gate, RL otherwise."""

    name: ClassVar[str] = "hpt"
    config_fields: ClassVar[tuple[str, ...]] = (
        "hpt_demonstration_column",
        "hpt_accuracy_threshold",
        "hpt_success_reward",
        "hpt_sft_coef",
    )
    sft_source: ClassVar[str] = "train_column"

    def __init__(
        self,
        demonstration_column: str,
        accuracy_threshold: float = 0.0,
        success_reward: float = 1.0,
        sft_coef: float = 1.0,
        sft_warmup_steps: int = 0,
    ):
        super().__init__(sft_warmup_steps=sft_warmup_steps)
        self.demonstration_column = demonstration_column
        self.accuracy_threshold = float(accuracy_threshold)
        self.success_reward = float(success_reward)
        self.sft_coef = float(sft_coef)

    @classmethod
    def from_config(cls, args: Any) -> HPTStrategy:
        return cls(
            demonstration_column=args.hpt_demonstration_column,
            accuracy_threshold=args.hpt_accuracy_threshold,
            success_reward=args.hpt_success_reward,
            sft_coef=args.hpt_sft_coef,
            sft_warmup_steps=args.sft_warmup_steps,
        )

    @classmethod
    def check_config(cls, args: Any) -> None:
        check_demonstration_column_field(args, cls.name)
        value = args.hpt_accuracy_threshold
        if not (isinstance(value, int | float) and 0.0 <= value < 1.0):
            raise ValueError(f"`hpt_accuracy_threshold` must be a number in [0, 1), got {value!r}.")
        if not (
            isinstance(args.hpt_success_reward, int | float)
            and args.hpt_success_reward == args.hpt_success_reward
        ):
            raise ValueError(f"`hpt_success_reward` must be a number, got {args.hpt_success_reward!r}.")
        check_nonnegative(args, "hpt_sft_coef")

    def check_datasets(self, *, train_dataset: Any, sft_dataset: Any, val_dataset: Any) -> None:
        check_demonstration_column_in_dataset(train_dataset, self.demonstration_column, self.name)

    def plan_after_warmup(self, global_step: int) -> StepPlan:
        # `sft` is decided per micro-step by the gate (`sft_gate`), after the rollouts are scored
        return StepPlan(rl_weight=1.0, sft_weight=self.sft_coef, rl=True, sft=False)

    def sft_gate(self, rollouts: RolloutBatch) -> torch.Tensor:
        """(B,) bool: the rollouts whose prompt is trained on its demonstration this step."""
        return hpt_gate(rollouts.group_rewards, self.success_reward, self.accuracy_threshold)

    def rl_advantages(self, rollouts: RolloutBatch) -> torch.Tensor | None:
        gate = self.sft_gate(rollouts).to(rollouts.advantages.device)
        return torch.where(gate, torch.zeros_like(rollouts.advantages), rollouts.advantages)

    def record(self, measurements: StepMeasurements) -> None:
        super().record(measurements)
        if measurements.sft_prompt_fraction is not None:
            self.log("hpt_sft_fraction", measurements.sft_prompt_fraction)
