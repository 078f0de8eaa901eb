"""Where an AMFT meta step's time and memory go: fine-grained wall clocks and memory snapshots per phase.

Unlike `step_cost.py` (public API only), this script reads the trainer's internals: those of commit c03f7ee (the
meta step before the one-buffer rewrite: `AMFTTrainer._meta_step`, `_GradientBuffer.take_grads`,
`amft_trl.trainer.grad_dot`) and those of today (`AMFTTrainer._validation_for_meta_step`, `MetaStep.around_backward`
and `finish` and `amft_trl._meta_step.grad_dot`), with `_validation_backward`, `_sft_micro_step` and the rest common
to both. It wraps what it finds in a subclass or the module, patches nothing in src/, and reports the targets it
did not find (those of the other version).

Per optimizer step it records:

- wall time per phase, nested (inclusive and exclusive of sub-phases): the AMFT training step, GRPO's
  `training_step`, generation (`model.generate`), scoring, the RL loss forward, each backward
  (`accelerator.backward`), the SFT micro-step, moving gradients into the meta-step buffers (`take_grads`), the meta
  step, the validation rollouts and backward, `grad_dot`, and, from the Trainer's callbacks, gradient clipping,
  the optimizer step and `zero_grad`;
- memory: RSS sampled every 5 ms by a thread, the peak attributed to the innermost phase running at the time;
  and, at the end of every phase, a snapshot of the RSS, glibc's live heap (`mallinfo2`: arena bytes in use plus
  mmapped chunks, i.e. memory actually allocated, as opposed to RSS, which also holds freed memory the allocator
  kept), and the bytes held by `.grad`, the RL and SFT gradient buffers and the optimizer state, in units of one
  float32 gradient.

Optionally (`--torch-profile STEP`) one step is also run under `torch.profiler` (CPU, profile_memory) with the
phases as `record_function` ranges; the per-operator table and a Chrome trace are written next to `--out`.

Usage (one configuration per process; the setup of `step_cost.py`):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/meta_step_profile.py --config amft_meta --model embedded \
        --src /tmp/step_cost/src_c03f7ee/src --out /tmp/step_cost/profile_amft_meta
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import os
import sys
import tempfile
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import step_cost  # noqa: E402  (the task, model loading and configs of the step-cost benchmark)

# ----------------------------------------------------------------------------------------------------------------
# memory probes
# ----------------------------------------------------------------------------------------------------------------


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


try:
    _libc = ctypes.CDLL("libc.so.6")
    _libc.mallinfo2.restype = _Mallinfo2
except (OSError, AttributeError):
    _libc = None


def malloc_live_bytes() -> int | None:
    """Bytes glibc malloc has handed out and not had back: heap arenas in use + mmapped chunks (None off glibc).

    Only the main arena is counted by mallinfo2 on some glibc versions; worker threads' arenas are small here.
    """
    if _libc is None:
        return None
    info = _libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


class PhaseClock:
    """Nested wall clocks + per-phase peak RSS (a sampling thread) + memory snapshots at phase ends."""

    def __init__(self, interval: float = 0.005, snapshot=None):
        self.stack: list[str] = []
        self.records: list[dict[str, Any]] = []  # one per finished phase, in order of finishing
        self.peak_by_path: dict[str, int] = {}
        self.step_peak = 0
        self.step_peak_path = ""
        self.snapshot = snapshot
        self.torch_profiling = False
        self._children_total: dict[str, float] = {}  # path -> summed wall time of its direct sub-phases
        self._interval = interval
        self._stop = threading.Event()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    def _sample(self) -> None:
        rss = step_cost.current_rss()
        path = "/".join(self.stack) or "(outside)"
        if rss > self.peak_by_path.get(path, 0):
            self.peak_by_path[path] = rss
        if rss > self.step_peak:
            self.step_peak, self.step_peak_path = rss, path

    def new_step(self) -> None:
        self.step_peak = 0
        self.peak_by_path = {}
        self.records = []

    @contextmanager
    def phase(self, name: str):
        import torch

        self.stack.append(name)
        path = "/".join(self.stack)
        start = time.perf_counter()
        cpu_start = time.process_time()
        children_before = self._children_total.get(path, 0.0)
        rf = torch.profiler.record_function(name) if self.torch_profiling else nullcontext()
        try:
            with rf:
                yield
        finally:
            self._sample()
            seconds = time.perf_counter() - start
            self.stack.pop()
            parent = "/".join(self.stack)
            self._children_total[parent] = self._children_total.get(parent, 0.0) + seconds
            child_seconds = self._children_total.get(path, 0.0) - children_before
            record = {
                "path": path,
                "t_end": time.perf_counter() - self._t0,
                "seconds": seconds,
                "exclusive_seconds": seconds - child_seconds,
                "cpu_seconds": time.process_time() - cpu_start,
            }
            if self.snapshot is not None:
                record.update(self.snapshot())
            self.records.append(record)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _wrap(obj: Any, name: str, clock: PhaseClock, label: str | None = None, missing: list[str] | None = None):
    """Replace `obj.name` by a timed wrapper (instance or class attribute); records a missing target."""
    inner = getattr(obj, name, None)
    if inner is None:
        if missing is not None:
            missing.append(f"{getattr(obj, '__name__', type(obj).__name__)}.{name}")
        return

    @functools.wraps(inner)
    def wrapped(*args: Any, **kwargs: Any):
        with clock.phase(label or name):
            return inner(*args, **kwargs)

    setattr(obj, name, wrapped)


# ----------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=("amft", "amft_meta"), required=True)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--src", default=None, help="src/ directory to import amft_trl from")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--completion-length", type=int, default=32)
    parser.add_argument("--sft-batch", type=int, default=16)
    parser.add_argument(
        "--val-prompts", type=int, default=None, help="meta_val_batch_size (default: --prompts)"
    )
    parser.add_argument("--steps", type=int, default=3, help="measured steps after one warm-up step")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--torch-profile", type=int, default=None, help="profile this 1-based step with torch"
    )
    parser.add_argument("--out", required=True, help="output prefix: <out>.json (+ torch profile files)")
    args = parser.parse_args(argv)
    src = Path(args.src).resolve() if args.src else HERE.parent / "src"
    sys.path.insert(0, str(src))

    import torch

    torch.set_num_threads(args.threads)
    workdir = Path(tempfile.mkdtemp(prefix="meta-profile-"))
    model_spec, tokenizer_dir, label = step_cost.resolve_model(args.model, workdir, src)
    model, tokenizer = step_cost.load_model(model_spec, tokenizer_dir, "float32", 0)

    from transformers import TrainerCallback

    import amft_trl.trainer as trainer_module
    from amft_trl import AMFTConfig, AMFTTrainer

    ns = argparse.Namespace(
        device="cpu",
        dtype="float32",
        prompts=args.prompts,
        num_generations=args.num_generations,
        completion_length=args.completion_length,
        sft_batch=args.sft_batch,
        val_prompts=args.val_prompts or args.prompts,
        warmup_steps=1,
        steps=args.steps,
        seed=0,
    )
    kwargs = step_cost.training_arguments(ns, args.config, str(workdir / "out"))
    params = [p for p in model.parameters() if p.requires_grad]
    num_params = sum(p.numel() for p in params)
    unit = 4 * num_params  # one float32 gradient
    holder: dict[str, Any] = {}

    def snapshot() -> dict[str, Any]:
        trainer = holder.get("trainer")
        grad = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
        out: dict[str, Any] = {
            "rss": step_cost.current_rss(),
            "malloc_live": malloc_live_bytes(),
            "grad": grad,
        }
        if trainer is not None:
            for key in ("_rl_buffer", "_sft_buffer"):
                buf = getattr(trainer, key, None)
                tensors = getattr(buf, "tensors", None) or []
                out[key.strip("_")] = sum(t.numel() * t.element_size() for t in tensors if t is not None)
            opt = getattr(trainer, "optimizer", None)
            state = getattr(opt, "state", {}) if opt is not None else {}
            out["optimizer_state"] = sum(
                v.numel() * v.element_size()
                for s in state.values()
                for v in s.values()
                if torch.is_tensor(v) and v.dim() > 0
            )
        out["gradient_units_alive"] = (grad + out.get("rl_buffer", 0) + out.get("sft_buffer", 0)) / unit
        return out

    clock = PhaseClock(snapshot=snapshot)
    missing: list[str] = []

    class Profiled(AMFTTrainer):
        pass

    for name in (
        "training_step",
        "_begin_step",
        "_end_step",
        "_sft_micro_step",
        "_meta_step",
        "_validation_for_meta_step",
        "_validation_backward",
        "_generate_and_score_completions",
        "_calculate_rewards",
        "compute_loss",
        "_get_per_token_logps_and_entropies",
    ):
        if hasattr(AMFTTrainer, name):
            inner = getattr(AMFTTrainer, name)

            def make(inner=inner, name=name):
                @functools.wraps(inner)
                def method(self, *a: Any, **k: Any):
                    with clock.phase(name):
                        return inner(self, *a, **k)

                return method

            setattr(Profiled, name, make())
        else:
            missing.append(f"AMFTTrainer.{name}")
    # GRPOTrainer.training_step (the RL part), reached through super() from AMFTTrainer._training_micro_step
    from trl import GRPOTrainer

    grpo_step = GRPOTrainer.training_step

    @functools.wraps(grpo_step)
    def grpo_training_step(self, *a: Any, **k: Any):
        with clock.phase("grpo.training_step"):
            return grpo_step(self, *a, **k)

    GRPOTrainer.training_step = grpo_training_step
    buffer_cls = getattr(trainer_module, "_GradientBuffer", None)
    if buffer_cls is not None:
        _wrap(buffer_cls, "take_grads", clock, "take_grads", missing)
    else:
        missing.append("_GradientBuffer")
    if hasattr(trainer_module, "grad_dot"):
        _wrap(trainer_module, "grad_dot", clock, "grad_dot", missing)
    else:
        missing.append("trainer.grad_dot")
    try:  # today's meta step (amft_trl._meta_step)
        import amft_trl._meta_step as meta_module
    except ImportError:
        missing.append("amft_trl._meta_step")
    else:
        _wrap(meta_module, "grad_dot", clock, "grad_dot", missing)
        for method in ("take_validation_gradient", "finish"):
            _wrap(meta_module.MetaStep, method, clock, f"meta.{method}", missing)
    _wrap(model, "generate", clock, "model.generate", missing)

    steps: list[dict[str, Any]] = []
    profile_prefix = Path(args.out)

    class StepPhases(TrainerCallback):
        """Opens a phase per Trainer segment: the training step(s), clip, optimizer step, zero_grad/scheduler."""

        def __init__(self):
            self._segment = None
            self._t0 = 0.0
            self._prof = None

        def _open(self, name: str) -> None:
            self._segment = clock.phase(name)
            self._segment.__enter__()

        def _close(self) -> None:
            if self._segment is not None:
                self._segment.__exit__(None, None, None)
                self._segment = None

        def on_step_begin(self, args_, state, control, **kw):
            if args.torch_profile is not None and state.global_step + 1 == args.torch_profile:
                from torch.profiler import ProfilerActivity, profile

                clock.torch_profiling = True
                self._prof = profile(
                    activities=[ProfilerActivity.CPU],
                    profile_memory=True,
                    record_shapes=False,
                    with_stack=False,
                )
                self._prof.__enter__()
            clock.new_step()
            self._t0 = time.perf_counter()
            self._cpu0 = time.process_time()
            self._rss0 = step_cost.current_rss()
            self._open("step")
            self._open("forward_backward(training_step calls)")

        def on_pre_optimizer_step(self, args_, state, control, **kw):
            self._close()  # the training step segment (clip + grad norm run after it, before this event)
            self._open("optimizer.step")

        def on_optimizer_step(self, args_, state, control, **kw):
            self._close()
            self._open("lr_scheduler+zero_grad")

        def on_step_end(self, args_, state, control, **kw):
            self._close()
            self._close()  # "step"
            seconds = time.perf_counter() - self._t0
            steps.append(
                {
                    "step": state.global_step,
                    "seconds": seconds,
                    "cpu_seconds": time.process_time() - self._cpu0,
                    "rss_step_begin": self._rss0,
                    "peak_rss": clock.step_peak,
                    "peak_rss_phase": clock.step_peak_path,
                    "peak_rss_by_phase": dict(clock.peak_by_path),
                    "phases": list(clock.records),
                }
            )
            print(
                f"[profile] step {state.global_step}: {seconds:.2f} s, peak RSS {clock.step_peak / 1e9:.2f} GB"
            )
            if self._prof is not None:
                self._prof.__exit__(None, None, None)
                clock.torch_profiling = False
                prof, self._prof = self._prof, None
                table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=60)
                mem = prof.key_averages().table(sort_by="self_cpu_memory_usage", row_limit=40)
                Path(f"{profile_prefix}_torch_time.txt").write_text(table)
                Path(f"{profile_prefix}_torch_memory.txt").write_text(mem)
                prof.export_chrome_trace(f"{profile_prefix}_torch_trace.json")

    n = max(64, 4 * (1 + args.steps) * args.prompts)
    phases_cb = StepPhases()
    trainer = Profiled(
        model=model,
        reward_funcs=step_cost.addition_reward,
        args=AMFTConfig(**kwargs),
        train_dataset=step_cost.make_prompts(n, seed=1),
        processing_class=tokenizer,
        sft_dataset=step_cost.make_demos(max(64, 2 * (1 + args.steps) * args.sft_batch), seed=2),
        val_dataset=step_cost.make_prompts(n, seed=3) if args.config == "amft_meta" else None,
        callbacks=[phases_cb],
    )
    holder["trainer"] = trainer
    _wrap(trainer.accelerator, "backward", clock, "accelerator.backward", missing)
    _wrap(trainer.accelerator, "clip_grad_norm_", clock, "clip_grad_norm_", missing)
    trainer.train()
    clock.stop()
    result = {
        "config": args.config,
        "model": label,
        "src": str(src),
        "num_trainable_parameters": num_params,
        "fp32_gradient_bytes": unit,
        "threads": torch.get_num_threads(),
        "load_average_end": os.getloadavg(),
        "missing_wrappers": missing,
        "command": " ".join(sys.argv),
        "steps": steps,
    }
    Path(f"{args.out}.json").write_text(json.dumps(result, indent=1))
    print(f"[profile] wrote {args.out}.json; wrappers missing: {missing or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
