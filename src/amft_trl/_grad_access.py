"""Where the trainer reads and writes this process's gradient of each trainable parameter.

The meta-gradient (Eq. 25) needs three gradients of one optimizer step kept apart: grad L_RL, grad L_SFT and the
validation gradient. The trainer moves each out of the framework's gradient storage after the backward that made
it, then writes the combined gradient `(1 - mu) grad L_RL + mu grad L_SFT` back for the optimizer. Two kinds of
storage:

- `TorchGrads`: `param.grad` (one process, DDP). Every process holds the whole gradient; under DDP the trainer
  averages its buffers over processes, after which every inner product is local and identical on all processes.
- `ZeroGrads`: DeepSpeed ZeRO stage 1, 2 or 3. After a backward taken at an accumulation boundary, each process
  holds the *reduced* (process-averaged) gradient of its own partition only: a contiguous fragment of some
  parameters (ZeRO-1/2, `param._hp_mapping`) or a slice of every parameter (ZeRO-3, DeepSpeed's local-gradient
  API). The buffers hold those shards (1/N of the model per buffer), and an inner product is the sum over
  processes of the local partial sums, so `sharded` tells the trainer to all-reduce the scalars.

A `None` entry means "no gradient of this parameter lives on this process" (a ZeRO-1/2 parameter outside this
process's partition); it contributes nothing to any inner product.
"""

from __future__ import annotations

import torch


class TorchGrads:
    """Gradients in `param.grad`."""

    sharded = False

    def take(self, param: torch.nn.Parameter) -> torch.Tensor:
        """The gradient accumulated since the last `take`, moved out (the next backward starts from zero)."""
        grad = param.grad if param.grad is not None else torch.zeros_like(param)
        param.grad = None
        return grad

    def peek(self, param: torch.nn.Parameter) -> torch.Tensor:
        return param.grad if param.grad is not None else torch.zeros_like(param)

    def put(self, param: torch.nn.Parameter, value: torch.Tensor | None) -> None:
        param.grad = value


class ZeroGrads:
    """This process's partition of the reduced gradient under DeepSpeed ZeRO-1/2/3 (no offload).

    Only valid right after a backward taken at a gradient-accumulation boundary (the trainer takes every backward of
    a meta step at one, without stepping the engine) and before `engine.step()`.
    """

    sharded = True

    def __init__(self, stage: int):
        if stage not in (1, 2, 3):
            raise ValueError(f"ZeroGrads needs ZeRO stage 1, 2 or 3, got {stage}.")
        self.stage = stage

    def _local(self, param: torch.nn.Parameter) -> torch.Tensor | None:
        if self.stage == 3:
            from deepspeed.utils import safe_get_local_grad

            return safe_get_local_grad(param)
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is None:  # no fragment of this parameter in this process's partition
            return None
        return mapping.get_lp_grad_fragment(param._index_in_param_group)

    def take(self, param: torch.nn.Parameter) -> torch.Tensor | None:
        local = self._local(param)
        if local is None:
            return None
        grad = local.detach().to(torch.float32, copy=True).reshape(-1)
        self._write(param, local, torch.zeros_like(local))
        return grad

    def peek(self, param: torch.nn.Parameter) -> torch.Tensor | None:
        local = self._local(param)
        return None if local is None else local.detach().reshape(-1)

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
            from deepspeed.utils import safe_set_local_grad

            safe_set_local_grad(param, value.to(local.dtype))
        else:
            local.copy_(value.view_as(local))
