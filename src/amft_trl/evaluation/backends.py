"""Generation backends: vLLM on a GPU, transformers `generate` everywhere else.

Both take the same prompt token ids (rendered once by the evaluation, with the chat template applied as text
and tokenised without extra special tokens) and the same `SamplingSettings`, and return decoded completions
without special tokens. Every sampling parameter is passed explicitly (top-k off, no repetition penalty), so
neither the model's `generation_config.json` nor a library default changes the distribution on one backend
only: greedy decoding gives the same completions on both, up to floating-point ties.

A backend is any object with `name`, `generate(prompt_ids, n, settings, seed) -> list[list[str]]` and
`problems_per_call(n)` (`GenerationBackend`); pass your own to `evaluate_model(backend=...)` to evaluate through another engine.
Benchmarks with images (General Points-VL, V-IRL street views) also need `generate_multimodal(texts, images, n,
settings, seed)`: rendered prompt texts and each prompt's images, processed together by a VLM processor
(`TransformersBackend` given a `processor`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "GenerationBackend",
    "SamplingSettings",
    "TransformersBackend",
    "VLLMBackend",
    "vllm_available",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingSettings:
    """How completions are drawn. `temperature == 0` is greedy decoding."""

    temperature: float
    top_p: float
    max_new_tokens: int

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@runtime_checkable
class GenerationBackend(Protocol):
    """What the evaluation needs from a generation engine."""

    name: str

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        n: int,
        settings: SamplingSettings,
        seed: int,
    ) -> list[list[str]]:
        """`n` completions (decoded text, special tokens removed) for each prompt, in order."""
        ...

    def problems_per_call(self, n: int) -> int:
        """How many prompts to hand over per call (results are saved, for resuming, after each call)."""
        ...


def vllm_available() -> bool:
    """Whether vLLM is installed and a CUDA device is present."""
    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return torch.cuda.is_available()


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: list[int] = []
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (config_eos, tokenizer.eos_token_id):
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(token, int) and token not in ids:
                ids.append(token)
    return ids


class TransformersBackend:
    """Batched `model.generate` with the KV cache, left padding, and explicit sampling parameters.

    Args:
        model: a loaded causal LM (its device and dtype are used as they are).
        tokenizer: its tokenizer (the pad token falls back to EOS).
        batch_size: sequences per `generate` call (prompts x samples); prompts are sorted by length first
            so that each batch pads little.
        processor: a vision-language processor (for `generate_multimodal`); its tokenizer is used when
            `tokenizer` is None.
    """

    name = "transformers"

    def __init__(
        self, model: Any, tokenizer: Any, batch_size: int = 16, processor: Any | None = None
    ) -> None:
        tokenizer = tokenizer if tokenizer is not None else getattr(processor, "tokenizer", None)
        self.model, self.tokenizer, self.batch_size = model, tokenizer, max(1, int(batch_size))
        self.processor = processor
        self.eos_token_id = _eos_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else (self.eos_token_id[0] if self.eos_token_id else 0)

    def problems_per_call(self, n: int) -> int:
        """Prompts per call: one `generate` batch of `batch_size` sequences (at least one prompt)."""
        return max(1, self.batch_size // max(n, 1))

    def _generate_batch(self, batch: list[list[int]], settings: SamplingSettings) -> list[str]:
        import torch

        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            if ids:
                input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                attention_mask[row, width - len(ids) :] = 1
        return self._generate_inputs(
            {"input_ids": input_ids, "attention_mask": attention_mask}, width, settings
        )

    def _generate_inputs(self, inputs: dict[str, Any], width: int, settings: SamplingSettings) -> list[str]:
        device = self.model.device
        kwargs: dict[str, Any] = {
            "max_new_tokens": settings.max_new_tokens,
            "pad_token_id": self.pad_token_id,
            "eos_token_id": self.eos_token_id or None,
            "use_cache": True,
            # Explicit, so that the model's generation_config.json adds no penalty only this backend applies.
            "repetition_penalty": 1.0,
            "no_repeat_ngram_size": 0,
        }
        if settings.greedy:
            kwargs.update(do_sample=False, temperature=1.0, top_p=1.0)
        else:  # and no top-k / min-p / typical-p filter from the model's defaults either
            kwargs.update(do_sample=True, temperature=settings.temperature, top_p=settings.top_p)
            kwargs.update(top_k=0, min_p=0.0, typical_p=1.0)
        inputs = {k: v.to(device) if hasattr(v, "to") else v for k, v in inputs.items()}
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        output = self.model.generate(**inputs, **kwargs)
        return self.tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)

    def generate_multimodal(
        self,
        texts: Sequence[str],
        images: Sequence[Sequence[Any]],
        n: int,
        settings: SamplingSettings,
        seed: int,
    ) -> list[list[str]]:
        """`n` completions for each rendered prompt `texts[i]` with its images `images[i]` (in the order of
        its image placeholders), processed by the processor and generated with the same settings as `generate`."""
        import torch

        if self.processor is None:
            raise ValueError("TransformersBackend: prompts with images need a processor (processor=...).")
        requests = [(i, j) for i in range(len(texts)) for j in range(n)]
        results: list[list[str]] = [[""] * n for _ in texts]
        was_training = self.model.training
        self.model.eval()
        device = self.model.device
        devices = [device.index or 0] if device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), torch.inference_mode():
                torch.manual_seed(seed)
                for start in range(0, len(requests), self.batch_size):
                    chunk = requests[start : start + self.batch_size]
                    flat = [image for i, _ in chunk for image in images[i]]
                    inputs = self.processor(
                        text=[texts[i] for i, _ in chunk],
                        images=flat or None,
                        padding=True,
                        padding_side="left",
                        add_special_tokens=False,
                        return_tensors="pt",
                    )
                    width = inputs["input_ids"].shape[1]
                    for (i, j), text in zip(chunk, self._generate_inputs(dict(inputs), width, settings)):
                        results[i][j] = text
        finally:
            if was_training:
                self.model.train()
        return results

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        n: int,
        settings: SamplingSettings,
        seed: int,
    ) -> list[list[str]]:
        import torch

        order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
        requests = [(i, j) for i in order for j in range(n)]  # (prompt, sample), longest prompts first
        results: list[list[str]] = [[""] * n for _ in prompt_ids]
        was_training = self.model.training
        self.model.eval()
        device = self.model.device
        # A private RNG stream: evaluating in the middle of training leaves the global RNG state untouched.
        devices = [device.index or 0] if device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), torch.inference_mode():
                torch.manual_seed(seed)
                for start in range(0, len(requests), self.batch_size):
                    chunk = requests[start : start + self.batch_size]
                    texts = self._generate_batch([list(prompt_ids[i]) for i, _ in chunk], settings)
                    for (i, j), text in zip(chunk, texts):
                        results[i][j] = text
        finally:
            if was_training:
                self.model.train()
        return results


class VLLMBackend:
    """vLLM's offline `LLM.generate` on token-id prompts, with a seed per prompt.

    Args:
        model: a model directory or hub id.
        tokenizer: the tokenizer directory or hub id (default: `model`).
        seed: the engine's seed.
        **llm_kwargs: passed to `vllm.LLM` (e.g. `tensor_parallel_size`, `gpu_memory_utilization`,
            `max_model_len`, `dtype`).
    """

    name = "vllm"

    def __init__(
        self, model: str | os.PathLike, tokenizer: str | None = None, seed: int = 0, **llm_kwargs: Any
    ):
        from vllm import LLM

        llm_kwargs.setdefault("gpu_memory_utilization", 0.85)
        self.llm = LLM(model=str(model), tokenizer=str(tokenizer or model), seed=seed, **llm_kwargs)

    def problems_per_call(self, n: int) -> int:
        """Prompts per call: vLLM schedules them itself; 256 keeps resume points without starving it."""
        return 256

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        n: int,
        settings: SamplingSettings,
        seed: int,
    ) -> list[list[str]]:
        from vllm import SamplingParams

        params = [
            SamplingParams(
                n=n,
                temperature=0.0 if settings.greedy else settings.temperature,
                top_p=1.0 if settings.greedy else settings.top_p,
                max_tokens=settings.max_new_tokens,
                repetition_penalty=1.0,
                seed=seed + i,
                skip_special_tokens=True,
            )
            for i in range(len(prompt_ids))
        ]
        prompts = [{"prompt_token_ids": list(ids)} for ids in prompt_ids]
        outputs = self.llm.generate(prompts, sampling_params=params, use_tqdm=False)
        return [[c.text for c in out.outputs] for out in outputs]
