"""GRPOConfig options keep working under AMFTTrainer (each run: a few steps, parameters move, AMFT metrics logged)."""

from __future__ import annotations

import pytest
import torch
from conftest import digit_fraction_reward, make_config, make_prompts

from amft_trl import AMFTTrainer


def run(tmp_path, tiny_model_dir, tokenizer, demos, val_prompts, **overrides):
    kwargs = {k: overrides.pop(k) for k in ("peft_config", "eval_dataset") if k in overrides}
    args = make_config(tmp_path, max_steps=3, meta_update_steps=2, **overrides)
    trainer = AMFTTrainer(
        model=tiny_model_dir,
        reward_funcs=[digit_fraction_reward],
        args=args,
        train_dataset=make_prompts(32, seed=1),
        sft_dataset=demos,
        val_dataset=val_prompts,
        processing_class=tokenizer,
        **kwargs,
    )
    trainable = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    moved = [
        n for n, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(trainable[n], p)
    ]
    assert moved, "no trainable parameter changed"
    logged = set().union(*[h.keys() for h in trainer.state.log_history])
    assert {"amft/mu", "amft/sft_loss", "amft/rl_loss", "amft/meta_gradient", "amft/entropy"} <= logged
    return trainer


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "bnpo", "dapo"])
def test_loss_types(tmp_path, tiny_model_dir, tokenizer, demos, val_prompts, loss_type):
    run(tmp_path, tiny_model_dir, tokenizer, demos, val_prompts, loss_type=loss_type)


def test_reference_model_kl(tmp_path, tiny_model_dir, tokenizer, demos, val_prompts):
    trainer = run(tmp_path, tiny_model_dir, tokenizer, demos, val_prompts, beta=0.04)
    assert any("kl" in h for h in trainer.state.log_history)


def test_reused_generations(tmp_path, tiny_model_dir, tokenizer, demos, val_prompts):
    """num_iterations > 1 and steps_per_generation > gradient_accumulation_steps (buffered rollouts)."""
    run(
        tmp_path,
        tiny_model_dir,
        tokenizer,
        demos,
        val_prompts,
        num_iterations=2,
        steps_per_generation=2,
        per_device_train_batch_size=2,
        num_generations=2,
    )


def test_lora_meta_gradient_over_trainable_parameters(
    tmp_path, tiny_model_dir, tokenizer, demos, val_prompts
):
    from peft import LoraConfig

    trainer = run(
        tmp_path,
        tiny_model_dir,
        tokenizer,
        demos,
        val_prompts,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        learning_rate=1e-2,
    )
    assert trainer._trainable_params and all(
        "lora" in n for n, p in trainer.model.named_parameters() if p.requires_grad
    )
    assert all(g is not None for g in trainer.state.log_history if "amft/meta_gradient" in g)


def test_evaluation_loss_is_not_weighted(tmp_path, tiny_model_dir, tokenizer, demos, val_prompts):
    trainer = run(
        tmp_path,
        tiny_model_dir,
        tokenizer,
        demos,
        val_prompts,
        eval_dataset=make_prompts(8, seed=9),
        eval_strategy="steps",
        eval_steps=3,
        per_device_eval_batch_size=4,
    )
    assert any("eval_loss" in h for h in trainer.state.log_history)
    trainer._rl_weight = 0.0  # a stale weight must not leak into evaluation
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] != 0.0
