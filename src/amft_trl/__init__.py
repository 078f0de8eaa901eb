"""amft-trl: single-stage SFT + RL on top of TRL's GRPOTrainer, balanced by a strategy (AMFT by default).

- `AMFTConfig` / `AMFTTrainer`: the unified SFT + GRPO loss (AMFT paper, Eq. 3) with an optional SFT warm-up;
- `amft_trl.balancing`: the strategies (`amft`: Eq. 6 / Eq. 25 via `MuController`; `fixed`, `sft_then_rl`, `chord`,
  `srft`, `hpt`).
"""

from .balancing import BalancingStrategy, MuController, StepMeasurements, StepPlan
from .config import AMFTConfig
from .trainer import AMFTTrainer

__version__ = "0.1.0.dev0"

__all__ = [
    "AMFTConfig",
    "AMFTTrainer",
    "BalancingStrategy",
    "MuController",
    "StepMeasurements",
    "StepPlan",
    "__version__",
]
