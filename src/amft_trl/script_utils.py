"""Helpers for training scripts built on `AMFTTrainer`, like TRL's `trl.scripts`: what `examples/train_math.py` and
`examples/train_general_points.py` share, public so that your own script can use them too.

A script reads like TRL's `grpo.py`:

```python
from amft_trl import AMFTTrainer
from amft_trl.script_utils import load_reward_funcs, one_line_errors, parse_args

def main(script_args, training_args, model_args):
    with one_line_errors():  # bad input: one `error: ...` line, no traceback
        reward_funcs = load_reward_funcs(script_args.reward_funcs, {"my_reward": my_reward})
        ...
        trainer = AMFTTrainer(...)  # its own checks run before the model is loaded
    trainer.train()

if __name__ == "__main__":
    main(*parse_args(MyScriptArguments))
```

Every check `AMFTTrainer` makes at construction (datasets, the columns each reward reads, the parallel layout,
DeepSpeed offloading) runs before it loads the model; a script need not repeat them.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

__all__ = [
    "ScriptInputError",
    "check_chat_template",
    "evaluate_after_training",
    "fail",
    "load_dataset_arg",
    "load_reward_funcs",
    "model_init_kwargs",
    "one_line_errors",
    "parse_args",
    "training_summary",
]


class ScriptInputError(ValueError):
    """Bad user input found before training: reported as one line, without a traceback."""


def fail(message: str) -> NoReturn:
    """Print `error: <message>` on stderr and exit with status 2 (argparse's status for bad usage)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


_INPUT_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, ImportError, RuntimeError)


@contextlib.contextmanager
def one_line_errors(*errors: type[BaseException]) -> Iterator[None]:
    """Report the errors raised inside as one `error: ...` line and exit with status 2 (by default `ValueError`,
    `OSError`, `ImportError` and `RuntimeError`: what input checks and `AMFTTrainer`'s construction raise)."""
    caught = errors or _INPUT_ERRORS
    try:
        yield
    except caught as error:
        fail(" ".join(str(error).split()) or type(error).__name__)


def _deepspeed_problem(error: BaseException) -> str | None:
    """The one-line report for an error caused by a missing or unusable DeepSpeed, or None for any other error."""
    from ._deepspeed_check import DEEPSPEED_INSTALL_HINT, installed_deepspeed_version

    if not isinstance(error, ImportError) or "deepspeed" not in str(error).lower():
        return None
    version = installed_deepspeed_version()
    if version is None:
        return (
            "DeepSpeed is not installed, and this run uses it (the `deepspeed` option, or `accelerate launch` with a "
            f"DeepSpeed config): install it with `{DEEPSPEED_INSTALL_HINT}`"
        )
    detail = " ".join(str(error).split())
    return (
        f"the installed DeepSpeed {version} cannot be used ({detail}): install a supported one with "
        f"`{DEEPSPEED_INSTALL_HINT}`"
    )


def _parse_error_message(error: BaseException, parser: Any, argv: list[str], recipe: str | None) -> str:
    """Say where an invalid value came from: the recipe file, or the values given on the command line."""
    deepspeed = _deepspeed_problem(error)
    if deepspeed is not None:
        return deepspeed
    text = " ".join(str(error).split())
    if recipe is None:
        return text
    position = argv.index("--config")
    overrides = argv[:position] + argv[position + 2 :]
    if overrides:
        try:  # the recipe alone: does the error come from it?
            parser.parse_args_and_config(
                ["--config", recipe], return_remaining_strings=True, separate_remaining_strings=True
            )
            recipe_text = None
        except Exception as recipe_error:
            recipe_text = " ".join(str(recipe_error).split())
        if recipe_text != text:
            return f"invalid value(s) on the command line ({' '.join(overrides)}): {text}"
    return f"recipe {recipe!r}: {text}"


def parse_args(script_class: type, argv: Sequence[str] | None = None) -> tuple[Any, Any, Any]:
    """Parse `--config RECIPE.yaml` and command-line overrides into `(script_class, AMFTConfig, ModelConfig)`, with
    TRL's `TrlParser`.

    Unknown recipe keys, unknown arguments and invalid values end the script with one `error: ...` line, which says
    whether the value came from the recipe or from the command line (and how to install DeepSpeed when a DeepSpeed
    config is given without it).
    """
    from trl import ModelConfig, TrlParser

    from .config import AMFTConfig

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = TrlParser(
        (script_class, AMFTConfig, ModelConfig),
        usage="%(prog)s [--config RECIPE.yaml] [--FIELD VALUE ...]",
        allow_abbrev=False,
    )
    recipe = argv[argv.index("--config") + 1] if "--config" in argv[:-1] else None
    try:
        *parsed, recipe_unknown, cli_unknown = parser.parse_args_and_config(
            argv, return_remaining_strings=True, separate_remaining_strings=True
        )
    except FileNotFoundError:
        fail(f"recipe file {recipe!r} does not exist")
    except Exception as error:  # yaml errors, a config's __post_init__ validation, DeepSpeed missing
        fail(_parse_error_message(error, parser, argv, recipe))
    if recipe_unknown:
        keys = ", ".join(repr(key.removeprefix("--")) for key in recipe_unknown[0::2])
        fail(
            f"unknown key(s) {keys} in recipe {recipe!r}: not a field of {script_class.__name__}, AMFTConfig or "
            "ModelConfig"
        )
    if cli_unknown:
        fail(f"unknown command-line argument(s): {' '.join(cli_unknown)}")
    return tuple(parsed)  # type: ignore[return-value]


def load_dataset_arg(
    name_or_path: str,
    field_name: str,
    split: str,
    config: str | None = None,
    loader: Callable[..., Any] | None = None,
) -> Any:
    """Load a hub dataset or a local `.jsonl/.json/.parquet/.csv` file, with `loader` (default
    `amft_trl.math_data.load_math_dataset`). A missing, unreadable or unparsable source raises `ScriptInputError`
    naming the script argument `field_name`."""
    from datasets import Dataset

    if loader is None:
        from .math_data import load_math_dataset as loader
    path = os.path.expanduser(name_or_path)
    extension = os.path.splitext(path)[1].lower()
    looks_local = extension in (".jsonl", ".json", ".parquet", ".csv") or path.startswith(("/", "./", "../"))
    if not os.path.exists(path) and (looks_local or path.count("/") > 1):
        raise ScriptInputError(f"{field_name}: the dataset file {name_or_path!r} does not exist")
    if os.path.isfile(path) and not os.access(path, os.R_OK):
        raise ScriptInputError(
            f"{field_name}: the dataset file {name_or_path!r} is not readable (permission denied)"
        )
    kwargs = {"name": config} if config and not os.path.exists(path) else {}
    try:
        dataset = loader(path if os.path.exists(path) else name_or_path, split=split, **kwargs)
    except Exception as error:
        cause = error.__cause__ or error.__context__
        detail = f"{error}" + (f" ({cause})" if cause is not None and str(cause) not in str(error) else "")
        raise ScriptInputError(f"{field_name}: cannot read the dataset {name_or_path!r}: {detail}") from error
    if not isinstance(dataset, Dataset):
        raise ScriptInputError(
            f"{field_name}: {name_or_path!r} did not load as one split; set dataset_train_split"
        )
    return dataset


def load_reward_funcs(names: Sequence[str], registry: dict[str, Callable]) -> list[Callable]:
    """Reward functions from `registry` names or dotted import paths (`my_module.my_reward`, importable from the
    working directory), like TRL's `grpo.py`. An unknown name raises `ScriptInputError`."""
    funcs = []
    for name in names:
        if name in registry:
            funcs.append(registry[name])
            continue
        module_name, _, attribute = name.rpartition(".")
        if not module_name:
            raise ScriptInputError(
                f"reward_funcs: unknown reward {name!r}; expected one of {sorted(registry)} or module.function"
            )
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())  # rewards defined in the directory the script is run from
        try:
            funcs.append(getattr(importlib.import_module(module_name), attribute))
        except (ImportError, AttributeError) as error:
            raise ScriptInputError(f"reward_funcs: cannot import {name!r}: {error}") from error
    return funcs


def check_chat_template(model_name_or_path: str, model_args: Any, training_args: Any) -> None:
    """Raise `ScriptInputError` when the model's tokenizer has no chat template (conversational prompts need one);
    only the tokenizer is loaded."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        model_name_or_path,
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
    )
    if not getattr(tokenizer, "chat_template", None):
        raise ScriptInputError(
            f"conversational prompts need a chat template, and the tokenizer of {model_name_or_path!r} has none; "
            "pass --conversational false for plain-text prompts"
        )


def model_init_kwargs(model_args: Any, training_args: Any) -> dict[str, Any]:
    """`AMFTConfig.model_init_kwargs` from TRL's `ModelConfig` (revision, attention, dtype), as TRL's scripts build
    them; values already in `training_args.model_init_kwargs` win."""
    return {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }


def training_summary(trainer: Any) -> str:
    """One line: steps, processes, the strategy, and the SFT weight (`amft/mu`) of the first and last logged steps."""
    processes = trainer.accelerator.num_processes
    mu = [h["amft/mu"] for h in trainer.state.log_history if "amft/mu" in h]
    weights = f"mu (SFT weight) {mu[0]:.3f} -> {mu[-1]:.3f}" if mu else "no step logged"
    return (
        f"Trained {trainer.state.global_step} steps on {processes} process{'es' if processes > 1 else ''} with "
        f"balancing={trainer.args.balancing!r}; {weights}"
    )


def evaluate_after_training(trainer: Any, benchmarks: Any, *, num_samples: int = 0) -> Any:
    """Score the trained model with `amft_trl.evaluation` on the main process (the others wait); print the table.

    The model in memory is used, except under DeepSpeed ZeRO-3, whose parameters are partitioned: then the checkpoint
    just saved in `output_dir` is loaded. The model is labelled with `output_dir`'s name (not the name of the model
    it started from). Results go to `<output_dir>/eval`; returns the `EvalResults` (None on other processes).
    """
    from .evaluation import evaluate_model

    accelerator, args = trainer.accelerator, trainer.args
    results = None
    if accelerator.is_main_process:
        plugin = accelerator.state.deepspeed_plugin
        zero3 = plugin is not None and plugin.zero_stage == 3
        results = evaluate_model(
            args.output_dir if zero3 else accelerator.unwrap_model(trainer.model),
            benchmarks,
            tokenizer=trainer.processing_class,
            num_samples=num_samples,
            temperature=args.temperature,
            max_new_tokens=args.max_completion_length,
            output_dir=os.path.join(args.output_dir, "eval"),
            model_label=os.path.basename(os.path.normpath(args.output_dir)),
        )
        accelerator.print(results.to_markdown())
    accelerator.wait_for_everyone()
    return results
