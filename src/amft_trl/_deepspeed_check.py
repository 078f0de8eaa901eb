"""Refuse DeepSpeed offloading on DeepSpeed releases that silently lose AMFT's gradients.

AMFT takes two backward passes per micro-step (RL, then SFT) and accumulates them into one optimizer step. Under
ZeRO-1/2 with `offload_optimizer`, DeepSpeed releases before 0.19.0 lost the gradients of some of those backward
passes without any error: with one accumulation step the optimizer stepped on `mu g_SFT` alone
(DeepSpeed PR #7981, "Fix ZeRO-1/2 CPU-offloaded gradient loss with multiple backward() per step"), and gradients of
micro-steps after the first were dropped (PR #7967, "Fix zero 1 and 2 CPU-offloaded gradient norm"). Both fixes were
first released in DeepSpeed 0.19.0 (git tag v0.19.0, 2026-05-06; v0.18.9 has neither). This is the bug behind
arXiv 2604.23747's finding that published mixed SFT+RL methods were compared against broken baselines.

`check_deepspeed_offload` is called at construction, before the model is loaded, with the DeepSpeed config the run
will use and the installed DeepSpeed version.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from packaging.version import InvalidVersion, Version

__all__ = [
    "DEEPSPEED_INSTALL_HINT",
    "DEEPSPEED_OFFLOAD_FIX_VERSION",
    "check_deepspeed_offload",
    "installed_deepspeed_version",
    "offloaded_fields",
]

#: First DeepSpeed release with PRs #7967 and #7981 (gradients kept across several backward passes per step under
#: ZeRO-1/2 with CPU offload). Also the floor of the `deepspeed` extra in pyproject.toml.
DEEPSPEED_OFFLOAD_FIX_VERSION = "0.19.0"
#: How to install a DeepSpeed that AMFT supports.
DEEPSPEED_INSTALL_HINT = "pip install 'amft-trl[deepspeed]'"


def installed_deepspeed_version() -> str | None:
    """The installed DeepSpeed's version string (package metadata, nothing imported), or None when not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("deepspeed")
    except PackageNotFoundError:
        return None


def offloaded_fields(deepspeed_config: Mapping[str, Any]) -> dict[str, str]:
    """The offloading settings of a DeepSpeed config that are on, as `{field: device}`.

    Fields: `zero_optimization.offload_optimizer.device`, `zero_optimization.offload_param.device` (any device
    but `"none"`), and the legacy `zero_optimization.cpu_offload` / `cpu_offload_params` flags.
    """
    zero = deepspeed_config.get("zero_optimization") or {}
    if not isinstance(zero, Mapping):
        return {}
    found: dict[str, str] = {}
    for key in ("offload_optimizer", "offload_param"):
        section = zero.get(key)
        device = section.get("device", "none") if isinstance(section, Mapping) else section
        if device is not None and str(device).lower() not in ("none", "false", ""):
            found[f"zero_optimization.{key}.device"] = str(device)
    for key in ("cpu_offload", "cpu_offload_params"):  # DeepSpeed's deprecated spelling of the same
        if zero.get(key) is True:
            found[f"zero_optimization.{key}"] = "cpu"
    return found


def check_deepspeed_offload(
    deepspeed_config: Mapping[str, Any] | None, deepspeed_version: str | None
) -> None:
    """Raise when the DeepSpeed config offloads and the installed DeepSpeed loses gradients with offloading.

    Args:
        deepspeed_config: the DeepSpeed config the run will use (a dict, as `TrainingArguments.deepspeed` holds
            once parsed, or as `accelerate launch` describes it); None when DeepSpeed is not in use.
        deepspeed_version: the installed DeepSpeed's version (`installed_deepspeed_version()`), None when
            DeepSpeed is not installed.

    Raises:
        ImportError: a DeepSpeed config is given but DeepSpeed is not installed (names `amft-trl[deepspeed]`).
        ValueError: the config offloads (`offload_optimizer` or `offload_param` on a device other than "none")
            and DeepSpeed is older than `DEEPSPEED_OFFLOAD_FIX_VERSION` (or its version cannot be read). The
            message names the version found, the version needed and the offending field. This holds whether or
            not the meta-gradient is on: the entropy-only mixed step is hit as well.
    """
    if deepspeed_config is None:
        return
    if deepspeed_version is None:
        raise ImportError(
            f"A DeepSpeed config is set (`deepspeed` in the training arguments, or `accelerate launch` with DeepSpeed), "
            f"but DeepSpeed is not installed. Install it with `{DEEPSPEED_INSTALL_HINT}` (DeepSpeed >= "
            f"{DEEPSPEED_OFFLOAD_FIX_VERSION})."
        )
    offloaded = offloaded_fields(deepspeed_config)
    if not offloaded:
        return
    try:
        fixed = Version(deepspeed_version) >= Version(DEEPSPEED_OFFLOAD_FIX_VERSION)
    except InvalidVersion:
        fixed = False
    if fixed:
        return
    fields = ", ".join(f"{name}={device!r}" for name, device in offloaded.items())
    raise ValueError(
        f"DeepSpeed {deepspeed_version} is installed, and the DeepSpeed config offloads ({fields}). DeepSpeed "
        f"before {DEEPSPEED_OFFLOAD_FIX_VERSION} silently loses gradients when an optimizer step takes several "
        "backward passes under ZeRO-1/2 with offloading (DeepSpeed PRs #7967 and #7981), and every AMFT step takes "
        "an RL and an SFT backward: the step would use part of (1 - mu) g_RL + mu g_SFT. Upgrade to DeepSpeed >= "
        f"{DEEPSPEED_OFFLOAD_FIX_VERSION} (`{DEEPSPEED_INSTALL_HINT}`), or set the offload device(s) to 'none'."
    )
