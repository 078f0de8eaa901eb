"""Offline fixtures shared by the tests: a tokenizer trained on the fly, a tiny random Qwen2, toy data.

Nothing here touches a hub. The model is saved once per session to a temporary directory, so every test loads
identical weights by path (which also lets GRPO build its reference model from that path when beta > 0).
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

from amft_trl.toy import addition_demos as make_demos  # noqa: E402
from amft_trl.toy import addition_prompts as make_prompts  # noqa: E402
from amft_trl.toy import build_model, build_tokenizer, digit_fraction_reward  # noqa: E402

__all__ = ["build_model", "build_tokenizer", "digit_fraction_reward", "make_demos", "make_prompts"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """Path of a saved tiny Qwen2 + tokenizer (identical weights for every test that loads it)."""
    path = tmp_path_factory.mktemp("tiny-qwen2")
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def prompts():
    return make_prompts(32, seed=1)


@pytest.fixture
def demos():
    return make_demos(32, seed=2)


@pytest.fixture
def val_prompts():
    return make_prompts(16, seed=3)


def grpo_kwargs(**overrides) -> dict:
    """The GRPOConfig fields every small CPU run of the tests shares (3 steps of 4 rollouts, one group)."""
    kwargs = dict(
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        max_steps=3,
        learning_rate=1e-2,
        report_to="none",
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        seed=42,
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    return kwargs


def make_config(output_dir, **overrides):
    """A small, fast, deterministic AMFTConfig for CPU tests."""
    from amft_trl import AMFTConfig

    kwargs = dict(
        output_dir=str(output_dir),
        **grpo_kwargs(),
        logging_steps=1,
        sft_warmup_steps=0,
        meta_update_steps=2,
        meta_val_batch_size=2,
        target_entropy_num_samples=8,
        max_sft_length=64,
    )
    kwargs.update(overrides)
    return AMFTConfig(**kwargs)


def build_trainer(tmp_path, model_dir, tokenizer, reward_funcs=None, **overrides):
    """An AMFTTrainer on the tiny model: dataset keywords go to the trainer, everything else to `make_config`.

    Defaults: 32 addition prompts, 32 demonstrations, the dense digit-fraction reward.
    """
    from amft_trl import AMFTTrainer

    datasets = {
        k: overrides.pop(k) for k in ("train_dataset", "sft_dataset", "val_dataset") if k in overrides
    }
    datasets.setdefault("train_dataset", make_prompts(32, seed=1))
    datasets.setdefault("sft_dataset", make_demos(32, seed=2))
    return AMFTTrainer(
        model=model_dir,
        reward_funcs=reward_funcs or [digit_fraction_reward],
        args=make_config(tmp_path, **overrides),
        processing_class=tokenizer,
        **datasets,
    )
