"""AMFT's balancing strategy (`balancing="amft"`): Eq. 6 (the mu update) and Eq. 25 (the one-step meta-gradient).

AMFT paper (arXiv 2508.06944). The maths is in small pure functions:

- `entropy_term`       the short-term term of Eq. 6, `eta_H * (H* - H_t)`;
- `meta_gradient`      Eq. 25, `g_mu = -alpha * <grad U(theta), grad L_SFT - grad L_RL>`;
- `rms_normalized_meta_gradient`  the default, scale-free form of Eq. 25 (`docs/source/amft_trainer.md`, the meta step);
- `cosine_meta_gradient`  the cosine between grad U and the SFT-minus-RL direction (an optional diagnostic);
- `update_mu`          Eq. 6, `clip(mu + meta_term + entropy_term, mu_min, mu_max)`.

`MuController` is the strategy: the one owner of mu. The trainer asks it what each step does (`plan`: warm-up, the
entropy measurement, a meta step every K mixed steps), hands it the measurements (`record`), and the callback machinery
calls `on_step_end`, where Eq. 6 produces the mu used from the next step on. The gradients Eq. 25 needs are produced
by the trainer's meta step (`amft_trl._meta_step`).

Sign of the entropy rule: Eq. 6 and Algorithm 2 of the paper add `eta_H * (H* - H_t)`, which *raises* mu when the
entropy collapses below the target and lowers it when entropy is high. Section 3.2's prose says the opposite; we
implement the equation (a negative-feedback loop: RL lowers entropy, SFT on demonstrations raises it).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from .base import BalancingStrategy, StepMeasurements, StepPlan, check_fraction, check_nonnegative

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------
# Pure functions (paper equations)
# --------------------------------------------------------------------------------------------------------------


def entropy_term(entropy_learning_rate: float, target_entropy: float, entropy: float) -> float:
    """The entropy heuristic of Eq. 6: `eta_H * (H* - H_t)`.

    Positive (raises mu, more imitation) when the current entropy `H_t` has fallen below the target `H*`.
    """
    return entropy_learning_rate * (target_entropy - entropy)


def meta_gradient(grad_utility_dot_direction: float, alpha: float) -> float:
    """Eq. 25: `g_mu = -alpha * <grad U(theta), grad L_SFT(theta) - grad L_RL(theta)>`.

    Args:
        grad_utility_dot_direction: `<grad U, d>` with `d = grad L_SFT - grad L_RL`, `U` the validation utility
            (Eq. 4) to be *maximised*.
        alpha: the policy's learning rate for the one-step lookahead `theta' = theta - alpha * grad L_total`.
    """
    return -alpha * grad_utility_dot_direction


def cosine_meta_gradient(
    grad_utility_dot_direction: float, grad_utility_norm: float, direction_norm: float
) -> float:
    """Scale-free view of Eq. 25: `cos(grad U, -(grad L_SFT - grad L_RL))`, in [-1, 1] (a logged diagnostic).

    Same sign as `meta_gradient`, without the factor `alpha * |grad U| * |d|`. Returns 0.0 when either gradient is
    zero. In high dimension its magnitude is small (we measured |cos| ~ 1e-2), which is why it is not the default
    normalised form.
    """
    denominator = grad_utility_norm * direction_norm
    if denominator == 0.0:
        return 0.0
    return max(-1.0, min(1.0, -grad_utility_dot_direction / denominator))


def rms_normalized_meta_gradient(
    g_mu: float, second_moment: float, num_updates: int, beta: float = 0.9
) -> tuple[float, float]:
    """Normalised form of Eq. 25: `g_mu / sqrt(v_hat)`, clipped to [-1, 1] (Adam's scaling, applied to the scalar mu).

    `v` is an exponential moving average of `g_mu**2` over meta steps (decay `beta`), bias-corrected as in Adam;
    `num_updates` counts the meta steps before this one. The first meta step therefore gives `sign(g_mu)`; later ones
    give the size of `g_mu` relative to its recent scale. `meta_learning_rate` becomes "the largest change of mu per
    meta step", independent of the model size and learning rate that make the raw form vanish (method note, point 2).

    Returns `(normalised g_mu, updated v)`.
    """
    v = beta * second_moment + (1.0 - beta) * g_mu * g_mu
    v_hat = v / (1.0 - beta ** (num_updates + 1))
    if v_hat <= 0.0:
        return 0.0, v
    return max(-1.0, min(1.0, g_mu / math.sqrt(v_hat))), v


def update_mu(mu: float, meta_term: float, entropy_term: float, mu_min: float, mu_max: float) -> float:
    """Eq. 6: `mu <- clip(mu + eta_mu * g_mu + eta_H * (H* - H_t), mu_min, mu_max)`.

    `meta_term` is `eta_mu * g_mu` (0 outside meta steps) and `entropy_term` is `eta_H * (H* - H_t)`.
    """
    return min(mu_max, max(mu_min, mu + meta_term + entropy_term))


# --------------------------------------------------------------------------------------------------------------
# Typed containers
# --------------------------------------------------------------------------------------------------------------


@dataclass
class ControllerState:
    """Everything `MuController` needs to resume exactly (saved as JSON in every checkpoint)."""

    mu: float
    target_entropy: float | None = None
    num_updates: int = 0  # Eq. 6 updates applied (mixed steps)
    num_meta_updates: int = 0
    num_skipped_nonfinite: int = 0
    num_skipped_meta_steps: int = (
        0  # meta steps whose validation reward was undefined (every reward None/NaN)
    )
    meta_second_moment: float = 0.0  # EMA of g_mu**2 for the normalised form
    last_entropy_term: float = 0.0
    last_meta_term: float = 0.0
    last_meta_gradient: float | None = None
    history: list[dict[str, float | None]] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------------------
# The controller
# --------------------------------------------------------------------------------------------------------------


META_GRADIENT_FORMS = ("normalized", "raw")


class MuController(BalancingStrategy):
    """AMFT's strategy: owns the SFT weight mu and updates it with Eq. 6 at the end of every mixed optimizer step.

    Before each step the trainer asks for the step's `plan` (warm-up; the entropy measurement H_t; a meta step every
    K mixed steps, the first included), hands the measurements over with `record`, and the callback machinery calls
    `on_step_end` after `optimizer.step()`, where Eq. 6 produces the mu used from the next step on. Warm-up steps do
    not update mu.

    Args:
        mu_init, mu_min, mu_max: initial value and clip bounds of mu.
        meta_learning_rate: eta_mu (0 disables the meta-gradient).
        entropy_learning_rate: eta_H (0 disables the entropy term).
        meta_update_steps: K, meta-gradient every K mixed steps (the first mixed step included).
        sft_warmup_steps: W, SFT-only steps before the mixed phase.
        target_entropy: H*; None until the trainer measures it after warm-up.
        meta_gradient_form: "normalized" (RMS-normalised g_mu, the default) or "raw" (Eq. 25 exactly).
    """

    name: ClassVar[str] = "amft"
    config_fields: ClassVar[tuple[str, ...]] = (
        "mu_init",
        "mu_min",
        "mu_max",
        "meta_learning_rate",
        "meta_gradient_form",
        "entropy_learning_rate",
        "meta_update_steps",
        "target_entropy",
        "target_entropy_num_samples",
        "meta_val_batch_size",
        "meta_diagnostics",
    )

    def __init__(
        self,
        mu_init: float = 0.5,
        mu_min: float = 0.05,
        mu_max: float = 0.95,
        meta_learning_rate: float = 0.02,
        entropy_learning_rate: float = 5e-4,
        meta_update_steps: int = 20,
        sft_warmup_steps: int = 50,
        target_entropy: float | None = None,
        meta_gradient_form: str = "normalized",
    ):
        super().__init__(sft_warmup_steps=sft_warmup_steps)
        self.mu_min = mu_min
        self.mu_max = mu_max
        self.meta_learning_rate = meta_learning_rate
        self.entropy_learning_rate = entropy_learning_rate
        self.meta_update_steps = meta_update_steps
        self.meta_gradient_form = meta_gradient_form
        self.state = ControllerState(mu=float(mu_init), target_entropy=target_entropy)

    @classmethod
    def from_config(cls, args: Any) -> MuController:
        """Build a controller from an `AMFTConfig`."""
        return cls(
            mu_init=args.mu_init,
            mu_min=args.mu_min,
            mu_max=args.mu_max,
            meta_learning_rate=args.meta_learning_rate,
            entropy_learning_rate=args.entropy_learning_rate,
            meta_update_steps=args.meta_update_steps,
            sft_warmup_steps=args.sft_warmup_steps,
            target_entropy=args.target_entropy,
            meta_gradient_form=args.meta_gradient_form,
        )

    @classmethod
    def default_sft_warmup_steps(cls) -> int:
        return 50  # the paper's W (Table 7)

    @classmethod
    def check_config(cls, args: Any) -> None:
        for name in ("mu_min", "mu_max"):
            check_fraction(args, name)
        if args.mu_min > args.mu_max:
            raise ValueError(f"`mu_min` ({args.mu_min}) must not exceed `mu_max` ({args.mu_max}).")
        if not args.mu_min <= args.mu_init <= args.mu_max:
            raise ValueError(
                f"`mu_init` ({args.mu_init}) must lie inside [mu_min, mu_max] = [{args.mu_min}, {args.mu_max}]."
            )
        for name in ("meta_learning_rate", "entropy_learning_rate"):
            check_nonnegative(args, name, note=" (0 switches its term off)")
        if args.meta_gradient_form not in META_GRADIENT_FORMS:
            raise ValueError(
                f"`meta_gradient_form` must be one of {META_GRADIENT_FORMS}, got {args.meta_gradient_form!r}."
            )
        if not isinstance(args.meta_update_steps, int) or args.meta_update_steps < 1:
            raise ValueError(f"`meta_update_steps` must be an integer >= 1, got {args.meta_update_steps!r}.")
        check_nonnegative(args, "target_entropy", allow_none=True, note=" (None: measured after the warm-up)")
        for name in ("target_entropy_num_samples", "meta_val_batch_size"):
            value = getattr(args, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")

    # ---- what the trainer asks ----
    @property
    def mu(self) -> float:
        """The current SFT weight."""
        return self.state.mu

    @property
    def mu_is_fixed(self) -> bool:
        return self.mu_min == self.mu_max

    @property
    def wants_entropy(self) -> bool:
        """Whether H_t (and H*) must be measured: the entropy term is on and mu can move."""
        return self.entropy_learning_rate > 0 and not self.mu_is_fixed

    @property
    def wants_meta_gradient(self) -> bool:
        return self.meta_learning_rate > 0 and not self.mu_is_fixed

    @property
    def needs_sft_dataset_after_warmup(self) -> bool:
        return self.mu_max > 0 or self.wants_entropy

    @property
    def needs_val_dataset(self) -> bool:
        return self.wants_meta_gradient

    @property
    def uses_rollouts(self) -> bool:
        return not (self.mu_is_fixed and self.mu_max == 1.0)

    @property
    def target_entropy(self) -> float | None:
        return self.state.target_entropy

    def set_target_entropy(self, value: float) -> None:
        """Set H* (the trainer measures it right after warm-up when the config leaves it None)."""
        self.state.target_entropy = float(value)

    def is_meta_step(self, global_step: int) -> bool:
        """Whether the meta-gradient is computed at optimizer step `global_step` (Algorithm 2, line 23)."""
        t = global_step - self.sft_warmup_steps
        return self.wants_meta_gradient and t >= 0 and t % self.meta_update_steps == 0

    def plan_after_warmup(self, global_step: int) -> StepPlan:
        mu = self.mu
        pinned_sft_only = self.mu_is_fixed and mu == 1.0  # no rollouts at all
        meta = self.is_meta_step(global_step)
        entropy = self.wants_entropy
        return StepPlan(
            rl_weight=1.0 - mu,
            sft_weight=mu,
            rl=not pinned_sft_only,
            sft=pinned_sft_only or mu > 0 or entropy or meta,
            measure_entropy=entropy,
            measure_target_entropy=entropy and self.target_entropy is None,
            meta=meta,
        )

    # ---- Eq. 6 ----
    def update(self, measurements: StepMeasurements) -> None:
        self.step(measurements)

    def step(self, measurements: StepMeasurements) -> float:
        """Apply Eq. 6 with this step's measurements and return the new mu.

        A non-finite entropy or meta-gradient is skipped with a warning (and counted); mu never becomes NaN. A meta
        step whose validation reward is undefined (every validation reward None or NaN) has no signal: its meta
        term is skipped and counted in `num_skipped_meta_steps`.
        """
        s = self.state
        e_term = 0.0
        if self.wants_entropy and measurements.entropy is not None and s.target_entropy is not None:
            candidate = entropy_term(self.entropy_learning_rate, s.target_entropy, measurements.entropy)
            if math.isfinite(candidate):
                e_term = candidate
            else:
                s.num_skipped_nonfinite += 1
                logger.warning(
                    "AMFT: non-finite entropy (%s); entropy term skipped this step.", measurements.entropy
                )
        m_term = 0.0
        if (
            self.wants_meta_gradient
            and measurements.meta_gradient is not None
            and measurements.val_reward is not None
            and not math.isfinite(measurements.val_reward)
        ):
            s.num_skipped_meta_steps += 1
            logger.warning(
                "AMFT: every validation reward of this meta step was None or NaN; the meta term is skipped (%d "
                "meta step(s) skipped so far). Check the reward functions on `val_dataset`.",
                s.num_skipped_meta_steps,
            )
        else:
            g_signal = self._meta_signal(measurements)
            if g_signal is not None:
                if math.isfinite(g_signal):
                    m_term = self.meta_learning_rate * g_signal
                    s.num_meta_updates += 1
                else:
                    s.num_skipped_nonfinite += 1
                    logger.warning(
                        "AMFT: non-finite meta-gradient (%s); meta term skipped this step.", g_signal
                    )
        s.mu = update_mu(s.mu, m_term, e_term, self.mu_min, self.mu_max)
        s.num_updates += 1
        s.last_entropy_term, s.last_meta_term = e_term, m_term
        s.last_meta_gradient = measurements.meta_gradient
        s.history.append({"mu": s.mu, "entropy_term": e_term, "meta_term": m_term})
        self.log("entropy_term", e_term)
        self.log("meta_term", m_term)
        if s.num_skipped_nonfinite:
            self.log("skipped_nonfinite", s.num_skipped_nonfinite)
        if s.num_skipped_meta_steps:
            self.log("skipped_meta_steps", s.num_skipped_meta_steps)
        return s.mu

    def _meta_signal(self, m: StepMeasurements) -> float | None:
        """The g_mu that enters Eq. 6, in the configured form (None: no meta-gradient this step)."""
        if not self.wants_meta_gradient or m.meta_gradient is None:
            return None
        if self.meta_gradient_form == "raw" or not math.isfinite(m.meta_gradient):
            return m.meta_gradient
        g, self.state.meta_second_moment = rms_normalized_meta_gradient(
            m.meta_gradient, self.state.meta_second_moment, self.state.num_meta_updates
        )
        return g

    def record(self, measurements: StepMeasurements) -> None:
        super().record(measurements)
        if self.state.target_entropy is not None:
            self.log("target_entropy", self.state.target_entropy)

    # ---- checkpointing ----
    def state_dict(self) -> dict[str, Any]:
        return asdict(self.state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.state = ControllerState(**state)
