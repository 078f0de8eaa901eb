"""Balancing strategies: how `AMFTTrainer` weighs the SFT loss against the GRPO loss at each optimizer step.

Choose one with `AMFTConfig(balancing=...)`:

| name          | module           | weights                                                                 |
|---------------|------------------|-------------------------------------------------------------------------|
| `amft`        | `amft.py`        | mu by Eq. 6 (entropy term) + Eq. 25 (meta-gradient), after an SFT warm-up |
| `fixed`       | `fixed.py`       | constant mu = `mu_init` after the warm-up                               |
| `sft_then_rl` | `sft_then_rl.py` | SFT for `sft_warmup_steps`, then GRPO only                              |
| `chord`       | `chord.py`       | CHORD's scheduled mu, optional per-token phi = p(1 - p)                 |
| `srft`        | `srft.py`        | SRFT's entropy-aware weights on demonstrations and positive rollouts    |
| `hpt`         | `hpt.py`         | HPT's per-prompt switch: SFT when the prompt's rollouts mostly fail     |
| `luffy`       | `luffy.py`       | LUFFY: the demonstration as an off-policy rollout in the GRPO group     |
| `relift`      | `relift.py`      | ReLIFT: GRPO, and an SFT step on the buffered all-failed prompts        |

The interface is `base.BalancingStrategy`: it plans the SFT warm-up, and a strategy implements `plan_after_warmup`
(`MuStrategy`'s family: `mu_at`). A new strategy is one module here, one line in `STRATEGIES`, its fields in
`AMFTConfig`, and its tests (`docs/source/strategies.md`, "Adding a strategy", shows one end to end). Each class is
named `<Method>Strategy` after the method's own spelling, except AMFT's `MuController` (the paper's controller of mu).
"""

from __future__ import annotations

from typing import Any

from .amft import MuController
from .base import BalancingStrategy, MuStrategy, RolloutBatch, StepMeasurements, StepPlan
from .chord import CHORDStrategy
from .fixed import FixedMuStrategy
from .hpt import HPTStrategy
from .luffy import LUFFYStrategy
from .relift import ReLIFTStrategy
from .sft_then_rl import SFTThenRLStrategy
from .srft import SRFTStrategy

STRATEGIES: dict[str, type[BalancingStrategy]] = {
    "amft": MuController,
    "fixed": FixedMuStrategy,
    "sft_then_rl": SFTThenRLStrategy,
    "chord": CHORDStrategy,
    "srft": SRFTStrategy,
    "hpt": HPTStrategy,
    "luffy": LUFFYStrategy,
    "relift": ReLIFTStrategy,
}


def get_strategy_class(name: str) -> type[BalancingStrategy]:
    """The strategy class registered under `name`; a `ValueError` naming the known ones otherwise."""
    try:
        return STRATEGIES[name]
    except (KeyError, TypeError):
        raise ValueError(f"`balancing` must be one of {sorted(STRATEGIES)}, got {name!r}.") from None


def build_strategy(args: Any) -> BalancingStrategy:
    """The strategy `args.balancing` names, built from an `AMFTConfig`."""
    return get_strategy_class(args.balancing).from_config(args)


__all__ = [
    "STRATEGIES",
    "BalancingStrategy",
    "CHORDStrategy",
    "FixedMuStrategy",
    "HPTStrategy",
    "LUFFYStrategy",
    "MuController",
    "MuStrategy",
    "ReLIFTStrategy",
    "RolloutBatch",
    "SFTThenRLStrategy",
    "SRFTStrategy",
    "StepMeasurements",
    "StepPlan",
    "build_strategy",
    "get_strategy_class",
]
