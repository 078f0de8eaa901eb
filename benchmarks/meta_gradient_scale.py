"""How large are AMFT's meta-gradient terms (Eq. 25) on a real small model?

Runs `AMFTTrainer` on a small arithmetic task with the paper's settings (raw Eq. 25, alpha = policy lr = 1e-6,
eta_mu = 1e-4, a meta step every optimizer step, entropy term off) and records, per meta step:

- g_mu (raw Eq. 25 at the current lr alpha), the cosine diagnostic, |grad U|, |d| = |grad L_SFT - grad L_RL|,
  <grad U, d>, alpha;
- the change of mu the raw form makes with the paper's eta_mu (eta_mu * g_mu), and what the trainer actually logged
  (`amft/meta_term`) as a cross-check;
- offline: what the default normalised form (`rms_normalized_meta_gradient`, eta_mu = 0.05) would do with the same
  sequence of g_mu.

Nothing in src/ is modified: the run uses `meta_diagnostics=True` (so |d| and the cosine are computed), and a subclass
of `AMFTTrainer` reads each meta step's measurements where the step ends (`_end_step`).

Usage:
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/meta_gradient_scale.py --model /tmp/smollm2-135m-instruct \
        --steps 6 --out benchmarks/results/meta_gradient_scale_smollm2
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/meta_gradient_scale.py --model tiny \
        --steps 6 --out benchmarks/results/meta_gradient_scale_tiny

`--model tiny` builds the random 2-layer Qwen2 + BPE tokenizer of tests/conftest.py into a temporary directory.
`--out` is a path prefix: `<out>.json` and `<out>.md` are written.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import random
import re
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback  # noqa: E402

from amft_trl import AMFTConfig, AMFTTrainer  # noqa: E402
from amft_trl.balancing.amft import rms_normalized_meta_gradient  # noqa: E402
from amft_trl.gradients import grad_dot  # noqa: E402

PAPER_ETA_MU = 1e-4  # Eq. 6, raw form (paper)
NORMALIZED_DEFAULT_ETA_MU = 0.05  # AMFTConfig.meta_learning_rate default (normalised form)

# ----------------------------------------------------------------------------------------------------------------
# task
# ----------------------------------------------------------------------------------------------------------------


def _problem(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    if rng.random() < 0.5:
        return f"What is {a} + {b}? Answer with the number only.", a + b
    a, b = max(a, b), min(a, b)
    return f"What is {a} - {b}? Answer with the number only.", a - b


def make_prompts(n: int, seed: int) -> Dataset:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        question, answer = _problem(rng)
        rows.append({"prompt": [{"role": "user", "content": question}], "answer": str(answer)})
    return Dataset.from_list(rows)


def make_demos(n: int, seed: int) -> Dataset:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        question, answer = _problem(rng)
        rows.append(
            {
                "prompt": [{"role": "user", "content": question}],
                "completion": [{"role": "assistant", "content": str(answer)}],
            }
        )
    return Dataset.from_list(rows)


_NUMBER = re.compile(r"-?\d+")


def arithmetic_reward(completions, answer, **kwargs) -> list[float]:
    """1.0 if the correct number appears in the completion, plus a small dense shaping term.

    Shaping (at most 0.2 in total, so correctness dominates): 0.1 * exp(-|first number - answer| / 5) for being
    close, and 0.1 * (1 - min(len, 100) / 100) for being short, so that groups of wrong answers still differ.
    """
    out = []
    for completion, target in zip(completions, answer, strict=True):
        text = completion if isinstance(completion, str) else completion[-1]["content"]
        numbers = [int(x) for x in _NUMBER.findall(text)]
        correct = 1.0 if int(target) in numbers else 0.0
        closeness = 0.1 * math.exp(-abs(numbers[0] - int(target)) / 5.0) if numbers else 0.0
        brevity = 0.1 * (1.0 - min(len(text), 100) / 100.0)
        out.append(correct + closeness + brevity)
    return out


# ----------------------------------------------------------------------------------------------------------------
# instrumentation
# ----------------------------------------------------------------------------------------------------------------


class InstrumentedAMFTTrainer(AMFTTrainer):
    """AMFTTrainer that also stores each meta step's raw measurements (the src files are not touched)."""

    def __init__(self, *args, noise_repeats: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.meta_records: list[dict] = []
        self.noise_repeats = noise_repeats

    def _extra_estimates(self, model, meta) -> list[dict]:
        """Re-estimate <grad U, d> on `noise_repeats` fresh validation batches at the same parameters and the same d.

        Measures the sampling noise of g_mu (the main estimate comes from the trainer's own validation batch). With
        `meta_diagnostics` the step's RL and SFT gradients are kept apart in the meta step's buffers.
        """
        params = self._trainable_params
        d = [s - r for s, r in zip(meta.buffers["sft"], meta.buffers["rl"], strict=True)]
        d_norm = math.sqrt(grad_dot(d, d))
        alpha = self.optimizer.param_groups[0]["lr"]
        out = []
        for _ in range(self.noise_repeats):
            for p in params:
                p.grad = None
            val_reward = self._validation_backward(model)
            grad_val = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            dot = -grad_dot(grad_val, d)  # <grad U, d> with grad U = -grad_val
            u_norm = math.sqrt(grad_dot(grad_val, grad_val))
            out.append(
                {
                    "g_mu": -alpha * dot,
                    "grad_utility_dot_direction": dot,
                    "grad_utility_norm": u_norm,
                    "direction_norm": d_norm,
                    "cosine": -dot / (u_norm * d_norm) if u_norm * d_norm else 0.0,
                    "val_reward": val_reward,
                }
            )
        for p in params:
            p.grad = None
        del d
        return out

    def _end_step(self, step):
        meta = step.meta
        if meta is None:
            return super()._end_step(step)
        extra = self._extra_estimates(self.model, meta) if self.noise_repeats else []
        finish, captured = meta.finish, {}

        def recorded(*args, **kwargs):
            captured["m"] = finish(*args, **kwargs)
            return captured["m"]

        meta.finish = recorded
        super()._end_step(step)
        m = captured["m"]
        self.meta_records.append(
            {
                "global_step": self.state.global_step,  # 0-based index of the optimizer step being taken
                "mu_used": step.plan.sft_weight,
                "alpha": self.optimizer.param_groups[0]["lr"],
                "g_mu": m.meta_gradient,
                "cosine": m.cosine,
                "grad_utility_norm": m.grad_utility_norm,
                "direction_norm": m.direction_norm,
                "grad_utility_dot_direction": m.grad_utility_dot_direction,
                "val_reward": m.val_reward,
                "extra_estimates": extra,
            }
        )


class StepRecorder(TrainerCallback):
    """Wall time per optimizer step and the trainer's own logged metrics."""

    def __init__(self):
        self.step_seconds: list[float] = []
        self.logs: list[dict] = []
        self._t0 = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._t0 is not None:
            self.step_seconds.append(time.perf_counter() - self._t0)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            self.logs.append({"step": state.global_step, **{k: v for k, v in logs.items()}})


# ----------------------------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------------------------


def build_tiny_model_dir() -> str:
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import build_model, build_tokenizer  # noqa: PLC0415

    path = tempfile.mkdtemp(prefix="tiny-qwen2-")
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def normalized_sequence(g_mus: list[float], eta: float) -> list[dict]:
    """Replay the controller's normalised form (`rms_normalized_meta_gradient`) on a sequence of raw g_mu."""
    v, out = 0.0, []
    for n, g in enumerate(g_mus):
        g_hat, v = rms_normalized_meta_gradient(g, v, n)
        out.append({"g_hat": g_hat, "mu_change": eta * g_hat, "second_moment": v})
    return out


# ----------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------


def _fmt(x, spec=".3e"):
    if x is None:
        return "-"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return format(x, spec)


def _noise_lines(result: dict) -> list[str]:
    noise = result["summary"].get("noise")
    if not noise:
        return []
    lines = [
        f"Noise check: at each meta step, g_mu re-estimated on {len(noise[0]['g_mu_estimates']) - 1} more fresh "
        f"validation batches ({result['run']['config']['meta_val_batch_size']} prompts x "
        f"{result['run']['config']['num_generations']} rollouts each) at the same parameters and the same d:",
        "",
        "| step | g_mu estimates | mean | std | std/|mean| | fraction > 0 | cosines |",
        "|---:|---|---:|---:|---:|---:|---|",
    ]
    for n in noise:
        lines.append(
            f"| {n['global_step']} | {', '.join(_fmt(g, '+.2e') for g in n['g_mu_estimates'])} | {_fmt(n['mean'], '+.2e')} "
            f"| {_fmt(n['std'], '.2e')} | {_fmt(n['std_over_abs_mean'], '.2f')} | {n['fraction_positive']:.2f} "
            f"| {', '.join(_fmt(c, '+.3f') for c in n['cosines'])} |"
        )
    return [*lines, ""]


def write_markdown(path: Path, result: dict) -> None:
    r, s = result["run"], result["summary"]
    lines = [
        f"# Meta-gradient scale: {r['model_label']}",
        "",
        f"- command: `{r['command']}`",
        f"- date: {r['date']}",
        f"- machine: {r['machine']}",
        f"- versions: torch {r['versions']['torch']}, transformers {r['versions']['transformers']}, "
        f"trl {r['versions']['trl']}",
        f"- model: {r['model']} ({r['num_parameters']:,} trainable parameters)",
        f"- settings: raw Eq. 25, alpha = lr = {r['config']['learning_rate']:g} ({r['config']['lr_scheduler_type']} "
        f"schedule), eta_mu = {r['config']['meta_learning_rate']:g}, meta step every step, "
        f"batch {r['config']['per_device_train_batch_size']} (1 prompt x {r['config']['num_generations']} "
        f"generations), meta_val_batch_size {r['config']['meta_val_batch_size']}, "
        f"max_completion_length {r['config']['max_completion_length']}, entropy term off, mu_init "
        f"{r['config']['mu_init']}",
        f"- wall time: {r['wall_seconds']:.1f} s total (setup {r['setup_seconds']:.1f} s, training "
        f"{r['train_seconds']:.1f} s); median optimizer step {s['median_step_seconds']:.1f} s (every step a meta "
        "step: validation rollouts + backward, the RL and SFT work, the inner products)",
        "",
        "Per meta step (raw = paper settings, eta_mu = 1e-4; normalised = default form, eta_mu = 0.05, replayed "
        "offline on the same g_mu sequence):",
        "",
        "| step | alpha | g_mu (raw) | cos | \\|grad U\\| | \\|d\\| | <grad U, d> | raw dmu = 1e-4 g_mu "
        "| logged meta_term | norm. g_hat | norm. dmu = 0.05 g_hat | val reward | mu |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["per_meta_step"]:
        lines.append(
            "| {step} | {alpha} | {g} | {cos} | {gu} | {d} | {dot} | {raw} | {logged} | {gh} | {nd} | {vr} | {mu} |".format(
                step=row["global_step"],
                alpha=_fmt(row["alpha"], ".1e"),
                g=_fmt(row["g_mu"]),
                cos=_fmt(row["cosine"], "+.4f"),
                gu=_fmt(row["grad_utility_norm"]),
                d=_fmt(row["direction_norm"]),
                dot=_fmt(row["grad_utility_dot_direction"]),
                raw=_fmt(row["raw_mu_change_paper_eta"]),
                logged=_fmt(row.get("logged_meta_term")),
                gh=_fmt(row["normalized_g_hat"], "+.3f"),
                nd=_fmt(row["normalized_mu_change"], "+.4f"),
                vr=_fmt(row["val_reward"], ".3f"),
                mu=_fmt(row["mu_used"], ".6f"),
            )
        )
    lines += [
        "",
        f"Summary: median |g_mu| = {s['median_abs_g_mu']:.3e}; median |raw dmu| at eta_mu = 1e-4: "
        f"{s['median_abs_raw_mu_change']:.3e} per meta step (sum over the run {s['sum_raw_mu_change']:+.3e}; mu "
        f"moved from {s['mu_first']:.9f} to {s['mu_final']:.9f}); median |cos| = {s['median_abs_cosine']:.3e}; "
        f"median |grad U| = {s['median_grad_utility_norm']:.3e}, median |d| = {s['median_direction_norm']:.3e}. "
        f"eta_mu that would make the raw form move mu by 0.01 per meta step at the median |g_mu|: "
        f"{s['eta_mu_for_0.01_per_step']:.3e}. Normalised form: median |dmu| = "
        f"{s['median_abs_normalized_mu_change']:.3e} per meta step.",
        "",
        *_noise_lines(result),
        "Columns: alpha = policy lr at the step (the alpha of Eq. 25); g_mu = -alpha <grad U, d> as logged in "
        "`amft/meta_gradient`; cos = cos(grad U, -d) (`amft/meta_cosine`); d = grad L_SFT - grad L_RL; logged "
        "meta_term = `amft/meta_term` (what the controller actually added to mu; should equal raw dmu); mu = the "
        "SFT weight used in that step.",
        "",
    ]
    path.write_text("\n".join(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", required=True, help="model directory, or 'tiny' for the test suite's tiny Qwen2"
    )
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps (each one is a meta step)")
    parser.add_argument("--out", required=True, help="output prefix: writes <out>.json and <out>.md")
    parser.add_argument("--learning-rate", type=float, default=1e-6, help="policy lr = alpha of Eq. 25")
    parser.add_argument(
        "--lr-scheduler-type",
        default="constant",
        help="constant keeps alpha at --learning-rate on every step",
    )
    parser.add_argument("--meta-learning-rate", type=float, default=PAPER_ETA_MU)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--meta-val-batch-size", type=int, default=2)
    parser.add_argument(
        "--noise-repeats",
        type=int,
        default=0,
        help="extra estimates of g_mu per meta step on fresh validation batches at the same parameters (noise check;"
        " consumes validation prompts, so the main g_mu sequence differs from a run without it)",
    )
    args = parser.parse_args(argv)

    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    if args.model == "tiny":
        model_dir, label = build_tiny_model_dir(), "tiny random Qwen2 (tests/conftest.py)"
    else:
        model_dir, label = args.model, Path(args.model).name
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    train = make_prompts(64, seed=args.seed + 1)
    val = make_prompts(32, seed=args.seed + 3)
    demos = make_demos(64, seed=args.seed + 2)

    out_prefix = Path(args.out)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    output_dir = tempfile.mkdtemp(prefix="amft-meta-scale-")
    config = AMFTConfig(
        output_dir=output_dir,
        use_cpu=True,
        bf16=False,
        report_to="none",
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=24,
        sft_warmup_steps=0,
        meta_update_steps=1,
        meta_val_batch_size=args.meta_val_batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type=args.lr_scheduler_type,
        entropy_learning_rate=0.0,
        meta_learning_rate=args.meta_learning_rate,
        meta_gradient_form="raw",
        meta_diagnostics=True,  # |d| and the cosine are part of what this benchmark reports
        max_steps=args.steps,
        logging_steps=1,
        save_strategy="no",
        seed=args.seed,
        disable_tqdm=True,
    )
    recorder = StepRecorder()
    trainer = InstrumentedAMFTTrainer(
        model=model,
        reward_funcs=arithmetic_reward,
        args=config,
        train_dataset=train,
        processing_class=tokenizer,
        sft_dataset=demos,
        val_dataset=val,
        callbacks=[recorder],
        noise_repeats=args.noise_repeats,
    )
    num_params = sum(p.numel() for p in trainer._trainable_params)
    t_train = time.perf_counter()
    trainer.train()
    t_end = time.perf_counter()

    # join: meta records, the controller's history (what it added to mu), and the logged metrics
    history = trainer.strategy.state.history
    logs_by_step = {entry["step"]: entry for entry in recorder.logs if "amft/mu" in entry}
    g_mus = [r["g_mu"] for r in trainer.meta_records]
    normalized = normalized_sequence(g_mus, NORMALIZED_DEFAULT_ETA_MU)
    rows = []
    for i, rec in enumerate(trainer.meta_records):
        step = rec["global_step"]
        log = logs_by_step.get(step + 1, {})
        rows.append(
            {
                **rec,
                "raw_mu_change_paper_eta": PAPER_ETA_MU * rec["g_mu"],
                "raw_mu_change_configured_eta": args.meta_learning_rate * rec["g_mu"],
                "raw_mu_change_at_eta_0.05": NORMALIZED_DEFAULT_ETA_MU * rec["g_mu"],
                "logged_meta_term": history[i]["meta_term"] if i < len(history) else None,
                "mu_after": history[i]["mu"] if i < len(history) else None,
                "logged_meta_gradient": log.get("amft/meta_gradient"),
                "logged_meta_cosine": log.get("amft/meta_cosine"),
                "train_reward": log.get("reward"),
                "rl_loss": log.get("amft/rl_loss"),
                "sft_loss": log.get("amft/sft_loss"),
                "step_seconds": recorder.step_seconds[i] if i < len(recorder.step_seconds) else None,
                "normalized_g_hat": normalized[i]["g_hat"],
                "normalized_mu_change": normalized[i]["mu_change"],
            }
        )

    def med(xs):
        xs = [x for x in xs if x is not None and math.isfinite(x)]
        return statistics.median(xs) if xs else float("nan")

    med_abs_g = med([abs(g) for g in g_mus])
    summary = {
        "num_meta_steps": len(rows),
        "median_abs_g_mu": med_abs_g,
        "max_abs_g_mu": max((abs(g) for g in g_mus), default=float("nan")),
        "median_abs_raw_mu_change": PAPER_ETA_MU * med_abs_g,
        "sum_raw_mu_change": sum(r["raw_mu_change_paper_eta"] for r in rows),
        "mu_first": rows[0]["mu_used"] if rows else float("nan"),
        "mu_final": trainer.strategy.mu,
        "median_abs_cosine": med([abs(r["cosine"]) for r in rows]),
        "median_grad_utility_norm": med([r["grad_utility_norm"] for r in rows]),
        "median_direction_norm": med([r["direction_norm"] for r in rows]),
        "median_abs_grad_utility_dot_direction": med([abs(r["grad_utility_dot_direction"]) for r in rows]),
        "eta_mu_for_0.01_per_step": 0.01 / med_abs_g if med_abs_g else float("inf"),
        "median_abs_normalized_mu_change": med([abs(r["normalized_mu_change"]) for r in rows]),
        "median_step_seconds": med(recorder.step_seconds),
        "logged_meta_term_matches_raw": all(
            r["logged_meta_term"] is not None
            and math.isclose(
                r["logged_meta_term"], r["raw_mu_change_configured_eta"], rel_tol=1e-9, abs_tol=0.0
            )
            for r in rows
        ),
    }
    if args.noise_repeats:
        noise = []
        for r in rows:
            gs = [r["g_mu"], *(e["g_mu"] for e in r["extra_estimates"])]
            mean = statistics.fmean(gs)
            sd = statistics.stdev(gs) if len(gs) > 1 else float("nan")
            noise.append(
                {
                    "global_step": r["global_step"],
                    "g_mu_estimates": gs,
                    "mean": mean,
                    "std": sd,
                    "std_over_abs_mean": sd / abs(mean) if mean else float("inf"),
                    "fraction_positive": sum(g > 0 for g in gs) / len(gs),
                    "cosines": [r["cosine"], *(e["cosine"] for e in r["extra_estimates"])],
                }
            )
        summary["noise"] = noise
    import transformers
    import trl

    result = {
        "run": {
            "command": "HF_HUB_OFFLINE=1 " + shlex.join([sys.executable, *sys.argv]),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{os.cpu_count()}-core CPU, no GPU ({platform.processor() or platform.machine()}, "
            f"{platform.system()} {platform.release()}); torch threads {torch.get_num_threads()}",
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "trl": trl.__version__,
                "python": platform.python_version(),
            },
            "model": args.model if args.model != "tiny" else model_dir,
            "model_label": label,
            "num_parameters": num_params,
            "config": {
                k: getattr(config, k)
                for k in (
                    "learning_rate",
                    "per_device_train_batch_size",
                    "num_generations",
                    "max_completion_length",
                    "sft_warmup_steps",
                    "meta_update_steps",
                    "meta_val_batch_size",
                    "entropy_learning_rate",
                    "meta_learning_rate",
                    "meta_gradient_form",
                    "max_steps",
                    "mu_init",
                    "mu_min",
                    "mu_max",
                    "beta",
                    "loss_type",
                    "temperature",
                    "seed",
                )
            }
            | {"lr_scheduler_type": str(config.lr_scheduler_type.value)},
            "task": "a +/- b with a, b in [0, 20]; conversational prompts; reward = 1[correct number in "
            "completion] + 0.1 exp(-|first number - answer|/5) + 0.1 (1 - min(len,100)/100); SFT completions = "
            "the bare answer; 64 train prompts, 64 demos, 32 separate validation prompts",
            "wall_seconds": t_end - t_start,
            "setup_seconds": t_train - t_start,
            "train_seconds": t_end - t_train,
            "step_seconds": recorder.step_seconds,
        },
        "summary": summary,
        "per_meta_step": rows,
        "trainer_logs": recorder.logs,
    }
    out_prefix.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str))
    write_markdown(out_prefix.with_suffix(".md"), result)
    print(json.dumps(summary, indent=2))
    print(f"wrote {out_prefix.with_suffix('.json')} and {out_prefix.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
