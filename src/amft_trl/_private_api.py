"""Every private member of TRL, transformers, Accelerate and DeepSpeed that amft-trl touches, in one place.

It covers all four packages (it was `_trl_compat` while it held TRL's alone). `trl<1.17` is pinned because of these, and
`tests/test_private_api_contract.py` fails loudly, naming the member, when one of them changes. It also checks that the list
is complete: a private member of those packages read, assigned or overridden anywhere else in `amft_trl` fails it.

Two kinds of use:

- **Overrides** (`OVERRIDDEN`): private methods and class attributes of TRL / transformers that `AMFTTrainer` (or
  `amft_trl.compare`'s metering of TRL's own trainers) redefines and extends with `super()`. They stay in their
  class, since that is how a subclass hooks into TRL; the table below says why each is needed, and the contract test
  pins their signatures.
- **Reads and writes**: every other private access goes through a function of this module.

| member | package | where | why / assumed |
|---|---|---|---|
| `GRPOTrainer._generate_and_score_completions(inputs)` | TRL | overridden by `AMFTTrainer` (per-rollout rewards, groups, demonstrations), by `compare`'s metered `GRPOTrainer` (generated tokens); called for validation rollouts (`generate_and_score`) | rows in, a dict out with `prompt_ids`, `prompt_mask`, `completion_ids`, `completion_mask`, `advantages` (B,); extra keys survive TRL's shuffle and split |
| `GRPOTrainer._calculate_rewards(inputs, prompts, completions, completion_ids_list)` | TRL | overridden by `AMFTTrainer` | returns the rewards of every process, (N_global, num_funcs), NaN for None |
| `GRPOTrainer._compute_loss(model, inputs)` | TRL | overridden by `AMFTTrainer`: the one place AMFT's loss arguments (`RLLossArguments`: the RL weight, the strategy's advantages, LUFFY's off-policy rows) meet TRL's loss | reads `inputs["advantages"]` after its one call of `_get_per_token_logps_and_entropies(..., compute_entropy=True)` (pinned by the contract test: SRFT's advantages come from that call's entropies), whose log-probs (at `args.temperature`) carry the graph; its policy term is zero on rows with advantage 0; its normaliser per `loss_type` is what `balancing.luffy.aggregate_token_loss` reproduces |
| `GRPOTrainer._prepare_inputs(generation_batch)` | TRL | overridden by `AMFTTrainer`, and called by its `_micro_step` before `training_step` | generates every `steps_per_generation x num_iterations` micro-steps and returns this micro-step's slice of the buffered rollouts; `Trainer.training_step` calls it once and hands what it returns to `compute_loss` (pinned by the contract test), so a micro-batch prepared beforehand passes through with AMFT's loss arguments |
| `GRPOTrainer._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations, ...)` | TRL | overridden by `AMFTTrainer` for LUFFY (generates the on-policy rows only) | one completion per entry of `prompt_ids`, as `(completion_ids, logprobs or None)`; the vLLM server takes every `num_generations`-th entry as a group's prompt; `_generate` decodes, scores and pads whatever it returns |
| `GRPOTrainer._tokenize_prompts(prompts)` | TRL | overridden by `AMFTTrainer` for LUFFY with image prompts (tokenises the on-policy rows alone too) | `(prompt_ids, images, multimodal_fields)` for `_generate_single_turn`, one entry per prompt, the same ids whether a prompt is tokenised in a batch or alone |
| `GRPOTrainer.eos_token_ids`, `tools`, `rollout_func`, `environment_factories`, `max_completion_length`, `loss_type` | TRL (public, undocumented) | LUFFY | the generation's stop tokens; the multi-turn paths LUFFY refuses; the loss settings |
| `GRPOTrainer._get_per_token_logps_and_entropies` | TRL | overridden by `AMFTTrainer` (hands the GRPO loss forward's log-probs and entropies to `_compute_loss`: SRFT's advantages, LUFFY's term); called for SFT log-probs and entropies and the validation surrogate (`per_token_logps_and_entropies`) | `(logps, entropies, aux)` at `args.temperature` |
| `GRPOTrainer._metrics`, `_logs`, `_pending_extra_logs`, `_pending_metrics` | TRL | `isolated_generation`, `train_metrics` | every log container generation writes to; `_metrics["train"]` is averaged and logged at each `log` |
| `GRPOTrainer._metrics["train"]["step_time"]` | TRL | `replace_last_step_time` | one value appended per optimizer step by `GRPOTrainer.training_step` |
| `GRPOTrainer._tag_names`, `_name` | TRL | class attributes of `AMFTTrainer` | the tags and trainer name TRL writes into the model card |
| `trl.data_utils._tokenize` | TRL | `amft_trl.sft_data` (`tokenize`) | tokenises a prompt or conversation like TRL's SFTTrainer |
| `GRPOTrainer._env_tools` | TRL | `environment_tools` (the SFT term's tool list) | `{environment name: tools}` with a dict `environment_factory` (`{None: tools}` with one factory): the tools each environment's rollout prompts are rendered with |
| `GRPOTrainer._get_per_token_logps_and_entropies(..., **MULTIMODAL_KEYS)` | TRL | image demonstrations, validation rollouts | takes a VLM's extra inputs as `_compute_loss` passes them |
| `Trainer._load_from_checkpoint(resume_from_checkpoint, model)` | transformers | overridden by `AMFTTrainer` | loads the weights of a resumed run (VLM checkpoints then reloaded by `amft_trl.vision`) |
| `Trainer._save_checkpoint(model, trial)` | transformers | overridden by `AMFTTrainer` | writes `amft_state.json` into the checkpoint folder it has just written |
| `Trainer._load_optimizer_and_scheduler(checkpoint)` | transformers | overridden by `AMFTTrainer` | the one place of a resume that sees the checkpoint path (reads `amft_state.json`) |
| `Trainer._get_output_dir(trial)` | transformers | `checkpoint_dir` | the run's output directory, under which `_save_checkpoint` writes `checkpoint-<step>` |
| `Trainer._issue_warnings_after_load` (logger `transformers.trainer`) | transformers | `quiet_tied_weights_on_resume` | warns `MISSING_KEYS_WARNING` + the list of missing keys; only its message is matched |
| `Trainer._created_lr_scheduler` | transformers | `mark_lr_scheduler_created` | set by `create_scheduler` so that the Trainer recreates the schedule (e.g. after DeepSpeed) as its own |
| `GradientState._set_sync_gradients` | Accelerate | `set_sync_gradients` | toggles whether the next backward is at an accumulation boundary |
| `Accelerator.deepspeed_engine_wrapped` | Accelerate | `deepspeed_engine`, `swapped_deepspeed_backward` | `accelerator.backward` calls its `.backward(loss, sync_gradients=..., **kwargs)`; `.engine` is the DeepSpeed engine |
| `param._hp_mapping`, `param._index_in_param_group` | DeepSpeed | `zero_lp_grad_fragment` | ZeRO-1/2: the fragment of a parameter's reduced gradient in this process's partition |
| `safe_get_local_grad`, `safe_set_local_grad` | DeepSpeed | `zero3_local_grad`, `set_zero3_local_grad` | ZeRO-3: this process's slice of a parameter's gradient (public, but only valid inside the step) |
| `deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer`, `...stage3.DeepSpeedZeroOptimizer_Stage3` | DeepSpeed | `zero_optimizer_classes` | the optimizer classes whose partitions the two functions above read (module paths are not public API) |
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

#: The private methods and class attributes amft-trl redefines in a subclass, by the class that defines them, with
#: the parameters (after `self`) the override relies on (None: a class attribute). Pinned by the contract test.
OVERRIDDEN: dict[str, dict[str, tuple[str, ...] | None]] = {
    "trl.GRPOTrainer": {
        "_generate_and_score_completions": ("inputs",),
        "_calculate_rewards": ("inputs", "prompts", "completions", "completion_ids_list"),
        "_get_per_token_logps_and_entropies": ("model", "input_ids", "attention_mask", "logits_to_keep"),
        "_compute_loss": ("model", "inputs"),
        "_prepare_inputs": ("generation_batch",),
        "_generate_single_turn": ("prompt_ids", "images", "multimodal_fields", "num_generations"),
        "_tokenize_prompts": ("prompts",),
        "_tag_names": None,
        "_name": None,
    },
    "transformers.Trainer": {
        "_save_checkpoint": ("model", "trial"),
        "_load_optimizer_and_scheduler": ("checkpoint",),
        "_load_from_checkpoint": ("resume_from_checkpoint", "model"),
    },
}

#: Private members reached through this module's functions (besides the overrides), by package.
READ: dict[str, tuple[str, ...]] = {
    "trl": (
        "_prepare_inputs",
        "_generate_and_score_completions",
        "_get_per_token_logps_and_entropies",
        "_metrics",
        "_logs",
        "_pending_extra_logs",
        "_pending_metrics",
        "_tokenize",
        "_env_tools",
    ),
    "transformers": ("_get_output_dir", "_created_lr_scheduler", "_issue_warnings_after_load"),
    "accelerate": ("_set_sync_gradients", "deepspeed_engine_wrapped"),
    "deepspeed": ("_hp_mapping", "_index_in_param_group"),
}

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


def environment_tools(trainer: Any) -> dict[Any, list[Any]]:
    """The tools GRPOTrainer renders each environment's rollout prompts with (`_env_tools`: `{name: tools}`; the one
    unnamed environment of a single `environment_factory` is `None`)."""
    return trainer._env_tools


def prepare_rollouts(trainer: Any, generation_batch: Any) -> dict[str, Any]:
    """This micro-step's rollouts from TRL's buffer (`GRPOTrainer._prepare_inputs`: generates every
    `steps_per_generation x num_iterations` micro-steps, then slices)."""
    return trainer._prepare_inputs(generation_batch)


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
    that generation writes to would leak: `tests/test_private_api_contract.py` compares every attribute of the trainer
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


# ---------------------------------------------------------------------------------------------------------------
# transformers' Trainer
# ---------------------------------------------------------------------------------------------------------------
def checkpoint_dir(trainer: Any, trial: Any, step: int) -> str:
    """The folder `Trainer._save_checkpoint` writes the checkpoint of `step` to (`Trainer._get_output_dir`)."""
    import os

    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    return os.path.join(trainer._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{step}")


def mark_lr_scheduler_created(trainer: Any) -> None:
    """Tell the Trainer that `create_scheduler` made the schedule (`Trainer._created_lr_scheduler`), as its own
    `create_scheduler` does: it is then recreated when the Trainer rebuilds the optimizer (DeepSpeed, FSDP)."""
    trainer._created_lr_scheduler = True


# ---------------------------------------------------------------------------------------------------------------
# Accelerate and DeepSpeed
# ---------------------------------------------------------------------------------------------------------------
def deepspeed_engine(accelerator: Any) -> Any:
    """The DeepSpeed engine Accelerate's `accelerator.backward` steps (`Accelerator.deepspeed_engine_wrapped`)."""
    return accelerator.deepspeed_engine_wrapped.engine


def zero_optimizer_classes() -> tuple[type, ...]:
    """DeepSpeed's ZeRO stage 1/2 and stage 3 optimizer classes (their module paths are not public API)."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    return DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3


def zero_lp_grad_fragment(param: torch.nn.Parameter) -> torch.Tensor | None:
    """ZeRO-1/2: the fragment of `param`'s reduced gradient held by this process's partition (a view, writable), or
    None when the partition holds no part of it (`param._hp_mapping`, `param._index_in_param_group`)."""
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is None:
        return None
    return mapping.get_lp_grad_fragment(param._index_in_param_group)


def zero3_local_grad(param: torch.nn.Parameter) -> torch.Tensor | None:
    """ZeRO-3: this process's slice of `param`'s reduced gradient (DeepSpeed's `safe_get_local_grad`)."""
    from deepspeed.utils import safe_get_local_grad

    return safe_get_local_grad(param)


def set_zero3_local_grad(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    """ZeRO-3: overwrite this process's slice of `param`'s gradient (DeepSpeed's `safe_set_local_grad`)."""
    from deepspeed.utils import safe_set_local_grad

    safe_set_local_grad(param, value)
