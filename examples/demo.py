"""`make demo`: AMFT on a real small model (SmolLM2-135M-Instruct), on CPU, in under 10 minutes.

What it does, top to bottom:
1. loads the embedded model (`amft_trl.embedded_model.embedded_model_path()`: SmolLM2-135M-Instruct, converted once to a
   plain fp32 checkpoint and cached) or the model given with `--model`;
2. builds a small General Points task (`amft_trl.tasks.general_points`): three cards, reach 10; training and
   validation hands under the in-distribution face-card rule (J = Q = K = 10), held-out test hands under the same
   rule (ID) and under the changed rule J, Q, K = 11, 12, 13 (OOD);
3. measures greedy accuracy on both held-out sets, trains with `AMFTTrainer` (an SFT warm-up, then mixed
   SFT + GRPO steps with the mu controller on: entropy term every step, meta-gradient every few steps), and measures
   again;
4. writes `metrics.json` (settings, before/after figures, timings, the Trainer's log history) and a plot of the
   training dynamics to the output directory, and prints a before/after summary.

Simplified on purpose, so that it fits 10 CPU minutes on 2 cores and still shows learning:
- the task is the paper's card game made small: 3 cards and a target of 10 instead of 4 cards and 24 (measured:
  the model solves none of 32 sampled 4-card attempts zero-shot, and nothing moves in 10 CPU minutes);
- prompts and answers are short (about 45 prompt tokens; the answer is `{"formula": "..."}`, about 15 tokens)
  instead of the paper's long prompt and full JSON: CPU cost grows with every token;
- about 60 optimizer steps with a large learning rate (1e-4, constant) and a few rollouts per prompt, where the
  paper runs 500 steps at 1e-6 with 8 rollouts; the controller's rates are raised to match (`mu` must be able to
  move within ~30 mixed steps), so the mu trajectory illustrates the mechanism rather than the paper's settings.

`--tiny` runs the same pipeline on the offline tiny random model of `amft_trl.toy` for a few steps (seconds; used by
the tests): it shows the plumbing, not learning.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import ProgressCallback, TrainerCallback  # noqa: E402

from amft_trl import AMFTConfig, AMFTTrainer  # noqa: E402
from amft_trl.tasks import general_points as gp  # noqa: E402

NUM_CARDS, TARGET = 3, 10
SPLIT_FRACTIONS = (0.5, 0.1, 0.4)  # more test hands than the module's default: 3-card hands are few
RULE_TEXT = {"id": "J, Q, K = 10", "ood": "J, Q, K count as 11, 12, 13"}


# ------------------------------------------------------------------------------------------------ the task


def prompt(cards: list[str], rule: str) -> str:
    """A short General Points prompt (the module's `make_prompt` is the paper's, ~3x longer)."""
    return (
        f"Cards: {', '.join(cards)} ({RULE_TEXT[rule]}). Make {TARGET} using each card once with "
        f'+ - * / ( ). Answer {{"formula": "..."}}\n'
    )


def answer(cards: list[str], rule: str) -> str:
    """A correct answer from the module's exact solver, in the short JSON format the reward reads."""
    formula = gp.solve(gp.hand_values(cards, rule), TARGET)
    return json.dumps({"formula": f"{formula}={TARGET}"})


def prompts(hands: list[list[str]], rule: str) -> Dataset:
    """RL / validation / evaluation prompts, with the columns `general_points_reward` reads."""
    rows = [{"prompt": prompt(h, rule), "cards": h, "face_card_rule": rule, "target": TARGET} for h in hands]
    return Dataset.from_list(rows)


def demonstrations(hands: list[list[str]]) -> Dataset:
    return Dataset.from_list([{"prompt": prompt(h, "id"), "completion": answer(h, "id")} for h in hands])


def build_task(num_train: int, num_val: int, num_eval: int) -> dict[str, Dataset]:
    def hands(n: int, split: str, rule: str) -> list[list[str]]:
        return gp.generate_hands(
            n,
            split=split,
            face_card_rule=rule,
            num_cards=NUM_CARDS,
            target=TARGET,
            split_fractions=SPLIT_FRACTIONS,
        )

    train = hands(num_train, "train", "id")
    return {
        "rl": prompts(train, "id"),
        "sft": demonstrations(train),
        "validation": prompts(hands(num_val, "validation", "id"), "id"),
        "eval_id": prompts(hands(num_eval, "test", "id"), "id"),
        "eval_ood": prompts(hands(num_eval, "test", "ood"), "ood"),
    }


@torch.no_grad()
def greedy_accuracy(model, tokenizer, dataset: Dataset, max_new_tokens: int, batch_size: int = 64) -> float:
    """Fraction of held-out prompts whose greedy answer scores 1 under `general_points_reward`."""
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    completions = []
    for start in range(0, len(dataset), batch_size):
        batch = tokenizer(dataset["prompt"][start : start + batch_size], return_tensors="pt", padding=True)
        out = model.generate(
            **batch.to(model.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        completions += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    tokenizer.padding_side = side
    model.train()
    rewards = gp.general_points_reward(
        completions,
        cards=dataset["cards"],
        face_card_rule=dataset["face_card_rule"],
        target=dataset["target"],
    )
    return sum(rewards) / max(len(rewards), 1)


# ------------------------------------------------------------------------------------------------ the run


class StatusBar(ProgressCallback):
    """The Trainer's tqdm bar, with mu and the reward in its postfix instead of a printed dict per log."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.training_bar is not None and logs:
            shown = {"mu": logs.get("amft/mu"), "reward": logs.get("reward"), "H": logs.get("amft/entropy")}
            self.training_bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items() if v is not None})


class StepTimer(TrainerCallback):
    """Wall-clock seconds of each optimizer step."""

    def __init__(self):
        self.seconds: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._start)


def free_cores() -> int:
    """CPU cores not already busy (from the 1-minute load average), at least 1.

    On a shared machine, more torch threads than free cores is very slow: every small operation waits for a
    descheduled thread. Measured on 2 cores with ~3 other busy processes: a 20-token generation took 15-42 s with
    2 threads and 4-5 s with 1; a forward + backward of 4 x 60 tokens 17-28 s with 2 threads, 3-4 s with 1.
    """
    cores = os.cpu_count() or 1
    return max(1, min(cores, round(cores - os.getloadavg()[0])))


def load_model(args):
    if args.tiny:
        from amft_trl.toy import build_model, build_tokenizer

        tokenizer = build_tokenizer()
        return (
            build_model(tokenizer, hidden_size=64, num_layers=2),
            tokenizer,
            "tiny random Qwen2 (amft_trl.toy)",
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.model is None:
        from amft_trl.embedded_model import embedded_model_path

        path = embedded_model_path()
    else:
        path = args.model
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model, tokenizer, str(path)


def first_last(history: list[dict], key: str, window: int = 3) -> tuple[float, float]:
    """Mean of the first and of the last `window` logged values of `key` (nan when never logged)."""
    values = [h[key] for h in history if h.get(key) is not None and math.isfinite(h[key])]
    if not values:
        return float("nan"), float("nan")
    return sum(values[:window]) / len(values[:window]), sum(values[-window:]) / len(values[-window:])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="outputs/demo", help="where metrics.json and the plot go")
    parser.add_argument("--model", default=None, help="model path or id (default: the embedded SmolLM2-135M)")
    parser.add_argument("--max-steps", type=int, default=None, help="optimizer steps, warm-up included")
    parser.add_argument("--warmup-steps", type=int, default=None, help="SFT-only steps at the start")
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: the cores not already busy, from the load average; at least 1)",
    )
    parser.add_argument(
        "--tiny", action="store_true", help="tiny offline random model, a few steps (for tests)"
    )
    args = parser.parse_args(argv)
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads or free_cores())
    torch.manual_seed(0)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    max_steps = args.max_steps or (3 if args.tiny else 64)
    warmup = args.warmup_steps if args.warmup_steps is not None else (1 if args.tiny else 40)
    num_eval = 4 if args.tiny else 50
    task = build_task(num_train=16 if args.tiny else 64, num_val=8 if args.tiny else 32, num_eval=num_eval)

    model, tokenizer, model_name = load_model(args)
    t_loaded = time.perf_counter()
    max_new = 20
    before = {
        "id_accuracy": greedy_accuracy(model, tokenizer, task["eval_id"], max_new),
        "ood_accuracy": greedy_accuracy(model, tokenizer, task["eval_ood"], max_new),
    }
    t_before = time.perf_counter()

    config = AMFTConfig(
        output_dir=str(out),
        max_steps=max_steps,
        sft_warmup_steps=warmup,
        per_device_train_batch_size=4,  # completions per step: 1 prompt x 4 rollouts
        num_generations=4,
        sft_per_device_train_batch_size=4,
        max_completion_length=max_new,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        meta_update_steps=5,
        meta_val_batch_size=2,
        meta_learning_rate=0.05,
        entropy_learning_rate=0.02,
        target_entropy_num_samples=16,
        gradient_checkpointing=False,  # TRL turns it on by default: ~30% more compute, and memory is no issue here
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=False,
        use_cpu=True,
        bf16=False,
        seed=0,
    )
    timer = StepTimer()
    trainer = AMFTTrainer(
        model=model,
        reward_funcs=[gp.general_points_reward],
        args=config,
        train_dataset=task["rl"],
        sft_dataset=task["sft"],
        val_dataset=task["validation"],
        processing_class=tokenizer,
        callbacks=[timer],
    )
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(StatusBar())
    trainer.train()
    t_trained = time.perf_counter()
    after = {
        "id_accuracy": greedy_accuracy(trainer.model, tokenizer, task["eval_id"], max_new),
        "ood_accuracy": greedy_accuracy(trainer.model, tokenizer, task["eval_ood"], max_new),
    }
    t_after = time.perf_counter()

    history = trainer.state.log_history
    mixed_history = [h for h in history if h.get("amft/mu") is not None and h.get("reward") is not None]
    before["reward"], after["reward"] = first_last(mixed_history, "reward")
    before["entropy"], after["entropy"] = first_last(history, "amft/entropy")
    mu_path = [h["mu"] for h in trainer.strategy.state.history]
    before["mu"], after["mu"] = config.mu_init, trainer.strategy.mu

    plot_path = plot(history, out, before, after)
    t_end = time.perf_counter()
    step_seconds = timer.seconds
    metrics = {
        "model": model_name,
        "task": {
            "name": "general_points",
            "num_cards": NUM_CARDS,
            "target": TARGET,
            "split_fractions": SPLIT_FRACTIONS,
            "sizes": {name: len(ds) for name, ds in task.items()},
        },
        "settings": {
            k: getattr(config, k)
            for k in (
                "max_steps",
                "sft_warmup_steps",
                "per_device_train_batch_size",
                "sft_per_device_train_batch_size",
                "num_generations",
                "max_completion_length",
                "learning_rate",
                "lr_scheduler_type",
                "mu_init",
                "meta_update_steps",
                "meta_val_batch_size",
                "meta_learning_rate",
                "entropy_learning_rate",
                "target_entropy_num_samples",
                "gradient_checkpointing",
                "seed",
            )
        },
        "before": before,
        "after": after,
        "mu_range": [min(mu_path, default=config.mu_init), max(mu_path, default=config.mu_init)],
        "target_entropy": trainer.strategy.target_entropy,
        "timings_s": {
            "load": t_loaded - t_start,
            "eval_before": t_before - t_loaded,
            "train": t_trained - t_before,
            "eval_after": t_after - t_trained,
            "total": t_end - t_start,
            "process_cpu": time.process_time(),
            "warmup_step_mean": _mean(step_seconds[:warmup]),
            "mixed_step_mean": _mean(step_seconds[warmup:]),
            "steps": step_seconds,
        },
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_avg": os.getloadavg(),
        },
        "platform": platform.platform(),
        "log_history": history,
    }
    metrics_path = out / "metrics.json"
    metrics_path.write_text(json.dumps(metrics, indent=1))

    print(
        f"\nAMFT demo on {model_name}: {max_steps} steps ({warmup} warm-up) in {(t_end - t_start) / 60:.1f} min"
    )
    print(f"  {'':28}{'before':>8}{'after':>8}")
    rows = [
        ("train reward (mixed steps)", "reward"),
        ("mu (SFT weight)", "mu"),
        ("entropy H_t (nats/token)", "entropy"),
        (f"held-out ID accuracy ({len(task['eval_id'])})", "id_accuracy"),
        (f"held-out OOD accuracy ({len(task['eval_ood'])})", "ood_accuracy"),
    ]
    for label, key in rows:
        print(f"  {label:28}{before[key]:8.3f}{after[key]:8.3f}")
    print(f"  metrics: {metrics_path}")
    print(f"  plot:    {plot_path}")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def plot(history: list[dict], out: Path, before: dict, after: dict) -> Path | None:
    from amft_trl.plotting import plot_training_dynamics

    steps = max((h.get("step", 0) for h in history), default=0)
    extra = {
        "held-out ID accuracy": [(0, before["id_accuracy"]), (steps, after["id_accuracy"])],
        "held-out OOD accuracy": [(0, before["ood_accuracy"]), (steps, after["ood_accuracy"])],
    }
    return plot_training_dynamics(history, out / "training_dynamics.png", title="AMFT demo", extra=extra)


if __name__ == "__main__":
    main()
