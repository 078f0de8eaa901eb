"""Eq. 25 as the trainer implements it, checked against finite differences (float64).

One meta step is run through `AMFTTrainer`. We record the batches it used (the RL rollouts, the SFT batch, the
validation rollouts) and then, independently of the trainer's gradient buffers, evaluate the validation surrogate
`U(theta(mu))` with `theta(mu) = theta_0 - alpha * ((1 - mu) grad L_RL + mu grad L_SFT)`, one SGD step. The central
difference in mu must match the g_mu the trainer logged. The same run checks that the optimizer stepped on exactly
`(1 - mu) grad L_RL + mu grad L_SFT` (SGD, no clipping): validation gradients never leak into the update.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import digit_fraction_reward, make_config, make_demos, make_prompts
from transformers import AutoModelForCausalLM

from amft_trl import AMFTTrainer

ALPHA = (
    1e-4  # small: Eq. 25 takes grad U at theta_0, the finite difference at theta(mu); they differ by O(alpha)
)


@pytest.fixture
def recorded_meta_step(tmp_path, tiny_model_dir, tokenizer, prompts, demos, val_prompts):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
    theta0 = copy.deepcopy(model.state_dict())
    args = make_config(
        tmp_path,
        max_steps=1,
        learning_rate=ALPHA,
        lr_scheduler_type="constant",
        optim="sgd",
        max_grad_norm=0.0,
        weight_decay=0.0,
        mu_init=0.3,
        meta_learning_rate=0.1,
        meta_gradient_form="raw",
        entropy_learning_rate=0.0,
        meta_update_steps=1,
        max_completion_length=6,
    )
    trainer = AMFTTrainer(
        model=model,
        reward_funcs=[digit_fraction_reward],
        args=args,
        train_dataset=prompts,
        sft_dataset=demos,
        val_dataset=val_prompts,
        processing_class=tokenizer,
    )
    rollouts, sft_batches = [], []
    original_generate = trainer._generate_and_score_completions
    original_sft = trainer._sft_micro_step

    def generate(inputs):
        out = original_generate(inputs)
        rollouts.append(out)
        return out

    def sft_step(model, batch, weight, plan):
        sft_batches.append((batch, plan.sft_tokens))
        return original_sft(model, batch, weight, plan)

    trainer._generate_and_score_completions = generate
    trainer._sft_micro_step = sft_step
    trainer.train()
    assert len(rollouts) == 2, "one training generation and one validation generation"
    # the meta step generates its validation rollouts first (grad U is taken before the RL and SFT backward passes)
    val_out, rl_inputs = rollouts
    return trainer, theta0, [rl_inputs, val_out], sft_batches


def _losses(trainer, model, rl_inputs, sft_batches, val_out):
    """L_RL, L_SFT and the validation utility surrogate U at the model's current parameters."""
    l_rl = trainer._compute_loss(model, rl_inputs)
    l_sft = 0.0
    for batch, tokens in sft_batches:
        logps, _ = trainer.sft_term.token_stats(model, batch, compute_entropy=False)
        l_sft = l_sft - (logps * batch.completion_mask).sum() / tokens
    return l_rl, l_sft, validation_utility(model, val_out)


def validation_utility(model, val_out) -> torch.Tensor:
    """The policy-gradient surrogate of U (Eq. 4) from a plain float64 forward, independent of TRL's fused head."""
    ids = torch.cat([val_out["prompt_ids"], val_out["completion_ids"]], 1)
    mask = torch.cat([val_out["prompt_mask"], val_out["completion_mask"]], 1)
    c = val_out["completion_ids"].size(1)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, -c - 1 : -1].double()
    logps = torch.log_softmax(logits, -1).gather(-1, val_out["completion_ids"].unsqueeze(-1)).squeeze(-1)
    cmask = val_out["completion_mask"]
    return (val_out["advantages"].unsqueeze(1) * logps * cmask).sum() / cmask.sum()


def test_meta_gradient_matches_finite_differences(recorded_meta_step):
    trainer, theta0, rollouts, sft_batches = recorded_meta_step
    rl_inputs, val_out = rollouts[0], rollouts[1]
    logged = [h for h in trainer.state.log_history if "amft/meta_gradient" in h][0]
    g_trainer = logged["amft/meta_gradient"]
    mu = logged["amft/mu"]
    assert mu == pytest.approx(0.3)

    model = trainer.model
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.load_state_dict(theta0)
    l_rl, l_sft, _ = _losses(trainer, model, rl_inputs, sft_batches, val_out)
    g_rl = torch.autograd.grad(l_rl, trainable)
    g_sft = torch.autograd.grad(l_sft, trainable)

    def utility_after_sgd_step(m: float) -> float:
        with torch.no_grad():
            for p, p0, gr, gs in zip(
                trainable, [theta0[n] for n, _ in model.named_parameters()], g_rl, g_sft
            ):
                p.copy_(p0 - ALPHA * ((1 - m) * gr + m * gs))
            _, _, u = _losses(trainer, model, rl_inputs, sft_batches, val_out)
        return float(u)

    eps = 0.25  # theta(mu) is linear in mu, so a wide central difference stays accurate
    fd = (utility_after_sgd_step(mu + eps) - utility_after_sgd_step(mu - eps)) / (2 * eps)
    assert abs(fd) > 1e-9, "degenerate check: the surrogate does not depend on mu"
    assert g_trainer == pytest.approx(fd, rel=2e-3)
    # and with the wrong sign, or alpha missing, it would not match
    assert not (-g_trainer == pytest.approx(fd, rel=0.5))


def test_optimizer_steps_on_the_combined_gradient_only(recorded_meta_step):
    trainer, theta0, rollouts, sft_batches = recorded_meta_step
    model = trainer.model
    theta1 = {n: p.detach().clone() for n, p in model.named_parameters()}
    mu = 0.3
    model.load_state_dict(theta0)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    l_rl, l_sft, _ = _losses(trainer, model, rollouts[0], sft_batches, rollouts[1])
    total = torch.autograd.grad((1 - mu) * l_rl + mu * l_sft, [p for _, p in trainable])
    for (name, _), g in zip(trainable, total):
        expected = theta0[name] - ALPHA * g
        torch.testing.assert_close(theta1[name], expected, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("mu_init", [0.3, 0.0, 1.0], ids=["mixed", "sft-weight-0", "rl-weight-0"])
def test_one_buffer_meta_step_equals_the_diagnostic_two_buffer_one(
    tmp_path, tiny_model_dir, tokenizer, mu_init
):
    """The default meta step keeps only grad U and reads each backward's contribution as a difference of inner
    products (or, for a term of weight 0, on an emptied .grad put back after). `meta_diagnostics` keeps the RL and
    SFT gradients apart instead. Both must give the same g_mu, the same update, and only the latter the cosine."""
    runs = {}
    for diagnostics in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
        args = make_config(
            tmp_path / str(diagnostics),
            max_steps=2,
            gradient_accumulation_steps=2,
            per_device_train_batch_size=2,
            num_generations=2,
            optim="sgd",
            mu_init=mu_init,
            mu_min=0.0,
            mu_max=1.0,
            meta_learning_rate=0.1,
            meta_gradient_form="raw",
            entropy_learning_rate=0.0,
            meta_update_steps=1,
            meta_diagnostics=diagnostics,
        )
        trainer = AMFTTrainer(
            model=model,
            reward_funcs=[digit_fraction_reward],
            args=args,
            train_dataset=make_prompts(16, seed=1),
            sft_dataset=make_demos(16, seed=2),
            val_dataset=make_prompts(8, seed=3),
            processing_class=tokenizer,
        )
        trainer.train()
        runs[diagnostics] = trainer
    lean, diag = runs[False], runs[True]
    g_lean, g_diag = history(lean, "amft/meta_gradient"), history(diag, "amft/meta_gradient")
    assert len(g_lean) == 2 and all(g != 0 for g in g_lean)
    # float64 weights, but TRL's fused log-prob head backpropagates partly in float32: a backward taken at weight 0.7
    # and one taken at 1 and scaled after round differently (~1e-7), which the small <grad U, d> amplifies
    assert g_lean == pytest.approx(g_diag, rel=1e-5)
    assert not g_lean == pytest.approx([-g for g in g_diag], rel=0.5)
    for (name, a), (_, b) in zip(lean.model.named_parameters(), diag.model.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9, msg=name)
    assert not history(lean, "amft/meta_cosine") and len(history(diag, "amft/meta_cosine")) == 2


def history(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h]
