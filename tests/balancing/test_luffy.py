"""balancing="luffy" (arXiv 2504.14945): demonstrations as off-policy rollouts in the GRPO group, with policy shaping.

The shaped loss and its gradient against hand computation; TRL's loss normalisers reproduced for every loss type;
the trainer's loss as TRL's on-policy loss plus the shaped off-policy term (value and parameter gradient); the TRL
#2680 objection (a low-probability expert token loses its gradient to PPO's clipping) answered; group advantages on a
hand-built group; no generation spent on the demonstrations; GRPOTrainer bit for bit with no off-policy rollout; exact
resume; validation at construction.
"""

from __future__ import annotations

import pytest
import torch
from conftest import build_trainer, digit_fraction_reward, grpo_kwargs, make_config, make_prompts
from datasets import Dataset
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from amft_trl import AMFTTrainer, _private_api
from amft_trl._completions import completion_to_text
from amft_trl.balancing.luffy import (
    aggregate_token_loss,
    demonstration_completion_ids,
    off_policy_rows,
    off_policy_token_loss,
    shaped_weight,
)
from amft_trl.trainer import RL_LOSS_KEY, RLLossArguments

DEMO = " {answer}. The answer is {answer}."


def luffy_prompts(n: int = 32, seed: int = 1) -> Dataset:
    rows = make_prompts(n, seed=seed)
    return Dataset.from_list([{**r, "demonstration": DEMO.format(answer=r["answer"])} for r in rows])


def build(tmp_path, tiny_model_dir, tokenizer, reward_funcs=None, **overrides):
    overrides.setdefault("train_dataset", luffy_prompts())
    overrides.setdefault("balancing", "luffy")
    return build_trainer(tmp_path, tiny_model_dir, tokenizer, reward_funcs, **overrides)


def _rows(trainer, n_prompts: int = 2):
    data = trainer.train_dataset
    return [data[i] for i in range(n_prompts) for _ in range(trainer.num_generations)]


def _batch(trainer, n_prompts: int = 2):
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by the Trainer's loop in training
    return trainer._generate_and_score_completions(_rows(trainer, n_prompts))


# ---- the formulas -------------------------------------------------------------------------------------------------
def test_shaped_loss_and_gradient_by_hand():
    """f(p) = p / (p + 0.1); d(-A f)/d log p = -A * 0.1 p / (p + 0.1)^2, at p = 0.5, 0.001, 0.9 and A = 2."""
    p = torch.tensor([[0.5, 0.001, 0.9]], dtype=torch.float64)
    logps = p.log().requires_grad_(True)
    loss = off_policy_token_loss(logps, torch.tensor([2.0], dtype=torch.float64), gamma=0.1)
    expected = [-2 * 0.5 / 0.6, -2 * 0.001 / 0.101, -2 * 0.9 / 1.0]
    torch.testing.assert_close(loss[0], torch.tensor(expected, dtype=torch.float64))
    loss.sum().backward()
    hand = [-2 * 0.1 * 0.5 / 0.36, -2 * 0.1 * 0.001 / 0.101**2, -2 * 0.1 * 0.9 / 1.0]
    torch.testing.assert_close(logps.grad[0], torch.tensor(hand, dtype=torch.float64))
    assert shaped_weight(torch.tensor(0.0), 0.1).item() == pytest.approx(1 / 1.1)


def test_off_policy_rows_are_the_first_of_each_group_across_processes():
    assert off_policy_rows(8, 0, 4, 1) == [True, False, False, False] * 2
    assert off_policy_rows(4, 4, 4, 2) == [True, True, False, False]
    assert off_policy_rows(4, 2, 4, 1) == [False, False, True, False]


def test_demonstration_is_cut_like_a_generation():
    assert demonstration_completion_ids([5, 6, 2, 9], [2], None) == [5, 6, 2]  # after the first EOS
    assert demonstration_completion_ids([5, 6, 7, 8], [2], 3) == [5, 6, 7]  # truncated: no EOS


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "luspo", "sapo"])
def test_aggregate_token_loss_is_trls_normaliser(tmp_path, tiny_model_dir, tokenizer, loss_type):
    """With the ratio at 1 TRL's per-token loss is -A (SAPO's: -2 A / tau, tau its temperature for A's sign): its
    loss must equal `aggregate_token_loss` of that."""
    trainer = build(tmp_path, tiny_model_dir, tokenizer, luffy_num_off_policy=0, loss_type=loss_type)
    inputs = _batch(trainer, 3)
    assert inputs["advantages"].abs().sum() > 0
    trainer.loss_type = loss_type
    trl_loss = GRPOTrainer._compute_loss(trainer, trainer.model, dict(inputs))
    advantages = inputs["advantages"]
    if loss_type == "sapo":
        tau = torch.where(
            advantages > 0, trainer.args.sapo_temperature_pos, trainer.args.sapo_temperature_neg
        )
        advantages = advantages * 2 / tau
    ours = aggregate_token_loss(
        -advantages.unsqueeze(1).expand(inputs["completion_mask"].shape),
        inputs["completion_mask"],
        loss_type,
        accumulation_steps=1,
        max_completion_length=trainer.max_completion_length,
        num_items_in_batch=inputs["num_items_in_batch"],
        num_processes=1,
        steps_per_generation=trainer.args.steps_per_generation,
    )
    torch.testing.assert_close(ours, trl_loss.detach(), rtol=1e-5, atol=1e-7)


# ---- the trainer --------------------------------------------------------------------------------------------------
def test_demonstrations_cost_no_generation_and_sit_first_in_each_group(
    tmp_path, tiny_model_dir, tokenizer, monkeypatch
):
    trainer = build(tmp_path, tiny_model_dir, tokenizer, max_completion_length=32)
    generated = []
    original = GRPOTrainer._generate_single_turn

    def spy(self, prompt_ids, images, multimodal_fields, num_generations, *args, **kwargs):
        generated.append((len(prompt_ids), num_generations))
        return original(self, prompt_ids, images, multimodal_fields, num_generations, *args, **kwargs)

    monkeypatch.setattr(GRPOTrainer, "_generate_single_turn", spy)
    out = _batch(trainer, 2)
    assert generated == [(6, 3)], "TRL must generate 3 of each group's 4 rollouts"
    assert out["amft_off_policy"].tolist() == [True, False, False, False] * 2
    for row, index in ((0, 0), (4, 1)):
        ids = out["completion_ids"][row][out["completion_mask"][row].bool()].tolist()
        text = tokenizer.decode(ids, skip_special_tokens=True)
        assert text == trainer.train_dataset[index]["demonstration"]
        assert ids[-1] == tokenizer.eos_token_id


def test_conversational_demonstration_ends_with_the_templates_end_of_turn(
    tmp_path, tiny_model_dir, tokenizer
):
    rows = [
        {**r, "demonstration": DEMO.format(answer=r["answer"])}
        for r in make_prompts(8, seed=1, conversational=True)
    ]
    trainer = build(
        tmp_path, tiny_model_dir, tokenizer, max_completion_length=32, train_dataset=Dataset.from_list(rows)
    )
    out = _batch(trainer, 2)
    ids = out["completion_ids"][0][out["completion_mask"][0].bool()].tolist()
    assert tokenizer.decode(ids) == rows[0]["demonstration"] + "<|end|>"


def test_multi_turn_generation_is_refused(tmp_path, tiny_model_dir, tokenizer):
    def rollout_func(prompts, trainer):
        raise AssertionError("never called")

    with pytest.raises(
        ValueError, match="cannot be combined with `tools`, `environment_factory` or `rollout_func`"
    ):
        AMFTTrainer(
            model=tiny_model_dir,
            reward_funcs=[digit_fraction_reward],
            args=make_config(tmp_path, balancing="luffy"),
            train_dataset=luffy_prompts(8),
            processing_class=tokenizer,
            rollout_func=rollout_func,
        )


def answer_reward(completions, answer, **kwargs):
    """1 when the completion states the gold answer (the demonstration always does; the random model never)."""
    return [
        float(f"The answer is {a}" in completion_to_text(c)) for c, a in zip(completions, answer, strict=True)
    ]


@pytest.mark.parametrize("scale_rewards", ["none", "group"])
def test_group_advantages_include_the_demonstration(tmp_path, tiny_model_dir, tokenizer, scale_rewards):
    """The paper's run (`adv_estimator=grpo`, `grpo_use_std=False`): A = r - mean over the whole group, the
    demonstration included. Rewards [1, 0, 0, 0]: A = [0.75, -0.25, -0.25, -0.25]; with TRL's group std (unbiased,
    0.5) divided in."""
    trainer = build(
        tmp_path,
        tiny_model_dir,
        tokenizer,
        reward_funcs=[answer_reward],
        max_completion_length=32,
        scale_rewards=scale_rewards,
    )
    out = _batch(trainer, 2)
    expected = torch.tensor([0.75, -0.25, -0.25, -0.25] * 2)
    if scale_rewards == "group":
        expected = expected / (0.5 + 1e-4)
    torch.testing.assert_close(out["advantages"], expected)


def _with_luffy(trainer, inputs):
    """A micro-batch as `AMFTTrainer._micro_step` hands it to the loss: with LUFFY's off-policy rows as an argument."""
    return {**inputs, RL_LOSS_KEY: RLLossArguments(weight=1.0, off_policy=trainer._luffy)}


def test_loss_is_trls_on_policy_loss_plus_the_shaped_off_policy_term(tmp_path, tiny_model_dir, tokenizer):
    """Value and parameter gradient: LUFFY's loss = TRL's loss with the demonstrations' advantages zeroed + the sum
    over demonstration tokens of -A p / (p + 0.1), divided by TRL's `dapo` normaliser (tokens of the batch)."""
    trainer = build(tmp_path, tiny_model_dir, tokenizer, max_completion_length=32)
    inputs = _batch(trainer, 2)
    off = inputs["amft_off_policy"]
    assert inputs["advantages"][off].abs().min() > 0
    model = trainer.model

    def grads(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    luffy = trainer._compute_loss(model, _with_luffy(trainer, inputs))
    luffy_grads = grads(luffy)

    on_only = {**inputs, "advantages": inputs["advantages"].masked_fill(off, 0.0)}
    reference = GRPOTrainer._compute_loss(trainer, trainer.model, on_only)
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    logps, _ = _private_api.per_token_logps_and_entropies(
        trainer, model, input_ids, attention, inputs["completion_ids"].size(1)
    )
    p = logps.exp()
    mask = inputs["completion_mask"].float() * off.float().unsqueeze(1)
    hand = (-inputs["advantages"].unsqueeze(1) * p / (p + 0.1) * mask).sum() / inputs["num_items_in_batch"]
    reference = reference + hand
    torch.testing.assert_close(luffy.detach(), reference.detach(), rtol=1e-5, atol=1e-7)
    for a, b in zip(luffy_grads, grads(reference), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert hand.abs() > 0


def test_low_probability_demonstration_keeps_its_gradient_where_ppo_clipping_zeroes_it(
    tmp_path, tiny_model_dir, tokenizer
):
    """TRL #2680's objection: the expert's tokens are unlikely under the policy (here p ~ 1/300), so PPO's importance
    ratio pi_theta / pi_expert (pi_expert = 1: `old_per_token_logps = 0`) sits far below 1 - epsilon and is clipped.
    With a negative advantage TRL's clipped loss gives those tokens exactly zero gradient; with a positive one its
    gradient is scaled by p. LUFFY's shaped, unclipped term keeps a gradient in both cases: per token
    0.1 / (p + 0.1)^2 times the unshaped p-scaled one, about 1 / gamma = 10x at small p."""
    trainer = build(tmp_path, tiny_model_dir, tokenizer, max_completion_length=32)
    inputs = _batch(trainer, 2)
    off = inputs["amft_off_policy"]
    model = trainer.model

    def grad_norm(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return float(torch.sqrt(sum((p.grad**2).sum() for p in model.parameters() if p.grad is not None)))

    for sign in (-1.0, 1.0):
        advantages = torch.where(
            off, torch.full_like(inputs["advantages"], sign), torch.zeros_like(off, dtype=torch.float)
        )
        batch = {**inputs, "advantages": advantages}
        expert = torch.zeros_like(inputs["completion_ids"], dtype=torch.float)  # log pi_expert = 0
        ppo = grad_norm(
            GRPOTrainer._compute_loss(trainer, trainer.model, {**batch, "old_per_token_logps": expert})
        )
        luffy = grad_norm(trainer._compute_loss(model, _with_luffy(trainer, batch)))
        assert luffy > 0
        if sign < 0:
            assert ppo == 0.0, "every demonstration token is clipped: PPO gives it no gradient"
        else:
            assert luffy > 5 * ppo > 0
    trainer._luffy.log_step(trainer._metrics["train"])  # the step's end: its sums as logged ratios
    weights = trainer._metrics["train"]["amft/luffy_off_policy_prob"]
    assert 0 < weights[-1] < 0.05  # the demonstration is indeed unlikely under the random policy


def test_no_off_policy_rollout_is_grpo_trainer_bit_for_bit(tmp_path, tiny_model_dir, tokenizer):
    common = grpo_kwargs(seed=7)
    data = luffy_prompts()
    amft = build(
        tmp_path / "a", tiny_model_dir, tokenizer, luffy_num_off_policy=0, train_dataset=data, **common
    )
    amft.train()
    grpo = GRPOTrainer(
        model=tiny_model_dir,
        reward_funcs=[digit_fraction_reward],
        args=GRPOConfig(output_dir=str(tmp_path / "grpo"), **common),
        train_dataset=data,
        processing_class=tokenizer,
    )
    grpo.train()
    for (name, a), (_, b) in zip(amft.model.named_parameters(), grpo.model.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{name} differs from GRPOTrainer")
    assert not any("luffy" in k for h in amft.state.log_history for k in h)


class StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def test_resume_is_exact(tmp_path, tiny_model_dir, tokenizer):
    case = dict(max_steps=4, save_strategy="steps", save_steps=2, max_completion_length=16)
    straight = build(tmp_path / "a", tiny_model_dir, tokenizer, **case)
    straight.train()
    first = build(tmp_path / "b", tiny_model_dir, tokenizer, **case)
    first.add_callback(StopAt(2))
    first.train()
    second = build(tmp_path / "b", tiny_model_dir, tokenizer, **case)
    second.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))

    def logged(trainer, key):
        return [h[key] for h in trainer.state.log_history if key in h]

    weights = logged(straight, "amft/luffy_importance_weight")
    assert len(weights) == 4
    assert logged(second, "amft/luffy_importance_weight") == pytest.approx(weights)
    for (name, a), (_, b) in zip(
        straight.model.named_parameters(), second.model.named_parameters(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


# ---- validation ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            dict(luffy_num_off_policy=4),
            r"`luffy_num_off_policy` \(4\) must be smaller than `num_generations` \(4\)",
        ),
        (dict(luffy_num_off_policy=-1), r"`luffy_num_off_policy` must be an integer >= 0"),
        (dict(luffy_shaping_gamma=0.0), r"`luffy_shaping_gamma` must be a finite number > 0"),
        (dict(luffy_demonstration_column=""), r"needs `luffy_demonstration_column`"),
    ],
)
def test_bad_fields_are_named_at_construction(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config(tmp_path, balancing="luffy", **overrides)


def test_missing_demonstration_column_is_named(tmp_path, tiny_model_dir, tokenizer):
    with pytest.raises(ValueError, match=r"train_dataset\['target'\].*luffy_demonstration_column"):
        build(tmp_path, tiny_model_dir, tokenizer, luffy_demonstration_column="target")


def test_empty_demonstration_is_refused(tmp_path, tiny_model_dir, tokenizer):
    rows = [dict(r) for r in luffy_prompts(8)]
    rows[0]["demonstration"] = ""
    trainer = build(tmp_path, tiny_model_dir, tokenizer, train_dataset=Dataset.from_list(rows))
    trainer.model.train()
    with pytest.raises(ValueError, match=r"train_dataset\['demonstration'\].*is empty"):
        trainer._generate_and_score_completions([rows[0]] * 4)
