"""`make demo`: AMFT on a tiny offline model, about a minute on a laptop CPU.

What it does, top to bottom:
1. builds a tokenizer and a tiny random Qwen2 offline (`amft_trl.toy`): no hub access;
2. trains it with `AMFTTrainer` on an addition task: a short SFT warm-up, then mixed SFT + GRPO steps with the
   mu controller on (entropy term every step, meta-gradient every few steps);
3. prints how mu, entropy and reward moved, plus greedy held-out accuracy before and after, and writes the
   metrics (JSON) and a plot (PNG) to the output directory.

Simplified on purpose: the model is random and tiny, so the task is the easiest one that shows learning
(single-number additions); a later version of the demo uses a real small model.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from amft_trl import AMFTConfig, AMFTTrainer  # noqa: E402
from amft_trl.toy import addition_demos, addition_prompts, addition_reward, build_model, build_tokenizer  # noqa: E402


@torch.no_grad()
def greedy_accuracy(model, tokenizer, dataset) -> float:
    model.eval()
    tokenizer.padding_side = "left"
    batch = tokenizer(list(dataset["prompt"]), return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    completions = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    model.train()
    return sum(addition_reward(completions, list(dataset["answer"]))) / len(dataset)


def plot(history: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False

    def series(key):
        return [(h["step"], h[key]) for h in history if key in h and h[key] is not None]

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for key, label in [("reward", "train reward"), ("amft/val_reward", "validation reward")]:
        if series(key):
            top.plot(*zip(*series(key)), label=label)
    top.set_ylabel("reward")
    mu_axis = top.twinx()
    mu_axis.plot(*zip(*series("amft/mu")), color="black", linestyle="--", label="mu")
    mu_axis.set_ylabel("mu (SFT weight)")
    top.legend(loc="upper left")
    mu_axis.legend(loc="upper right")
    for key, label in [("amft/entropy", "entropy H_t"), ("amft/target_entropy", "target H*")]:
        if series(key):
            bottom.plot(*zip(*series(key)), label=label)
    bottom.set_xlabel("optimizer step")
    bottom.set_ylabel("nats / token")
    bottom.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="outputs/demo")
    parser.add_argument("--max-steps", type=int, default=400)
    parser.add_argument("--warmup-steps", type=int, default=50)
    args_cli = parser.parse_args()
    out = Path(args_cli.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer()
    model = build_model(tokenizer, hidden_size=64, num_layers=2)
    train, demos = addition_prompts(256, seed=1, max_operand=9), addition_demos(512, seed=2, max_operand=9)
    val, test = addition_prompts(64, seed=3, max_operand=9), addition_prompts(100, seed=4, max_operand=9)

    args = AMFTConfig(
        output_dir=str(out),
        max_steps=args_cli.max_steps,
        sft_warmup_steps=args_cli.warmup_steps,
        per_device_train_batch_size=8,
        num_generations=8,
        max_completion_length=8,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        meta_update_steps=20,
        meta_val_batch_size=4,
        meta_learning_rate=0.05,
        entropy_learning_rate=0.01,
        logging_steps=5,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=0,
    )
    trainer = AMFTTrainer(
        model=model,
        reward_funcs=[addition_reward],
        args=args,
        train_dataset=train,
        sft_dataset=demos,
        val_dataset=val,
        processing_class=tokenizer,
    )
    before = greedy_accuracy(trainer.model, tokenizer, test)
    start = time.time()
    trainer.train()
    minutes = (time.time() - start) / 60
    after = greedy_accuracy(trainer.model, tokenizer, test)

    history = trainer.state.log_history
    (out / "metrics.json").write_text(json.dumps(history, indent=1))
    plotted = plot(history, out / "dynamics.png")

    def first_last(key):
        values = [h[key] for h in history if h.get(key) is not None]
        return (values[0], values[-1]) if values else (float("nan"), float("nan"))

    print(f"\nAMFT demo: {args.max_steps} steps ({args.sft_warmup_steps} warm-up) in {minutes:.1f} min")
    mu_path = [h["mu"] for h in trainer.mu_controller.state.history]
    print(
        f"  mu (SFT weight)          {args.mu_init:.3f} -> {trainer.mu_controller.mu:.3f}"
        f"   (range over the run {min(mu_path):.3f}..{max(mu_path):.3f})"
    )
    h0, h1 = first_last("amft/entropy")
    print(
        f"  entropy (nats/token)     {h0:.3f} -> {h1:.3f}   target H* = {trainer.mu_controller.target_entropy:.3f}"
    )
    r0, r1 = first_last("reward")
    print(f"  train reward             {r0:.3f} -> {r1:.3f}")
    print(f"  held-out greedy accuracy {before:.2f} -> {after:.2f}   (100 unseen additions)")
    print(f"  metrics: {out / 'metrics.json'}")
    if plotted:
        print(f"  plot:    {out / 'dynamics.png'}")


if __name__ == "__main__":
    main()
