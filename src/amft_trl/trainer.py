"""`AMFTTrainer`: TRL's `GRPOTrainer` plus an SFT term, weighed against GRPO's by a balancing strategy.

Each optimizer step trains on `w_RL * L_RL + w_SFT * L_SFT` (AMFT paper, Eq. 3 for `w = (1 - mu, mu)`):

- `L_RL` is exactly GRPOTrainer's loss for the configured `loss_type`: its `training_step` (loss, backward) is reused,
  and one override, `_compute_loss`, takes AMFT's arguments for the micro-batch (`RLLossArguments`: `w_RL`, the
  strategy's advantages, LUFFY's off-policy rows) next to TRL's inputs;
- `L_SFT` is the token-mean NLL of a batch of demonstrations (Eq. 2), `amft_trl.sft_term`.

The strategy (`amft_trl.balancing`, chosen by `AMFTConfig.balancing`) decides what each step does (`StepPlan`): its
weights, whether rollouts are generated, whether an SFT batch is drawn, the measurements it wants (the entropy H_t,
the target H*, the meta-gradient of Eq. 25). This module wires TRL's flow to it, in `training_step`:

- `_begin_step` (a step's first micro-step) asks for the plan, measures H* if asked, draws the SFT batch, and for a
  meta step opens it (`amft_trl._meta_step`); the step's state (`_StepState`) is created there and handed to every
  later call as an argument;
- `_micro_step` runs GRPO's micro-step (TRL's rollouts for it, then TRL's `training_step` on them with AMFT's loss
  arguments) and the SFT micro-step, each backward wrapped by the meta step when there is one;
- `_end_step` (the last micro-step) finishes the meta step, reduces the step's measurements over processes, hands
  them to the strategy and logs them; the strategy updates itself in `on_step_end`, after the optimizer step.

The concepts live in their modules: the SFT term (`sft_term`), demonstrations attached to RL prompts
(`attached_demonstrations`: HPT), LUFFY's off-policy rows (`luffy_rollouts`), ReLIFT's buffer (`relift_buffer`), the
meta step (`_meta_step`), gradient access under DDP and ZeRO (`gradients`), the two-phase learning-rate schedule
(`lr_schedule`) and the checkpoint file (`checkpoint`). Every private member of TRL, transformers, Accelerate and
DeepSpeed touched is listed in `amft_trl._private_api` (the private methods overridden here included).

Simplification, documented: the strategy's state after step t (AMFT's mu) is used from step t + 1 on (Algorithm 2
applies mu to step t's own loss, which would need the entropy before the backward, i.e. a second forward).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.utils import DistributedType
from datasets import Dataset
from torch.optim.lr_scheduler import LambdaLR
from transformers import TrainerCallback
from trl import GRPOTrainer
from trl.data_utils import is_conversational
from trl.import_utils import is_vllm_available

from . import _private_api
from ._distributed import check_parallel_setup, global_sum, launcher_deepspeed_config
from ._meta_step import (
    MetaStep,
    around_backward,
    backwards_without_engine_step,
    finish_meta_step,
    validation_backward,
    validation_pass,
)
from ._reward_columns import check_reward_columns
from .attached_demonstrations import AttachedDemonstrations
from .balancing import BalancingStrategy, RolloutBatch, StepMeasurements, StepPlan, build_strategy
from .balancing.luffy import LUFFYStrategy
from .balancing.relift import ReLIFTStrategy
from .checkpoint import (
    AMFT_STATE_NAME,
    AMFT_STATE_VERSION,
    TOKEN_COUNTS,
    read_amft_state,
    write_amft_state,
)
from .config import AMFTConfig
from .gradients import grad_access
from .lr_schedule import two_phase_lr_lambda
from .luffy_rollouts import OffPolicyDemonstrations
from .relift_buffer import FailedPromptBuffer
from .sft_data import InfiniteStream, SFTBatch, check_sft_columns, image_column
from .sft_term import SFTStepSums, SFTTerm
from .vision import check_image_inputs, check_tool_loop_images, first_image_part, reload_converted_checkpoint

__all__ = ["AMFT_STATE_NAME", "AMFT_STATE_VERSION", "TOKEN_COUNTS", "AMFTTrainer", "read_amft_state"]

logger = logging.getLogger(__name__)

# the columns TRL's `is_conversational` may read a row's format from (it takes any one of those present)
_TRL_FORMAT_KEYS = ("prompt", "chosen", "rejected", "completion", "messages")


@dataclass
class _StepState:
    """One optimizer step in progress on this process: its plan, its SFT batch, its meta step, and its sums so far.

    Created by `_begin_step` at the step's first micro-step, passed to every call of the step as an argument, and
    consumed by `_end_step` at its last one."""

    plan: StepPlan
    sft_batches: list[SFTBatch] = field(default_factory=list)
    sft_tokens: int = 0  # completion tokens of the step's SFT batch, over all processes
    micro: int = 0
    meta: MetaStep | None = None
    seconds: float = 0.0
    rl_loss: float = 0.0  # GRPO's loss summed over micro-steps (already scaled for accumulation), unweighted
    sft: SFTStepSums = field(default_factory=SFTStepSums)
    prompts: float = 0.0  # RL prompts of the step (train_column strategies)
    prompts_to_sft: float = 0.0
    unscorable: bool = False  # every reward of the step's rollouts was None or NaN


@dataclass
class RLLossArguments:
    """What AMFT's GRPO loss takes for one micro-batch besides TRL's inputs (`AMFTTrainer._compute_loss`).

    Made by `_micro_step` and handed to TRL's `training_step` inside the micro-batch (`inputs[RL_LOSS_KEY]`).

    Attributes:
        weight: `w_RL` the backward is taken with (the meta step's when there is one).
        advantages: the strategy's advantages (per-rollout weights, `BalancingStrategy.rl_advantages`), replacing
            TRL's; None keeps TRL's.
        advantages_from_entropies: for strategies whose advantages need the rollouts' token entropies
            (`rl_weights_need_entropy`: SRFT): computes them from the entropies of the loss's own forward.
        off_policy: LUFFY's off-policy rows (their shaped term is added; GRPO's sees zero advantages there).
        loss: set by the loss: GRPO's loss of the micro-batch, unweighted (already scaled for accumulation).
    """

    weight: float
    advantages: torch.Tensor | None = None
    advantages_from_entropies: Callable[[torch.Tensor], torch.Tensor | None] | None = None
    off_policy: OffPolicyDemonstrations | None = None
    loss: float = 0.0


#: The key of `RLLossArguments` in a micro-batch handed to TRL's `training_step`.
RL_LOSS_KEY = "amft_rl_loss_arguments"


class _PreparedRollouts(dict):
    """A micro-batch of rollouts already prepared by TRL's `_prepare_inputs` (and given AMFT's loss arguments):
    `_prepare_inputs` passes it through when TRL's `training_step` asks for it again."""


@dataclass
class _Generation:
    """One call of TRL's `_generate_and_score_completions` in progress: what AMFT's hooks inside it need."""

    validation: bool = False  # AMFT's validation rollouts (meta step), not training ones
    demonstrations: list[list[int] | None] | None = None  # LUFFY: the off-policy rows' completion ids
    on_policy_prompts: Any = None  # LUFFY, image prompts: TRL's tokenisation of the on-policy rows alone
    rewards: torch.Tensor | None = (
        None  # every process's rewards, (N_global, num_funcs) (`_calculate_rewards`)
    )


def rollout_rewards(rewards: torch.Tensor, reward_weights: torch.Tensor) -> torch.Tensor:
    """Each rollout's reward from the reward functions' outputs `rewards` (N, num_funcs), as GRPOTrainer sums them
    before its advantages: weighted by `reward_weights` and summed, skipping NaN (a function that did not score the
    rollout); NaN where no function scored it (an unscorable rollout, which strategies never count as a failure)."""
    total = (rewards * reward_weights.to(rewards.device).unsqueeze(0)).nansum(dim=1)
    total[torch.isnan(rewards).all(dim=1)] = float("nan")
    return total


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
        if self.tools:  # TRL's tool-calling loop with image prompts
            check_tool_loop_images(
                self.processing_class, {"train_dataset": train_dataset, "val_dataset": val_dataset}
            )
        # image prompts: demonstrations read from train_dataset (HPT, LUFFY, ReLIFT) carry their row's images, from its
        # image column or from the image parts of its prompt
        self._rl_image_column = image_column(train_dataset)
        self._rl_image_parts = (
            self._rl_image_column is None
            and getattr(strategy, "demonstration_column", None) is not None
            and isinstance(train_dataset, Dataset)
            and first_image_part(train_dataset) is not None
        )
        self.sft_term = SFTTerm(self, sft_dataset, rl_image_parts=self._rl_image_parts)
        self.sft_dataset, self.sft_num_dropped = self.sft_term.dataset, self.sft_term.num_dropped
        self.val_dataset = val_dataset
        if val_dataset is not None:
            self._val_stream = InfiniteStream(len(val_dataset), seed=args.seed + 1)
        vision = self._rl_image_column is not None or self._rl_image_parts
        self._attached: AttachedDemonstrations | None = None  # HPT: demonstrations attached to RL prompts
        if strategy.sft_source == "train_column":
            tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
            self._attached = AttachedDemonstrations(
                strategy,
                self.accelerator,
                self.sft_term.tokenize_demonstration,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                gradient_accumulation_steps=args.gradient_accumulation_steps,
                steps_per_generation=args.steps_per_generation,
                num_generations=self.num_generations,
                image_column=self._rl_image_column,
                collate=self.sft_term.collate_demonstrations if vision else None,
                placeholder=self.sft_term.vision_placeholder if vision else None,
            )
        self._luffy: OffPolicyDemonstrations | None = None  # LUFFY: demonstrations as off-policy rollouts
        if isinstance(strategy, LUFFYStrategy) and strategy.num_off_policy > 0:
            self._luffy = OffPolicyDemonstrations(self, strategy)
        self._relift: FailedPromptBuffer | None = None  # ReLIFT: a buffer of all-failed prompts
        if isinstance(strategy, ReLIFTStrategy):
            self._relift = FailedPromptBuffer(
                self, strategy, self.sft_term, self._rl_image_column, self._rl_image_parts
            )
        self._step_state: _StepState | None = None  # the optimizer step in progress (`training_step`)
        # the generation in progress (`_generate_and_score_completions`)
        self._generation: _Generation | None = None
        # set by `_compute_loss` around TRL's loss: reads that loss's forward (`_get_per_token_logps_and_entropies`)
        self._loss_forward_reader: Callable[[torch.Tensor, torch.Tensor | None], None] | None = None
        self._num_skipped_rl_steps = 0
        # what the run has trained on and generated, cumulative over the run (logged as amft/<key>_tokens)
        self._token_counts = dict.fromkeys(TOKEN_COUNTS, 0.0)

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
    # the learning-rate schedule (sft_warmup_learning_rate, reset_optimizer_after_warmup): `amft_trl.lr_schedule`
    # ------------------------------------------------------------------------------------------------------
    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        """One schedule over all steps, or, with a warm-up of its own, two (`amft_trl.lr_schedule`)."""
        if not self.args.two_phase_schedule or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        optimizer = self.optimizer if optimizer is None else optimizer
        lr_lambda = two_phase_lr_lambda(self.args, self.strategy.sft_warmup_steps, num_training_steps)
        self.lr_scheduler = LambdaLR(optimizer, lr_lambda)
        _private_api.mark_lr_scheduler_created(self)
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
        if callable(
            getattr(self.optimizer, "train", None)
        ):  # schedule-free optimizers: their training weights too
            self.optimizer.train()
        if self._step_state is None:
            self._step_state = self._begin_step(model)
        step = self._step_state
        with backwards_without_engine_step(step.meta, self.accelerator):
            if step.micro == 0 and step.meta is not None:
                validation_pass(
                    step.meta, lambda each: self._validation_backward(model, after_each_backward=each)
                )
            display = self._micro_step(model, inputs, num_items_in_batch, step)
            step.micro += 1
            if step.micro == self.current_gradient_accumulation_steps:
                self._end_step(step)
                self._step_state = None
        step.seconds += time.perf_counter() - start
        if self._step_state is None:  # the step's time: RL, SFT and meta, not only GRPO's `training_step`
            _private_api.replace_last_step_time(self, step.seconds, appended_by_trl=step.plan.rl)
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
            target = self.sft_term.target_entropy(model)
            self.strategy.set_target_entropy(target)
            logger.info(
                "AMFT: target entropy H* = %.4f nats/token (measured at step %d).", target, global_step
            )
        step = _StepState(plan)
        if plan.sft:
            num_micro = self.current_gradient_accumulation_steps
            buffered = self.strategy.buffered_demonstrations()  # ReLIFT's buffer, else the sft_dataset stream
            if buffered is None:
                step.sft_batches = self.sft_term.draw(num_micro)
            else:
                step.sft_batches = self._relift.sft_batches(buffered, num_micro)
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

    def _micro_step(self, model, generation_batch, num_items_in_batch, step: _StepState) -> float:
        """One micro-step: GRPO's (on TRL's rollouts), then the SFT term's; returns its share of the step's loss."""
        plan = step.plan
        display = 0.0
        attached = None
        if plan.rl:
            # TRL's rollouts for this micro-step (generated every steps_per_generation x num_iterations micro-steps)
            inputs = _private_api.prepare_rollouts(self, generation_batch)
            step.unscorable |= bool(inputs.get("amft_unscorable", False))
            if self._attached is not None:  # HPT: the demonstrations this micro-step trains, dealt per step
                attached = self._attached.micro_step()
                step.prompts += attached.prompts
                step.prompts_to_sft += attached.prompts_to_sft
            sft_follows = attached.sft is not None if attached is not None else plan.sft
            with around_backward(step.meta, "rl", plan.rl_weight) as weight:
                arguments = self._rl_loss_arguments(inputs, weight)
                with self._rl_backward_before_sft(sft_follows):
                    super().training_step(
                        model, _PreparedRollouts(inputs, **{RL_LOSS_KEY: arguments}), num_items_in_batch
                    )
            step.rl_loss += arguments.loss
            display += plan.rl_weight * arguments.loss
        if plan.sft:
            weight = 1.0 if plan.warmup else plan.sft_weight
            display += self._sft_micro_step(model, step.sft_batches[step.micro], weight, step)
        elif attached is not None and attached.sft is not None:
            gated = attached.sft
            display += self._sft_micro_step(
                model, gated.batch, plan.sft_weight, step, gated.row_weights, gated.normalizer
            )
        return display

    def _rl_loss_arguments(self, inputs: dict[str, Any], weight: float) -> RLLossArguments:
        """AMFT's arguments of GRPO's loss for the micro-batch `inputs` (`RLLossArguments`)."""
        arguments = RLLossArguments(weight=weight, off_policy=self._luffy)
        rollouts = RolloutBatch(
            advantages=inputs["advantages"],
            rewards=inputs["amft_reward"],
            group_rewards=inputs["amft_group_rewards"],
            completion_mask=inputs["completion_mask"],
            prompts=inputs.get("amft_prompt"),
            demonstrations=inputs.get("amft_demonstration"),
        )
        if self.strategy.rl_weights_need_entropy:

            def from_entropies(entropies: torch.Tensor) -> torch.Tensor | None:
                rollouts.entropies = entropies
                return self.strategy.rl_advantages(rollouts)

            arguments.advantages_from_entropies = from_entropies
        else:
            arguments.advantages = self.strategy.rl_advantages(rollouts)
        return arguments

    @contextmanager
    def _rl_backward_before_sft(self, sft_follows: bool) -> Iterator[None]:
        """Under DeepSpeed, when an SFT backward follows this RL one at the accumulation boundary: keep the RL
        backward off the boundary. Accelerate's DeepSpeed wrapper steps the engine after every backward taken at
        the boundary; this way the engine steps once, after the SFT backward."""
        off = (
            sft_follows
            and self.accelerator.distributed_type == DistributedType.DEEPSPEED
            and self.accelerator.sync_gradients
        )
        if off:
            _private_api.set_sync_gradients(self.accelerator, False)
        try:
            yield
        finally:
            if off:
                _private_api.set_sync_gradients(self.accelerator, True)

    def _prepare_inputs(self, generation_batch):
        """TRL's micro-batch of rollouts; one `_micro_step` prepared already (with AMFT's loss arguments) passes."""
        if isinstance(generation_batch, _PreparedRollouts):
            return generation_batch
        return super()._prepare_inputs(generation_batch)

    def _compute_loss(self, model, inputs):
        """GRPO's loss (TRL's, already scaled for gradient accumulation), with AMFT's arguments of the micro-batch
        (`RLLossArguments`, `inputs[RL_LOSS_KEY]`): the strategy's advantages, LUFFY's off-policy term, times the
        RL weight. Without them (evaluation): TRL's loss, unweighted.

        The strategy's advantages from the entropies (SRFT) and LUFFY's term use the log-probs and entropies of
        TRL's own forward in its `_compute_loss`: they are read from `_get_per_token_logps_and_entropies`'s output,
        and TRL reads `inputs["advantages"]` after that call (`tests/test_private_api_contract.py` pins this order)."""
        arguments: RLLossArguments | None = inputs.get(RL_LOSS_KEY)
        if arguments is None:
            return super()._compute_loss(model, inputs)
        # a copy: TRL's buffered batch stays as generated (it is reused when num_iterations > 1)
        inputs = {k: v for k, v in inputs.items() if k != RL_LOSS_KEY}
        if arguments.advantages is not None:
            inputs["advantages"] = arguments.advantages
        luffy = arguments.off_policy if inputs.get("amft_off_policy") is not None else None
        advantages = inputs["advantages"]
        if luffy is not None:
            inputs["advantages"] = luffy.masked_advantages(inputs)
        forward: list[tuple[torch.Tensor, torch.Tensor | None]] = []

        def read(logps: torch.Tensor, entropies: torch.Tensor | None) -> None:
            forward.append((logps, entropies))
            if arguments.advantages_from_entropies is not None:
                inputs["advantages"] = arguments.advantages_from_entropies(entropies)

        with self._reading_loss_forward(read):
            loss = super()._compute_loss(model, inputs)
        if luffy is not None:
            loss = loss + luffy.loss_term(forward[0][0], inputs, advantages)
        arguments.loss = float(loss.detach())
        return loss if arguments.weight == 1.0 else loss * arguments.weight

    @contextmanager
    def _reading_loss_forward(
        self, read: Callable[[torch.Tensor, torch.Tensor | None], None]
    ) -> Iterator[None]:
        """`read(logps, entropies)` gets the output of the next call of `_get_per_token_logps_and_entropies` (the
        GRPO loss's forward), once."""
        self._loss_forward_reader = read
        try:
            yield
        finally:
            self._loss_forward_reader = None

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        out = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        read, self._loss_forward_reader = self._loss_forward_reader, None
        if read is not None:  # set by `_compute_loss` for the RL loss's forward only
            read(out[0], out[1])
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
        """One SFT micro-batch of the step (`SFTTerm.micro_step`, Eq. 2), at `weight` in the step's loss.

        Normalised by the step's SFT tokens over all processes; `row_weights` / `normalizer`: per-demonstration
        weights and the loss's divisor on this process instead (the attached demonstrations' own,
        `amft_trl.attached_demonstrations`)."""
        plan = step.plan
        if normalizer is None:
            scale = self.accelerator.num_processes / max(step.sft_tokens, 1)
        else:
            scale = 1.0 / max(normalizer, 1e-12)
        return self.sft_term.micro_step(
            model,
            batch,
            weight,
            step.sft,
            scale=scale,
            strategy=None if plan.warmup else self.strategy,
            measure_entropy=plan.measure_entropy,
            needs_grad=weight > 0 or step.meta is not None,
            around_backward=lambda w: around_backward(step.meta, "sft", w),
            backward=self._amft_backward,
            row_weights=row_weights,
        )

    def _amft_backward(self, loss: torch.Tensor) -> None:
        kwargs = (
            {"scale_wrt_gas": False} if self.accelerator.distributed_type == DistributedType.DEEPSPEED else {}
        )
        self.accelerator.backward(loss, **kwargs)

    def _end_step(self, step: _StepState) -> None:
        """Last micro-step: finish the meta step (if any), reduce the step's measurements, hand them over, log."""
        plan = step.plan
        measurements = StepMeasurements()
        if step.meta is not None:
            measurements = finish_meta_step(
                step.meta, plan.rl_weight, plan.sft_weight, alpha=self.optimizer.param_groups[0]["lr"]
            )
            step.meta = None
        nll, tokens, weight_sum, entropy, rl_loss, prompts, to_sft = global_sum(
            self.accelerator,
            [
                step.sft.nll,
                step.sft.tokens,
                step.sft.weight,
                step.sft.entropy,
                step.rl_loss,
                step.prompts,
                step.prompts_to_sft,
            ],
        )
        metrics = _private_api.train_metrics(self)
        if self._luffy is not None and plan.rl:
            self._luffy.log_step(metrics)
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
    def _generate_and_score_completions(self, inputs):
        """TRL's rollouts, plus what the strategy reads (`amft_reward`, `amft_group_rewards`, `amft_unscorable`, the
        attached demonstrations) and the token counts. LUFFY's demonstrations fill their rows of the groups;
        ReLIFT's buffer is fed here."""
        generation = self._generation or _Generation()  # open already for validation rollouts
        opened = self._generation is None
        if opened and self._luffy is not None and self.model.training:
            generation.demonstrations = self._luffy.prepare(inputs)
        self._generation = generation
        try:
            out = super()._generate_and_score_completions(inputs)
        finally:
            if opened:
                self._generation = None
        return self._add_rollout_fields(inputs, out, generation)

    def _add_rollout_fields(self, inputs, out: dict[str, Any], generation: _Generation) -> dict[str, Any]:
        """The fields strategies read, LUFFY's marks, ReLIFT's buffer and the token counts, for TRL's output `out`."""
        rewards = generation.rewards
        # each rollout's reward as GRPO sums it (weighted, NaN-skipping); NaN where no reward function scored it
        total = None if rewards is None else rollout_rewards(rewards, self.reward_weights)
        if generation.demonstrations is not None:
            self._luffy.mark(out, generation.demonstrations, total, _private_api.train_metrics(self))
        if generation.validation or self.model.training:
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
            self._token_counts["val_completion" if generation.validation else "completion"] += generated
            # LUFFY's off-policy rows: demonstration tokens trained on, once per pass over the batch
            self._token_counts["sft"] += demonstrated * self.num_iterations
        if generation.validation or not self.model.training or rewards is None:
            return out
        if self._relift is not None:
            self._relift.fill(inputs, total)
        out["amft_unscorable"] = torch.tensor(bool(torch.isnan(total).all()))
        g = self.num_generations
        local = slice(
            self.accelerator.process_index * len(inputs), (self.accelerator.process_index + 1) * len(inputs)
        )
        groups = total.view(-1, g).repeat_interleave(g, dim=0)
        out["amft_reward"] = total[local]
        out["amft_group_rewards"] = groups[local]
        if self._attached is not None:
            out.update(self._attached.generation(inputs, out))
            # HPT: each gated demonstration is trained once per pass over the generation batch (`num_iterations`)
            self._token_counts["sft"] += float(out["amft_sft_tokens"]) * self.num_iterations
        return out

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        if self._generation is not None:
            self._generation.rewards = rewards_per_func  # every process's rewards, (N_global, num_funcs)
        return rewards_per_func

    def _tokenize_prompts(self, prompts: list):
        """TRL's prompt tokenisation; under LUFFY with image prompts, also that of the on-policy rows alone (their
        images and the processor's fields for them: `pixel_values`, ...), so that only those rows are generated."""
        out = super()._tokenize_prompts(prompts)
        generation = self._generation
        demonstrations = None if generation is None else generation.demonstrations
        multimodal = out[1] is not None or bool(out[2])
        if demonstrations is not None and multimodal and len(prompts) == len(demonstrations):
            on = OffPolicyDemonstrations.on_policy(demonstrations)
            generation.on_policy_prompts = super()._tokenize_prompts([prompts[i] for i in on])
        return out

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, *args, **kwargs):
        """TRL's generation; under LUFFY for the on-policy rows only, the off-policy rows getting their
        demonstration's tokens (`OffPolicyDemonstrations.splice`). Image prompts are generated from the on-policy
        rows' own tokenisation (`_tokenize_prompts`), with their images."""
        generation = self._generation
        demonstrations = None if generation is None else generation.demonstrations
        if demonstrations is None:
            return super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, *args, **kwargs
            )
        if len(demonstrations) != len(prompt_ids):  # TRL generates for other rows than the batch's: refuse
            raise RuntimeError(
                f"balancing='luffy': TRL asked for {len(prompt_ids)} completions of a generation batch of "
                f"{len(demonstrations)} rows; the demonstrations cannot be placed."
            )
        on = OffPolicyDemonstrations.on_policy(demonstrations)
        if images is None and not multimodal_fields:
            on_prompts = ([prompt_ids[i] for i in on], None, multimodal_fields)
        else:
            on_prompts, generation.on_policy_prompts = generation.on_policy_prompts, None
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
        return OffPolicyDemonstrations.splice(demonstrations, generated, logprobs)

    # ------------------------------------------------------------------------------------------------------
    # Eq. 25: the validation rollouts of a meta step (`amft_trl._meta_step`)
    # ------------------------------------------------------------------------------------------------------
    def _validation_backward(self, model, after_each_backward=None) -> float:
        """Draw this step's validation prompts (this process's share) and backpropagate the surrogate of -U, a
        training micro-batch (`per_device_train_batch_size` rollouts) at a time."""
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        indices = self._val_stream.take(self.args.meta_val_batch_size)
        rows = [self.val_dataset[i] for i in indices[rank::world] for _ in range(self.num_generations)]
        self._generation = _Generation(validation=True)
        try:
            return validation_backward(
                self,
                model,
                rows,
                self.args.per_device_train_batch_size,
                after_each_backward=after_each_backward,
            )
        finally:
            self._generation = None

    # ------------------------------------------------------------------------------------------------------
    # logging and checkpoints (`amft_trl.checkpoint`)
    # ------------------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training:
            metrics = _private_api.train_metrics(self)
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
        if self.sft_term.stream is not None:
            state["sft_stream"] = self.sft_term.stream.state_dict()
        if self.val_dataset is not None:
            state["val_stream"] = self._val_stream.state_dict()
        return state

    def load_amft_state_dict(self, state: dict[str, Any]) -> None:
        self.strategy.load_state_dict(state["strategy"])
        self._num_skipped_rl_steps = int(state.get("skipped_rl_steps", 0))
        self._token_counts.update({k: float(v) for k, v in state.get("token_counts", {}).items()})
        if "sft_stream" in state and self.sft_term.stream is not None:
            self.sft_term.stream.load_state_dict(state["sft_stream"])
        if "val_stream" in state and self.val_dataset is not None:
            self._val_stream.load_state_dict(state["val_stream"])

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = _private_api.checkpoint_dir(self, trial, self.state.global_step)
            write_amft_state(folder, self.amft_state_dict())

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
