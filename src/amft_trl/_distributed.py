"""How per-process numbers are combined, and the parallel layouts AMFT accepts (checked before the model loads).

Also here: the backward that stays off DeepSpeed's optimizer step during a meta step. Where gradients live (`.grad`
or a ZeRO partition) and the inner products between them are `amft_trl.gradients`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from accelerate.utils import parse_flag_from_env

from ._deepspeed_check import check_deepspeed_offload, installed_deepspeed_version, offloaded_fields


def global_sum(accelerator: Any, values: list[float] | float) -> list[float] | float:
    """Sum over processes of per-process scalars (float64, one collective for the whole list)."""
    scalar = not isinstance(values, list | tuple)
    local = torch.tensor([values] if scalar else list(values), device=accelerator.device, dtype=torch.float64)
    if accelerator.num_processes > 1:
        local = accelerator.reduce(local, reduction="sum")
    out = local.tolist()
    return out[0] if scalar else out


class BoundaryBackwardWithoutStep:
    """Stands in for Accelerate's `DeepSpeedEngineWrapper` during a meta step.

    Every backward is taken at a gradient-accumulation boundary (so ZeRO reduces it into each process's partition,
    where the meta step reads it) and none steps the engine: the trainer steps it once, on the combined gradient.
    """

    def __init__(self, engine):
        self.engine = engine

    def backward(self, loss: torch.Tensor, sync_gradients: bool = True, **kwargs: Any) -> None:
        self.engine.set_gradient_accumulation_boundary(is_boundary=True)
        self.engine.backward(loss, **kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# DeepSpeed checks, before the model is loaded
# ----------------------------------------------------------------------------------------------------------------------
def launcher_deepspeed_config(args: Any) -> dict | None:
    """The DeepSpeed config as known before the model is loaded (None: DeepSpeed is not in use).

    From `args.deepspeed` (already parsed by `TrainingArguments`), else from what `accelerate launch` put in the
    environment (a config file, or the ZeRO stage and offload devices). The Accelerator's resolved config is checked
    again after `GRPOTrainer.__init__`.
    """
    if args.deepspeed:
        return args.hf_deepspeed_config.config
    if not parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        return None
    config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if config_file != "none":
        with open(config_file) as f:
            return json.load(f)
    return {
        "zero_optimization": {
            "stage": int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", 2)),
            "offload_optimizer": {
                "device": os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none")
            },
            "offload_param": {"device": os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none")},
        }
    }


def check_parallel_setup(args: Any, meta_gradient: bool, world: int, deepspeed_config: dict | None) -> None:
    """Refuse, with a message naming the field, the layouts the strategy cannot run on (`deepspeed_config`: None
    when DeepSpeed is not in use). Also refuses offloading on a DeepSpeed release that loses the gradients of
    several backward passes per step (`amft_trl._deepspeed_check`)."""
    if meta_gradient and args.meta_val_batch_size % world:
        raise ValueError(
            f"`meta_val_batch_size` ({args.meta_val_batch_size}) must be a multiple of the number of processes "
            f"({world}): each process generates for an equal share of the validation prompts."
        )
    if deepspeed_config is None:
        return
    check_deepspeed_offload(deepspeed_config, installed_deepspeed_version())
    if args.reset_optimizer_after_warmup:
        raise ValueError(
            "`reset_optimizer_after_warmup=True` is not supported under DeepSpeed (the engine owns the optimizer "
            "state). Run the two stages as two trainers, or use DDP (`accelerate launch --multi_gpu`)."
        )
    if not meta_gradient:
        return
    zero = deepspeed_config.get("zero_optimization") or {}
    stage = zero.get("stage", 0)
    if stage not in (1, 2, 3):
        raise ValueError(
            f"The meta-gradient (meta_learning_rate > 0) under DeepSpeed needs ZeRO stage 1, 2 or 3 (it reads "
            f"each process's gradient partition); the DeepSpeed config has zero_optimization.stage={stage!r}. "
            "Set the stage to 1-3, use DDP (`accelerate launch --multi_gpu`), or set meta_learning_rate=0."
        )
    for key, device in offloaded_fields(deepspeed_config).items():
        raise ValueError(
            f"The meta-gradient (meta_learning_rate > 0) does not run with DeepSpeed's {key}={device!r}: offloaded "
            "gradient partitions are only complete at DeepSpeed's own step, not after each backward of a meta step. "
            "Set the offload device to 'none', or set meta_learning_rate=0 for entropy-only AMFT with offloading."
        )
