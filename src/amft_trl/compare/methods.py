"""The methods a comparison grid can name, each as `AMFTConfig` settings on top of the grid's shared ones.

Every method but one runs in `AMFTTrainer`, on the same data path: the same prompts, rollouts, SFT stream and
optimizer. The exception is the reference pipeline users actually run, `two_stage`: TRL's `SFTTrainer` for
`budget.sft_steps` optimizer steps, then TRL's `GRPOTrainer` from its final weights, with a fresh optimizer and
schedule, for the remaining steps.

| method              | what it is                                                                  | tuned knob (default)         |
|---------------------|-----------------------------------------------------------------------------|------------------------------|
| `sft_only`          | SFT on the demonstrations for every step (no rollouts)                      | `learning_rate`              |
| `grpo_only`         | GRPO alone (mu pinned to 0, no demonstrations)                              | `learning_rate`              |
| `two_stage`         | TRL `SFTTrainer` then TRL `GRPOTrainer` (the reference)                     | `sft_learning_rate`          |
| `sft_then_rl`       | the same two stages in one `AMFTTrainer` (fresh optimizer at the switch)    | `sft_warmup_learning_rate`   |
| `fixed`             | constant mu after an SFT warm-up                                            | `mu_init`                    |
| `chord`, `chord_phi`| CHORD's mu schedule, without / with the per-token phi weight                | `chord_mu_peak`, `chord_mu_valley` |
| `srft`              | SRFT's entropy-aware weights                                                | `srft_sft_coef`              |
| `hpt`               | HPT's per-prompt switch (demonstrations from the RL rows)                   | `hpt_accuracy_threshold`     |
| `luffy`             | LUFFY: the demonstration as an off-policy rollout of each group, shaped     | `luffy_shaping_gamma`        |
| `relift`            | ReLIFT: GRPO, and an SFT step on the buffered all-failed prompts            | `relift_buffer_size`         |
| `amft`              | AMFT: entropy rule (Eq. 6) + meta-gradient (Eq. 25)                          | `meta_learning_rate`, `entropy_learning_rate` |
| `amft_entropy_only` | AMFT without the meta-gradient                                              | `entropy_learning_rate`      |
| `amft_meta_only`    | AMFT without the entropy term                                               | `meta_learning_rate`         |

The knob column is documentation: a grid tunes whatever fields its `tune:` entry names, on the validation split.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: Fields of the `two_stage` method that are not `AMFTConfig` fields: the SFT stage's own learning rate.
TWO_STAGE_FIELDS = ("sft_learning_rate",)


@dataclass(frozen=True)
class Budget:
    """The optimizer steps every method gets, and how the SFT phases are placed inside them."""

    max_steps: int
    sft_steps: int  # the SFT stage of `two_stage` and `sft_then_rl`
    warmup_steps: int  # the SFT warm-up of `fixed` and the AMFT family
    eval_every: int  # evaluate the test sets every this many steps (and at the end)


@dataclass(frozen=True)
class Method:
    """A method of the comparison.

    Attributes:
        name: its name in a grid.
        settings: the `AMFTConfig` settings that make it this method, from the budget (applied after the grid's
            shared `training` settings and before the method's own `args`).
        needs_demonstrations: trains on the task's `sft` demonstrations.
        needs_demonstration_column: reads one demonstration per RL prompt from the `demonstration` column.
        needs_val: uses the validation prompts during training (AMFT's meta-gradient).
        trainer: `"amft"` (`AMFTTrainer`) or `"two_stage"` (TRL's `SFTTrainer`, then `GRPOTrainer`).
        knob: the fields its tuning is expected to cover (documentation and the report's default).
    """

    name: str
    settings: Callable[[Budget], dict[str, Any]]
    needs_demonstrations: bool = True
    needs_demonstration_column: bool = False
    needs_val: bool = False
    trainer: str = "amft"
    knob: tuple[str, ...] = ()


def _amft(**extra: Any) -> Callable[[Budget], dict[str, Any]]:
    return lambda b: {"balancing": "amft", "sft_warmup_steps": b.warmup_steps, **extra}


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "sft_only",
            lambda b: {"balancing": "sft_then_rl", "sft_warmup_steps": b.max_steps},
            knob=("learning_rate",),
        ),
        Method(
            "grpo_only",
            lambda b: {"balancing": "fixed", "mu_init": 0.0, "sft_warmup_steps": 0},
            needs_demonstrations=False,
            knob=("learning_rate",),
        ),
        Method("two_stage", lambda b: {}, trainer="two_stage", knob=("sft_learning_rate",)),
        Method(
            "sft_then_rl",
            lambda b: {
                "balancing": "sft_then_rl",
                "sft_warmup_steps": b.sft_steps,
                "reset_optimizer_after_warmup": True,
            },
            knob=("sft_warmup_learning_rate",),
        ),
        Method(
            "fixed", lambda b: {"balancing": "fixed", "sft_warmup_steps": b.warmup_steps}, knob=("mu_init",)
        ),
        Method(
            "chord",
            lambda b: {"balancing": "chord", "chord_enable_phi_function": False},
            knob=("chord_mu_peak", "chord_mu_valley"),
        ),
        Method(
            "chord_phi",
            lambda b: {"balancing": "chord", "chord_enable_phi_function": True},
            knob=("chord_mu_peak", "chord_mu_valley"),
        ),
        Method("srft", lambda b: {"balancing": "srft"}, knob=("srft_sft_coef",)),
        Method(
            "hpt",
            lambda b: {"balancing": "hpt", "hpt_demonstration_column": "demonstration"},
            needs_demonstrations=False,
            needs_demonstration_column=True,
            knob=("hpt_accuracy_threshold",),
        ),
        Method(
            "luffy",
            # the paper's run: A = r - group mean (grpo_use_std=False), loss_remove_token_mean (dr_grpo)
            lambda b: {
                "balancing": "luffy",
                "luffy_demonstration_column": "demonstration",
                "scale_rewards": "none",
                "loss_type": "dr_grpo",
            },
            needs_demonstrations=False,
            needs_demonstration_column=True,
            knob=("luffy_shaping_gamma",),
        ),
        Method(
            "relift",
            # the reference's run: A = r - group mean (grpo_use_std=False), loss_remove_token_mean (dr_grpo)
            lambda b: {
                "balancing": "relift",
                "relift_demonstration_column": "demonstration",
                "scale_rewards": "none",
                "loss_type": "dr_grpo",
            },
            needs_demonstrations=False,
            needs_demonstration_column=True,
            knob=("relift_buffer_size",),
        ),
        Method("amft", _amft(), needs_val=True, knob=("meta_learning_rate", "entropy_learning_rate")),
        Method(
            "amft_entropy_only",
            _amft(meta_learning_rate=0.0),
            knob=("entropy_learning_rate",),
        ),
        Method(
            "amft_meta_only",
            _amft(entropy_learning_rate=0.0),
            needs_val=True,
            knob=("meta_learning_rate",),
        ),
    )
}

#: The reference every other method's paired difference is taken against.
REFERENCE = "two_stage"
