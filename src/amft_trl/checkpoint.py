"""AMFT's part of a checkpoint: `amft_state.json`, next to the Trainer's files in each `checkpoint-N` folder.

It holds what exact resume needs beyond the model, optimizer, scheduler and RNG states the Trainer saves: the
strategy's state (AMFT's mu and its history, the target entropy H*, ReLIFT's buffer, ...), the positions of the SFT
and validation streams, and the run's cumulative counters. `AMFTTrainer.amft_state_dict` builds it; this module
writes it, and reads it back with every field checked, so that a corrupt or foreign file fails with its path named
before anything is restored.
"""

from __future__ import annotations

import json
import os
from typing import Any

from .balancing import BalancingStrategy

AMFT_STATE_NAME = "amft_state.json"
AMFT_STATE_VERSION = 2
#: The cumulative token counts logged as `amft/<key>_tokens`: `sft`, the demonstration (completion) tokens trained on
#: (the SFT batches, and HPT's demonstrations of the prompts sent to SFT); `completion`, the completion tokens of the
#: training rollouts; `val_completion`, those of AMFT's validation rollouts (meta steps). Summed over processes.
TOKEN_COUNTS = ("sft", "completion", "val_completion")


def write_amft_state(folder: str, state: dict[str, Any]) -> None:
    """Write `state` (`AMFTTrainer.amft_state_dict()`) into the checkpoint folder `folder`."""
    with open(os.path.join(folder, AMFT_STATE_NAME), "w") as f:
        json.dump(state, f)


def read_amft_state(path: str, strategy: BalancingStrategy) -> dict[str, Any]:
    """Read and check a checkpoint's `amft_state.json`; every problem is named with the file's path."""
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} is missing: this checkpoint was not written by AMFTTrainer, so the strategy's state (AMFT's mu, "
            "the target entropy) and the SFT/validation stream positions cannot be restored."
        )
    try:
        with open(path) as f:
            state = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not readable JSON ({error}); the checkpoint is corrupt.") from error
    if not isinstance(state, dict):
        raise ValueError(
            f"{path} must hold a JSON object, found {type(state).__name__}; the checkpoint is corrupt."
        )
    if "strategy" not in state:
        raise ValueError(
            f"{path} has no 'strategy' entry (found keys {sorted(state)}): the checkpoint is corrupt or was not "
            "written by AMFTTrainer."
        )
    written_by = state.get("balancing")
    if written_by != strategy.name:
        raise ValueError(
            f"{path} was written with balancing={written_by!r}, but this run uses balancing={strategy.name!r}: "
            "resume with the same strategy, or start a new run from the checkpoint's weights."
        )
    body = state["strategy"]
    if not isinstance(body, dict):
        raise ValueError(f"{path}: its 'strategy' entry must be an object, found {type(body).__name__}.")
    counts = state.get("token_counts", {})
    if not (
        isinstance(counts, dict)
        and set(counts) <= set(TOKEN_COUNTS)
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in counts.values())
    ):
        raise ValueError(
            f"{path}: 'token_counts' must be an object mapping some of {list(TOKEN_COUNTS)} to numbers, found {counts!r}."
        )
    for key in ("sft_stream", "val_stream"):
        stream = state.get(key)
        if stream is not None and not (
            isinstance(stream, dict) and all(isinstance(stream.get(k), int) for k in ("epoch", "offset"))
        ):
            raise ValueError(
                f"{path}: {key!r} must be an object with integer 'epoch' and 'offset', found {stream!r}."
            )
    try:  # the strategy's own fields: check on a throwaway copy, so a bad file leaves the run untouched
        probe = type(strategy).__new__(type(strategy))
        probe.__dict__.update(strategy.__dict__)
        probe.load_state_dict(body)
    except (TypeError, KeyError, ValueError) as error:
        raise ValueError(
            f"{path}: the {strategy.name!r} state does not load ({error}); the checkpoint is corrupt."
        ) from error
    return state
