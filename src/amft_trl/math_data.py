r"""Math data adapters: turn a math dataset into the three datasets AMFT needs.

- RL prompts: `prompt` plus `solution`, the gold final answer that
  `amft_trl.rewards.math_accuracy_reward` takes (TRL passes dataset columns to reward functions);
- SFT demonstrations: `prompt` plus `completion` (TRL's prompt-completion format), the worked solution;
- validation prompts: like the RL prompts, on a held-out, seeded split of the problems.

Two source schemas are understood:

- `"openr1"`: OpenR1-Math-46k-8192 (`Elliott/Openr1-Math-46k-8192`, the set LUFFY and the AMFT paper
  train on), in verl's RL format. Columns: `data_source` (str), `prompt` (list of `{"role", "content"}`
  messages: a system prompt, then the user's problem), `target` (list with one assistant message: the
  DeepSeek-R1 solution, `<think>...</think>` then the answer), `ability` (str), `reward_model`
  (`{"ground_truth": str, "style": "rule"}`) and `extra_info` (`{"index", "split"}`). The problem is the
  last user message of `prompt` (its system prompt is dropped, as LUFFY's own data preparation does), the
  gold answer is `reward_model["ground_truth"]`, the demonstration is the content of `target`.
- `"problem_solution"`: plain `problem` / `solution` / optional `answer` columns (MATH-style). The gold
  answer is `answer`, or the last `\boxed{}` of `solution` when there is no `answer` column; the
  demonstration is `solution`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
from datasets import Dataset

from amft_trl._completions import last_boxed_content

__all__ = [
    "DEFAULT_INSTRUCTION",
    "OPENR1_MATH_46K",
    "SCHEMAS",
    "MathDatasets",
    "build_math_datasets",
    "check_math_columns",
    "detect_math_schema",
    "load_math_dataset",
    "math_rl_prompts",
    "math_sft_pairs",
    "split_validation",
]

DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
OPENR1_MATH_46K = "Elliott/Openr1-Math-46k-8192"
SCHEMAS: tuple[str, ...] = ("openr1", "problem_solution")

_LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# Columns each schema needs, per role.
_REQUIRED = {
    ("openr1", "rl"): ("prompt", "reward_model"),
    ("openr1", "sft"): ("prompt", "target"),
    ("problem_solution", "rl"): ("problem",),
    ("problem_solution", "sft"): ("problem", "solution"),
}


def load_math_dataset(
    name_or_path: str = OPENR1_MATH_46K, split: str = "train", **load_kwargs: Any
) -> Dataset:
    """Load a math dataset from the Hugging Face Hub or from a local `.jsonl`/`.json`/`.parquet`/`.csv` file.

    Args:
        name_or_path: a hub id (default: OpenR1-Math-46k-8192) or a path to a local file.
        split: the split to load.
        **load_kwargs: passed to `datasets.load_dataset`.
    """
    ext = os.path.splitext(name_or_path)[1].lower()
    if ext in _LOCAL_FORMATS and os.path.isfile(name_or_path):
        return datasets.load_dataset(
            _LOCAL_FORMATS[ext], data_files=name_or_path, split="train", **load_kwargs
        )
    return datasets.load_dataset(name_or_path, split=split, **load_kwargs)


def _require(dataset: Dataset, columns: Sequence[str], purpose: str) -> None:
    for column in columns:
        if column not in dataset.column_names:
            raise ValueError(
                f"The dataset is missing the column {column!r} needed for {purpose}; "
                f"it has the columns {dataset.column_names}."
            )


def detect_math_schema(dataset: Dataset) -> str:
    """Return `"openr1"` or `"problem_solution"` from the dataset's columns.

    Raises:
        ValueError: when neither schema's key column (`prompt` with `reward_model`/`target`, or `problem`)
            is there; the message lists the columns the dataset has.
    """
    columns = dataset.column_names
    if "prompt" in columns and ("reward_model" in columns or "target" in columns):
        return "openr1"
    if "problem" in columns:
        return "problem_solution"
    raise ValueError(
        "Cannot tell the dataset's schema: it is missing the column 'problem' (plain problem/solution "
        "datasets) and the columns 'prompt' + 'reward_model'/'target' (OpenR1-Math-46k-8192); "
        f"it has the columns {columns}."
    )


def check_math_columns(
    dataset: Dataset, schema: str | None = None, roles: Sequence[str] = ("rl", "sft")
) -> str:
    """Check that `dataset` has the columns its schema needs for `roles` (`"rl"`: prompts and gold answers, `"sft"`:
    worked solutions), and return the schema (`"openr1"` or `"problem_solution"`; detected when `schema` is None).

    Call it on a source file before anything that depends on its size (`split_validation`, `select`): a file with the
    wrong columns then says so, instead of failing on a split that its rows cannot fill.

    Raises:
        ValueError: naming the missing column and listing the columns the dataset has.
    """
    for role in roles:
        if role not in ("rl", "sft"):
            raise ValueError(f"roles must be among ('rl', 'sft'), got {role!r}.")
        schema = _resolve_schema(dataset, schema, role)
    return detect_math_schema(dataset) if schema is None else schema


def _resolve_schema(dataset: Dataset, schema: str | None, role: str) -> str:
    schema = detect_math_schema(dataset) if schema is None else schema
    if schema not in SCHEMAS:
        raise ValueError(f"schema must be one of {SCHEMAS} or None, got {schema!r}.")
    _require(
        dataset, _REQUIRED[(schema, role)], f"{'RL prompts' if role == 'rl' else 'SFT pairs'} ({schema})"
    )
    return schema


def _message_text(messages: Any, role: str, where: str) -> str:
    if isinstance(messages, str):
        return messages
    if isinstance(messages, Sequence):
        for message in reversed(messages):
            if isinstance(message, Mapping) and message.get("role") == role:
                content = message.get("content")
                return content if isinstance(content, str) else ""
    raise ValueError(
        f"{where}: expected a string or a list of messages with a {role!r} message, got {messages!r}."
    )


def _problem(row: Mapping[str, Any], schema: str, index: int) -> str:
    if schema == "openr1":
        return _message_text(row["prompt"], "user", f"row {index}, column 'prompt'")
    return "" if row["problem"] is None else str(row["problem"])


def _gold(row: Mapping[str, Any], schema: str) -> str:
    if schema == "openr1":
        reward_model = row["reward_model"]
        gold = reward_model.get("ground_truth") if isinstance(reward_model, Mapping) else reward_model
        if isinstance(gold, (list, tuple)):
            gold = gold[0] if gold else None
    elif row.get("answer") is not None:
        gold = row["answer"]
    else:
        gold = last_boxed_content(str(row.get("solution") or ""))
    return "" if gold is None else str(gold).strip()


def _demonstration(row: Mapping[str, Any], schema: str, index: int) -> str:
    if schema == "openr1":
        target = row["target"]
        return "" if target is None else _message_text(target, "assistant", f"row {index}, column 'target'")
    return "" if row["solution"] is None else str(row["solution"])


def _prompt(problem: str, instruction: str | None, system_prompt: str | None, conversational: bool) -> Any:
    text = problem.strip()
    if instruction and instruction not in text:
        text = f"{text}\n\n{instruction}" if text else instruction
    if conversational:
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        return [*messages, {"role": "user", "content": text}]
    return f"{system_prompt}\n\n{text}" if system_prompt else text


def math_rl_prompts(
    dataset: Dataset,
    *,
    instruction: str | None = DEFAULT_INSTRUCTION,
    conversational: bool = False,
    system_prompt: str | None = None,
    schema: str | None = None,
) -> Dataset:
    """RL (or validation) prompts: columns `prompt`, `solution` (the gold final answer) and, when the source has
    worked solutions, `demonstration` (the completion HPT imitates: a string, or an assistant message when
    `conversational`; `AMFTConfig.hpt_demonstration_column`'s default).

    Rows without a gold answer are dropped.

    Args:
        dataset: a dataset in the `"openr1"` or `"problem_solution"` schema (see the module docstring).
        instruction: appended to each problem (after a blank line) unless already in it; None for none.
        conversational: `prompt` as `[{"role": "user", ...}]` instead of a string.
        system_prompt: optional system message (prepended text in the standard format).
        schema: `"openr1"`, `"problem_solution"`, or None to detect it from the columns.

    Raises:
        ValueError: when a needed column is missing (the message names it and lists the dataset's columns).
    """
    schema = _resolve_schema(dataset, schema, "rl")
    has_demonstrations = all(c in (dataset.column_names or []) for c in _REQUIRED[(schema, "sft")])

    def convert(row: Mapping[str, Any], index: int) -> dict[str, Any]:
        prompt = _prompt(_problem(row, schema, index), instruction, system_prompt, conversational)
        out = {"prompt": prompt, "solution": _gold(row, schema)}
        if has_demonstrations:
            text = _demonstration(row, schema, index)
            out["demonstration"] = [{"role": "assistant", "content": text}] if conversational else text
        return out

    converted = dataset.map(convert, with_indices=True, remove_columns=dataset.column_names)
    return converted.filter(lambda row: bool(row["solution"]))


def math_sft_pairs(
    dataset: Dataset,
    *,
    instruction: str | None = DEFAULT_INSTRUCTION,
    conversational: bool = False,
    system_prompt: str | None = None,
    schema: str | None = None,
) -> Dataset:
    """SFT demonstrations in TRL's prompt-completion format: columns `prompt` and `completion`.

    The completion is the worked solution (`target` for OpenR1-Math, `solution` otherwise), unchanged;
    rows without one are dropped. Arguments as in `math_rl_prompts`; with `conversational=True` the
    completion is `[{"role": "assistant", "content": ...}]`.

    Raises:
        ValueError: when a needed column is missing (the message names it and lists the dataset's columns).
    """
    schema = _resolve_schema(dataset, schema, "sft")

    def convert(row: Mapping[str, Any], index: int) -> dict[str, Any]:
        prompt = _prompt(_problem(row, schema, index), instruction, system_prompt, conversational)
        text = _demonstration(row, schema, index)
        completion: Any = [{"role": "assistant", "content": text}] if conversational else text
        return {"prompt": prompt, "completion": completion, "_keep": bool(text.strip())}

    converted = dataset.map(convert, with_indices=True, remove_columns=dataset.column_names)
    return converted.filter(lambda row: row["_keep"]).remove_columns("_keep")


def split_validation(
    dataset: Dataset, validation_size: int | float, seed: int = 0
) -> tuple[Dataset, Dataset]:
    """Split off a held-out validation set, deterministically for `seed`.

    Args:
        dataset: the source dataset (any schema).
        validation_size: a number of rows (int >= 1) or a fraction (0 < float < 1).
        seed: shuffling seed.

    Returns:
        `(train, validation)`, disjoint.

    Raises:
        ValueError: when `validation_size` is not a valid size for this dataset. The split does not look at columns:
            check a math file's with `check_math_columns` first, so that a file with the wrong columns reports them
            rather than a size its rows cannot fill.
    """
    n = len(dataset)
    if isinstance(validation_size, bool) or not isinstance(validation_size, (int, float)):
        raise ValueError(f"validation_size must be an int or a float, got {validation_size!r}.")
    if isinstance(validation_size, float) and not 0.0 < validation_size < 1.0:
        raise ValueError(f"A fractional validation_size must be in (0, 1), got {validation_size}.")
    if n < 2:
        raise ValueError(
            f"The dataset has {n} row{'s' if n != 1 else ''}: a validation split needs at least 2 (one to train on, "
            f"one to hold out); got validation_size={validation_size}."
        )
    if isinstance(validation_size, int) and not 1 <= validation_size < n:
        raise ValueError(
            f"validation_size must be between 1 and {n - 1} for {n} rows, got {validation_size}."
        )
    parts = dataset.train_test_split(test_size=validation_size, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


@dataclass
class MathDatasets:
    """The datasets of one math experiment.

    Attributes:
        rl: RL prompts (`prompt`, `solution` = gold answer) on the training problems.
        sft: SFT demonstrations (`prompt`, `completion`) on the same training problems.
        validation: RL-style prompts on held-out problems (none of them in `rl` or `sft`).
    """

    rl: Dataset
    sft: Dataset
    validation: Dataset


def build_math_datasets(
    dataset: Dataset | str = OPENR1_MATH_46K,
    *,
    validation_size: int | float = 500,
    seed: int = 0,
    instruction: str | None = DEFAULT_INSTRUCTION,
    conversational: bool = False,
    system_prompt: str | None = None,
    schema: str | None = None,
    split: str = "train",
    validation_dataset: Dataset | None = None,
    sft_dataset: Dataset | None = None,
) -> MathDatasets:
    """Build AMFT's RL prompts, SFT demonstrations and validation prompts from one math dataset.

    Args:
        dataset: a `datasets.Dataset`, a hub id (default: OpenR1-Math-46k-8192) or a local file path.
        validation_size: rows (int) or fraction (float) held out for validation, chosen with `seed`.
        seed: seed of the held-out split.
        instruction, conversational, system_prompt, schema: as in `math_rl_prompts`.
        split: the split to load when `dataset` is a hub id or a path.
        validation_dataset: the validation problems instead of a held-out part of `dataset` (nothing is held out).
        sft_dataset: the demonstrations instead of the worked solutions of `dataset`'s training rows.

    Raises:
        ValueError: when a needed column is missing, `validation_size` does not fit the dataset, or a dataset is
            left empty by the conversion (no row with a problem and a gold answer / solution).
    """
    if isinstance(dataset, str):
        dataset = load_math_dataset(dataset, split=split)
    # the columns first: a wrong file is named as such, not as a size that does not fit
    resolved = check_math_columns(dataset, schema, roles=("rl", "sft") if sft_dataset is None else ("rl",))
    sft_schema = resolved if sft_dataset is None else check_math_columns(sft_dataset, schema, roles=("sft",))
    if validation_dataset is None:
        train, held_out, held_out_schema = *split_validation(dataset, validation_size, seed=seed), resolved
    else:
        train, held_out, held_out_schema = dataset, validation_dataset, schema
    options = {"instruction": instruction, "conversational": conversational, "system_prompt": system_prompt}
    data = MathDatasets(
        rl=math_rl_prompts(train, schema=resolved, **options),
        sft=math_sft_pairs(train if sft_dataset is None else sft_dataset, schema=sft_schema, **options),
        validation=math_rl_prompts(held_out, schema=held_out_schema, **options),
    )
    for role, converted in (("RL prompt", data.rl), ("SFT", data.sft), ("validation", data.validation)):
        if len(converted) == 0:
            raise ValueError(
                f"the {role} dataset is empty after conversion (no rows with a problem and a gold answer / "
                "solution)"
            )
    return data
