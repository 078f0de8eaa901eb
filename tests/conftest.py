"""Offline fixtures shared by the tests: a tokenizer trained on the fly, a tiny random Qwen2, toy data.

Nothing here touches a hub. The model is saved once per session to a temporary directory, so every test loads
identical weights by path (which also lets GRPO build its reference model from that path when beta > 0).
"""

from __future__ import annotations

import os
import random

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]


def _corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        lines.append(f"Compute {a} + {b} = {a + b}. The answer is {a + b}.")
    return lines


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|end|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(tokenizer, seed: int = 0):
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    return AutoModelForCausalLM.from_config(config)


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


def digit_fraction_reward(completions, **kwargs) -> list[float]:
    """A dense toy reward (fraction of digit characters), so advantages are non-zero on a random model."""
    out = []
    for c in completions:
        text = c if isinstance(c, str) else c[-1]["content"]
        out.append(sum(ch.isdigit() for ch in text) / max(len(text), 1))
    return out


def make_prompts(n: int, seed: int, conversational: bool = False):
    from datasets import Dataset

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        prompt = f"Compute {a} + {b} ="
        rows.append(
            {
                "prompt": [{"role": "user", "content": prompt}] if conversational else prompt,
                "answer": str(a + b),
            }
        )
    return Dataset.from_list(rows)


def make_demos(n: int, seed: int, conversational: bool = False):
    from datasets import Dataset

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        prompt, completion = f"Compute {a} + {b} =", f" {a + b}. The answer is {a + b}."
        if conversational:
            rows.append(
                {
                    "prompt": [{"role": "user", "content": prompt}],
                    "completion": [{"role": "assistant", "content": completion}],
                }
            )
        else:
            rows.append({"prompt": prompt, "completion": completion})
    return Dataset.from_list(rows)


@pytest.fixture
def prompts():
    return make_prompts(32, seed=1)


@pytest.fixture
def demos():
    return make_demos(32, seed=2)


@pytest.fixture
def val_prompts():
    return make_prompts(16, seed=3)


def make_config(output_dir, **overrides):
    """A small, fast, deterministic AMFTConfig for CPU tests."""
    from amft_trl import AMFTConfig

    kwargs = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        max_steps=3,
        learning_rate=1e-2,
        report_to="none",
        use_cpu=True,
        bf16=False,
        logging_steps=1,
        save_strategy="no",
        seed=42,
        sft_warmup_steps=0,
        meta_update_steps=2,
        meta_val_batch_size=2,
        target_entropy_num_samples=8,
        max_sft_length=64,
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    return AMFTConfig(**kwargs)
