"""The meta step of Eq. 25 (AMFT paper): grad U from validation rollouts, and its inner products with the step's
RL and SFT gradients, at one gradient-sized buffer.

    g_mu = -alpha * < grad U(theta), grad L_SFT(theta) - grad L_RL(theta) >        (Eq. 25; `balancing.amft`)

All three gradients are taken at the step's parameters theta_t, before the optimizer step (Algorithm 2, line 24):

1. At the step's first micro-step, validation rollouts are generated through TRL's own generation path (training
   metrics, completion tables and token counts left untouched: `_private_api.isolated_generation`) and the
   policy-gradient surrogate of -U is backpropagated (`validation_backward`), a training micro-batch of rollouts at
   a time. Its gradient is moved out of the framework's storage into the one buffer, `grad_u`.
2. The step's RL and SFT backward passes then run exactly as in any other step, with their weights `w_RL = 1 - mu`
   and `w_SFT = mu`, and accumulate `w_RL grad L_RL + w_SFT grad L_SFT` in `.grad`, which the optimizer steps on.
   Gradients are linear, so `<grad U, .grad>` taken before and after each backward gives that backward's
   contribution, `w * <grad U, grad L_term>`, without storing either gradient (`MetaStep.around_backward`).
3. After the last micro-step the per-process scalars are combined over processes (one collective) and the buffer is
   freed (`MetaStep.finish`). Nothing stays alive between meta steps.

Special cases, each documented where it is handled:
- a term of weight 0 (mu at 0 or 1): its backward is taken at weight 1 into an emptied `.grad`, the inner product
  read, and the accumulated gradient put back (a reference move, no copy);
- DeepSpeed ZeRO: each process holds a partition; every backward is taken at an accumulation boundary and its
  partition moved out after it (`_distributed.ZeroGrads`). Two partition buffers (grad U and the combined gradient,
  1/N of the model each) live during the step; the engine steps once on the combined gradient;
- `meta_diagnostics=True`: the RL and SFT gradients are kept apart (two more buffers) so that |d| and the cosine
  between grad U and the RL-minus-SFT direction can be logged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from accelerate.utils import DistributedType

from . import _private_api
from ._distributed import BoundaryBackwardWithoutStep
from .balancing.amft import cosine_meta_gradient, meta_gradient
from .balancing.base import StepMeasurements
from .gradients import TorchGrads, ZeroGrads, average_across_processes, grad_dot


class MetaStep:
    """The gradient bookkeeping of one meta step (see the module docstring).

    Args:
        params: the trainable parameters, in a fixed order.
        access: where this process's gradients live (`.grad` or its ZeRO partition).
        accelerator: the trainer's Accelerator (process count, reductions, DeepSpeed engine).
        diagnostics: keep the RL and SFT gradients apart to compute |grad L_SFT - grad L_RL| and the cosine.
    """

    def __init__(
        self,
        params: list[torch.nn.Parameter],
        access: TorchGrads | ZeroGrads,
        accelerator: Any,
        diagnostics: bool,
    ):
        self.params, self.access, self.accelerator = params, access, accelerator
        self.diagnostics = diagnostics
        # take each backward's gradient out after it (ZeRO partitions; or to keep the terms apart)
        self.take_each = access.sharded or diagnostics
        self.grad_u: list[torch.Tensor | None] | None = None
        self.dots = {"rl": 0.0, "sft": 0.0}  # per-process <grad(-U) surrogate, grad L_term>
        self.buffers: dict[str, list[torch.Tensor | None]] = {}
        self.val_reward = float("nan")

    # ---- 1. grad U ----------------------------------------------------------------------------------------------
    def take_validation_gradient(self) -> None:
        """Move the gradient of the validation surrogate out of the framework's storage and add it to `grad_u`.

        Called once after the validation backward passes (their gradients accumulate in `.grad`), or after each of
        them under ZeRO, whose partition may hold only the last backward's gradient.
        """
        grads = [self.access.take(p) for p in self.params]
        if self.grad_u is None:
            self.grad_u = grads
        else:
            self._add(self.grad_u, grads)

    def validation_done(self, val_reward: float) -> None:
        """grad U is complete: make it the global gradient (DDP) and record the validation reward."""
        self.val_reward = val_reward
        if self.accelerator.num_processes > 1 and not self.access.sharded:
            # Under DDP the validation backward of a non-final micro-step ran under `no_sync`: average it (averaging
            # an already reduced gradient again leaves it unchanged).
            average_across_processes(self.grad_u)

    # ---- 2. the step's backward passes ---------------------------------------------------------------------------
    def backward_weight(self, weight: float) -> float:
        """The weight a term's backward is taken with during this meta step (1 where its own gradient is needed)."""
        return 1.0 if (self.diagnostics or weight == 0.0) else weight

    @contextmanager
    def around_backward(self, term: str, weight: float):
        """Wrap one backward of `term` ("rl" or "sft"), whose weight in the step's loss is `weight`.

        Yields the weight to take the backward with (`backward_weight`). Adds `<grad(-U), grad L_term>` of this
        backward to `dots[term]`, and leaves `weight * grad L_term` in the gradient the optimizer steps on.
        """
        taken_with = self.backward_weight(weight)
        if not self.take_each and taken_with == weight:  # the lean path: a difference of two inner products
            before = grad_dot(self.grad_u, self._current())
            yield taken_with
            self.dots[term] += (grad_dot(self.grad_u, self._current()) - before) / weight
            return
        stash = None if self.take_each else self.access.stash(self.params)
        yield taken_with
        grads = [self.access.take(p) for p in self.params] if self.take_each else self._current()
        self.dots[term] += grad_dot(self.grad_u, grads) / taken_with
        if stash is not None:  # weight 0: discard this backward's gradient, put back what was accumulated
            self.access.restore(self.params, stash)
        elif self.diagnostics:
            self._accumulate(term, grads)
        elif weight != 0.0:
            self._accumulate("combined", grads)

    def _current(self) -> list[torch.Tensor | None]:
        return [self.access.peek(p) for p in self.params]

    def _accumulate(self, key: str, grads: list[torch.Tensor | None]) -> None:
        if self.buffers.get(key) is None:
            self.buffers[key] = grads
        else:
            self._add(self.buffers[key], grads)

    @staticmethod
    def _add(buffer: list[torch.Tensor | None], grads: list[torch.Tensor | None]) -> None:
        """`buffer += grads`, in place, entry by entry (None: no gradient of that parameter here)."""
        for i, (b, g) in enumerate(zip(buffer, grads, strict=True)):
            if g is None:
                continue
            if b is None:
                buffer[i] = g
            else:
                b.add_(g)

    # ---- 3. Eq. 25 ----------------------------------------------------------------------------------------------
    def finish(self, rl_weight: float, sft_weight: float, alpha: float) -> StepMeasurements:
        """Combine the per-process scalars, compute g_mu (Eq. 25), leave the combined gradient for the optimizer.

        `alpha` is the policy learning rate of the one-step lookahead (the optimizer's current learning rate).
        """
        world = self.accelerator.num_processes
        rl, sft = self.buffers.get("rl"), self.buffers.get("sft")
        if self.diagnostics and world > 1 and not self.access.sharded:
            average_across_processes([*(rl or []), *(sft or [])])
        scalars = [self.dots["rl"], self.dots["sft"], grad_dot(self.grad_u, self.grad_u)]
        if self.diagnostics:
            scalars += [grad_dot(sft or [], sft or []), grad_dot(rl or [], rl or []), _dot_or_zero(sft, rl)]
        if world > 1:
            scalars = self.accelerator.reduce(
                torch.tensor(scalars, dtype=torch.float64, device=self.accelerator.device),
                reduction=self.access.reduction,
            ).tolist()
        val_rl, val_sft, val_sq = scalars[:3]
        # grad U = -(gradient of the validation surrogate); d = grad L_SFT - grad L_RL
        utility_dot_direction = -(val_sft - val_rl)
        m = StepMeasurements(val_reward=self.val_reward)
        m.grad_utility_dot_direction = utility_dot_direction
        m.grad_utility_norm = math.sqrt(max(val_sq, 0.0))
        m.meta_gradient = meta_gradient(utility_dot_direction, alpha)
        if self.diagnostics:
            sft_sq, rl_sq, sft_rl = scalars[3:]
            m.direction_norm = math.sqrt(max(sft_sq + rl_sq - 2.0 * sft_rl, 0.0))
            m.cosine = cosine_meta_gradient(utility_dot_direction, m.grad_utility_norm, m.direction_norm)
            combined = _combine(rl, sft, rl_weight, sft_weight, len(self.params))
        else:
            combined = self.buffers.get("combined")
        if self.take_each:
            for p, g in zip(self.params, combined or [None] * len(self.params), strict=True):
                self.access.put(p, g)
        self.grad_u, self.buffers = None, {}
        return m


def _dot_or_zero(a: list | None, b: list | None) -> float:
    return 0.0 if a is None or b is None else grad_dot(a, b)


def _combine(rl: list | None, sft: list | None, rl_weight: float, sft_weight: float, n: int) -> list:
    """`rl_weight * rl + sft_weight * sft`, in place in the RL buffer where there is one."""
    rl, sft = rl or [None] * n, sft or [None] * n
    out = []
    for r, s in zip(rl, sft, strict=True):
        if r is None and s is None:
            out.append(None)
        elif r is None:
            out.append(s.mul_(sft_weight))
        elif s is None:
            out.append(r.mul_(rl_weight))
        else:
            out.append(r.mul_(rl_weight).add_(s, alpha=sft_weight))
    return out


# ---- the trainer's side: DeepSpeed boundaries, the validation pass, the engine step -------------------------------
@contextmanager
def around_backward(meta: MetaStep | None, term: str, weight: float) -> Iterator[float]:
    """Yields the weight the `term` backward is taken with: its weight in the step's loss, except in a meta step,
    whose inner products wrap the backward (`MetaStep.around_backward`)."""
    if meta is None:
        yield weight
        return
    with meta.around_backward(term, weight) as taken_with:
        yield taken_with


@contextmanager
def backwards_without_engine_step(meta: MetaStep | None, accelerator: Any) -> Iterator[None]:
    """Under DeepSpeed, during a meta step: every backward is taken at an accumulation boundary, none steps.

    At a boundary ZeRO reduces the gradient into each process's partition, where the meta step reads it after each
    backward; the engine is stepped once, by `finish_meta_step`, on the combined gradient written there.
    """
    if meta is None or accelerator.distributed_type != DistributedType.DEEPSPEED:
        yield
        return
    with _private_api.swapped_deepspeed_backward(accelerator, BoundaryBackwardWithoutStep):
        yield


def validation_pass(meta: MetaStep, run_backward: Callable[[Callable[[], None] | None], float]) -> None:
    """grad U of the meta step: `run_backward(after_each_backward)` backpropagates the validation surrogate and
    returns the validation reward. Under ZeRO a partition may keep only the last backward's gradient, so it is moved
    out after each one; otherwise once, after all of them."""
    each = meta.take_validation_gradient if meta.access.sharded else None
    val_reward = run_backward(each)
    if each is None:
        meta.take_validation_gradient()
    meta.validation_done(val_reward)


def finish_meta_step(meta: MetaStep, rl_weight: float, sft_weight: float, alpha: float) -> StepMeasurements:
    """Eq. 25 for the step (`MetaStep.finish`); under DeepSpeed, then the one engine step that every backward of the
    step was kept from (`backwards_without_engine_step`)."""
    measurements = meta.finish(rl_weight, sft_weight, alpha=alpha)
    if meta.accelerator.distributed_type == DistributedType.DEEPSPEED:
        engine = _private_api.deepspeed_engine(meta.accelerator)
        engine.set_gradient_accumulation_boundary(True)
        engine.step()
    return measurements


def validation_backward(
    trainer: Any,
    model: Any,
    rows: list[dict[str, Any]],
    chunk_size: int,
    after_each_backward: Any = None,
) -> float:
    """Validation rollouts through the trainer's own generation path; backward of the policy-gradient surrogate of -U.

    The surrogate is `-sum_i A_i * sum_t log pi(y_it) / (validation completion tokens, all processes)`, with `A_i`
    GRPO's group-normalised advantages: its gradient is the policy-gradient estimate of -grad U (Eq. 4) at the
    sampling temperature. Its forward and backward run `chunk_size` rollouts at a time (the training micro-batch),
    so that a large validation batch does not hold every rollout's activations at once; the gradients accumulate
    (`after_each_backward`, if given, runs after each chunk's backward). Every process runs the same number of chunks
    (each holds an equal share of the rows). Training metrics and completion logs are left untouched. Returns the
    mean validation reward (NaN when every validation reward was None or NaN).
    """
    accelerator = trainer.accelerator
    with _private_api.isolated_generation(trainer) as val_metrics:
        out = _private_api.generate_and_score(trainer, rows)
    rewards = val_metrics.get("reward") or [float("nan")]
    val_reward = float(rewards[0])
    prompt_ids, completion_ids = out["prompt_ids"], out["completion_ids"]
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
    mask = out["completion_mask"] if "tool_mask" not in out else out["completion_mask"] * out["tool_mask"]
    advantages = out["advantages"]
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    tokens = accelerator.gather(mask.sum()).sum().clamp(min=1)
    multimodal = _per_row_multimodal(out)
    for start in range(0, input_ids.size(0), chunk_size):
        rows_ = slice(start, start + chunk_size)
        with trainer.compute_loss_context_manager():
            logps, _ = _private_api.per_token_logps_and_entropies(
                trainer,
                model,
                input_ids[rows_],
                attention_mask[rows_],
                completion_ids.size(1),
                **_rows_of(multimodal, rows_),
            )
        loss = -(advantages[rows_] * logps * mask[rows_]).sum() / tokens * accelerator.num_processes
        trainer._amft_backward(loss)
        if after_each_backward is not None:
            after_each_backward()
    return val_reward


def _per_row_multimodal(out: dict[str, Any]) -> dict[str, Any]:
    """The VLM inputs of a generation output (images of the validation prompts), split per row the way TRL splits
    its generation batch into micro-batches (`trl.trainer.utils.split_pixel_values_by_grid`). Empty for text."""
    from trl.trainer.utils import split_pixel_values_by_grid

    fields = {k: out[k] for k in _private_api.MULTIMODAL_KEYS if out.get(k) is not None}
    return split_pixel_values_by_grid(fields) if fields else {}


def _rows_of(multimodal: dict[str, Any], rows: slice) -> dict[str, Any]:
    """The rows `rows` of `_per_row_multimodal`'s output, merged back into the model's layout."""
    from trl.trainer.utils import unsplit_pixel_values_by_grid

    if not multimodal:
        return {}
    return unsplit_pixel_values_by_grid({k: v[rows] for k, v in multimodal.items()})
