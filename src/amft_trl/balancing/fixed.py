"""`balancing="fixed"`: a constant SFT weight after the warm-up (the AMFT paper's fixed-mu ablation, Table 4).

`L = (1 - mu_init) * L_RL + mu_init * L_SFT` at every mixed step, after `sft_warmup_steps` of pure SFT (default 50,
as for AMFT, so that the ablation differs from AMFT only in how mu moves).
"""

from __future__ import annotations

from typing import Any, ClassVar

from .base import MuStrategy


class FixedMu(MuStrategy):
    """Constant mu = `mu_init` after the warm-up.

    Args:
        mu: the SFT weight of every mixed step, in [0, 1].
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
    def from_config(cls, args: Any) -> FixedMu:
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
