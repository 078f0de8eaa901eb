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
