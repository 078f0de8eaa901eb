r"""Benchmarks: named sets (math, out-of-distribution multiple choice, General Points) and local files.

A `Benchmark` is a list of `Problem`s (a question, the columns its reward reads), a reward with TRL's signature,
and the prompt template its questions are rendered with. `load_benchmarks` builds them from specs:

- a name from `BENCHMARKS` (`math500`, `aime24`, `aime25`, `amc23`, `minerva`, `olympiadbench`, `arc_c`,
  `gpqa_diamond`, `mmlu_pro`, `general_points_id`, `general_points_ood`), read from its default hub dataset, or
  groups of them: `math`, `ood`, `general_points`;
- `NAME=SOURCE`: that benchmark from a local `.jsonl`/`.json`/`.parquet`/`.csv` file, a `save_to_disk`
  directory, or a hub id (`HUB_ID` or `HUB_ID:SPLIT`);
- a file path: a verl/LUFFY evaluation file (columns `data_source`, `prompt`, `reward_model`) expands into one
  benchmark per `data_source` (`math` -> math500, `aime` -> aime24, `amc` -> amc23, `olympiad_bench` ->
  olympiadbench, `gpqa` -> gpqa_diamond, ...); any other file is one benchmark, named after the file, with a
  question column, an answer column and a reward named by the caller.

Column layouts read (each benchmark's real one):

- LUFFY / verl: `prompt` (chat messages; the last user message is the question, a system message is dropped as
  LUFFY's `generate_vllm.py` does), `reward_model.ground_truth` (gold), `data_source`. LUFFY repeats each AIME and
  AMC problem 32 times in `valid.all.parquet` (its avg@32); identical rows are collapsed into one problem that
  is sampled `num_samples` times.
- math: question in `problem` or `question`; gold in `answer`, `final_answer` (OlympiadBench's list, joined
  with ", "), `ground_truth` or `expected_answer`, else the last `\boxed{}` of `solution` (MATH-500: `problem`,
  `answer`; AIME: `problem`, `answer`; Minerva: `question`, `answer`; OlympiadBench: `question`, `final_answer`).
- ARC-Challenge (allenai/ai2_arc): `question`, `choices{text, label}`, `answerKey`; labels "1"-"4" and
  "A"-"E" both become letters by position.
- GPQA (Idavidrein/gpqa): `Question`, `Correct Answer`, `Incorrect Answer 1`-`3`; the four options are shuffled
  with a seeded generator per question and the order is recorded in the problem's `meta`.
- MMLU-Pro (TIGER-Lab/MMLU-Pro): `question`, `options` (up to 10, letters A-J), `answer` (letter) and
  `answer_index`.
- a generic multiple-choice file: `question`, `options` or `choices` (a list), `answer` (letter or 0-based
  index).

Multiple-choice questions are shown with one `X) option` line per option (LUFFY's layout) and graded by
`multiple_choice_reward` on the gold letter; verl files already hold the options in the question text, and the
option labels are read from its `X) ` lines (ARC items labelled "1)".."4)" are relabelled "A)".."D)", and
their gold with them). Bad input raises `EvaluationInputError` with one line that names the benchmark, the file,
the row or the column.
"""

from __future__ import annotations

import csv
import importlib
import json
import os
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from amft_trl._completions import last_boxed_content
from amft_trl.evaluation.problems import Benchmark, EvaluationInputError, Problem
from amft_trl.evaluation.prompts import TEMPLATES, PromptTemplate, get_template
from amft_trl.rewards import math_accuracy_reward, multiple_choice_reward
from amft_trl.tasks import general_points as gp

__all__ = [
    "BENCHMARKS",
    "BENCHMARK_GROUPS",
    "REWARDS",
    "Benchmark",
    "BenchmarkInfo",
    "EvaluationInputError",
    "GeneralPointsOptions",
    "Problem",
    "benchmark_from_dataset",
    "load_benchmark",
    "load_benchmarks",
    "resolve_reward",
]


@dataclass(frozen=True)
class BenchmarkInfo:
    """A named benchmark: its kind, table label, default hub source and LUFFY `data_source` name."""

    name: str
    label: str
    group: str
    kind: str  # "math" | "multiple_choice" | "general_points" | "general_points_revision" | "virl"
    hub_id: str | None = None
    hub_config: str | None = None
    hub_split: str = "test"
    luffy_sources: tuple[str, ...] = ()
    num_samples: int = 1
    face_card_rule: str | None = None
    split: str | None = None  # revision / V-IRL: "id", "ood_rule" or "ood_visual"
    visual: bool = False  # revision / V-IRL: images (True) or text observations


BENCHMARKS: dict[str, BenchmarkInfo] = {
    info.name: info
    for info in (
        BenchmarkInfo(
            "aime24", "AIME24", "math", "math", "HuggingFaceH4/aime_2024", None, "train", ("aime",), 32
        ),
        BenchmarkInfo("aime25", "AIME25", "math", "math", "math-ai/aime25", None, "test", ("aime25",), 32),
        BenchmarkInfo(
            "amc23", "AMC", "math", "math", "AI-MO/aimo-validation-amc", None, "train", ("amc",), 32
        ),
        BenchmarkInfo(
            "math500", "MATH500", "math", "math", "HuggingFaceH4/MATH-500", None, "test", ("math",)
        ),
        BenchmarkInfo(
            "minerva", "Minerva", "math", "math", "math-ai/minervamath", None, "test", ("minerva",)
        ),
        BenchmarkInfo(
            "olympiadbench",
            "Olympiad",
            "math",
            "math",
            "Hothan/OlympiadBench",
            "OE_TO_maths_en_COMP",
            "train",
            ("olympiad_bench", "olympiadbench"),
        ),
        BenchmarkInfo(
            "arc_c", "ARC-C", "ood", "multiple_choice", "allenai/ai2_arc", "ARC-Challenge", "test", ("arc_c",)
        ),
        BenchmarkInfo(
            "gpqa_diamond",
            "GPQA-D",
            "ood",
            "multiple_choice",
            "Idavidrein/gpqa",
            "gpqa_diamond",
            "train",
            ("gpqa", "gpqa_diamond"),
        ),
        BenchmarkInfo(
            "mmlu_pro",
            "MMLU-Pro",
            "ood",
            "multiple_choice",
            "TIGER-Lab/MMLU-Pro",
            None,
            "test",
            ("mmlu_pro",),
        ),
        BenchmarkInfo("general_points_id", "ID", "general_points", "general_points", face_card_rule="id"),
        BenchmarkInfo(
            "general_points_ood", "OOD (rule)", "general_points", "general_points", face_card_rule="ood"
        ),
        *(
            BenchmarkInfo(f"{prefix}_{split}", label, prefix, kind, split=split, visual=visual)
            for prefix, kind, visual, splits in (
                ("gp_vl", "general_points_revision", True, ("id", "ood_rule", "ood_visual")),
                ("gp_l", "general_points_revision", False, ("id", "ood_rule")),
                ("virl_vl", "virl", True, ("id", "ood_rule", "ood_visual")),
                ("virl_l", "virl", False, ("id", "ood_rule", "ood_visual")),
            )
            for split, label in (("id", "ID"), ("ood_rule", "OOD (rule)"), ("ood_visual", "OOD (visual)"))
            if split in splits
        ),
    )
}

#: Names that stand for several benchmarks.
BENCHMARK_GROUPS: dict[str, tuple[str, ...]] = {
    "math": ("aime24", "aime25", "amc23", "math500", "minerva", "olympiadbench"),
    "ood": ("arc_c", "gpqa_diamond", "mmlu_pro"),
    "general_points": ("general_points_id", "general_points_ood"),
    "gp_vl": ("gp_vl_id", "gp_vl_ood_rule", "gp_vl_ood_visual"),
    "gp_l": ("gp_l_id", "gp_l_ood_rule"),
    "virl_vl": ("virl_vl_id", "virl_vl_ood_rule", "virl_vl_ood_visual"),
    "virl_l": ("virl_l_id", "virl_l_ood_rule", "virl_l_ood_visual"),
}

REWARDS: dict[str, Callable[..., list[float | None]]] = {
    "math_accuracy_reward": math_accuracy_reward,
    "multiple_choice_reward": multiple_choice_reward,
    "general_points_reward": gp.general_points_reward,
}
_REWARD_ALIASES = {"math": "math_accuracy_reward", "multiple_choice": "multiple_choice_reward", "mc": "multiple_choice_reward", "general_points": "general_points_reward"}  # fmt: skip
_DEFAULT_TEMPLATE = {"math": "boxed", "multiple_choice": "multiple_choice", "general_points": "plain"}
_LOCAL_FORMATS = (".jsonl", ".json", ".parquet", ".csv")
_QUESTION_COLUMNS = ("problem", "question", "Problem", "Question", "prompt")
_ANSWER_COLUMNS = ("answer", "final_answer", "Answer", "ground_truth", "expected_answer", "solution")
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_OPTION_LINE_RE = re.compile(r"^[ \t]*([A-Z]|[1-9][0-9]?)\)[ \t]", re.MULTILINE)


@dataclass(frozen=True)
class GeneralPointsOptions:
    """How the General Points benchmarks are dealt (the defaults of `build_general_points_datasets`)."""

    num_eval: int = 100
    num_cards: int = gp.DEFAULT_NUM_CARDS
    target: int = gp.DEFAULT_TARGET
    seed: int = 0


# --------------------------------------------------------------------------------------------- rewards


def resolve_reward(name: str | Callable) -> tuple[Callable[..., list[float | None]], str]:
    """A reward by name (`REWARDS`, `math`, `multiple_choice`, `general_points`) or dotted import path.

    Raises:
        EvaluationInputError: when the name is unknown or the import fails.
    """
    if callable(name):
        return name, getattr(name, "__name__", type(name).__name__)
    key = _REWARD_ALIASES.get(name, name)
    if key in REWARDS:
        return REWARDS[key], key
    module_name, sep, attr = name.replace(":", ".").rpartition(".")
    if not sep:
        raise EvaluationInputError(
            f"Unknown reward {name!r}: use one of {sorted(REWARDS)} or a dotted path like my_module.my_reward."
        )
    try:
        func = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise EvaluationInputError(f"Cannot import the reward {name!r}: {exc}.") from None
    if not callable(func):
        raise EvaluationInputError(f"The reward {name!r} is not callable.")
    return func, name


# --------------------------------------------------------------------------------------------- reading


def _looks_like_file(spec: str) -> bool:
    return spec.lower().endswith(_LOCAL_FORMATS) or os.path.exists(spec)


def _read_file(path: str, what: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        raise EvaluationInputError(f"{what}: the file {path!r} does not exist.")
    if os.path.isdir(path):
        return _read_saved_dataset(path, what)
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".parquet":
            import pyarrow.parquet as pq

            rows = pq.read_table(path).to_pylist()
        elif ext == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        elif ext in (".jsonl", ".json"):
            with open(path, encoding="utf-8") as f:
                text = f.read()
            stripped = text.lstrip()
            if ext == ".json" and stripped.startswith("["):
                rows = json.loads(text)
            else:
                rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            raise EvaluationInputError(
                f"{what}: cannot read {path!r}; use a {'/'.join(_LOCAL_FORMATS)} file or a saved dataset directory."
            )
    except EvaluationInputError:
        raise
    except Exception as exc:  # malformed JSON, a truncated parquet file, ...
        raise EvaluationInputError(f"{what}: cannot read {path!r} ({type(exc).__name__}: {exc}).") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise EvaluationInputError(f"{what}: {path!r} must hold one JSON object per row.")
    return rows


def _read_saved_dataset(path: str, what: str) -> list[dict[str, Any]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(path)
    except Exception as exc:
        raise EvaluationInputError(f"{what}: {path!r} is not a saved dataset directory ({exc}).") from None
    if isinstance(loaded, datasets.DatasetDict):
        split = "test" if "test" in loaded else next(iter(loaded))
        loaded = loaded[split]
    return loaded.to_list()


def _read_hub(hub_id: str, config: str | None, split: str, what: str) -> list[dict[str, Any]]:
    import datasets

    if ":" in hub_id:
        hub_id, split = hub_id.split(":", 1)
    try:
        return datasets.load_dataset(hub_id, config, split=split).to_list()
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EvaluationInputError(
            f"{what}: cannot load {hub_id!r} (split {split!r}) from the Hugging Face Hub ({first}); "
            f"pass a local file instead: {what.split()[0]}=PATH."
        ) from None


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    return list(rows[0].keys()) if rows else []


def _is_verl(columns: Iterable[str]) -> bool:
    return {"prompt", "reward_model"} <= set(columns)


# --------------------------------------------------------------------------------------------- layouts


def _verl_question(row: Mapping[str, Any], where: str) -> str:
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, (list, tuple)):
        users = [m for m in prompt if isinstance(m, Mapping) and m.get("role") == "user"]
        if users and isinstance(users[-1].get("content"), str):
            return users[-1]["content"]
    raise EvaluationInputError(f"{where}: 'prompt' has no user message (expected a list of chat messages).")


def _verl_gold(row: Mapping[str, Any], where: str) -> Any:
    reward_model = row.get("reward_model")
    if isinstance(reward_model, Mapping) and "ground_truth" in reward_model:
        return reward_model["ground_truth"]
    raise EvaluationInputError(f"{where}: 'reward_model' has no 'ground_truth'.")


def _math_gold(row: Mapping[str, Any], where: str) -> str:
    for column in _ANSWER_COLUMNS[:-1]:
        if column in row and row[column] is not None:
            value = row[column]
            if isinstance(value, (list, tuple)):
                return ", ".join(str(v) for v in value)
            return str(value)
    if row.get("solution") is not None:
        boxed = last_boxed_content(str(row["solution"]))
        if boxed:
            return boxed
        raise EvaluationInputError(
            f"{where}: no gold answer: 'solution' has no \\boxed{{}} and no answer column."
        )
    raise EvaluationInputError(
        f"{where}: no gold-answer column (looked for {', '.join(repr(c) for c in _ANSWER_COLUMNS)}); "
        f"the row has the columns {sorted(row)}."
    )


def _question_column(columns: Sequence[str], what: str, wanted: str | None = None) -> str:
    candidates = (wanted,) if wanted else _QUESTION_COLUMNS
    for column in candidates:
        if column in columns:
            return column
    raise EvaluationInputError(
        f"{what}: no question column (looked for {', '.join(repr(c) for c in candidates)}); "
        f"it has the columns {list(columns)}."
    )


def _format_options(stem: str, options: Sequence[Any]) -> str:
    lines = "\n".join(f"{_LETTERS[i]}) {str(text).strip()}" for i, text in enumerate(options))
    return f"{stem.strip()}\n\n{lines}"


def _gold_outside(what: str, where: str, gold: Any, labels: Sequence[str]) -> EvaluationInputError:
    return EvaluationInputError(
        f"{what}: {where}: the gold key {gold!r} is not one of its options {list(labels)}."
    )


def _mc_problem(index: int, row: Mapping[str, Any], what: str, seed: int) -> Problem:
    """One multiple-choice problem from the ARC, GPQA, MMLU-Pro or generic layout."""
    where = f"row {index}"
    meta: dict[str, Any] = {}
    if "choices" in row and "answerKey" in row and isinstance(row["choices"], Mapping):  # ARC
        labels = [str(x) for x in row["choices"].get("label", [])]
        texts = list(row["choices"].get("text", []))
        key = str(row["answerKey"]).strip()
        if len(labels) != len(texts) or not labels:
            raise EvaluationInputError(
                f"{what}: {where}: 'choices' needs equal, non-empty 'text' and 'label' lists."
            )
        if key not in labels:
            raise _gold_outside(what, where, key, labels)
        gold_index, stem = labels.index(key), str(row[_question_column(list(row), what)])
        meta = {"source_labels": labels, "source_answer_key": key}
        options = texts
    elif "Correct Answer" in row and "Question" in row:  # GPQA
        options_raw = [row["Correct Answer"]] + [row.get(f"Incorrect Answer {i}") for i in (1, 2, 3)]
        if any(o is None or not str(o).strip() for o in options_raw):
            raise EvaluationInputError(
                f"{what}: {where}: GPQA needs 'Correct Answer' and 'Incorrect Answer 1'-'3'."
            )
        order = list(range(4))
        random.Random(f"gpqa/{seed}/{row.get('Record ID', index)}").shuffle(order)
        options = [options_raw[i] for i in order]
        gold_index, stem = order.index(0), str(row["Question"])
        meta = {
            "option_order": order,
            "option_order_note": "source index per shown option; 0 is 'Correct Answer'",
        }
    else:  # MMLU-Pro or generic: question + options/choices list + answer letter or index
        options_column = "options" if "options" in row else "choices" if "choices" in row else None
        if options_column is None or not isinstance(row[options_column], (list, tuple)):
            raise EvaluationInputError(
                f"{what}: {where}: no options (expected ARC's 'choices'+'answerKey', GPQA's 'Correct Answer', "
                f"or an 'options' list); the row has the columns {sorted(row)}."
            )
        options = list(row[options_column])
        if not 1 <= len(options) <= len(_LETTERS):
            raise EvaluationInputError(
                f"{what}: {where}: {len(options)} options; expected 1 to {len(_LETTERS)}."
            )
        labels = list(_LETTERS[: len(options)])
        answer, answer_index = row.get("answer"), row.get("answer_index")
        if answer is None and answer_index is None:
            raise EvaluationInputError(
                f"{what}: {where}: no 'answer' (letter or index) or 'answer_index' column."
            )
        gold_index = _choice_index(answer if answer is not None else answer_index)
        if gold_index is None or gold_index >= len(options):
            raise _gold_outside(what, where, answer if answer is not None else answer_index, labels)
        if answer is not None and answer_index is not None and _choice_index(answer_index) != gold_index:
            raise EvaluationInputError(
                f"{what}: {where}: 'answer' {answer!r} and 'answer_index' {answer_index!r} disagree."
            )
        stem = str(row[_question_column(list(row), what)])
    letters = _LETTERS[: len(options)]
    meta.update({"options": [str(o) for o in options], "letters": letters})
    gold = letters[gold_index]
    return Problem(str(index), _format_options(stem, options), gold, {"answer": gold}, meta)


def _choice_index(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, str):
        text = value.strip().strip("()").strip()
        if text.isdigit():
            return int(text)
        if len(text) == 1 and text.upper() in _LETTERS:
            return _LETTERS.index(text.upper())
    return None


def _label_rank(label: str) -> int:
    return int(label) - 1 if label.isdigit() else _LETTERS.index(label)


def _option_matches(question: str) -> list[re.Match[str]]:
    """The `X) ` lines of the question's final option block: the last run of labels counting up from A (or 1).

    Earlier numbered lines (a list of statements in the stem, as in some GPQA questions) are not options.
    """
    matches = list(_OPTION_LINE_RE.finditer(question))
    block: list[re.Match[str]] = []
    for match in reversed(matches):
        label = match.group(1)
        if block:
            previous = block[-1].group(1)
            if label.isdigit() != previous.isdigit() or _label_rank(label) != _label_rank(previous) - 1:
                break
        block.append(match)
        if _label_rank(label) == 0:
            return block[::-1]
    return []


def _verl_mc_problem(index: int, question: str, gold: Any, what: str, row: int) -> Problem:
    """A multiple-choice problem whose options are `X) ` lines of a verl question (LUFFY's ARC-C, GPQA files).

    `index` is the problem's position, `row` its first row in the file (named in errors)."""
    where = f"row {row}"
    matches = _option_matches(question)
    labels = [m.group(1) for m in matches]
    if not labels:
        raise EvaluationInputError(f"{what}: {where}: no 'A) option' lines in the question to grade against.")
    key = str(gold).strip()
    if key not in labels:
        raise _gold_outside(what, where, key, labels)
    meta: dict[str, Any] = {"letters": "".join(labels)}
    if labels[0].isdigit():  # ARC items labelled 1)..4): relabel the option lines A)..D) and map the gold
        pieces, last = [], 0
        for i, match in enumerate(matches):
            pieces += [question[last : match.start(1)], _LETTERS[i]]
            last = match.end(1)
        question = "".join(pieces) + question[last:]
        meta = {"letters": _LETTERS[: len(labels)], "relabelled_from": labels}
        key = _LETTERS[labels.index(key)]
    return Problem(str(index), question, key, {"answer": key}, meta)


def _dedupe(problems: list[tuple[str, Any, dict]]) -> tuple[list[tuple[str, Any, dict]], int]:
    """Collapse identical (question, gold) rows, keeping the first; returns the rows and the largest repeat."""
    seen: dict[tuple[str, str], int] = {}
    kept: list[tuple[str, Any, dict]] = []
    counts: list[int] = []
    for question, gold, meta in problems:
        key = (question, json.dumps(gold, default=str))
        if key in seen:
            counts[seen[key]] += 1
            continue
        seen[key] = len(kept)
        kept.append((question, gold, meta))
        counts.append(1)
    return kept, max(counts, default=1)


def _from_verl(rows: list[dict[str, Any]], info: BenchmarkInfo, what: str, source: str) -> Benchmark:
    items = []
    for i, row in enumerate(rows):
        where = f"{what}: row {i} of {source!r}"
        items.append(
            (
                _verl_question(row, where),
                _verl_gold(row, where),
                {"data_source": row.get("data_source"), "row": i},
            )
        )
    items, repeats = _dedupe(items)
    notes = []
    if repeats > 1:
        notes.append(
            f"{source} repeats problems (up to {repeats} times each, LUFFY's avg@{repeats} layout); "
            f"identical rows collapsed into {len(items)} problems"
        )
    problems = []
    for i, (question, gold, meta) in enumerate(items):
        if info.kind == "multiple_choice":
            problem = _verl_mc_problem(i, question, gold, f"{what} ({source})", meta["row"])
        else:
            problem = Problem(str(i), question, str(gold), {"solution": str(gold)})
        problem.meta.update(meta)
        problems.append(problem)
    if any("relabelled_from" in p.meta for p in problems):
        n = sum("relabelled_from" in p.meta for p in problems)
        notes.append(f"{n} problems had options labelled 1)..n); relabelled A)..; gold keys mapped with them")
    return _named(info, problems, source, notes)


def _from_rows(
    rows: list[dict[str, Any]], info: BenchmarkInfo, what: str, source: str, seed: int
) -> Benchmark:
    if not rows:
        raise EvaluationInputError(f"{what}: {source!r} has no rows.")
    columns = _columns(rows)
    if info.kind == "multiple_choice":
        problems = [_mc_problem(i, row, f"{what} ({source})", seed) for i, row in enumerate(rows)]
        return _named(info, problems, source, [])
    question_column = _question_column(columns, f"{what} ({source})")
    problems = []
    for i, row in enumerate(rows):
        gold = _math_gold(row, f"{what}: row {i} of {source!r}")
        problems.append(Problem(str(i), str(row[question_column]), gold, {"solution": gold}))
    return _named(info, problems, source, [])


def _named(info: BenchmarkInfo, problems: list[Problem], source: str, notes: list[str]) -> Benchmark:
    reward = multiple_choice_reward if info.kind == "multiple_choice" else math_accuracy_reward
    return Benchmark(
        name=info.name,
        problems=problems,
        reward=reward,
        reward_name=reward.__name__,
        group=info.group,
        label=info.label,
        template=TEMPLATES[_DEFAULT_TEMPLATE[info.kind]],
        source=source,
        num_samples=info.num_samples,
        notes=notes,
    )


def _general_points(info: BenchmarkInfo, options: GeneralPointsOptions) -> Benchmark:
    try:
        hands = gp.generate_hands(
            options.num_eval,
            split="test",
            face_card_rule=info.face_card_rule,
            seed=options.seed,
            num_cards=options.num_cards,
            target=options.target,
        )
    except ValueError as exc:
        raise EvaluationInputError(f"{info.name}: {exc}") from None
    dataset = gp.rl_prompt_dataset(hands, info.face_card_rule, target=options.target)
    problems = [
        Problem(
            str(i),
            row["prompt"],
            gp.demonstration(row["cards"], row["face_card_rule"], row["target"]),
            {"cards": row["cards"], "face_card_rule": row["face_card_rule"], "target": row["target"]},
        )
        for i, row in enumerate(dataset)
    ]
    source = (
        f"amft_trl.tasks.general_points test hands: {options.num_cards} cards, target {options.target}, "
        f"seed {options.seed}, rule {info.face_card_rule!r}"
    )
    return Benchmark(
        name=info.name,
        problems=problems,
        reward=gp.general_points_reward,
        reward_name="general_points_reward",
        group=info.group,
        label=info.label,
        template=TEMPLATES["plain"],
        source=source,
        num_samples=info.num_samples,
    )


# --------------------------------------------------------------------------------------------- public


def load_benchmark(
    name: str,
    source: str | None = None,
    *,
    seed: int = 0,
    general_points: GeneralPointsOptions | None = None,
    visual_tasks: Any = None,
) -> Benchmark:
    """Load one named benchmark (`BENCHMARKS`), from its default hub dataset or from `source`.

    Args:
        name: a key of `BENCHMARKS`.
        source: a local file or saved-dataset directory, or a hub id (`ID` or `ID:SPLIT`); default: the
            benchmark's hub dataset. A verl/LUFFY file may hold several benchmarks: the rows whose
            `data_source` is this benchmark's (e.g. `math` for math500) are used.
        seed: seeds GPQA's option shuffle.
        general_points: how the General Points hands are dealt.
        visual_tasks: how the revision and V-IRL benchmarks are built
            (`amft_trl.evaluation.multiturn.VisualTaskOptions`); a V-IRL benchmark's `source` is its data folder.

    Raises:
        EvaluationInputError: unknown name, unreadable source, missing columns, a gold key outside its options.
    """
    if name not in BENCHMARKS:
        raise EvaluationInputError(_unknown(name))
    info = BENCHMARKS[name]
    if info.kind in ("general_points_revision", "virl"):
        from amft_trl.evaluation import multiturn

        options = visual_tasks or multiturn.VisualTaskOptions()
        if info.kind == "virl":
            return multiturn.virl_benchmark(info, options, source)
        if source is not None:
            raise EvaluationInputError(
                f"{name}: General Points hands are generated; it takes no source ({source!r})."
            )
        return multiturn.general_points_revision_benchmark(info, options)
    if info.kind == "general_points":
        if source is not None:
            raise EvaluationInputError(
                f"{name}: General Points hands are generated; it takes no source ({source!r})."
            )
        return _general_points(info, general_points or GeneralPointsOptions())
    what = name
    if source is None:
        rows = _read_hub(info.hub_id, info.hub_config, info.hub_split, what)
        source = info.hub_id
    elif _looks_like_file(source):
        rows = _read_file(source, what)
    else:
        rows = _read_hub(source, None, info.hub_split, what)
    if rows and _is_verl(_columns(rows)):
        sources = {str(r.get("data_source")) for r in rows}
        wanted = {name, *info.luffy_sources}
        if sources & wanted:
            rows = [r for r in rows if str(r.get("data_source")) in wanted]
        elif len(sources) > 1:
            raise EvaluationInputError(
                f"{name}: {source!r} has no rows with data_source in {sorted(wanted)}; it has {sorted(sources)}."
            )
        # else: a file of one data_source under another name is taken whole
        return _from_verl(rows, info, what, source)
    return _from_rows(rows, info, what, source, seed)


def _unknown(name: str) -> str:
    known = sorted(BENCHMARKS) + sorted(BENCHMARK_GROUPS)
    return f"Unknown benchmark {name!r}: not a benchmark name ({', '.join(known)}) nor an existing file."


def _file_benchmarks(
    path: str,
    *,
    reward: str | Callable | None,
    question_column: str | None,
    answer_column: str | None,
    seed: int,
) -> list[Benchmark]:
    rows = _read_file(path, path)
    if not rows:
        raise EvaluationInputError(f"{path}: the file has no rows.")
    stem = os.path.splitext(os.path.basename(path.rstrip("/")))[0]
    if _is_verl(_columns(rows)) and reward is None:
        by_source: dict[str, list[dict]] = {}
        for row in rows:
            by_source.setdefault(str(row.get("data_source")), []).append(row)
        benchmarks = []
        for data_source, source_rows in by_source.items():
            info = _info_for_source(data_source, source_rows)
            benchmarks.append(_from_verl(source_rows, info, info.name, path))
        return benchmarks
    if reward is None:
        raise EvaluationInputError(
            f"{path}: name the reward that grades this file (--reward math_accuracy_reward, "
            "multiple_choice_reward, general_points_reward or my_module.my_reward)."
        )
    return [_custom_file(rows, path, stem, reward, question_column, answer_column)]


def _info_for_source(data_source: str, rows: list[dict]) -> BenchmarkInfo:
    for info in BENCHMARKS.values():
        if data_source == info.name or data_source in info.luffy_sources:
            return info
    golds = [str(_verl_gold(r, data_source)).strip() for r in rows]
    is_mc = all(len(g) == 1 and g.upper() in _LETTERS for g in golds)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", data_source) or "benchmark"
    kind = "multiple_choice" if is_mc else "math"
    return BenchmarkInfo(name, data_source, "other", kind)


def _custom_file(
    rows: list[dict[str, Any]],
    path: str,
    name: str,
    reward: str | Callable,
    question_column: str | None,
    answer_column: str | None,
) -> Benchmark:
    func, reward_name = resolve_reward(reward)
    columns = _columns(rows)
    qcol = _question_column(columns, path, question_column)
    problems: list[Problem] = []
    if func is gp.general_points_reward:
        needed = ("cards", "face_card_rule", "target")
        missing = [c for c in needed if c not in columns]
        if missing:
            raise EvaluationInputError(
                f"{path}: general_points_reward needs the columns {missing}; it has {columns}."
            )
        for i, row in enumerate(rows):
            kwargs = {c: row[c] for c in needed}
            problems.append(Problem(str(i), row[qcol], None, kwargs))
        template = TEMPLATES["plain"]
    else:
        acol = answer_column or next((c for c in ("answer", "solution") if c in columns), None)
        if acol is None or acol not in columns:
            raise EvaluationInputError(
                f"{path}: no answer column {answer_column or 'answer'!r} (set --answer-column); "
                f"it has the columns {columns}."
            )
        template = TEMPLATES["boxed"] if func is math_accuracy_reward else TEMPLATES["plain"]
        for i, row in enumerate(rows):
            question, gold, meta = row[qcol], row[acol], {}
            if func is multiple_choice_reward:
                options = row.get("options", row.get("choices"))
                index = _choice_index(gold)
                limit = len(options) if isinstance(options, (list, tuple)) else len(_LETTERS)
                if index is None or index >= limit:
                    labels = list(_LETTERS[:limit])
                    raise _gold_outside(path, f"row {i}", gold, labels)
                if isinstance(options, (list, tuple)):
                    question = _format_options(str(question), options)
                    meta = {"options": [str(o) for o in options]}
                gold = _LETTERS[index]
                kwargs = {"answer": gold}
                template = TEMPLATES["multiple_choice"]
            elif func is math_accuracy_reward:
                gold = str(gold)
                kwargs = {"solution": gold}
            else:
                kwargs = {c: v for c, v in row.items() if c != qcol}
            if question is None or (isinstance(question, str) and not question.strip()):
                raise EvaluationInputError(f"{path}: row {i}: the question column {qcol!r} is empty.")
            problems.append(
                Problem(
                    str(i), question if not isinstance(question, str) else str(question), gold, kwargs, meta
                )
            )
    return Benchmark(name, problems, func, reward_name, "other", name, template, path)


def load_benchmarks(
    specs: str | Sequence[str | Benchmark],
    *,
    reward: str | Callable | None = None,
    question_column: str | None = None,
    answer_column: str | None = None,
    seed: int = 0,
    general_points: GeneralPointsOptions | None = None,
    max_problems: int | None = None,
    visual_tasks: Any = None,
) -> list[Benchmark]:
    """Resolve benchmark specs into loaded, validated benchmarks (nothing is generated).

    Args:
        specs: a comma-separated string or a list of: benchmark names, group names (`math`, `ood`,
            `general_points`), `NAME=SOURCE` pairs, file paths, or `Benchmark` objects (kept as they are).
        reward: the reward of plain files (a name from `REWARDS` or a dotted path); a verl/LUFFY file given
            with a reward is graded as a plain file too.
        question_column: the question column of plain files (default: `problem`, `question` or `prompt`).
        answer_column: the answer column of plain files (default: `answer`, else `solution`).
        seed: seeds GPQA's option shuffle.
        general_points: how the General Points hands are dealt.
        max_problems: keep the first N problems of each benchmark (smoke runs).
        visual_tasks: how the revision and V-IRL benchmarks are built (`multiturn.VisualTaskOptions`).

    Raises:
        EvaluationInputError: an unknown name, a missing file or column, a gold key outside its options, the
            same benchmark twice.
    """
    if isinstance(specs, str):
        specs = [s.strip() for s in specs.split(",") if s.strip()]
    if not specs:
        raise EvaluationInputError("No benchmarks given.")
    # Names first: an unknown name fails before anything is read or downloaded.
    for spec in specs:
        if isinstance(spec, Benchmark):
            continue
        name, sep, _ = spec.partition("=")
        name = name.strip()
        if sep and name not in BENCHMARKS:
            raise EvaluationInputError(_unknown(name))
        if not sep and name not in BENCHMARK_GROUPS and name not in BENCHMARKS and not _looks_like_file(name):
            raise EvaluationInputError(_unknown(name))
    loaded: list[Benchmark] = []
    for spec in specs:
        if isinstance(spec, Benchmark):
            loaded.append(replace(spec))  # a copy: the run may cut its problems or change its template
            continue
        name, sep, source = spec.partition("=")
        name = name.strip()
        if sep:
            loaded.append(
                load_benchmark(
                    name, source.strip(), seed=seed, general_points=general_points, visual_tasks=visual_tasks
                )
            )
        elif name in BENCHMARK_GROUPS:
            for member in BENCHMARK_GROUPS[name]:
                loaded.append(
                    load_benchmark(
                        member, seed=seed, general_points=general_points, visual_tasks=visual_tasks
                    )
                )
        elif name in BENCHMARKS:
            loaded.append(
                load_benchmark(name, seed=seed, general_points=general_points, visual_tasks=visual_tasks)
            )
        else:
            loaded.extend(
                _file_benchmarks(
                    name,
                    reward=reward,
                    question_column=question_column,
                    answer_column=answer_column,
                    seed=seed,
                )
            )
    names = [b.name for b in loaded]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise EvaluationInputError(f"Benchmark(s) {duplicates} given more than once.")
    for benchmark in loaded:
        if not benchmark.problems:
            raise EvaluationInputError(f"{benchmark.name}: no problems to evaluate ({benchmark.source}).")
        if max_problems is not None:
            benchmark.problems = benchmark.problems[:max_problems]
    return loaded


def benchmark_from_dataset(
    name: str,
    dataset: Any,
    reward: str | Callable,
    *,
    prompt_column: str = "prompt",
    gold_column: str | None = None,
    group: str = "other",
    label: str | None = None,
    template: str | PromptTemplate = "plain",
    num_samples: int | None = None,
) -> Benchmark:
    """A benchmark from an in-memory dataset in TRL's prompt format (e.g. `build_general_points_datasets().eval_id`).

    Every column other than `prompt_column` is passed to the reward, exactly as TRL passes dataset columns
    to reward functions, so any RL prompt dataset with its reward columns can be evaluated as it is.

    Args:
        name: the benchmark's key in the results.
        dataset: a `datasets.Dataset` or a list of dicts.
        reward: the reward (a callable, a name from `REWARDS` or a dotted path).
        prompt_column: the column with the prompt: text (rendered with `template`) or chat messages (used as
            they are, in the model's chat template).
        gold_column: a column to show as the gold answer in the results (optional).
        group: `"math"`, `"ood"`, `"general_points"` or `"other"` (which average it joins).
        label: its header in the markdown table.
        template: a built-in template name, a string with `{question}`, or a `PromptTemplate`.
        num_samples: its default number of samples per problem.

    Raises:
        EvaluationInputError: when the prompt column or the gold column is missing.
    """
    rows = dataset.to_list() if hasattr(dataset, "to_list") else [dict(r) for r in dataset]
    func, reward_name = resolve_reward(reward)
    columns = _columns(rows)
    if rows and prompt_column not in columns:
        raise EvaluationInputError(
            f"{name}: no prompt column {prompt_column!r}; it has the columns {columns}."
        )
    if rows and gold_column is not None and gold_column not in columns:
        raise EvaluationInputError(f"{name}: no gold column {gold_column!r}; it has the columns {columns}.")
    problems = [
        Problem(
            str(i),
            row[prompt_column],
            row.get(gold_column) if gold_column else None,
            {c: v for c, v in row.items() if c != prompt_column},
        )
        for i, row in enumerate(rows)
    ]
    return Benchmark(
        name=name,
        problems=problems,
        reward=func,
        reward_name=reward_name,
        group=group,
        label=label or name,
        template=get_template(template),
        source="in-memory",
        num_samples=num_samples,
    )
