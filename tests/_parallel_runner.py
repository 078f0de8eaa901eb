"""A short AMFT run whose result must not depend on how the global batch is split over processes.

Run directly (one process) or under `torchrun --nproc_per_node N` / `accelerate launch --multi_gpu` (N CPU processes,
gloo). Rank 0 writes the trajectory (mu, g_mu, losses, a parameter checksum) to the JSON path given as argument.

Sampling is the one thing that legitimately differs with the process count (each rank seeds its own generator), so
generation is replaced by a deterministic function of (prompt, occurrence in its group, step). Everything else is
the real trainer: GRPO's loss and advantages, the SFT term, the validation policy gradient, the all-reduces and
the controller.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import zlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from trl import GRPOTrainer  # noqa: E402

from amft_trl import AMFTConfig, AMFTTrainer  # noqa: E402
from amft_trl.toy import addition_demos, addition_prompts, digit_fraction_reward  # noqa: E402


class DeterministicGeneration(GRPOTrainer):
    """Completions are pseudo-random token strings seeded by the prompt, the row's rank in its group and the step."""

    def _generate_single_turn(
        self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False
    ):
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)  # a VLM's processor
        vocab = len(tokenizer)
        image_token = getattr(self.processing_class, "image_token", None)
        if (
            image_token is not None
        ):  # never an image placeholder (the last token): the forward would want its image
            vocab = min(vocab, tokenizer.convert_tokens_to_ids(image_token))
        eos = tokenizer.eos_token_id
        seen: dict[tuple[int, ...], int] = {}
        completions = []
        for ids in prompt_ids:
            key = tuple(int(i) for i in ids)
            occurrence = seen.get(key, 0)
            seen[key] = occurrence + 1
            seed = zlib.crc32(repr((key, occurrence, self.state.global_step)).encode())
            generator = torch.Generator().manual_seed(seed)
            length = int(torch.randint(1, self.max_completion_length + 1, (1,), generator=generator))
            tokens = torch.randint(3, vocab, (length,), generator=generator).tolist()
            if length < self.max_completion_length:
                tokens.append(eos)
            completions.append(tokens)
        return completions, None


class DeterministicRolloutTrainer(AMFTTrainer, DeterministicGeneration):
    """AMFTTrainer over the deterministic generation: `AMFTTrainer._generate_single_turn` (LUFFY's, which generates
    the on-policy rows only) comes first in the MRO and its `super()` reaches `DeterministicGeneration`'s."""


class PerturbMu(TrainerCallback):
    """Moves this rank's mu off the others' after the first step: a stand-in for a rank that diverged."""

    def __init__(self, controller):
        self.controller = controller

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            self.controller.state.mu += 1e-3


class StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("output_json")
    parser.add_argument("--global_batch", type=int, default=8, help="rows per micro-step, over all processes")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=2)
    parser.add_argument("--max_steps", type=int, default=4)
    parser.add_argument("--deepspeed_stage", type=int, default=None)
    parser.add_argument("--meta_learning_rate", type=float, default=0.02)
    parser.add_argument("--save_steps", type=int, default=0)
    parser.add_argument("--stop_at", type=int, default=None, help="stop (as if interrupted) after this step")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument(
        "--float64", action="store_true", help="float64 weights and SGD: differences are rounding only"
    )
    parser.add_argument("--max_grad_norm", type=float, default=1.0)
    parser.add_argument("--cuda", action="store_true", help="run on CUDA devices (one per process)")
    parser.add_argument("--balancing", default="amft", help="the strategy (AMFTConfig.balancing)")
    parser.add_argument(
        "--strategy_args", default="{}", help="JSON object of AMFTConfig fields for the strategy"
    )
    parser.add_argument("--sgd", action="store_true", help="plain SGD (no Adam rounding to compare through)")
    parser.add_argument(
        "--perturb_rank", type=int, default=None, help="nudge mu on this rank (the check must fire)"
    )
    parser.add_argument(
        "--vlm",
        action="store_true",
        help="model_dir is the tiny LLaVA: image prompts, demonstrations, validation",
    )
    cli = parser.parse_args()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    deepspeed = None
    if cli.deepspeed_stage is not None:
        deepspeed = {
            "zero_optimization": {"stage": cli.deepspeed_stage},
            "train_micro_batch_size_per_gpu": "auto",
            "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto",
        }
    model = cli.model_dir
    if cli.deepspeed_stage == 3:
        # Loaded before the config exists: with a ZeRO-3 config alive, `from_pretrained` would partition the weights
        # under `deepspeed.zero.Init` before a multi-process CPU group exists. The engine partitions them instead.
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

        auto = AutoModelForImageTextToText if cli.vlm else AutoModelForCausalLM
        model = auto.from_pretrained(cli.model_dir, dtype=torch.float64 if cli.float64 else torch.float32)
    out_dir = os.path.join(os.path.dirname(os.path.abspath(cli.output_json)), "run")
    args = AMFTConfig(
        output_dir=out_dir,
        per_device_train_batch_size=cli.global_batch // world,
        gradient_accumulation_steps=cli.gradient_accumulation_steps,
        num_generations=4,
        max_completion_length=6,
        max_steps=cli.max_steps,
        learning_rate=1e-2,
        max_grad_norm=cli.max_grad_norm,
        report_to="none",
        use_cpu=not cli.cuda,
        logging_steps=1,
        save_strategy="steps" if cli.save_steps else "no",
        save_steps=cli.save_steps or 500,
        seed=7,
        sft_warmup_steps=1,
        meta_update_steps=2,
        meta_learning_rate=cli.meta_learning_rate,
        entropy_learning_rate=0.05,
        meta_val_batch_size=2,
        max_sft_length=64,
        disable_tqdm=True,
        deepspeed=deepspeed,
        optim="sgd" if cli.float64 or cli.sgd else "adamw_torch",
        model_init_kwargs={"dtype": torch.float64} if cli.float64 else None,
        balancing=cli.balancing,
        **{"target_entropy_num_samples": 8, **json.loads(cli.strategy_args)},
    )
    train_dataset = addition_prompts(32, seed=1)
    if cli.balancing in (
        "hpt",
        "luffy",
        "relift",
    ):  # they read each prompt's demonstration from the RL dataset
        train_dataset = train_dataset.map(
            lambda row: {"demonstration": f" {row['answer']}. The answer is {row['answer']}."}
        )
    datasets = dict(
        train_dataset=train_dataset,
        sft_dataset=addition_demos(32, seed=2),
        val_dataset=addition_prompts(16, seed=3),
    )
    if cli.vlm:
        from transformers import AutoProcessor

        from amft_trl.toy import image_addition_demos, image_addition_prompts

        datasets = dict(
            train_dataset=image_addition_prompts(32, seed=1),
            sft_dataset=image_addition_demos(32, seed=2),
            val_dataset=image_addition_prompts(16, seed=3),
            processing_class=AutoProcessor.from_pretrained(cli.model_dir),
        )
    trainer = DeterministicRolloutTrainer(
        model=model, reward_funcs=digit_fraction_reward, args=args, **datasets
    )
    if cli.stop_at is not None:
        trainer.add_callback(StopAt(cli.stop_at))
    if cli.perturb_rank is not None and trainer.accelerator.process_index == cli.perturb_rank:
        trainer.add_callback(PerturbMu(trainer.strategy))
    trainer.train(resume_from_checkpoint=True if cli.resume else None)
    params = list(trainer.model.parameters())
    gathered = contextlib.nullcontext()
    if cli.deepspeed_stage == 3:  # ZeRO-3 leaves each parameter partitioned outside forward/backward
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(params)
    with gathered:
        checksum = sum(float(p.detach().double().sum()) for p in params)
        digest = hashlib.sha256()
        for p in params:  # every bit of every parameter, in order: the recorded identity (tests/fixtures)
            digest.update(p.detach().cpu().contiguous().numpy().tobytes())
    if trainer.accelerator.is_main_process:
        history = trainer.strategy.state.history if cli.balancing == "amft" else []
        logs = [h for h in trainer.state.log_history if "amft/mu" in h]
        result = {
            "world_size": trainer.accelerator.num_processes,
            "distributed_type": str(trainer.accelerator.distributed_type),
            "mu": [r["mu"] for r in history] or [h["amft/mu"] for h in logs],
            "meta_term": [r["meta_term"] for r in history],
            "meta_gradient": [h.get("amft/meta_gradient") for h in logs],
            "sft_loss": [h.get("amft/sft_loss") for h in logs],
            "rl_loss": [h.get("amft/rl_loss") for h in logs],
            "val_reward": [h.get("amft/val_reward") for h in logs],
            "hpt_sft_fraction": [h.get("amft/hpt_sft_fraction") for h in logs],
            "luffy_importance_weight": [h.get("amft/luffy_importance_weight") for h in logs],
            "luffy_off_policy_fraction": [h.get("amft/luffy_off_policy_fraction") for h in logs],
            "relift_sft_step": [h.get("amft/relift_sft_step") for h in logs],
            "relift_buffer_fill": [h.get("amft/relift_buffer_fill") for h in logs],
            "target_entropy": [h.get("amft/target_entropy") for h in logs],
            "param_checksum": checksum,
            "param_sha256": digest.hexdigest(),
        }
        with open(cli.output_json, "w") as f:
            json.dump(result, f)
    # Without this, a rank exiting with its gloo group alive aborts now and then in teardown (SIGABRT, "terminate
    # called without an active exception", pytorch/pytorch#190489) after a finished run: a flaky test failure.
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main()
