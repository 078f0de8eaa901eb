"""`balancing="relift"`: ReLIFT's RL interleaved with fine-tuning on the hardest questions (arXiv 2506.07527,
"Learning What Reinforcement Learning Can't"; reference code github TheRoadQaQ/ReLIFT, `relift/verl/verl/relift/`).

Training is GRPO. A prompt whose rollouts all fail goes, with its demonstration (a column of the RL dataset,
`relift_demonstration_column`), into a buffer. When the buffer holds `relift_buffer_size` prompts, the next optimizer
step is an SFT step on them instead of an RL step. Each choice, against the reference (`trainer.py`, `actor.py`,
`core_algos.py`, `examples/math-7b/train.sh`):

- **Which prompts.** The reference buffers a prompt when every rollout's reward equals its verifier's fail value (0).
  Here: every rollout's total reward is at most `relift_fail_reward` (default 0). An unscorable rollout (every reward
  function returned None, NaN here) is not a failure: a group with one is not buffered.
- **The buffer.** The reference puts each batch's new prompts in front of the older ones and trains on the first
  `sft_data_size` (128, the batch's prompt count in `train.sh`), keeping the rest: the newest first. Same here, with
  `relift_buffer_size` (default 128). The reference keeps the buffer in memory only; here it is part of the checkpoint
  (`amft_state.json`), so a resumed run continues exactly.
- **The trigger.** The reference runs its SFT update in the same iteration as the RL update, right after it, as soon
  as the buffer holds `sft_data_size` prompts. Here the SFT update is the next optimizer step: a step with no rollouts,
  planned when the buffer is full (it counts inside `max_steps`).
- **The loss.** The reference: token-mean NLL of the demonstrations at temperature 1 (`compute_sft_loss`), each
  micro-batch's mean averaged over the mini-batch, minus an entropy bonus (`sft.entropy_coeff=0.001`), one AdamW step
  with its own optimizer (`optim.sft.lr=1e-6`, the same rate as RL). Here: the token-mean NLL over all of the step's
  demonstration tokens (the project's SFT term, Eq. 2 of the AMFT paper), one step of the shared optimizer and
  schedule, and no entropy bonus.
- Logged: `amft/relift_buffer_fill` (buffered prompts / `relift_buffer_size` after each step), `amft/relift_sft_step`
  (1 on an SFT step, 0 otherwise) and `amft/relift_sft_steps` (SFT steps so far); `amft/mu` is 1 on SFT steps.
- **Image prompts** (a VLM, an `image`/`images` column in train_dataset): a buffered prompt keeps its row's images,
  which its demonstration is trained with (TRL's VLM collation, as for `sft_dataset` images). The checkpoint stores
  them losslessly (`amft_trl.vision.images_to_json`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .base import (
    BalancingStrategy,
    StepMeasurements,
    StepPlan,
    check_demonstration_column_field,
    check_demonstration_column_in_dataset,
)


def all_failed(group_rewards: torch.Tensor, fail_reward: float) -> torch.Tensor:
    """(N,) bool per group of `group_rewards` (N, G): every rollout has a reward, and it is at most `fail_reward`."""
    return ((group_rewards <= fail_reward) & ~torch.isnan(group_rewards)).all(dim=1)


class ReLIFTStrategy(BalancingStrategy):
    """ReLIFT: GRPO steps, and an SFT step on the buffered all-failed prompts whenever the buffer is full."""

    name: ClassVar[str] = "relift"
    config_fields: ClassVar[tuple[str, ...]] = (
        "relift_demonstration_column",
        "relift_buffer_size",
        "relift_fail_reward",
    )

    def __init__(
        self,
        demonstration_column: str = "demonstration",
        buffer_size: int = 128,
        fail_reward: float = 0.0,
        sft_warmup_steps: int = 0,
    ):
        super().__init__(sft_warmup_steps=sft_warmup_steps)
        self.demonstration_column = demonstration_column
        self.buffer_size = int(buffer_size)
        self.fail_reward = float(fail_reward)
        # (prompt, demonstration), or (prompt, demonstration, images) for image prompts; newest first
        self.buffer: list[tuple[Any, ...]] = []
        self.sft_steps = 0
        self._taken: list[tuple[Any, ...]] | None = None  # the SFT step in progress trains on these

    @classmethod
    def from_config(cls, args: Any) -> ReLIFTStrategy:
        return cls(
            demonstration_column=args.relift_demonstration_column,
            buffer_size=args.relift_buffer_size,
            fail_reward=args.relift_fail_reward,
            sft_warmup_steps=args.sft_warmup_steps,
        )

    @classmethod
    def check_config(cls, args: Any) -> None:
        check_demonstration_column_field(args, cls.name)
        size = args.relift_buffer_size
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"`relift_buffer_size` must be an integer >= 1, got {size!r}.")
        fail = args.relift_fail_reward
        if not (isinstance(fail, int | float) and not isinstance(fail, bool) and fail == fail):
            raise ValueError(f"`relift_fail_reward` must be a number, got {fail!r}.")

    @property
    def needs_sft_dataset_after_warmup(self) -> bool:
        return False  # its SFT steps train on the buffer, filled from train_dataset

    def check_datasets(self, *, train_dataset: Any, sft_dataset: Any, val_dataset: Any) -> None:
        check_demonstration_column_in_dataset(train_dataset, self.demonstration_column, self.name)

    # ---- the buffer ---------------------------------------------------------------------------------------------
    def add_failed(self, examples: list[tuple[Any, ...]]) -> None:
        """Buffer one generation batch's all-failed prompts (in batch order), in front of the older ones: (prompt,
        demonstration) pairs, or (prompt, demonstration, images) for image prompts."""
        self.buffer = [tuple(e) for e in examples] + self.buffer

    @property
    def buffer_full(self) -> bool:
        return len(self.buffer) >= self.buffer_size

    def buffered_demonstrations(self) -> list[tuple[Any, ...]] | None:
        """The (prompt, demonstration[, images]) entries the SFT step being planned trains on (taken out of the
        buffer)."""
        return self._taken

    def plan_after_warmup(self, global_step: int) -> StepPlan:
        self._taken = None
        if self.buffer_full:
            self._taken, self.buffer = self.buffer[: self.buffer_size], self.buffer[self.buffer_size :]
            return StepPlan(rl_weight=0.0, sft_weight=1.0, rl=False, sft=True)
        return StepPlan(rl_weight=1.0, sft_weight=0.0, rl=True, sft=False)

    def logged_mu(self, plan: StepPlan, measurements: StepMeasurements) -> float:
        return 1.0 if plan.sft else 0.0

    def record(self, measurements: StepMeasurements) -> None:
        super().record(measurements)
        sft = bool(measurements.plan.sft)
        self.sft_steps += int(sft)
        self._taken = None
        self.log("relift_sft_step", float(sft))
        self.log("relift_sft_steps", float(self.sft_steps))
        self.log("relift_buffer_fill", len(self.buffer) / self.buffer_size)

    # ---- checkpointing ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        from ..vision import images_to_json

        buffer = [[e[0], e[1], images_to_json(e[2])] if len(e) == 3 else list(e) for e in self.buffer]
        return {"buffer": buffer, "sft_steps": self.sft_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        buffer, sft_steps = state["buffer"], state["sft_steps"]
        from ..vision import images_from_json

        if not isinstance(buffer, list) or not all(
            isinstance(e, list | tuple) and (len(e) == 2 or (len(e) == 3 and isinstance(e[2], list)))
            for e in buffer
        ):
            raise ValueError(
                "'buffer' must be a list of [prompt, demonstration] pairs or [prompt, demonstration, images] triples"
            )
        if not isinstance(sft_steps, int) or sft_steps < 0:
            raise ValueError(f"'sft_steps' must be an integer >= 0, got {sft_steps!r}")
        self.buffer = [(e[0], e[1], images_from_json(e[2])) if len(e) == 3 else tuple(e) for e in buffer]
        self.sft_steps = sft_steps
        self._taken = None
