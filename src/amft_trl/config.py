"""`AMFTConfig`: `GRPOConfig` plus the parameters of AMFT's controller and SFT side.

Every field maps to a symbol of the AMFT paper (arXiv 2508.06944); the README's config table lists
them. Only new parameters live here: everything else (loss_type, num_generations, beta, gradient
accumulation, vLLM, PEFT, logging) is TRL's `GRPOConfig`, unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from trl import GRPOConfig

META_GRADIENT_FORMS = ("normalized", "raw")


@dataclass
class AMFTConfig(GRPOConfig):
    r"""
    Configuration for [`AMFTTrainer`]: [`~trl.GRPOConfig`] plus AMFT's adaptive weight controller.

    The trainer optimises `(1 - mu) * L_RL + mu * L_SFT` (paper Eq. 3) and moves `mu` every optimizer step with
    Eq. 6: `mu <- clip(mu + meta_learning_rate * g_mu + entropy_learning_rate * (H* - H_t), mu_min, mu_max)`.

    A learning rate of 0 switches its term off and skips its computation; this is how the paper's ablations are
    expressed (entropy-only: `meta_learning_rate=0`; meta-only: `entropy_learning_rate=0`; fixed mu: both 0;
    without warm-up: `sft_warmup_steps=0`). Pinning `mu_min == mu_max` fixes mu: 0 is plain GRPO (no SFT data
    needed, no SFT forward), 1 is SFT only (no rollouts generated).

    Warm-up steps count inside `max_steps` (and inside the learning-rate schedule): with `max_steps=500` and
    `sft_warmup_steps=50`, the run does 50 SFT-only steps then 450 mixed steps.
    """

    # ---- the adaptive weight mu (Eq. 3, Eq. 6) ----
    mu_init: float = field(default=0.5, metadata={"help": "Initial SFT weight mu_0 (paper: mu_init = 0.5)."})
    mu_min: float = field(default=0.05, metadata={"help": "Lower clip bound of mu in Eq. 6 (paper: 0.05)."})
    mu_max: float = field(default=0.95, metadata={"help": "Upper clip bound of mu in Eq. 6 (paper: 0.95)."})
    meta_learning_rate: float = field(
        default=0.02,
        metadata={
            "help": "eta_mu in Eq. 6: step size of the meta-gradient term. With the default normalized form "
            "(meta_gradient_form='normalized') it is the largest change of mu one meta step can make. The paper's "
            "1e-4 belongs to the raw form (meta_gradient_form='raw'). 0 disables the meta-gradient and its "
            "validation rollouts."
        },
    )
    meta_gradient_form: str = field(
        default="normalized",
        metadata={
            "help": "Which g_mu enters Eq. 6. 'raw': Eq. 25 exactly, -alpha * <grad U, grad L_SFT - grad L_RL> with "
            "alpha the current policy learning rate. 'normalized': g_mu divided by the root of an exponential moving average of g_mu**2 (Adam's scaling "
            "applied to the scalar mu), clipped to [-1, 1]: meta_learning_rate is then the largest change of mu per "
            "meta step."
        },
    )
    entropy_learning_rate: float = field(
        default=5e-4,
        metadata={"help": "eta_H in Eq. 6: step size of the entropy term (paper: 5e-4). 0 disables it."},
    )
    meta_update_steps: int = field(
        default=20,
        metadata={
            "help": "K: compute the meta-gradient every K mixed (post-warm-up) steps, the first one included."
        },
    )
    sft_warmup_steps: int = field(
        default=50,
        metadata={
            "help": "W: optimizer steps of pure SFT before the mixed phase; no rollouts are generated during them. "
            "They count inside max_steps."
        },
    )
    target_entropy: float | None = field(
        default=None,
        metadata={
            "help": "H* in Eq. 6, in nats per token. None: measured right after the warm-up as the mean token "
            "entropy (temperature 1) of the policy on `target_entropy_num_samples` SFT demonstrations."
        },
    )
    target_entropy_num_samples: int = field(
        default=64,
        metadata={"help": "Number of SFT demonstrations the target entropy H* is measured on."},
    )

    # ---- the SFT side (Eq. 2) ----
    sft_per_device_train_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "SFT demonstrations per device per micro-step (like per_device_train_batch_size). None: same as "
            "per_device_train_batch_size. Each optimizer step uses this x gradient_accumulation_steps x processes."
        },
    )
    max_sft_length: int | None = field(
        default=1024,
        metadata={
            "help": "Maximum tokens of prompt + completion for an SFT example; longer ones are truncated on the "
            "right. Examples whose completion is truncated away entirely are dropped and reported. None: no limit."
        },
    )

    # ---- the meta-objective U (Eq. 4, Eq. 25) ----
    meta_val_batch_size: int = field(
        default=16,
        metadata={
            "help": "Validation prompts per meta step (over all processes); each gets num_generations rollouts, "
            "whose group-normalised advantages give the policy-gradient estimate of grad U."
        },
    )

    def __post_init__(self):
        self._validate_amft_fields()
        super().__post_init__()

    def _validate_amft_fields(self) -> None:
        for name in ("mu_init", "mu_min", "mu_max"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0.0 <= value <= 1.0):
                raise ValueError(f"`{name}` must be a number in [0, 1], got {value!r}.")
        if self.mu_min > self.mu_max:
            raise ValueError(f"`mu_min` ({self.mu_min}) must not exceed `mu_max` ({self.mu_max}).")
        if not self.mu_min <= self.mu_init <= self.mu_max:
            raise ValueError(
                f"`mu_init` ({self.mu_init}) must lie inside [mu_min, mu_max] = [{self.mu_min}, {self.mu_max}]."
            )
        for name in ("meta_learning_rate", "entropy_learning_rate"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(
                    f"`{name}` must be a finite number >= 0 (0 switches its term off), got {value!r}."
                )
        if self.meta_gradient_form not in META_GRADIENT_FORMS:
            raise ValueError(
                f"`meta_gradient_form` must be one of {META_GRADIENT_FORMS}, got {self.meta_gradient_form!r}."
            )
        if not isinstance(self.meta_update_steps, int) or self.meta_update_steps < 1:
            raise ValueError(f"`meta_update_steps` must be an integer >= 1, got {self.meta_update_steps!r}.")
        if not isinstance(self.sft_warmup_steps, int) or self.sft_warmup_steps < 0:
            raise ValueError(f"`sft_warmup_steps` must be an integer >= 0, got {self.sft_warmup_steps!r}.")
        if self.target_entropy is not None and not (
            isinstance(self.target_entropy, int | float)
            and math.isfinite(self.target_entropy)
            and self.target_entropy >= 0
        ):
            raise ValueError(
                f"`target_entropy` must be None (measure after warm-up) or a finite number >= 0, got {self.target_entropy!r}."
            )
        for name in ("target_entropy_num_samples", "meta_val_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")
        if self.sft_per_device_train_batch_size is not None and (
            not isinstance(self.sft_per_device_train_batch_size, int)
            or self.sft_per_device_train_batch_size < 1
        ):
            raise ValueError(
                "`sft_per_device_train_batch_size` must be None or an integer >= 1, "
                f"got {self.sft_per_device_train_batch_size!r}."
            )
        if self.max_sft_length is not None and (
            not isinstance(self.max_sft_length, int) or self.max_sft_length < 2
        ):
            raise ValueError(
                f"`max_sft_length` must be None or an integer >= 2, got {self.max_sft_length!r}."
            )
        # `use_liger_kernel=True` needs nothing here: in TRL 1.16 it only swaps the model's layer kernels (its fused
        # linear cross-entropy is refused by GRPOTrainer), and every loss, L_SFT and the meta step included, goes
        # through the same fused log-prob head as without it.

    @property
    def mu_is_fixed(self) -> bool:
        """True when `mu_min == mu_max`: mu cannot move, so neither controller term is computed."""
        return self.mu_min == self.mu_max
