"""AMFT on a vision-language model: image prompts for GRPO, image demonstrations for SFT, image validation prompts.

    accelerate launch examples/vlm/train_vlm.py --config examples/vlm/qwen2_5_vl_3b_1gpu.yaml
    accelerate launch --config_file examples/accelerate_configs/deepspeed_zero3.yaml --num_processes 8 \\
        examples/vlm/train_vlm.py --config examples/vlm/llama32_vision_11b_paper.yaml

Data (`dataset_name`: a hub id or a folder written by `DatasetDict.save_to_disk`): each row holds a conversational
`prompt`, its images (`image` or `images`, TRL's columns), the gold answer `solution` (graded by
`amft_trl.rewards.math_accuracy_reward`) and, for the rows that have one, a demonstration `completion` (an assistant
message list or a string). Rows of `train_split` are the RL prompts; those of them with a demonstration are the SFT
data; `val_split` gives AMFT's validation prompts (Eq. 4).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from trl import ModelConfig, TrlParser, get_peft_config

from amft_trl import AMFTConfig, AMFTTrainer
from amft_trl.rewards import boxed_format_reward, math_accuracy_reward

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


def load_splits(script_args: VLMScriptArguments):
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
    prompts = train.remove_columns(column)
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
    prompts, sft, val = load_splits(script_args)
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
