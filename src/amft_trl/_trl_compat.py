"""Every private member of TRL, Accelerate and DeepSpeed that amft-trl touches, in one place.

`trl<1.17` is pinned because of these; `tests/test_trl_contract.py` fails loudly when one of them changes. Each
function names the member it relies on and what it assumes:

| member | where | assumed |
|---|---|---|
| `GRPOTrainer._generate_and_score_completions(inputs)` | validation rollouts; `AMFTTrainer` wraps it | rows in, a dict out with `prompt_ids`, `prompt_mask`, `completion_ids`, `completion_mask`, `advantages` (B,); extra keys survive TRL's shuffle and split |
| `GRPOTrainer._calculate_rewards(...)` | `AMFTTrainer` wraps it | returns the rewards of every process, (N_global, num_funcs), NaN for None |
| `GRPOTrainer._compute_loss(model, inputs)` | per-rollout advantages (`rl_advantages`); `AMFTTrainer` wraps it for LUFFY | reads `inputs["advantages"]` after its one call of `_get_per_token_logps_and_entropies(..., compute_entropy=True)`, whose log-probs (at `args.temperature`) carry the graph; its policy term is zero on rows with advantage 0; its normaliser per `loss_type` is what `balancing.luffy.aggregate_token_loss` reproduces |
| `GRPOTrainer._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations, ...)` | `AMFTTrainer` wraps it for LUFFY (generates the on-policy rows only) | one completion per entry of `prompt_ids`, as `(completion_ids, logprobs or None)`; the vLLM server takes every `num_generations`-th entry as a group's prompt; `_generate` decodes, scores and pads whatever it returns |
| `GRPOTrainer.eos_token_ids`, `tools`, `rollout_func`, `environment_factories`, `max_completion_length`, `loss_type` | LUFFY | the generation's stop tokens; the multi-turn paths LUFFY refuses; the loss settings |
| `GRPOTrainer._get_per_token_logps_and_entropies` | SFT log-probs and entropies, the validation surrogate | `(logps, entropies, aux)` at `args.temperature` |
| `GRPOTrainer._metrics`, `_logs`, `_pending_extra_logs`, `_pending_metrics` | `isolated_generation` | every log container generation writes to |
| `GRPOTrainer._metrics["train"]["step_time"]` | whole-step timing | one value appended per optimizer step by `GRPOTrainer.training_step` |
| `GradientState._set_sync_gradients` | `deferred_boundary` | toggles whether the next backward is at an accumulation boundary |
| `Accelerator.deepspeed_engine_wrapped` | `swapped_deepspeed_backward` | `accelerator.backward` calls its `.backward(loss, sync_gradients=..., **kwargs)` |
| `trl.data_utils._tokenize` | `amft_trl.sft_data` | tokenises a prompt or conversation like TRL's SFTTrainer |
| `GRPOTrainer._get_per_token_logps_and_entropies(..., **MULTIMODAL_KEYS)` | image demonstrations, validation rollouts | takes a VLM's extra inputs as `_compute_loss` passes them |
| `Trainer._load_from_checkpoint(resume_from_checkpoint, model)` | `AMFTTrainer` wraps it | loads the weights of a resumed run (VLM checkpoints then reloaded by `amft_trl.vision`) |
| DeepSpeed `safe_get_local_grad` / `safe_set_local_grad`, `param._hp_mapping` | `amft_trl._distributed.ZeroGrads` | the local ZeRO partition of a gradient |
| transformers `Trainer._issue_warnings_after_load` | `quiet_tied_weights_on_resume` | warns `MISSING_KEYS_WARNING` + the list of missing keys on logger `transformers.trainer` |
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


#: The start of the warning transformers' Trainer logs when a resumed checkpoint lacks some of the model's keys.
MISSING_KEYS_WARNING = "There were missing keys in the checkpoint model loaded: "


class _TiedWeightsFilter:
    """Drops the Trainer's missing-keys warning when every key it names is a tied copy of another parameter."""

    def __init__(self, model: Any):
        self.model = model

    def tied_copies(self) -> set[str]:
        """The model's parameters that are the very tensor of another one (`lm_head.weight` of a model with
        `tie_word_embeddings`): a checkpoint stores only their source."""
        tied = getattr(self.model, "all_tied_weights_keys", None) or {}
        copies = set()
        for target, source in tied.items():
            try:
                if self.model.get_parameter(target) is self.model.get_parameter(source):
                    copies.add(target)
            except AttributeError:
                continue
        return copies

    def filter(self, record: Any) -> bool:
        message = record.getMessage()
        if not message.startswith(MISSING_KEYS_WARNING):
            return True
        import ast

        try:
            missing = ast.literal_eval(message[len(MISSING_KEYS_WARNING) :].rstrip("."))
        except (ValueError, SyntaxError):
            return True
        return not (isinstance(missing, list) and missing and set(missing) <= self.tied_copies())


@contextmanager
def quiet_tied_weights_on_resume(model: Any) -> Iterator[None]:
    """Resume without transformers' "There were missing keys in the checkpoint model loaded: ['lm_head.weight']".

    A model with tied weights (`tie_word_embeddings`, as Qwen2's small models and the toy model have) is saved
    without the tied copy, and `Trainer._load_from_checkpoint` loads the checkpoint with `strict=False` and warns
    about every missing key unless they equal `model._keys_to_ignore_on_save`, which is empty for these models. Nothing
    is missing: the copy is the same tensor as the embedding it is tied to, so loading that loads both. This drops the
    warning while the block runs when every key it names is such a copy (checked on the model, tensor identity);
    a warning naming any other key is still logged.
    """
    import logging

    trainer_logger = logging.getLogger("transformers.trainer")
    quiet = _TiedWeightsFilter(model)
    trainer_logger.addFilter(quiet)
    try:
        yield
    finally:
        trainer_logger.removeFilter(quiet)
