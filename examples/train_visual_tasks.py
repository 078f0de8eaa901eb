"""Train a model on the AMFT paper's visual and multi-turn tasks with AMFT: General Points-VL (card images) and
V-IRL navigation ("SFT Memorizes, RL Generalizes", arXiv 2501.17161; the AMFT paper's appendix C).

- `task: general_points`: hands dealt by `amft_trl.tasks.general_points_visual` (no download). `visual: true` shows
  the hand as a card image (a vision-language model); `false` writes it out (GP-L, any chat model). With
  `revision: true` the model submits answers to the verifier through TRL's multi-turn loop
  (`GeneralPointsRevisionEnv`, up to `verify_iter` tries) and the demonstrations are the same tool-calling
  conversations; with `false` it writes one JSON answer, scored by `general_points_verifier_reward`.
- `task: virl`: routes from a local copy of the released data (`virl_path`, the hub dataset
  `tianzhechu/SFTvsRL_Data`, e.g. its `nyc_1k_routes/`), one action per turn through TRL's multi-turn loop
  (`VIRLNavigationEnv`); `visual: true` sends street views, `false` text observations.

After training (`eval_at_end`), the model is scored on the held-out splits with `amft-eval`'s benchmarks (success
rate): GP ID / OOD rule / OOD visual, V-IRL ID / OOD rule (relative actions) / OOD visual (`virl_ood_path`).

    # CPU, seconds: the tiny random VLM of amft_trl.toy, one-answer GP-VL (a smoke run, not a way to learn the game)
    python examples/train_visual_tasks.py --config examples/recipes/visual_general_points_cpu.yaml
    # one GPU: Qwen2.5-VL-3B-Instruct on GP-VL
    accelerate launch examples/train_visual_tasks.py --config examples/recipes/visual_general_points_1gpu.yaml
    # the paper's: LLaMA-3.2-11B-Vision-Instruct, 8 GPUs, ZeRO-3
    accelerate launch --config_file examples/accelerate_configs/deepspeed_zero3.yaml --num_processes 8 \\
        examples/train_visual_tasks.py --config examples/recipes/visual_general_points_paper.yaml

Bad input (a missing V-IRL folder or file, splits the data cannot fill, an unknown task, a model that cannot take
images) stops the script with one `error: ...` line before any model is loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from trl import ModelConfig, get_peft_config

from amft_trl import AMFTConfig, AMFTTrainer
from amft_trl.script_utils import (
    ScriptInputError,
    evaluate_after_training,
    model_init_kwargs,
    one_line_errors,
    parse_args,
    training_summary,
)

#: Parameter-name fragments of the vision encoder (and projector) of the VLM families transformers ships.
VISION_MODULES = ("vision_tower", ".visual.", "vision_model", "multi_modal_projector")


@dataclass
class VisualTaskArguments:
    """Script arguments: the task, its data and its evaluation."""

    task: str = field(default="general_points", metadata={"help": "general_points or virl."})
    visual: bool = field(
        default=True, metadata={"help": "Images (card images / street views; a VLM) or text observations."}
    )
    revision: bool = field(
        default=False,
        metadata={
            "help": "General Points: sequential revision through TRL's multi-turn loop (a chat template TRL parses "
            "tool calls for); false: one JSON answer. V-IRL always runs one action per turn."
        },
    )
    verify_iter: int = field(
        default=5,
        metadata={
            "help": "Verified answers per episode (GP; the reference's 5) or per position (V-IRL; its 2)."
        },
    )
    num_train: int = field(
        default=500, metadata={"help": "Training hands / routes (RL prompts and demonstrations)."}
    )
    num_validation: int = field(
        default=100, metadata={"help": "Validation hands / routes (the meta-gradient)."}
    )
    num_eval: int = field(default=100, metadata={"help": "Held-out hands / routes per evaluation split."})
    num_cards: int = field(default=4, metadata={"help": "General Points: cards per hand (the paper: 4)."})
    target: int = field(default=24, metadata={"help": "General Points: the number to reach (the paper: 24)."})
    resolution: int = field(
        default=512, metadata={"help": "Card image size (GP) or street-view size (V-IRL), in pixels."}
    )
    split_seed: int = field(default=0, metadata={"help": "Seed of the deal / route split."})
    virl_path: str | None = field(default=None, metadata={"help": "V-IRL: the local data folder."})
    virl_ood_path: str | None = field(
        default=None, metadata={"help": "V-IRL: another city's folder (the visual OOD evaluation)."}
    )
    straight_line_length: int = field(
        default=2, metadata={"help": "V-IRL: forward() positions between intersections."}
    )
    freeze_vision_tower: bool = field(
        default=True, metadata={"help": "Train the language model only (the usual VLM recipe)."}
    )
    tool_parser: str | None = field(
        default=None,
        metadata={
            "help": "For a chat template TRL does not recognise: the TRL response template that parses its tool "
            "calls (`llama3`, `qwen3`, `qwen3_5`: trl.chat_template_utils.<name>_template)."
        },
    )
    tiny_vlm: bool = field(
        default=False,
        metadata={
            "help": "Build amft_trl.toy's tiny random VLM offline instead of loading a model (smoke runs)."
        },
    )
    eval_at_end: bool = field(
        default=True,
        metadata={"help": "Score the held-out splits after training (success rate; <output_dir>/eval)."},
    )
    eval_num_samples: int = field(
        default=0, metadata={"help": "Sampled episodes per problem; 0: greedy only."}
    )


def build_data(args: VisualTaskArguments):
    """The task's datasets, its environment factory (None: one-turn) and the reward functions."""
    if args.task == "general_points":
        from amft_trl.tasks import general_points_visual as gpv

        data = gpv.build_general_points_visual_datasets(
            args.num_train,
            args.num_validation,
            args.num_eval,
            seed=args.split_seed,
            num_cards=args.num_cards,
            target=args.target,
            visual=args.visual,
            revision=args.revision,
            resolution=args.resolution,
            verify_iter=args.verify_iter,
        )
        if args.revision:
            return data, gpv.general_points_revision_env_factory(args.verify_iter), []
        return data, None, [gpv.general_points_verifier_reward]
    if args.task == "virl":
        from amft_trl.tasks import virl

        if args.virl_path is None:
            raise ScriptInputError("task virl needs virl_path (the local V-IRL data folder)")
        data = virl.build_virl_datasets(
            args.virl_path,
            args.num_train,
            args.num_validation,
            args.num_eval,
            ood_path=args.virl_ood_path,
            vision=args.visual,
            seed=args.split_seed,
            resolution=args.resolution,
            straight_line_length=args.straight_line_length,
        )
        factory = virl.virl_env_factory(
            args.virl_path,
            vision=args.visual,
            verify_iter=args.verify_iter,
            straight_line_length=args.straight_line_length,
            resolution=args.resolution,
        )
        return data, factory, []
    raise ScriptInputError(f"task must be general_points or virl, got {args.task!r}")


def benchmarks_for(args: VisualTaskArguments):
    """`amft-eval`'s benchmarks of the held-out splits this run deals (the same hands / routes)."""
    from amft_trl.evaluation import load_benchmarks
    from amft_trl.evaluation.multiturn import VisualTaskOptions

    prefix = ("gp" if args.task == "general_points" else "virl") + ("_vl" if args.visual else "_l")
    names = [f"{prefix}_id", f"{prefix}_ood_rule"]
    if args.task == "general_points" and args.visual or args.task == "virl" and args.virl_ood_path:
        names.append(f"{prefix}_ood_visual")
    options = VisualTaskOptions(
        gp_num_eval=args.num_eval,
        gp_num_cards=args.num_cards,
        gp_target=args.target,
        gp_seed=args.split_seed,
        gp_resolution=args.resolution,
        gp_revision_turns=args.verify_iter if args.revision else 0,
        virl_path=args.virl_path,
        virl_ood_path=args.virl_ood_path,
        virl_num_train=args.num_train,
        virl_num_validation=args.num_validation,
        virl_num_eval=args.num_eval,
        virl_seed=args.split_seed,
        virl_verify_iter=args.verify_iter,
        virl_resolution=args.resolution,
        virl_straight_line_length=args.straight_line_length,
    )
    return load_benchmarks(names, visual_tasks=options)


def load_model(args: VisualTaskArguments, training_args: AMFTConfig, model_args: ModelConfig):
    """(model, processing_class): the tiny VLM, a VLM and its processor, or a model path the trainer loads."""
    if args.tiny_vlm:
        from amft_trl.toy import build_vlm, build_vlm_processor

        processor = build_vlm_processor()
        model = build_vlm(processor)
        model.config.text_config.max_position_embeddings = (
            8192  # the task prompts are longer than the toy's 256
        )
        return model, processor
    if model_args.model_name_or_path is None:
        raise ScriptInputError("set model_name_or_path (or tiny_vlm: true for a smoke run)")
    if not args.visual:
        return model_args.model_name_or_path, None  # AMFTTrainer loads it with model_init_kwargs
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from amft_trl.vision import is_vision_model

    if not is_vision_model(model_args.model_name_or_path, training_args.trust_remote_code):
        raise ScriptInputError(
            f"visual: true needs a vision-language model; {model_args.model_name_or_path} is not"
        )
    model = AutoModelForImageTextToText.from_pretrained(
        model_args.model_name_or_path,
        dtype=model_args.dtype,
        trust_remote_code=training_args.trust_remote_code,
    )
    processor = AutoProcessor.from_pretrained(
        model_args.model_name_or_path, padding_side="left", trust_remote_code=training_args.trust_remote_code
    )
    return model, processor


def set_tool_parser(processing_class, name: str) -> None:
    """Set `trl.chat_template_utils.<name>_template` as the tokenizer's response template (what TRL's loop and
    `amft-eval` parse tool calls with)."""
    from trl import chat_template_utils

    template = getattr(chat_template_utils, f"{name}_template", None)
    if not isinstance(template, dict):
        raise ScriptInputError(f"tool_parser {name!r}: trl.chat_template_utils has no {name}_template")
    getattr(processing_class, "tokenizer", processing_class).response_template = template


def main(script_args: VisualTaskArguments, training_args: AMFTConfig, model_args: ModelConfig) -> AMFTTrainer:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # environment_factory is experimental in TRL
    with one_line_errors():  # bad input, before any model is loaded: one `error: ...` line
        if min(script_args.num_train, script_args.num_validation, script_args.num_eval) < 1:
            raise ScriptInputError("num_train, num_validation and num_eval must be at least 1")
        data, environment_factory, reward_funcs = build_data(script_args)
        benchmarks = benchmarks_for(script_args) if script_args.eval_at_end else None
        if environment_factory is not None and training_args.max_tool_calling_iterations is None:
            raise ScriptInputError(
                "set max_tool_calling_iterations (at least verify_iter for General Points; the longest route's "
                "positions times verify_iter for V-IRL)"
            )
        model, processing_class = load_model(script_args, training_args, model_args)
        if script_args.tool_parser is not None:
            if processing_class is None:
                from transformers import AutoTokenizer

                processing_class = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
            set_tool_parser(processing_class, script_args.tool_parser)
    if isinstance(model, str):
        training_args.model_init_kwargs = model_init_kwargs(model_args, training_args)
    peft_config = get_peft_config(model_args)
    if script_args.freeze_vision_tower and peft_config is None and not isinstance(model, str):
        frozen = 0
        for name, param in model.named_parameters():
            if any(part in name for part in VISION_MODULES):
                param.requires_grad_(False)
                frozen += 1
        print(f"Froze {frozen} vision parameter tensors.")
    with one_line_errors(ValueError, ImportError):  # the trainer's checks
        trainer = AMFTTrainer(
            model=model,
            reward_funcs=reward_funcs,
            args=training_args,
            train_dataset=data.rl,
            sft_dataset=data.sft,
            val_dataset=data.validation,
            processing_class=processing_class,
            environment_factory=environment_factory,
            peft_config=peft_config,
        )
    trainer.accelerator.print(
        f"AMFT on {script_args.task} ({'images' if script_args.visual else 'text'}"
        f"{', sequential revision' if environment_factory and script_args.task == 'general_points' else ''}): "
        f"{len(data.rl)} RL prompts, {len(trainer.sft_dataset)} SFT demonstrations, {len(data.validation)} "
        "validation prompts"
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_state()
    trainer.accelerator.print(training_summary(trainer))
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}")
    if benchmarks is not None:
        evaluate_after_training(trainer, benchmarks, num_samples=script_args.eval_num_samples)
    trainer.accelerator.end_training()
    return trainer


if __name__ == "__main__":
    main(*parse_args(VisualTaskArguments))
