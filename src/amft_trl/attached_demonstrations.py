"""Demonstrations attached to RL prompts: the SFT term of strategies whose `sft_source` is `"train_column"` (HPT).

Such a strategy reads one demonstration per RL prompt from a column of `train_dataset`
(`strategy.demonstration_column`) and, once the prompt's rollouts are scored, decides whether the prompt is trained on
it (`BalancingStrategy.sft_gate`). This module owns everything from that decision to the SFT micro-batches the trainer
runs; the trainer only calls it (`AttachedDemonstrations`): `generation` once per generation batch, `micro_step`
once per GRPO micro-step.

Which optimizer step trains which demonstration is decided here, explicitly, and never by where TRL's shuffle of
the generation batch sends a rollout row:

- A generation batch of P prompts (all processes; q = 0 .. P-1 in the sampler's order, the rows of prompt q being
  rows `q * G .. q * G + G - 1` of the global generation batch) is trained over K = `steps_per_generation /
  gradient_accumulation_steps` optimizer steps, and again for each of its `num_iterations`. Prompt q belongs to step
  `q mod K` of each pass over the batch: that step counts it (`amft/hpt_sft_fraction`) and, when the gate sends it
  to SFT, trains its demonstration, once per pass.
- A step's SFT term is the token-mean NLL of its own demonstrations, normalised by their completion tokens over all
  processes (as TRL's `dapo` loss is by the tokens of its batch), times the strategy's `sft_weight`. So the SFT weight
  a step applies, and logs as `amft/mu`, is `sft_weight` when it trains a demonstration and 0 when it trains none,
  however the batch is split into micro-steps and processes.
- A demonstration is trained on the process that holds its prompt's first rollout row (it has the prompt's text).
  Within the step, each process deals its demonstrations to the step's micro-steps in turn (the j-th, in prompt
  order, to micro-step `j mod gradient_accumulation_steps`). A micro-step where any process trains a demonstration
  runs one SFT forward on every process, with a zero-weight row where a process has none: forward counts agree
  (DDP and ZeRO-3 need it).
- All of it is decided once per generation batch, identically on every process, with one all-reduce (per-step token
  counts and per-micro-step demonstration counts).

`steps_per_generation` must be a multiple of `gradient_accumulation_steps` (`check_layout`, at construction): a step
spanning two generation batches would need the second batch's demonstration tokens at its first backward.

Image prompts (`image_column`, a VLM): each demonstration carries its row's images, as the rollouts of its prompt do;
`tokenize` then also takes them, and `collate` (the trainer's VLM collation) turns a micro-step's demonstrations into
the model's inputs (`SFTBatch.model_inputs`: `pixel_values`, ...).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ._distributed import global_sum
from .balancing.base import BalancingStrategy, RolloutBatch, StepPlan
from .sft_data import SFTBatch, collate_sft, row_images, trained_tokens

Example = dict[str, Any]  # `prompt_ids` / `completion_ids`; for image prompts also the raw row for collation


@dataclass
class DemonstrationMicroBatch:
    """One micro-step's demonstrations on this process, as the trainer's SFT micro-step takes them.

    Attributes:
        batch: the demonstrations, tokenised and padded.
        row_weights: (B,) 1 per demonstration of this process, 0 for the placeholder row of a process that has none.
        normalizer: the divisor of this process's summed NLL: the step's demonstration tokens over all processes,
            divided by the process count (DDP averages the processes' gradients).
    """

    batch: SFTBatch
    row_weights: torch.Tensor
    normalizer: float


@dataclass
class MicroStepDemonstrations:
    """What the attached demonstrations contribute to one GRPO micro-step (this process).

    Attributes:
        sft: the SFT micro-batch, or None when no process trains a demonstration in this micro-step.
        prompts: this process's prompts the step owns (nonzero only at the step's first micro-step, so that summing
            over the step's micro-steps and processes counts each prompt once).
        prompts_to_sft: those of them trained on their demonstration (same convention).
    """

    sft: DemonstrationMicroBatch | None = None
    prompts: int = 0
    prompts_to_sft: int = 0


@dataclass
class _Generation:
    """The plan of one generation batch: per (step, micro-step) this process's examples, per step the counts."""

    examples: list[list[list[Example]]]  # [step][micro-step] -> this process's demonstrations
    normalizers: list[float]  # [step] global demonstration tokens / processes
    forward: list[list[bool]]  # [step][micro-step] -> some process trains a demonstration there
    prompts: list[int]  # [step] this process's prompts the step owns
    prompts_to_sft: list[int]  # [step] those with a trained demonstration
    placeholder: Example
    position: int = 0  # GRPO micro-steps taken on this generation batch


class AttachedDemonstrations:
    """The demonstrations-attached-to-RL-prompts path (see the module docstring for the rule).

    Args:
        strategy: a strategy whose `sft_source` is `"train_column"`: it has `demonstration_column` and `sft_gate`.
        accelerator: the trainer's Accelerator (process index and count, the all-reduce).
        tokenize: `(prompt, demonstration) -> example | None`, tokenised like the SFT data (None: no completion
            token left after truncation); with `image_column`, `(prompt, demonstration, images) -> example | None`.
            An example has at least `completion_ids` (its trained tokens are counted from them, or from its
            `assistant_mask` when it has one: `amft_trl.sft_data.trained_tokens`).
        pad_token_id, eos_token_id: of the tokenizer (padding; the placeholder row when a process has no text).
        gradient_accumulation_steps, steps_per_generation, num_generations: the run's layout (`GRPOConfig`).
        image_column: the RL dataset's image column (`images` / `image`), None for text prompts.
        collate: `examples -> SFTBatch`; default: `collate_sft` (padding token ids).
        placeholder: `(prompt, images) -> example`, the zero-weight row of a process none of whose demonstrations
            can be trained (default: one EOS token as prompt and completion; a VLM needs a row with images).
    """

    def __init__(
        self,
        strategy: BalancingStrategy,
        accelerator: Any,
        tokenize: Callable[[Any, Any], Example | None],
        pad_token_id: int,
        eos_token_id: int,
        gradient_accumulation_steps: int,
        steps_per_generation: int,
        num_generations: int,
        image_column: str | None = None,
        collate: Callable[[list[Example]], SFTBatch] | None = None,
        placeholder: Callable[[Any, list[Any]], Example] | None = None,
    ):
        self.strategy = strategy
        self.accelerator = accelerator
        self.tokenize = tokenize
        self.pad_token_id, self.eos_token_id = pad_token_id, eos_token_id
        self.accumulation = gradient_accumulation_steps
        self.steps_per_generation = steps_per_generation
        self.num_generations = num_generations
        self.image_column = image_column
        self.collate = collate or (lambda examples: collate_sft(examples, self.pad_token_id))
        self.placeholder = placeholder
        self._generation: _Generation | None = None

    def _example(self, prompt: Any, demonstration: Any, images: list[Any] | None) -> Example | None:
        if images is None:
            return self.tokenize(prompt, demonstration)
        return self.tokenize(prompt, demonstration, images)

    @staticmethod
    def check_layout(args: Any, strategy: BalancingStrategy) -> None:
        """Raise a `ValueError` unless every optimizer step lies within one generation batch (construction time)."""
        spg, ga = args.steps_per_generation, args.gradient_accumulation_steps
        if spg % ga != 0:
            name = f"balancing={strategy.name!r}" if strategy.name else type(strategy).__name__
            raise ValueError(
                f"{name} trains each prompt's own demonstration, so each optimizer step must lie within one "
                f"generation batch: `steps_per_generation` ({spg}) must be a multiple of "
                f"`gradient_accumulation_steps` ({ga}). Leave steps_per_generation unset (it then equals "
                "gradient_accumulation_steps) or set it to a multiple."
            )

    def check_plan(self, plan: StepPlan, global_step: int) -> None:
        """A step with rollouts trains the attached demonstrations, not an `sft_dataset` batch: a plan asking for
        both would drop one of them, so it is refused (`plan.sft` is for the SFT warm-up, which has no rollouts)."""
        if plan.rl and plan.sft:
            raise RuntimeError(
                f"{type(self.strategy).__name__} takes its demonstrations from train_dataset (sft_source="
                f"'train_column'), but its plan for step {global_step} asks for rollouts and an sft_dataset batch "
                "(rl=True, sft=True): plan sft=False on steps with rollouts."
            )

    # ---- once per generation batch ---------------------------------------------------------------------------
    def generation(self, inputs: list[dict[str, Any]], out: dict[str, Any]) -> dict[str, Any]:
        """Plan a new generation batch, after it is scored; returns the keys to add to TRL's generation output: the
        per-row `amft_prompt` / `amft_demonstration` (`RolloutBatch` reads them) and `amft_sft_tokens`.

        `inputs` are this process's rows (its slice of the global generation batch, in the sampler's order), `out`
        TRL's generation output with AMFT's `amft_reward` / `amft_group_rewards` added.
        """
        column = self.strategy.demonstration_column
        prompts = [row["prompt"] for row in inputs]
        demonstrations = [row[column] for row in inputs]
        images = [None if self.image_column is None else row_images(row, self.image_column) for row in inputs]
        gate = self.strategy.sft_gate(
            RolloutBatch(
                advantages=out["advantages"],
                rewards=out["amft_reward"],
                group_rewards=out["amft_group_rewards"],
                completion_mask=out["completion_mask"],
                prompts=prompts,
                demonstrations=demonstrations,
            )
        ).tolist()
        steps = self.steps_per_generation // self.accumulation
        examples: list[list[list[Example]]] = [[[] for _ in range(self.accumulation)] for _ in range(steps)]
        tokens = [0.0] * steps
        prompt_counts, to_sft = [0] * steps, [0] * steps
        first_row = self.accelerator.process_index * len(inputs)
        for i, (prompt, demonstration, gated) in enumerate(zip(prompts, demonstrations, gate, strict=True)):
            q, offset = divmod(first_row + i, self.num_generations)
            if offset != 0:  # the prompt is held (counted, trained) by the process with its first row
                continue
            k = q % steps
            prompt_counts[k] += 1
            example = self._example(prompt, demonstration, images[i]) if gated and demonstration else None
            if example is None:
                continue
            examples[k][to_sft[k] % self.accumulation].append(example)
            to_sft[k] += 1
            tokens[k] += trained_tokens(example)
        counts = [float(len(e)) for per_step in examples for e in per_step]
        reduced = global_sum(self.accelerator, tokens + counts)
        world = self.accelerator.num_processes
        forward = [
            [reduced[steps + k * self.accumulation + j] > 0 for j in range(self.accumulation)]
            for k in range(steps)
        ]
        self._generation = _Generation(
            examples=examples,
            normalizers=[reduced[k] / world for k in range(steps)],
            forward=forward,
            prompts=prompt_counts,
            prompts_to_sft=to_sft,
            placeholder=self._placeholder(examples, prompts, demonstrations, images),
        )
        return {
            "amft_prompt": prompts,
            "amft_demonstration": demonstrations,
            # the generation batch's demonstration tokens, all processes (read by `amft_trl.compare`'s metering)
            "amft_sft_tokens": torch.tensor(sum(reduced[:steps]), device=out["advantages"].device),
        }

    def _placeholder(self, examples, prompts, demonstrations, images) -> Example:
        """A zero-weight row for a micro-step where this process has no demonstration but another has."""
        for per_step in examples:
            for micro in per_step:
                if micro:
                    return micro[0]
        for prompt, demonstration, row_images_ in zip(prompts, demonstrations, images, strict=True):
            example = self._example(prompt, demonstration, row_images_) if demonstration else None
            if example is not None:
                return example
        if self.placeholder is not None:
            return self.placeholder(prompts[0], images[0] or [])
        return {"prompt_ids": [self.eos_token_id], "completion_ids": [self.eos_token_id]}

    # ---- once per GRPO micro-step ----------------------------------------------------------------------------
    def micro_step(self) -> MicroStepDemonstrations:
        """This GRPO micro-step's share of the current generation batch's demonstrations (advances by one)."""
        plan = self._generation
        if plan is None:
            raise RuntimeError("AttachedDemonstrations.micro_step was called before any generation batch.")
        chunk = plan.position % self.steps_per_generation  # iterations (num_iterations > 1) repeat the batch
        plan.position += 1
        k, j = divmod(chunk, self.accumulation)
        out = MicroStepDemonstrations()
        if j == 0:
            out.prompts, out.prompts_to_sft = plan.prompts[k], plan.prompts_to_sft[k]
        if not plan.forward[k][j]:
            return out
        examples = plan.examples[k][j]
        row_weights = torch.ones(len(examples))
        if not examples:  # another process trains one here: a zero-weight row keeps the forward counts equal
            examples, row_weights = [plan.placeholder], torch.zeros(1)
        out.sft = DemonstrationMicroBatch(self.collate(examples), row_weights, plan.normalizers[k])
        return out
