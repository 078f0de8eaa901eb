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
or with `problem`/`solution` columns, see `amft_trl.math_data`) the script builds the RL prompts (with the gold answer
in `solution`), the SFT demonstrations (the worked solutions) and held-out validation prompts for the
meta-gradient, then trains `AMFTTrainer` with `math_accuracy_reward`.

Bad input stops the script with one `error: ...` line, without a traceback, before any model is loaded: a missing
model or dataset path, an unreadable dataset file, an unknown recipe key, an invalid value (blamed on the recipe or
on the command line, wherever it came from), a DeepSpeed config without DeepSpeed installed
(`amft_trl.script_utils`), and everything `AMFTTrainer` checks at construction (a dataset without the columns a
reward reads, a `max_sft_length` that leaves no demonstration to train on, ...).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from trl import ModelConfig, ScriptArguments, get_peft_config, get_quantization_config

from amft_trl import AMFTConfig, AMFTTrainer
from amft_trl.embedded_model import resolve_model_name_or_path
from amft_trl.math_data import DEFAULT_INSTRUCTION, OPENR1_MATH_46K, SCHEMAS, build_math_datasets
from amft_trl.rewards import boxed_format_reward, math_accuracy_reward
from amft_trl.script_utils import (
    ScriptInputError,
    check_chat_template,
    evaluate_after_training,
    load_dataset_arg,
    load_reward_funcs,
    model_init_kwargs,
    one_line_errors,
    parse_args,
    training_summary,
)

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


def main(script_args: MathScriptArguments, training_args: AMFTConfig, model_args: ModelConfig) -> None:
    with one_line_errors():  # bad input, before any model is loaded: one `error: ...` line
        if script_args.dataset_streaming:
            raise ScriptInputError(
                "dataset_streaming is not supported: AMFT samples demonstrations and validation prompts by index"
            )
        model_name_or_path = resolve_model_name_or_path(model_args.model_name_or_path)
        reward_funcs = load_reward_funcs(script_args.reward_funcs, REWARD_FUNCS)
        if script_args.conversational:
            check_chat_template(model_name_or_path, model_args, training_args)

        def load(name: str | None, field_name: str):
            if name is None:
                return None
            dataset = load_dataset_arg(
                name, field_name, script_args.dataset_train_split, script_args.dataset_config
            )
            if script_args.max_samples is not None:
                dataset = dataset.select(range(min(script_args.max_samples, len(dataset))))
            return dataset

        size = script_args.validation_size
        data = build_math_datasets(
            load(script_args.dataset_name, "dataset_name"),
            validation_dataset=load(script_args.validation_dataset_name, "validation_dataset_name"),
            sft_dataset=load(script_args.sft_dataset_name, "sft_dataset_name"),
            validation_size=int(size) if size >= 1 and size == int(size) else size,
            seed=script_args.split_seed,
            instruction=script_args.instruction or None,
            conversational=script_args.conversational,
            system_prompt=script_args.system_prompt,
            schema=script_args.schema,
        )
    training_args.model_init_kwargs = model_init_kwargs(model_args, training_args)
    with one_line_errors(ValueError, ImportError):  # the trainer's checks, before it loads the model
        trainer = AMFTTrainer(
            model=model_name_or_path,
            reward_funcs=reward_funcs,
            args=training_args,
            train_dataset=data.rl,
            eval_dataset=data.validation if training_args.eval_strategy != "no" else None,
            sft_dataset=data.sft,
            val_dataset=data.validation,
            quantization_config=get_quantization_config(model_args),
            peft_config=get_peft_config(model_args),
        )
    trainer.accelerator.print(
        f"AMFT on {model_name_or_path}: {len(data.rl)} RL prompts, {len(trainer.sft_dataset)} SFT demonstrations, "
        f"{len(data.validation)} validation prompts"
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_state()  # trainer_state.json (the log history plot_training_dynamics reads), even with save_strategy "no"
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


if __name__ == "__main__":
    main(*parse_args(MathScriptArguments))
