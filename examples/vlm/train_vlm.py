"""AMFT on a vision-language model: image prompts for GRPO, image demonstrations for SFT, image validation prompts.

    accelerate launch examples/vlm/train_vlm.py --config examples/vlm/qwen2_5_vl_3b_1gpu.yaml
    accelerate launch --config_file examples/accelerate_configs/deepspeed_zero3.yaml --num_processes 8 \\
        examples/vlm/train_vlm.py --config examples/vlm/llama32_vision_11b_paper.yaml

Data (`dataset_name`: a hub id or a folder written by `DatasetDict.save_to_disk`): each row holds a conversational
`prompt`, its images (`image` or `images`, TRL's columns), the gold answer `solution` (graded by
`amft_trl.rewards.math_accuracy_reward`) and, for the rows that have one, a demonstration `completion` (an assistant
message list or a string). Rows of `train_split` are the RL prompts; those of them with a demonstration are the SFT
data; `val_split` gives AMFT's validation prompts (Eq. 4).

`--balancing hpt|luffy|relift` read each prompt's demonstration from its own row instead: the RL prompts then keep
the demonstration column, renamed to the strategy's `hpt_demonstration_column` / `luffy_demonstration_column` /
`relift_demonstration_column` (default `demonstration`); LUFFY, which needs one per prompt, trains on the rows that
have one.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from trl import ModelConfig, TrlParser, get_peft_config

from amft_trl import AMFTConfig, AMFTTrainer
from amft_trl.rewards import boxed_format_reward, math_accuracy_reward

#: The strategies that read each prompt's demonstration from the RL prompts' rows, and the field naming its column.
ROW_DEMONSTRATIONS = {
    "hpt": "hpt_demonstration_column",
    "luffy": "luffy_demonstration_column",
    "relift": "relift_demonstration_column",
}

#: Parameter-name fragments of the vision encoder (and projector) of the VLM families transformers ships.
VISION_MODULES = ("vision_tower", ".visual.", "vision_model", "multi_modal_projector")


@dataclass
class VLMScriptArguments:
    dataset_name: str = field(metadata={"help": "Hub id, or a folder written by `DatasetDict.save_to_disk`."})
    train_split: str = field(
        default="train", metadata={"help": "RL prompts; rows with a demonstration are SFT data."}
    )
    val_split: str = field(
        default="validation", metadata={"help": "Validation prompts of the meta-gradient."}
    )
    demonstration_column: str = field(
        default="completion",
        metadata={"help": "Column of the demonstrations (empty or null: no demonstration)."},
    )
    freeze_vision_tower: bool = field(
        default=True,
        metadata={"help": "Train the language model only (the usual VLM recipe); see docs/source/vlm.md."},
    )


def freeze_vision(model) -> int:
    """Freeze every parameter of the vision encoder and projector; returns how many tensors were frozen."""
    frozen = 0
    for name, parameter in model.named_parameters():
        if any(part in f".{name}" for part in VISION_MODULES):
            parameter.requires_grad_(False)
            frozen += 1
    return frozen


def load_splits(script_args: VLMScriptArguments, balancing: str = "amft", row_column: str | None = None):
    """(RL prompts, SFT demonstrations, validation prompts). For `ROW_DEMONSTRATIONS` strategies the RL prompts keep
    the demonstration column, as `row_column` (LUFFY: only the rows that have one)."""
    from datasets import Value, load_dataset, load_from_disk

    if os.path.isdir(script_args.dataset_name):
        data = load_from_disk(script_args.dataset_name)
    else:
        data = load_dataset(script_args.dataset_name)
    train, val = data[script_args.train_split], data[script_args.val_split]
    column = script_args.demonstration_column
    if column not in train.column_names:
        raise ValueError(
            f"{script_args.train_split} has no demonstration column {column!r}: {train.column_names}"
        )
    with_demo = train.filter(lambda row: bool(row[column]))
    sft = with_demo.rename_column(column, "completion") if column != "completion" else with_demo
    sft = sft.select_columns(
        [c for c in ("prompt", "completion", "image", "images") if c in sft.column_names]
    )
    if isinstance(sft.features["completion"], Value):  # a string: the assistant's message after the prompt
        sft = sft.map(lambda row: {"completion": [{"role": "assistant", "content": row["completion"]}]})
    if balancing not in ROW_DEMONSTRATIONS:
        return train.remove_columns(column), sft, val
    prompts = with_demo if balancing == "luffy" else train
    if row_column != column:
        if row_column in prompts.column_names:
            raise ValueError(
                f"{script_args.train_split} already has a column {row_column!r}: pick another name for the "
                f"demonstrations of --balancing {balancing} ({ROW_DEMONSTRATIONS[balancing]})."
            )
        prompts = prompts.rename_column(column, row_column)
    return prompts, sft, val


def main(script_args: VLMScriptArguments, training_args: AMFTConfig, model_args: ModelConfig) -> AMFTTrainer:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(
        model_args.model_name_or_path,
        dtype=model_args.dtype,
        trust_remote_code=training_args.trust_remote_code,
    )
    processor = AutoProcessor.from_pretrained(
        model_args.model_name_or_path, padding_side="left", trust_remote_code=training_args.trust_remote_code
    )
    peft_config = get_peft_config(model_args)
    if script_args.freeze_vision_tower and peft_config is None:
        print(f"Froze {freeze_vision(model)} vision parameter tensors.")
    field_name = ROW_DEMONSTRATIONS.get(training_args.balancing)
    row_column = getattr(training_args, field_name) if field_name else None
    prompts, sft, val = load_splits(script_args, training_args.balancing, row_column)
    print(f"{len(prompts)} RL prompts, {len(sft)} SFT demonstrations, {len(val)} validation prompts")
    trainer = AMFTTrainer(
        model=model,
        reward_funcs=[math_accuracy_reward, boxed_format_reward],
        args=training_args,
        train_dataset=prompts,
        sft_dataset=sft,
        val_dataset=val,
        processing_class=processor,
        peft_config=peft_config,
    )
    trainer.train()
    trainer.save_model(training_args.output_dir)
    print(f"Trained {trainer.state.global_step} steps; saved to {training_args.output_dir}")
    return trainer


def parse_args(argv: list[str] | None = None):
    parser = TrlParser((VLMScriptArguments, AMFTConfig, ModelConfig))
    return parser.parse_args_and_config(args=argv)


if __name__ == "__main__":
    main(*parse_args(sys.argv[1:]))
