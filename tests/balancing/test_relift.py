"""balancing="relift" (arXiv 2506.07527): GRPO, and an SFT step on the buffered all-failed prompts when the buffer is
full. The buffer fills only from all-failed prompts (a hand-built batch); the SFT step fires when and only when the
buffer is full, trains on the buffered demonstrations and generates nothing; the buffer survives a resume exactly;
bad fields are named at construction."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import build_trainer, make_config, make_prompts
from datasets import Dataset
from transformers import TrainerCallback

from amft_trl.balancing.relift import ReLIFTStrategy, all_failed


def _operand(prompt: str) -> int:
    return int(re.search(r"Compute (\d+)", prompt).group(1))


def relift_prompts(n: int = 32, seed: int = 1) -> Dataset:
    rows = []
    for row in make_prompts(n, seed=seed):
        demonstration = f" {row['answer']}. The answer is {row['answer']}."
        rows.append({**row, "demonstration": demonstration, "parity": _operand(row["prompt"]) % 2})
    return Dataset.from_list(rows)


def parity_reward(completions, parity, **kwargs):
    """0 (a failure) on every rollout of an odd prompt, 1 on an even one."""
    return [0.0 if p else 1.0 for p in parity]


def build(tmp_path, tiny_model_dir, tokenizer, **overrides):
    overrides.setdefault("train_dataset", relift_prompts())
    overrides.setdefault("per_device_train_batch_size", 8)  # 2 prompts x 4 rollouts per step
    return build_trainer(
        tmp_path, tiny_model_dir, tokenizer, [parity_reward], balancing="relift", **overrides
    )


def logged(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h]


def test_all_failed_by_hand():
    nan = float("nan")
    rewards = torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, nan, 0.0], [-1.0, 0.0, -0.5]])
    assert all_failed(rewards, 0.0).tolist() == [True, False, False, True]
    assert all_failed(rewards, 1.0).tolist() == [True, True, False, True]


def test_buffer_fills_only_from_all_failed_prompts(tmp_path, tiny_model_dir, tokenizer):
    """A hand-built generation batch of 4 groups: all failed, one success, one unscorable rollout, all below the
    fail value. Only the first and the last are buffered, in batch order, and a later batch goes in front."""
    from amft_trl.trainer import rollout_rewards

    trainer = build(tmp_path, tiny_model_dir, tokenizer)
    data = trainer.train_dataset
    rows = [data[i] for i in range(4) for _ in range(4)]
    nan = float("nan")
    group = [[0.0] * 4, [0.0, 1.0, 0.0, 0.0], [0.0, nan, 0.0, 0.0], [-1.0, 0.0, -0.5, 0.0]]
    rewards = rollout_rewards(
        torch.tensor([r for g in group for r in g]).unsqueeze(1), trainer.reward_weights
    )
    trainer._relift.fill(rows, rewards)
    expected = [(data[i]["prompt"], data[i]["demonstration"]) for i in (0, 3)]
    assert trainer.strategy.buffer == expected
    later = [data[i] for i in (5, 6) for _ in range(4)]
    trainer._relift.fill(later, torch.tensor([0.0] * 4 + [1.0] * 4))
    assert trainer.strategy.buffer == [(data[5]["prompt"], data[5]["demonstration"]), *expected]


def test_sft_step_fires_when_and_only_when_the_buffer_is_full(tmp_path, tiny_model_dir, tokenizer):
    trainer = build(tmp_path, tiny_model_dir, tokenizer, relift_buffer_size=2, max_steps=8)
    strategy = trainer.strategy
    plans, generated_at, sft_prompts = [], [], []
    plan, generate, batches = (
        strategy.plan,
        trainer._generate_and_score_completions,
        trainer._relift.sft_batches,
    )

    def spy_plan(step):
        before = list(strategy.buffer)
        chosen = plan(step)
        plans.append((step, before, chosen.sft, chosen.rl))
        return chosen

    def spy_generate(inputs):
        generated_at.append(trainer.state.global_step)
        return generate(inputs)

    def spy_batches(examples, num_micro):
        sft_prompts.append((trainer.state.global_step, [p for p, _ in examples]))
        out = batches(examples, num_micro)
        decoded = [
            tokenizer.decode(ids[m.bool()])
            for b in out
            for ids, m in zip(b.completion_ids, b.completion_mask)
        ]
        assert decoded == [d + tokenizer.eos_token for _, d in examples]
        return out

    strategy.plan, trainer._generate_and_score_completions, trainer._relift.sft_batches = (
        spy_plan,
        spy_generate,
        spy_batches,
    )
    trainer.train()
    sft_steps = [s for s, _, sft, _ in plans if sft]
    assert sft_steps and len(sft_steps) < len(plans), plans  # both kinds of step happened
    for step, before, sft, rl in plans:
        assert sft == (len(before) >= 2) and rl == (not sft), (step, before)
        if sft:  # the newest two buffered prompts, taken out of the buffer
            assert (step, [p for p, _ in before[:2]]) in sft_prompts
    assert sorted(set(generated_at)) == [s for s, _, sft, _ in plans if not sft]
    assert logged(trainer, "amft/relift_sft_step") == [float(sft) for _, _, sft, _ in plans]
    assert logged(trainer, "amft/mu") == [float(sft) for _, _, sft, _ in plans]
    assert len(logged(trainer, "amft/sft_loss")) == len(sft_steps)
    assert logged(trainer, "amft/relift_sft_steps")[-1] == len(sft_steps)


class StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def test_resume_is_exact_with_the_buffer_in_the_checkpoint(tmp_path, tiny_model_dir, tokenizer):
    case = dict(relift_buffer_size=2, max_steps=8, save_strategy="steps", save_steps=3)
    straight = build(tmp_path / "a", tiny_model_dir, tokenizer, **case)
    straight.train()
    first = build(tmp_path / "b", tiny_model_dir, tokenizer, **case)
    first.add_callback(StopAt(3))
    first.train()
    buffered = list(first.strategy.buffer)
    second = build(tmp_path / "b", tiny_model_dir, tokenizer, **case)
    second.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-3"))
    steps = logged(straight, "amft/relift_sft_step")
    assert 1.0 in steps[3:], f"no SFT step after the resume point: the check would be vacuous ({steps})"
    assert buffered, "the buffer was empty at the checkpoint: the check would be vacuous"
    for key in ("amft/relift_sft_step", "amft/relift_buffer_fill", "amft/relift_sft_steps", "amft/mu"):
        assert logged(second, key) == logged(straight, key), key
    assert second.strategy.buffer == straight.strategy.buffer
    for (name, a), (_, b) in zip(
        straight.model.named_parameters(), second.model.named_parameters(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_state_round_trip_and_corrupt_state():
    strategy = ReLIFTStrategy(buffer_size=2)
    strategy.add_failed([("p", "d"), ([{"role": "user", "content": "q"}], "e")])
    strategy.sft_steps = 3
    other = ReLIFTStrategy(buffer_size=2)
    other.load_state_dict(strategy.state_dict())
    assert other.buffer == strategy.buffer and other.sft_steps == 3
    with pytest.raises(ValueError, match="'buffer' must be a list of"):
        other.load_state_dict({"buffer": [["only one"]], "sft_steps": 0})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(relift_buffer_size=0), r"`relift_buffer_size` must be an integer >= 1"),
        (dict(relift_fail_reward="x"), r"`relift_fail_reward` must be a number"),
        (dict(relift_demonstration_column=""), r"needs `relift_demonstration_column`"),
    ],
)
def test_bad_fields_are_named_at_construction(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config(tmp_path, balancing="relift", **overrides)


def test_buffer_size_must_split_over_accumulation(tmp_path, tiny_model_dir, tokenizer):
    with pytest.raises(ValueError, match=r"`relift_buffer_size` \(3\) must be divisible by processes x"):
        build(tmp_path, tiny_model_dir, tokenizer, relift_buffer_size=3, gradient_accumulation_steps=2)


def test_missing_demonstration_column_is_named(tmp_path, tiny_model_dir, tokenizer):
    with pytest.raises(ValueError, match=r"train_dataset\['target'\].*relift_demonstration_column"):
        build(tmp_path, tiny_model_dir, tokenizer, relift_demonstration_column="target")
