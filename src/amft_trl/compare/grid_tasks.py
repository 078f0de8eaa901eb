"""The comparison's tasks: the data every method sees, the reward, the starting model and the evaluation sets.

A task builds, from its options alone (so every method and seed gets the same rows):

- `train`: RL prompts with their reward columns and, when the task has them, a `demonstration` column (HPT reads
  it: one worked answer per prompt);
- `sft`: the demonstrations in TRL's prompt-completion format (None when the task has none);
- `val`: validation prompts: the split tuning trials are scored on, and AMFT's meta-objective U;
- `tests`: the held-out evaluation sets, in-distribution (`ID`) and out-of-distribution (`OOD`), never used to
  choose anything.

Tasks:

- `toy_addition`: `Compute a + b =` on the offline tiny Qwen2 of `amft_trl.toy`, operands 0-20 (ID: held-out pairs)
  and 21-30 (OOD). The random model knows nothing, so the task first gives it a short SFT pre-training of its own
  (`pretrain_steps`, on the demonstrations), so that GRPO alone is not stuck at zero reward. Minutes on a CPU.
- `arithmetic`: chat-formatted arithmetic with exact integer answers for a real small model (the embedded
  SmolLM2-135M-Instruct): `add` (two numbers), `sum3` (three numbers) or `mul` (a number times a digit); OOD uses
  larger operands.
- `general_points`: the AMFT paper's card game (`amft_trl.tasks.general_points`), ID and OOD face-card rules.
- `math`: OpenR1-Math-46k-8192 (or any math file the `amft_trl.math_data` builders read), evaluated on the evaluation
  issue's named benchmarks (`math,ood` by default): the GPU recipe.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from datasets import Dataset

from amft_trl import toy


class TaskError(ValueError):
    """A task option that does not fit (named in the message)."""


@dataclass
class TaskData:
    """Everything a run of the comparison trains and is scored on (see the module docstring)."""

    train: Dataset
    sft: Dataset | None
    val: Dataset
    tests: dict[str, Any]  # name -> Dataset (graded by `reward`) or a benchmark name of `amft_trl.evaluation`
    test_groups: dict[str, str]  # name -> "ID" or "OOD"
    reward_funcs: list[Callable]
    max_new_tokens: int
    template: str = "plain"  # evaluation prompt template for text prompts (`raw`: no chat template)
    eval_settings: dict[str, Any] = field(default_factory=dict)  # extra `EvalConfig` fields for `tests`

    @property
    def has_demonstrations(self) -> bool:
        return self.sft is not None and len(self.sft) > 0

    @property
    def has_demonstration_column(self) -> bool:
        return "demonstration" in self.train.column_names


class Task:
    """A comparison task: options (a dataclass `Options`), its data, and how its starting model is prepared."""

    name: ClassVar[str] = ""

    @dataclass
    class Options:
        pass

    def __init__(self, **options: Any):
        known = {f.name for f in fields(self.Options)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TaskError(f"task {self.name!r}: unknown option(s) {unknown}; it takes {sorted(known)}.")
        self.options = self.Options(**options)
        self.check()

    def check(self) -> None:
        """Raise a `TaskError` naming the option that does not fit."""

    def build(self) -> TaskData:
        raise NotImplementedError

    def prepare_base_model(self, model: Any, tokenizer: Any, seed: int) -> dict[str, Any]:
        """Adjust the freshly built starting model in place (e.g. a short SFT pre-training); returns what it did."""
        return {}


# ------------------------------------------------------------------------------------------------ toy addition


def _addition_rows(pairs: list[tuple[int, int]]) -> Dataset:
    return Dataset.from_list(
        [
            {
                "prompt": f"Compute {a} + {b} =",
                "answer": str(a + b),
                "demonstration": f" {a + b}. The answer is {a + b}.",
            }
            for a, b in pairs
        ]
    )


class ToyAddition(Task):
    """`Compute a + b =` on the tiny offline model, after a short SFT pre-training of its own."""

    name = "toy_addition"

    @dataclass
    class Options:
        max_operand: int = 20
        num_val: int = 40
        num_test: int = 100
        num_ood: int = 100
        ood_max_operand: int = 30
        pretrain_steps: int = 150
        pretrain_learning_rate: float = 3e-3
        pretrain_batch_size: int = 32
        max_new_tokens: int = 8
        seed: int = 0

    def check(self) -> None:
        o = self.options
        pairs = (o.max_operand + 1) ** 2
        if o.num_val + o.num_test >= pairs:
            raise TaskError(
                f"task 'toy_addition': num_val + num_test = {o.num_val + o.num_test} leaves no training pair out of "
                f"{pairs} (max_operand={o.max_operand})."
            )
        if o.ood_max_operand <= o.max_operand:
            raise TaskError("task 'toy_addition': ood_max_operand must exceed max_operand.")
        if o.pretrain_steps < 0:
            raise TaskError("task 'toy_addition': pretrain_steps must be >= 0.")

    def _splits(self) -> tuple[list, list, list, list]:
        o = self.options
        rng = random.Random(o.seed)
        pairs = [(a, b) for a in range(o.max_operand + 1) for b in range(o.max_operand + 1)]
        rng.shuffle(pairs)
        test, val, train = (
            pairs[: o.num_test],
            pairs[o.num_test : o.num_test + o.num_val],
            pairs[o.num_test + o.num_val :],
        )
        ood_pool = [
            (a, b)
            for a in range(o.ood_max_operand + 1)
            for b in range(o.ood_max_operand + 1)
            if max(a, b) > o.max_operand
        ]
        rng.shuffle(ood_pool)
        return train, val, test, ood_pool[: o.num_ood]

    def build(self) -> TaskData:
        train, val, test, ood = self._splits()
        train_rows = _addition_rows(train)
        sft = Dataset.from_list(
            [{"prompt": r["prompt"], "completion": r["demonstration"]} for r in train_rows]
        )
        return TaskData(
            train=train_rows,
            sft=sft,
            val=_addition_rows(val).remove_columns("demonstration"),
            tests={
                "addition_id": _addition_rows(test).remove_columns("demonstration"),
                "addition_ood": _addition_rows(ood).remove_columns("demonstration"),
            },
            test_groups={"addition_id": "ID", "addition_ood": "OOD"},
            reward_funcs=[toy.addition_reward],
            max_new_tokens=self.options.max_new_tokens,
            template="raw",
        )

    def prepare_base_model(self, model: Any, tokenizer: Any, seed: int) -> dict[str, Any]:
        """`pretrain_steps` of plain SFT (AdamW, completion tokens only) on the training demonstrations."""
        import torch

        o = self.options
        if o.pretrain_steps == 0:
            return {"pretrain_steps": 0}
        train, _, _, _ = self._splits()
        rng = random.Random(seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=o.pretrain_learning_rate)
        model.train()
        loss = torch.tensor(float("nan"))
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            for _ in range(o.pretrain_steps):
                ids, labels = [], []
                for a, b in (train[rng.randrange(len(train))] for _ in range(o.pretrain_batch_size)):
                    prompt = tokenizer(f"Compute {a} + {b} =")["input_ids"]
                    completion = tokenizer(f" {a + b}. The answer is {a + b}.")["input_ids"] + [
                        tokenizer.eos_token_id
                    ]
                    ids.append(prompt + completion)
                    labels.append([-100] * len(prompt) + completion)
                length = max(map(len, ids))
                pad = tokenizer.pad_token_id
                x = torch.tensor([i + [pad] * (length - len(i)) for i in ids])
                y = torch.tensor([label + [-100] * (length - len(label)) for label in labels])
                loss = model(input_ids=x, attention_mask=(y != -100) | (x != pad), labels=y).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
        return {"pretrain_steps": o.pretrain_steps, "pretrain_final_loss": float(loss.detach())}


# ------------------------------------------------------------------------------------------------ arithmetic


def integer_answer_reward(completions: list, answer: list[str], **kwargs: Any) -> list[float]:
    """1.0 when the last integer in the completion is the gold answer, else 0.0."""
    import re

    from amft_trl._completions import completion_to_text

    out = []
    for completion, gold in zip(completions, answer, strict=True):
        numbers = re.findall(r"-?\d+", completion_to_text(completion).replace(",", ""))
        out.append(1.0 if numbers and numbers[-1] == str(gold) else 0.0)
    return out


class Arithmetic(Task):
    """Chat-formatted arithmetic with exact answers, for a real small model (SmolLM2-135M-Instruct)."""

    name = "arithmetic"
    OPERATIONS: ClassVar[tuple[str, ...]] = ("add", "sum3", "mul")

    @dataclass
    class Options:
        operation: str = "add"
        min_operand: int = 0
        max_operand: int = 99
        ood_max_operand: int = 999
        num_train: int = 1000
        num_val: int = 30
        num_test: int = 100
        num_ood: int = 100
        instruction: str = "Answer with just the number."
        max_new_tokens: int = 24
        seed: int = 0

    def check(self) -> None:
        o = self.options
        if o.operation not in self.OPERATIONS:
            raise TaskError(
                f"task 'arithmetic': operation must be one of {list(self.OPERATIONS)}, got {o.operation!r}."
            )
        if not 0 <= o.min_operand <= o.max_operand < o.ood_max_operand:
            raise TaskError(
                "task 'arithmetic': needs 0 <= min_operand <= max_operand < ood_max_operand, got "
                f"{o.min_operand}, {o.max_operand}, {o.ood_max_operand}."
            )

    def _problem(self, rng: random.Random, high: int, low: int = 0) -> tuple[str, int]:
        op = self.options.operation
        if op == "add":
            a, b = rng.randint(low, high), rng.randint(low, high)
            return f"What is {a} + {b}?", a + b
        if op == "sum3":
            a, b, c = (rng.randint(low, high) for _ in range(3))
            return f"What is {a} + {b} + {c}?", a + b + c
        a, b = rng.randint(low, high), rng.randint(2, 9)
        return f"What is {a} * {b}?", a * b

    def _rows(self, n: int, rng: random.Random, seen: set, high: int, low: int = 0) -> list[dict]:
        rows, tries = [], 0
        while len(rows) < n:
            tries += 1
            if tries > 100 * n:
                raise TaskError(
                    f"task 'arithmetic': cannot draw {n} distinct problems with operands up to {high}; lower the "
                    "set sizes or raise max_operand."
                )
            question, value = self._problem(rng, high, low)
            if question in seen:
                continue
            seen.add(question)
            text = f"{question} {self.options.instruction}"
            rows.append(
                {
                    "prompt": [{"role": "user", "content": text}],
                    "answer": str(value),
                    "demonstration": [
                        {
                            "role": "assistant",
                            "content": f"{question[8:-1]} = {value}. The answer is {value}.",
                        }
                    ],
                }
            )
        return rows

    def build(self) -> TaskData:
        o = self.options
        rng, seen = random.Random(o.seed), set()
        test = self._rows(o.num_test, rng, seen, o.max_operand, o.min_operand)
        val = self._rows(o.num_val, rng, seen, o.max_operand, o.min_operand)
        train = self._rows(o.num_train, rng, seen, o.max_operand, o.min_operand)
        ood = self._rows(o.num_ood, rng, seen, o.ood_max_operand, low=o.max_operand + 1)

        def prompts(rows: list[dict]) -> Dataset:
            return Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])

        return TaskData(
            train=Dataset.from_list(train),
            sft=Dataset.from_list([{"prompt": r["prompt"], "completion": r["demonstration"]} for r in train]),
            val=prompts(val),
            tests={f"{o.operation}_id": prompts(test), f"{o.operation}_ood": prompts(ood)},
            test_groups={f"{o.operation}_id": "ID", f"{o.operation}_ood": "OOD"},
            reward_funcs=[integer_answer_reward],
            max_new_tokens=o.max_new_tokens,
        )


# ------------------------------------------------------------------------------------------------ General Points


class GeneralPoints(Task):
    """The AMFT paper's card game; `num_cards=3, target=10` is the CPU-sized variant of `make demo`."""

    name = "general_points"

    @dataclass
    class Options:
        num_cards: int = 4
        target: int = 24
        num_train: int = 500
        num_val: int = 40
        num_test: int = 100
        conversational: bool = True
        max_new_tokens: int = 128
        seed: int = 0

    def build(self) -> TaskData:
        from amft_trl.rewards import general_points_reward
        from amft_trl.tasks import build_general_points_datasets

        o = self.options
        try:
            data = build_general_points_datasets(
                o.num_train,
                o.num_val,
                o.num_test,
                seed=o.seed,
                num_cards=o.num_cards,
                target=o.target,
                conversational=o.conversational,
            )
        except ValueError as error:
            raise TaskError(f"task 'general_points': {error}") from None
        return TaskData(
            train=data.rl,  # its `demonstration` column is None for unsolvable hands: HPT skips those prompts
            sft=data.sft,
            val=data.validation,
            tests={"general_points_id": data.eval_id, "general_points_ood": data.eval_ood},
            test_groups={"general_points_id": "ID", "general_points_ood": "OOD"},
            reward_funcs=[general_points_reward],
            max_new_tokens=o.max_new_tokens,
        )


# ------------------------------------------------------------------------------------------------ math (GPU recipe)


class Math(Task):
    """OpenR1-Math-46k-8192 (prompts for RL, worked solutions for SFT), scored on named evaluation benchmarks."""

    name = "math"

    @dataclass
    class Options:
        dataset: str = "Elliott/Openr1-Math-46k-8192"
        num_train: int | None = None  # a seeded subset of the training rows (None: all)
        validation_size: int = 500
        conversational: bool = True
        benchmarks: str = "math,ood"  # `amft_trl.evaluation` names, groups or NAME=FILE pairs
        num_samples: int | None = None  # None: the evaluation's per-benchmark defaults (avg@32 on AIME, ...)
        max_new_tokens: int = 8192
        seed: int = 0

    def build(self) -> TaskData:
        from amft_trl.evaluation import BENCHMARK_GROUPS
        from amft_trl.math_data import build_math_datasets, load_math_dataset
        from amft_trl.rewards import math_accuracy_reward

        o = self.options
        source = load_math_dataset(o.dataset) if isinstance(o.dataset, str) else o.dataset
        if o.num_train is not None:
            if o.num_train + o.validation_size > len(source):
                raise TaskError(
                    f"task 'math': num_train + validation_size = {o.num_train + o.validation_size} exceeds the "
                    f"{len(source)} rows of {o.dataset!r}."
                )
            source = source.shuffle(seed=o.seed).select(range(o.num_train + o.validation_size))
        data = build_math_datasets(
            source, validation_size=o.validation_size, seed=o.seed, conversational=o.conversational
        )
        names: list[str] = []
        for item in (s.strip() for s in o.benchmarks.split(",") if s.strip()):
            names.extend(BENCHMARK_GROUPS.get(item, [item]))
        groups = {
            n.split("=")[0]: ("OOD" if n.split("=")[0] in BENCHMARK_GROUPS.get("ood", ()) else "ID")
            for n in names
        }
        settings = {} if o.num_samples is None else {"num_samples": o.num_samples}
        return TaskData(
            train=data.rl,
            sft=data.sft,
            val=data.validation,
            tests={n.split("=")[0]: n for n in names},
            test_groups=groups,
            reward_funcs=[math_accuracy_reward],
            max_new_tokens=o.max_new_tokens,
            eval_settings=settings,
        )


TASKS: dict[str, type[Task]] = {t.name: t for t in (ToyAddition, Arithmetic, GeneralPoints, Math)}


def build_task(name: str, options: dict[str, Any] | None = None) -> Task:
    """The task registered under `name` with its options; a `TaskError` naming what is wrong otherwise."""
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}.")
    try:
        return TASKS[name](**(options or {}))
    except TypeError as error:
        raise TaskError(f"task {name!r}: {error}") from None
