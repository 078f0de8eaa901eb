"""Record, or check, every strategy's final weights bit for bit: the guard of refactors that must not change a number.

Each strategy runs `tests/_parallel_runner.py` (the real trainer over a deterministic generation, 4 steps, GA 2) in
four layouts: one process and two processes (float64, SGD, DDP over gloo), and ZeRO-2 and ZeRO-3 on two CPU
processes (float32, SGD). The result of each is the SHA-256 of every parameter's bytes plus the logged trajectory
(mu, losses). `--record` writes them with the host's fingerprint (torch version, CPU capability) to
`tests/fixtures/bit_identity.json`; `--check` reruns and compares. Rounding differs between CPU instruction sets,
so a check on another host compares the float checksum to 1e-9 (float64) / 1e-5 (ZeRO, float32) instead of the
hash, and says so.

    OMP_NUM_THREADS=1 python benchmarks/bit_identity.py --record     # before the refactor
    OMP_NUM_THREADS=1 python benchmarks/bit_identity.py --check      # after it: exit 1 on any difference

`tests/distributed/test_ddp_and_zero.py` checks the one- and two-process layouts of the strategies it already runs against the
same file, so CI keeps the guard without running the matrix again.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from _parallel_launch import STRATEGY_FAMILIES  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "bit_identity.json"

#: the strategy arguments of each run: the multi-process tests' one strategy of each family, and the (1 - mu, mu) ones
STRATEGY_ARGS: dict[str, dict] = {
    "amft": {},
    "fixed": {"mu_init": 0.3},
    "sft_then_rl": {},  # the runner's sft_warmup_steps=1: one SFT step, then RL
    **STRATEGY_FAMILIES,
}

#: layout -> (runner arguments, processes, DeepSpeed environment)
LAYOUTS: dict[str, tuple[tuple[str, ...], int, bool]] = {
    "1": (("--float64",), 1, False),
    "2": (("--float64",), 2, False),
    "zero2": (("--sgd", "--deepspeed_stage=2"), 2, True),
    "zero3": (("--sgd", "--deepspeed_stage=3"), 2, True),
}

TRAJECTORY = ("mu", "sft_loss", "rl_loss", "meta_gradient")


def fingerprint() -> dict[str, str]:
    import torch

    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def run_args(strategy: str, layout: str) -> tuple[tuple[str, ...], int, bool]:
    extra, processes, deepspeed = LAYOUTS[layout]
    return (
        (*extra, f"--balancing={strategy}", f"--strategy_args={json.dumps(STRATEGY_ARGS[strategy])}"),
        processes,
        deepspeed,
    )


def summary(result: dict) -> dict:
    return {
        "param_sha256": result["param_sha256"],
        "param_checksum": result["param_checksum"],
        **{key: result[key] for key in TRAJECTORY},
    }


def compare(recorded: dict, result: dict, layout: str, same_host: bool) -> str | None:
    """None when `result` matches `recorded`; otherwise what differs."""
    if same_host:
        if recorded["param_sha256"] != result["param_sha256"]:
            return (
                f"parameters differ (sha256 {recorded['param_sha256'][:12]} -> {result['param_sha256'][:12]})"
            )
        for key in TRAJECTORY:
            if recorded[key] != result[key]:
                return f"{key} differs: {recorded[key]} -> {result[key]}"
        return None
    rel = 1e-9 if layout in ("1", "2") else 1e-5
    if not math.isclose(recorded["param_checksum"], result["param_checksum"], rel_tol=rel):
        return f"parameter checksum differs beyond {rel}: {recorded['param_checksum']} -> {result['param_checksum']}"
    return None


def main() -> int:
    from _parallel_launch import _run  # the suite's launcher: torchrun / accelerate with the CPU environment

    from amft_trl.toy import build_model, build_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--record", action="store_true")
    mode.add_argument("--check", action="store_true")
    parser.add_argument("--strategies", nargs="*", default=list(STRATEGY_ARGS))
    parser.add_argument("--layouts", nargs="*", default=list(LAYOUTS))
    cli = parser.parse_args()

    stored = json.loads(FIXTURE.read_text()) if FIXTURE.exists() else {"runs": {}}
    same_host = stored.get("host") == fingerprint()
    if cli.check and not same_host:
        print(f"host {fingerprint()} differs from the recording's {stored.get('host')}: float checksums only")
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(Path(tmp) / "tiny")
        tokenizer = build_tokenizer()
        build_model(tokenizer).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        for strategy in cli.strategies:
            for layout in cli.layouts:
                key = f"{strategy}/{layout}"
                extra, processes, deepspeed = run_args(strategy, layout)
                start = time.perf_counter()
                result = summary(
                    _run(
                        model_dir,
                        Path(tmp) / key / "r.json",
                        *extra,
                        processes=processes,
                        deepspeed_env=deepspeed,
                    )
                )
                seconds = time.perf_counter() - start
                if cli.record:
                    stored["runs"][key] = result
                    print(f"{key:18s} {result['param_sha256'][:16]}  ({seconds:.0f} s)", flush=True)
                    continue
                problem = compare(stored["runs"][key], result, layout, same_host)
                failures += problem is not None
                print(
                    f"{key:18s} {'ok' if problem is None else 'DIFFERS: ' + problem}  ({seconds:.0f} s)",
                    flush=True,
                )
    if cli.record:
        stored["host"] = fingerprint()
        stored["command"] = "OMP_NUM_THREADS=1 python benchmarks/bit_identity.py --record"
        FIXTURE.write_text(json.dumps(stored, indent=1, sort_keys=True) + "\n")
        print(f"wrote {FIXTURE.relative_to(ROOT)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
