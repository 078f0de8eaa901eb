"""Whole-step cost of AMFT against its parts: GRPO, SFT only, a mixed AMFT step, and an AMFT meta step; and LUFFY's.

Five configurations, each trained for `--warmup-steps + --steps` optimizer steps in its own Python process (so
peak memory and allocator state do not leak between them), on the same model, batch shape and data:

- `grpo`: TRL's `GRPOTrainer`;
- `sft_only`: `AMFTTrainer` with mu pinned to 1 (`mu_init = mu_min = mu_max = 1`, no warm-up): SFT forward/backward
  only, no rollouts generated;
- `amft`: `AMFTTrainer` mixed steps without meta steps (`meta_learning_rate = 0`, entropy term on with a fixed
  `target_entropy`, so no H* measurement step, no warm-up);
- `amft_meta`: `AMFTTrainer` with a meta step (Eq. 25) at every step (`meta_update_steps = 1`,
  `meta_learning_rate = 0.02`, `meta_val_batch_size = --val-prompts`, default `--prompts`: a meta step then
  generates as many validation rollouts as a training step generates rollouts);
- `luffy`: `AMFTTrainer` with `balancing="luffy"` and `luffy_num_off_policy=1` (`--luffy-num-off-policy`; 0 is
  GRPO bit for bit inside `AMFTTrainer`, which times the wrapper alone): in each group of `--num-generations`, the
  prompt's demonstration (a `demonstration` column of the same prompts) takes one rollout's place, so the step
  generates `num_generations - 1` rollouts per prompt and runs the loss's forward/backward over all
  `num_generations` rows. TRL's other settings are GRPO's (`loss_type`, `scale_rewards`), so the two steps differ
  only by LUFFY: the ratio `luffy / grpo` (wall and CPU), generation and the rest of the step apart.

What is measured, per configuration:

- whole-step wall time: a `TrainerCallback` clock from `on_step_begin` to `on_step_end` (generation, rewards,
  forward/backward passes, meta step, gradient clipping and the optimizer step; not the logging that follows
  `on_step_end`). The first `--warmup-steps` steps are excluded from the median/min/max (first-call costs: lazy
  allocations, optimizer state creation, kernel selection);
- the process CPU time over the same interval (`time.process_time()`, all threads: with one torch thread it is
  close to the work done and much less sensitive than wall time to other jobs on a shared CPU; it can slightly
  exceed the wall time because of helper threads); the ratios are given from both;
- TRL's own `step_time` metric (and `amft/step_time` or any other `*step_time` key, if logged), from
  `trainer.state.log_history`, next to the callback clock: TRL's covers only `GRPOTrainer.training_step`;
- peak memory per step. CPU: the process's resident set size (RSS, `/proc/self/statm`) sampled by a background
  thread every `--rss-interval` seconds (default 5 ms) and reset at each `on_step_begin`, so it is the peak RSS
  within the step (a spike shorter than the interval can be missed; RSS also keeps memory the allocator has not
  returned to the OS). `ru_maxrss` (the process's lifetime peak, model loading included) is recorded beside it.
  GPU: `torch.cuda.max_memory_allocated` after `torch.cuda.reset_peak_memory_stats` at each `on_step_begin` (and the
  host RSS as on CPU);
- generation: the model's `generate` is wrapped (wall and CPU time, calls, generated tokens), so training and
  validation rollouts are both counted; tokens per second are given per whole step and per second inside `generate`;
- the parts of each step, timed inside it (wall and CPU seconds): the RL part (`GRPOTrainer.training_step`, which
  AMFT calls through `super()`), the SFT part (`AMFTTrainer._sft_micro_step`), the meta step's validation part
  (`_validation_backward`), `optimizer.step()`, and the rest (the step minus these).

Ratios: `amft / (grpo + sft_only)`; the amortised AMFT step with a meta step every K = 20 steps,
`((19 * amft + amft_meta) / 20) / (grpo + sft_only)`; the meta step's extra time `(amft_meta - amft) / grpo` (its
validation work is about one GRPO step in the default setup); the meta step's extra peak memory in units of one
float32 gradient (4 bytes x trainable parameters) and of one gradient in the parameters' dtype. The same time
ratios are also given "from parts": on a shared CPU identical work runs a few percent faster in one process than in
another, more than the overhead in question, so `grpo + sft_only` is rebuilt from the RL and SFT parts timed inside
the `amft` process's own steps, plus the (small) optimizer and rest times of the `grpo` and `sft_only` processes
(`ratios_from_parts`).

Simplifications: one process (no DDP/DeepSpeed); a synthetic addition task in standard (not conversational) format,
as `amft_trl.toy`'s: 8-token prompts `Compute a + b =` and ~11-token demonstration completions on SmolLM2's
tokenizer (the reward only has to vary so that GRPO's advantages are non-zero: correctness plus small dense terms); every completion has exactly
`--completion-length` tokens (`generation_kwargs={"min_new_tokens": L}` with `max_completion_length = L`, checked
from the wrapped `generate`), so all configurations generate the same number of tokens whatever the model samples;
the learning rate is constant (its value does not affect the cost); TRL's other defaults are kept (among them, in
TRL 1.16: activation checkpointing on, fused AdamW, `beta = 0` so no reference model). Besides the two private
methods the part timers wrap (`_sft_micro_step`, `_validation_backward`; a `src/` without them leaves that part
in the rest), only public API is used (`GRPOConfig`/`AMFTConfig` fields, the trainers' constructors, callbacks,
`state.log_history`), so the same script measures an older or newer `src/` (`--src`).

Threads: `--threads` (default 1 on CPU: faster than 2 on this project's shared 2-core CPU) sets `OMP_NUM_THREADS`,
`MKL_NUM_THREADS` and `torch.set_num_threads` in the workers.

Usage (the issue's setup, on the embedded SmolLM2-135M-Instruct; ~25 min on 2 shared CPU cores, 1 thread):
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/step_cost.py --model embedded \
        --out benchmarks/results/step_cost_smollm2_before
    # LUFFY against GRPO only (~10 min):
    .venv/bin/python benchmarks/step_cost.py --model embedded --configs grpo,luffy --out /tmp/luffy
    # the same script against another checkout's src/ (e.g. a worktree of an older commit):
    .venv/bin/python benchmarks/step_cost.py --model embedded --src ../before/src --out /tmp/before
    # GPU, bf16, a randomly initialised model of Qwen2.5-0.5B's shape:
    python benchmarks/step_cost.py --device cuda --dtype bfloat16 --model random:qwen2.5-0.5b --out /tmp/qwen

`--model`: a checkpoint directory; `embedded` (SmolLM2-135M-Instruct, `amft_trl.embedded_model.embedded_model_path()`);
`random:smollm2-135m` / `random:qwen2.5-0.5b` (random weights in that architecture's shape, built offline with
`from_config`, with the SmolLM2 tokenizer; ids beyond its vocabulary decode to nothing); `tiny` (`amft_trl.toy`'s
tiny random Qwen2 and its tokenizer: seconds, for smoke tests); `tiny-vlm` (`amft_trl.toy`'s tiny LLaVA and its processor,
image prompts and image demonstrations). `--out` is a path prefix: `<out>.json` and
`<out>.md` are written.
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
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ("grpo", "sft_only", "amft", "amft_meta", "luffy")
AMORTISE_K = 20
META_LEARNING_RATE = 0.02
TARGET_ENTROPY = 1.0  # a fixed H* (nats/token): no measurement step; its value only changes mu, not the cost

# Shape fields of the public config.json of each architecture (cannot be downloaded here); weights are random.
RANDOM_MODELS: dict[str, dict[str, Any]] = {
    "smollm2-135m": {  # HuggingFaceTB/SmolLM2-135M(-Instruct): 134.5M parameters
        "model_type": "llama",
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "max_position_embeddings": 8192,
        "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
    },
    "qwen2.5-0.5b": {  # Qwen/Qwen2.5-0.5B(-Instruct): 494.0M parameters
        "model_type": "qwen2",
        "vocab_size": 151936,
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32768,
        "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "use_sliding_window": False,
    },
}

# ----------------------------------------------------------------------------------------------------------------
# task: additions, conversational prompts, demonstrations, a varied reward
# ----------------------------------------------------------------------------------------------------------------


def _additions(n: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.randint(0, 20), rng.randint(0, 20)) for _ in range(n)]


def make_prompts(n: int, seed: int):
    """Standard-format prompts `Compute a + b =` (as `amft_trl.toy.addition_prompts`): a few tokens, no chat template,
    so the sequence length is dominated by the fixed-length completions."""
    from datasets import Dataset

    return Dataset.from_list(
        [{"prompt": f"Compute {a} + {b} =", "answer": str(a + b)} for a, b in _additions(n, seed)]
    )


def make_prompts_with_demonstrations(n: int, seed: int):
    """`make_prompts` with each prompt's demonstration in column `demonstration` (LUFFY's off-policy rollout)."""
    from datasets import Dataset

    return Dataset.from_list(
        [
            {
                "prompt": f"Compute {a} + {b} =",
                "answer": str(a + b),
                "demonstration": f" {a + b}. The answer is {a + b}.",
            }
            for a, b in _additions(n, seed)
        ]
    )


def make_demos(n: int, seed: int):
    """Prompt-completion demonstrations for the same task (as `amft_trl.toy.addition_demos`)."""
    from datasets import Dataset

    rows = [
        {"prompt": f"Compute {a} + {b} =", "completion": f" {a + b}. The answer is {a + b}."}
        for a, b in _additions(n, seed)
    ]
    return Dataset.from_list(rows)


_NUMBER = re.compile(r"-?\d+")


def addition_reward(completions: list, answer: list[str], **kwargs: Any) -> list[float]:
    """1.0 if the first number is the sum, plus two small dense terms (digit and distinct-character fractions).

    The dense terms make rewards differ within a group even when every answer is wrong (random models), so GRPO's
    advantages are non-zero; the value does not matter for timing.
    """
    out = []
    for completion, gold in zip(completions, answer, strict=True):
        text = completion if isinstance(completion, str) else completion[-1]["content"]
        match = _NUMBER.search(text)
        correct = 1.0 if match is not None and match.group() == gold else 0.0
        digits = sum(ch.isdigit() for ch in text) / max(len(text), 1)
        distinct = len(set(text)) / max(len(text), 1)
        out.append(correct + 0.1 * digits + 0.05 * distinct)
    return out


# ----------------------------------------------------------------------------------------------------------------
# measurement
# ----------------------------------------------------------------------------------------------------------------

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss() -> int:
    """Resident set size of this process in bytes (/proc/self/statm; psutil elsewhere)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        import psutil

        return psutil.Process().memory_info().rss


def max_rss_lifetime() -> int:
    """`ru_maxrss` in bytes (KiB on Linux, bytes on macOS)."""
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value if sys.platform == "darwin" else value * 1024


class RSSSampler:
    """Background thread: the peak RSS since the last `reset()`, sampled every `interval` seconds."""

    def __init__(self, interval: float):
        self.interval = interval
        self.peak = current_rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            rss = current_rss()
            if rss > self.peak:
                self.peak = rss

    def reset(self) -> None:
        self.peak = current_rss()

    def read(self) -> int:
        self.peak = max(self.peak, current_rss())
        return self.peak

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class GenerateTimer:
    """Wraps a model's `generate`: wall and process CPU time, calls and generated tokens (training and validation
    rollouts)."""

    def __init__(self, model, cuda: bool):
        self.cuda = cuda
        self.seconds = 0.0
        self.cpu_seconds = 0.0
        self.calls = 0
        self.sequences = 0
        self.tokens = 0
        self.new_tokens_per_call: list[int] = []
        inner = model.generate

        def generate(*args: Any, **kwargs: Any):
            import torch

            input_ids = kwargs.get("input_ids", args[0] if args else None)
            if self.cuda:
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            out = inner(*args, **kwargs)
            if self.cuda:
                torch.cuda.synchronize()
            self.seconds += time.perf_counter() - t0
            self.cpu_seconds += time.process_time() - c0
            self.calls += 1
            sequences = out.sequences if hasattr(out, "sequences") else out
            if input_ids is not None and hasattr(sequences, "shape"):
                new = sequences.shape[1] - input_ids.shape[1]
                self.new_tokens_per_call.append(int(new))
                self.sequences += int(sequences.shape[0])
                self.tokens += int(new) * int(sequences.shape[0])
            return out

        model.generate = generate

    def snapshot(self) -> dict[str, float]:
        return {
            "seconds": self.seconds,
            "cpu_seconds": self.cpu_seconds,
            "calls": self.calls,
            "sequences": self.sequences,
            "tokens": self.tokens,
        }


# The parts of a step (module docstring); "optimizer" is timed between the `on_pre_optimizer_step` and
# `on_optimizer_step` callbacks, the others by wrapping the method that does them.
PHASES = ("rl", "sft", "meta_validation", "optimizer")


class PhaseTimer:
    """Wall and process CPU seconds spent inside the parts of a step (`PHASES`), cumulative."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.wall = dict.fromkeys(PHASES, 0.0)
        self.cpu = dict.fromkeys(PHASES, 0.0)
        self._open: dict[str, tuple[float, float]] = {}

    def _now(self) -> tuple[float, float]:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter(), time.process_time()

    def start(self, phase: str) -> None:
        self._open[phase] = self._now()

    def stop(self, phase: str) -> None:
        t0, c0 = self._open.pop(phase)
        t1, c1 = self._now()
        self.wall[phase] += t1 - t0
        self.cpu[phase] += c1 - c0

    def wrap(self, owner: Any, name: str, phase: str) -> bool:
        """Time `owner.name` (a class: every instance and `super()` call; an instance: that one) as `phase`."""
        inner = getattr(owner, name, None)
        if inner is None:
            return False
        timer = self

        def timed(*args: Any, **kwargs: Any):
            timer.start(phase)
            try:
                return inner(*args, **kwargs)
            finally:
                timer.stop(phase)

        setattr(owner, name, timed)
        return True

    def snapshot(self) -> dict[str, tuple[float, float]]:
        return {p: (self.wall[p], self.cpu[p]) for p in PHASES}


def _step_clock_callback(
    sampler: RSSSampler, gen: GenerateTimer, cuda: bool, phases: PhaseTimer | None = None
):
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        """Per optimizer step: wall time (on_step_begin -> on_step_end), peak memory, generation work."""

        def __init__(self):
            self.steps: list[dict[str, Any]] = []
            self._t0: float | None = None
            self._gen0: dict[str, float] = {}
            self.rss_train_begin: int | None = None
            self.cuda_allocated_train_begin: int | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.rss_train_begin = current_rss()
            if cuda:
                import torch

                self.cuda_allocated_train_begin = torch.cuda.memory_allocated()

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            if phases is not None:
                phases.start("optimizer")

        def on_optimizer_step(self, args, state, control, **kwargs):
            if phases is not None:
                phases.stop("optimizer")

        def on_step_begin(self, args, state, control, **kwargs):
            if cuda:
                import torch

                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            sampler.reset()
            self._gen0 = gen.snapshot()
            self._phase0 = phases.snapshot() if phases is not None else None
            self._cpu0 = time.process_time()
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                import torch

                torch.cuda.synchronize()
            seconds = time.perf_counter() - self._t0
            cpu_seconds = time.process_time() - self._cpu0
            g = gen.snapshot()
            record = {
                "step": state.global_step,  # 1-based: the step just finished
                "seconds": seconds,
                "cpu_seconds": cpu_seconds,
                "peak_rss": sampler.read(),
                "generate_seconds": g["seconds"] - self._gen0["seconds"],
                "generate_cpu_seconds": g["cpu_seconds"] - self._gen0["cpu_seconds"],
                "generate_calls": g["calls"] - self._gen0["calls"],
                "generated_sequences": g["sequences"] - self._gen0["sequences"],
                "generated_tokens": g["tokens"] - self._gen0["tokens"],
            }
            if phases is not None:
                now = phases.snapshot()
                record["phase_seconds"] = {p: now[p][0] - self._phase0[p][0] for p in PHASES}
                record["phase_cpu_seconds"] = {p: now[p][1] - self._phase0[p][1] for p in PHASES}
            if cuda:
                import torch

                record["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
            self.steps.append(record)

    return StepClock()


# ----------------------------------------------------------------------------------------------------------------
# worker: one configuration in this process
# ----------------------------------------------------------------------------------------------------------------


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def is_vlm_checkpoint(spec: str) -> bool:
    """A checkpoint directory holding an image processor (`tiny-vlm`, or any VLM checkpoint)."""
    return Path(spec, "preprocessor_config.json").is_file() or Path(spec, "processor_config.json").is_file()


def load_model(spec: str, tokenizer_dir: str, dtype_name: str, seed: int):
    """(model, tokenizer or processor) for a checkpoint directory or a `random:<arch>` spec (the parent resolves
    the rest). A VLM checkpoint comes with its processor."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dtype = _torch_dtype(dtype_name)
    if is_vlm_checkpoint(spec):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        return AutoModelForImageTextToText.from_pretrained(spec, dtype=dtype), AutoProcessor.from_pretrained(
            spec
        )
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if spec.startswith("random:"):
        fields = dict(RANDOM_MODELS[spec.split(":", 1)[1]])
        model_type = fields.pop("model_type")
        config = AutoConfig.for_model(
            model_type,
            **fields,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype)
    return model, tokenizer


def _git_info(src: Path) -> dict[str, Any]:
    """Commit and dirtiness of the checkout holding `src` (read-only git commands; None outside a checkout)."""
    info: dict[str, Any] = {"commit": None, "dirty_src": None}
    try:
        info["commit"] = subprocess.run(
            ["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "--no-optional-locks", "-C", str(src), "status", "--porcelain", "--", "."],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        info["dirty_src"] = bool(status.strip())
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


def training_arguments(args: argparse.Namespace, config_name: str, output_dir: str) -> dict[str, Any]:
    """The keyword arguments of `GRPOConfig` (grpo) or `AMFTConfig` (the others) for one configuration."""
    cuda = args.device == "cuda"
    common: dict[str, Any] = dict(
        output_dir=output_dir,
        use_cpu=not cuda,
        bf16=args.dtype == "bfloat16",
        report_to="none",
        per_device_train_batch_size=args.prompts * args.num_generations,
        gradient_accumulation_steps=1,
        num_generations=args.num_generations,
        max_completion_length=args.completion_length,
        generation_kwargs={"min_new_tokens": args.completion_length},  # every completion has exactly L tokens
        learning_rate=1e-6,
        lr_scheduler_type="constant",
        max_steps=args.warmup_steps + args.steps,
        logging_steps=1,
        save_strategy="no",
        seed=args.seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    if config_name == "grpo":
        return common
    amft: dict[str, Any] = dict(
        common,
        sft_per_device_train_batch_size=args.sft_batch,
        sft_warmup_steps=0,
        max_sft_length=512,
    )
    if config_name == "sft_only":
        amft.update(mu_init=1.0, mu_min=1.0, mu_max=1.0, meta_learning_rate=0.0, entropy_learning_rate=0.0)
    elif config_name == "amft":
        amft.update(meta_learning_rate=0.0, target_entropy=TARGET_ENTROPY)
    elif config_name == "amft_meta":
        amft.update(
            meta_learning_rate=META_LEARNING_RATE,
            meta_update_steps=1,
            meta_val_batch_size=args.val_prompts,
            target_entropy=TARGET_ENTROPY,
        )
    elif config_name == "luffy":  # GRPO's settings otherwise; no SFT batch (LUFFY has no SFT term)
        return dict(
            common,
            balancing="luffy",
            luffy_num_off_policy=args.luffy_num_off_policy,
            luffy_demonstration_column="demonstration",
        )
    else:
        raise ValueError(f"unknown configuration {config_name!r}")
    return amft


def run_worker(args: argparse.Namespace) -> None:
    load_start = os.getloadavg()
    t_start = time.perf_counter()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no CUDA device")

    model, tokenizer = load_model(args.model_spec, args.tokenizer_dir, args.dtype, args.seed)
    num_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    param_bytes = next(model.parameters()).element_size()

    n_rows = max(64, 2 * (args.warmup_steps + args.steps) * args.prompts)
    n_demos = max(64, 2 * (args.warmup_steps + args.steps) * args.sft_batch)
    n_val = max(64, 2 * (args.warmup_steps + args.steps) * args.val_prompts)
    if is_vlm_checkpoint(args.model_spec):  # one image per prompt and per demonstration (conversational)
        from amft_trl.toy import image_addition_demos, image_addition_prompts

        train = image_addition_prompts(n_rows, seed=args.seed + 1)
        demos = image_addition_demos(n_demos, seed=args.seed + 2)
        val = image_addition_prompts(n_val, seed=args.seed + 3)
    elif args.worker == "luffy":  # the same prompts, each with its demonstration
        train = make_prompts_with_demonstrations(n_rows, seed=args.seed + 1)
        demos = val = None
    else:
        train = make_prompts(n_rows, seed=args.seed + 1)
        demos = make_demos(n_demos, seed=args.seed + 2)
        val = make_prompts(n_val, seed=args.seed + 3)

    sampler = RSSSampler(args.rss_interval)
    gen = GenerateTimer(model, cuda)
    phases = PhaseTimer(cuda)
    clock = _step_clock_callback(sampler, gen, cuda, phases)
    from trl import GRPOTrainer

    phases.wrap(GRPOTrainer, "training_step", "rl")  # the class: AMFT reaches it through `super()`
    output_dir = tempfile.mkdtemp(prefix=f"step-cost-{args.worker}-")
    kwargs = training_arguments(args, args.worker, output_dir)
    if args.worker == "grpo":
        from trl import GRPOConfig

        trainer = GRPOTrainer(
            model=model,
            reward_funcs=addition_reward,
            args=GRPOConfig(**kwargs),
            train_dataset=train,
            processing_class=tokenizer,
            callbacks=[clock],
        )
    else:
        from amft_trl import AMFTConfig, AMFTTrainer

        trainer = AMFTTrainer(
            model=model,
            reward_funcs=addition_reward,
            args=AMFTConfig(**kwargs),
            train_dataset=train,
            processing_class=tokenizer,
            sft_dataset=demos if args.worker != "luffy" else None,
            val_dataset=val if args.worker == "amft_meta" else None,
            callbacks=[clock],
        )
        phases.wrap(trainer, "_sft_micro_step", "sft")
        phases.wrap(trainer, "_validation_backward", "meta_validation")
    t_train = time.perf_counter()
    trainer.train()
    t_end = time.perf_counter()
    sampler.stop()

    trl_args = trainer.args
    logged: dict[int, dict[str, Any]] = {}
    for entry in trainer.state.log_history:
        if "step" in entry and "train_runtime" not in entry:
            logged.setdefault(entry["step"], {}).update(entry)
    for record in clock.steps:
        entry = logged.get(record["step"], {})
        record["logged_step_time"] = {k: v for k, v in entry.items() if k.endswith("step_time")}
        for key in ("reward", "reward_std", "completions/mean_length", "amft/mu", "amft/val_reward"):
            if key in entry:
                record[key] = entry[key]

    amft_trl_file = None
    if "amft_trl" in sys.modules:
        amft_trl_file = sys.modules["amft_trl"].__file__
    result = {
        "config": args.worker,
        "num_trainable_parameters": num_params,
        "parameter_bytes": param_bytes,
        "torch_threads": torch.get_num_threads(),
        "env_omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "amft_trl_file": amft_trl_file,
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "setup_seconds": t_train - t_start,
        "train_seconds": t_end - t_train,
        "rss_train_begin": clock.rss_train_begin,
        "ru_maxrss": max_rss_lifetime(),
        "cuda_allocated_train_begin": clock.cuda_allocated_train_begin,
        "cuda_device": torch.cuda.get_device_name(0) if cuda else None,
        "trainer_settings": {
            k: str(getattr(trl_args, k, None))
            for k in (
                "gradient_checkpointing",
                "optim",
                "loss_type",
                "beta",
                "max_grad_norm",
                "temperature",
                "bf16",
                "use_vllm",
                "generation_kwargs",
                "meta_val_batch_size",
                "meta_update_steps",
                "meta_learning_rate",
                "entropy_learning_rate",
                "mu_init",
                "sft_per_device_train_batch_size",
                "balancing",
                "luffy_num_off_policy",
                "scale_rewards",
            )
            if hasattr(trl_args, k)
        },
        "steps": clock.steps,
    }
    Path(args.worker_out).write_text(json.dumps(result, indent=1))


# ----------------------------------------------------------------------------------------------------------------
# parent: resolve the model, run the workers, summarise
# ----------------------------------------------------------------------------------------------------------------


def resolve_model(model: str, workdir: Path, src: Path) -> tuple[str, str, str]:
    """(model spec for the workers, tokenizer directory, label). Uses the `amft_trl` helpers of `src`."""
    sys.path.insert(0, str(src))
    if model == "embedded" or model.startswith("random:"):
        from amft_trl.embedded_model import embedded_model_path

        embedded = str(embedded_model_path())
        if model == "embedded":
            return embedded, embedded, "SmolLM2-135M-Instruct (embedded, GGUF Q4_1 de-quantised to float32)"
        arch = model.split(":", 1)[1]
        if arch not in RANDOM_MODELS:
            raise SystemExit(f"error: unknown random model {arch!r}; known: {', '.join(RANDOM_MODELS)}")
        return model, embedded, f"random-weight {arch} shape (SmolLM2 tokenizer)"
    if model == "tiny":
        from amft_trl.toy import build_model, build_tokenizer

        path = workdir / "tiny-qwen2"
        tokenizer = build_tokenizer()
        build_model(tokenizer).save_pretrained(path)
        tokenizer.save_pretrained(path)
        return str(path), str(path), "tiny random Qwen2 (amft_trl.toy)"
    if model == "tiny-vlm":
        from amft_trl.toy import build_vlm, build_vlm_processor

        path = workdir / "tiny-llava"
        processor = build_vlm_processor()
        build_vlm(processor).save_pretrained(path)
        processor.save_pretrained(path)
        return str(path), str(path), "tiny random LLaVA (amft_trl.toy, one 16x16 image = 4 tokens per prompt)"
    if not Path(model, "config.json").is_file():
        raise SystemExit(f"error: --model {model!r} is not a checkpoint directory (no config.json)")
    return model, model, Path(model).name


def _median(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.median(xs) if xs else float("nan")


def summarise(worker: dict[str, Any], warmup: int) -> dict[str, Any]:
    steps = worker["steps"][warmup:]
    seconds = [s["seconds"] for s in steps]
    gen_seconds = [s["generate_seconds"] for s in steps]
    gen_tokens = [s["generated_tokens"] for s in steps]
    step_time_keys = sorted({k for s in steps for k in s["logged_step_time"]})
    out: dict[str, Any] = {
        "measured_steps": len(steps),
        "median_seconds": _median(seconds),
        "min_seconds": min(seconds) if seconds else float("nan"),
        "max_seconds": max(seconds) if seconds else float("nan"),
        "median_cpu_seconds": _median([s.get("cpu_seconds") for s in steps]),
        "warmup_step_seconds": [s["seconds"] for s in worker["steps"][:warmup]],
        "logged_step_time_median": {
            k: _median([s["logged_step_time"].get(k) for s in steps if k in s["logged_step_time"]])
            for k in step_time_keys
        },
        "generate_seconds_median": _median(gen_seconds),
        "besides_generate_seconds_median": _median(
            [s - g for s, g in zip(seconds, gen_seconds, strict=True)]
        ),
        "generate_cpu_seconds_median": _median([s.get("generate_cpu_seconds") for s in steps]),
        "besides_generate_cpu_seconds_median": _median(
            [
                s["cpu_seconds"] - s["generate_cpu_seconds"]
                for s in steps
                if s.get("cpu_seconds") is not None and s.get("generate_cpu_seconds") is not None
            ]
        ),
        "generated_tokens_per_step": _median(gen_tokens),
        "generated_sequences_per_step": _median([s["generated_sequences"] for s in steps]),
        "peak_rss": max((s["peak_rss"] for s in steps), default=None),
        "peak_rss_all_steps": max((s["peak_rss"] for s in worker["steps"]), default=None),
        "rss_train_begin": worker["rss_train_begin"],
        "ru_maxrss": worker["ru_maxrss"],
    }
    med_tokens, med_s = out["generated_tokens_per_step"], out["median_seconds"]
    out["tokens_per_second_whole_step"] = med_tokens / med_s if med_tokens else None
    out["tokens_per_second_in_generate"] = (
        _median([t / g for t, g in zip(gen_tokens, gen_seconds, strict=True) if g > 0])
        if med_tokens
        else None
    )
    if steps and all("phase_seconds" in s for s in steps):
        for kind, step_key, phase_key in (
            ("wall", "seconds", "phase_seconds"),
            ("cpu", "cpu_seconds", "phase_cpu_seconds"),
        ):
            out[f"phase_{kind}_median"] = {p: _median([s[phase_key][p] for s in steps]) for p in PHASES}
            out[f"phase_{kind}_median"]["rest"] = _median(
                [s[step_key] - sum(s[phase_key].values()) for s in steps]
            )
    if any("cuda_max_allocated" in s for s in steps):
        out["cuda_max_allocated"] = max(s.get("cuda_max_allocated", 0) for s in steps)
        out["cuda_allocated_train_begin"] = worker["cuda_allocated_train_begin"]
    return out


def ratios(
    summary: dict[str, dict[str, Any]],
    num_params: int,
    param_bytes: int,
    cuda: bool,
    time_key: str = "median_seconds",
) -> dict[str, Any]:
    """The issue's ratios from the per-configuration medians of `time_key` (wall or CPU seconds)."""
    t = {name: s[time_key] for name, s in summary.items()}
    out: dict[str, Any] = {}
    if {"grpo", "sft_only", "amft"} <= t.keys():
        out["amft_over_grpo_plus_sft"] = t["amft"] / (t["grpo"] + t["sft_only"])
    if {"grpo", "sft_only", "amft", "amft_meta"} <= t.keys():
        k = AMORTISE_K
        out[f"amortised_k{k}_over_grpo_plus_sft"] = (
            ((k - 1) * t["amft"] + t["amft_meta"]) / k / (t["grpo"] + t["sft_only"])
        )
    if {"grpo", "amft", "amft_meta"} <= t.keys():
        out["meta_extra_time_over_grpo"] = (t["amft_meta"] - t["amft"]) / t["grpo"]
        out["meta_extra_seconds"] = t["amft_meta"] - t["amft"]
    if {"grpo", "luffy"} <= t.keys():
        out["luffy_over_grpo"] = t["luffy"] / t["grpo"]
        g, f = summary["grpo"], summary["luffy"]
        cpu = "_cpu" if time_key == "median_cpu_seconds" else ""
        gen, besides = f"generate{cpu}_seconds_median", f"besides_generate{cpu}_seconds_median"
        if g.get(gen) and g.get(besides) and f.get(gen) is not None:
            out["luffy_generate_over_grpo"] = f[gen] / g[gen]
            out["luffy_besides_generate_over_grpo"] = f[besides] / g[besides]
        out["luffy_generated_sequences_over_grpo"] = (
            f["generated_sequences_per_step"] / g["generated_sequences_per_step"]
        )
    if {"amft", "amft_meta"} <= summary.keys():
        key = "cuda_max_allocated" if cuda else "peak_rss"
        extra = summary["amft_meta"][key] - summary["amft"][key]
        out["meta_extra_peak_memory_metric"] = key
        out["meta_extra_peak_bytes"] = extra
        out["meta_extra_peak_fp32_gradients"] = extra / (4 * num_params)
        out["meta_extra_peak_param_dtype_gradients"] = extra / (param_bytes * num_params)
    return out


def ratios_from_parts(summary: dict[str, dict[str, Any]], kind: str = "wall") -> dict[str, float]:
    """The time ratios with the large parts of every step measured in the `amft` process itself.

    Across processes the same work takes different time on a shared CPU (GRPO's generation ran 5% slower in one
    process than in another on identical work), more than the effect measured. So GRPO + SFT only is rebuilt from
    the work AMFT's step does, timed inside AMFT's step (its RL part, i.e. GRPO's `training_step`, and its SFT part),
    plus what each of those trainers spends besides (optimizer step and the rest, from their own processes: small
    numbers, so their noise is small). The meta step's extra time is its validation part, plus its rest and its SFT
    part beyond a plain step's: the inner products around the RL backward fall in the rest, those around the SFT
    backward inside the SFT part. (The RL part, `GRPOTrainer.training_step`, does the same work in both.) All
    medians over the measured steps; `kind` is "wall" or "cpu".
    """
    key = f"phase_{kind}_median"
    if not {"grpo", "sft_only", "amft"} <= summary.keys() or any(key not in summary[n] for n in summary):
        return {}
    step_key = "median_seconds" if kind == "wall" else "median_cpu_seconds"
    g, f, a = summary["grpo"][key], summary["sft_only"][key], summary["amft"][key]
    grpo_besides = g["optimizer"] + g["rest"]
    sft_besides = f["optimizer"] + f["rest"]
    grpo_plus_sft = a["rl"] + a["sft"] + grpo_besides + sft_besides
    amft = summary["amft"][step_key]
    out = {
        "grpo_plus_sft_from_parts": grpo_plus_sft,
        "amft_over_grpo_plus_sft": amft / grpo_plus_sft,
        "amft_besides_parts": a["optimizer"] + a["rest"],
        "grpo_plus_sft_besides_parts": grpo_besides + sft_besides,
    }
    if "amft_meta" in summary and key in summary["amft_meta"]:
        m = summary["amft_meta"][key]
        meta_extra = m["meta_validation"] + (m["rest"] - a["rest"]) + (m["sft"] - a["sft"])
        k = AMORTISE_K
        out["meta_extra_seconds"] = meta_extra
        out["meta_extra_time_over_grpo"] = meta_extra / (a["rl"] + grpo_besides)
        out[f"amortised_k{k}_over_grpo_plus_sft"] = (amft + meta_extra / k) / grpo_plus_sft
    return out


def _gb(x: float | None) -> str:
    return "-" if x is None else f"{x / 1e9:.2f}"


def _f(x: Any, spec: str = ".2f") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(x, spec)


def write_markdown(path: Path, result: dict[str, Any]) -> None:
    r = result["run"]
    cuda = r["device"] == "cuda"
    loads = "; ".join(
        f"{name}: {w['load_average_start'][0]:.2f} -> {w['load_average_end'][0]:.2f}"
        for name, w in result["workers"].items()
    )
    lines = [
        f"# Step cost: {r['model_label']}",
        "",
        f"- command: `{r['command']}`",
        f"- date: {r['date']}; machine: {r['machine']}",
        f"- versions: torch {r['versions']['torch']}, transformers {r['versions']['transformers']}, "
        f"trl {r['versions']['trl']}; amft_trl from `{r['src']}` (commit {r['git']['commit']}, "
        f"src dirty: {r['git']['dirty_src']})",
        *([f"- note: {r['note']}"] if r.get("note") else []),
        f"- model: {r['model']} ({r['num_trainable_parameters']:,} trainable parameters, {r['dtype']}, "
        f"{r['device']}); torch threads {r['torch_threads']}, OMP_NUM_THREADS={r['omp_num_threads']}",
        f"- batch: {r['prompts']} prompts x {r['num_generations']} rollouts x {r['completion_length']} completion "
        f"tokens (fixed length), {r['sft_batch']} SFT demonstrations per step, meta step: {r['val_prompts']} "
        f"validation prompts x {r['num_generations']} rollouts; 1 process",
        f"- steps: {r['warmup_steps']} warm-up step(s) excluded, then {r['steps']} measured; wall time = "
        "TrainerCallback on_step_begin -> on_step_end",
        f"- load average (1 min) at worker start -> end: {loads}",
        "",
        "| config | median step s | min | max | median CPU s | TRL step_time (median) | generate s/step | generated tokens/step "
        "| tokens/s (whole step) | tokens/s (in generate) | peak "
        + ("GPU allocated GB" if cuda else "RSS GB")
        + " | RSS at train begin GB |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in result["summary"].items():
        st = ", ".join(f"{k} {v:.2f}" for k, v in s["logged_step_time_median"].items()) or "not logged"
        peak = s.get("cuda_max_allocated") if cuda else s["peak_rss"]
        lines.append(
            f"| {name} | {_f(s['median_seconds'])} | {_f(s['min_seconds'])} | {_f(s['max_seconds'])} "
            f"| {_f(s.get('median_cpu_seconds'))} | {st} "
            f"| {_f(s['generate_seconds_median'])} | {_f(s['generated_tokens_per_step'], '.0f')} "
            f"| {_f(s['tokens_per_second_whole_step'], '.1f')} | {_f(s['tokens_per_second_in_generate'], '.1f')} "
            f"| {_gb(peak)} | {_gb(s['rss_train_begin'])} |"
        )
    q = result["ratios"]
    lines += ["", "Ratios (medians of the wall-clock step times):", ""]
    if not q:
        lines.append(
            "- none: they need grpo, sft_only, amft and amft_meta (memory: amft and amft_meta; LUFFY's: grpo and luffy)"
        )
    if "amft_over_grpo_plus_sft" in q:
        lines.append(f"- amft / (grpo + sft_only) = {q['amft_over_grpo_plus_sft']:.2f}")
    key = f"amortised_k{AMORTISE_K}_over_grpo_plus_sft"
    if key in q:
        lines.append(
            f"- amortised AMFT step, a meta step every K = {AMORTISE_K}: "
            f"((K - 1) amft + amft_meta) / K / (grpo + sft_only) = {q[key]:.2f}"
        )
    if "meta_extra_time_over_grpo" in q:
        lines.append(
            f"- meta step extra time: (amft_meta - amft) / grpo = {q['meta_extra_time_over_grpo']:.2f} "
            f"({q['meta_extra_seconds']:.2f} s)"
        )
    if "meta_extra_peak_bytes" in q:
        lines.append(
            f"- meta step extra peak memory ({q['meta_extra_peak_memory_metric']}): "
            f"{q['meta_extra_peak_bytes'] / 1e9:.2f} GB = {q['meta_extra_peak_fp32_gradients']:.2f} float32 "
            f"gradients (4 B x {r['num_trainable_parameters']:,} parameters)"
            + (
                f" = {q['meta_extra_peak_param_dtype_gradients']:.2f} gradients in the parameters' dtype"
                if r["dtype"] != "float32"
                else ""
            )
        )
    if "luffy_over_grpo" in q:
        c = result.get("ratios_cpu_time", {})
        g, f = result["summary"]["grpo"], result["summary"]["luffy"]
        lines.append(
            f"- luffy / grpo = {q['luffy_over_grpo']:.2f} (CPU time {_f(c.get('luffy_over_grpo'))}); generated "
            f"sequences per step {f['generated_sequences_per_step']:.0f} against {g['generated_sequences_per_step']:.0f} "
            f"({q['luffy_generated_sequences_over_grpo']:.2f})"
        )
        if "luffy_generate_over_grpo" in q:
            lines.append(
                f"  - time in `generate`, luffy against grpo: {_f(f['generate_seconds_median'])} against "
                f"{_f(g['generate_seconds_median'])} s ({q['luffy_generate_over_grpo']:.2f}); CPU "
                f"{_f(f.get('generate_cpu_seconds_median'))} against {_f(g.get('generate_cpu_seconds_median'))} s "
                f"({_f(c.get('luffy_generate_over_grpo'))})"
            )
            lines.append(
                "  - the rest of the step (rewards, the loss's forward/backward over every row, demonstrations "
                f"included, optimizer): {_f(f['besides_generate_seconds_median'])} against "
                f"{_f(g['besides_generate_seconds_median'])} s ({q['luffy_besides_generate_over_grpo']:.2f}); CPU "
                f"{_f(f.get('besides_generate_cpu_seconds_median'))} against "
                f"{_f(g.get('besides_generate_cpu_seconds_median'))} s ({_f(c.get('luffy_besides_generate_over_grpo'))})"
            )
    c = result.get("ratios_cpu_time", {})
    if key in c and not cuda:
        lines += [
            "",
            "The same ratios from the medians of the process CPU time per step (less sensitive to other jobs on a "
            "shared CPU; with 1 torch thread, CPU time ~ the work done): "
            f"amft / (grpo + sft_only) = {c['amft_over_grpo_plus_sft']:.2f}; amortised K = {AMORTISE_K}: "
            f"{c[key]:.2f}; (amft_meta - amft) / grpo = {c['meta_extra_time_over_grpo']:.2f} "
            f"({c['meta_extra_seconds']:.2f} CPU s).",
        ]
    if any("phase_wall_median" in s for s in result["summary"].values()):
        lines += [
            "",
            "Where a step's time goes (median wall s over the measured steps; CPU s in brackets). RL: "
            "`GRPOTrainer.training_step` (generation, rewards, RL forward/backward); SFT: `_sft_micro_step`; meta "
            "validation: `_validation_backward`; optimizer: `optimizer.step()`; rest: the step minus these "
            "(Trainer loop, gradient clipping, AMFT's bookkeeping; in a meta step also the inner products around the RL "
            "backward, those around the SFT backward being in the SFT part).",
            "",
            "| config | RL | SFT | meta validation | optimizer | rest | step |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, s in result["summary"].items():
            w, c = s.get("phase_wall_median"), s.get("phase_cpu_median")
            if not w:
                continue
            cells = " | ".join(f"{w[p]:.2f} ({c[p]:.2f})" for p in (*PHASES, "rest"))
            lines.append(
                f"| {name} | {cells} | {_f(s['median_seconds'])} ({_f(s.get('median_cpu_seconds'))}) |"
            )
        pw, pc = result.get("ratios_from_parts", {}), result.get("ratios_from_parts_cpu", {})
        if pw:
            lines += [
                "",
                "The ratios again, with GRPO + SFT only rebuilt from the parts of the AMFT process's own steps "
                "(its RL part + its SFT part + the optimizer and rest of the grpo and sft_only processes: "
                f"{pw['grpo_plus_sft_from_parts']:.2f} s); wall (CPU time):",
                "",
                f"- amft / (grpo + sft_only) = {pw['amft_over_grpo_plus_sft']:.2f} "
                f"({_f(pc.get('amft_over_grpo_plus_sft'))}); an AMFT step spends "
                f"{pw['amft_besides_parts']:.2f} s besides its RL and SFT parts, GRPO and SFT-only steps together "
                f"{pw['grpo_plus_sft_besides_parts']:.2f} s",
            ]
            if key in pw:
                lines += [
                    f"- amortised K = {AMORTISE_K}: {pw[key]:.2f} ({_f(pc.get(key))})",
                    f"- meta step extra time (its validation part + its rest and SFT part beyond a plain step's) / "
                    "GRPO step = "
                    f"{pw['meta_extra_time_over_grpo']:.2f} ({_f(pc.get('meta_extra_time_over_grpo'))}; "
                    f"{pw['meta_extra_seconds']:.2f} s)",
                ]
    lines += [
        "",
        "Per step (all steps; the first "
        f"{r['warmup_steps']} excluded from the figures above): wall s / CPU s / peak "
        + ("GPU GB" if cuda else "RSS GB")
        + " / TRL step_time",
        "",
    ]
    for name, w in result["workers"].items():
        cells = []
        for s in w["steps"]:
            peak = s.get("cuda_max_allocated") if cuda else s["peak_rss"]
            st = s["logged_step_time"].get("step_time")
            cells.append(f"{s['seconds']:.2f}/{_f(s.get('cpu_seconds'))}/{_gb(peak)}/{_f(st)}")
        lines.append(f"- {name}: " + ", ".join(cells))
    lines += [
        "",
        "Peak memory: "
        + (
            "`torch.cuda.max_memory_allocated` after `reset_peak_memory_stats` at each step begin, max over the "
            "measured steps."
            if cuda
            else f"RSS sampled every {r['rss_interval'] * 1000:.0f} ms by a thread in the worker, reset at each "
            "step begin, max over the measured steps (memory freed but kept by the allocator still counts)."
        )
        + " TRL's `step_time` covers `GRPOTrainer.training_step` only (generation + RL forward/backward).",
        "",
    ]
    path.write_text("\n".join(lines))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        default="embedded",
        help="checkpoint directory, 'embedded', 'random:smollm2-135m', 'random:qwen2.5-0.5b', 'tiny' or 'tiny-vlm'",
    )
    parser.add_argument(
        "--prompts", type=int, default=4, help="prompts per step (x --num-generations rollouts)"
    )
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument(
        "--completion-length", type=int, default=32, help="generated tokens per rollout (fixed)"
    )
    parser.add_argument("--sft-batch", type=int, default=16, help="SFT demonstrations per step")
    parser.add_argument(
        "--val-prompts", type=int, default=None, help="validation prompts per meta step (default: --prompts)"
    )
    parser.add_argument("--steps", type=int, default=5, help="measured optimizer steps per configuration")
    parser.add_argument(
        "--warmup-steps", type=int, default=1, help="steps run first and excluded from the figures"
    )
    parser.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help=f"comma-separated subset of {','.join(CONFIGS)} (run in that order)",
    )
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch / OMP threads in the workers (default: 1 on CPU, torch's choice on CUDA)",
    )
    parser.add_argument(
        "--src",
        default=None,
        help="the src/ directory whose amft_trl the workers import (default: this checkout's)",
    )
    parser.add_argument(
        "--luffy-num-off-policy",
        type=int,
        default=1,
        help="luffy: demonstrations per group (0: GRPO bit for bit inside AMFTTrainer, to time the wrapper alone)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rss-interval", type=float, default=0.005, help="RSS sampling period, seconds")
    parser.add_argument("--out", required=True, help="output prefix: writes <out>.json and <out>.md")
    parser.add_argument(
        "--note", default="", help="free text recorded in the outputs (e.g. what --src holds)"
    )
    # internal: one configuration in this process
    parser.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    parser.add_argument("--model-spec", help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer-dir", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.val_prompts is None:
        args.val_prompts = args.prompts
    if args.threads is None and args.device == "cpu":
        args.threads = 1
    if args.worker:
        run_worker(args)
        return 0

    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown or not configs:
        parser.error(f"--configs: unknown {unknown}; choose from {','.join(CONFIGS)}")
    if "luffy" in configs and args.model == "tiny-vlm":
        parser.error(
            "--configs luffy: text models only (with image prompts LUFFY generates every row and then replaces the "
            "demonstration's, so its cost is not the one measured here); drop luffy or use a text --model"
        )
    src = Path(args.src).resolve() if args.src else REPO / "src"
    if not (src / "amft_trl" / "__init__.py").is_file():
        parser.error(f"--src {src} holds no amft_trl package")
    if args.steps < 1 or args.warmup_steps < 0:
        parser.error("--steps must be >= 1 and --warmup-steps >= 0")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="step-cost-"))
    model_spec, tokenizer_dir, label = resolve_model(args.model, workdir, src)

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(src), *filter(None, [env.get("PYTHONPATH")])])
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    passthrough = [
        "--prompts", str(args.prompts), "--num-generations", str(args.num_generations),
        "--completion-length", str(args.completion_length), "--sft-batch", str(args.sft_batch),
        "--val-prompts", str(args.val_prompts), "--steps", str(args.steps),
        "--warmup-steps", str(args.warmup_steps), "--dtype", args.dtype, "--device", args.device,
        "--seed", str(args.seed), "--rss-interval", str(args.rss_interval),
        "--luffy-num-off-policy", str(args.luffy_num_off_policy),
        "--model-spec", model_spec, "--tokenizer-dir", tokenizer_dir, "--out", str(out),
    ]  # fmt: skip
    if args.threads:
        passthrough += ["--threads", str(args.threads)]

    t0 = time.perf_counter()
    load_start = os.getloadavg()
    workers: dict[str, dict[str, Any]] = {}
    for name in configs:
        worker_out = workdir / f"{name}.json"
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--worker",
            name,
            "--worker-out",
            str(worker_out),
        ]
        print(f"[step_cost] {name}: running (load average {os.getloadavg()[0]:.2f})", flush=True)
        log_path = workdir / f"{name}.log"
        with open(log_path, "w") as log:
            proc = subprocess.run([*cmd, *passthrough], env=env, stdout=log, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            tail = "".join(log_path.read_text().splitlines(keepends=True)[-40:])
            print(f"{tail}\n[step_cost] {name}: worker failed (exit code {proc.returncode}), log {log_path}")
            return proc.returncode
        workers[name] = json.loads(worker_out.read_text())
        w = workers[name]
        if not str(w.get("amft_trl_file") or src).startswith(str(src)):
            print(f"[step_cost] warning: {name} imported amft_trl from {w['amft_trl_file']}, not {src}")
        times = ", ".join(f"{s['seconds']:.2f}" for s in w["steps"])
        print(f"[step_cost] {name}: step seconds {times} (log {log_path})", flush=True)

    first = next(iter(workers.values()))
    summary = {name: summarise(w, args.warmup_steps) for name, w in workers.items()}
    lengths = {n for w in workers.values() for s in w["steps"] for n in [s["generated_tokens"]] if n}
    import torch
    import transformers
    import trl

    result = {
        "run": {
            "command": shlex.join([Path(sys.executable).name, *sys.argv]),
            "date": dt.datetime.now().isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "trl": trl.__version__,
            },
            "src": str(src),
            "git": _git_info(src),
            "note": args.note,
            "model": args.model,
            "model_label": label,
            "num_trainable_parameters": first["num_trainable_parameters"],
            "parameter_bytes": first["parameter_bytes"],
            "dtype": args.dtype,
            "device": args.device,
            "torch_threads": first["torch_threads"],
            "omp_num_threads": env.get("OMP_NUM_THREADS"),
            "prompts": args.prompts,
            "luffy_num_off_policy": args.luffy_num_off_policy,
            "num_generations": args.num_generations,
            "completion_length": args.completion_length,
            "sft_batch": args.sft_batch,
            "val_prompts": args.val_prompts,
            "steps": args.steps,
            "warmup_steps": args.warmup_steps,
            "rss_interval": args.rss_interval,
            "load_average_start": load_start,
            "load_average_end": os.getloadavg(),
            "wall_seconds": time.perf_counter() - t0,
            "generated_tokens_per_step_values": sorted(lengths),
        },
        "summary": summary,
        "ratios": ratios(
            summary, first["num_trainable_parameters"], first["parameter_bytes"], args.device == "cuda"
        ),
        "ratios_cpu_time": ratios(
            summary,
            first["num_trainable_parameters"],
            first["parameter_bytes"],
            args.device == "cuda",
            time_key="median_cpu_seconds",
        ),
        "ratios_from_parts": ratios_from_parts(summary, "wall"),
        "ratios_from_parts_cpu": ratios_from_parts(summary, "cpu"),
        "workers": workers,
    }
    Path(f"{out}.json").write_text(json.dumps(result, indent=1))
    write_markdown(Path(f"{out}.md"), result)
    print(Path(f"{out}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
