"""The SFT side of AMFT: demonstration tokenisation, a seeded infinite stream, and padding.

Demonstrations come in TRL's prompt-completion format (standard strings or conversational messages), or as a
conversational `messages` column whose last message is the completion. Tokenisation follows TRL's SFTTrainer: the
chat template for conversational data, EOS appended to standard completions, and the completion starting where the
tokenised prompt and prompt+completion diverge (`trl.data_utils.common_prefix_length`). The loss is on completion
tokens only (Eq. 2).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset
from trl.data_utils import common_prefix_length, is_conversational

from ._trl_compat import tokenize as _tokenize

logger = logging.getLogger(__name__)


def check_sft_columns(dataset: Dataset, name: str = "sft_dataset") -> None:
    """Raise a ValueError naming the columns found when `dataset` is not prompt/completion or messages."""
    columns = list(dataset.column_names or [])
    if {"prompt", "completion"} <= set(columns) or "messages" in columns:
        return
    raise ValueError(
        f"`{name}` must have `prompt` and `completion` columns (TRL prompt-completion format) or a conversational "
        f"`messages` column; it has {columns}."
    )


def _as_prompt_completion(example: dict[str, Any]) -> tuple[Any, Any]:
    if "prompt" in example and "completion" in example:
        return example["prompt"], example["completion"]
    messages = example["messages"]
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("A `messages` example must end with an assistant message (the completion).")
    return messages[:-1], messages[-1:]


def tokenize_prompt_completion(
    processing_class: Any,
    prompt: Any,
    completion: Any,
    max_length: int | None,
    chat_template: str | None = None,
) -> dict[str, list[int]]:
    """One demonstration as `prompt_ids` / `completion_ids`, the way TRL's SFTTrainer tokenises it.

    Conversational prompts go through the chat template (the generation prompt closes the prompt); a standard
    completion gets EOS appended. The completion starts where the tokenised prompt and prompt + completion diverge.
    Truncated on the right to `max_length` tokens in all; the completion may come out empty.
    """
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    eos = tokenizer.eos_token
    kwargs = {"chat_template": chat_template} if chat_template is not None else {}
    if is_conversational({"prompt": prompt}):
        prompt_ids = _tokenize(processing_class, prompt, add_generation_prompt=True, **kwargs)["input_ids"]
        full_ids = _tokenize(processing_class, prompt + completion, **kwargs)["input_ids"]
    else:
        if eos is not None and not completion.endswith(eos):
            completion = completion + eos
        prompt_ids = _tokenize(processing_class, prompt)["input_ids"]
        full_ids = _tokenize(processing_class, prompt + completion)["input_ids"]
    prompt_len = common_prefix_length(prompt_ids, full_ids)
    if max_length is not None:
        full_ids = full_ids[:max_length]
    prompt_len = min(prompt_len, len(full_ids))
    return {"prompt_ids": full_ids[:prompt_len], "completion_ids": full_ids[prompt_len:]}


def tokenize_sft_dataset(
    dataset: Dataset, processing_class: Any, max_length: int | None, chat_template: str | None = None
) -> tuple[Dataset, int]:
    """Tokenise demonstrations into `prompt_ids` / `completion_ids`, dropping those with no completion left.

    Returns the tokenised dataset and the number of examples dropped because truncation to `max_length` removed
    their whole completion (reported with a warning; they are never trained on as empty).
    """
    check_sft_columns(dataset)

    def tokenize(example: dict[str, Any]) -> dict[str, Any]:
        prompt, completion = _as_prompt_completion(example)
        return tokenize_prompt_completion(processing_class, prompt, completion, max_length, chat_template)

    tokenized = dataset.map(tokenize, remove_columns=dataset.column_names, desc="Tokenizing SFT dataset")
    keep = [
        i
        for i, (p, c) in enumerate(zip(tokenized["prompt_ids"], tokenized["completion_ids"], strict=True))
        if len(p) > 0 and len(c) > 0
    ]
    dropped = len(tokenized) - len(keep)
    if dropped:
        logger.warning(
            "AMFT: %d of %d SFT examples have no completion token left after truncation to max_sft_length=%s "
            "(or no prompt token at all); they are dropped (first indices: %s). Raise `max_sft_length` to keep them.",
            dropped,
            len(tokenized),
            max_length,
            [i for i in range(len(tokenized)) if i not in set(keep)][:10],
        )
        if not keep:
            raise ValueError(
                f"Every SFT example lost its whole completion to truncation at max_sft_length={max_length}; "
                "raise `max_sft_length`."
            )
        tokenized = tokenized.select(keep)
    return tokenized, dropped


class InfiniteStream:
    """Seeded, resumable, infinite walk over `range(size)`: one fresh permutation per pass.

    It owns its own `torch.Generator`, so drawing from it never perturbs the global RNG (and so the RL stream's
    randomness). Its position is two integers, saved in checkpoints.
    """

    def __init__(self, size: int, seed: int, shuffle: bool = True):
        if size < 1:
            raise ValueError("InfiniteStream needs a non-empty dataset.")
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.epoch, self.offset = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.size, generator=generator).tolist()

    def take(self, n: int) -> list[int]:
        """The next `n` indices."""
        out = []
        while len(out) < n:
            if self.offset == self.size:
                self.epoch, self.offset = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            k = min(n - len(out), self.size - self.offset)
            out.extend(self._order[self.offset : self.offset + k])
            self.offset += k
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._order = self._permutation(self.epoch)


@dataclass
class SFTBatch:
    """A padded batch of demonstrations, laid out like GRPO's rollouts.

    prompt_ids:      (B, P) left-padded
    prompt_mask:     (B, P)
    completion_ids:  (B, C) right-padded
    completion_mask: (B, C)
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.completion_mask.sum())

    def to(self, device: torch.device | str) -> SFTBatch:
        return SFTBatch(
            *(
                t.to(device)
                for t in (self.prompt_ids, self.prompt_mask, self.completion_ids, self.completion_mask)
            )
        )


def collate_sft(examples: list[dict[str, list[int]]], pad_token_id: int) -> SFTBatch:
    """Pad tokenised demonstrations: prompts on the left, completions on the right (as GRPO lays out rollouts)."""
    p_len = max(len(e["prompt_ids"]) for e in examples)
    c_len = max(len(e["completion_ids"]) for e in examples)
    b = len(examples)
    prompt_ids = torch.full((b, p_len), pad_token_id, dtype=torch.long)
    prompt_mask = torch.zeros((b, p_len), dtype=torch.long)
    completion_ids = torch.full((b, c_len), pad_token_id, dtype=torch.long)
    completion_mask = torch.zeros((b, c_len), dtype=torch.long)
    for i, e in enumerate(examples):
        p, c = e["prompt_ids"], e["completion_ids"]
        if p:
            prompt_ids[i, p_len - len(p) :] = torch.tensor(p)
            prompt_mask[i, p_len - len(p) :] = 1
        completion_ids[i, : len(c)] = torch.tensor(c)
        completion_mask[i, : len(c)] = 1
    return SFTBatch(prompt_ids, prompt_mask, completion_ids, completion_mask)
