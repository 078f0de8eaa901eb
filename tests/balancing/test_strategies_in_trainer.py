"""The balancing strategies inside AMFTTrainer, on the tiny model: weight trajectories, the weights on hand-built
batches, GRPO equivalence of the RL stage, the two-phase schedule, and exact resume."""

from __future__ import annotations

import re
import shutil

import pytest
import torch
from conftest import build_trainer, digit_fraction_reward, grpo_kwargs, make_config, make_demos, make_prompts
from datasets import Dataset
from transformers import TrainerCallback
from trl import GRPOTrainer

from amft_trl import AMFTTrainer
from amft_trl.balancing.chord import chord_mu
from amft_trl.balancing.srft import srft_rollout_advantages
from amft_trl.sft_data import collate_sft
from amft_trl.trainer import _StepState


def build(tmp_path, tiny_model_dir, tokenizer, reward_funcs=None, **overrides):
    return build_trainer(tmp_path, tiny_model_dir, tokenizer, reward_funcs, **overrides)


def logged(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h]


def params(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def assert_same_parameters(a, b, exact=True):
    for (name, x), (_, y) in zip(a.model.named_parameters(), b.model.named_parameters(), strict=True):
        if exact:
            torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)
        else:
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=name)


# ---- fixed and sft_then_rl ---------------------------------------------------------------------------------------
def test_fixed_mu_after_the_warmup(tmp_path, tiny_model_dir, tokenizer):
    trainer = build(
        tmp_path, tiny_model_dir, tokenizer, balancing="fixed", mu_init=0.3, sft_warmup_steps=2, max_steps=4
    )
    before = params(trainer)
    trainer.train()
    assert logged(trainer, "amft/mu") == [1.0, 1.0, 0.3, 0.3]
    assert len(logged(trainer, "amft/rl_loss")) == 2 and len(logged(trainer, "amft/sft_loss")) == 4
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())


def test_sft_then_rl_draws_no_sft_batch_after_the_switch(tmp_path, tiny_model_dir, tokenizer):
    trainer = build(
        tmp_path, tiny_model_dir, tokenizer, balancing="sft_then_rl", sft_warmup_steps=2, max_steps=4
    )
    generated_at, drawn_at = [], []
    generate, draw = trainer._generate_and_score_completions, trainer.sft_term.draw

    def spy_generate(inputs):
        generated_at.append(trainer.state.global_step)
        return generate(inputs)

    def spy_draw(n):
        drawn_at.append(trainer.state.global_step)
        return draw(n)

    trainer._generate_and_score_completions, trainer.sft_term.draw = spy_generate, spy_draw
    trainer.train()
    assert drawn_at == [0, 1] and sorted(set(generated_at)) == [2, 3]
    assert logged(trainer, "amft/mu") == [1.0, 1.0, 0.0, 0.0]
    assert len(logged(trainer, "amft/sft_loss")) == 2


GRPO_COMMON = grpo_kwargs(max_steps=4)


def _sft_then_rl(folder, tiny_model_dir, tokenizer, **overrides):
    """2 SFT steps then 2 GRPO steps, GRPO_COMMON's settings."""
    return build(
        folder,
        tiny_model_dir,
        tokenizer,
        balancing="sft_then_rl",
        sft_warmup_steps=2,
        max_steps=4,
        seed=42,
        **overrides,
    )


def _grpo_resumed_from(tmp_path, tiny_model_dir, tokenizer, checkpoint, **overrides):
    from trl import GRPOConfig, GRPOTrainer

    grpo = GRPOTrainer(
        model=tiny_model_dir,
        reward_funcs=[digit_fraction_reward],
        args=GRPOConfig(output_dir=str(tmp_path / "grpo"), **{**GRPO_COMMON, **overrides}),
        train_dataset=make_prompts(32, seed=1),
        processing_class=tokenizer,
    )
    grpo.train(resume_from_checkpoint=str(checkpoint))
    return grpo


def test_sft_then_rl_rl_steps_equal_grpo_trainer_from_the_same_state(tmp_path, tiny_model_dir, tokenizer):
    """After the switch every step is GRPOTrainer's, bit for bit: GRPOTrainer resumed from AMFT's checkpoint at the
    switch (weights, optimizer, schedule, RNG, data position) ends on the same parameters."""
    amft = _sft_then_rl(tmp_path / "amft", tiny_model_dir, tokenizer, save_strategy="steps", save_steps=2)
    amft.train()
    at_switch = torch.load(tmp_path / "amft" / "checkpoint-2" / "optimizer.pt", weights_only=False)
    assert at_switch["state"], "the checkpoint at the switch must carry the warm-up's optimizer state"
    grpo = _grpo_resumed_from(tmp_path, tiny_model_dir, tokenizer, tmp_path / "amft" / "checkpoint-2")
    assert_same_parameters(amft, grpo)


def test_reset_optimizer_after_warmup_is_a_fresh_grpo_trainer(tmp_path, tiny_model_dir, tokenizer):
    """With `reset_optimizer_after_warmup`, the RL stage equals a GRPOTrainer that starts from the SFT stage's
    weights with a fresh optimizer and schedule (the checkpoint without optimizer.pt / scheduler.pt)."""
    amft = _sft_then_rl(
        tmp_path / "amft",
        tiny_model_dir,
        tokenizer,
        save_strategy="steps",
        save_steps=2,
        lr_scheduler_type="constant",
        reset_optimizer_after_warmup=True,
    )
    amft.train()
    fresh = tmp_path / "fresh-checkpoint"
    shutil.copytree(tmp_path / "amft" / "checkpoint-2", fresh)
    (fresh / "optimizer.pt").unlink()
    (fresh / "scheduler.pt").unlink()
    grpo = _grpo_resumed_from(tmp_path, tiny_model_dir, tokenizer, fresh, lr_scheduler_type="constant")
    assert_same_parameters(amft, grpo)
    # and without the reset the two differ (the comparison is not vacuous)
    kept = _sft_then_rl(tmp_path / "kept", tiny_model_dir, tokenizer, lr_scheduler_type="constant")
    kept.train()
    assert any(not torch.equal(a, b) for a, b in zip(kept.model.parameters(), grpo.model.parameters()))


class LearningRates(TrainerCallback):
    def __init__(self):
        self.values = []

    def on_step_begin(self, args, state, control, lr_scheduler=None, **kwargs):
        self.values.append(lr_scheduler.get_last_lr()[0])


def test_warmup_learning_rate_gets_its_own_schedule(tmp_path, tiny_model_dir, tokenizer):
    trainer = build(
        tmp_path,
        tiny_model_dir,
        tokenizer,
        balancing="sft_then_rl",
        sft_warmup_steps=2,
        max_steps=6,
        learning_rate=1e-2,
        sft_warmup_learning_rate=5e-2,
        lr_scheduler_type="linear",
        warmup_steps=0,
    )
    lrs = LearningRates()
    trainer.add_callback(lrs)
    trainer.train()
    # warm-up: linear from 5e-2 over 2 steps; then linear from 1e-2 over the remaining 4
    assert lrs.values == pytest.approx([5e-2, 2.5e-2, 1e-2, 7.5e-3, 5e-3, 2.5e-3])


def test_reset_optimizer_clears_the_state_at_the_switch(tmp_path, tiny_model_dir, tokenizer):
    trainer = build(
        tmp_path,
        tiny_model_dir,
        tokenizer,
        balancing="fixed",
        mu_init=0.5,
        sft_warmup_steps=2,
        max_steps=3,
        reset_optimizer_after_warmup=True,
    )
    trainer.train()
    optimizer = trainer.optimizer.optimizer
    steps = {float(s["step"]) for s in optimizer.state.values()}
    assert steps == {1.0}, f"Adam's step count after one post-warm-up step: {steps}"


# ---- CHORD -------------------------------------------------------------------------------------------------------
def test_chord_logs_its_schedule(tmp_path, tiny_model_dir, tokenizer):
    trainer = build(
        tmp_path,
        tiny_model_dir,
        tokenizer,
        balancing="chord",
        chord_mu_warmup_steps=2,
        chord_mu_decay_steps=3,
        chord_mu_peak=0.6,
        chord_mu_valley=0.1,
        max_steps=6,
    )
    trainer.train()
    expected = [chord_mu(t, 2, 3, 0.6, 0.1) for t in range(6)]
    assert logged(trainer, "amft/chord_mu") == pytest.approx(expected)
    assert logged(trainer, "amft/mu") == pytest.approx(expected)
    assert len(logged(trainer, "amft/sft_loss")) == 5  # step 0 has mu = 0: no SFT batch, no SFT forward


def _sft_gradient(trainer, batch, weight, tokens):
    """The gradient one SFT micro-step leaves in `.grad`, for a step of `tokens` demonstration tokens."""
    trainer.model.zero_grad(set_to_none=True)
    plan = trainer.strategy.plan(10_000)
    step = _StepState(plan, sft_tokens=tokens)
    trainer._sft_micro_step(trainer.model, batch, weight, step)
    return [p.grad.detach().clone() for p in trainer.model.parameters()], step


def _reference_gradient(trainer, batch, token_weight_fn, weight, tokens):
    trainer.model.zero_grad(set_to_none=True)
    logps, entropies = trainer.sft_term.token_stats(trainer.model, batch, compute_entropy=True)
    mask = batch.completion_mask.float()
    w = token_weight_fn(logps.detach(), entropies.detach(), mask)
    loss = weight * -(logps * w * mask).sum() / tokens
    loss.backward()
    return [p.grad.detach().clone() for p in trainer.model.parameters()]


def test_chord_phi_weights_each_demonstration_token(tmp_path, tiny_model_dir, tokenizer):
    trainer = build(
        tmp_path,
        tiny_model_dir,
        tokenizer,
        balancing="chord",
        chord_mu_warmup_steps=0,
        chord_mu_decay_steps=0,
        chord_mu_peak=0.4,
        chord_mu_valley=0.4,
        chord_enable_phi_function=True,
    )
    batch = collate_sft([trainer.sft_dataset[i] for i in range(3)], tokenizer.pad_token_id)
    got, step = _sft_gradient(trainer, batch, 0.4, tokens=batch.num_tokens)

    def phi(logps, entropies, mask):
        p = logps.exp()
        return p * (1 - p)

    expected = _reference_gradient(trainer, batch, phi, 0.4, batch.num_tokens)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)
    unweighted = _reference_gradient(
        trainer, batch, lambda lp, en, m: torch.ones_like(lp), 0.4, batch.num_tokens
    )
    assert any(not torch.allclose(g, u) for g, u in zip(got, unweighted, strict=True))
    # amft/mu reports the mean effective weight: mu times the token mean of phi
    assert step.sft.weight / step.sft.tokens < 0.4


# ---- SRFT --------------------------------------------------------------------------------------------------------
def test_srft_weights_each_demonstration_by_its_entropy(tmp_path, tiny_model_dir, tokenizer):
    trainer = build(tmp_path, tiny_model_dir, tokenizer, balancing="srft")
    batch = collate_sft([trainer.sft_dataset[i] for i in range(3)], tokenizer.pad_token_id)
    got, _ = _sft_gradient(trainer, batch, 1.0, tokens=batch.num_tokens)

    def srft(logps, entropies, mask):
        h = (entropies * mask).sum(-1) / mask.sum(-1)
        return (0.5 * torch.exp(-h)).unsqueeze(1).expand_as(logps)

    expected = _reference_gradient(trainer, batch, srft, 1.0, batch.num_tokens)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)


def test_srft_gives_grpo_its_rollout_advantages(tmp_path, tiny_model_dir, tokenizer, monkeypatch):
    """TRL's GRPO loss reads SRFT's advantages, computed from the entropies of that loss's own forward."""
    trainer = build(tmp_path, tiny_model_dir, tokenizer, balancing="srft", max_steps=1)
    seen = []
    compute_loss, stats = GRPOTrainer._compute_loss, trainer._get_per_token_logps_and_entropies

    def spy_stats(*args, **kwargs):
        out = stats(*args, **kwargs)
        seen.append(("stats", out[1]))
        return out

    def spy_loss(self, model, inputs):  # TRL's loss, as AMFTTrainer._compute_loss calls it
        seen.append(("before", inputs["advantages"].clone()))
        loss = compute_loss(self, model, inputs)
        seen.append(("used", inputs["advantages"].clone(), inputs["amft_reward"], inputs["completion_mask"]))
        return loss

    monkeypatch.setattr(GRPOTrainer, "_compute_loss", spy_loss)
    trainer._get_per_token_logps_and_entropies = spy_stats
    trainer.train()
    kinds = [s[0] for s in seen]
    i = kinds.index("used")
    entropies = [s[1] for s in seen[:i] if s[0] == "stats"][-1]
    _, used, rewards, mask = seen[i]
    expected = srft_rollout_advantages(rewards, entropies, mask, coef=0.1)
    torch.testing.assert_close(used, expected)
    assert (rewards > 0).any(), "no positive rollout: the check would be one-sided"
    grpo_advantages = [s[1] for s in seen[:i] if s[0] == "before"][-1]
    assert not torch.allclose(used, grpo_advantages)


# ---- HPT ---------------------------------------------------------------------------------------------------------
def _parity_prompts(n: int, seed: int) -> Dataset:
    rows = []
    for row in make_prompts(n, seed=seed):
        demonstration = f" {row['answer']}. The answer is {row['answer']}."
        rows.append({**row, "demonstration": demonstration, "parity": _operand(row["prompt"]) % 2})
    return Dataset.from_list(rows)


def parity_reward(completions, parity, **kwargs):
    """1.0 on every rollout of an even prompt; below 1 (varied) on odd ones: HPT sends exactly the odd ones to SFT."""
    varied = digit_fraction_reward(completions)
    return [1.0 if p == 0 else 0.9 * v for p, v in zip(parity, varied, strict=True)]


def test_hpt_sends_the_failing_prompts_to_their_demonstrations(tmp_path, tiny_model_dir, tokenizer):
    trainer = build(
        tmp_path,
        tiny_model_dir,
        tokenizer,
        reward_funcs=[parity_reward],
        balancing="hpt",
        max_steps=3,
        per_device_train_batch_size=16,  # 4 prompts x 4 rollouts per step
        train_dataset=_parity_prompts(32, seed=1),
    )
    assert trainer.sft_dataset is not None  # unused by HPT here (no warm-up)
    seen, sft_batches = [], []
    rl_advantages, sft_step = trainer.strategy.rl_advantages, trainer._sft_micro_step

    def spy_advantages(rollouts):
        used = rl_advantages(rollouts)
        seen.append((trainer.state.global_step, rollouts, rollouts.advantages.clone(), used))
        return used

    def spy_sft(model, batch, weight, step, row_weights=None, normalizer=None):
        sft_batches.append((trainer.state.global_step, batch, row_weights))
        return sft_step(model, batch, weight, step, row_weights, normalizer)

    trainer.strategy.rl_advantages, trainer._sft_micro_step = spy_advantages, spy_sft
    trainer.train()
    fractions = logged(trainer, "amft/hpt_sft_fraction")
    # amft/mu: the SFT weight applied, hpt_sft_coef (1) on a step that trains a demonstration, else 0
    assert len(fractions) == 3 and logged(trainer, "amft/mu") == [1.0 if f > 0 else 0.0 for f in fractions]
    gated_somewhere = False
    for step, rollouts, grpo, used in seen:
        odd = torch.tensor([_operand(p) % 2 == 1 for p in rollouts.prompts])
        gated_somewhere |= bool(odd.any())
        assert torch.all(used[odd] == 0), "a failing prompt's rollouts must not train the RL term"
        torch.testing.assert_close(used[~odd], grpo[~odd])
        assert not torch.all(grpo[odd] == 0), "GRPO's advantages were already 0: the check would be vacuous"
        demos = [
            tokenizer.decode(b.completion_ids[r][b.completion_mask[r].bool()])
            for s, b, w in sft_batches
            if s == step
            for r in range(len(w))
            if w[r] > 0
        ]
        # one demonstration per failing prompt (the step is one micro-step here, holding every group whole)
        prompts = {p: d for p, d, o in zip(rollouts.prompts, rollouts.demonstrations, odd) if o}
        assert sorted(demos) == sorted(d + tokenizer.eos_token for d in prompts.values())
        assert fractions[step] == pytest.approx(len(prompts) / len(set(rollouts.prompts)))
    assert gated_somewhere, "no prompt was gated: the check would be vacuous"


def test_hpt_meters_each_pass_over_its_demonstrations(tmp_path, tiny_model_dir, tokenizer):
    """`amft/sft_tokens` (amft-compare's budget) counts the demonstration tokens the loss was taken on: with
    num_iterations=2 every gated demonstration is trained twice, so counted twice."""
    trainer = build(
        tmp_path,
        tiny_model_dir,
        tokenizer,
        reward_funcs=[parity_reward],
        balancing="hpt",
        max_steps=4,
        num_iterations=2,
        per_device_train_batch_size=16,
        train_dataset=_parity_prompts(32, seed=1),
    )
    trained, sft_step = [], trainer._sft_micro_step

    def spy_sft(model, batch, weight, step, row_weights=None, normalizer=None):
        weights = torch.ones(batch.loss_mask.size(0)) if row_weights is None else row_weights
        trained.append(float((batch.loss_mask.sum(1).float() * (weights > 0)).sum()))
        return sft_step(model, batch, weight, step, row_weights, normalizer)

    trainer._sft_micro_step = spy_sft
    trainer.train()
    assert sum(trained) > 0
    assert logged(trainer, "amft/sft_tokens")[-1] == sum(trained)


def test_luffy_meters_each_pass_over_its_demonstrations(tmp_path, tiny_model_dir, tokenizer):
    """The same for LUFFY's off-policy rows: with num_iterations=2 each is in the loss twice."""
    prompts = make_prompts(32, seed=1)
    prompts = prompts.add_column("demonstration", [f" {a}. The answer is {a}." for a in prompts["answer"]])
    trainer = build(
        tmp_path,
        tiny_model_dir,
        tokenizer,
        balancing="luffy",
        max_steps=4,
        num_iterations=2,
        train_dataset=prompts,
    )
    trained, loss_term = [], trainer._luffy.loss_term

    def spy(logps, inputs, advantages):
        off = inputs["amft_off_policy"].unsqueeze(1)
        trained.append(float((inputs["completion_mask"] * off).sum()))
        return loss_term(logps, inputs, advantages)

    trainer._luffy.loss_term = spy
    trainer.train()
    assert sum(trained) > 0
    assert logged(trainer, "amft/sft_tokens")[-1] == sum(trained)


def _operand(prompt: str) -> int:
    return int(re.search(r"Compute (\d+)", prompt).group(1))


def test_hpt_needs_its_demonstration_column(tmp_path, tiny_model_dir, tokenizer):
    with pytest.raises(ValueError, match=r"train_dataset\['target'\].*hpt_demonstration_column"):
        build(tmp_path, tiny_model_dir, tokenizer, balancing="hpt", hpt_demonstration_column="target")


# ---- exact resume, every strategy --------------------------------------------------------------------------------
class StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


STRATEGY_CASES = {
    "fixed": dict(balancing="fixed", mu_init=0.4, sft_warmup_steps=1),
    "sft_then_rl": dict(balancing="sft_then_rl", sft_warmup_steps=2, reset_optimizer_after_warmup=True),
    "chord": dict(
        balancing="chord", chord_mu_warmup_steps=1, chord_mu_decay_steps=2, chord_enable_phi_function=True
    ),
    "srft": dict(balancing="srft"),
    "hpt": dict(balancing="hpt", hpt_success_reward=0.95),
}


@pytest.mark.parametrize("name", list(STRATEGY_CASES))
def test_every_strategy_resumes_exactly(tmp_path, tiny_model_dir, tokenizer, name):
    case = dict(STRATEGY_CASES[name], max_steps=4, save_strategy="steps", save_steps=2)
    rewards = [parity_reward] if name == "hpt" else None

    def trainer(folder):
        return build(
            tmp_path / folder,
            tiny_model_dir,
            tokenizer,
            reward_funcs=rewards,
            train_dataset=_parity_prompts(32, 1),
            **case,
        )

    straight = trainer("a")
    straight.train()
    first = trainer("b")
    first.add_callback(StopAt(2))
    first.train()
    second = trainer("b")
    second.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    assert logged(second, "amft/mu") == pytest.approx(
        logged(straight, "amft/mu")
    )  # history: restored + resumed
    assert_same_parameters(straight, second, exact=False)


# ---- a strategy written outside the package (the README's worked example) ------------------------------
from typing import Any, ClassVar  # noqa: E402

from amft_trl.balancing.base import MuStrategy  # noqa: E402


class LinearDecay(MuStrategy):
    """mu falls linearly from `linear_mu_start` to 0 over `linear_mu_steps` steps after the warm-up."""

    name: ClassVar[str] = "linear"
    config_fields: ClassVar[tuple[str, ...]] = ("linear_mu_start", "linear_mu_steps")

    def __init__(self, start: float, steps: int, sft_warmup_steps: int = 0):
        super().__init__(sft_warmup_steps=sft_warmup_steps)
        self.start, self.steps = start, steps

    @classmethod
    def from_config(cls, args: Any) -> LinearDecay:
        return cls(args.linear_mu_start, args.linear_mu_steps, args.sft_warmup_steps)

    @classmethod
    def check_config(cls, args: Any) -> None:  # called by AMFTConfig.__post_init__: name the field
        if not 0.0 <= args.linear_mu_start <= 1.0:
            raise ValueError(f"`linear_mu_start` must be in [0, 1], got {args.linear_mu_start!r}.")

    def mu_at(self, global_step: int) -> float:
        return self.start * max(0.0, 1.0 - (global_step - self.sft_warmup_steps) / self.steps)


def test_a_strategy_passed_as_an_instance(tmp_path, tiny_model_dir, tokenizer):
    trainer = AMFTTrainer(
        model=tiny_model_dir,
        reward_funcs=[digit_fraction_reward],
        args=make_config(tmp_path, max_steps=5, save_strategy="steps", save_steps=5),
        train_dataset=make_prompts(16, seed=1),
        sft_dataset=make_demos(16, seed=2),
        processing_class=tokenizer,
        strategy=LinearDecay(0.8, 4, sft_warmup_steps=1),
    )
    trainer.train()
    assert logged(trainer, "amft/mu") == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])
    state = (tmp_path / "checkpoint-5" / "amft_state.json").read_text()
    assert '"balancing": "linear"' in state
