"""Tests of amft_trl.math_data on small local fixtures written in the OpenR1-Math-46k-8192 and plain
problem/solution/answer schemas (no network)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import Dataset

from amft_trl.math_data import (
    DEFAULT_INSTRUCTION,
    build_math_datasets,
    detect_math_schema,
    load_math_dataset,
    math_rl_prompts,
    math_sft_pairs,
    split_validation,
)
from amft_trl.rewards import math_accuracy_reward

FIXTURES = Path(__file__).parent / "fixtures"
OPENR1 = FIXTURES / "openr1_math_sample.jsonl"
PLAIN = FIXTURES / "math_problem_solution_sample.jsonl"
OPENR1_COLUMNS = ["data_source", "prompt", "target", "ability", "reward_model", "extra_info"]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def openr1() -> Dataset:
    return load_math_dataset(str(OPENR1))


@pytest.fixture(scope="module")
def plain() -> Dataset:
    return load_math_dataset(str(PLAIN))


def test_load_math_dataset_hub_id_goes_to_load_dataset(monkeypatch):
    calls = []
    monkeypatch.setattr("datasets.load_dataset", lambda *args, **kwargs: calls.append((args, kwargs)) or "ds")
    assert load_math_dataset() == "ds"
    assert load_math_dataset("someone/math", split="test", revision="main") == "ds"
    assert calls == [
        (("Elliott/Openr1-Math-46k-8192",), {"split": "train"}),
        (("someone/math",), {"split": "test", "revision": "main"}),
    ]


def test_fixtures_load_with_the_published_schema(openr1, plain):
    assert openr1.column_names == OPENR1_COLUMNS
    assert openr1[0]["prompt"][0]["role"] == "system" and openr1[0]["prompt"][1]["role"] == "user"
    assert openr1[0]["target"][0]["role"] == "assistant"
    assert set(openr1[0]["reward_model"]) == {"ground_truth", "style"}
    assert detect_math_schema(openr1) == "openr1"
    assert detect_math_schema(plain) == "problem_solution"


@pytest.mark.parametrize("conversational", [False, True], ids=["standard", "conversational"])
def test_openr1_rl_prompts(openr1, conversational):
    rows = read_jsonl(OPENR1)
    rl = math_rl_prompts(openr1, conversational=conversational)
    assert rl.column_names == ["prompt", "solution", "demonstration"]
    assert list(rl["solution"]) == [r["reward_model"]["ground_truth"] for r in rows]
    for prompt, demonstration, row in zip(rl["prompt"], rl["demonstration"], rows):
        problem = row["prompt"][1]["content"]
        if conversational:
            assert [m["role"] for m in prompt] == ["user"]  # the dataset's system prompt is dropped
            prompt = prompt[0]["content"]
            assert demonstration[0]["role"] == "assistant"
            demonstration = demonstration[0]["content"]
        assert prompt == f"{problem}\n\n{DEFAULT_INSTRUCTION}"
        assert demonstration == row["target"][0]["content"]  # what HPT imitates


@pytest.mark.parametrize("conversational", [False, True], ids=["standard", "conversational"])
def test_openr1_sft_pairs(openr1, conversational):
    rows = read_jsonl(OPENR1)
    sft = math_sft_pairs(openr1, conversational=conversational, instruction=None)
    assert sft.column_names == ["prompt", "completion"]
    for example, row in zip(sft, rows):
        completion = example["completion"]
        if conversational:
            assert completion[0]["role"] == "assistant"
            completion = completion[0]["content"]
            assert example["prompt"][-1]["content"] == row["prompt"][1]["content"]
        else:
            assert example["prompt"] == row["prompt"][1]["content"]
        assert completion == row["target"][0]["content"]


@pytest.mark.parametrize("source", ["openr1", "plain"])
def test_sft_demonstrations_earn_the_math_reward_against_rl_golds(source, openr1, plain):
    dataset = openr1 if source == "openr1" else plain
    rl, sft = math_rl_prompts(dataset), math_sft_pairs(dataset)
    golds = list(rl["solution"])
    assert math_accuracy_reward(list(sft["completion"]), golds) == [1.0] * len(golds)
    rotated = golds[1:] + golds[:1]  # a demonstration against another problem's answer
    assert math_accuracy_reward(list(sft["completion"]), rotated) == [0.0] * len(golds)


def test_plain_schema(plain):
    rows = read_jsonl(PLAIN)
    rl = math_rl_prompts(plain, instruction="Answer in a box.", system_prompt="You are a mathematician.")
    assert list(rl["solution"]) == [r["answer"] for r in rows]
    assert rl[0]["prompt"] == f"You are a mathematician.\n\n{rows[0]['problem']}\n\nAnswer in a box."
    conv = math_rl_prompts(plain, conversational=True, system_prompt="You are a mathematician.")
    assert [m["role"] for m in conv[0]["prompt"]] == ["system", "user"]
    sft = math_sft_pairs(plain)
    assert list(sft["completion"]) == [r["solution"] for r in rows]


def test_plain_schema_without_answer_column_uses_last_boxed(plain):
    no_answer = plain.remove_columns("answer")
    assert list(math_rl_prompts(no_answer)["solution"]) == list(plain["answer"])


def test_instruction_is_not_appended_twice():
    ds = Dataset.from_list([{"problem": f"What is 1+1? {DEFAULT_INSTRUCTION}", "solution": r"\boxed{2}"}])
    assert math_rl_prompts(ds)[0]["prompt"] == f"What is 1+1? {DEFAULT_INSTRUCTION}"


def test_rows_without_gold_or_demonstration_are_dropped():
    rows = read_jsonl(OPENR1)[:3]
    rows[0]["reward_model"]["ground_truth"] = ""
    rows[1]["target"] = None
    ds = Dataset.from_list(rows)
    assert len(math_rl_prompts(ds)) == 2
    assert len(math_sft_pairs(ds)) == 2
    plain_rows = [{"problem": "p", "solution": "no box here"}, {"problem": "q", "solution": r"so \boxed{3}"}]
    assert list(math_rl_prompts(Dataset.from_list(plain_rows))["solution"]) == ["3"]


@pytest.mark.parametrize(
    ("columns", "call", "missing"),
    [
        (["data_source", "prompt", "target"], math_rl_prompts, "reward_model"),
        (["data_source", "prompt", "reward_model"], math_sft_pairs, "target"),
        (["data_source", "ability"], math_rl_prompts, "problem"),
        (["question", "answer"], math_sft_pairs, "problem"),
        (["problem", "answer"], math_sft_pairs, "solution"),
    ],
    ids=["openr1-rl", "openr1-sft", "unknown", "question-answer", "plain-sft"],
)
def test_missing_column_names_it_and_lists_the_columns(columns, call, missing):
    ds = Dataset.from_dict({name: ["x"] for name in columns})
    with pytest.raises(ValueError) as info:
        call(ds)
    message = str(info.value)
    assert repr(missing) in message
    for name in columns:
        assert repr(name) in message


def test_explicit_schema_is_checked(openr1):
    with pytest.raises(ValueError, match="'problem'"):
        math_rl_prompts(openr1, schema="problem_solution")
    with pytest.raises(ValueError, match="schema must be one of"):
        math_rl_prompts(openr1, schema="gsm8k")


def test_split_validation_is_deterministic_and_disjoint(openr1):
    train, val = split_validation(openr1, 3, seed=0)
    train2, val2 = split_validation(openr1, 3, seed=0)
    assert list(val["extra_info"]) == list(val2["extra_info"])
    assert list(train["extra_info"]) == list(train2["extra_info"])
    ids = lambda d: {row["index"] for row in d["extra_info"]}  # noqa: E731
    assert len(val) == 3 and len(train) == 5
    assert not ids(train) & ids(val) and len(ids(train) | ids(val)) == 8
    others = [ids(split_validation(openr1, 3, seed=s)[1]) for s in range(1, 6)]
    assert any(o != ids(val) for o in others)  # the seed matters
    assert len(split_validation(openr1, 0.25, seed=0)[1]) == 2


@pytest.mark.parametrize("size", [0, 8, 100, 0.0, 1.0, -0.5, "3", True])
def test_split_validation_bad_size(openr1, size):
    with pytest.raises(ValueError, match="validation_size"):
        split_validation(openr1, size)


@pytest.mark.parametrize("conversational", [False, True], ids=["standard", "conversational"])
def test_build_math_datasets_from_a_path(conversational):
    data = build_math_datasets(str(OPENR1), validation_size=2, seed=1, conversational=conversational)
    assert data.rl.column_names == data.validation.column_names == ["prompt", "solution", "demonstration"]
    assert data.sft.column_names == ["prompt", "completion"]
    assert (len(data.rl), len(data.sft), len(data.validation)) == (6, 6, 2)
    text = (lambda p: p[-1]["content"]) if conversational else (lambda p: p)
    train_prompts = {text(p) for p in data.rl["prompt"]}
    assert train_prompts == {text(p) for p in data.sft["prompt"]}
    assert not train_prompts & {text(p) for p in data.validation["prompt"]}
    again = build_math_datasets(str(OPENR1), validation_size=2, seed=1, conversational=conversational)
    assert list(again.validation["solution"]) == list(data.validation["solution"])


def test_build_math_datasets_checks_columns_before_splitting(plain):
    with pytest.raises(ValueError, match="'solution'"):
        build_math_datasets(plain.remove_columns("solution"), validation_size=1)


def test_one_row_file_with_wrong_columns_reports_the_columns_first(tmp_path):
    # a user's one-row file with its own column names: the column error, not "validation_size must be between 1
    # and 0"; `check_math_columns` is what a script calls on its source before splitting it
    from amft_trl.math_data import check_math_columns

    path = tmp_path / "mine.jsonl"
    path.write_text('{"question": "1 + 1?", "answer": "2"}\n')
    source = load_math_dataset(str(path))
    with pytest.raises(ValueError, match=r"missing the column 'problem'.*\['question', 'answer'\]"):
        check_math_columns(source)
    with pytest.raises(ValueError, match=r"missing the column 'problem'"):
        build_math_datasets(str(path), validation_size=500)
    # the split of a one-row file says what is wrong with it, not "between 1 and 0"
    with pytest.raises(ValueError, match="The dataset has 1 row: a validation split needs at least 2"):
        split_validation(source, 500)
    # the roles: RL prompts need only the problem (and a gold answer); SFT pairs need the worked solution too
    plain = Dataset.from_list([{"problem": "1 + 1?", "answer": "2"}])
    assert check_math_columns(plain, roles=("rl",)) == "problem_solution"
    with pytest.raises(ValueError, match="'solution'"):
        check_math_columns(plain)
