"""Scale-out correctness on CPU: 2-process DDP (gloo) against 1 process, and single-process DeepSpeed ZeRO-2/3.

Each run is `tests/_parallel_runner.py` in a subprocess (a distributed run needs its own process group); rank 0
writes the trajectory as JSON. The 2-process runs go through `accelerate launch --multi_gpu` with
`ACCELERATE_USE_CPU=1`: on a machine without GPUs that is what starts N CPU ranks (`--cpu --num_processes N` starts one).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

RUNNER = str(Path(__file__).with_name("_parallel_runner.py"))
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))

needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed"
)


def _env() -> dict[str, str]:
    env = dict(os.environ, ACCELERATE_USE_CPU="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(RUNNER).parent), env.get("PYTHONPATH")) if p)
    return env


def _run(model_dir: str, out: Path, *extra: str, processes: int = 1, deepspeed_env: bool = False) -> dict:
    out.parent.mkdir(parents=True, exist_ok=True)
    if processes == 1:
        cmd = [sys.executable, RUNNER]
        env = _env()
        if (
            deepspeed_env
        ):  # DeepSpeed initialises a process group even for one process; ACCELERATE_USE_CPU would
            del env[
                "ACCELERATE_USE_CPU"
            ]  # turn it into plain multi-CPU (the config's use_cpu keeps it on the CPU)
            env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
    else:
        cmd = [
            ACCELERATE,
            "launch",
            "--multi_gpu",
            f"--num_processes={processes}",
            "--main_process_port=0",
            RUNNER,
        ]
        env = _env()
    proc = subprocess.run(
        [*cmd, model_dir, str(out), *extra], env=env, capture_output=True, text=True, timeout=600
    )
    if proc.returncode != 0:
        raise AssertionError(f"run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def _close(a: list, b: list, rel: float) -> bool:
    if len(a) != len(b):
        return False
    return all(
        (x is None and y is None) or math.isclose(x, y, rel_tol=rel, abs_tol=rel * 1e-3) for x, y in zip(a, b)
    )


def test_two_processes_give_the_one_process_trajectory(tiny_model_dir, tmp_path):
    """Same global batch on 1 and 2 ranks (float64, SGD, GA 2): same g_mu, mu, losses and parameters.

    The global meta-gradient is the dot product of rank-averaged gradients; averaging per-rank dot products, or
    forgetting the micro-steps that DDP never reduced, moves g_mu by several percent here.
    """
    one = _run(tiny_model_dir, tmp_path / "one" / "r.json", "--float64")
    two = _run(tiny_model_dir, tmp_path / "two" / "r.json", "--float64", processes=2)
    assert two["world_size"] == 2 and one["world_size"] == 1
    meta = [g for g in one["meta_gradient"] if g is not None]
    assert len(meta) == 2 and all(g != 0 for g in meta)
    assert _close(one["meta_gradient"], two["meta_gradient"], 1e-6), (
        one["meta_gradient"],
        two["meta_gradient"],
    )
    assert _close(one["mu"], two["mu"], 1e-6), (one["mu"], two["mu"])
    assert _close(one["sft_loss"], two["sft_loss"], 1e-6)
    assert _close(one["rl_loss"], two["rl_loss"], 1e-5)
    assert _close(one["val_reward"], two["val_reward"], 1e-6)
    assert math.isclose(one["param_checksum"], two["param_checksum"], rel_tol=1e-9)


def test_a_rank_whose_mu_diverged_stops_the_run(tiny_model_dir, tmp_path):
    with pytest.raises(AssertionError, match="mu differs across processes"):
        _run(tiny_model_dir, tmp_path / "r.json", "--perturb_rank=1", processes=2)


@needs_deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_single_process_matches_plain(tiny_model_dir, tmp_path, stage):
    """Entropy-only AMFT under ZeRO-2/3: one optimizer step per step, on the RL and SFT gradients together.

    (Accelerate steps the DeepSpeed engine after every backward of the last micro-step; the trainer must keep the
    RL backward off that boundary, or the engine steps twice, once on the RL gradient alone.)
    """
    common = ("--meta_learning_rate=0", "--max_steps=3")
    plain = _run(tiny_model_dir, tmp_path / "plain" / "r.json", *common)
    zero = _run(
        tiny_model_dir,
        tmp_path / f"zero{stage}" / "r.json",
        *common,
        f"--deepspeed_stage={stage}",
        deepspeed_env=True,
    )
    assert zero["distributed_type"] == "DistributedType.DEEPSPEED"
    # Adam at lr 1e-2 in float32 (DeepSpeed keeps float32 and runs its own CPU kernels): rounding shows at 2e-4 in the
    # losses and at 2e-3 in a parameter checksum, so the losses are compared. The double step (Adam stepping on the
    # RL gradient, then again on the SFT gradient) moved the second step's SFT loss by 6 %.
    assert _close(plain["sft_loss"], zero["sft_loss"], 1e-3), (plain["sft_loss"], zero["sft_loss"])
    assert _close(plain["rl_loss"], zero["rl_loss"], 1e-3), (plain["rl_loss"], zero["rl_loss"])
    assert _close(plain["mu"], zero["mu"], 1e-4)


@needs_deepspeed
def test_deepspeed_resume_matches_straight_run(tiny_model_dir, tmp_path):
    common = ("--meta_learning_rate=0", "--max_steps=4", "--deepspeed_stage=2")
    straight = _run(tiny_model_dir, tmp_path / "straight" / "r.json", *common, deepspeed_env=True)
    _run(
        tiny_model_dir,
        tmp_path / "resumed" / "r.json",
        "--meta_learning_rate=0",
        "--max_steps=4",
        "--stop_at=2",
        "--deepspeed_stage=2",
        "--save_steps=2",
        deepspeed_env=True,
    )
    resumed = _run(tiny_model_dir, tmp_path / "resumed" / "r.json", *common, "--resume", deepspeed_env=True)
    assert resumed["mu"][:1] == straight["mu"][:1]  # the first run's history came back with the checkpoint
    assert _close(straight["mu"], resumed["mu"], 1e-9), (straight["mu"], resumed["mu"])
    assert _close(straight["sft_loss"][-2:], resumed["sft_loss"][-2:], 1e-6)
    assert math.isclose(straight["param_checksum"], resumed["param_checksum"], rel_tol=1e-6)


@needs_deepspeed
def test_meta_gradient_under_deepspeed_is_refused_at_construction(tiny_model_dir, tmp_path):
    with pytest.raises(AssertionError, match="does not run under DeepSpeed"):
        _run(tiny_model_dir, tmp_path / "r.json", "--deepspeed_stage=2", "--max_steps=1", deepspeed_env=True)
