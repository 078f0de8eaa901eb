"""`balancing="fixed"`: a constant SFT weight after the warm-up (the AMFT paper's fixed-mu ablation, Table 4).

`L = (1 - mu_init) * L_RL + mu_init * L_SFT` at every mixed step, after `sft_warmup_steps` of pure SFT (default 50,
as for AMFT, so that the ablation differs from AMFT only in how mu moves).

The constant is `AMFTConfig.mu_init`, the field AMFT starts mu from: `fixed` has no mu field of its own, so that a
comparison sweeping `mu_init` pairs each AMFT start with the fixed run at the same mu. AMFT's other mu fields
(`mu_min`, `mu_max`) do not apply to it (set away from their defaults, the config warns that they are ignored).
"""

from __future__ import annotations

from typing import Any, ClassVar

from .base import MuStrategy


class FixedMuStrategy(MuStrategy):
    """Constant mu after the warm-up; `from_config` reads it from `AMFTConfig.mu_init`, which AMFT uses as its initial
    mu (the two strategies share the field, see the module docstring).

    Args:
        mu: the SFT weight of every mixed step, in [0, 1] (`AMFTConfig.mu_init`).
        sft_warmup_steps: SFT-only steps before the mixed phase.
    """

    name: ClassVar[str] = "fixed"
    config_fields: ClassVar[tuple[str, ...]] = ("mu_init",)

    def __init__(self, mu: float, sft_warmup_steps: int = 0):
        super().__init__(sft_warmup_steps=sft_warmup_steps)
        if not 0.0 <= mu <= 1.0:
            raise ValueError(f"`mu_init` must be a number in [0, 1], got {mu!r}.")
        self.mu = float(mu)

    @classmethod
    def from_config(cls, args: Any) -> FixedMuStrategy:
        return cls(mu=args.mu_init, sft_warmup_steps=args.sft_warmup_steps)

    @classmethod
    def default_sft_warmup_steps(cls) -> int:
        return 50  # as AMFT's, so that the fixed-mu ablation keeps AMFT's warm-up

    @property
    def needs_sft_dataset_after_warmup(self) -> bool:
        return self.mu > 0

    @property
    def uses_rollouts(self) -> bool:
        return self.mu < 1.0

    def mu_at(self, global_step: int) -> float:
        return self.mu
