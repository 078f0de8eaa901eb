"""Train a model on General Points (the 24-points card game of the AMFT paper, text variant) with AMFT.

The hands are generated (no download): training and validation hands use the in-distribution face-card rule
(J = Q = K = 10); with evaluation on (`--eval_strategy steps`), the model is also scored on held-out test hands
under the ID rule and under the out-of-distribution rule (J, Q, K = 11, 12, 13). See
`amft_trl.tasks.general_points`. Any field of a recipe can be overridden on the command line:

    # CPU, the embedded SmolLM2-135M-Instruct, a few minutes
    python examples/train_general_points.py --config examples/configs/general_points_cpu.yaml
    # one GPU, Qwen2.5-0.5B-Instruct
    accelerate launch examples/train_general_points.py --config examples/configs/general_points_1gpu.yaml

Bad input (a missing model path, an unknown recipe key, an invalid value, a reward that reads columns the prompts
lack, task options that cannot be dealt, a DeepSpeed config without DeepSpeed) stops the script with one `error: ...`
line before any model is loaded (`amft_trl.script_utils`, and `AMFTTrainer`'s own construction-time checks).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from trl import ModelConfig, get_peft_config, get_quantization_config

from amft_trl import AMFTConfig, AMFTTrainer
from amft_trl.embedded_model import resolve_model_name_or_path
from amft_trl.evaluation import benchmark_from_dataset
from amft_trl.script_utils import (
    ScriptInputError,
    check_chat_template,
    evaluate_after_training,
    load_reward_funcs,
    model_init_kwargs,
    one_line_errors,
    parse_args,
    training_summary,
)
from amft_trl.tasks.general_points import build_general_points_datasets, general_points_reward

REWARD_FUNCS: dict[str, Callable] = {"general_points_reward": general_points_reward}


@dataclass
class GeneralPointsArguments:
    """Script arguments: the General Points hands to deal and the rewards that score the answers."""

    num_train: int = field(
        default=500, metadata={"help": "Training hands (RL prompts and SFT demonstrations)."}
    )
    num_validation: int = field(default=100, metadata={"help": "Validation hands, for the meta-gradient."})
    num_eval: int = field(
        default=100,
        metadata={"help": "Test hands per evaluation set (ID rule and OOD rule), used when evaluating."},
    )
    num_cards: int = field(default=4, metadata={"help": "Cards per hand (1 to 5; the paper: 4)."})
    target: int = field(default=24, metadata={"help": "The number the formula must reach (the paper: 24)."})
    split_seed: int = field(
        default=0,
        metadata={"help": "Seed of the deal and of the disjoint train/validation/test split of hands."},
    )
    eval_at_end: bool = field(
        default=True,
        metadata={
            "help": "After training, score num_eval held-out hands under the ID rule and under the OOD rule with "
            "amft_trl.evaluation (greedy, plus eval_num_samples sampled answers) and write "
            "<output_dir>/eval/results.json and results.md."
        },
    )
    eval_num_samples: int = field(
        default=0,
        metadata={
            "help": "Sampled answers per held-out hand (avg@k at the training temperature); 0: greedy only."
        },
    )
    conversational: bool = field(
        default=True,
        metadata={
            "help": "Chat-formatted prompts (needs a tokenizer with a chat template); false: plain text."
        },
    )
    reward_funcs: list[str] = field(
        default_factory=lambda: ["general_points_reward"],
        metadata={
            "help": f"Reward functions: {sorted(REWARD_FUNCS)} or dotted import paths (`my_module.my_reward`). "
            "Weights: reward_weights."
        },
    )


def main(script_args: GeneralPointsArguments, training_args: AMFTConfig, model_args: ModelConfig) -> None:
    with one_line_errors():  # bad input, before any model is loaded: one `error: ...` line
        model_name_or_path = resolve_model_name_or_path(model_args.model_name_or_path)
        reward_funcs = load_reward_funcs(script_args.reward_funcs, REWARD_FUNCS)
        if script_args.conversational:
            check_chat_template(model_name_or_path, model_args, training_args)
        if script_args.num_train < 1 or script_args.num_validation < 1:
            raise ScriptInputError("num_train and num_validation must be at least 1")
        evaluating = training_args.eval_strategy != "no" or script_args.eval_at_end
        if evaluating and script_args.num_eval < 1:
            raise ScriptInputError("num_eval must be at least 1 to evaluate (eval_strategy or eval_at_end)")
        data = build_general_points_datasets(
            script_args.num_train,
            script_args.num_validation,
            script_args.num_eval,
            seed=script_args.split_seed,
            num_cards=script_args.num_cards,
            target=script_args.target,
            conversational=script_args.conversational,
        )
    training_args.model_init_kwargs = model_init_kwargs(model_args, training_args)
    with one_line_errors(ValueError, ImportError):  # the trainer's checks, before it loads the model
        trainer = AMFTTrainer(
            model=model_name_or_path,
            reward_funcs=reward_funcs,
            args=training_args,
            train_dataset=data.rl,
            # the held-out hands: evaluated periodically (eval_strategy) and checked for the columns rewards read
            eval_dataset={"id": data.eval_id, "ood": data.eval_ood} if evaluating else None,
            sft_dataset=data.sft,
            val_dataset=data.validation,
            quantization_config=get_quantization_config(model_args),
            peft_config=get_peft_config(model_args),
        )
    trainer.accelerator.print(
        f"AMFT on {model_name_or_path}: General Points with {script_args.num_cards} cards to {script_args.target}; "
        f"{len(data.rl)} RL prompts, {len(trainer.sft_dataset)} SFT demonstrations, {len(data.validation)} "
        "validation prompts"
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_state()  # trainer_state.json (the log history plot_training_dynamics reads), even with save_strategy "no"
    trainer.accelerator.print(training_summary(trainer))
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}")
    if script_args.eval_at_end:
        benchmarks = [
            benchmark_from_dataset(
                f"general_points_{rule}",
                dataset,
                general_points_reward,
                group="general_points",
                label=rule.upper(),
            )
            for rule, dataset in (("id", data.eval_id), ("ood", data.eval_ood))
        ]
        evaluate_after_training(trainer, benchmarks, num_samples=script_args.eval_num_samples)
    if training_args.push_to_hub:
        trainer.push_to_hub()
    trainer.accelerator.end_training()  # destroys the process group: see train_math.py


if __name__ == "__main__":
    main(*parse_args(GeneralPointsArguments))
