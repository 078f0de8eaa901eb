"""The SFT stream (own seeded sampler, resumable) and the padded batch layout."""

from __future__ import annotations

import torch

from amft_trl.sft_data import InfiniteStream, collate_sft


def test_stream_covers_each_pass_once_and_reshuffles():
    stream = InfiniteStream(10, seed=3)
    first, second = stream.take(10), stream.take(10)
    assert sorted(first) == sorted(second) == list(range(10))
    assert first != second, "a new permutation per pass"
    assert InfiniteStream(10, seed=3).take(20) == first + second, "deterministic for a seed"


def test_stream_never_touches_the_global_rng():
    """The SFT draws must not perturb the RL stream's randomness (generation sampling, GRPO's shuffles)."""
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    stream = InfiniteStream(7, seed=1)
    stream.take(25)
    assert torch.equal(torch.rand(3), expected)


def test_stream_resumes_exactly_from_its_state():
    straight = InfiniteStream(7, seed=5)
    straight.take(11)
    rest = straight.take(9)
    interrupted = InfiniteStream(7, seed=5)
    interrupted.take(11)
    resumed = InfiniteStream(7, seed=5)
    resumed.load_state_dict(interrupted.state_dict())
    assert resumed.take(9) == rest


def test_collate_lays_out_like_grpo_rollouts():
    batch = collate_sft(
        [
            {"prompt_ids": [5, 6, 7], "completion_ids": [8]},
            {"prompt_ids": [9], "completion_ids": [10, 11, 12]},
        ],
        pad_token_id=0,
    )
    assert batch.prompt_ids.tolist() == [[5, 6, 7], [0, 0, 9]]  # left-padded
    assert batch.prompt_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch.completion_ids.tolist() == [[8, 0, 0], [10, 11, 12]]  # right-padded
    assert batch.completion_mask.tolist() == [[1, 0, 0], [1, 1, 1]]
    assert batch.num_tokens == 4


# ------------------------------------------------------------------------------ demonstration formats (issue 13)

import json  # noqa: E402

import pytest  # noqa: E402
from datasets import Dataset, load_dataset  # noqa: E402

from amft_trl.sft_data import check_sft_columns, tokenize_sft_dataset  # noqa: E402

USER = [{"role": "user", "content": "1+1?"}]
ASSISTANT = [{"role": "assistant", "content": "2"}]
ACCEPTED = "Accepted formats:"


def _check_error(dataset) -> str:
    with pytest.raises(ValueError) as info:
        check_sft_columns(dataset)
    return str(info.value)


def _tokenize_error(dataset, tokenizer, max_length=64) -> str:
    with pytest.raises(ValueError) as info:
        tokenize_sft_dataset(dataset, tokenizer, max_length)
    return str(info.value)


def test_valid_formats_pass(tokenizer):
    standard = Dataset.from_dict({"prompt": ["1+1?"], "completion": ["2"]})
    conversational = Dataset.from_dict({"prompt": [USER], "completion": [ASSISTANT]})
    messages = Dataset.from_dict({"messages": [USER + ASSISTANT]})
    for dataset in (standard, conversational, messages):
        check_sft_columns(dataset)
        tokenized, dropped = tokenize_sft_dataset(dataset, tokenizer, 64)
        assert dropped == 0 and len(tokenized) == 1 and tokenized[0]["completion_ids"]


def test_conversational_prompt_with_plain_string_completion(tokenizer):
    dataset = Dataset.from_dict({"prompt": [USER, USER], "completion": ["2", "3"]})
    for message in (_check_error(dataset), _tokenize_error(dataset, tokenizer)):
        assert "`sft_dataset`" in message and "row 0" in message
        assert "`prompt` is conversational" in message and "`completion` is standard" in message
        assert ACCEPTED in message


def test_plain_string_prompt_with_conversational_completion(tokenizer):
    dataset = Dataset.from_dict({"prompt": ["1+1?"], "completion": [ASSISTANT]})
    for message in (_check_error(dataset), _tokenize_error(dataset, tokenizer)):
        assert (
            "row 0" in message
            and "`prompt` is standard" in message
            and "`completion` is conversational" in message
        )


def test_rows_of_mixed_formats_in_one_file(tmp_path, tokenizer):
    """A JSON Lines file whose rows disagree loads with `Json` columns: each row is checked."""
    rows = [
        {"prompt": "1+1?", "completion": "2"},
        {"prompt": USER, "completion": ASSISTANT},
        {"prompt": USER, "completion": "2"},
    ]
    path = tmp_path / "demos.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    dataset = load_dataset("json", data_files=str(path), split="train")
    for message in (_check_error(dataset), _tokenize_error(dataset, tokenizer)):
        assert (
            "row 2" in message
            and "`prompt` is conversational" in message
            and "`completion` is standard" in message
        )
    # Rows that agree within themselves are fine, and the plain string "2" stays a string (datasets' `Json` type
    # would decode it as the number 2).
    agreeing = dataset.select([0, 1])
    check_sft_columns(agreeing)
    tokenized, dropped = tokenize_sft_dataset(agreeing, tokenizer, 64)
    assert dropped == 0 and tokenizer.decode(tokenized[0]["completion_ids"]) == "2" + tokenizer.eos_token
    assert "2" in tokenizer.decode(tokenized[1]["completion_ids"])


def test_missing_and_empty_values_name_their_row():
    nulls = Dataset.from_list([{"prompt": "a", "completion": "b"}, {"prompt": None, "completion": "c"}])
    message = _check_error(nulls)
    assert "row 1" in message and "`prompt` is missing (null)" in message
    empty = Dataset.from_dict({"prompt": [USER, [], USER], "completion": [ASSISTANT, ASSISTANT, ASSISTANT]})
    assert "row 1" in _check_error(empty) and "`prompt` is an empty list" in _check_error(empty)
    # a shuffled or selected view is checked through its own row order
    assert "row 0" in _check_error(empty.select([1, 0]))


def test_messages_must_end_with_the_assistant_completion(tokenizer):
    conversations = [USER + ASSISTANT, USER + ASSISTANT, USER + ASSISTANT + USER]
    dataset = Dataset.from_dict({"messages": conversations})
    for message in (_check_error(dataset), _tokenize_error(dataset, tokenizer)):
        assert (
            "row 2" in message and "`messages`" in message and "'user'" in message and "assistant" in message
        )


def test_unsupported_column_types_are_named():
    strings = Dataset.from_dict({"messages": [["hi", "there"]]})
    assert "`messages`" in _check_error(strings) and ACCEPTED in _check_error(strings)
    single_message = Dataset.from_dict({"prompt": [USER], "completion": [ASSISTANT[0]]})
    message = _check_error(single_message)
    assert "`completion`" in message and "role" in message and ACCEPTED in message
    numbers = Dataset.from_dict({"prompt": [1], "completion": [2]})
    assert "`prompt`" in _check_error(numbers)


def test_an_empty_sft_dataset_is_refused_by_name(tokenizer):
    empty = Dataset.from_dict({"prompt": [], "completion": []})
    for message in (_check_error(empty), _tokenize_error(empty, tokenizer)):
        assert "`sft_dataset` is empty" in message
    named = pytest.raises(ValueError, match="`demos` is empty")
    with named:
        check_sft_columns(empty, name="demos")


def test_a_max_sft_length_that_drops_every_demonstration_says_what_to_set(tokenizer):
    dataset = Dataset.from_dict({"prompt": ["1+1? " * 5, "2+2? " * 8], "completion": ["2", "4"]})
    message = _tokenize_error(dataset, tokenizer, max_length=3)
    assert "all 2 demonstrations" in message and "max_sft_length=3" in message
    assert "`sft_dataset`" in message and "prompts alone take" in message
