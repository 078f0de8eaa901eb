"""Every private member of TRL, Accelerate and DeepSpeed that amft-trl touches, in one place.

`trl<1.17` is pinned because of these; `tests/test_trl_contract.py` fails loudly when one of them changes. Each
function names the member it relies on and what it assumes:

| member | where | assumed |
|---|---|---|
| `GRPOTrainer._generate_and_score_completions(inputs)` | validation rollouts; `AMFTTrainer` wraps it | rows in, a dict out with `prompt_ids`, `prompt_mask`, `completion_ids`, `completion_mask`, `advantages` (B,); extra keys survive TRL's shuffle and split |
| `GRPOTrainer._calculate_rewards(...)` | `AMFTTrainer` wraps it | returns the rewards of every process, (N_global, num_funcs), NaN for None |
| `GRPOTrainer._compute_loss(model, inputs)` | per-rollout advantages (`rl_advantages`) | reads `inputs["advantages"]` after its one call of `_get_per_token_logps_and_entropies(..., compute_entropy=True)` |
| `GRPOTrainer._get_per_token_logps_and_entropies` | SFT log-probs and entropies, the validation surrogate | `(logps, entropies, aux)` at `args.temperature` |
| `GRPOTrainer._metrics`, `_logs`, `_pending_extra_logs`, `_pending_metrics` | `isolated_generation` | every log container generation writes to |
| `GRPOTrainer._metrics["train"]["step_time"]` | whole-step timing | one value appended per optimizer step by `GRPOTrainer.training_step` |
| `GradientState._set_sync_gradients` | `deferred_boundary` | toggles whether the next backward is at an accumulation boundary |
| `Accelerator.deepspeed_engine_wrapped` | `swapped_deepspeed_backward` | `accelerator.backward` calls its `.backward(loss, sync_gradients=..., **kwargs)` |
| `trl.data_utils._tokenize` | `amft_trl.sft_data` | tokenises a prompt or conversation like TRL's SFTTrainer |
| `GRPOTrainer._get_per_token_logps_and_entropies(..., **MULTIMODAL_KEYS)` | image demonstrations, validation rollouts | takes a VLM's extra inputs as `_compute_loss` passes them |
| `Trainer._load_from_checkpoint(resume_from_checkpoint, model)` | `AMFTTrainer` wraps it | loads the weights of a resumed run (VLM checkpoints then reloaded by `amft_trl.vision`) |
| DeepSpeed `safe_get_local_grad` / `safe_set_local_grad`, `param._hp_mapping` | `amft_trl._distributed.ZeroGrads` | the local ZeRO partition of a gradient |
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from trl.data_utils import _tokenize as tokenize  # noqa: F401  (re-exported for amft_trl.sft_data)

# Names of the generation output keys AMFT reads (the contract test checks TRL still produces them).
GENERATION_KEYS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages")

# The multimodal keys of TRL's generation output that `GRPOTrainer._compute_loss` hands to
# `_get_per_token_logps_and_entropies` (all optional; `num_images` / `num_tiles` are per-row lists).
MULTIMODAL_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)


def train_metrics(trainer: Any) -> dict[str, list[float]]:
    """The training metrics TRL averages and logs at each `log` call (`GRPOTrainer._metrics["train"]`)."""
    return trainer._metrics["train"]


def per_token_logps_and_entropies(
    trainer: Any,
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    logits_to_keep: int,
    compute_entropy: bool = False,
    **multimodal: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """TRL's fused log-prob head: per-token log-probs (and entropies) of the last `logits_to_keep` tokens, at the
    sampling temperature `args.temperature`, without materialising the logits. `multimodal`: a VLM's other inputs
    as TRL's generation output holds them (`MULTIMODAL_KEYS`)."""
    logps, entropies, _ = trainer._get_per_token_logps_and_entropies(
        model, input_ids, attention_mask, logits_to_keep, compute_entropy=compute_entropy, **multimodal
    )
    return logps, entropies


def generate_and_score(trainer: Any, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Rollouts for `rows` through TRL's own generation path (vLLM or transformers), scored and advantaged."""
    return trainer._generate_and_score_completions(rows)


def _empty_like(container: Any) -> Any:
    if isinstance(container, deque):
        return deque(maxlen=container.maxlen)
    if isinstance(container, defaultdict):
        return defaultdict(container.default_factory)
    if isinstance(container, dict):
        return {k: _empty_like(v) for k, v in container.items()}
    if isinstance(container, list):
        return []
    return container


@contextmanager
def isolated_generation(trainer: Any) -> Iterator[dict[str, list[float]]]:
    """Run TRL's generation without touching the training metrics, completion tables and token count.

    Yields the metrics the generation logged (its `reward`, ...). The containers are TRL's; a container TRL adds
    that generation writes to would leak: `tests/test_trl_contract.py` compares every attribute of the trainer
    before and after a validation generation to catch that.
    """
    saved = (trainer._metrics, trainer._logs, trainer._pending_extra_logs, trainer._pending_metrics)
    tokens_seen = trainer.state.num_input_tokens_seen
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._logs = _empty_like(trainer._logs)
    trainer._pending_extra_logs, trainer._pending_metrics = defaultdict(list), defaultdict(list)
    try:
        yield trainer._metrics["train"]
    finally:
        trainer._metrics, trainer._logs, trainer._pending_extra_logs, trainer._pending_metrics = saved
        trainer.state.num_input_tokens_seen = tokens_seen


def set_sync_gradients(accelerator: Any, value: bool) -> None:
    """Whether the next backward is taken at a gradient-accumulation boundary (Accelerate's `GradientState`)."""
    accelerator.gradient_state._set_sync_gradients(value)


@contextmanager
def swapped_deepspeed_backward(accelerator: Any, make_wrapper: Any) -> Iterator[None]:
    """Replace Accelerate's DeepSpeed engine wrapper (what `accelerator.backward` calls) for the duration."""
    wrapped = accelerator.deepspeed_engine_wrapped
    accelerator.deepspeed_engine_wrapped = make_wrapper(wrapped.engine)
    try:
        yield
    finally:
        accelerator.deepspeed_engine_wrapped = wrapped


def replace_last_step_time(trainer: Any, seconds: float, appended_by_trl: bool) -> None:
    """Make the step's `step_time` the whole AMFT step: TRL's covers only the GRPO `training_step` it wraps."""
    times = train_metrics(trainer)["step_time"]
    if appended_by_trl and times:
        times[-1] = seconds
    else:
        times.append(seconds)
