"""An offline toy setup: a tokenizer trained on the fly, a tiny random Qwen2, and an addition task.

Used by `make demo` and by the test-suite fixtures (`tests/conftest.py`), so both run with no hub access.
Nothing here is meant to be a good model: it is small enough to train for a few hundred steps on a laptop CPU.
"""

from __future__ import annotations

import random
import re

from amft_trl._completions import completion_to_text

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]


def _corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [
        f"Compute {a} + {b} = {a + b}. The answer is {a + b}."
        for a, b in ((rng.randint(0, 20), rng.randint(0, 20)) for _ in range(n))
    ]


def build_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer trained in about a second on arithmetic text, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|end|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(tokenizer, seed: int = 0, hidden_size: int = 32, num_layers: int = 2):
    """A tiny random Qwen2 (about 30k parameters at the defaults) sized to `tokenizer`."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    return AutoModelForCausalLM.from_config(config)


def addition_prompts(n: int, seed: int, conversational: bool = False, max_operand: int = 20):
    """RL / validation prompts `Compute a + b =` with the gold sum in column `answer`."""
    from datasets import Dataset

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        prompt = f"Compute {a} + {b} ="
        rows.append(
            {
                "prompt": [{"role": "user", "content": prompt}] if conversational else prompt,
                "answer": str(a + b),
            }
        )
    return Dataset.from_list(rows)


def addition_demos(n: int, seed: int, conversational: bool = False, max_operand: int = 20):
    """SFT demonstrations for the addition task, in TRL's prompt-completion format."""
    from datasets import Dataset

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        prompt, completion = f"Compute {a} + {b} =", f" {a + b}. The answer is {a + b}."
        if conversational:
            prompt = [{"role": "user", "content": prompt}]
            completion = [{"role": "assistant", "content": completion}]
        rows.append({"prompt": prompt, "completion": completion})
    return Dataset.from_list(rows)


def addition_reward(completions: list, answer: list[str], **kwargs) -> list[float]:
    """1.0 when the first number in the completion is the gold sum, else 0.0."""
    out = []
    for completion, gold in zip(completions, answer, strict=True):
        match = re.search(r"-?\d+", completion_to_text(completion))
        out.append(1.0 if match is not None and match.group() == gold else 0.0)
    return out


def digit_fraction_reward(completions: list, **kwargs) -> list[float]:
    """A dense toy reward (fraction of digit characters), so advantages are non-zero even on a random model."""
    out = []
    for completion in completions:
        text = completion_to_text(completion)
        out.append(sum(ch.isdigit() for ch in text) / max(len(text), 1))
    return out
