"""Where gradients live, and the inner products between them: one process, DDP, DeepSpeed ZeRO.

The meta-gradient (Eq. 25 of the AMFT paper) needs inner products between grad U and the step's RL and SFT
gradients. They are taken on the framework's own gradient storage:

- `TorchGrads`: `param.grad` (one process, DDP). Every process holds the whole gradient. Under DDP only the backward
  passes of the last micro-step are all-reduced, so a per-process inner product is a mean over processes once
  reduced (`reduction = "mean"`).
- `ZeroGrads`: DeepSpeed ZeRO stage 1, 2 or 3. After a backward taken at an accumulation boundary, each process holds
  the *reduced* (process-averaged) gradient of its own partition only: a contiguous fragment of some parameters
  (ZeRO-1/2) or a slice of every parameter (ZeRO-3, DeepSpeed's local-gradient API). An inner
  product is the sum over processes of the per-partition products (`reduction = "sum"`).

A `None` entry means "no gradient of this parameter lives on this process" (a ZeRO-1/2 parameter outside this
process's partition); it contributes nothing to any inner product.

`grad_dot` is the inner product of two such gradient lists (per process; the caller reduces over processes with
the access's `reduction`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from . import _private_api


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
            return _private_api.zero3_local_grad(param)
        return _private_api.zero_lp_grad_fragment(param)  # None: no fragment in this process's partition

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
            _private_api.set_zero3_local_grad(param, value.to(local.dtype))
        else:
            local.copy_(value.view_as(local))


def grad_access(accelerator: Any) -> TorchGrads | ZeroGrads:
    """Where this process's gradients live: `.grad`, or its ZeRO partition."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return TorchGrads()
    engine = _private_api.deepspeed_engine(accelerator)
    if not isinstance(engine.optimizer, _private_api.zero_optimizer_classes()):
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


def grad_dot(a: Sequence[torch.Tensor | None], b: Sequence[torch.Tensor | None]) -> float:
    """Inner product of two gradient lists (one tensor per parameter; `None`: no entries here, contributes 0).

    Each parameter's dot product runs in its gradient's precision (float32 for half-precision gradients) without
    temporaries; the per-parameter results are summed in float64 on the device, with one host sync at the end.
    The estimate it feeds (Eq. 25) is a noisy Monte-Carlo quantity, far above float32 rounding. Under ZeRO the lists
    hold one process's partition (flattened), and the caller sums the partial results over processes.
    """
    total = None
    for x, y in zip(a, b, strict=True):
        if x is None or y is None:
            continue
        if x.dtype not in (torch.float32, torch.float64):
            x, y = x.float(), y.float()
        term = torch.dot(x.reshape(-1), y.reshape(-1)).double()
        total = term if total is None else total + term
    return 0.0 if total is None else float(total)
