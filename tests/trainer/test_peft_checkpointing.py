"""LoRA adapters with activation checkpointing: the meta-gradient is unchanged by the checkpointing mode, and resumes.

TRL forces reentrant checkpointing for PEFT under ZeRO-3, where `torch.autograd.grad` fails (reentrant checkpoints
only support `.backward()`). AMFT takes every gradient of the meta step with `.backward()` into `.grad` and moves it
into its own buffers, so all three modes (off, non-reentrant, reentrant) must give the same g_mu on the same batch.
Rollouts are deterministic (`_parallel_runner.DeterministicRolloutTrainer`), so only the checkpointing differs.
"""

from __future__ import annotations

import math

import pytest
from _parallel_runner import DeterministicRolloutTrainer
from conftest import digit_fraction_reward, make_config, make_prompts

LORA_TARGETS = ["q_proj", "v_proj"]


def lora_run(tmp_path, tiny_model_dir, tokenizer, demos, val_prompts, checkpointing, **overrides):
    from peft import LoraConfig

    extra = {}
    if checkpointing is not None:
        extra = dict(
            gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": checkpointing}
        )
    args = make_config(
        tmp_path / str(checkpointing),
        max_steps=4,
        meta_update_steps=2,
        sft_warmup_steps=1,
        meta_gradient_form="raw",
        meta_learning_rate=1e4,
        **extra,
        **overrides,
    )
    trainer = DeterministicRolloutTrainer(
        model=tiny_model_dir,
        reward_funcs=[digit_fraction_reward],
        args=args,
        train_dataset=make_prompts(32, seed=1),
        sft_dataset=demos,
        val_dataset=val_prompts,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"),
    )
    return trainer


def meta_gradients(trainer) -> list[float]:
    return [h["amft/meta_gradient"] for h in trainer.state.log_history if "amft/meta_gradient" in h]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir, tokenizer):
    from conftest import make_demos

    trainer = lora_run(
        tmp_path_factory.mktemp("ref"),
        tiny_model_dir,
        tokenizer,
        make_demos(32, seed=2),
        make_prompts(16, seed=3),
        None,
    )
    trainer.train()
    return trainer


def test_meta_gradient_is_over_adapter_parameters_only(reference):
    names = {n for n, p in reference.model.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n for n in names)
    assert len(reference._trainable_params) == len(names)
    grads = meta_gradients(reference)
    assert len(grads) == 2 and all(g != 0 and math.isfinite(g) for g in grads)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_checkpointing_leaves_meta_gradient_unchanged(
    reference, tmp_path, tiny_model_dir, tokenizer, demos, val_prompts, reentrant
):
    trainer = lora_run(tmp_path, tiny_model_dir, tokenizer, demos, val_prompts, reentrant)
    trainer.train()
    base = trainer.model.get_base_model()
    assert base.is_gradient_checkpointing
    layer = base.model.layers[0]
    assert layer._gradient_checkpointing_func.keywords["use_reentrant"] is reentrant
    expected, got = meta_gradients(reference), meta_gradients(trainer)
    assert len(got) == len(expected)
    for e, g in zip(expected, got):
        assert math.isclose(e, g, rel_tol=1e-4), (expected, got)
    mu_ref = [r["mu"] for r in reference.strategy.state.history]
    mu_got = [r["mu"] for r in trainer.strategy.state.history]
    assert mu_got == pytest.approx(mu_ref, rel=1e-6)


@pytest.mark.parametrize("reentrant", [None, True], ids=["no-checkpointing", "reentrant"])
def test_adapter_resume_restores_mu_and_adapters(
    tmp_path, tiny_model_dir, tokenizer, demos, val_prompts, reentrant
):
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                control.should_training_stop = True

    straight = lora_run(tmp_path / "straight", tiny_model_dir, tokenizer, demos, val_prompts, reentrant)
    straight.train()

    kwargs = dict(save_strategy="steps", save_steps=2)
    first = lora_run(tmp_path / "resumed", tiny_model_dir, tokenizer, demos, val_prompts, reentrant, **kwargs)
    first.add_callback(StopAt())
    first.train()
    checkpoint = tmp_path / "resumed" / str(reentrant) / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").exists() and (checkpoint / "amft_state.json").exists()
    second = lora_run(
        tmp_path / "resumed", tiny_model_dir, tokenizer, demos, val_prompts, reentrant, **kwargs
    )
    second.train(resume_from_checkpoint=str(checkpoint))

    mu_straight = [r["mu"] for r in straight.strategy.state.history]
    mu_resumed = [r["mu"] for r in second.strategy.state.history]
    assert mu_resumed == pytest.approx(mu_straight, rel=1e-9, abs=1e-12)
    assert meta_gradients(second)[-1] == pytest.approx(meta_gradients(straight)[-1], rel=1e-6)
    for (n, a), (_, b) in zip(straight.model.named_parameters(), second.model.named_parameters()):
        if a.requires_grad:
            assert b.detach().allclose(a.detach(), rtol=1e-5, atol=1e-7), n
