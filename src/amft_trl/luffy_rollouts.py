"""LUFFY's demonstrations as off-policy rollouts: the trainer's side of `balancing="luffy"` (LUFFY, Yan et al. 2025).

The strategy (`amft_trl.balancing.luffy`) holds LUFFY's equations: which rows of a group are off-policy
(`off_policy_rows`), the shaped, unclipped per-token loss `-A * p / (p + gamma)` (`off_policy_token_loss`), and its
reduction with GRPO's `loss_type` normaliser (`aggregate_token_loss`). This module puts them into TRL's flow:

1. `prepare`: per row of a generation batch, the demonstration's completion token ids for the first
   `luffy_num_off_policy` rows of each group, None for the rows TRL generates;
2. `splice`: TRL generates `num_generations - luffy_num_off_policy` completions per prompt (the on-policy rows only,
   in every generation mode); the off-policy rows get their demonstration's tokens, with no sampling log-prob (TRL's
   importance correction is then 1 there);
3. `mark`: the generation output's `amft_off_policy` rows, and their mean reward (`amft/luffy_off_policy_reward`);
4. `loss_term`: added to GRPO's loss, which sees zero advantages on the off-policy rows; its sums over the step are
   logged by `log_step` (`amft/luffy_importance_weight`, `amft/luffy_off_policy_prob`,
   `amft/luffy_off_policy_fraction`).

`AMFTTrainer` calls these from its overrides of TRL's generation methods and from its one loss override.
"""

from __future__ import annotations

from typing import Any

import torch
from trl.data_utils import is_conversational

from ._distributed import global_sum
from .balancing.luffy import (
    LUFFYStrategy,
    aggregate_token_loss,
    demonstration_completion_ids,
    off_policy_rows,
    off_policy_token_loss,
)
from .sft_data import tokenize_prompt_completion


class OffPolicyDemonstrations:
    """The off-policy rows of one `AMFTTrainer` under LUFFY (see the module docstring).

    Args:
        trainer: the `AMFTTrainer` (its processing class, accelerator, `num_generations`, EOS ids, reward weights,
            loss settings).
        strategy: the LUFFY strategy, with `num_off_policy > 0`.
    """

    def __init__(self, trainer: Any, strategy: LUFFYStrategy):
        if (
            trainer.tools
            or trainer.rollout_func is not None
            or getattr(trainer, "environment_factories", None)
        ):
            raise ValueError(
                "balancing='luffy' puts each prompt's demonstration into its group as a finished single-turn "
                "completion; it cannot be combined with `tools`, `environment_factory` or `rollout_func`."
            )
        g, world = trainer.num_generations, trainer.accelerator.num_processes
        local = trainer.args.per_device_train_batch_size * trainer.args.steps_per_generation
        if world > 1 and local % g != 0:
            raise ValueError(
                f"balancing='luffy' with {world} processes needs each process's generation batch "
                f"(per_device_train_batch_size x steps_per_generation = {local}) to hold whole groups of "
                f"`num_generations` ({g}) rollouts, so that every process generates the same number of completions."
            )
        self.trainer = trainer
        self.strategy = strategy
        # this step's sums: f(p) and p over the off-policy tokens, their count, and all completion tokens
        self.sums = [0.0] * 4

    @property
    def num_off_policy(self) -> int:
        return self.strategy.num_off_policy

    # ---- generation ---------------------------------------------------------------------------------------------
    def prepare(self, inputs: list[dict[str, Any]]) -> list[list[int] | None]:
        """Per row of this process's generation batch: the demonstration's completion token ids where the row is an
        off-policy slot (the first `luffy_num_off_policy` rows of each group), None where it is generated."""
        trainer = self.trainer
        column = self.strategy.demonstration_column
        first = trainer.accelerator.process_index * len(inputs)
        rows = off_policy_rows(len(inputs), first, trainer.num_generations, self.num_off_policy)
        out: list[list[int] | None] = []
        for row, off in zip(inputs, rows, strict=True):
            if not off:
                out.append(None)
                continue
            demonstration = row.get(column)
            if isinstance(demonstration, str) and is_conversational(row):
                demonstration = [{"role": "assistant", "content": demonstration}]
            if not demonstration:
                raise ValueError(
                    f"balancing='luffy': train_dataset[{column!r}] (`luffy_demonstration_column`) is empty for the "
                    f"prompt {row['prompt']!r}; every prompt needs a demonstration."
                )
            ids = tokenize_prompt_completion(
                trainer.processing_class,
                row["prompt"],
                demonstration,
                None,
                chat_template=trainer.chat_template,
                template_kwargs=getattr(trainer, "chat_template_kwargs", None),
            )["completion_ids"]
            ids = demonstration_completion_ids(
                ids, list(trainer.eos_token_ids), trainer.args.max_completion_length
            )
            if not ids:
                raise ValueError(
                    f"balancing='luffy': the demonstration of the prompt {row['prompt']!r} tokenises to no completion "
                    "token."
                )
            out.append(ids)
        return out

    @staticmethod
    def on_policy(demonstrations: list[list[int] | None]) -> list[int]:
        """The rows TRL generates (those without a demonstration)."""
        return [i for i, d in enumerate(demonstrations) if d is None]

    @staticmethod
    def splice(
        demonstrations: list[list[int] | None],
        generated: list[list[int]],
        logprobs: list[list[float]] | None,
    ) -> tuple[list[list[int]], list[list[float]] | None]:
        """The generation batch's completions: the generated ones in the on-policy rows, in order, and each
        demonstration in its off-policy row (NaN sampling log-probs: no importance correction there)."""
        completion_ids: list[list[int]] = []
        all_logprobs: list[list[float]] | None = None if logprobs is None else []
        cursor = 0
        for demonstration in demonstrations:
            if demonstration is None:
                completion_ids.append(list(generated[cursor]))
                if all_logprobs is not None:
                    all_logprobs.append(list(logprobs[cursor]))
                cursor += 1
            else:
                completion_ids.append(list(demonstration))
                if all_logprobs is not None:
                    all_logprobs.append([float("nan")] * len(demonstration))
        return completion_ids, all_logprobs

    def mark(
        self,
        out: dict[str, Any],
        demonstrations: list,
        total: torch.Tensor | None,
        metrics: dict[str, list],
    ) -> None:
        """Mark the off-policy rows of a generation batch (`amft_off_policy`) and log their mean reward (`total`: the
        rollout rewards, `amft_trl.trainer.rollout_rewards`; unscorable demonstrations, NaN there, are left out)."""
        device = out["advantages"].device
        out["amft_off_policy"] = torch.tensor([d is not None for d in demonstrations], device=device)
        if total is None:
            return
        rows = off_policy_rows(len(total), 0, self.trainer.num_generations, self.num_off_policy)
        off = torch.tensor(rows, device=total.device)
        mean = torch.nanmean(total[off])
        if not torch.isnan(mean):
            metrics["amft/luffy_off_policy_reward"].append(float(mean))

    # ---- the loss -----------------------------------------------------------------------------------------------
    @staticmethod
    def masked_advantages(inputs: dict[str, Any]) -> torch.Tensor:
        """The advantages GRPO's own loss sees: zero on the off-policy rows (they get `loss_term` instead)."""
        advantages = inputs["advantages"]
        rows = inputs["amft_off_policy"].view(-1, *([1] * (advantages.dim() - 1)))
        return advantages.masked_fill(rows, 0.0)

    def loss_term(
        self, logps: torch.Tensor, inputs: dict[str, Any], advantages: torch.Tensor
    ) -> torch.Tensor:
        """LUFFY's shaped term on the off-policy rows, from the loss forward's per-token log-probs `logps`, reduced
        with GRPO's `loss_type` normaliser. `advantages`: the rows' advantages before `masked_advantages`."""
        trainer = self.trainer
        off = inputs["amft_off_policy"]
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        mask = mask.to(logps.dtype)
        off_mask = mask * off.to(logps.dtype).unsqueeze(1)
        token_loss = off_policy_token_loss(logps, advantages, self.strategy.shaping_gamma) * off_mask
        loss = aggregate_token_loss(
            token_loss,
            mask,
            trainer.loss_type,
            accumulation_steps=trainer.current_gradient_accumulation_steps,
            max_completion_length=trainer.max_completion_length,
            num_items_in_batch=inputs["num_items_in_batch"],
            num_processes=trainer.accelerator.num_processes,
            steps_per_generation=trainer.args.steps_per_generation,
        )
        with torch.no_grad():  # the step's sums: logged as ratios of sums over the step and every process
            p = logps.detach().exp()
            weight = p / (p + self.strategy.shaping_gamma)
            local = [(weight * off_mask).sum(), (p * off_mask).sum(), off_mask.sum(), mask.sum()]
            self.sums = [a + float(b) for a, b in zip(self.sums, local, strict=True)]
        return loss

    def log_step(self, metrics: dict[str, list]) -> None:
        """At a step's end: its off-policy sums, reduced over processes, as ratios; then reset."""
        weight_sum, prob_sum, off_tokens, tokens = global_sum(self.trainer.accelerator, self.sums)
        self.sums = [0.0] * 4
        metrics["amft/luffy_off_policy_fraction"].append(off_tokens / max(tokens, 1.0))
        if off_tokens > 0:
            metrics["amft/luffy_importance_weight"].append(weight_sum / off_tokens)
            metrics["amft/luffy_off_policy_prob"].append(prob_sum / off_tokens)
