"""Check at construction that every dataset feeding the reward functions has the columns they need.

TRL 1.16's `GRPOTrainer._calculate_rewards` calls every callable reward function as

    reward_func(prompts=..., completions=..., completion_ids=..., **columns,
                trainer_state=..., log_extra=..., log_metric=...[, environments=...])

where `columns` holds every column of the batch's rows except `prompt`, `completion` and `completion_ids`
(the prompts arrive as `prompts`), and `environments` is passed only when the trainer has an `environment_factory`.
A reward-model id (a string) or a model (`torch.nn.Module`) is run through its tokenizer instead and needs no
column. Without this check, a missing column is found at the first rollout batch of that dataset (for AMFT: after
every SFT warm-up step, or at the first meta step, or at the first evaluation), as the user's own
`TypeError: my_reward() missing 1 required positional argument`, without naming the dataset.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Collection, Mapping
from typing import Any

__all__ = [
    "COLUMNS_NOT_PASSED",
    "ENVIRONMENTS_KWARG",
    "SIGNATURE_COLUMNS",
    "TRL_REWARD_KWARGS",
    "check_reward_columns",
    "reward_func_name",
]

#: Keyword arguments TRL 1.16 passes to every reward function itself (not from dataset columns).
TRL_REWARD_KWARGS: frozenset[str] = frozenset(
    {"prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric"}
)
#: Passed by TRL only when the trainer has an `environment_factory`.
ENVIRONMENTS_KWARG = "environments"
#: Dataset columns TRL never passes to reward functions as keyword arguments.
COLUMNS_NOT_PASSED: frozenset[str] = frozenset({"prompt", "completion", "completion_ids"})
#: The only columns GRPOTrainer's data loaders keep when `remove_unused_columns=True`.
SIGNATURE_COLUMNS: tuple[str, ...] = ("prompt", "image", "images")


def reward_func_name(reward_func: Any) -> str:
    """The name TRL logs a reward function under: `functools.partial` unwrapped, else the class name."""
    while isinstance(reward_func, functools.partial):
        reward_func = reward_func.func
    if isinstance(reward_func, str):
        return reward_func
    return getattr(reward_func, "__name__", type(reward_func).__name__)


def _signature(reward_func: Any) -> inspect.Signature | None:
    """The call signature of a callable reward function; None for a model, a model id or an uninspectable one."""
    if isinstance(reward_func, str) or not callable(reward_func):
        return None
    try:
        import torch

        if isinstance(reward_func, torch.nn.Module):  # a reward model (`PreTrainedModel` included)
            return None
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    try:
        return inspect.signature(reward_func)
    except (TypeError, ValueError):
        return None


def _column_names(dataset: Any) -> list[str] | None:
    names = getattr(dataset, "column_names", None)
    return list(names) if names is not None else None


def _flatten(datasets: Mapping[str, Any]) -> list[tuple[str, list[str]]]:
    """(name, columns) for each dataset; a dict of datasets (several eval sets) gives one entry per set."""
    flat = []
    for name, dataset in datasets.items():
        if dataset is None:
            continue
        if isinstance(dataset, Mapping):
            for key, sub in dataset.items():
                columns = _column_names(sub)
                if columns is not None:
                    flat.append((f"{name}[{key!r}]", columns))
            continue
        columns = _column_names(dataset)
        if columns is not None:  # an IterableDataset without known features cannot be checked
            flat.append((name, columns))
    return flat


def check_reward_columns(
    reward_funcs: Any,
    datasets: Mapping[str, Any],
    *,
    environments: bool = False,
    columns_dropped_from: Collection[str] = (),
) -> None:
    """Raise one ValueError listing every reward function that cannot be called on a dataset that feeds it.

    A reward function requires, by its signature, every parameter without a default that TRL does not supply
    itself (`TRL_REWARD_KWARGS`, plus `environments` with an environment factory): each must be a column of every
    dataset in `datasets`. A function whose parameters are all supplied, or defaulted, or read through `**kwargs`
    is accepted. A function without `**kwargs` must also accept every keyword TRL passes it (its own and each
    column). `functools.partial` objects, callable objects, bound methods and async functions are inspected
    through their call signature; a reward-model id (a string), a model (`torch.nn.Module`) and a callable whose
    signature cannot be read are skipped.

    Args:
        reward_funcs: the trainer's `reward_funcs` (one reward or a list).
        datasets: the datasets whose rows reach the reward functions, by the name to report (e.g.
            `{"train_dataset": ..., "val_dataset": ..., "eval_dataset": ...}`); None values are skipped, a dict of
            datasets (several eval sets) is checked set by set, and a dataset without known columns is skipped.
        environments: whether the trainer has an `environment_factory` (then TRL also passes `environments`).
        columns_dropped_from: names (keys of `datasets`) of the datasets that go through the Trainer's data loaders
            with `remove_unused_columns=True`: TRL keeps only `prompt`, `image`, `images` of those.

    Raises:
        ValueError: naming, for each problem, the dataset, the reward function and the missing (or unaccepted)
            columns, with the dataset's columns.
    """
    if reward_funcs is None:
        funcs = []
    elif isinstance(reward_funcs, (list, tuple)):
        funcs = list(reward_funcs)
    else:  # GRPOTrainer accepts a single reward as well
        funcs = [reward_funcs]
    supplied = set(TRL_REWARD_KWARGS) | ({ENVIRONMENTS_KWARG} if environments else set())
    flat = _flatten(datasets)
    problems: list[str] = []
    for func in funcs:
        signature = _signature(func)
        if signature is None:
            continue
        name = reward_func_name(func)
        params = list(signature.parameters.values())
        has_var_kwargs = any(p.kind is p.VAR_KEYWORD for p in params)
        accepted = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        required = [
            p.name
            for p in params
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is p.empty
        ]
        positional_only = [p.name for p in params if p.kind is p.POSITIONAL_ONLY and p.default is p.empty]
        if positional_only:
            problems.append(
                f"the reward function {name!r} has positional-only parameter(s) {positional_only} without a "
                "default, but TRL passes everything by keyword."
            )
        never = sorted(set(required) & (COLUMNS_NOT_PASSED - supplied))
        if never:
            problems.append(
                f"the reward function {name!r} requires {never}, which TRL never passes to reward functions (the "
                "prompts arrive as `prompts`, the completions as `completions` and `completion_ids`)."
            )
        if ENVIRONMENTS_KWARG in required and not environments:
            problems.append(
                f"the reward function {name!r} requires `environments`, which TRL passes only to a trainer with "
                "an `environment_factory`."
            )
        needed = [c for c in required if c not in supplied and c not in COLUMNS_NOT_PASSED]
        if ENVIRONMENTS_KWARG in needed:
            needed.remove(ENVIRONMENTS_KWARG)
        for dataset_name, columns in flat:
            available = columns
            if dataset_name.split("[")[0] in columns_dropped_from:
                available = [c for c in columns if c in SIGNATURE_COLUMNS]
            dropped = [c for c in needed if c in columns and c not in available]
            if dropped:
                problems.append(
                    f"`{dataset_name}` has the column(s) {dropped} that the reward function {name!r} requires, "
                    "but `remove_unused_columns=True` drops every column but prompt/image/images before the "
                    "rewards see them; set `remove_unused_columns=False` (GRPOConfig's default)."
                )
            missing = [c for c in needed if c not in columns]
            if missing:
                problems.append(
                    f"`{dataset_name}` has no column(s) {missing}, which the reward function {name!r} requires "
                    f"(parameters without a default); `{dataset_name}` has the columns {columns}."
                )
            if not has_var_kwargs:
                passed = supplied | {c for c in available if c not in COLUMNS_NOT_PASSED}
                unexpected = sorted(passed - accepted)
                if unexpected:
                    problems.append(
                        f"the reward function {name!r} takes no **kwargs and does not accept {unexpected}, which "
                        f"TRL passes it with `{dataset_name}` (its own {sorted(supplied)} and every column but "
                        "prompt/completion/completion_ids); add `**kwargs` to its parameters."
                    )
    if problems:
        unique = list(dict.fromkeys(problems))
        raise ValueError(
            "The reward functions cannot be called on the datasets that feed them:\n"
            + "\n".join(f"  - {problem}" for problem in unique)
            + "\nAdd the missing columns to those datasets, or give the reward function's parameters a default."
        )
