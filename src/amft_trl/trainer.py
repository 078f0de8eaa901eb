"""`AMFTTrainer`: TRL's `GRPOTrainer` plus an SFT term, an SFT warm-up, and the mu controller.

What the trainer does per optimizer step, and where each piece of the paper lives:

- warm-up steps (`global_step < sft_warmup_steps`, Algorithm 2 lines 6-10): SFT only, no rollouts generated;
- mixed steps: the loss of Eq. 3, `(1 - mu) * L_RL + mu * L_SFT`. `L_RL` is exactly GRPOTrainer's loss for the
  configured `loss_type` (its `training_step` is reused, only `compute_loss` is scaled); `L_SFT` is the
  token-mean NLL of Eq. 2 at temperature 1, normalised by the completion tokens of the whole step's SFT batch so
  that it is invariant to gradient accumulation, like TRL's `dapo` loss;
- every `meta_update_steps` mixed steps, the meta-gradient of Eq. 25 (`controller.meta_gradient`): the SFT and
  RL gradients of the step are kept apart in two buffers, the validation rollouts give a policy-gradient estimate
  of grad U in the model's own `.grad`, the inner products are taken, and `.grad` is then set to the combined
  gradient the optimizer steps on. At most two gradient-sized buffers live besides `.grad`, and only then. Under
  DeepSpeed ZeRO the same happens on each process's gradient partition (`_grad_access.ZeroGrads`): buffers of 1/N
  of the model, inner products summed over processes;
- the measurements go to `MuController`, which applies Eq. 6 in `on_step_end`.

Simplification, documented: mu computed from the measurements of step t is used from step t + 1 on (Algorithm 2
applies it to step t's own loss, which would need the entropy before the backward, i.e. a second forward).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import defaultdict, deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.utils import DistributedType, parse_flag_from_env
from datasets import Dataset
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOTrainer
from trl.import_utils import is_vllm_available

from ._grad_access import TorchGrads, ZeroGrads
from .config import AMFTConfig
from .controller import MuController, StepMeasurements, cosine_meta_gradient, grad_dot, meta_gradient
from .sft_data import InfiniteStream, SFTBatch, check_sft_columns, collate_sft, tokenize_sft_dataset

logger = logging.getLogger(__name__)

AMFT_STATE_NAME = "amft_state.json"


@dataclass
class _StepPlan:
    """What one optimizer step does, fixed at its first micro-step."""

    mu: float  # SFT weight of Eq. 3 for this step (1.0 during warm-up)
    warmup: bool
    rl: bool  # compute L_RL (False during warm-up and when mu is pinned to 1)
    sft: bool  # run the SFT forward at all
    meta: bool  # meta-gradient step (Eq. 25)
    entropy: bool  # measure H_t
    sft_batches: list[SFTBatch] = field(default_factory=list)
    sft_tokens: int = 0  # completion tokens of the step's SFT batch, over all processes
    micro: int = 0
    sft_nll_sum: float = 0.0
    entropy_sum: float = 0.0
    rl_loss: float = 0.0


class _GradientBuffer:
    """Accumulates this process's gradients moved out of the framework's storage after each backward.

    A reference move at the first call (`.grad`) or a shard copy (ZeRO), in-place adds after. One entry per
    trainable parameter; `None` where no gradient of that parameter lives on this process (ZeRO-1/2).
    """

    def __init__(self, params: list[torch.nn.Parameter], access: TorchGrads | ZeroGrads):
        self.params = params
        self.access = access
        self.tensors: list[torch.Tensor | None] | None = None

    def take_grads(self) -> None:
        grads = [self.access.take(p) for p in self.params]
        if self.tensors is None:
            self.tensors = grads
        else:
            for t, g in zip(self.tensors, grads, strict=True):
                if t is not None:
                    t.add_(g)


def _average_across_processes(tensors: list[torch.Tensor], bucket_bytes: int = 2**26) -> None:
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
        if bucket and (size + t.numel() * t.element_size() > bucket_bytes or t.dtype != bucket[0].dtype):
            flush()
            size = 0
        bucket.append(t)
        size += t.numel() * t.element_size()
    flush()


class _BoundaryBackwardWithoutStep:
    """Stands in for Accelerate's `DeepSpeedEngineWrapper` during a meta step (see `_meta_step_backwards`)."""

    def __init__(self, engine):
        self.engine = engine

    def backward(self, loss: torch.Tensor, sync_gradients: bool = True, **kwargs: Any) -> None:
        self.engine.set_gradient_accumulation_boundary(is_boundary=True)
        self.engine.backward(loss, **kwargs)


def _launcher_deepspeed_config(args: AMFTConfig) -> dict | None:
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


class AMFTTrainer(GRPOTrainer):
    """Adaptive Meta Fine-Tuning on top of [`~trl.GRPOTrainer`].

    Args:
        model, reward_funcs, args, train_dataset, eval_dataset, processing_class, ...: as for `GRPOTrainer`
            (`args` must be an [`AMFTConfig`]). `train_dataset` holds the RL prompts and reward columns.
        sft_dataset: demonstrations in TRL's prompt-completion format (standard or conversational), or a
            conversational `messages` column. Required unless mu is pinned to 0 (`mu_max == 0`).
        val_dataset: prompts plus reward columns for the meta-objective U (Eq. 4). Required when the
            meta-gradient is on (`meta_learning_rate > 0` and mu not pinned).
        mu_controller: a `MuController` (or subclass) to use instead of one built from `args`.
        **kwargs: passed to `GRPOTrainer` (`reward_processing_classes`, `callbacks`, `optimizers`, `peft_config`, ...).
    """

    _tag_names = ["trl", "grpo", "amft"]
    _name = "AMFT"

    def __init__(
        self,
        model: Any,
        reward_funcs: Any = None,
        args: AMFTConfig | None = None,
        train_dataset: Dataset | None = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        *,
        sft_dataset: Dataset | None = None,
        val_dataset: Dataset | None = None,
        mu_controller: MuController | None = None,
        callbacks: list[TrainerCallback] | None = None,
        **kwargs: Any,
    ):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = AMFTConfig(f"{str(name).split('/')[-1]}-AMFT")
        if not isinstance(args, AMFTConfig):
            raise TypeError(
                f"`args` must be an AMFTConfig (a GRPOConfig with AMFT's fields), got {type(args).__name__}. "
                "Build it with `AMFTConfig(**grpo_config.to_dict(), ...)`."
            )
        if (
            args.use_vllm and not is_vllm_available()
        ):  # before the model is loaded, unlike GRPOTrainer's own check
            raise ImportError(
                "`use_vllm=True` but vLLM is not installed: install it with `pip install 'amft-trl[vllm]'` (training "
                "and validation rollouts both go through it), or set `use_vllm=False` to generate with transformers."
            )
        controller = mu_controller if mu_controller is not None else MuController.from_config(args)
        self._check_datasets(args, controller, sft_dataset, val_dataset)
        # before the model is loaded: the layout as the launcher set it up (checked again on the Accelerator below)
        self._check_parallel_setup(args, controller, args.world_size, _launcher_deepspeed_config(args))
        self.mu_controller = controller
        super().__init__(
            model=model,
            reward_funcs=reward_funcs,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=[*(callbacks or []), controller],
            **kwargs,
        )
        plugin = self.accelerator.state.deepspeed_plugin
        self._check_parallel_setup(
            args,
            controller,
            self.accelerator.num_processes,
            plugin.deepspeed_config
            if self.accelerator.distributed_type == DistributedType.DEEPSPEED and plugin is not None
            else None,
        )
        self._trainable_params = [p for p in self.model.parameters() if p.requires_grad]
        if controller.wants_meta_gradient and not self._trainable_params:
            raise ValueError(
                "The meta-gradient needs trainable parameters, but every parameter of the model is frozen."
            )

        self.sft_dataset, self.sft_num_dropped = None, 0
        if sft_dataset is not None:
            self.sft_dataset, self.sft_num_dropped = tokenize_sft_dataset(
                sft_dataset, self.processing_class, args.max_sft_length, chat_template=self.chat_template
            )
            self._sft_stream = InfiniteStream(len(self.sft_dataset), seed=args.seed)
        self.val_dataset = val_dataset
        if val_dataset is not None:
            self._val_stream = InfiniteStream(len(val_dataset), seed=args.seed + 1)
        self._sft_batch_size = args.sft_per_device_train_batch_size or args.per_device_train_batch_size
        self._rl_weight = 1.0
        self._plan: _StepPlan | None = None  # set for the duration of one optimizer step
        self._rl_buffer: _GradientBuffer | None = None  # the two meta-step buffers: None outside meta steps
        self._sft_buffer: _GradientBuffer | None = None
        self._controller_history_logged = 0

    # ------------------------------------------------------------------------------------------------------
    # construction-time checks
    # ------------------------------------------------------------------------------------------------------
    @staticmethod
    def _check_datasets(args: AMFTConfig, controller: MuController, sft_dataset, val_dataset) -> None:
        if sft_dataset is None and controller.mu_max > 0:
            raise ValueError(
                f"`sft_dataset` is required: mu can reach mu_max={controller.mu_max} > 0, so the SFT term of Eq. 3 "
                "is on. Pass demonstrations, or pin mu to 0 (mu_init=mu_min=mu_max=0) for plain GRPO."
            )
        if sft_dataset is None and controller.wants_entropy:
            raise ValueError(
                "`sft_dataset` is required: the entropy term measures entropy on demonstrations."
            )
        for name, dataset in (("sft_dataset", sft_dataset), ("val_dataset", val_dataset)):
            if dataset is not None and not isinstance(dataset, Dataset):
                raise TypeError(
                    f"`{name}` must be a map-style `datasets.Dataset` (it is sampled by index with its own seeded "
                    f"sampler), got {type(dataset).__name__}. Convert an IterableDataset with "
                    "`Dataset.from_generator(lambda: (yield from iterable))`."
                )
        if sft_dataset is not None:
            check_sft_columns(sft_dataset)
        if controller.wants_meta_gradient:
            if val_dataset is None:
                raise ValueError(
                    "`val_dataset` is required: the meta-gradient is on (meta_learning_rate="
                    f"{controller.meta_learning_rate}) and needs validation prompts for U. Pass a `val_dataset` or "
                    "set meta_learning_rate=0."
                )
        if val_dataset is not None:
            if "prompt" not in (val_dataset.column_names or []):
                raise ValueError(
                    f"`val_dataset` must have a `prompt` column; it has {val_dataset.column_names}."
                )
            if len(val_dataset) == 0:
                raise ValueError("`val_dataset` is empty.")

    @staticmethod
    def _check_parallel_setup(
        args: AMFTConfig, controller: MuController, world: int, deepspeed_config: dict | None
    ) -> None:
        """`deepspeed_config`: the DeepSpeed config in use (None: no DeepSpeed)."""
        if not controller.wants_meta_gradient:
            return
        if args.meta_val_batch_size % world:
            raise ValueError(
                f"`meta_val_batch_size` ({args.meta_val_batch_size}) must be a multiple of the number of processes "
                f"({world}): each process generates for an equal share of the validation prompts."
            )
        if deepspeed_config is None:
            return
        zero = deepspeed_config.get("zero_optimization") or {}
        stage = zero.get("stage", 0)
        if stage not in (1, 2, 3):
            raise ValueError(
                f"The meta-gradient (meta_learning_rate > 0) under DeepSpeed needs ZeRO stage 1, 2 or 3 (it reads "
                f"each process's gradient partition); the DeepSpeed config has zero_optimization.stage={stage!r}. "
                "Set the stage to 1-3, use DDP (`accelerate launch --multi_gpu`), or set meta_learning_rate=0."
            )
        for key in ("offload_optimizer", "offload_param"):
            device = (zero.get(key) or {}).get("device", "none")
            if device not in (None, "none"):
                raise ValueError(
                    f"The meta-gradient (meta_learning_rate > 0) does not run with DeepSpeed's "
                    f"zero_optimization.{key}.device={device!r}: offloaded gradient partitions are only complete "
                    f"at DeepSpeed's own step, not after each backward of a meta step. Set {key} to 'none', or "
                    "set meta_learning_rate=0 for entropy-only AMFT with offloading."
                )

    # ------------------------------------------------------------------------------------------------------
    # the step
    # ------------------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """GRPO's loss (already scaled for gradient accumulation), times the RL weight of this step."""
        loss = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        if self._plan is None:  # evaluation (prediction_step): GRPO's loss, unweighted
            return loss
        self._plan.rl_loss += float(loss.detach())
        return loss if self._rl_weight == 1.0 else loss * self._rl_weight

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._plan is None:
            self._plan = self._begin_step(model)
        plan = self._plan
        with self._meta_step_backwards(plan.meta):
            return self._training_micro_step(model, inputs, num_items_in_batch, plan)

    def _training_micro_step(self, model, inputs, num_items_in_batch, plan: _StepPlan) -> torch.Tensor:
        model.train()
        display = 0.0
        if plan.rl:
            self._rl_weight = 1.0 if plan.meta else 1.0 - plan.mu
            with self._defer_deepspeed_step(plan.sft):
                weighted = super().training_step(model, inputs, num_items_in_batch)
            display += float(weighted) * ((1.0 - plan.mu) if plan.meta else 1.0)
            if plan.meta:
                self._rl_buffer.take_grads()
        if plan.sft:
            sft_weight = 1.0 if (plan.meta or plan.warmup) else plan.mu
            nll_scaled = self._sft_micro_step(model, plan.sft_batches[plan.micro], sft_weight, plan)
            display += plan.mu * nll_scaled
            if plan.meta:
                self._sft_buffer.take_grads()
        plan.micro += 1
        if plan.micro == self.current_gradient_accumulation_steps:
            self._end_step(model, plan)
            self._plan = None
        return torch.tensor(display, device=self.args.device)

    @contextmanager
    def _defer_deepspeed_step(self, defer: bool):
        """Under DeepSpeed, keep the RL backward of the last micro-step off the accumulation boundary.

        Accelerate's DeepSpeed wrapper calls `engine.step()` after every backward taken while `sync_gradients` is
        on, i.e. after each backward of the last micro-step. The SFT backward follows the RL one, so without this the
        engine would step on the RL gradient alone, then step again on the SFT gradient.
        """
        state = self.accelerator.gradient_state
        if not (
            defer and self.accelerator.distributed_type == DistributedType.DEEPSPEED and state.sync_gradients
        ):
            yield
            return
        state._set_sync_gradients(False)
        try:
            yield
        finally:
            state._set_sync_gradients(True)

    @contextmanager
    def _meta_step_backwards(self, meta: bool):
        """Under DeepSpeed, during a meta step: every backward is taken at an accumulation boundary, none steps.

        At a boundary ZeRO reduces the gradient into each process's partition, where `ZeroGrads` reads it after each
        backward; the engine is stepped once, by `_meta_step`, on the combined gradient it writes there.
        """
        if not (meta and self.accelerator.distributed_type == DistributedType.DEEPSPEED):
            yield
            return
        wrapped = self.accelerator.deepspeed_engine_wrapped
        self.accelerator.deepspeed_engine_wrapped = _BoundaryBackwardWithoutStep(wrapped.engine)
        try:
            yield
        finally:
            self.accelerator.deepspeed_engine_wrapped = wrapped

    def _grad_access(self) -> TorchGrads | ZeroGrads:
        """Where this process's gradients live: `.grad`, or its ZeRO partition."""
        if self.accelerator.distributed_type != DistributedType.DEEPSPEED:
            return TorchGrads()
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

        engine = self.accelerator.deepspeed_engine_wrapped.engine
        if not isinstance(engine.optimizer, (DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3)):
            raise RuntimeError(
                "The meta-gradient under DeepSpeed reads the gradient partitions of a ZeRO stage 1-3 optimizer, but "
                f"the engine's optimizer is {type(engine.optimizer).__name__}. Use ZeRO stage 1-3 or set "
                "meta_learning_rate=0."
            )
        return ZeroGrads(engine.zero_optimization_stage())

    def _begin_step(self, model) -> _StepPlan:
        ctrl, step = self.mu_controller, self.state.global_step
        warmup = ctrl.is_warmup_step(step)
        mu = 1.0 if warmup else ctrl.mu
        if self.accelerator.num_processes > 1:
            self._check_same_on_all_processes(mu, "mu")
        pinned_sft_only = ctrl.mu_is_fixed and mu == 1.0
        meta = not warmup and ctrl.is_meta_step(step)
        entropy = not warmup and ctrl.wants_entropy
        sft = warmup or pinned_sft_only or mu > 0 or entropy or meta
        plan = _StepPlan(
            mu=mu, warmup=warmup, rl=not (warmup or pinned_sft_only), sft=sft, meta=meta, entropy=entropy
        )
        if entropy and ctrl.target_entropy is None:
            target = self._measure_target_entropy(model)
            ctrl.set_target_entropy(target)
            logger.info("AMFT: target entropy H* = %.4f nats/token (measured at step %d).", target, step)
        if sft:
            plan.sft_batches = self._draw_sft_batches(self.current_gradient_accumulation_steps)
            plan.sft_tokens = int(self._global_sum(sum(b.num_tokens for b in plan.sft_batches)))
        if meta:
            access = self._grad_access()
            self._rl_buffer = _GradientBuffer(self._trainable_params, access)
            self._sft_buffer = _GradientBuffer(self._trainable_params, access)
        return plan

    def _draw_sft_batches(self, num_micro: int) -> list[SFTBatch]:
        """This step's SFT examples: the next `batch x micro-steps x processes` of the stream, this rank's slice."""
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        per_micro = self._sft_batch_size
        indices = self._sft_stream.take(per_micro * num_micro * world)
        local = indices[rank * per_micro * num_micro : (rank + 1) * per_micro * num_micro]
        return [self._collate_sft(local[m * per_micro : (m + 1) * per_micro]) for m in range(num_micro)]

    def _collate_sft(self, indices: list[int]) -> SFTBatch:
        """The tokenised demonstrations at `indices`, padded into one batch."""
        return collate_sft([self.sft_dataset[i] for i in indices], self._tokenizer.pad_token_id)

    def _sft_micro_step(self, model, batch: SFTBatch, weight: float, plan: _StepPlan) -> float:
        """Forward (and, when `weight > 0` or at a meta step, backward) one SFT micro-batch; Eq. 2.

        The loss is `sum of NLL over completion tokens / completion tokens of the whole step (all processes)`,
        times the process count (DDP averages gradients), so summing micro-steps gives the token mean.
        Returns this micro-batch's share of the step's token-mean NLL.
        """
        batch = batch.to(self.accelerator.device)
        needs_grad = weight > 0 or plan.meta
        context = torch.enable_grad() if needs_grad else torch.no_grad()
        with context, self.compute_loss_context_manager():
            logps, entropies = self._sft_token_stats(model, batch, compute_entropy=plan.entropy)
        mask = batch.completion_mask.to(logps.dtype)
        nll_sum = -(logps * mask).sum()
        scale = self.accelerator.num_processes / max(plan.sft_tokens, 1)
        if needs_grad:
            self._backward(nll_sum * scale * weight)
        plan.sft_nll_sum += float(nll_sum.detach())
        if entropies is not None:
            plan.entropy_sum += float((entropies.detach() * mask).sum())
        return float(nll_sum.detach()) * scale / self.accelerator.num_processes

    def _sft_token_stats(
        self, model, batch: SFTBatch, compute_entropy: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-token log-probs and entropies of the demonstration completions at temperature 1. Shapes (B, C).

        At `temperature == 1` this is TRL's fused log-prob head (no logits materialised). Otherwise the fused head
        would apply the sampling temperature, so the logits of the completion positions are computed directly.
        """
        input_ids = torch.cat([batch.prompt_ids, batch.completion_ids], dim=1)
        attention_mask = torch.cat([batch.prompt_mask, batch.completion_mask], dim=1)
        c = batch.completion_ids.size(1)
        if self.temperature == 1.0:
            logps, entropies, _ = self._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, c, compute_entropy=compute_entropy
            )
            return logps, entropies
        logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=c + 1).logits[
            :, :-1
        ]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        logps = logprobs.gather(-1, batch.completion_ids.unsqueeze(-1)).squeeze(-1)
        entropies = -(logprobs.exp() * logprobs).sum(-1) if compute_entropy else None
        return logps, entropies

    def _backward(self, loss: torch.Tensor) -> None:
        kwargs = (
            {"scale_wrt_gas": False} if self.accelerator.distributed_type == DistributedType.DEEPSPEED else {}
        )
        self.accelerator.backward(loss, **kwargs)

    def _end_step(self, model, plan: _StepPlan) -> None:
        """Last micro-step: the meta-gradient (if due), then hand the measurements to the controller and log."""
        metrics = self._metrics["train"]
        metrics["amft/mu"].append(plan.mu)
        if plan.sft:
            metrics["amft/sft_loss"].append(self._global_mean(plan.sft_nll_sum, plan.sft_tokens))
        if plan.rl:
            metrics["amft/rl_loss"].append(self._global_sum(plan.rl_loss) / self.accelerator.num_processes)
        if plan.warmup:
            return
        measurements = StepMeasurements()
        if plan.entropy:
            measurements.entropy = self._global_mean(plan.entropy_sum, plan.sft_tokens)
            metrics["amft/entropy"].append(measurements.entropy)
        if plan.meta:
            self._meta_step(model, plan, measurements)
            metrics["amft/meta_gradient"].append(measurements.meta_gradient)
            metrics["amft/meta_cosine"].append(measurements.cosine)
            metrics["amft/val_reward"].append(measurements.val_reward)
        if self.mu_controller.target_entropy is not None:
            metrics["amft/target_entropy"].append(self.mu_controller.target_entropy)
        self.mu_controller.record(measurements)

    def _check_same_on_all_processes(self, value: float, name: str) -> None:
        """One scalar all-gather per step: the controller is replicated, so a divergence is a bug, not noise."""
        values = self.accelerator.gather(
            torch.tensor([value], device=self.accelerator.device, dtype=torch.float64)
        )
        if not bool((values == values[0]).all()):
            raise RuntimeError(
                f"AMFT: {name} differs across processes at step {self.state.global_step}: {values.tolist()}. Every "
                "measurement feeding the controller is reduced over all processes, so this means a process saw "
                "different data or a different config."
            )

    def _global_sum(self, local_value: float) -> float:
        """Sum of a per-process scalar over all processes (float64)."""
        local = torch.tensor(local_value, device=self.accelerator.device, dtype=torch.float64)
        return float(self.accelerator.gather(local).sum())

    def _global_mean(self, local_sum: float, global_count: int) -> float:
        return self._global_sum(local_sum) / max(global_count, 1)

    # ------------------------------------------------------------------------------------------------------
    # Eq. 25
    # ------------------------------------------------------------------------------------------------------
    def _meta_step(self, model, plan: _StepPlan, measurements: StepMeasurements) -> None:
        """Eq. 25 at this step's parameters, then the gradient `(1 - mu) * grad L_RL + mu * grad L_SFT` for the optimizer.

        Alive here besides the framework's own gradient storage: the RL and SFT gradient buffers (whole gradients, or
        this process's ZeRO partition). That storage holds the gradient of the validation loss `-U` while the inner
        products are taken, then the combined gradient (built in the RL buffer, in place).
        """
        access = self._rl_buffer.access
        grad_sft, grad_rl = self._sft_buffer.tensors, self._rl_buffer.tensors
        if self.accelerator.num_processes > 1 and not access.sharded:
            # DDP all-reduced only the backward passes of the last micro-step; earlier micro-steps were accumulated
            # under `no_sync` and moved out of `.grad` before any reduction. Averaging the buffers makes them the
            # global gradients (averaging the already-reduced part again leaves it unchanged).
            _average_across_processes(grad_sft + grad_rl)
        measurements.val_reward = self._validation_backward(model)
        grad_val = [access.peek(p) for p in self._trainable_params]
        # grad U = -grad_val; d = grad_sft - grad_rl. Under ZeRO each process holds a disjoint partition of every
        # gradient, so each inner product is the sum of the processes' partial sums.
        dots = [
            grad_dot(grad_val, grad_sft),
            grad_dot(grad_val, grad_rl),
            grad_dot(grad_sft, grad_sft),
            grad_dot(grad_rl, grad_rl),
            grad_dot(grad_sft, grad_rl),
            grad_dot(grad_val, grad_val),
        ]
        if access.sharded and self.accelerator.num_processes > 1:
            dots = self.accelerator.reduce(
                torch.tensor(dots, dtype=torch.float64, device=self.accelerator.device), reduction="sum"
            ).tolist()
        val_sft, val_rl, sft_sq, rl_sq, sft_rl, val_sq = dots
        utility_dot_direction = -(val_sft - val_rl)
        alpha = self.optimizer.param_groups[0]["lr"]
        measurements.grad_utility_dot_direction = utility_dot_direction
        measurements.grad_utility_norm = math.sqrt(max(val_sq, 0.0))
        measurements.direction_norm = math.sqrt(max(sft_sq + rl_sq - 2.0 * sft_rl, 0.0))
        measurements.meta_gradient = meta_gradient(utility_dot_direction, alpha)
        measurements.cosine = cosine_meta_gradient(
            utility_dot_direction, measurements.grad_utility_norm, measurements.direction_norm
        )
        mu = plan.mu
        for p, r, s in zip(self._trainable_params, grad_rl, grad_sft, strict=True):
            access.put(p, None if r is None else r.mul_(1.0 - mu).add_(s, alpha=mu))
        self._rl_buffer = self._sft_buffer = None
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            # every backward of this step was kept from stepping the engine (`_meta_step_backwards`): step it once
            engine = self.accelerator.deepspeed_engine_wrapped.engine
            engine.set_gradient_accumulation_boundary(True)
            engine.step()

    def _validation_backward(self, model) -> float:
        """Validation rollouts through the trainer's own generation path; backward of the PG surrogate of -U.

        The surrogate is `-sum_i A_i * sum_t log pi(y_it) / (validation completion tokens)`, with `A_i` GRPO's
        group-normalised advantages: its gradient is the policy-gradient estimate of -grad U (Eq. 4) at the sampling
        temperature. Training metrics and completion logs are left untouched. Returns the mean validation reward.
        """
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        indices = self._val_stream.take(self.args.meta_val_batch_size)
        rows = [self.val_dataset[i] for i in indices[rank::world] for _ in range(self.num_generations)]
        with self._isolated_generation_logs() as val_metrics:
            out = self._generate_and_score_completions(rows)
        val_reward = val_metrics["reward"][0] if val_metrics.get("reward") else float("nan")
        prompt_ids, completion_ids = out["prompt_ids"], out["completion_ids"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
        mask = out["completion_mask"] if "tool_mask" not in out else out["completion_mask"] * out["tool_mask"]
        with self.compute_loss_context_manager():
            logps, _, _ = self._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, completion_ids.size(1)
            )
        advantages = out["advantages"]
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(1)
        tokens = self.accelerator.gather(mask.sum()).sum().clamp(min=1)
        loss = -(advantages * logps * mask).sum() / tokens * world
        self._backward(loss)
        return val_reward

    @contextmanager
    def _isolated_generation_logs(self):
        """Run generation without touching the training metrics, completion tables and token count.

        Yields the metrics the validation generation logged (its `reward`, ...).
        """
        saved = (self._metrics, self._logs, self._pending_extra_logs, self._pending_metrics)
        tokens_seen = self.state.num_input_tokens_seen

        def empty_like(container):
            if isinstance(container, deque):
                return deque(maxlen=container.maxlen)
            if isinstance(container, defaultdict):
                return defaultdict(container.default_factory)
            return {k: empty_like(v) for k, v in container.items()}

        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._logs = empty_like(self._logs)
        self._pending_extra_logs, self._pending_metrics = defaultdict(list), defaultdict(list)
        try:
            yield self._metrics["train"]
        finally:
            self._metrics, self._logs, self._pending_extra_logs, self._pending_metrics = saved
            self.state.num_input_tokens_seen = tokens_seen

    # ------------------------------------------------------------------------------------------------------
    # H* (Algorithm 2, line 11)
    # ------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _measure_target_entropy(self, model) -> float:
        """Mean token entropy (temperature 1) of the policy on a fixed, seeded subset of the demonstrations."""
        n = min(self.args.target_entropy_num_samples, len(self.sft_dataset))
        indices = InfiniteStream(len(self.sft_dataset), seed=self.args.seed + 2).take(n)
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        local = indices[rank::world]
        entropy_sum, tokens = 0.0, 0
        for start in range(0, len(local), self._sft_batch_size):
            batch = self._collate_sft(local[start : start + self._sft_batch_size]).to(self.accelerator.device)
            with self.compute_loss_context_manager():
                _, entropies = self._sft_token_stats(model, batch, compute_entropy=True)
            entropy_sum += float((entropies * batch.completion_mask).sum())
            tokens += batch.num_tokens
        return self._global_mean(entropy_sum, int(self._global_sum(tokens)))

    # ------------------------------------------------------------------------------------------------------
    # logging and checkpoints
    # ------------------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training:
            history = self.mu_controller.state.history
            metrics = self._metrics["train"]
            for record in history[self._controller_history_logged :]:
                metrics["amft/entropy_term"].append(record["entropy_term"])
                metrics["amft/meta_term"].append(record["meta_term"])
            self._controller_history_logged = len(history)
            if self.mu_controller.state.num_skipped_nonfinite:
                metrics["amft/skipped_nonfinite"].append(
                    float(self.mu_controller.state.num_skipped_nonfinite)
                )
        super().log(logs, start_time)

    def amft_state_dict(self) -> dict[str, Any]:
        """Controller state plus the SFT / validation stream positions: what exact resume needs."""
        state: dict[str, Any] = {"controller": self.mu_controller.state_dict()}
        if self.sft_dataset is not None:
            state["sft_stream"] = self._sft_stream.state_dict()
        if self.val_dataset is not None:
            state["val_stream"] = self._val_stream.state_dict()
        return state

    def load_amft_state_dict(self, state: dict[str, Any]) -> None:
        self.mu_controller.load_state_dict(state["controller"])
        self._controller_history_logged = len(self.mu_controller.state.history)
        if "sft_stream" in state and self.sft_dataset is not None:
            self._sft_stream.load_state_dict(state["sft_stream"])
        if "val_stream" in state and self.val_dataset is not None:
            self._val_stream.load_state_dict(state["val_stream"])

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = os.path.join(
                self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            )
            with open(os.path.join(folder, AMFT_STATE_NAME), "w") as f:
                json.dump(self.amft_state_dict(), f)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, AMFT_STATE_NAME)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{path} is missing: this checkpoint was not written by AMFTTrainer, so mu, the target entropy and "
                "the SFT/validation stream positions cannot be restored."
            )
        with open(path) as f:
            self.load_amft_state_dict(json.load(f))
