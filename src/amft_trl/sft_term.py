"""The SFT term of AMFT's loss (AMFT paper, Eq. 2 and Eq. 3): the demonstrations, their batches and their NLL.

`L_SFT` is the token-mean negative log-likelihood of a batch of demonstrations at temperature 1 (Eq. 2). It is
normalised by the completion tokens of the whole optimizer step's SFT batch (all micro-steps, all processes), so that
it does not change with the gradient-accumulation layout (as TRL's `dapo` loss is normalised by its batch's tokens).
A strategy may weight its tokens (`BalancingStrategy.sft_token_weights`: CHORD's phi, SRFT's entropy weights).

`SFTTerm` owns everything about it that is not the step's control flow:

- the demonstrations of `sft_dataset`, tokenised once (or kept as rows for image demonstrations, processed batch by
  batch by TRL's VLM collator, or as whole conversations when completions hold images: V-IRL's tool replies), and
  the seeded, resumable stream that draws them (`draw`);
- how each demonstration is rendered, as the rollout prompts are: with which tools (`tools`: a row's `tools` column,
  else the tools the trainer's rollouts are rendered with; see `demonstration_tools`) and the chat template's extra
  arguments (`template_kwargs`: `GRPOConfig.chat_template_kwargs`, e.g. Qwen3's `enable_thinking`);
- demonstrations that come from elsewhere (a `train_dataset` column: HPT, ReLIFT), tokenised the same way
  (`tokenize_demonstration`, `collate_demonstrations`);
- per-token log-probs and entropies of a batch at temperature 1 (`token_stats`), the weighted NLL and its backward
  for one micro-batch (`micro_step`), and its sums over a step (`SFTStepSums`: the logged `amft/sft_loss`, the entropy
  H_t of Eq. 6);
- the target entropy H* of Eq. 6 (`target_entropy`, Algorithm 2 line 11).

The trainer decides when each of these runs (`AMFTTrainer.training_step`).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from trl.data_utils import is_conversational

from . import _private_api
from ._distributed import global_sum
from .balancing import BalancingStrategy
from .sft_data import (
    DemonstrationTools,
    InfiniteStream,
    SFTBatch,
    as_completion,
    collate_sft,
    collate_vision_conversations,
    collate_vision_sft,
    image_column,
    prepare_vision_sft_dataset,
    split_image_parts,
    tokenize_prompt_completion,
    tokenize_sft_dataset,
    tool_schemas,
    trained_tokens,
    vision_demonstration,
    whole_conversation_rows,
)


def demonstration_tools(trainer: Any) -> DemonstrationTools:
    """The tools demonstrations are rendered with by default: those GRPOTrainer renders the rollout prompts with.

    With an `environment_factory`, its environment's tools (the trainer's `tools` plus the environment's public
    methods); with a dict of environments, each environment's own (a demonstration names its environment in an
    `environment` column, as the RL prompts do); else the trainer's `tools` (none for most runs: then demonstrations
    are rendered exactly as before). A row's `tools` column overrides them (`DemonstrationTools.for_row`)."""
    factories = getattr(trainer, "environment_factories", None)
    if factories is not None and set(factories) != {None}:
        env_tools = _private_api.environment_tools(trainer)
        return DemonstrationTools(by_environment={name: tool_schemas(t) for name, t in env_tools.items()})
    return DemonstrationTools(default=tool_schemas(getattr(trainer, "tools", None)))


@dataclass
class SFTStepSums:
    """This process's sums over one optimizer step's SFT micro-batches (reduced over processes at the step's end)."""

    nll: float = 0.0  # unweighted NLL summed over the step's demonstration tokens
    tokens: float = 0.0  # demonstration tokens the NLL was summed over
    weight: float = 0.0  # effective SFT weight summed over those tokens
    entropy: float = 0.0  # token entropy summed over them (when the strategy measures H_t)


class SFTTerm:
    """The demonstrations and the SFT loss of one `AMFTTrainer` (see the module docstring).

    Args:
        trainer: the `AMFTTrainer` (its processing class, accelerator, chat template, sampling temperature, TRL's
            fused log-prob head and autocast context).
        sft_dataset: the demonstrations, or None when the strategy reads them from elsewhere.
        rl_image_parts: the RL prompts hold their images in image parts (demonstrations read from them carry them).
    """

    def __init__(self, trainer: Any, sft_dataset: Any, rl_image_parts: bool = False):
        self.trainer = trainer
        args = trainer.args
        self.args = args
        self.processing_class = trainer.processing_class
        self.accelerator = trainer.accelerator
        self.batch_size = args.sft_per_device_train_batch_size or args.per_device_train_batch_size
        self.rl_image_parts = rl_image_parts
        self.image_column = image_column(sft_dataset)
        self.tools = demonstration_tools(trainer)
        # the chat template's extra arguments the rollout prompts are rendered with (GRPOConfig.chat_template_kwargs)
        self.template_kwargs = dict(getattr(trainer, "chat_template_kwargs", None) or {})
        self.dataset, self.num_dropped = None, 0
        self.stream: InfiniteStream | None = None
        # images or tool replies in some completion: rows are processed as whole conversations, not by TRL's collator
        # (which trains on every completion token), so that only the assistant's tokens are trained on
        whole = self.image_column is not None and bool(whole_conversation_rows(sft_dataset))
        self.whole_conversations = whole
        if self.image_column is not None:  # raw rows, processed batch by batch by TRL's VLM collator
            self.dataset, self.num_dropped = prepare_vision_sft_dataset(
                sft_dataset,
                self.processing_class,
                args.max_sft_length,
                tools=self.tools,
                template_kwargs=self.template_kwargs,
            )
        elif sft_dataset is not None:
            self.dataset, self.num_dropped = tokenize_sft_dataset(
                sft_dataset,
                self.processing_class,
                args.max_sft_length,
                chat_template=trainer.chat_template,
                tools=self.tools,
                template_kwargs=self.template_kwargs,
            )
        if self.dataset is not None:
            self.stream = InfiniteStream(len(self.dataset), seed=args.seed)

    @property
    def pad_token_id(self) -> int:
        return getattr(self.processing_class, "tokenizer", self.processing_class).pad_token_id

    # ---- batches ------------------------------------------------------------------------------------------------
    def draw(self, num_micro: int) -> list[SFTBatch]:
        """This step's SFT examples: the next `batch x micro-steps x processes` of the stream, this rank's slice."""
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        per_micro = self.batch_size
        indices = self.stream.take(per_micro * num_micro * world)
        local = indices[rank * per_micro * num_micro : (rank + 1) * per_micro * num_micro]
        return [self.collate(local[m * per_micro : (m + 1) * per_micro]) for m in range(num_micro)]

    def collate(self, indices: list[int]) -> SFTBatch:
        """The tokenised demonstrations at `indices`, padded into one batch (image ones processed here)."""
        if self.whole_conversations:
            return collate_vision_conversations(
                [self.dataset[i] for i in indices],
                self.processing_class,
                self.args.max_sft_length,
                self.image_column,
                self.tools,
                self.template_kwargs,
            )
        if self.image_column is not None:
            return collate_vision_sft(
                [self.dataset[i] for i in indices],
                self.processing_class,
                self.args.max_sft_length,
                self.image_column,
                self.tools,
                self.template_kwargs,
            )
        return collate_sft([self.dataset[i] for i in indices], self.pad_token_id)

    def tokenize_demonstration(
        self, prompt: Any, demonstration: Any, images: list[Any] | None = None
    ) -> dict[str, Any] | None:
        """A prompt's demonstration (from a train_dataset column) tokenised like the SFT data; None when truncation
        leaves no completion token to train on (none of the assistant's, for a multi-turn demonstration). A string
        demonstration of a conversational prompt is the assistant's message.

        `images` (image prompts): the row's images, which the demonstration carries into the SFT forward; the example
        is then one for `collate_demonstrations` (`amft_trl.sft_data.vision_demonstration`), None also when the
        prompt and its image tokens leave no room for a completion token within `max_sft_length`. Prompts that hold
        their images in image parts give them here."""
        completion = as_completion(prompt, demonstration)
        if images is None and self.rl_image_parts:
            prompt, images = split_image_parts(prompt)
        tools = self.tools.default if is_conversational({"prompt": prompt}) else None
        if images is not None:
            return vision_demonstration(
                self.processing_class,
                prompt,
                completion,
                images,
                self.args.max_sft_length,
                tools,
                self.template_kwargs,
            )
        example = tokenize_prompt_completion(
            self.processing_class,
            prompt,
            completion,
            self.args.max_sft_length,
            chat_template=self.trainer.chat_template,
            tools=tools,
            template_kwargs=self.template_kwargs,
        )
        return example if trained_tokens(example) > 0 else None

    def collate_demonstrations(self, examples: list[dict[str, Any]]) -> SFTBatch:
        """Demonstrations of image prompts (`tokenize_demonstration` with images), through TRL's VLM collator."""
        return collate_vision_sft(
            examples,
            self.processing_class,
            self.args.max_sft_length,
            "images",
            DemonstrationTools(),
            self.template_kwargs,
        )

    def vision_placeholder(self, prompt: Any, images: list[Any]) -> dict[str, Any]:
        """A zero-weight row with the prompt's images (the vision tower runs on every process): EOS as completion."""
        eos = getattr(self.processing_class, "tokenizer", self.processing_class).eos_token
        if not images and self.rl_image_parts:
            prompt, images = split_image_parts(prompt)
        tools = self.tools.default if is_conversational({"prompt": prompt}) else None
        example = vision_demonstration(
            self.processing_class,
            prompt,
            as_completion(prompt, eos),
            images,
            None,
            tools,
            self.template_kwargs,
        )
        if example is None:
            raise RuntimeError(f"No placeholder demonstration can be built for the prompt {prompt!r}.")
        return example

    # ---- the loss -----------------------------------------------------------------------------------------------
    def token_stats(
        self, model: Any, batch: SFTBatch, compute_entropy: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-token log-probs and entropies of the demonstration completions at temperature 1. Shapes (B, C).

        At `temperature == 1` this is TRL's fused log-prob head (no logits materialised). Otherwise the fused head
        would apply the sampling temperature, so the logits of the completion positions are computed directly.
        """
        input_ids = torch.cat([batch.prompt_ids, batch.completion_ids], dim=1)
        attention_mask = torch.cat([batch.prompt_mask, batch.completion_mask], dim=1)
        c = batch.completion_ids.size(1)
        extra = batch.model_inputs  # image demonstrations: pixel_values, image_grid_thw, ..., num_images
        if self.trainer.temperature == 1.0:
            return _private_api.per_token_logps_and_entropies(
                self.trainer, model, input_ids, attention_mask, c, compute_entropy=compute_entropy, **extra
            )
        forward = {k: v for k, v in extra.items() if k != "num_images"}
        logits = model(
            input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=c + 1, **forward
        ).logits[:, :-1]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        logps = logprobs.gather(-1, batch.completion_ids.unsqueeze(-1)).squeeze(-1)
        entropies = -(logprobs.exp() * logprobs).sum(-1) if compute_entropy else None
        return logps, entropies

    def micro_step(
        self,
        model: Any,
        batch: SFTBatch,
        weight: float,
        sums: SFTStepSums,
        *,
        scale: float,
        strategy: BalancingStrategy | None,
        measure_entropy: bool,
        needs_grad: bool,
        around_backward: Callable[[float], AbstractContextManager[float]],
        backward: Callable[[torch.Tensor], None],
        row_weights: torch.Tensor | None = None,
    ) -> float:
        """Forward (and, when `needs_grad`, backward) one SFT micro-batch: Eq. 2, weighted by Eq. 3's `weight`.

        The backward's loss is `sum of weighted NLL over completion tokens x scale`, with `scale` the inverse of the
        step's completion tokens over all processes times the process count (DDP averages gradients), so that
        summing micro-steps gives the token mean. `strategy`: whose token weights apply (None during a warm-up:
        plain NLL). `around_backward(weight)` yields the weight the backward is taken with (the meta step's, or
        `weight`). `row_weights`: per-demonstration weights (the attached demonstrations'). Adds to `sums`; returns
        this micro-batch's share of the step's weighted loss.
        """
        batch = batch.to(self.accelerator.device)
        compute_entropy = measure_entropy or (
            strategy is not None and strategy.sft_token_weights_need_entropy
        )
        probe = around_backward(weight) if needs_grad else nullcontext(0.0)
        with probe as backward_weight:
            with (
                torch.enable_grad() if needs_grad else torch.no_grad(),
                self.trainer.compute_loss_context_manager(),
            ):
                logps, entropies = self.token_stats(model, batch, compute_entropy=compute_entropy)
            mask = batch.loss_mask.to(logps.dtype)
            if row_weights is not None:
                mask = mask * row_weights.to(mask.device, mask.dtype).unsqueeze(1)
            token_weights = (
                strategy.sft_token_weights(logps, entropies, mask) if strategy is not None else None
            )
            weights = mask if token_weights is None else mask * token_weights.detach()
            weighted_nll = -(logps * weights).sum()
            if needs_grad:
                backward(weighted_nll * scale * backward_weight)
        sums.nll += float(-(logps.detach() * mask).sum())
        sums.tokens += float(mask.sum())
        sums.weight += weight * float(weights.detach().sum())
        if measure_entropy and entropies is not None:
            sums.entropy += float((entropies.detach() * mask).sum())
        return weight * float(weighted_nll.detach()) * scale / self.accelerator.num_processes

    # ---- H* (Algorithm 2, line 11) ------------------------------------------------------------------------------
    @torch.no_grad()
    def target_entropy(self, model: Any) -> float:
        """Mean token entropy (temperature 1) of the policy on a fixed, seeded subset of the demonstrations.

        Every process runs the same number of forward passes, whatever the subset's size (DDP broadcasts buffers at
        each forward, ZeRO-3 gathers parameters): a process whose share is smaller pads with zero-weight rows.
        """
        n = min(self.args.target_entropy_num_samples, len(self.dataset))
        indices = InfiniteStream(len(self.dataset), seed=self.args.seed + 2).take(n)
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        local = indices[rank::world]
        per_process = -(-n // world)  # ceil: the largest share
        weights = [1.0] * len(local) + [0.0] * (per_process - len(local))
        local = local + [indices[0]] * (per_process - len(local))
        entropy_sum, tokens = 0.0, 0.0
        for start in range(0, per_process, self.batch_size):
            batch = self.collate(local[start : start + self.batch_size]).to(self.accelerator.device)
            row = torch.tensor(weights[start : start + self.batch_size], device=self.accelerator.device)
            mask = batch.loss_mask * row.unsqueeze(1)
            with self.trainer.compute_loss_context_manager():
                _, entropies = self.token_stats(model, batch, compute_entropy=True)
            entropy_sum += float((entropies * mask).sum())
            tokens += float(mask.sum())
        entropy_sum, tokens = global_sum(self.accelerator, [entropy_sum, tokens])
        return entropy_sum / max(tokens, 1.0)
