"""amft-trl: AMFT (Adaptive Meta Fine-Tuning) on top of TRL's GRPOTrainer.

- `AMFTConfig` / `AMFTTrainer`: the unified SFT + GRPO loss (Eq. 3) with an SFT warm-up;
- `MuController`: the adaptive weight mu (Eq. 6) and its meta-gradient (Eq. 25).
"""

from .config import AMFTConfig
from .controller import MuController, StepMeasurements
from .trainer import AMFTTrainer

__version__ = "0.1.0.dev0"

__all__ = ["AMFTConfig", "AMFTTrainer", "MuController", "StepMeasurements", "__version__"]
