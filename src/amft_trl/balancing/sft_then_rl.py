"""`balancing="sft_then_rl"`: the two-stage pipeline in one trainer: `sft_warmup_steps` of SFT, then pure GRPO.

After the switch mu = 0: no SFT batch is drawn and no SFT forward runs, so every RL step is exactly a
`GRPOTrainer` step (a test checks it parameter for parameter). A properly trained SFT stage is what makes this
baseline fair (arXiv 2604.23747 found under-trained SFT stages behind the published wins of mixed methods): give the
stage its own learning rate and schedule with `sft_warmup_learning_rate`, and start the RL stage from a fresh
optimizer with `reset_optimizer_after_warmup=True`, as two separate trainers would.
"""

from __future__ import annotations

from typing import Any, ClassVar

from .base import MuStrategy, no_rl_step_message


class SFTThenRLStrategy(MuStrategy):
    """SFT for `sft_warmup_steps` optimizer steps, then GRPO only (mu = 0)."""

    name: ClassVar[str] = "sft_then_rl"

    @classmethod
    def default_sft_warmup_steps(cls) -> None:
        return None  # the length of the SFT stage is the experiment: it must be given

    @classmethod
    def check_config(cls, args: Any) -> None:
        if args.sft_warmup_steps is None or args.sft_warmup_steps < 1:
            raise ValueError(
                "balancing='sft_then_rl' needs `sft_warmup_steps` >= 1: the number of optimizer steps of its SFT "
                f"stage, got {args.sft_warmup_steps!r}."
            )

    @classmethod
    def check_run_length(
        cls, sft_warmup_steps: int, total_steps: int, source: str, stacklevel: int = 2
    ) -> None:
        """An SFT stage longer than the run is refused (it would be cut short, and no GRPO step run); one exactly as
        long as the run is SFT alone (how `amft-compare` builds `sft_only`), with the base class's warning."""
        if 0 < total_steps < sft_warmup_steps:
            raise ValueError(
                no_rl_step_message(cls.name, sft_warmup_steps, total_steps, source)
                + " Its SFT stage would also be cut short."
            )
        super().check_run_length(sft_warmup_steps, total_steps, source, stacklevel=stacklevel + 1)

    def mu_at(self, global_step: int) -> float:
        return 0.0
