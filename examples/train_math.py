"""Train a model on math with AMFT: one run mixes SFT on worked solutions and GRPO on the problems.

Recipes live in `examples/configs/`; any field of a recipe can be overridden on the command line:

    # CPU, the embedded SmolLM2-135M-Instruct, a few minutes
    python examples/train_math.py --config examples/configs/math_cpu.yaml
    # one GPU, Qwen2.5-0.5B-Instruct on OpenR1-Math-46k-8192
    accelerate launch examples/train_math.py --config examples/configs/math_1gpu.yaml
    # the paper's setting (Qwen2.5-Math-7B, 8 GPUs, DeepSpeed ZeRO-3, vLLM)
    accelerate launch --config_file examples/accelerate_configs/deepspeed_zero3.yaml \
        examples/train_math.py --config examples/configs/math_paper.yaml

From one math dataset (a hub id or a local .jsonl/.json/.parquet/.csv file, in the OpenR1-Math-46k-8192 schema
or with `problem`/`solution` columns, see `amft_trl.data`) the script builds the RL prompts (with the gold answer
in `solution`), the SFT demonstrations (the worked solutions) and held-out validation prompts for the
meta-gradient, then trains `AMFTTrainer` with `math_accuracy_reward`.

Bad input stops the script with one `error: ...` line, without a traceback: before any model is loaded for a missing
model or dataset path, an unreadable dataset file, an unknown recipe key, an invalid value (blamed on the recipe or
on the command line, wherever it came from), a dataset without the columns a reward reads, or a DeepSpeed config
without DeepSpeed installed; from the trainer's own construction-time checks for the rest (e.g. a `max_sft_length`
that leaves no demonstration to train on, which needs the tokenizer).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

from datasets import Dataset
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config, get_quantization_config

from amft_trl import AMFTConfig, AMFTTrainer
from amft_trl._deepspeed_check import DEEPSPEED_INSTALL_HINT, installed_deepspeed_version
from amft_trl._reward_columns import check_reward_columns
from amft_trl.data import (
    DEFAULT_INSTRUCTION,
    OPENR1_MATH_46K,
    SCHEMAS,
    load_math_dataset,
    math_rl_prompts,
    math_sft_pairs,
    split_validation,
)
from amft_trl.models import resolve_model_name_or_path
from amft_trl.rewards import boxed_format_reward, math_accuracy_reward

REWARD_FUNCS: dict[str, Callable] = {
    "math_accuracy_reward": math_accuracy_reward,
    "boxed_format_reward": boxed_format_reward,
}


@dataclass
class MathScriptArguments(ScriptArguments):
    """Script arguments: where the math data comes from, how prompts are written, which rewards score them."""

    dataset_name: str = field(
        default=OPENR1_MATH_46K,
        metadata={
            "help": "Math dataset: a hub id or a local .jsonl/.json/.parquet/.csv file, in the OpenR1-Math-46k-8192 "
            "schema or with problem/solution(/answer) columns. Gives the RL prompts, the SFT demonstrations and, "
            "unless validation_dataset_name is set, the held-out validation prompts."
        },
    )
    schema: str | None = field(
        default=None,
        metadata={"help": f"Schema of the math files: one of {SCHEMAS}; None detects it from the columns."},
    )
    validation_dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Separate dataset (hub id or local file) for the validation prompts of the meta-gradient. None: "
            "hold out validation_size rows of dataset_name."
        },
    )
    validation_size: float = field(
        default=500,
        metadata={
            "help": "Rows of dataset_name held out for validation when validation_dataset_name is not set: a number "
            "of rows (>= 1) or a fraction (< 1)."
        },
    )
    sft_dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Separate dataset (hub id or local file) for the SFT demonstrations. None: the worked "
            "solutions of the training rows of dataset_name."
        },
    )
    max_samples: int | None = field(
        default=None,
        metadata={
            "help": "Use only the first max_samples rows of each dataset (quick runs). None: all rows."
        },
    )
    split_seed: int = field(default=0, metadata={"help": "Seed of the held-out validation split."})
    instruction: str | None = field(
        default=DEFAULT_INSTRUCTION,
        metadata={"help": "Appended to every problem (after a blank line). Empty or None for none."},
    )
    system_prompt: str | None = field(default=None, metadata={"help": "Optional system message."})
    conversational: bool = field(
        default=True,
        metadata={
            "help": "Chat-formatted prompts (needs a tokenizer with a chat template); false: plain text."
        },
    )
    eval_benchmarks: str | None = field(
        default=None,
        metadata={
            "help": "After training, evaluate the model on these benchmarks with amft_trl.evaluation (comma-separated "
            "names such as math500,aime24, groups math / ood, or local files; see `amft-eval --list-benchmarks`) "
            "and write <output_dir>/eval/results.json and results.md. None: no final evaluation."
        },
    )
    eval_num_samples: int = field(
        default=0,
        metadata={
            "help": "Sampled answers per problem in the final evaluation (avg@k at the training temperature), on "
            "top of the greedy one; 0: greedy only."
        },
    )
    reward_funcs: list[str] = field(
        default_factory=lambda: ["math_accuracy_reward"],
        metadata={
            "help": f"Reward functions: {sorted(REWARD_FUNCS)} or dotted import paths (`my_module.my_reward`). "
            "Weights: reward_weights."
        },
    )


# ---- helpers, also used by train_general_points.py ----


class InputError(ValueError):
    """Bad user input found before training: reported as one line, without a traceback."""


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


_INPUT_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, ImportError, RuntimeError)


@contextlib.contextmanager
def one_line_errors(*errors: type[BaseException]) -> Iterator[None]:
    """Report the errors raised inside as one `error: ...` line (by default ValueError, OSError, ImportError and
    RuntimeError).

    Used for the checks done before the model is loaded and, limited to ValueError and ImportError, for the
    trainer's own construction-time checks (e.g. a `max_sft_length` that leaves no demonstration to train on).
    """
    caught = errors or _INPUT_ERRORS
    try:
        yield
    except caught as error:
        fail(" ".join(str(error).split()) or type(error).__name__)


def _deepspeed_problem(error: BaseException) -> str | None:
    """The one-line report for an error caused by a missing or unusable DeepSpeed, or None for any other error."""
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


def _parse_error_message(error: BaseException, parser: TrlParser, argv: list[str], recipe: str | None) -> str:
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


def parse_args(
    argv: Sequence[str] | None = None, script_class: type = MathScriptArguments
) -> tuple[Any, AMFTConfig, ModelConfig]:
    """Parse `--config RECIPE.yaml` and command-line overrides into `(script_class, AMFTConfig, ModelConfig)`.

    Unknown recipe keys, unknown arguments and invalid values end the script with one `error: ...` line, which
    says whether the value came from the recipe or from the command line (and how to install DeepSpeed when a
    DeepSpeed config is given without it).
    """
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
            f"unknown key(s) {keys} in recipe {recipe!r}: not a field of {script_class.__name__}, AMFTConfig or ModelConfig"
        )
    if cli_unknown:
        fail(f"unknown command-line argument(s): {' '.join(cli_unknown)}")
    return tuple(parsed)  # type: ignore[return-value]


def load_dataset_arg(name_or_path: str, field_name: str, split: str, config: str | None = None) -> Dataset:
    """Load a hub dataset or a local file; a missing or unreadable path raises `InputError` naming it."""
    path = os.path.expanduser(name_or_path)
    extension = os.path.splitext(path)[1].lower()
    looks_local = extension in (".jsonl", ".json", ".parquet", ".csv") or path.startswith(("/", "./", "../"))
    if not os.path.exists(path) and (looks_local or path.count("/") > 1):
        raise InputError(f"{field_name}: the dataset file {name_or_path!r} does not exist")
    if os.path.isfile(path) and not os.access(path, os.R_OK):
        raise InputError(
            f"{field_name}: the dataset file {name_or_path!r} is not readable (permission denied)"
        )
    kwargs = {"name": config} if config and not os.path.exists(path) else {}
    try:
        dataset = load_math_dataset(path if os.path.exists(path) else name_or_path, split=split, **kwargs)
    except Exception as error:
        cause = error.__cause__ or error.__context__
        detail = f"{error}" + (f" ({cause})" if cause is not None and str(cause) not in str(error) else "")
        raise InputError(f"{field_name}: cannot read the dataset {name_or_path!r}: {detail}") from error
    if not isinstance(dataset, Dataset):
        raise InputError(f"{field_name}: {name_or_path!r} did not load as one split; set dataset_train_split")
    return dataset


def load_reward_funcs(names: Sequence[str], registry: dict[str, Callable]) -> list[Callable]:
    """Reward functions from registry names or dotted import paths, like TRL's `grpo.py` script."""
    funcs = []
    for name in names:
        if name in registry:
            funcs.append(registry[name])
            continue
        module_name, _, attribute = name.rpartition(".")
        if not module_name:
            raise InputError(
                f"reward_funcs: unknown reward {name!r}; expected one of {sorted(registry)} or module.function"
            )
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())  # rewards defined in the directory the script is run from
        try:
            funcs.append(getattr(importlib.import_module(module_name), attribute))
        except (ImportError, AttributeError) as error:
            raise InputError(f"reward_funcs: cannot import {name!r}: {error}") from error
    return funcs


def check_chat_template(model_name_or_path: str, model_args: ModelConfig, training_args: AMFTConfig) -> None:
    """Raise `InputError` when the model's tokenizer has no chat template (conversational prompts need one)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        model_name_or_path,
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
    )
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(
            f"conversational prompts need a chat template, and the tokenizer of {model_name_or_path!r} has none; "
            "pass --conversational false for plain-text prompts"
        )


# ---- the script ----


def main(script_args: MathScriptArguments, training_args: AMFTConfig, model_args: ModelConfig) -> None:
    # ---- checks and data, before any model is loaded ----
    with one_line_errors():
        if script_args.dataset_streaming:
            raise InputError(
                "dataset_streaming is not supported: AMFT samples demonstrations and validation prompts by index"
            )
        if script_args.schema is not None and script_args.schema not in SCHEMAS:
            raise InputError(f"schema must be one of {SCHEMAS} or None, got {script_args.schema!r}")
        validation_size = script_args.validation_size
        if validation_size >= 1:
            if validation_size != int(validation_size):
                raise InputError(
                    f"validation_size must be a whole number of rows or a fraction < 1, got {validation_size}"
                )
            validation_size = int(validation_size)
        model_name_or_path = resolve_model_name_or_path(model_args.model_name_or_path)
        reward_funcs = load_reward_funcs(script_args.reward_funcs, REWARD_FUNCS)
        if script_args.conversational:
            check_chat_template(model_name_or_path, model_args, training_args)

        def load(name: str, field_name: str) -> Dataset:
            dataset = load_dataset_arg(
                name, field_name, script_args.dataset_train_split, script_args.dataset_config
            )
            if script_args.max_samples is not None:
                dataset = dataset.select(range(min(script_args.max_samples, len(dataset))))
            return dataset

        prompt_options = {
            "instruction": script_args.instruction or None,
            "conversational": script_args.conversational,
            "system_prompt": script_args.system_prompt,
            "schema": script_args.schema,
        }
        source = load(script_args.dataset_name, "dataset_name")
        if script_args.validation_dataset_name is None:
            train_rows, validation_rows = split_validation(
                source, validation_size, seed=script_args.split_seed
            )
        else:
            train_rows = source
            validation_rows = load(script_args.validation_dataset_name, "validation_dataset_name")
        sft_rows = (
            train_rows
            if script_args.sft_dataset_name is None
            else load(script_args.sft_dataset_name, "sft_dataset_name")
        )
        rl_dataset = math_rl_prompts(train_rows, **prompt_options)
        sft_dataset = math_sft_pairs(sft_rows, **prompt_options)
        val_dataset = math_rl_prompts(validation_rows, **prompt_options)
        for role, dataset in (("RL prompt", rl_dataset), ("SFT", sft_dataset), ("validation", val_dataset)):
            if len(dataset) == 0:
                raise InputError(
                    f"the {role} dataset is empty after conversion (no rows with a problem and a gold answer / solution)"
                )
        evaluating = training_args.eval_strategy != "no"
        check_reward_columns(
            reward_funcs,
            {
                "train_dataset": rl_dataset,
                "val_dataset": val_dataset,
                "eval_dataset": val_dataset if evaluating else None,
            },
            columns_dropped_from=("train_dataset", "eval_dataset")
            if training_args.remove_unused_columns
            else (),
        )

    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }

    # ---- training ----
    with one_line_errors(ValueError, ImportError):  # the trainer's own checks (some need the tokenizer)
        trainer = AMFTTrainer(
            model=model_name_or_path,
            reward_funcs=reward_funcs,
            args=training_args,
            train_dataset=rl_dataset,
            eval_dataset=val_dataset if evaluating else None,
            sft_dataset=sft_dataset,
            val_dataset=val_dataset,
            quantization_config=get_quantization_config(model_args),
            peft_config=get_peft_config(model_args),
        )
    trainer.accelerator.print(
        f"AMFT on {model_name_or_path}: {len(rl_dataset)} RL prompts, {len(trainer.sft_dataset)} SFT demonstrations, "
        f"{len(val_dataset)} validation prompts"
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.accelerator.print(training_summary(trainer))
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}")
    if script_args.eval_benchmarks:
        evaluate_after_training(
            trainer, script_args.eval_benchmarks, num_samples=script_args.eval_num_samples
        )
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    # Under `accelerate launch`, a process that exits with its gloo/NCCL group alive can abort in teardown (SIGABRT,
    # "terminate called without an active exception") after a finished run; end it while the interpreter is whole.
    trainer.accelerator.end_training()


def training_summary(trainer: AMFTTrainer) -> str:
    """One line: steps, processes, the strategy, and the SFT weight (`amft/mu`) of the first and last logged steps."""
    processes = trainer.accelerator.num_processes
    mu = [h["amft/mu"] for h in trainer.state.log_history if "amft/mu" in h]
    weights = f"mu (SFT weight) {mu[0]:.3f} -> {mu[-1]:.3f}" if mu else "no step logged"
    return (
        f"Trained {trainer.state.global_step} steps on {processes} process{'es' if processes > 1 else ''} with "
        f"balancing={trainer.args.balancing!r}; {weights}"
    )


def evaluate_after_training(trainer: AMFTTrainer, benchmarks: Any, *, num_samples: int) -> Any:
    """Score the trained model with `amft_trl.evaluation` on the main process (the others wait); print the table.

    The model in memory is used, except under DeepSpeed ZeRO-3, whose parameters are partitioned: then the checkpoint
    just saved in `output_dir` is loaded. Results go to `<output_dir>/eval`.
    """
    from amft_trl.evaluation import evaluate_model

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
        )
        accelerator.print(results.to_markdown())
    accelerator.wait_for_everyone()
    return results


if __name__ == "__main__":
    main(*parse_args())
