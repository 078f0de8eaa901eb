"""`AMFTTrainer`: TRL's `GRPOTrainer` plus an SFT term, weighed against GRPO's by a balancing strategy.

Each optimizer step trains on `w_RL * L_RL + w_SFT * L_SFT` (AMFT paper, Eq. 3 for `w = (1 - mu, mu)`):

- `L_RL` is exactly GRPOTrainer's loss for the configured `loss_type`: its `training_step` (generation, scoring, loss,
  backward) is reused, and only `compute_loss` is touched, to scale it by `w_RL` and, for strategies with per-rollout
  weights, to hand it other advantages (`BalancingStrategy.rl_advantages`);
- `L_SFT` is the token-mean NLL of a batch of demonstrations (Eq. 2) at temperature 1, normalised by the completion
  tokens of the whole step's SFT batch so that it does not change with the gradient-accumulation layout, like TRL's
  `dapo` loss; strategies may weight its tokens (`BalancingStrategy.sft_token_weights`).

The strategy (`amft_trl.balancing`, chosen by `AMFTConfig.balancing`) decides what each step does (`StepPlan`): its
weights, whether rollouts are generated, whether an SFT batch is drawn, the measurements it wants (the entropy H_t,
the target H*, the meta-gradient of Eq. 25). This module only wires TRL's flow to it:

- `_begin_step` asks for the plan at a step's first micro-step, measures H* if asked, draws the SFT batch, and for a
  meta step runs the validation rollouts and their backward (`amft_trl._meta_step`);
- `_micro_step` runs GRPO's micro-step and the SFT micro-step, each backward wrapped by the meta step when there is
  one;
- `_end_step` reduces the step's measurements over processes, hands them to the strategy and logs them; the strategy
  updates itself in `on_step_end`, after the optimizer step.

Where gradients live under DDP and DeepSpeed is `amft_trl._distributed`; every private member of TRL, transformers,
Accelerate and DeepSpeed touched is listed in `amft_trl._trl_compat` (the private methods overridden here included).

Simplification, documented: the strategy's state after step t (AMFT's mu) is used from step t + 1 on (Algorithm 2
applies mu to step t's own loss, which would need the entropy before the backward, i.e. a second forward).
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.utils import DistributedType, gather_object
from datasets import Dataset
from transformers import TrainerCallback
from trl import GRPOTrainer
from trl.data_utils import is_conversational
from trl.import_utils import is_vllm_available

from . import _trl_compat
from ._distributed import (
    BoundaryBackwardWithoutStep,
    check_parallel_setup,
    global_sum,
    grad_access,
    launcher_deepspeed_config,
)
from ._meta_step import MetaStep, validation_backward
from ._reward_columns import check_reward_columns
from .attached_demonstrations import AttachedDemonstrations, DemonstrationMicroBatch
from .balancing import BalancingStrategy, RolloutBatch, StepMeasurements, StepPlan, build_strategy
from .balancing.luffy import (
    LUFFYStrategy,
    aggregate_token_loss,
    demonstration_completion_ids,
    off_policy_rows,
    off_policy_token_loss,
)
from .balancing.relift import ReLIFTStrategy, all_failed
from .config import AMFTConfig
from .sft_data import (
    InfiniteStream,
    SFTBatch,
    as_completion,
    check_sft_columns,
    collate_sft,
    collate_vision_sft,
    image_column,
    prepare_vision_sft_dataset,
    row_images,
    split_image_parts,
    tokenize_prompt_completion,
    tokenize_sft_dataset,
    vision_demonstration,
)
from .vision import check_image_inputs, first_image_part, reload_converted_checkpoint

logger = logging.getLogger(__name__)

AMFT_STATE_NAME = "amft_state.json"
AMFT_STATE_VERSION = 2
#: The cumulative token counts logged as `amft/<key>_tokens`: `sft`, the demonstration (completion) tokens trained on
#: (the SFT batches, and HPT's demonstrations of the prompts sent to SFT); `completion`, the completion tokens of the
#: training rollouts; `val_completion`, those of AMFT's validation rollouts (meta steps). Summed over processes.
TOKEN_COUNTS = ("sft", "completion", "val_completion")

# the columns TRL's `is_conversational` may read a row's format from (it takes any one of those present)
_TRL_FORMAT_KEYS = ("prompt", "chosen", "rejected", "completion", "messages")


@dataclass
class _StepState:
    """One optimizer step in progress: its plan, its SFT batch, and what it measured so far (this process)."""

    plan: StepPlan
    sft_batches: list[SFTBatch] = field(default_factory=list)
    sft_tokens: int = 0  # completion tokens of the step's SFT batch, over all processes
    micro: int = 0
    meta: MetaStep | None = None
    seconds: float = 0.0
    rl_loss: float = 0.0  # GRPO's loss summed over micro-steps (already scaled for accumulation), unweighted
    last_rl_loss: float = 0.0
    rl_backward_weight: float = 1.0  # the weight the current RL backward is taken with
    sft_follows: bool = False  # an SFT backward follows the RL one in the current micro-step
    restore_sync: bool = False
    gated: DemonstrationMicroBatch | None = None  # this micro-step's attached demonstrations (train_column)
    sft_nll_sum: float = 0.0  # unweighted NLL summed over the step's demonstration tokens
    sft_token_count: float = 0.0  # demonstration tokens the NLL was summed over
    sft_weight_sum: float = 0.0  # effective SFT weight summed over those tokens
    entropy_sum: float = 0.0
    prompts: float = 0.0  # RL prompts of the step (train_column strategies)
    prompts_to_sft: float = 0.0
    unscorable: bool = False  # every reward of the step's rollouts was None or NaN


class AMFTTrainer(GRPOTrainer):
    """Single-stage SFT + GRPO on top of [`~trl.GRPOTrainer`], balanced by a strategy (AMFT by default).

    Args:
        model, reward_funcs, args, train_dataset, eval_dataset, processing_class, ...: as for `GRPOTrainer`
            (`args` must be an [`AMFTConfig`]). `train_dataset` holds the RL prompts and reward columns.
        sft_dataset: demonstrations in TRL's prompt-completion format (standard or conversational), or a
            conversational `messages` column. Required when the strategy trains on demonstrations from it (every
            strategy but `hpt` without warm-up, and AMFT with mu pinned to 0).
        val_dataset: prompts plus reward columns for AMFT's meta-objective U (Eq. 4). Required when the
            meta-gradient is on (`balancing="amft"`, `meta_learning_rate > 0` and mu not pinned).
        strategy: a `BalancingStrategy` to use instead of the one `args.balancing` names (e.g. a subclass).
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
        strategy: BalancingStrategy | None = None,
        callbacks: list[TrainerCallback] | None = None,
        **kwargs: Any,
    ):
        if args is None:
            name = model if isinstance(model, str) else model.config.name_or_path
            args = AMFTConfig(f"{str(name).split('/')[-1]}-AMFT")
        if not isinstance(args, AMFTConfig):
            raise TypeError(
                f"`args` must be an AMFTConfig (a GRPOConfig with AMFT's fields), got {type(args).__name__}. "
                "Build it with `AMFTConfig(**grpo_config.to_dict(), ...)`."
            )
        if (
            args.use_vllm and not is_vllm_available()
        ):  # before the model is loaded, unlike GRPOTrainer's check
            raise ImportError(
                "`use_vllm=True` but vLLM is not installed: install it with `pip install 'amft-trl[vllm]'` (training "
                "and validation rollouts both go through it), or set `use_vllm=False` to generate with transformers."
            )
        strategy = strategy or build_strategy(args)
        if not isinstance(strategy, BalancingStrategy):
            raise TypeError(f"`strategy` must be a BalancingStrategy, got {type(strategy).__name__}.")
        self._check_datasets(strategy, train_dataset, sft_dataset, val_dataset)
        check_reward_columns(  # the columns each reward reads by signature, in every dataset it scores
            reward_funcs,
            {
                "train_dataset": train_dataset if strategy.uses_rollouts else None,
                "val_dataset": val_dataset if strategy.needs_val_dataset else None,
                "eval_dataset": eval_dataset,
            },
            environments=kwargs.get("environment_factory") is not None,
            columns_dropped_from=("train_dataset", "eval_dataset") if args.remove_unused_columns else (),
        )
        # before the model is loaded: the layout as the launcher set it up (checked again on the Accelerator below)
        check_parallel_setup(
            args, strategy.needs_val_dataset, args.world_size, launcher_deepspeed_config(args)
        )
        if strategy.sft_source == "train_column":
            AttachedDemonstrations.check_layout(args, strategy)
        # before GRPOTrainer, which fails obscurely on some of these (a text-only model with a processor)
        image_datasets = {
            "train_dataset": train_dataset,
            "sft_dataset": sft_dataset,
            "val_dataset": val_dataset,
        }
        check_image_inputs(model, processing_class, image_datasets, args.trust_remote_code)
        self.strategy = strategy
        super().__init__(
            model=model,
            reward_funcs=reward_funcs,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=[*(callbacks or []), strategy],
            **kwargs,
        )
        plugin = self.accelerator.state.deepspeed_plugin
        deepspeed = self.accelerator.distributed_type == DistributedType.DEEPSPEED
        check_parallel_setup(
            args,
            strategy.needs_val_dataset,
            self.accelerator.num_processes,
            plugin.deepspeed_config if deepspeed and plugin is not None else None,
        )
        self._trainable_params = [p for p in self.model.parameters() if p.requires_grad]
        if strategy.needs_val_dataset and not self._trainable_params:
            raise ValueError(
                "The meta-gradient needs trainable parameters, but every parameter of the model is frozen."
            )

        if processing_class is None:  # GRPOTrainer loaded the model's own: check it too
            check_image_inputs(self.model, self.processing_class, image_datasets)
        self.sft_dataset, self.sft_num_dropped = None, 0
        self._sft_image_column = image_column(sft_dataset)
        if self._sft_image_column is not None:  # raw rows, processed batch by batch by TRL's VLM collator
            self.sft_dataset, self.sft_num_dropped = prepare_vision_sft_dataset(
                sft_dataset, self.processing_class, args.max_sft_length
            )
            self._sft_stream = InfiniteStream(len(self.sft_dataset), seed=args.seed)
        elif sft_dataset is not None:
            self.sft_dataset, self.sft_num_dropped = tokenize_sft_dataset(
                sft_dataset, self.processing_class, args.max_sft_length, chat_template=self.chat_template
            )
            self._sft_stream = InfiniteStream(len(self.sft_dataset), seed=args.seed)
        self.val_dataset = val_dataset
        if val_dataset is not None:
            self._val_stream = InfiniteStream(len(val_dataset), seed=args.seed + 1)
        self._sft_batch_size = args.sft_per_device_train_batch_size or args.per_device_train_batch_size
        # image prompts: demonstrations read from train_dataset (HPT, ReLIFT) carry their row's images, from its
        # image column or from the image parts of its prompt
        self._rl_image_column = image_column(train_dataset)
        self._rl_image_parts = (
            self._rl_image_column is None
            and getattr(strategy, "demonstration_column", None) is not None
            and isinstance(train_dataset, Dataset)
            and first_image_part(train_dataset) is not None
        )
        vision = self._rl_image_column is not None or self._rl_image_parts
        self._attached: AttachedDemonstrations | None = None
        if strategy.sft_source == "train_column":
            tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
            self._attached = AttachedDemonstrations(
                strategy,
                self.accelerator,
                self._tokenize_demonstration,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                gradient_accumulation_steps=args.gradient_accumulation_steps,
                steps_per_generation=args.steps_per_generation,
                num_generations=self.num_generations,
                image_column=self._rl_image_column,
                collate=self._collate_demonstrations if vision else None,
                placeholder=self._vision_placeholder if vision else None,
            )
        self._step_state: _StepState | None = None  # set for the duration of one optimizer step
        self._captured_rewards: torch.Tensor | None = None
        self._last_generation_unscorable = False
        self._generating_validation = False
        self._rl_entropy_hook = None
        self._num_skipped_rl_steps = 0
        # what the run has trained on and generated, cumulative over the run (logged as amft/<key>_tokens)
        self._token_counts = dict.fromkeys(TOKEN_COUNTS, 0.0)
        self._luffy_setup()  # LUFFY (balancing="luffy"): demonstrations as off-policy rollouts
        self._relift_setup()  # ReLIFT (balancing="relift"): a buffer of all-failed prompts

    # ------------------------------------------------------------------------------------------------------
    # construction-time checks
    # ------------------------------------------------------------------------------------------------------
    @staticmethod
    def _check_datasets(strategy: BalancingStrategy, train_dataset, sft_dataset, val_dataset) -> None:
        name = f"balancing={strategy.name!r}" if strategy.name else type(strategy).__name__
        if sft_dataset is None and strategy.needs_sft_dataset:
            raise ValueError(
                f"`sft_dataset` is required: {name} trains on demonstrations (the SFT term of Eq. 3, or an SFT "
                "warm-up). Pass demonstrations, or for plain GRPO pin mu to 0 (mu_init=mu_min=mu_max=0, "
                "sft_warmup_steps=0)."
            )
        if val_dataset is None and strategy.needs_val_dataset:
            raise ValueError(
                f"`val_dataset` is required: the meta-gradient is on ({name}) and needs validation prompts for U. "
                "Pass a `val_dataset` or set meta_learning_rate=0."
            )
        for label, dataset in (("sft_dataset", sft_dataset), ("val_dataset", val_dataset)):
            if dataset is not None and not isinstance(dataset, Dataset):
                raise TypeError(
                    f"`{label}` must be a map-style `datasets.Dataset` (it is sampled by index with its own seeded "
                    f"sampler), got {type(dataset).__name__}. Convert an IterableDataset with "
                    "`Dataset.from_generator(lambda: (yield from iterable))`."
                )
        for label, dataset in (
            ("train_dataset", train_dataset),
            ("sft_dataset", sft_dataset),
            ("val_dataset", val_dataset),
        ):
            if isinstance(dataset, Dataset) and len(dataset) == 0:
                raise ValueError(f"`{label}` is empty.")
        if sft_dataset is not None:
            check_sft_columns(sft_dataset)
        if val_dataset is not None and "prompt" not in (val_dataset.column_names or []):
            raise ValueError(f"`val_dataset` must have a `prompt` column; it has {val_dataset.column_names}.")
        strategy.check_datasets(train_dataset=train_dataset, sft_dataset=sft_dataset, val_dataset=val_dataset)
        column = getattr(strategy, "demonstration_column", None)
        if (
            column in _TRL_FORMAT_KEYS
            and isinstance(train_dataset, Dataset)
            and {"prompt", column} <= set(train_dataset.column_names)
        ):
            row = train_dataset.select_columns(["prompt", column])[0]
            prompt_chat = is_conversational({"prompt": row["prompt"]})
            if prompt_chat != is_conversational({"prompt": row[column]}):
                raise ValueError(
                    f"{name} reads the demonstrations from train_dataset[{column!r}], whose row 0 is "
                    f"{'not ' if prompt_chat else ''}a list of messages while the prompts are"
                    f"{'' if prompt_chat else ' not'}. TRL tells a dataset's format from whichever of its "
                    f"{list(_TRL_FORMAT_KEYS)} columns it happens to pick (an unordered choice), so GRPOTrainer would "
                    "read these prompts as conversational or not at random. Rename the column (e.g. `demonstration`, "
                    "the strategy's default), or give the demonstrations in the prompts' format."
                )

    # ------------------------------------------------------------------------------------------------------
    # the learning-rate schedule (sft_warmup_learning_rate, reset_optimizer_after_warmup)
    # ------------------------------------------------------------------------------------------------------
    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        """One schedule over all steps, or, with a warm-up of its own, two: the warm-up phase over
        `sft_warmup_steps` at `sft_warmup_learning_rate`, and a fresh one over the remaining steps at `learning_rate`.
        Each phase is `lr_scheduler_type` with its own warm-up (`warmup_ratio` / `warmup_steps` of its length)."""
        if not self.args.two_phase_schedule or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        from torch.optim.lr_scheduler import LambdaLR
        from transformers import get_scheduler

        optimizer = self.optimizer if optimizer is None else optimizer
        warmup = self.strategy.sft_warmup_steps
        rest = max(num_training_steps - warmup, 1)
        peak = self.args.sft_warmup_learning_rate
        factor = 1.0 if peak is None else peak / self.args.learning_rate

        def phase(length: int):
            dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
            scheduler = get_scheduler(
                self.args.lr_scheduler_type,
                optimizer=dummy,
                num_warmup_steps=self.args.get_warmup_steps(length),
                num_training_steps=length,
                scheduler_specific_kwargs=self.args.lr_scheduler_kwargs,
            )
            if not isinstance(scheduler, LambdaLR):
                raise ValueError(
                    f"`lr_scheduler_type={self.args.lr_scheduler_type!r}` cannot be split into a warm-up phase and a "
                    "later phase (sft_warmup_learning_rate / reset_optimizer_after_warmup need a LambdaLR schedule "
                    "such as linear, cosine or constant)."
                )
            return scheduler.lr_lambdas[0]

        first, second = phase(warmup), phase(rest)
        self.lr_scheduler = LambdaLR(
            optimizer, lambda step: factor * first(step) if step < warmup else second(step - warmup)
        )
        _trl_compat.mark_lr_scheduler_created(self)
        return self.lr_scheduler

    def _reset_optimizer_state(self) -> None:
        """A fresh optimizer state (moments, step counts) for the phase after the warm-up, as a new trainer would have."""
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        optimizer.state.clear()
        logger.info("AMFT: optimizer state reset after the SFT warm-up (step %d).", self.state.global_step)

    # ------------------------------------------------------------------------------------------------------
    # the step
    # ------------------------------------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        start = time.perf_counter()
        model.train()  # before anything generates: TRL's generation reads the mode (after an evaluation or a resume)
        if self._step_state is None:
            self._step_state = self._begin_step(model)
        step = self._step_state
        with self._meta_backwards(step):
            if step.micro == 0 and step.meta is not None:
                self._validation_for_meta_step(model, step)
            display = self._micro_step(model, inputs, num_items_in_batch, step)
            step.micro += 1
            if step.micro == self.current_gradient_accumulation_steps:
                self._end_step(step)
                self._step_state = None
        step.seconds += time.perf_counter() - start
        if self._step_state is None:  # the step's time: RL, SFT and meta, not only GRPO's `training_step`
            _trl_compat.replace_last_step_time(self, step.seconds, appended_by_trl=step.plan.rl)
        return torch.tensor(display, device=self.args.device)

    def _begin_step(self, model) -> _StepState:
        global_step = self.state.global_step
        plan = self.strategy.plan(global_step)
        if self.accelerator.num_processes > 1:
            self._check_same_on_all_processes(
                {
                    "mu": plan.sft_weight,
                    "w_RL": plan.rl_weight,
                    "plan.rl": plan.rl,
                    "plan.sft": plan.sft,
                    "plan.meta": plan.meta,
                    "plan.measure_entropy": plan.measure_entropy,
                }
            )
        if self._attached is not None:
            self._attached.check_plan(plan, global_step)
        if self.args.reset_optimizer_after_warmup and global_step == self.strategy.sft_warmup_steps > 0:
            self._reset_optimizer_state()
        if plan.measure_target_entropy:
            target = self._measure_target_entropy(model)
            self.strategy.set_target_entropy(target)
            logger.info(
                "AMFT: target entropy H* = %.4f nats/token (measured at step %d).", target, global_step
            )
        step = _StepState(plan)
        if plan.sft:
            buffered = self.strategy.buffered_demonstrations()  # ReLIFT's buffer, else the sft_dataset stream
            if buffered is None:
                step.sft_batches = self._draw_sft_batches(self.current_gradient_accumulation_steps)
            else:
                step.sft_batches = self._relift_sft_batches(
                    buffered, self.current_gradient_accumulation_steps
                )
            step.sft_tokens = int(
                global_sum(self.accelerator, float(sum(b.num_tokens for b in step.sft_batches)))
            )
            self._token_counts["sft"] += step.sft_tokens
        if plan.meta:
            step.meta = MetaStep(
                self._trainable_params,
                grad_access(self.accelerator),
                self.accelerator,
                self.args.meta_diagnostics,
            )
        return step

    def _micro_step(self, model, inputs, num_items_in_batch, step: _StepState) -> float:
        plan = step.plan
        display = 0.0
        if plan.rl:
            step.sft_follows = plan.sft
            with self._around_backward(step, "rl", plan.rl_weight) as weight:
                step.rl_backward_weight = weight
                step.gated = None
                super().training_step(model, inputs, num_items_in_batch)
                if step.restore_sync:
                    _trl_compat.set_sync_gradients(self.accelerator, True)
                    step.restore_sync = False
            display += plan.rl_weight * step.last_rl_loss
        if plan.sft:
            weight = 1.0 if plan.warmup else plan.sft_weight
            display += self._sft_micro_step(model, step.sft_batches[step.micro], weight, step)
        elif step.gated is not None:
            gated = step.gated
            display += self._sft_micro_step(
                model, gated.batch, plan.sft_weight, step, gated.row_weights, gated.normalizer
            )
        return display

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """GRPO's loss (already scaled for gradient accumulation) times the step's RL weight, with the strategy's
        advantages when it has per-rollout weights."""
        step = self._step_state
        if step is None:  # evaluation (prediction_step): GRPO's loss, unweighted
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # a copy: TRL's buffered batch stays as generated (it is reused when num_iterations > 1)
        inputs = dict(inputs)
        rollouts = self._rollout_batch(inputs)
        step.unscorable |= self._last_generation_unscorable
        if self._attached is not None:
            attached = self._attached.micro_step()
            step.prompts += attached.prompts
            step.prompts_to_sft += attached.prompts_to_sft
            step.gated = attached.sft
            step.sft_follows = step.gated is not None
        if self.strategy.rl_weights_need_entropy:

            def hook(entropies: torch.Tensor) -> None:
                # called from the RL loss's own forward, once per micro-step (`_get_per_token_logps_and_entropies`)
                rollouts.entropies = entropies
                inputs["advantages"] = self.strategy.rl_advantages(rollouts)

            self._rl_entropy_hook = hook
            try:
                loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            finally:
                self._rl_entropy_hook = None
        else:
            advantages = self.strategy.rl_advantages(rollouts)
            if advantages is not None:
                inputs["advantages"] = advantages
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        step.last_rl_loss = float(loss.detach())
        step.rl_loss += step.last_rl_loss
        if (
            step.sft_follows
            and self.accelerator.distributed_type == DistributedType.DEEPSPEED
            and self.accelerator.sync_gradients
        ):
            # Accelerate's DeepSpeed wrapper steps the engine after every backward taken at the accumulation
            # boundary: keep this RL backward off it, so that the engine steps once, after the SFT backward.
            _trl_compat.set_sync_gradients(self.accelerator, False)
            step.restore_sync = True
        weight = step.rl_backward_weight
        return loss if weight == 1.0 else loss * weight

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        out = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        luffy_hook, self._luffy_logps_hook = self._luffy_logps_hook, None
        if luffy_hook is not None:  # armed by the LUFFY `_compute_loss` for the RL loss's forward only
            luffy_hook(out[0])
        hook, self._rl_entropy_hook = self._rl_entropy_hook, None
        if hook is not None:  # armed by `compute_loss` for the RL loss's forward only
            hook(out[1])
        return out

    def _sft_micro_step(
        self,
        model,
        batch: SFTBatch,
        weight: float,
        step: _StepState,
        row_weights: torch.Tensor | None = None,
        normalizer: float | None = None,
    ) -> float:
        """Forward (and, when `weight > 0` or at a meta step, backward) one SFT micro-batch; Eq. 2.

        The loss is `sum of weighted NLL over completion tokens / completion tokens of the whole step (all
        processes)`, times the process count (DDP averages gradients), so summing micro-steps gives the token mean.
        `row_weights` / `normalizer`: per-demonstration weights, and the loss's divisor on this process instead (the
        attached demonstrations' own, `amft_trl.attached_demonstrations`). Returns this micro-batch's share of the
        step's weighted loss.
        """
        plan = step.plan
        batch = batch.to(self.accelerator.device)
        needs_grad = weight > 0 or step.meta is not None
        strategy_weights = not plan.warmup
        compute_entropy = plan.measure_entropy or (
            strategy_weights and self.strategy.sft_token_weights_need_entropy
        )
        if normalizer is None:
            scale = self.accelerator.num_processes / max(step.sft_tokens, 1)
        else:
            scale = 1.0 / max(normalizer, 1e-12)
        probe = self._around_backward(step, "sft", weight) if needs_grad else nullcontext(0.0)
        with probe as backward_weight:
            with torch.enable_grad() if needs_grad else torch.no_grad(), self.compute_loss_context_manager():
                logps, entropies = self._sft_token_stats(model, batch, compute_entropy=compute_entropy)
            mask = batch.completion_mask.to(logps.dtype)
            if row_weights is not None:
                mask = mask * row_weights.to(mask.device, mask.dtype).unsqueeze(1)
            token_weights = (
                self.strategy.sft_token_weights(logps, entropies, mask) if strategy_weights else None
            )
            weights = mask if token_weights is None else mask * token_weights.detach()
            weighted_nll = -(logps * weights).sum()
            if needs_grad:
                self._amft_backward(weighted_nll * scale * backward_weight)
        step.sft_nll_sum += float(-(logps.detach() * mask).sum())
        step.sft_token_count += float(mask.sum())
        step.sft_weight_sum += weight * float(weights.detach().sum())
        if plan.measure_entropy and entropies is not None:
            step.entropy_sum += float((entropies.detach() * mask).sum())
        return weight * float(weighted_nll.detach()) * scale / self.accelerator.num_processes

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
        extra = batch.model_inputs  # image demonstrations: pixel_values, image_grid_thw, ..., num_images
        if self.temperature == 1.0:
            return _trl_compat.per_token_logps_and_entropies(
                self, model, input_ids, attention_mask, c, compute_entropy=compute_entropy, **extra
            )
        forward = {k: v for k, v in extra.items() if k != "num_images"}
        logits = model(
            input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=c + 1, **forward
        ).logits[:, :-1]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        logps = logprobs.gather(-1, batch.completion_ids.unsqueeze(-1)).squeeze(-1)
        entropies = -(logprobs.exp() * logprobs).sum(-1) if compute_entropy else None
        return logps, entropies

    def _amft_backward(self, loss: torch.Tensor) -> None:
        kwargs = (
            {"scale_wrt_gas": False} if self.accelerator.distributed_type == DistributedType.DEEPSPEED else {}
        )
        self.accelerator.backward(loss, **kwargs)

    @contextmanager
    def _around_backward(self, step: _StepState, term: str, weight: float):
        """Yields the weight the `term` backward is taken with: its weight in the step's loss, except in a meta step,
        whose inner products wrap the backward (`MetaStep.around_backward`). GRPO's backward is scaled by it in
        `compute_loss` (`rl_backward_weight`)."""
        if step.meta is None:
            yield weight
            return
        with step.meta.around_backward(term, weight) as taken_with:
            yield taken_with

    @contextmanager
    def _meta_backwards(self, step: _StepState):
        """Under DeepSpeed, during a meta step: every backward is taken at an accumulation boundary, none steps.

        At a boundary ZeRO reduces the gradient into each process's partition, where the meta step reads it after
        each backward; the engine is stepped once, in `_end_step`, on the combined gradient written there.
        """
        if step.meta is None or self.accelerator.distributed_type != DistributedType.DEEPSPEED:
            yield
            return
        with _trl_compat.swapped_deepspeed_backward(self.accelerator, BoundaryBackwardWithoutStep):
            yield

    def _end_step(self, step: _StepState) -> None:
        """Last micro-step: finish the meta step (if any), reduce the step's measurements, hand them over, log."""
        plan = step.plan
        measurements = StepMeasurements()
        if step.meta is not None:
            measurements = step.meta.finish(
                plan.rl_weight, plan.sft_weight, alpha=self.optimizer.param_groups[0]["lr"]
            )
            step.meta = None
            if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
                # every backward of this step was kept from stepping the engine (`_meta_backwards`): step it once
                engine = _trl_compat.deepspeed_engine(self.accelerator)
                engine.set_gradient_accumulation_boundary(True)
                engine.step()
        nll, tokens, weight_sum, entropy, rl_loss, prompts, to_sft = global_sum(
            self.accelerator,
            [
                step.sft_nll_sum,
                step.sft_token_count,
                step.sft_weight_sum,
                step.entropy_sum,
                step.rl_loss,
                step.prompts,
                step.prompts_to_sft,
            ],
        )
        metrics = _trl_compat.train_metrics(self)
        if tokens > 0:
            metrics["amft/sft_loss"].append(nll / tokens)
            measurements.sft_weight_mean = weight_sum / tokens
        if plan.rl:
            metrics["amft/rl_loss"].append(rl_loss / self.accelerator.num_processes)
        if plan.measure_entropy:
            measurements.entropy = entropy / max(tokens, 1.0)
            metrics["amft/entropy"].append(measurements.entropy)
        if prompts > 0:
            measurements.sft_prompt_fraction = to_sft / prompts
        if plan.meta:
            metrics["amft/meta_gradient"].append(measurements.meta_gradient)
            metrics["amft/val_reward"].append(measurements.val_reward)
            if measurements.cosine is not None:
                metrics["amft/meta_cosine"].append(measurements.cosine)
        if plan.rl and step.unscorable:
            self._num_skipped_rl_steps += 1
            if self._num_skipped_rl_steps == 1:
                logger.warning(
                    "AMFT: every reward of step %d's rollouts was None or NaN: the step's GRPO term has no signal "
                    "(zero advantages), so it trained on its SFT term alone. Counted in amft/skipped_rl_steps; "
                    "check the reward functions and the dataset columns they read.",
                    self.state.global_step,
                )
        if self._num_skipped_rl_steps:
            metrics["amft/skipped_rl_steps"].append(float(self._num_skipped_rl_steps))
        metrics["amft/mu"].append(self.strategy.logged_mu(plan, measurements))
        measurements.plan = plan
        if not plan.warmup:
            self.strategy.record(measurements)

    def _check_same_on_all_processes(self, values: dict[str, float]) -> None:
        """One small all-gather per step: the strategy is replicated, so a divergence is a bug, not noise."""
        local = torch.tensor(
            [float(v) for v in values.values()], device=self.accelerator.device, dtype=torch.float64
        )
        gathered = self.accelerator.gather(local.unsqueeze(0))
        differs = (gathered != gathered[0]).any(dim=0).tolist()
        if any(differs):
            name = list(values)[differs.index(True)]
            raise RuntimeError(
                f"AMFT: {name} differs across processes at step {self.state.global_step}: "
                f"{gathered[:, differs.index(True)].tolist()}. Every measurement feeding the strategy is reduced over "
                "all processes, so this means a process saw different data or a different config."
            )

    # ------------------------------------------------------------------------------------------------------
    # rollouts: what a strategy may read (rewards, groups, demonstrations)
    # ------------------------------------------------------------------------------------------------------
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._captured_rewards = rewards_per_func  # every process's rewards, (N_global, num_funcs)
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        self._captured_rewards = None
        self._luffy_demonstrations = self._luffy_prepare(inputs)
        try:
            out = super()._generate_and_score_completions(inputs)
        finally:
            demonstrations, self._luffy_demonstrations = self._luffy_demonstrations, None
            self._luffy_on_policy_prompts = None
        rewards, self._captured_rewards = self._captured_rewards, None
        if demonstrations is not None:
            self._luffy_mark(out, demonstrations, rewards)
        if self._generating_validation or self.model.training:
            mask = out["completion_mask"]
            off = out.get(
                "amft_off_policy"
            )  # LUFFY: the demonstrations placed in the groups were never generated
            generated, demonstrated = global_sum(
                self.accelerator,
                [
                    float(mask.sum() if off is None else mask[~off].sum()),
                    0.0 if off is None else float(mask[off].sum()),
                ],
            )
            self._token_counts["val_completion" if self._generating_validation else "completion"] += generated
            self._token_counts["sft"] += (
                demonstrated  # LUFFY's off-policy rows: demonstration tokens trained on
            )
        if self._generating_validation or not self.model.training or rewards is None:
            return out
        if self._relift is not None:
            self._relift_fill(inputs, rewards)
        total = (rewards * self.reward_weights.to(rewards.device).unsqueeze(0)).nansum(dim=1)
        unscorable = torch.isnan(rewards).all(dim=1)
        total[unscorable] = float("nan")
        self._last_generation_unscorable = bool(unscorable.all())
        g = self.num_generations
        local = slice(
            self.accelerator.process_index * len(inputs), (self.accelerator.process_index + 1) * len(inputs)
        )
        groups = total.view(-1, g).repeat_interleave(g, dim=0)
        out["amft_reward"] = total[local]
        out["amft_group_rewards"] = groups[local]
        if self._attached is not None:
            out.update(self._attached.generation(inputs, out))
            self._token_counts["sft"] += float(out["amft_sft_tokens"])  # HPT: each demonstration counted once
        return out

    def _rollout_batch(self, inputs: dict[str, Any]) -> RolloutBatch:
        return RolloutBatch(
            advantages=inputs["advantages"],
            rewards=inputs["amft_reward"],
            group_rewards=inputs["amft_group_rewards"],
            completion_mask=inputs["completion_mask"],
            prompts=inputs.get("amft_prompt"),
            demonstrations=inputs.get("amft_demonstration"),
        )

    def _tokenize_demonstration(
        self, prompt: Any, demonstration: Any, images: list[Any] | None = None
    ) -> dict[str, Any] | None:
        """A prompt's demonstration (from a train_dataset column) tokenised like the SFT data; None when truncation
        leaves no completion token. A string demonstration of a conversational prompt is the assistant's message.

        `images` (image prompts): the row's images, which the demonstration carries into the SFT forward; the example
        is then one for `_collate_demonstrations` (`amft_trl.sft_data.vision_demonstration`), None also when the prompt
        and its image tokens leave no room for a completion token within `max_sft_length`. Prompts that hold their
        images in image parts give them here."""
        completion = as_completion(prompt, demonstration)
        if images is None and self._rl_image_parts:
            prompt, images = split_image_parts(prompt)
        if images is not None:
            return vision_demonstration(
                self.processing_class, prompt, completion, images, self.args.max_sft_length
            )
        example = tokenize_prompt_completion(
            self.processing_class,
            prompt,
            completion,
            self.args.max_sft_length,
            chat_template=self.chat_template,
        )
        return example if example["completion_ids"] else None

    def _collate_demonstrations(self, examples: list[dict[str, Any]]) -> SFTBatch:
        """Demonstrations of image prompts (`_tokenize_demonstration` with images), through TRL's VLM collator."""
        return collate_vision_sft(examples, self.processing_class, self.args.max_sft_length, "images")

    def _vision_placeholder(self, prompt: Any, images: list[Any]) -> dict[str, Any]:
        """A zero-weight row with the prompt's images (the vision tower runs on every process): EOS as completion."""
        eos = getattr(self.processing_class, "tokenizer", self.processing_class).eos_token
        if not images and self._rl_image_parts:
            prompt, images = split_image_parts(prompt)
        example = vision_demonstration(
            self.processing_class, prompt, as_completion(prompt, eos), images, None
        )
        if example is None:
            raise RuntimeError(f"No placeholder demonstration can be built for the prompt {prompt!r}.")
        return example

    # ------------------------------------------------------------------------------------------------------
    # LUFFY (balancing="luffy", `amft_trl.balancing.luffy`): demonstrations as off-policy rollouts. Begin.
    # ------------------------------------------------------------------------------------------------------
    def _luffy_setup(self) -> None:
        """Arm the LUFFY hooks when the strategy puts demonstrations into the groups; refuse what they cannot serve."""
        self._luffy: LUFFYStrategy | None = None
        self._luffy_demonstrations: list[list[int] | None] | None = None
        self._luffy_logps_hook = None
        self._luffy_on_policy_prompts = None  # image prompts: TRL's tokenisation of the on-policy rows alone
        # this step's sums: f(p) and p over the off-policy tokens, their count, and all completion tokens
        self._luffy_sums = [0.0] * 4
        strategy = self.strategy
        if not isinstance(strategy, LUFFYStrategy) or strategy.num_off_policy == 0:
            return
        if self.tools or self.rollout_func is not None or getattr(self, "environment_factories", None):
            raise ValueError(
                "balancing='luffy' puts each prompt's demonstration into its group as a finished single-turn "
                "completion; it cannot be combined with `tools`, `environment_factory` or `rollout_func`."
            )
        g, world = self.num_generations, self.accelerator.num_processes
        local = self.args.per_device_train_batch_size * self.args.steps_per_generation
        if world > 1 and local % g != 0:
            raise ValueError(
                f"balancing='luffy' with {world} processes needs each process's generation batch "
                f"(per_device_train_batch_size x steps_per_generation = {local}) to hold whole groups of "
                f"`num_generations` ({g}) rollouts, so that every process generates the same number of completions."
            )
        self._luffy = strategy

    def _luffy_prepare(self, inputs: list[dict[str, Any]]) -> list[list[int] | None] | None:
        """Per row of this process's generation batch: the demonstration's completion token ids where the row is an
        off-policy slot (the first `luffy_num_off_policy` rows of each group), None where it is generated.
        None (no LUFFY) outside training, for validation rollouts, or without LUFFY."""
        if self._luffy is None or self._generating_validation or not self.model.training:
            return None
        column = self._luffy.demonstration_column
        first = self.accelerator.process_index * len(inputs)
        rows = off_policy_rows(len(inputs), first, self.num_generations, self._luffy.num_off_policy)
        out: list[list[int] | None] = []
        for row, off in zip(inputs, rows, strict=True):
            if not off:
                out.append(None)
                continue
            demonstration = row.get(column)
            if isinstance(demonstration, str) and is_conversational(row):
                demonstration = [{"role": "assistant", "content": demonstration}]
            if not demonstration:
                raise ValueError(
                    f"balancing='luffy': train_dataset[{column!r}] (`luffy_demonstration_column`) is empty for the "
                    f"prompt {row['prompt']!r}; every prompt needs a demonstration."
                )
            ids = tokenize_prompt_completion(
                self.processing_class, row["prompt"], demonstration, None, chat_template=self.chat_template
            )["completion_ids"]
            ids = demonstration_completion_ids(ids, list(self.eos_token_ids), self.args.max_completion_length)
            if not ids:
                raise ValueError(
                    f"balancing='luffy': the demonstration of the prompt {row['prompt']!r} tokenises to no completion "
                    "token."
                )
            out.append(ids)
        return out

    def _tokenize_prompts(self, prompts: list):
        """TRL's prompt tokenisation; under LUFFY with image prompts, also that of the on-policy rows alone (their
        images and the processor's fields for them: `pixel_values`, ...), so that only those rows are generated."""
        out = super()._tokenize_prompts(prompts)
        demonstrations = self._luffy_demonstrations
        multimodal = out[1] is not None or bool(out[2])
        if demonstrations is not None and multimodal and len(prompts) == len(demonstrations):
            on = [i for i, d in enumerate(demonstrations) if d is None]
            self._luffy_on_policy_prompts = super()._tokenize_prompts([prompts[i] for i in on])
        return out

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, *args, **kwargs):
        """TRL's generation, for the on-policy rows only; the off-policy rows get their demonstration's tokens.

        The demonstrations cost no generation: TRL generates `num_generations - luffy_num_off_policy` completions per
        prompt, in every generation mode. Image prompts are generated from the on-policy rows' own tokenisation
        (`_tokenize_prompts`), with their images."""
        demonstrations = self._luffy_demonstrations
        if demonstrations is None:
            return super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, *args, **kwargs
            )
        if len(demonstrations) != len(prompt_ids):  # TRL generates for other rows than the batch's: refuse
            raise RuntimeError(
                f"balancing='luffy': TRL asked for {len(prompt_ids)} completions of a generation batch of "
                f"{len(demonstrations)} rows; the demonstrations cannot be placed."
            )
        on = [i for i, d in enumerate(demonstrations) if d is None]
        if images is None and not multimodal_fields:
            on_prompts = ([prompt_ids[i] for i in on], None, multimodal_fields)
        else:
            on_prompts, self._luffy_on_policy_prompts = self._luffy_on_policy_prompts, None
            if on_prompts is None or [list(ids) for ids in on_prompts[0]] != [
                list(prompt_ids[i]) for i in on
            ]:
                raise RuntimeError(
                    "balancing='luffy': the on-policy rows of an image batch were not tokenised as in the full batch; "
                    "their generation cannot be separated from the demonstrations'."
                )
        generated, logprobs = super()._generate_single_turn(
            *on_prompts, num_generations - self._luffy.num_off_policy, *args, **kwargs
        )
        completion_ids: list[list[int]] = []
        all_logprobs: list[list[float]] | None = None if logprobs is None else []
        cursor = 0
        for demonstration in demonstrations:
            if demonstration is None:
                completion_ids.append(list(generated[cursor]))
                if all_logprobs is not None:
                    all_logprobs.append(list(logprobs[cursor]))
                cursor += 1
            else:
                completion_ids.append(list(demonstration))
                if all_logprobs is not None:  # no sampling log-prob: TRL's importance correction is 1 there
                    all_logprobs.append([float("nan")] * len(demonstration))
        return completion_ids, all_logprobs

    def _luffy_mark(self, out: dict[str, Any], demonstrations: list, rewards: torch.Tensor | None) -> None:
        """Mark the off-policy rows of a generation batch (`amft_off_policy`) and log their mean reward."""
        device = out["advantages"].device
        out["amft_off_policy"] = torch.tensor([d is not None for d in demonstrations], device=device)
        if rewards is None:
            return
        total = (rewards * self.reward_weights.to(rewards.device).unsqueeze(0)).nansum(dim=1)
        rows = off_policy_rows(len(total), 0, self.num_generations, self._luffy.num_off_policy)
        off = torch.tensor(rows, device=total.device)
        mean = torch.nanmean(total[off])
        if not torch.isnan(mean):
            _trl_compat.train_metrics(self)["amft/luffy_off_policy_reward"].append(float(mean))

    def _compute_loss(self, model, inputs):
        """TRL's GRPO loss on the on-policy rows; on the off-policy rows LUFFY's shaped, unclipped term
        `-A * p / (p + gamma)` per token (`amft_trl.balancing.luffy`), reduced with the same `loss_type` normaliser."""
        off = inputs.get("amft_off_policy")
        if off is None or self._luffy is None or not self.model.training:
            return super()._compute_loss(model, inputs)
        captured: list[torch.Tensor] = []
        self._luffy_logps_hook = captured.append
        advantages = inputs["advantages"]
        rows = off.view(-1, *([1] * (advantages.dim() - 1)))
        try:
            loss = super()._compute_loss(model, {**inputs, "advantages": advantages.masked_fill(rows, 0.0)})
        finally:
            self._luffy_logps_hook = None
        logps = captured[0]
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        mask = mask.to(logps.dtype)
        off_mask = mask * off.to(logps.dtype).unsqueeze(1)
        token_loss = off_policy_token_loss(logps, advantages, self._luffy.shaping_gamma) * off_mask
        loss = loss + aggregate_token_loss(
            token_loss,
            mask,
            self.loss_type,
            accumulation_steps=self.current_gradient_accumulation_steps,
            max_completion_length=self.max_completion_length,
            num_items_in_batch=inputs["num_items_in_batch"],
            num_processes=self.accelerator.num_processes,
            steps_per_generation=self.args.steps_per_generation,
        )
        with torch.no_grad():  # the step's sums: logged as ratios of sums over the step and every process
            p = logps.detach().exp()
            weight = p / (p + self._luffy.shaping_gamma)
            local = [(weight * off_mask).sum(), (p * off_mask).sum(), off_mask.sum(), mask.sum()]
            self._luffy_sums = [a + float(b) for a, b in zip(self._luffy_sums, local, strict=True)]
        step = self._step_state
        if step is None or step.micro == self.current_gradient_accumulation_steps - 1:
            weight_sum, prob_sum, off_tokens, tokens = global_sum(self.accelerator, self._luffy_sums)
            self._luffy_sums = [0.0] * 4
            metrics = _trl_compat.train_metrics(self)
            metrics["amft/luffy_off_policy_fraction"].append(off_tokens / max(tokens, 1.0))
            if off_tokens > 0:
                metrics["amft/luffy_importance_weight"].append(weight_sum / off_tokens)
                metrics["amft/luffy_off_policy_prob"].append(prob_sum / off_tokens)
        return loss

    # ------------------------------------------------------------------------------------------------------
    # LUFFY. End.
    # ------------------------------------------------------------------------------------------------------

    # ------------------------------------------------------------------------------------------------------
    # ReLIFT (balancing="relift", `amft_trl.balancing.relift`): the buffer of all-failed prompts. Begin.
    # ------------------------------------------------------------------------------------------------------
    def _relift_setup(self) -> None:
        self._relift: ReLIFTStrategy | None = None
        if not isinstance(self.strategy, ReLIFTStrategy):
            return
        world, accumulation = self.accelerator.num_processes, self.args.gradient_accumulation_steps
        if self.strategy.buffer_size % (world * accumulation) != 0:
            raise ValueError(
                f"`relift_buffer_size` ({self.strategy.buffer_size}) must be divisible by processes x "
                f"gradient_accumulation_steps ({world} x {accumulation}): each SFT step splits the buffer evenly "
                "over them."
            )
        self._relift = self.strategy

    def _relift_entry(self, row: dict[str, Any], column: str) -> tuple[Any, ...]:
        """What the buffer keeps of a row: (prompt, demonstration), plus its images for image prompts (from its image
        column, or taken out of its prompt's image parts, so that the checkpoint can store them)."""
        if self._rl_image_column is not None:
            return row["prompt"], row.get(column), row_images(row, self._rl_image_column)
        if self._rl_image_parts:
            prompt, images = split_image_parts(row["prompt"])
            return prompt, row.get(column), images
        return row["prompt"], row.get(column)

    def _relift_example(self, entry: tuple[Any, ...]) -> dict[str, Any] | None:
        """A buffered (prompt, demonstration[, images]) tokenised like the SFT data (`max_sft_length`, with the
        row's images for image prompts); None when no completion token is left."""
        if not entry[1]:
            return None
        return self._tokenize_demonstration(*entry)

    def _relift_fill(self, inputs: list[dict[str, Any]], rewards: torch.Tensor) -> None:
        """Buffer the generation batch's all-failed prompts with their demonstrations, in global row order, on every
        process (each group's first row carries it; the buffer is the same everywhere)."""
        total = (rewards * self.reward_weights.to(rewards.device).unsqueeze(0)).nansum(dim=1)
        total[torch.isnan(rewards).all(dim=1)] = float("nan")
        g = self.num_generations
        failed = all_failed(total.view(-1, g), self._relift.fail_reward).repeat_interleave(g).cpu().tolist()
        first = self.accelerator.process_index * len(inputs)
        column = self._relift.demonstration_column
        local = [
            self._relift_entry(row, column)
            for i, row in enumerate(inputs)
            if (first + i) % g == 0 and failed[first + i]
        ]
        gathered = gather_object(local) if self.accelerator.num_processes > 1 else local
        kept = [entry for entry in gathered if self._relift_example(entry) is not None]
        if len(kept) < len(gathered):
            logger.warning(
                "ReLIFT: %d all-failed prompt(s) not buffered: their demonstration (train_dataset[%r]) is empty or "
                "truncated away by max_sft_length.",
                len(gathered) - len(kept),
                column,
            )
        self._relift.add_failed(kept)

    def _relift_sft_batches(self, examples: list[tuple[Any, ...]], num_micro: int) -> list[SFTBatch]:
        """The SFT step's micro-batches: this process's equal share of the buffered entries, split over micro-steps
        (image prompts' through TRL's VLM collation, with their images)."""
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        per_process = len(examples) // world
        local = examples[rank * per_process : (rank + 1) * per_process]
        per_micro = per_process // num_micro
        pad = getattr(self.processing_class, "tokenizer", self.processing_class).pad_token_id
        tokenised = [self._relift_example(entry) for entry in local]
        if self._rl_image_column is not None or self._rl_image_parts:
            collate = self._collate_demonstrations
        else:
            collate = lambda examples: collate_sft(examples, pad)  # noqa: E731
        return [collate(tokenised[m * per_micro : (m + 1) * per_micro]) for m in range(num_micro)]

    # ------------------------------------------------------------------------------------------------------
    # ReLIFT. End.
    # ------------------------------------------------------------------------------------------------------

    # ------------------------------------------------------------------------------------------------------
    # SFT data
    # ------------------------------------------------------------------------------------------------------
    def _draw_sft_batches(self, num_micro: int) -> list[SFTBatch]:
        """This step's SFT examples: the next `batch x micro-steps x processes` of the stream, this rank's slice."""
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        per_micro = self._sft_batch_size
        indices = self._sft_stream.take(per_micro * num_micro * world)
        local = indices[rank * per_micro * num_micro : (rank + 1) * per_micro * num_micro]
        return [self._collate_sft(local[m * per_micro : (m + 1) * per_micro]) for m in range(num_micro)]

    def _collate_sft(self, indices: list[int]) -> SFTBatch:
        """The tokenised demonstrations at `indices`, padded into one batch (image ones processed here)."""
        if self._sft_image_column is not None:
            return collate_vision_sft(
                [self.sft_dataset[i] for i in indices],
                self.processing_class,
                self.args.max_sft_length,
                self._sft_image_column,
            )
        pad = getattr(self.processing_class, "tokenizer", self.processing_class).pad_token_id
        return collate_sft([self.sft_dataset[i] for i in indices], pad)

    # ------------------------------------------------------------------------------------------------------
    # Eq. 25: the validation rollouts of a meta step
    # ------------------------------------------------------------------------------------------------------
    def _validation_for_meta_step(self, model, step: _StepState) -> None:
        meta = step.meta
        # under ZeRO a partition may keep only the last backward's gradient: move it out after each one
        each = meta.take_validation_gradient if meta.access.sharded else None
        val_reward = self._validation_backward(model, after_each_backward=each)
        if each is None:
            meta.take_validation_gradient()
        meta.validation_done(val_reward)

    def _validation_backward(self, model, after_each_backward=None) -> float:
        """Draw this step's validation prompts (this process's share) and backpropagate the surrogate of -U, a
        training micro-batch (`per_device_train_batch_size` rollouts) at a time."""
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        indices = self._val_stream.take(self.args.meta_val_batch_size)
        rows = [self.val_dataset[i] for i in indices[rank::world] for _ in range(self.num_generations)]
        self._generating_validation = True
        try:
            return validation_backward(
                self,
                model,
                rows,
                self.args.per_device_train_batch_size,
                after_each_backward=after_each_backward,
            )
        finally:
            self._generating_validation = False

    # ------------------------------------------------------------------------------------------------------
    # H* (Algorithm 2, line 11)
    # ------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _measure_target_entropy(self, model) -> float:
        """Mean token entropy (temperature 1) of the policy on a fixed, seeded subset of the demonstrations.

        Every process runs the same number of forward passes, whatever the subset's size (DDP broadcasts buffers at
        each forward, ZeRO-3 gathers parameters): a process whose share is smaller pads with zero-weight rows.
        """
        n = min(self.args.target_entropy_num_samples, len(self.sft_dataset))
        indices = InfiniteStream(len(self.sft_dataset), seed=self.args.seed + 2).take(n)
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        local = indices[rank::world]
        per_process = -(-n // world)  # ceil: the largest share
        weights = [1.0] * len(local) + [0.0] * (per_process - len(local))
        local = local + [indices[0]] * (per_process - len(local))
        entropy_sum, tokens = 0.0, 0.0
        for start in range(0, per_process, self._sft_batch_size):
            batch = self._collate_sft(local[start : start + self._sft_batch_size]).to(self.accelerator.device)
            row = torch.tensor(weights[start : start + self._sft_batch_size], device=self.accelerator.device)
            mask = batch.completion_mask * row.unsqueeze(1)
            with self.compute_loss_context_manager():
                _, entropies = self._sft_token_stats(model, batch, compute_entropy=True)
            entropy_sum += float((entropies * mask).sum())
            tokens += float(mask.sum())
        entropy_sum, tokens = global_sum(self.accelerator, [entropy_sum, tokens])
        return entropy_sum / max(tokens, 1.0)

    # ------------------------------------------------------------------------------------------------------
    # logging and checkpoints
    # ------------------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training:
            metrics = _trl_compat.train_metrics(self)
            for key, values in self.strategy.log_values().items():
                metrics[f"amft/{key}"].extend(values)
            for key, value in self._token_counts.items():  # cumulative: the latest value, not a mean
                metrics[f"amft/{key}_tokens"] = [value]
        super().log(logs, start_time)

    def amft_state_dict(self) -> dict[str, Any]:
        """The strategy's state plus the SFT / validation stream positions: what exact resume needs."""
        state: dict[str, Any] = {
            "version": AMFT_STATE_VERSION,
            "balancing": self.strategy.name,
            "strategy": self.strategy.state_dict(),
            "skipped_rl_steps": self._num_skipped_rl_steps,
            "token_counts": dict(self._token_counts),
        }
        if self.sft_dataset is not None:
            state["sft_stream"] = self._sft_stream.state_dict()
        if self.val_dataset is not None:
            state["val_stream"] = self._val_stream.state_dict()
        return state

    def load_amft_state_dict(self, state: dict[str, Any]) -> None:
        self.strategy.load_state_dict(state["strategy"])
        self._num_skipped_rl_steps = int(state.get("skipped_rl_steps", 0))
        self._token_counts.update({k: float(v) for k, v in state.get("token_counts", {}).items()})
        if "sft_stream" in state and self.sft_dataset is not None:
            self._sft_stream.load_state_dict(state["sft_stream"])
        if "val_stream" in state and self.val_dataset is not None:
            self._val_stream.load_state_dict(state["val_stream"])

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = _trl_compat.checkpoint_dir(self, trial, self.state.global_step)
            with open(os.path.join(folder, AMFT_STATE_NAME), "w") as f:
                json.dump(self.amft_state_dict(), f)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        # transformers' resume loads VLM checkpoints (saved under their original names) into nothing
        if reload_converted_checkpoint(self.model if model is None else model, resume_from_checkpoint):
            logger.info(
                "AMFT: %s reloaded with transformers' weight-name conversion.", resume_from_checkpoint
            )

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        self.load_amft_state_dict(read_amft_state(os.path.join(checkpoint, AMFT_STATE_NAME), self.strategy))


def read_amft_state(path: str, strategy: BalancingStrategy) -> dict[str, Any]:
    """Read and check a checkpoint's `amft_state.json`; every problem is named with the file's path."""
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} is missing: this checkpoint was not written by AMFTTrainer, so the strategy's state (AMFT's mu, "
            "the target entropy) and the SFT/validation stream positions cannot be restored."
        )
    try:
        with open(path) as f:
            state = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not readable JSON ({error}); the checkpoint is corrupt.") from error
    if not isinstance(state, dict):
        raise ValueError(
            f"{path} must hold a JSON object, found {type(state).__name__}; the checkpoint is corrupt."
        )
    if "strategy" not in state:
        raise ValueError(
            f"{path} has no 'strategy' entry (found keys {sorted(state)}): the checkpoint is corrupt or was not "
            "written by AMFTTrainer."
        )
    written_by = state.get("balancing")
    if written_by != strategy.name:
        raise ValueError(
            f"{path} was written with balancing={written_by!r}, but this run uses balancing={strategy.name!r}: "
            "resume with the same strategy, or start a new run from the checkpoint's weights."
        )
    body = state["strategy"]
    if not isinstance(body, dict):
        raise ValueError(f"{path}: its 'strategy' entry must be an object, found {type(body).__name__}.")
    counts = state.get("token_counts", {})
    if not (
        isinstance(counts, dict)
        and set(counts) <= set(TOKEN_COUNTS)
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in counts.values())
    ):
        raise ValueError(
            f"{path}: 'token_counts' must be an object mapping some of {list(TOKEN_COUNTS)} to numbers, found {counts!r}."
        )
    for key in ("sft_stream", "val_stream"):
        stream = state.get(key)
        if stream is not None and not (
            isinstance(stream, dict) and all(isinstance(stream.get(k), int) for k in ("epoch", "offset"))
        ):
            raise ValueError(
                f"{path}: {key!r} must be an object with integer 'epoch' and 'offset', found {stream!r}."
            )
    try:  # the strategy's own fields: check on a throwaway copy, so a bad file leaves the run untouched
        probe = type(strategy).__new__(type(strategy))
        probe.__dict__.update(strategy.__dict__)
        probe.load_state_dict(body)
    except (TypeError, KeyError, ValueError) as error:
        raise ValueError(
            f"{path}: the {strategy.name!r} state does not load ({error}); the checkpoint is corrupt."
        ) from error
    return state
