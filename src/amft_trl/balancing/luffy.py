"""`balancing="luffy"`: LUFFY's off-policy demonstrations inside the GRPO group (arXiv 2504.14945, "Learning to
Reason under Off-Policy Guidance"; reference code github ElliottYan/LUFFY, `luffy/verl/verl/mix_src/`).

Per prompt, `luffy_num_off_policy` of its `num_generations` rollouts are not generated: they are the prompt's
demonstration, read from a column of the RL dataset (`luffy_demonstration_column`), scored by the same reward
functions as the on-policy rollouts. The paper's run: 8 rollouts per prompt, 7 generated and 1 demonstration (the
reference's `rollout.n=8`, `n_prefix=1`, `min_prefix_ratio=max_prefix_ratio=1.0`, i.e. the whole demonstration).

**Advantages.** The reference has two estimators: `compute_grpo_outcome_advantage_split` (mean and std over the
on-policy rollouts only) and the plain `compute_grpo_outcome_advantage` over the whole group. The paper's run
(`exp_scripts/train.sh`) sets `algorithm.adv_estimator=grpo`, which calls the plain one, with
`algorithm.grpo_use_std=False`: `A_i = r_i - mean(r over the group, demonstration included)`, no division by the std.
We follow the code the paper ran: the demonstration is part of the group TRL normalises, so TRL's own advantage
computation applies unchanged; `scale_rewards="none"` reproduces `grpo_use_std=False` (TRL's default "group" divides
by the group's std, demonstration included).

**Loss on off-policy tokens** (`compute_token_on_off_policy_loss`, the reference's settings
`off_policy_reshape="p_div_p_0.1"`, `loss_remove_clip=True`, `off_policy_loss_impl=token`): per token of a
demonstration, `-A * f(p)` with `p = pi_theta(token)` (gradient through p) and the policy shaping
`f(p) = p / (p + gamma)`, `gamma = luffy_shaping_gamma` (0.1). No old-policy ratio, no clipping: a token the policy
finds unlikely (small p) keeps a gradient `-A * gamma * p / (p + gamma)^2 * grad log p`, which the shaping raises
relative to the plain `p * grad log p` of an unshaped importance weight, where PPO's clipping would have cut it.

**On-policy tokens** keep TRL's loss for the configured `loss_type`, unchanged (clipping included). The reference's
`loss_remove_clip=True` also removes clipping on the on-policy tokens; with TRL's defaults (`num_iterations=1`,
`steps_per_generation == gradient_accumulation_steps`) their ratio is exactly 1 when the gradient is taken, so
clipping is inactive and the two agree; they differ only when rollouts are reused across optimizer steps.

**Normalisation.** One loss over the batch, both kinds of tokens summed under the configured `loss_type`'s
normaliser (`aggregate_token_loss`): `loss_type` wins. The reference's `loss_remove_token_mean=True` (sum over tokens
divided by the padded response length, not by the token count) is TRL's `loss_type="dr_grpo"` up to a constant factor
(the number of sequences per optimizer batch), which Adam's update does not see; set `loss_type="dr_grpo"` for the
paper's configuration. TRL's KL term (`beta > 0`) and entropy bonus (`entropy_coef`) cover every token, the
demonstrations' included, as the reference's entropy bonus does (its run had no KL term).

Logged per optimizer step (ratios of sums over its micro-steps and processes):
- `amft/luffy_off_policy_fraction`: the demonstrations' share of the completion tokens;
- `amft/luffy_importance_weight`: mean f(p) over those tokens (the reference's `off_ratio_mean`);
- `amft/luffy_off_policy_prob`: mean p over those tokens;
- per generation, `amft/luffy_off_policy_reward`: their mean reward.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .base import (
    BalancingStrategy,
    StepPlan,
    check_demonstration_column_field,
    check_demonstration_column_in_dataset,
)

#: `loss_type`s whose normaliser `aggregate_token_loss` reproduces (TRL 1.16's `GRPOTrainer._compute_loss`).
LOSS_TYPES = ("grpo", "sapo", "bnpo", "dr_grpo", "dapo", "cispo", "vespo", "luspo")


def shaped_weight(logps: torch.Tensor, gamma: float) -> torch.Tensor:
    """LUFFY's policy shaping f(p) = p / (p + gamma) of each token's probability p = exp(logps) (differentiable)."""
    p = torch.exp(logps)
    return p / (p + gamma)


def off_policy_token_loss(logps: torch.Tensor, advantages: torch.Tensor, gamma: float) -> torch.Tensor:
    """(B, C) per-token loss `-A * f(p)` of the reference's off-policy term (`off_policy_reshape="p_div_p_<gamma>"`,
    no clipping). `advantages` is (B,) or (B, C)."""
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    return -advantages * shaped_weight(logps, gamma)


def aggregate_token_loss(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str,
    *,
    accumulation_steps: int,
    max_completion_length: int,
    num_items_in_batch: torch.Tensor | float,
    num_processes: int,
    steps_per_generation: int,
) -> torch.Tensor:
    """A per-token loss (B, C) reduced the way TRL's GRPO loss of `loss_type` reduces its own, in training (already
    divided for gradient accumulation). Linear in `per_token_loss`, so adding it to TRL's loss is the same as having
    TRL reduce the sum of both per-token losses."""
    mask = mask.to(per_token_loss.dtype)
    if loss_type in ("grpo", "sapo"):
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
        return loss / accumulation_steps
    if loss_type == "bnpo":
        return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0) / accumulation_steps
    if loss_type == "dr_grpo":
        return (
            (per_token_loss * mask).sum()
            / (per_token_loss.size(0) * max_completion_length)
            / accumulation_steps
        )
    if loss_type in ("dapo", "cispo", "vespo"):
        items = torch.as_tensor(num_items_in_batch, dtype=per_token_loss.dtype, device=per_token_loss.device)
        normalizer = items.clamp(min=1.0) / num_processes * accumulation_steps / steps_per_generation
        return (per_token_loss * mask).sum() / normalizer
    if loss_type == "luspo":
        return (per_token_loss * mask).sum(-1).mean() / accumulation_steps
    raise ValueError(f"balancing='luffy' does not know how TRL normalises loss_type={loss_type!r}.")


def off_policy_rows(
    num_rows: int, first_global_row: int, num_generations: int, num_off_policy: int
) -> list[bool]:
    """Which of a process's rows are demonstrations: the first `num_off_policy` rows of each group of
    `num_generations` (groups are consecutive rows of the global generation batch)."""
    return [(first_global_row + i) % num_generations < num_off_policy for i in range(num_rows)]


def demonstration_completion_ids(
    completion_ids: list[int], eos_token_ids: list[int], max_completion_length: int | None
) -> list[int]:
    """A tokenised demonstration cut the way TRL cuts a generation: after its first EOS token, then to
    `max_completion_length` tokens (a longer one is a truncated rollout, without EOS)."""
    for i, token in enumerate(completion_ids):
        if token in eos_token_ids:
            completion_ids = completion_ids[: i + 1]
            break
    if max_completion_length is not None:
        completion_ids = completion_ids[:max_completion_length]
    return list(completion_ids)


class LUFFYStrategy(BalancingStrategy):
    """LUFFY: GRPO whose groups hold the prompt's demonstration as off-policy rollouts, trained with policy shaping.

    Both scalar weights are fixed (`w_RL = 1`, no separate SFT term): the demonstration acts through the RL loss. The
    trainer does the work (`AMFTTrainer`'s LUFFY hooks); the strategy carries the settings.
    """

    name: ClassVar[str] = "luffy"
    config_fields: ClassVar[tuple[str, ...]] = (
        "luffy_demonstration_column",
        "luffy_num_off_policy",
        "luffy_shaping_gamma",
    )

    def __init__(
        self,
        demonstration_column: str = "demonstration",
        num_off_policy: int = 1,
        shaping_gamma: float = 0.1,
        sft_warmup_steps: int = 0,
    ):
        super().__init__(sft_warmup_steps=sft_warmup_steps)
        self.demonstration_column = demonstration_column
        self.num_off_policy = int(num_off_policy)
        self.shaping_gamma = float(shaping_gamma)

    @classmethod
    def from_config(cls, args: Any) -> LUFFYStrategy:
        return cls(
            demonstration_column=args.luffy_demonstration_column,
            num_off_policy=args.luffy_num_off_policy,
            shaping_gamma=args.luffy_shaping_gamma,
            sft_warmup_steps=args.sft_warmup_steps,
        )

    @classmethod
    def check_config(cls, args: Any) -> None:
        check_demonstration_column_field(args, cls.name)
        k, g = args.luffy_num_off_policy, args.num_generations
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise ValueError(f"`luffy_num_off_policy` must be an integer >= 0, got {k!r}.")
        if isinstance(g, int) and k >= g:
            raise ValueError(
                f"`luffy_num_off_policy` ({k}) must be smaller than `num_generations` ({g}): each group needs at "
                "least one on-policy rollout (the paper: 1 of 8)."
            )
        gamma = args.luffy_shaping_gamma
        if not (
            isinstance(gamma, int | float)
            and not isinstance(gamma, bool)
            and gamma > 0
            and gamma < float("inf")
        ):
            raise ValueError(f"`luffy_shaping_gamma` must be a finite number > 0, got {gamma!r}.")
        if k > 0 and args.loss_type not in LOSS_TYPES:
            raise ValueError(
                f"balancing='luffy' supports `loss_type` in {LOSS_TYPES}, got {args.loss_type!r}."
            )

    @property
    def needs_sft_dataset_after_warmup(self) -> bool:
        return False  # no SFT term: the demonstrations come from train_dataset

    def check_datasets(self, *, train_dataset: Any, sft_dataset: Any, val_dataset: Any) -> None:
        if self.num_off_policy > 0:
            check_demonstration_column_in_dataset(train_dataset, self.demonstration_column, self.name)

    def plan_after_warmup(self, global_step: int) -> StepPlan:
        return StepPlan(rl_weight=1.0, sft_weight=0.0, rl=True, sft=False)
