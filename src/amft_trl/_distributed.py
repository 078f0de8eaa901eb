"""Where gradients live and how per-process numbers are combined: one process, DDP, DeepSpeed ZeRO.

The meta-gradient (Eq. 25) needs inner products between grad U and the step's RL and SFT gradients. They are taken
on the framework's own gradient storage:

- `TorchGrads`: `param.grad` (one process, DDP). Every process holds the whole gradient. Under DDP only the backward
  passes of the last micro-step are all-reduced, so a per-process inner product is a mean over processes once
  reduced (`reduction = "mean"`).
- `ZeroGrads`: DeepSpeed ZeRO stage 1, 2 or 3. After a backward taken at an accumulation boundary, each process holds
  the *reduced* (process-averaged) gradient of its own partition only: a contiguous fragment of some parameters
  (ZeRO-1/2) or a slice of every parameter (ZeRO-3, DeepSpeed's local-gradient API). An inner
  product is the sum over processes of the per-partition products (`reduction = "sum"`).

A `None` entry means "no gradient of this parameter lives on this process" (a ZeRO-1/2 parameter outside this
process's partition); it contributes nothing to any inner product.

Also here: the DeepSpeed checks done before the model loads, the backward that stays off DeepSpeed's optimizer step
during a meta step, and cross-process reductions of scalars.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from accelerate.utils import parse_flag_from_env

from . import _trl_compat
from ._deepspeed_check import check_deepspeed_offload, installed_deepspeed_version, offloaded_fields


class TorchGrads:
    """Gradients in `param.grad`."""

    sharded = False
    reduction = "mean"

    def take(self, param: torch.nn.Parameter) -> torch.Tensor:
        """The gradient accumulated since the last `take`, moved out (the next backward starts from zero)."""
        grad = param.grad if param.grad is not None else torch.zeros_like(param)
        param.grad = None
        return grad

    def peek(self, param: torch.nn.Parameter) -> torch.Tensor | None:
        """The current gradient, not copied (None: no gradient yet)."""
        return param.grad

    def put(self, param: torch.nn.Parameter, value: torch.Tensor | None) -> None:
        param.grad = value

    def stash(self, params: list[torch.nn.Parameter]) -> list[torch.Tensor | None]:
        """Move every gradient aside (references, no copy); the next backward starts from zero."""
        saved = [p.grad for p in params]
        for p in params:
            p.grad = None
        return saved

    def restore(self, params: list[torch.nn.Parameter], saved: list[torch.Tensor | None]) -> None:
        """Put back what `stash` moved aside, discarding what was accumulated since."""
        for p, g in zip(params, saved, strict=True):
            p.grad = g


class ZeroGrads:
    """This process's partition of the reduced gradient under DeepSpeed ZeRO-1/2/3 (no offload).

    Only valid right after a backward taken at a gradient-accumulation boundary (the trainer takes every backward of
    a meta step at one, without stepping the engine) and before `engine.step()`.
    """

    sharded = True
    reduction = "sum"

    def __init__(self, stage: int):
        if stage not in (1, 2, 3):
            raise ValueError(f"ZeroGrads needs ZeRO stage 1, 2 or 3, got {stage}.")
        self.stage = stage

    def _local(self, param: torch.nn.Parameter) -> torch.Tensor | None:
        if self.stage == 3:
            return _trl_compat.zero3_local_grad(param)
        return _trl_compat.zero_lp_grad_fragment(param)  # None: no fragment in this process's partition

    def take(self, param: torch.nn.Parameter) -> torch.Tensor | None:
        """A float32 copy of this process's shard, then zeroed in place (the next backward starts from zero)."""
        local = self._local(param)
        if local is None:
            return None
        grad = local.detach().to(torch.float32, copy=True).reshape(-1)
        self._write(param, local, torch.zeros_like(local))
        return grad

    def put(self, param: torch.nn.Parameter, value: torch.Tensor | None) -> None:
        if value is None:
            return
        local = self._local(param)
        if local is None:
            raise RuntimeError(
                "AMFT: a gradient shard was written for a parameter this process does not hold."
            )
        self._write(param, local, value)

    def _write(self, param: torch.nn.Parameter, local: torch.Tensor, value: torch.Tensor) -> None:
        if self.stage == 3:
            _trl_compat.set_zero3_local_grad(param, value.to(local.dtype))
        else:
            local.copy_(value.view_as(local))


def grad_access(accelerator: Any) -> TorchGrads | ZeroGrads:
    """Where this process's gradients live: `.grad`, or its ZeRO partition."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return TorchGrads()
    engine = _trl_compat.deepspeed_engine(accelerator)
    if not isinstance(engine.optimizer, _trl_compat.zero_optimizer_classes()):
        raise RuntimeError(
            "The meta-gradient under DeepSpeed reads the gradient partitions of a ZeRO stage 1-3 optimizer, but "
            f"the engine's optimizer is {type(engine.optimizer).__name__}. Use ZeRO stage 1-3 or set "
            "meta_learning_rate=0."
        )
    return ZeroGrads(engine.zero_optimization_stage())


def average_across_processes(tensors: list[torch.Tensor | None], bucket_bytes: int = 2**26) -> None:
    """In-place mean over processes, in flat buckets of at most `bucket_bytes` (few collectives, bounded memory)."""
    import torch.distributed as dist

    world = dist.get_world_size()
    bucket: list[torch.Tensor] = []
    size = 0

    def flush() -> None:
        if not bucket:
            return
        flat = torch.cat([t.reshape(-1) for t in bucket])
        dist.all_reduce(flat)  # SUM: gloo has no AVG
        flat.div_(world)
        offset = 0
        for t in bucket:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
        bucket.clear()

    for t in tensors:
        if t is None:
            continue
        if bucket and (size + t.numel() * t.element_size() > bucket_bytes or t.dtype != bucket[0].dtype):
            flush()
            size = 0
        bucket.append(t)
        size += t.numel() * t.element_size()
    flush()


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
