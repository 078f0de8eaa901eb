"""ReLIFT's buffer of all-failed prompts: the trainer's side of `balancing="relift"` (ReLIFT, Ma et al. 2025).

The strategy (`amft_trl.balancing.relift`) holds ReLIFT's rule: which groups failed (`all_failed`), the buffer, and
when it is full, an SFT step on it instead of an RL step. This module connects it to the rollouts and the SFT term:

- `fill`: after a generation batch is scored, each all-failed group's prompt and its demonstration (a
  `train_dataset` column; with its images for image prompts) is buffered, in global row order, on every process;
- `sft_batches`: the SFT step's micro-batches, this process's equal share of the buffered entries, tokenised like
  the SFT data (`SFTTerm.tokenize_demonstration`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from accelerate.utils import gather_object

from .balancing.relift import ReLIFTStrategy, all_failed
from .sft_data import SFTBatch, collate_sft, row_images, split_image_parts

logger = logging.getLogger(__name__)


class FailedPromptBuffer:
    """Feeds ReLIFT's buffer from the rollouts and turns it into SFT micro-batches (see the module docstring).

    Args:
        trainer: the `AMFTTrainer` (accelerator, `num_generations`, reward weights).
        strategy: the ReLIFT strategy (holds the buffer itself, saved in checkpoints).
        sft_term: the trainer's `SFTTerm` (tokenisation and VLM collation of demonstrations).
        image_column: the RL dataset's image column, if any; `image_parts`: its prompts hold their images in image
            parts instead.
    """

    def __init__(
        self,
        trainer: Any,
        strategy: ReLIFTStrategy,
        sft_term: Any,
        image_column: str | None,
        image_parts: bool,
    ):
        world, accumulation = trainer.accelerator.num_processes, trainer.args.gradient_accumulation_steps
        if strategy.buffer_size % (world * accumulation) != 0:
            raise ValueError(
                f"`relift_buffer_size` ({strategy.buffer_size}) must be divisible by processes x "
                f"gradient_accumulation_steps ({world} x {accumulation}): each SFT step splits the buffer evenly "
                "over them."
            )
        self.trainer, self.strategy, self.sft_term = trainer, strategy, sft_term
        self.image_column, self.image_parts = image_column, image_parts

    def entry(self, row: dict[str, Any], column: str) -> tuple[Any, ...]:
        """What the buffer keeps of a row: (prompt, demonstration), plus its images for image prompts (from its image
        column, or taken out of its prompt's image parts, so that the checkpoint can store them)."""
        if self.image_column is not None:
            return row["prompt"], row.get(column), row_images(row, self.image_column)
        if self.image_parts:
            prompt, images = split_image_parts(row["prompt"])
            return prompt, row.get(column), images
        return row["prompt"], row.get(column)

    def example(self, entry: tuple[Any, ...]) -> dict[str, Any] | None:
        """A buffered (prompt, demonstration[, images]) tokenised like the SFT data (`max_sft_length`, with the
        row's images for image prompts); None when no completion token is left."""
        if not entry[1]:
            return None
        return self.sft_term.tokenize_demonstration(*entry)

    def fill(self, inputs: list[dict[str, Any]], total: torch.Tensor) -> None:
        """Buffer the generation batch's all-failed prompts with their demonstrations, in global row order, on every
        process (each group's first row carries it; the buffer is the same everywhere). `total`: every process's
        rollout rewards (`amft_trl.trainer.rollout_rewards`: NaN where unscorable, which is never a failure)."""
        trainer = self.trainer
        g = trainer.num_generations
        failed = all_failed(total.view(-1, g), self.strategy.fail_reward).repeat_interleave(g).cpu().tolist()
        first = trainer.accelerator.process_index * len(inputs)
        column = self.strategy.demonstration_column
        local = [
            self.entry(row, column)
            for i, row in enumerate(inputs)
            if (first + i) % g == 0 and failed[first + i]
        ]
        gathered = gather_object(local) if trainer.accelerator.num_processes > 1 else local
        kept = [entry for entry in gathered if self.example(entry) is not None]
        if len(kept) < len(gathered):
            logger.warning(
                "ReLIFT: %d all-failed prompt(s) not buffered: their demonstration (train_dataset[%r]) is empty or "
                "truncated away by max_sft_length.",
                len(gathered) - len(kept),
                column,
            )
        self.strategy.add_failed(kept)

    def sft_batches(self, examples: list[tuple[Any, ...]], num_micro: int) -> list[SFTBatch]:
        """The SFT step's micro-batches: this process's equal share of the buffered entries, split over micro-steps
        (image prompts' through TRL's VLM collation, with their images)."""
        accelerator = self.trainer.accelerator
        world, rank = accelerator.num_processes, accelerator.process_index
        per_process = len(examples) // world
        local = examples[rank * per_process : (rank + 1) * per_process]
        per_micro = per_process // num_micro
        tokenised = [self.example(entry) for entry in local]
        if self.image_column is not None or self.image_parts:
            collate = self.sft_term.collate_demonstrations
        else:
            pad = self.sft_term.pad_token_id
            collate = lambda examples: collate_sft(examples, pad)  # noqa: E731
        return [collate(tokenised[m * per_micro : (m + 1) * per_micro]) for m in range(num_micro)]
