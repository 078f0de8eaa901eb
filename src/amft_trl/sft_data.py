"""The SFT side of AMFT: demonstration tokenisation, a seeded infinite stream, and padding.

Demonstrations come in TRL's prompt-completion format (standard strings or conversational messages), or as a
conversational `messages` column whose last message is the completion. Tokenisation follows TRL's SFTTrainer: the
chat template for conversational data, EOS appended to standard completions, and the completion starting where the
tokenised prompt and prompt+completion diverge (`trl.data_utils.common_prefix_length`). The loss is on completion
tokens only (Eq. 2); in a multi-turn completion, on the assistant's turns only (tool replies masked, as GRPO masks
them: `text_assistant_mask`, `conversation_demonstration`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import Dataset
from trl.data_utils import common_prefix_length, is_conversational

from ._private_api import tokenize as _tokenize

logger = logging.getLogger(__name__)


#: What `check_sft_columns` accepts, as said in its errors.
ACCEPTED_SFT_FORMATS = (
    "`prompt` and `completion` columns that are both standard (strings) or both conversational (lists of "
    '{"role": ..., "content": ...} messages), or one conversational `messages` column whose last message is the '
    "assistant's (the completion)"
)

_STANDARD, _CONVERSATIONAL, _PER_ROW = "standard", "conversational", "per-row"


def _format_error(name: str, where: str, problem: str) -> ValueError:
    return ValueError(f"`{name}` {where}: {problem}. Accepted formats: {ACCEPTED_SFT_FORMATS}.")


def _feature_kind(feature: Any) -> str | None:
    """The format a column's Arrow type fixes for every row, `_PER_ROW` when rows may differ, None if unusable."""
    from datasets import Json, LargeList, List, Sequence, Value

    if isinstance(feature, Value):
        return _STANDARD if feature.dtype in ("string", "large_string") else None
    if isinstance(feature, Json):
        return _PER_ROW
    if isinstance(feature, (List, LargeList, Sequence)):
        inner = feature.feature
        if isinstance(inner, Json):
            return _PER_ROW
        if isinstance(inner, dict) and "role" in inner and "content" in inner:
            return _CONVERSATIONAL
    return None


def _value_kind(value: Any) -> str:
    """The format of one row's value: `_STANDARD`, `_CONVERSATIONAL`, or a description of what is wrong with it."""
    if isinstance(value, str):
        return _STANDARD
    if value is None:
        return "missing (null)"
    if isinstance(value, list):
        if not value:
            return "an empty list"
        if all(isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in value):
            return _CONVERSATIONAL
        return 'a list that is not a list of {"role": ..., "content": ...} messages'
    if isinstance(value, dict):
        return "a single dict, not a list of messages"
    return f"of type {type(value).__name__}"


def _first_true(mask: Any) -> int | None:
    """Index of the first true entry of a pyarrow boolean array (nulls count as false), or None."""
    import pyarrow.compute as pc

    filled = pc.fill_null(mask, False)
    if not pc.any(filled).as_py():
        return None
    return int(pc.index(filled, True).as_py())


def _arrow_row_problem(array: Any, kind: str, column: str, last_role: bool) -> tuple[int, str] | None:
    """First row of a typed column that the format check refuses: (row, problem), or None. Vectorised."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(array, pa.ChunkedArray):  # list offsets and parent indices are per chunk
        array = array.combine_chunks()
    row = _first_true(pc.is_null(array))
    if row is not None:
        return row, f"`{column}` is missing (null)"
    if kind == _STANDARD:
        return None
    lengths = pc.list_value_length(array)
    row = _first_true(pc.equal(lengths, 0))
    if row is not None:
        return row, f"`{column}` is an empty list"
    messages = pc.list_flatten(array)
    parents = pc.list_parent_indices(array).to_numpy(zero_copy_only=False)
    roles = pc.struct_field(messages, "role")
    bad = np.flatnonzero(pc.is_null(roles).to_numpy(zero_copy_only=False))
    if bad.size:
        return int(parents[bad[0]]), f"`{column}` has a message without a `role`"
    if last_role:
        row = _first_true(pc.less(lengths, 2))
        if row is not None:
            return row, f"`{column}` holds only one message: there is no prompt message before the completion"
        ends = np.cumsum(lengths.to_numpy(zero_copy_only=False)) - 1
        last = pc.take(roles, ends)
        wrong = _first_true(pc.not_equal(last, "assistant"))
        if wrong is not None:
            return wrong, (
                f"the last message of `{column}` has role {last[wrong].as_py()!r}; it must be the assistant's "
                "(the completion)"
            )
    return None


def _pair_problem(prompt_kind: str, completion_kind: str) -> str | None:
    if prompt_kind == completion_kind and prompt_kind in (_STANDARD, _CONVERSATIONAL):
        return None
    for column, kind in (("prompt", prompt_kind), ("completion", completion_kind)):
        if kind not in (_STANDARD, _CONVERSATIONAL):
            return f"`{column}` is {kind}"
    return (
        f"`prompt` is {prompt_kind} ({'a string' if prompt_kind == _STANDARD else 'a list of messages'}) but "
        f"`completion` is {completion_kind} ({'a string' if completion_kind == _STANDARD else 'a list of messages'}); "
        "both must have the same format"
    )


def _messages_problem(messages: Any) -> str | None:
    kind = _value_kind(messages)
    if kind != _CONVERSATIONAL:
        return f"`messages` is {kind}"
    if messages[-1]["role"] != "assistant":
        return (
            f"the last message of `messages` has role {messages[-1]['role']!r}; it must be the assistant's "
            "(the completion)"
        )
    if len(messages) < 2:
        return "`messages` holds only the completion: there is no prompt message before it"
    return None


def _undecoded_json(dataset: Dataset, columns: list[str]) -> Dataset:
    """`dataset` with its `Json` columns read as the JSON text stored for each row (no data is rewritten)."""
    from datasets import Json

    for column in columns:
        dataset = dataset.cast_column(column, Json(decode=False))
    return dataset


def _json_cell(text: str | None) -> Any:
    """One row of a `Json` column, from its stored text.

    datasets stores a string of a `Json` column as its bare text and decodes it as JSON when it can: the string
    "2" comes back as the number 2, "true" as True. Only lists and objects are decoded here; anything else is the
    row's string, as written in the file.
    """
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, (list, dict)) else text


def _decode_row(example: dict[str, Any], json_columns: list[str]) -> dict[str, Any]:
    return {key: _json_cell(value) if key in json_columns else value for key, value in example.items()}


def tool_schemas(tools: Any) -> list[dict[str, Any]] | None:
    """`tools` (JSON-schema dicts and / or callables, as `apply_chat_template` takes them) as JSON schemas, callables
    converted by transformers' `get_json_schema` (as `apply_chat_template` converts them, so the rendering is the
    same); None when there are none (TRL renders `tools=[]` as no tools)."""
    if not tools:
        return None
    from transformers.utils import get_json_schema

    return [tool if isinstance(tool, dict) else get_json_schema(tool) for tool in tools]


@dataclass
class DemonstrationTools:
    """Which tools a demonstration is rendered with by the chat template.

    - A row with a `tools` column: that row's value, read as TRL's SFTTrainer reads it (a JSON string is parsed; a
      list of JSON schemas is taken as is; null or `[]`: no tools).
    - Otherwise the trainer's tools, as its rollouts are rendered: `default` (GRPOTrainer's `tools` plus the methods
      of its `environment_factory`'s environment), or, with a dict of environments, the tools of the environment
      the row's `environment` column names (`by_environment`).
    """

    default: list[dict[str, Any]] | None = None
    by_environment: dict[Any, list[dict[str, Any]] | None] | None = None

    def for_row(self, example: dict[str, Any]) -> list[dict[str, Any]] | None:
        """The tools of one demonstration (a ValueError names what is wrong with its `tools` / `environment`)."""
        if "tools" in example:
            value = example["tools"]
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except ValueError as error:
                    raise ValueError(f"its `tools` is a string that is not JSON ({error})") from error
            if value is not None and not (
                isinstance(value, list) and all(isinstance(tool, dict) for tool in value)
            ):
                raise ValueError(
                    f"its `tools` is {type(value).__name__}; expected a list of JSON-schema dicts (or its JSON text), "
                    "or null for no tools"
                )
            return value or None
        if self.by_environment is None:
            return self.default
        if "environment" not in example:
            raise ValueError(
                "the trainer has several environments (a dict `environment_factory`) and the row says neither which "
                "one its rollouts use (an `environment` column, as in train_dataset) nor its tools (a `tools` column)"
            )
        name = example["environment"]
        if name not in self.by_environment:
            raise ValueError(
                f"its `environment` is {name!r}, which is not one of the trainer's environments "
                f"{sorted(map(str, self.by_environment))}"
            )
        return self.by_environment[name]


def check_sft_columns(dataset: Dataset, name: str = "sft_dataset") -> None:
    """Raise a ValueError unless every row of `dataset` is a demonstration in an accepted format.

    Accepted (`ACCEPTED_SFT_FORMATS`): `prompt` and `completion` both standard (strings) or both conversational
    (lists of `{"role", "content"}` messages), or a conversational `messages` column ending with the assistant's
    message. When both layouts are present, `prompt`/`completion` are used (as in tokenisation).

    Every row is checked, cheaply: a column's Arrow type fixes the format of all its rows, so a typed column is
    checked once, plus one vectorised pass for missing values, empty conversations and (for `messages`) the role of
    the last message. Columns of datasets' `Json` type (a JSON Lines file whose rows disagree loads that way) are
    checked row by row. The error names `name`, the column(s), the first offending row and the accepted formats.
    An empty dataset is refused by name.
    """
    columns = list(dataset.column_names or [])
    if {"prompt", "completion"} <= set(columns):
        used = ["prompt", "completion"]
    elif "messages" in columns:
        used = ["messages"]
    else:
        raise ValueError(
            f"`{name}` must have `prompt` and `completion` columns (TRL prompt-completion format) or a conversational "
            f"`messages` column; it has {columns}. Accepted formats: {ACCEPTED_SFT_FORMATS}."
        )
    if len(dataset) == 0:
        raise ValueError(
            f"`{name}` is empty (0 rows): the SFT term needs at least one demonstration. Pass demonstrations, or pin "
            "mu to 0 (mu_init=mu_min=mu_max=0) to train without an SFT term."
        )
    kinds = {}
    for column in used:
        feature = dataset.features[column]
        kind = _feature_kind(feature)
        if kind is None:
            raise _format_error(
                name, f"column `{column}`", f"has the type {feature}, which is not a format AMFT reads"
            )
        kinds[column] = kind

    per_row = [column for column in used if kinds[column] == _PER_ROW]
    if per_row:  # `Json` columns: rows may differ; each row is checked on the value as written in the file
        raw = _undecoded_json(dataset.select_columns(used), per_row)
        for start in range(0, len(raw), 1000):
            batch = raw[start : start + 1000]
            for offset in range(len(batch[used[0]])):
                row = _decode_row({column: batch[column][offset] for column in used}, per_row)
                if used == ["messages"]:
                    problem = _messages_problem(row["messages"])
                else:
                    problem = _pair_problem(_value_kind(row["prompt"]), _value_kind(row["completion"]))
                if problem is not None:
                    raise _format_error(name, f"row {start + offset}", problem)
        return

    if used == ["prompt", "completion"]:
        problem = _pair_problem(kinds["prompt"], kinds["completion"])
        if problem is not None:  # the column types differ: every row is mixed
            raise _format_error(
                name, "row 0 (and every other row: the two columns have different types)", problem
            )
    elif kinds["messages"] != _CONVERSATIONAL:
        raise _format_error(name, "column `messages`", "is a string column, not lists of messages")
    arrow = dataset.with_format("arrow")
    found = [
        hit
        for column in used
        if (hit := _arrow_row_problem(arrow[column], kinds[column], column, column == "messages")) is not None
    ]
    if found:
        row, problem = min(found)
        raise _format_error(name, f"row {row}", problem)


def check_tools_column(dataset: Dataset, name: str = "sft_dataset") -> None:
    """Refuse a `tools` column on standard (string) demonstrations: only a chat template renders tools."""
    columns = list(dataset.column_names or [])
    if "tools" not in columns or len(dataset) == 0:
        return
    prompt = dataset[0]["prompt"] if "prompt" in columns else dataset[0].get("messages")
    if isinstance(prompt, str):
        raise ValueError(
            f"`{name}` has a `tools` column, but its demonstrations are standard (strings): tools are rendered by the "
            "chat template, so they need conversational demonstrations (lists of messages)."
        )


def _as_prompt_completion(example: dict[str, Any]) -> tuple[Any, Any]:
    """(prompt, completion) of one demonstration: its `prompt`/`completion`, or `messages` split before the last."""
    if "prompt" in example and "completion" in example:
        return example["prompt"], example["completion"]
    messages = example["messages"]
    problem = _messages_problem(messages)
    if problem is not None:
        raise ValueError(problem)
    return messages[:-1], messages[-1:]


def tokenize_prompt_completion(
    processing_class: Any,
    prompt: Any,
    completion: Any,
    max_length: int | None,
    chat_template: str | None = None,
    tools: list[dict[str, Any]] | None = None,
    template_kwargs: dict[str, Any] | None = None,
) -> dict[str, list[int]]:
    """One demonstration as `prompt_ids` / `completion_ids`, the way TRL's SFTTrainer tokenises it.

    Conversational prompts go through the chat template (the generation prompt closes the prompt), with `tools`
    rendered as the template renders a tool list and `template_kwargs` passed to it (`GRPOConfig.chat_template_kwargs`,
    as GRPOTrainer renders its prompts); a standard completion gets EOS appended (neither applies). The completion
    starts where the tokenised prompt and prompt + completion diverge. Truncated on the right to `max_length` tokens
    in all; the completion may come out empty.

    A completion with other messages than the assistant's (tool replies of a multi-turn demonstration) also gets an
    `assistant_mask` over `completion_ids` (`text_assistant_mask`): 1 on the assistant's tokens, 0 on the tool
    replies and the turn headers after them, which the SFT term does not train on, as GRPO masks tool replies out of
    multi-turn rollouts.
    """
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    eos = tokenizer.eos_token
    kwargs: dict[str, Any] = dict(template_kwargs or {})
    if chat_template is not None:
        kwargs["chat_template"] = chat_template
    if tools:
        kwargs["tools"] = tools
    if is_conversational({"prompt": prompt}):
        prompt_ids = _tokenize(processing_class, prompt, add_generation_prompt=True, **kwargs)["input_ids"]
        full_ids = _tokenize(processing_class, prompt + completion, **kwargs)["input_ids"]
    else:
        if eos is not None and not completion.endswith(eos):
            completion = completion + eos
        prompt_ids = _tokenize(processing_class, prompt)["input_ids"]
        full_ids = _tokenize(processing_class, prompt + completion)["input_ids"]
    prompt_len = common_prefix_length(prompt_ids, full_ids)
    mask = None
    if is_conversational({"prompt": prompt}) and has_other_turns(completion):
        mask = text_assistant_mask(processing_class, prompt, completion, full_ids, kwargs)
    if max_length is not None:
        full_ids = full_ids[:max_length]
    prompt_len = min(prompt_len, len(full_ids))
    out = {"prompt_ids": full_ids[:prompt_len], "completion_ids": full_ids[prompt_len:]}
    if mask is not None:
        out["assistant_mask"] = mask[prompt_len : len(full_ids)]
    return out


def text_assistant_mask(
    processing_class: Any,
    prompt: list[dict[str, Any]],
    completion: list[dict[str, Any]],
    full_ids: list[int],
    template_kwargs: dict[str, Any],
) -> list[int]:
    """Over the whole rendering `full_ids` of `prompt + completion`: 1 on each assistant message of the completion,
    from the end of the conversation before it rendered with the generation prompt to the end of the conversation up
    to it (its end of turn included, as a rollout's generated tokens), 0 elsewhere (the prompt, tool replies, the turn
    headers after them). Where a template renders a shorter conversation as something other than a prefix of the
    whole (Qwen3 drops the reasoning of earlier turns), the boundary is where the two renderings diverge.
    `template_kwargs`: the template's arguments (`chat_template`, `tools`, ...), as the whole was rendered with."""
    conversation = prompt + completion
    mask = [0] * len(full_ids)

    def end_of(messages: list[dict[str, Any]], generation_prompt: bool) -> int:
        ids = _tokenize(
            processing_class, messages, add_generation_prompt=generation_prompt, **template_kwargs
        )
        return common_prefix_length(ids["input_ids"], full_ids)

    for i in range(len(prompt), len(conversation)):
        if conversation[i].get("role") == "assistant":
            start, end = end_of(conversation[:i], True), end_of(conversation[: i + 1], False)
            mask[start:end] = [1] * (end - start)
    return mask


def tokenize_sft_dataset(
    dataset: Dataset,
    processing_class: Any,
    max_length: int | None,
    chat_template: str | None = None,
    name: str = "sft_dataset",
    tools: DemonstrationTools | None = None,
    template_kwargs: dict[str, Any] | None = None,
) -> tuple[Dataset, int]:
    """Tokenise demonstrations into `prompt_ids` / `completion_ids`, dropping those with no completion left.

    `dataset` is checked first (`check_sft_columns`); `name` is how errors call it. Conversational demonstrations
    are rendered with their tools (`DemonstrationTools.for_row`: the row's `tools` column, else `tools`' defaults)
    and `template_kwargs` (the chat template's extra arguments, `GRPOConfig.chat_template_kwargs`);
    a `tools` column on standard (string) demonstrations is refused, since no template renders it. Returns the tokenised dataset
    and the number of examples dropped because truncation to `max_length` removed their whole completion, or
    because their prompt has no token (reported with a warning; they are never trained on as empty). Raises a
    ValueError naming `max_sft_length` when that drops every example.
    """
    check_sft_columns(dataset, name)
    check_tools_column(dataset, name)
    tools = tools if tools is not None else DemonstrationTools()
    json_columns = [c for c in dataset.column_names if _feature_kind(dataset.features[c]) == _PER_ROW]
    dataset = _undecoded_json(dataset, json_columns)

    def tokenize(example: dict[str, Any], index: int) -> dict[str, Any]:
        try:
            row = _decode_row(example, json_columns)
            prompt, completion = _as_prompt_completion(row)
            row_tools = tools.for_row(row) if is_conversational({"prompt": prompt}) else None
            whole = tokenize_prompt_completion(
                processing_class, prompt, completion, None, chat_template, row_tools, template_kwargs
            )
        except Exception as error:  # a row check_sft_columns let through: say which one
            raise ValueError(
                f"`{name}` row {index}: cannot tokenise the demonstration ({type(error).__name__}: {error}). "
                f"Accepted formats: {ACCEPTED_SFT_FORMATS}."
            ) from error
        prompt_len = len(whole["prompt_ids"])
        full_ids = whole["prompt_ids"] + whole["completion_ids"]
        mask = whole.get("assistant_mask", [1] * len(whole["completion_ids"]))
        if max_length is not None:
            full_ids = full_ids[:max_length]
        cut = min(prompt_len, len(full_ids))
        completion_ids = full_ids[cut:]
        return {
            "prompt_ids": full_ids[:cut],
            "completion_ids": completion_ids,
            "assistant_mask": mask[: len(completion_ids)],
            "_prompt_tokens": prompt_len,
        }

    tokenized = dataset.map(
        tokenize, with_indices=True, remove_columns=dataset.column_names, desc="Tokenizing SFT dataset"
    )
    prompt_tokens = tokenized["_prompt_tokens"]
    masks = tokenized["assistant_mask"]
    tokenized = tokenized.remove_columns("_prompt_tokens")
    if all(
        all(m) for m in masks
    ):  # no tool replies anywhere: every completion token is trained on, as before
        tokenized = tokenized.remove_columns("assistant_mask")
    keep = [
        i
        for i, (p, m) in enumerate(zip(tokenized["prompt_ids"], masks, strict=True))
        if len(p) > 0 and any(m)
    ]
    dropped = len(tokenized) - len(keep)
    if dropped:
        kept = set(keep)
        logger.warning(
            "AMFT: %d of %d SFT examples have no completion token (no assistant token, for multi-turn ones) left "
            "after truncation to max_sft_length=%s (or no prompt token at all); they are dropped (first indices: %s). Raise `max_sft_length` to keep them.",
            dropped,
            len(tokenized),
            max_length,
            [i for i in range(len(tokenized)) if i not in kept][:10],
        )
        if not keep:
            empty_prompts = sum(1 for n in prompt_tokens if n == 0)
            lengths = [n for n in prompt_tokens if n > 0]
            detail = (
                f"their prompts alone take {min(lengths)} to {max(lengths)} tokens"
                if lengths
                else "no prompt has any token"
            )
            raise ValueError(
                f"`{name}`: all {len(tokenized)} demonstrations lose their whole completion when truncated to "
                f"max_sft_length={max_length} tokens (prompt + completion), so none is left to train on; {detail}"
                + (f", and {empty_prompts} have an empty prompt" if empty_prompts and lengths else "")
                + ". Raise `max_sft_length` above the prompt lengths."
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
    completion_mask: (B, C) the completion's tokens (attended to)
    model_inputs:    the model's other inputs for image demonstrations (`pixel_values`, `image_grid_thw`, ...,
                     `num_images` per row; per-token ones laid out as (B, P + C)); empty for text
    tool_mask:       (B, C) or None: 1 on the completion tokens the loss is taken on (the assistant's), 0 on tool
                     replies and image tokens, as GRPO's `tool_mask` on multi-turn rollouts; None: all of them
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    model_inputs: dict[str, Any] = field(default_factory=dict)
    tool_mask: torch.Tensor | None = None

    @property
    def loss_mask(self) -> torch.Tensor:
        """The completion tokens the NLL is taken on: `completion_mask`, times `tool_mask` when there is one."""
        return self.completion_mask if self.tool_mask is None else self.completion_mask * self.tool_mask

    @property
    def num_tokens(self) -> int:
        return int(self.loss_mask.sum())

    def to(self, device: torch.device | str) -> SFTBatch:
        return SFTBatch(
            *(
                t.to(device)
                for t in (self.prompt_ids, self.prompt_mask, self.completion_ids, self.completion_mask)
            ),
            {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.model_inputs.items()},
            None if self.tool_mask is None else self.tool_mask.to(device),
        )


def trained_tokens(example: dict[str, Any]) -> int:
    """How many of a tokenised demonstration's completion tokens the NLL is taken on: the ones of its
    `assistant_mask` (a multi-turn demonstration's tool replies and image tokens are not trained), else all of its
    `completion_ids`. What `collate_sft` / `collate_vision_sft` make of it: `SFTBatch.num_tokens`."""
    mask = example.get("assistant_mask")
    return len(example["completion_ids"]) if mask is None else int(sum(mask))


def collate_sft(examples: list[dict[str, list[int]]], pad_token_id: int) -> SFTBatch:
    """Pad tokenised demonstrations: prompts on the left, completions on the right (as GRPO lays out rollouts).
    Examples with an `assistant_mask` (multi-turn demonstrations, `tokenize_prompt_completion`) give the batch its
    `tool_mask`."""
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
    tool_mask = None
    if any("assistant_mask" in e for e in examples):
        tool_mask = torch.zeros((b, c_len), dtype=torch.long)
        for i, e in enumerate(examples):
            mask = e.get("assistant_mask", [1] * len(e["completion_ids"]))
            tool_mask[i, : len(mask)] = torch.tensor(mask, dtype=torch.long)
    return SFTBatch(prompt_ids, prompt_mask, completion_ids, completion_mask, tool_mask=tool_mask)


# ------------------------------------------------------------------------------------------------------------------
# Demonstrations with images (vision-language models)
# ------------------------------------------------------------------------------------------------------------------
#: The columns that make a dataset multimodal, as TRL's GRPOTrainer and SFTTrainer read them.
IMAGE_COLUMNS = ("images", "image")


def image_column(dataset: Any) -> str | None:
    """The dataset's image column (`images`, else `image`, as TRL reads them), or None for a text-only dataset."""
    columns = list(getattr(dataset, "column_names", None) or [])
    return next((c for c in IMAGE_COLUMNS if c in columns), None)


def row_images(example: dict[str, Any], column: str) -> list[Any]:
    """The images of one row as a list (`image`: one image or none; `images`: a list, None read as empty)."""
    value = example.get(column)
    if column == "image":
        return [] if value is None else [value]
    return list(value or [])


def _vision_example(
    example: dict[str, Any],
    column: str,
    processor: Any = None,
    tools: list[dict[str, Any]] | None = None,
    template_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One image demonstration as TRL's VLM collator takes it: `prompt`, `completion`, `images` (fresh objects).

    With `processor`, a conversational demonstration is rendered here with `tools` and `template_kwargs`, the way the
    collator renders it without (`prepare_multimodal_messages`, then `trl.data_utils.apply_chat_template`), and
    handed to the collator as text: TRL 1.16's VLM collator renders prompt-completion rows with neither."""
    prompt, completion = _as_prompt_completion(example)
    images = row_images(example, column)
    if processor is not None and is_conversational({"prompt": prompt}):
        from trl.data_utils import apply_chat_template, prepare_multimodal_messages

        rendered = apply_chat_template(
            {
                "prompt": prepare_multimodal_messages(prompt, images=images),
                "completion": prepare_multimodal_messages(completion),
            },
            processor,
            tools=tools,
            **(template_kwargs or {}),
        )
        prompt, completion = rendered["prompt"], rendered["completion"]
    return {"prompt": prompt, "completion": completion, "images": images}


def _vision_examples(
    examples: list[dict[str, Any]],
    column: str,
    processor: Any,
    tools: DemonstrationTools | None,
    template_kwargs: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """A batch of image demonstrations for TRL's VLM collator. When a row has tools (`tools.for_row`) or the chat
    template takes extra arguments (`template_kwargs`), every row of the batch is rendered here (the collator takes a
    batch of one format, and renders with neither); otherwise they go to it as they are."""
    row_tools = [
        tools.for_row(e) if tools is not None and is_conversational(_vision_example(e, column)) else None
        for e in examples
    ]
    if not any(row_tools) and not template_kwargs:
        return [_vision_example(e, column) for e in examples]
    return [
        _vision_example(e, column, processor, t, template_kwargs)
        for e, t in zip(examples, row_tools, strict=True)
    ]


def vision_collator(processor: Any, max_length: int | None) -> Any:
    """TRL's `DataCollatorForVisionLanguageModeling` with completion-only loss, as SFTTrainer builds it for
    prompt-completion image data."""
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    return DataCollatorForVisionLanguageModeling(
        processor=processor, max_length=max_length, completion_only_loss=True
    )


def _completion_image_parts(example: dict[str, Any]) -> int:
    """How many `{"type": "image"}` parts the completion's messages hold."""
    _, completion = _as_prompt_completion(example)
    if not isinstance(completion, list):
        return 0
    return sum(
        isinstance(part, dict) and part.get("type") == "image"
        for message in completion
        if isinstance(message, dict) and isinstance(message.get("content"), list)
        for part in message["content"]
    )


def whole_conversation_rows(dataset: Dataset) -> list[int]:
    """The image demonstrations that are processed as whole conversations (`conversation_demonstration`): those whose
    completion holds images (V-IRL's street views in tool replies) or other messages than the assistant's (the tool
    replies of General Points' revision loop), whose tokens TRL 1.16's VLM collator cannot mask out. Reads only the
    conversation columns (the images are not decoded)."""
    columns = [c for c in ("prompt", "completion", "messages") if c in (dataset.column_names or [])]
    text = dataset.select_columns(columns)

    def multi_turn(example: dict[str, Any]) -> bool:
        return has_other_turns(_as_prompt_completion(example)[1])

    return [i for i in range(len(text)) if _completion_image_parts(text[i]) or multi_turn(text[i])]


def has_other_turns(completion: Any) -> bool:
    """Whether a conversational completion holds other messages than the assistant's (a multi-turn demonstration's
    tool replies), whose tokens are not trained on."""
    return isinstance(completion, list) and any(
        isinstance(m, dict) and m.get("role") != "assistant" for m in completion
    )


def _image_parts(messages: list[dict[str, Any]]) -> int:
    return sum(
        isinstance(part, dict) and part.get("type") == "image"
        for message in messages
        if isinstance(message.get("content"), list)
        for part in message["content"]
    )


def _process(processor: Any, text: str, images: list[Any]) -> dict[str, Any]:
    """One rendered conversation through the processor, text and images in one call (as TRL's collator calls it:
    no special tokens added, the template wrote them), so every image's placeholder is expanded."""
    return processor(text=[text], images=images or None, return_tensors="pt", add_special_tokens=False)


def conversation_demonstration(
    processor: Any,
    example: dict[str, Any],
    column: str,
    tools: list[dict[str, Any]] | None = None,
    template_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One image demonstration processed as a whole conversation: its images may sit anywhere in it, in the tool
    replies of its completion too (V-IRL's street views), which TRL 1.16's VLM collator cannot process (it gives
    every image to the prompt and processes the completion as text).

    The prompt + completion messages are rendered by the processor's chat template with `tools` and
    `template_kwargs` (`GRPOConfig.chat_template_kwargs`), and the text and
    all the row's images (in order of their image parts) go through one processor call. The prompt (rendered with
    the generation prompt, with its own images, processed the same way) must be a prefix of it; the completion is
    the rest. The loss is on the assistant's tokens only: for each assistant message, from the end of the
    conversation before it rendered with the generation prompt to the end of it rendered (its EOS and the template's
    end of turn included, as for any demonstration). Tool replies, the headers of the turns after them and image
    tokens are not trained on: GRPO masks tool replies out of multi-turn rollouts the same way (`tool_mask`).

    Returns `input_ids` (list), `prompt_length`, `assistant_mask` (list over `input_ids`), `num_images` and
    `model_inputs` (the processor's other outputs: `pixel_values`, `image_grid_thw`, per-token inputs, ...).
    Raises a ValueError saying what is wrong (image count, a template whose renderings are not prefixes).
    """
    prompt, completion = _as_prompt_completion(example)
    images = row_images(example, column)
    if not (isinstance(prompt, list) and isinstance(completion, list)):
        raise ValueError(
            "a demonstration with images in its completion must be conversational (lists of messages)"
        )
    if _image_parts(prompt) + _image_parts(completion) == 0 and images:
        from trl.data_utils import (
            prepare_multimodal_messages,
        )  # TRL's convention: images before the first user turn

        prompt = prepare_multimodal_messages(prompt, images=[None] * len(images))
    n_all = _image_parts(prompt) + _image_parts(completion)
    if n_all != len(images):
        raise ValueError(
            f"its messages hold {n_all} image part(s) but its `{column}` column holds {len(images)} image(s); "
            "they are matched in order, one image per image part"
        )
    conversation = prompt + completion
    kwargs: dict[str, Any] = dict(template_kwargs or {})
    if tools:
        kwargs["tools"] = tools
    full_text = processor.apply_chat_template(conversation, tokenize=False, **kwargs)
    full = _process(processor, full_text, images)
    input_ids = full.pop("input_ids")[0].tolist()
    full.pop("attention_mask", None)
    cache: dict[str, int] = {}

    def end_of(messages: list[dict[str, Any]], generation_prompt: bool, what: str) -> int:
        """Where the rendering of `messages` ends in `input_ids` (it must be a prefix of the whole rendering)."""
        text = processor.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt, **kwargs
        )
        if text not in cache:
            ids = _process(processor, text, images[: _image_parts(messages)])["input_ids"][0].tolist()
            if not full_text.startswith(text) or ids != input_ids[: len(ids)]:
                raise ValueError(
                    f"the chat template renders {what} as something that is not a prefix of the whole conversation's "
                    "rendering, so the completion and its assistant tokens cannot be told apart; this template cannot "
                    "train demonstrations with images in their completion"
                )
            cache[text] = len(ids)
        return cache[text]

    prompt_length = end_of(prompt, True, "the prompt (with the generation prompt)")
    mask = [0] * len(input_ids)
    for i in range(len(prompt), len(conversation)):
        if conversation[i]["role"] != "assistant":
            continue
        start = prompt_length if i == len(prompt) else end_of(conversation[:i], True, f"message {i}'s turn")
        end = end_of(conversation[: i + 1], False, f"the conversation up to message {i}")
        mask[start:end] = [1] * (end - start)
    image_token = getattr(processor, "image_token_id", None)
    if image_token is None and getattr(processor, "image_token", None) is not None:
        image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    if image_token is not None:
        mask = [0 if t == image_token else m for t, m in zip(input_ids, mask, strict=True)]
    return {
        "input_ids": input_ids,
        "prompt_length": prompt_length,
        "assistant_mask": mask,
        "image_positions": [
            i for i, t in enumerate(input_ids) if image_token is not None and t == image_token
        ],
        "num_images": len(images),
        "model_inputs": dict(full),
    }


def _fits(demo: dict[str, Any], max_length: int | None) -> bool:
    """Whether a processed conversation can be cut to `max_length` with a prompt token and an assistant token, and
    without cutting through an image (its placeholder and its pixels go together): a conversation longer than
    `max_length` is cut only after its last image token."""
    prompt, ids = demo["prompt_length"], demo["input_ids"]
    length = len(ids) if max_length is None else min(len(ids), max_length)
    if length < len(ids) and demo["image_positions"] and demo["image_positions"][-1] >= length:
        return False
    return prompt > 0 and any(demo["assistant_mask"][prompt:length])


def collate_vision_conversations(
    examples: list[dict[str, Any]],
    processor: Any,
    max_length: int | None,
    column: str,
    tools: DemonstrationTools | None = None,
    template_kwargs: dict[str, Any] | None = None,
) -> SFTBatch:
    """Image demonstrations processed as whole conversations (`conversation_demonstration`), laid out like GRPO's
    rollouts: prompts left-padded, completions right-padded, `tool_mask` 1 on the assistant's tokens only. Each row
    is cut to `max_length` after its last image (`prepare_vision_sft_dataset` drops the rows that cannot be). The
    processor's other outputs ride in `model_inputs` as in `collate_vision_sft` (image inputs concatenated in row
    order, with `num_images` per row; per-token ones laid out as prompt + completion)."""
    demos = []
    for example in examples:
        prompt, _ = _as_prompt_completion(example)
        row_tools = (
            tools.for_row(example) if tools is not None and is_conversational({"prompt": prompt}) else None
        )
        demo = conversation_demonstration(processor, example, column, row_tools, template_kwargs)
        if not _fits(demo, max_length):
            raise ValueError(
                f"a demonstration does not fit max_sft_length={max_length} without cutting an image or its whole "
                "completion: pass it through `prepare_vision_sft_dataset` first"
            )
        length = len(demo["input_ids"]) if max_length is None else min(len(demo["input_ids"]), max_length)
        demos.append((demo, length))
    pad = processor.tokenizer.pad_token_id
    b = len(demos)
    p_len = max(d["prompt_length"] for d, _ in demos)
    c_len = max(n - d["prompt_length"] for d, n in demos)
    prompt_ids = torch.full((b, p_len), pad, dtype=torch.long)
    prompt_mask = torch.zeros((b, p_len), dtype=torch.long)
    completion_ids = torch.full((b, c_len), pad, dtype=torch.long)
    completion_mask = torch.zeros((b, c_len), dtype=torch.long)
    tool_mask = torch.zeros((b, c_len), dtype=torch.long)
    per_token_keys = [k for k in _PER_TOKEN_INPUTS if any(k in d["model_inputs"] for d, _ in demos)]
    laid_out = {k: torch.zeros((b, p_len + c_len), dtype=torch.long) for k in per_token_keys}
    stacked: dict[str, list[torch.Tensor]] = {}
    for i, (demo, length) in enumerate(demos):
        ids, p = torch.tensor(demo["input_ids"][:length]), demo["prompt_length"]
        c = length - p
        prompt_ids[i, p_len - p :] = ids[:p]
        prompt_mask[i, p_len - p :] = 1
        completion_ids[i, :c] = ids[p:]
        completion_mask[i, :c] = 1
        tool_mask[i, :c] = torch.tensor(demo["assistant_mask"][p:length])
        for key, value in demo["model_inputs"].items():
            if key in per_token_keys:
                laid_out[key][i, p_len - p : p_len] = value[0][:p]
                laid_out[key][i, p_len : p_len + c] = value[0][p:length]
            elif isinstance(value, torch.Tensor):
                stacked.setdefault(key, []).append(value)
    model_inputs = {k: torch.cat(v) for k, v in stacked.items()}
    model_inputs.update(laid_out)
    model_inputs["num_images"] = [d["num_images"] for d, _ in demos]
    return SFTBatch(prompt_ids, prompt_mask, completion_ids, completion_mask, model_inputs, tool_mask)


def prepare_vision_sft_dataset(
    dataset: Dataset,
    processor: Any,
    max_length: int | None,
    name: str = "sft_dataset",
    tools: DemonstrationTools | None = None,
    template_kwargs: dict[str, Any] | None = None,
) -> tuple[Dataset, int]:
    """Check and measure image demonstrations; keep those whose prompt (with its image tokens) fits `max_length`.

    Demonstrations stay raw (images are turned into pixels batch by batch, by `collate_vision_sft`, as TRL's
    SFTTrainer does for vision data). Each row is processed once here by TRL's VLM collator, which loads its images
    and counts its prompt tokens (image tokens included) and completion tokens: a row whose images cannot be loaded
    or processed is named in the error. A demonstration is dropped (and counted, like text ones) when its prompt
    leaves no room for a completion token within `max_length`: truncation then cuts only completion tokens, never
    image tokens. Raises a ValueError naming `max_sft_length` when that drops every demonstration.

    When some row's completion holds images or tool replies (`whole_conversation_rows`: V-IRL's street views, General
    Points' verifier replies), every row is processed as a whole conversation instead (`conversation_demonstration`; batches by
    `collate_vision_conversations`); a row is then kept when it has a prompt token and an assistant token within
    `max_length`, and is longer than `max_length` only past its last image token (an image is never cut).
    """
    check_sft_columns(dataset, name)
    column = image_column(dataset)
    if column is None:
        raise ValueError(f"`{name}` has no `images` or `image` column: use `tokenize_sft_dataset` for text.")
    if getattr(processor, "image_processor", None) is None:
        raise ValueError(
            f"`{name}` has an `{column}` column, but the processing class ({type(processor).__name__}) has no image "
            "processor: pass the model's processor (`AutoProcessor.from_pretrained(...)`) as `processing_class`."
        )
    collate = vision_collator(processor, None)
    conversations = bool(whole_conversation_rows(dataset))
    prompt_tokens, keep = [], []
    for index in range(len(dataset)):
        try:
            example = dataset[index]
        except Exception as error:  # datasets decodes the images of a row when it is read
            raise ValueError(
                f"`{name}` row {index}: cannot load the row's images from column `{column}` "
                f"({type(error).__name__}: {error})."
            ) from error
        if conversations:  # images or tool replies in completions: each row processed as a whole conversation
            try:
                prompt, _ = _as_prompt_completion(example)
                row_tools = tools.for_row(example) if tools is not None and isinstance(prompt, list) else None
                demo = conversation_demonstration(processor, example, column, row_tools, template_kwargs)
            except Exception as error:
                raise ValueError(
                    f"`{name}` row {index}: cannot process this image demonstration as a whole conversation "
                    f"(images or tool replies in some completion's messages; column `{column}` holds "
                    f"{len(row_images(example, column))} image(s)): {type(error).__name__}: {error}."
                ) from error
            prompt_tokens.append(demo["prompt_length"])
            if _fits(demo, max_length):
                keep.append(index)
            continue
        try:
            rendered = _vision_examples([example], column, processor, tools, template_kwargs)
            labels = collate(rendered)["labels"][0]
        except Exception as error:
            raise ValueError(
                f"`{name}` row {index}: the processor cannot process this image demonstration (column `{column}` "
                f"holds {len(row_images(example, column))} image(s)) ({type(error).__name__}: {error}). "
                f"Accepted formats: {ACCEPTED_SFT_FORMATS}, plus an `images` (list) or `image` column."
            ) from error
        completion = int((labels != -100).sum())
        prompt = len(labels) - completion
        prompt_tokens.append(prompt)
        if prompt > 0 and completion > 0 and (max_length is None or prompt < max_length):
            keep.append(index)
    dropped = len(dataset) - len(keep)
    if dropped:
        logger.warning(
            "AMFT: %d of %d image demonstrations have no room for a completion token within max_sft_length=%s once "
            "their prompt and its image tokens are counted (or have no prompt or no completion token, or, with "
            "images in the completion, would be cut through an image); they are dropped (first indices: %s). Raise "
            "`max_sft_length` to keep them.",
            dropped,
            len(dataset),
            max_length,
            sorted(set(range(len(dataset))) - set(keep))[:10],
        )
        if not keep:
            raise ValueError(
                f"`{name}`: none of the {len(dataset)} image demonstrations fits max_sft_length={max_length} tokens "
                f"with at least one completion token: their prompts, image tokens included, take "
                f"{min(prompt_tokens)} to {max(prompt_tokens)} tokens. Raise `max_sft_length` above the prompt "
                "lengths (truncation never cuts image tokens"
                + (
                    "; with images in the completions, above each conversation's last image token)."
                    if conversations
                    else ")."
                )
            )
        dataset = dataset.select(keep)
    return dataset, dropped


#: Per-token model inputs a VLM processor may return beside `input_ids` (laid out like them).
_PER_TOKEN_INPUTS = ("token_type_ids", "mm_token_type_ids")


def collate_vision_sft(
    examples: list[dict[str, Any]],
    processor: Any,
    max_length: int | None,
    column: str,
    tools: DemonstrationTools | None = None,
    template_kwargs: dict[str, Any] | None = None,
) -> SFTBatch:
    """Image demonstrations through TRL's VLM collator (chat template, image processor, completion-only labels),
    laid out like GRPO's rollouts: prompts (with their image tokens) left-padded, completions right-padded.

    The model's extra inputs (`pixel_values`, `image_grid_thw`, `image_sizes`, ...) ride in `model_inputs`, with
    `num_images` per row (how TRL's log-prob helper splits them); per-token ones are laid out like `prompt_ids` +
    `completion_ids`. Rows must fit `max_length` with a completion token (`prepare_vision_sft_dataset`). `tools`:
    which tools each conversation is rendered with (`DemonstrationTools.for_row`; None: none, as TRL's collator);
    `template_kwargs`: the chat template's extra arguments (`GRPOConfig.chat_template_kwargs`).
    """
    examples_in = _vision_examples(examples, column, processor, tools, template_kwargs)
    out = vision_collator(processor, max_length)(examples_in)
    input_ids, attention_mask, labels = out.pop("input_ids"), out.pop("attention_mask"), out.pop("labels")
    completion = labels != -100
    prompt = attention_mask.bool() & ~completion
    pad = processor.tokenizer.pad_token_id
    b = input_ids.size(0)
    p_lens, c_lens = prompt.sum(1).tolist(), completion.sum(1).tolist()
    p_len, c_len = max(p_lens), max(c_lens)
    prompt_ids = torch.full((b, p_len), pad, dtype=torch.long)
    prompt_mask = torch.zeros((b, p_len), dtype=torch.long)
    completion_ids = torch.full((b, c_len), pad, dtype=torch.long)
    completion_mask = torch.zeros((b, c_len), dtype=torch.long)
    per_token = {k: out.pop(k) for k in _PER_TOKEN_INPUTS if k in out}
    laid_out = {k: torch.zeros((b, p_len + c_len), dtype=v.dtype) for k, v in per_token.items()}
    for i in range(b):
        p, c = p_lens[i], c_lens[i]
        prompt_ids[i, p_len - p :] = input_ids[i][prompt[i]]
        prompt_mask[i, p_len - p :] = 1
        completion_ids[i, :c] = input_ids[i][completion[i]]
        completion_mask[i, :c] = 1
        for key, value in per_token.items():
            laid_out[key][i, p_len - p : p_len] = value[i][prompt[i]]
            laid_out[key][i, p_len : p_len + c] = value[i][completion[i]]
    model_inputs = {**dict(out), **laid_out, "num_images": [len(row_images(e, column)) for e in examples]}
    return SFTBatch(prompt_ids, prompt_mask, completion_ids, completion_mask, model_inputs)


# ------------------------------------------------------------------------------------------------------------------
# Demonstrations attached to RL prompts (HPT, ReLIFT, LUFFY read them from a column of train_dataset)
# ------------------------------------------------------------------------------------------------------------------
def as_completion(prompt: Any, demonstration: Any) -> Any:
    """A demonstration from an RL dataset's column as the completion of `prompt`: a string demonstration of a
    conversational prompt becomes one assistant message; anything else is returned as is."""
    if isinstance(demonstration, str) and is_conversational({"prompt": prompt}):
        return [{"role": "assistant", "content": demonstration}]
    return demonstration


def vision_demonstration(
    processor: Any,
    prompt: Any,
    completion: Any,
    images: list[Any],
    max_length: int | None,
    tools: list[dict[str, Any]] | None = None,
    template_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """One demonstration of an RL prompt with images, as `collate_vision_sft` takes it: `prompt`, `completion`,
    `images`, plus its `prompt_ids` / `completion_ids` (image tokens included, truncated to `max_length` as the
    collator truncates it) and the `assistant_mask` over them (1 on the tokens trained on, `trained_tokens`). None
    when the prompt with its image tokens leaves no room within `max_length` for a completion token trained on (an
    assistant's): such a demonstration is dropped, never cut through its image tokens (as `prepare_vision_sft_dataset`
    drops them from `sft_dataset`). `tools`: rendered into the conversation (kept in the example as its `tools`, so
    that `collate_vision_sft` renders it the same way); `template_kwargs`: the chat template's extra arguments (pass
    the same to `collate_vision_sft`)."""
    example = {"prompt": prompt, "completion": completion, "images": list(images)}
    if tools:
        example["tools"] = tools
    batch = collate_vision_sft([example], processor, None, "images", DemonstrationTools(), template_kwargs)
    prompt_ids = batch.prompt_ids[0][batch.prompt_mask[0].bool()].tolist()
    completion = batch.completion_mask[0].bool()
    completion_ids = batch.completion_ids[0][completion].tolist()
    assistant_mask = batch.loss_mask[0][completion].tolist()
    if max_length is not None:
        completion_ids = completion_ids[: max(max_length - len(prompt_ids), 0)]
        assistant_mask = assistant_mask[: len(completion_ids)]
    if not prompt_ids or not any(assistant_mask):
        return None
    return {
        **example,
        "prompt_ids": prompt_ids,
        "completion_ids": completion_ids,
        "assistant_mask": assistant_mask,
    }


def split_image_parts(prompt: Any) -> tuple[Any, list[Any]]:
    """A conversational prompt that carries its images in its messages (`{"type": "image", "image": ...}` parts, one of
    TRL's GRPO formats) as (the prompt with bare `{"type": "image"}` placeholders, its images in order): how TRL's VLM
    collator takes them. Any other prompt as (prompt, []). The prompt itself is not modified."""
    if not is_conversational({"prompt": prompt}):
        return prompt, []
    images: list[Any] = []
    messages = []
    for message in prompt:
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if isinstance(part, dict) and part.get("type") == "image" and part.get("image") is not None:
                    images.append(part["image"])
                    part = {k: v for k, v in part.items() if k != "image"}
                parts.append(part)
            message = {**message, "content": parts}
        messages.append(message)
    return messages, images
