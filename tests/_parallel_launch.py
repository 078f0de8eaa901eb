"""Launching `tests/_parallel_runner.py` on 1 or N CPU processes, as the distributed tests and
`benchmarks/bit_identity.py` do: plain, under `accelerate launch --multi_gpu` (DDP over gloo) or under `torchrun`
for DeepSpeed; each run returns the trajectory rank 0 wrote as JSON."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

RUNNER = str(Path(__file__).with_name("_parallel_runner.py"))
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


def _env() -> dict[str, str]:
    env = dict(os.environ, ACCELERATE_USE_CPU="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(RUNNER).parent), env.get("PYTHONPATH")) if p)
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(
    model_dir: str,
    out: Path,
    *extra: str,
    processes: int = 1,
    deepspeed_env: bool = False,
    timeout: int = 600,
) -> dict:
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
    elif (
        deepspeed_env
    ):  # DeepSpeed on N CPU processes: torchrun sets the ranks; DeepSpeed joins them over gloo
        # a concrete free port: with torchrun's `--master_port=0` DeepSpeed's own rendezvous waits forever
        cmd = [TORCHRUN, f"--nproc_per_node={processes}", f"--master_port={_free_port()}", RUNNER]
        env = _env()
        del env["ACCELERATE_USE_CPU"]
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
    if "--cuda" in extra:  # ACCELERATE_USE_CPU would keep a GPU run on the CPU
        env.pop("ACCELERATE_USE_CPU", None)
    for attempt in range(2):
        proc = subprocess.run(
            [*cmd, model_dir, str(out), *extra], env=env, capture_output=True, text=True, timeout=timeout
        )
        # A gloo process group can abort a rank in a way unrelated to the run (pytorch/pytorch#190489: "terminate
        # called without an active exception", SIGABRT); the runner ends its group first, which made it rare, not
        # impossible (1 run in about 60 here). Such a run is started once more, from scratch; any other failure,
        # or the same abort twice, fails the test.
        if proc.returncode == 0 or "terminate called without an active exception" not in proc.stderr:
            break
        if attempt == 0:
            out.unlink(missing_ok=True)
    if proc.returncode != 0:
        raise AssertionError(f"run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def _close(a: list, b: list, rel: float) -> bool:
    if len(a) != len(b):
        return False
    return all(
        (x is None and y is None) or math.isclose(x, y, rel_tol=rel, abs_tol=rel * 1e-3) for x, y in zip(a, b)
    )


def _plain_and_zero(model_dir: str, tmp_path: Path, stage: int, *extra: str) -> tuple[dict, dict]:
    """The same run without DeepSpeed and under single-process ZeRO-`stage`."""
    plain = _run(model_dir, tmp_path / "plain" / "r.json", *extra)
    zero = _run(
        model_dir,
        tmp_path / f"zero{stage}" / "r.json",
        *extra,
        f"--deepspeed_stage={stage}",
        deepspeed_env=True,
    )
    assert zero["distributed_type"] == "DistributedType.DEEPSPEED"
    return plain, zero


#: One strategy of each family, with the arguments its multi-process runs use (also `benchmarks/bit_identity.py`'s).
STRATEGY_FAMILIES = {
    # a schedule with per-token weights on the demonstrations
    "chord": {
        "chord_mu_warmup_steps": 1,
        "chord_mu_decay_steps": 2,
        "chord_mu_peak": 0.6,
        "chord_mu_valley": 0.2,
        "chord_enable_phi_function": True,
    },
    # per-sequence weights from entropies, on demonstrations and on rollouts (advantages replaced)
    "srft": {},
    # a per-prompt gate: demonstrations from the RL batch, a different number on each process
    "hpt": {"hpt_success_reward": 0.3},
    # demonstrations as off-policy rows of the groups (generation of the other rows only), shaped loss
    "luffy": {"luffy_num_off_policy": 1},
    # a buffer of all-failed prompts gathered from every process, and an SFT step on it when it is full
    "relift": {"relift_buffer_size": 4, "relift_fail_reward": 0.2},
}
