"""Kept for imports written before the strategies moved: AMFT's controller lives in `amft_trl.balancing.amft`."""

from .balancing.amft import (  # noqa: F401
    ControllerState,
    MuController,
    cosine_meta_gradient,
    entropy_term,
    grad_dot,
    meta_gradient,
    rms_normalized_meta_gradient,
    update_mu,
)
from .balancing.base import StepMeasurements  # noqa: F401
