"""Scale-out correctness on CPU: 2-process DDP and DeepSpeed ZeRO-2/3 (gloo) against 1 process, and against no DeepSpeed.

Each run is `tests/_parallel_runner.py` in a subprocess (a distributed run needs its own process group), started by
`tests/_parallel_launch.py`; rank 0 writes the trajectory as JSON. The 2-process runs go through
`accelerate launch --multi_gpu` with `ACCELERATE_USE_CPU=1`: on a machine without GPUs that is what starts N CPU ranks
(`--cpu --num_processes N` starts one).
The DeepSpeed runs pass the config as `AMFTConfig(deepspeed=...)`, on N processes started by `torchrun`.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from _parallel_launch import STRATEGY_FAMILIES, _close, _plain_and_zero, _run
from datasets import Dataset

from amft_trl import AMFTConfig, AMFTTrainer, MuController
from amft_trl._distributed import check_parallel_setup
from amft_trl._distributed import launcher_deepspeed_config as _launcher_deepspeed_config

needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed"
)


def _matches_recording(result: dict, key: str) -> None:
    """The run ends where `benchmarks/bit_identity.py --record` recorded it (`tests/fixtures/bit_identity.json`):
    bit for bit on a host like the recording's (torch version, CPU capability), else its float checksum to 1e-9
    (rounding differs between CPU instruction sets). Guards refactors that must not change a number."""
    recorded = json.loads(
        (Path(__file__).resolve().parents[1] / "fixtures" / "bit_identity.json").read_text()
    )
    run = recorded["runs"][key]
    host = {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if recorded["host"] == host:
        assert result["param_sha256"] == run["param_sha256"], (
            f"{key}: the final weights differ from the recording"
        )
        assert result["mu"] == run["mu"] and result["sft_loss"] == run["sft_loss"], key
    else:
        assert math.isclose(result["param_checksum"], run["param_checksum"], rel_tol=1e-9), key


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
    _matches_recording(one, "amft/1")
    _matches_recording(two, "amft/2")


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
    plain, zero = _plain_and_zero(tiny_model_dir, tmp_path, stage, *common)
    # Adam at lr 1e-2 in float32 (DeepSpeed keeps float32 and runs its own CPU kernels): rounding shows at 2e-4 in the
    # losses and at 2e-3 in a parameter checksum, so the losses are compared. The double step (Adam stepping on the
    # RL gradient, then again on the SFT gradient) moved the second step's SFT loss by 6 %.
    assert _close(plain["sft_loss"], zero["sft_loss"], 1e-3), (plain["sft_loss"], zero["sft_loss"])
    assert _close(plain["rl_loss"], zero["rl_loss"], 1e-3), (plain["rl_loss"], zero["rl_loss"])
    assert _close(plain["mu"], zero["mu"], 1e-4)


@needs_deepspeed
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_meta_gradient_under_deepspeed_single_process_matches_plain(tiny_model_dir, tmp_path, stage):
    """ZeRO-1/2/3, one process, meta-gradient on (GA 2, SGD): the same g_mu, mu, losses as without DeepSpeed.

    Each backward of a meta step is taken at an accumulation boundary and moved out of ZeRO's partition; the engine
    steps once, on the combined gradient written back. DeepSpeed computes in float32 whatever the weights' dtype, so
    the plain run is float32 too; float32 rounding moves g_mu by up to ~1e-2 here (float32 against float64 without
    DeepSpeed: 5e-4 on the gradient norms, amplified in the small inner product <grad U, d>). Mixing the RL and SFT
    gradients in one buffer, or not stepping the engine after a meta step, changes g_mu or the losses by far more.
    """
    common = ("--sgd", "--max_steps=4")
    plain, zero = _plain_and_zero(tiny_model_dir, tmp_path, stage, *common)
    meta = [g for g in plain["meta_gradient"] if g is not None]
    assert len(meta) == 2 and all(g != 0 for g in meta)
    assert _close(plain["meta_gradient"], zero["meta_gradient"], 2e-2), (
        plain["meta_gradient"],
        zero["meta_gradient"],
    )
    assert _close(plain["mu"], zero["mu"], 3e-4), (plain["mu"], zero["mu"])
    assert _close(plain["sft_loss"], zero["sft_loss"], 1e-4), (plain["sft_loss"], zero["sft_loss"])
    assert _close(plain["rl_loss"], zero["rl_loss"], 1e-4), (plain["rl_loss"], zero["rl_loss"])
    assert _close(plain["val_reward"], zero["val_reward"], 1e-6)


@needs_deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_meta_gradient_under_deepspeed_two_processes_matches_one(tiny_model_dir, tmp_path, stage):
    """ZeRO-2/3 on 2 CPU processes (gloo): each holds half of every gradient, yet g_mu is the global one.

    The inner products are taken on each process's partition and summed over processes; forgetting that sum gives
    each process the product over its own half only (a different g_mu on each, and mu diverges across processes).
    The same global batch on 1 process is the reference.
    """
    common = ("--sgd", "--max_steps=4", f"--deepspeed_stage={stage}")
    one = _run(tiny_model_dir, tmp_path / "one" / "r.json", *common, deepspeed_env=True)
    two = _run(tiny_model_dir, tmp_path / "two" / "r.json", *common, deepspeed_env=True, processes=2)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert _close(one["meta_gradient"], two["meta_gradient"], 1e-2), (
        one["meta_gradient"],
        two["meta_gradient"],
    )
    assert _close(one["mu"], two["mu"], 2e-4), (one["mu"], two["mu"])
    assert _close(one["sft_loss"], two["sft_loss"], 1e-4), (one["sft_loss"], two["sft_loss"])
    assert _close(one["val_reward"], two["val_reward"], 1e-6)
    assert math.isclose(one["param_checksum"], two["param_checksum"], rel_tol=1e-5)


@needs_deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_resume_matches_straight_run(tiny_model_dir, tmp_path, stage):
    """4 steps straight against 2 + resume + 2, meta-gradient on (meta steps 1 and 3: one on each side)."""
    common = ("--max_steps=4", f"--deepspeed_stage={stage}")
    straight = _run(tiny_model_dir, tmp_path / "straight" / "r.json", *common, deepspeed_env=True)
    _run(
        tiny_model_dir,
        tmp_path / "resumed" / "r.json",
        *common,
        "--stop_at=2",
        "--save_steps=2",
        deepspeed_env=True,
    )
    resumed = _run(tiny_model_dir, tmp_path / "resumed" / "r.json", *common, "--resume", deepspeed_env=True)
    assert resumed["mu"][:1] == straight["mu"][:1]  # the first run's history came back with the checkpoint
    assert sum(g is not None for g in straight["meta_gradient"]) == 2
    assert _close(straight["meta_gradient"][-2:], resumed["meta_gradient"][-2:], 1e-6)
    assert _close(straight["mu"], resumed["mu"], 1e-9), (straight["mu"], resumed["mu"])
    assert _close(straight["sft_loss"][-2:], resumed["sft_loss"][-2:], 1e-6)
    assert math.isclose(straight["param_checksum"], resumed["param_checksum"], rel_tol=1e-6)


# ---------------------------------------------------------------------------------------------------- bad input


def _check(config: dict | None, meta_learning_rate: float = 0.02, world: int = 1) -> None:
    args = AMFTConfig(
        output_dir="unused", report_to="none", use_cpu=True, meta_learning_rate=meta_learning_rate
    )
    check_parallel_setup(args, MuController.from_config(args).needs_val_dataset, world, config)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_meta_gradient_under_zero_stages_1_to_3_is_accepted(stage):
    _check({"zero_optimization": {"stage": stage, "offload_optimizer": {"device": "none"}}})


def test_meta_gradient_under_deepspeed_without_zero_is_refused():
    with pytest.raises(ValueError, match=r"ZeRO stage 1, 2 or 3.*zero_optimization.stage=0"):
        _check({"zero_optimization": {"stage": 0}})
    with pytest.raises(ValueError, match="zero_optimization.stage=0"):
        _check({})
    _check({}, meta_learning_rate=0.0)  # entropy-only AMFT runs under any DeepSpeed config


@pytest.mark.parametrize("key", ["offload_optimizer", "offload_param"])
def test_meta_gradient_with_deepspeed_offload_is_refused(key):
    with pytest.raises(ValueError, match=rf"zero_optimization.{key}.device='cpu'.*meta_learning_rate=0"):
        _check({"zero_optimization": {"stage": 3, key: {"device": "cpu"}}})
    _check({"zero_optimization": {"stage": 3, key: {"device": "cpu"}}}, meta_learning_rate=0.0)


def test_meta_val_batch_size_must_divide_over_processes():
    with pytest.raises(
        ValueError, match=r"`meta_val_batch_size` \(16\) must be a multiple of the number of processes \(3\)"
    ):
        _check(None, world=3)


def test_launcher_deepspeed_config_is_read_before_the_model_loads(monkeypatch, tmp_path):
    args = AMFTConfig(output_dir="unused", report_to="none", use_cpu=True)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert _launcher_deepspeed_config(args) is None
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "cpu")
    config = _launcher_deepspeed_config(args)
    assert config["zero_optimization"]["stage"] == 3
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 0}}))
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(path))
    assert _launcher_deepspeed_config(args) == {"zero_optimization": {"stage": 0}}


@needs_deepspeed
def test_deepspeed_config_in_args_is_checked_before_the_model_loads(monkeypatch):
    """The trainer refuses before `GRPOTrainer.__init__` would load anything (the model path does not exist)."""
    args = AMFTConfig(
        output_dir="unused",
        report_to="none",
        use_cpu=True,
        deepspeed={"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}},
    )
    with pytest.raises(ValueError, match="offload_optimizer"):
        AMFTTrainer(
            model="/nonexistent/model",
            reward_funcs=lambda completions, **kw: [0.0] * len(completions),
            args=args,
            train_dataset=Dataset.from_dict({"prompt": ["a"]}),
            sft_dataset=Dataset.from_dict({"prompt": ["a"], "completion": ["b"]}),
            val_dataset=Dataset.from_dict({"prompt": ["a"]}),
        )


@pytest.mark.parametrize("balancing", list(STRATEGY_FAMILIES))
def test_strategies_give_the_one_process_trajectory_on_two(tiny_model_dir, tmp_path, balancing):
    """Each strategy family on 1 and 2 ranks, same global batch (float64, SGD, GA 2): same weights, losses and
    parameters. Catches a weight computed from one process's data, or ranks running different forward counts."""
    extra = (
        "--float64",
        f"--balancing={balancing}",
        f"--strategy_args={json.dumps(STRATEGY_FAMILIES[balancing])}",
    )
    one = _run(tiny_model_dir, tmp_path / "one" / "r.json", *extra)
    two = _run(tiny_model_dir, tmp_path / "two" / "r.json", *extra, processes=2)
    assert two["world_size"] == 2
    # HPT's mu is its hpt_sft_coef on every step that trains a demonstration: its fraction varies instead (below)
    mu_varies = len(one["mu"]) == 4 and len(set(one["mu"][1:])) > 1
    assert mu_varies or balancing in ("srft", "hpt", "luffy"), one["mu"]
    assert _close(one["mu"], two["mu"], 1e-6), (one["mu"], two["mu"])
    assert _close(one["sft_loss"], two["sft_loss"], 1e-6), (one["sft_loss"], two["sft_loss"])
    assert _close(one["rl_loss"], two["rl_loss"], 1e-5), (one["rl_loss"], two["rl_loss"])
    if balancing == "hpt":
        fractions = one["hpt_sft_fraction"][1:]
        assert any(0 < f < 1 for f in fractions), (
            f"the gate must split the prompts for the check to bite: {fractions}"
        )
        assert _close(one["hpt_sft_fraction"], two["hpt_sft_fraction"], 1e-9)
    if balancing == "luffy":
        weights = one["luffy_importance_weight"][1:]
        assert len(weights) == 3 and all(0 < w < 1 for w in weights), one["luffy_importance_weight"]
        assert _close(one["luffy_importance_weight"], two["luffy_importance_weight"], 1e-6)
        assert _close(one["luffy_off_policy_fraction"], two["luffy_off_policy_fraction"], 1e-6)
    if balancing == "relift":
        assert 1.0 in one["relift_sft_step"], (
            f"no SFT step: the check would be vacuous {one['relift_sft_step']}"
        )
        assert one["relift_sft_step"] == two["relift_sft_step"]
        assert one["relift_buffer_fill"] == two["relift_buffer_fill"]
    assert math.isclose(one["param_checksum"], two["param_checksum"], rel_tol=1e-9)
    _matches_recording(one, f"{balancing}/1")
    _matches_recording(two, f"{balancing}/2")


@needs_deepspeed
@pytest.mark.parametrize("balancing", ["luffy", "relift"])
def test_luffy_and_relift_under_zero2_single_process_match_plain(tiny_model_dir, tmp_path, balancing):
    """LUFFY's added off-policy term and ReLIFT's SFT step on the buffer under ZeRO-2: the same losses as without
    DeepSpeed (float32 Adam: rounding only)."""
    extra = (
        "--max_steps=4",
        f"--balancing={balancing}",
        f"--strategy_args={json.dumps(STRATEGY_FAMILIES[balancing])}",
    )
    plain, zero = _plain_and_zero(tiny_model_dir, tmp_path, 2, *extra)
    assert _close(plain["rl_loss"], zero["rl_loss"], 1e-3), (plain["rl_loss"], zero["rl_loss"])
    assert _close(plain["sft_loss"], zero["sft_loss"], 1e-3), (plain["sft_loss"], zero["sft_loss"])
    if balancing == "relift":
        assert 1.0 in plain["relift_sft_step"] and plain["relift_sft_step"] == zero["relift_sft_step"]
    else:
        assert _close(plain["luffy_importance_weight"], zero["luffy_importance_weight"], 1e-3)


@pytest.mark.parametrize("samples", [1, 2, 3])
def test_target_entropy_with_fewer_samples_than_processes_does_not_hang(tiny_model_dir, tmp_path, samples):
    """H* on 2 processes from 1, 2 or 3 demonstrations: every rank runs the same number of forwards (a rank without
    a demonstration of its own runs a zero-weight one), so DDP's per-forward collectives cannot wait forever; and H*
    is the one-process value (to float32 rounding: the batch composition differs). Before the fix, 1 hung."""
    extra = (
        "--float64",
        "--meta_learning_rate=0",
        "--max_steps=2",
        f"--strategy_args={json.dumps({'target_entropy_num_samples': samples})}",
    )
    two = _run(tiny_model_dir, tmp_path / "two" / "r.json", *extra, processes=2, timeout=300)
    measured = [h for h in two["target_entropy"] if h is not None]
    assert measured and math.isfinite(measured[0]) and measured[0] > 0
    if samples == 3:  # the odd split (2 + 1, one padding row): the value is the one-process one
        one = _run(tiny_model_dir, tmp_path / "one" / "r.json", *extra)
        expected = [h for h in one["target_entropy"] if h is not None][0]
        assert math.isclose(measured[0], expected, rel_tol=1e-6)


def test_offload_on_a_deepspeed_before_the_fix_is_refused_even_without_the_meta_gradient(monkeypatch):
    """DeepSpeed < 0.19.0 lost gradients of several backward passes per step under ZeRO-1/2 with CPU offload."""
    import amft_trl._distributed as distributed

    monkeypatch.setattr(distributed, "installed_deepspeed_version", lambda: "0.18.9")
    config = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    with pytest.raises(ValueError, match=r"DeepSpeed 0\.18\.9 .*offload_optimizer.*0\.19\.0"):
        _check(config, meta_learning_rate=0.0)
    _check({"zero_optimization": {"stage": 2}}, meta_learning_rate=0.0)  # no offload: nothing to lose
    monkeypatch.setattr(distributed, "installed_deepspeed_version", lambda: "0.19.0")
    _check(config, meta_learning_rate=0.0)


@needs_deepspeed
def test_validation_in_several_chunks_under_zero2_matches_plain(tiny_model_dir, tmp_path):
    """The validation backward runs a training micro-batch at a time (here 8 validation rollouts in chunks of 4).
    ZeRO-2 keeps only the last boundary backward's gradient in its partition, so each chunk's must be moved out
    after it: forgetting that drops half of grad U, which moves g_mu far beyond float32 rounding."""
    common = ("--sgd", "--max_steps=2", "--global_batch=4", "--gradient_accumulation_steps=1")
    plain, zero = _plain_and_zero(tiny_model_dir, tmp_path, 2, *common)
    meta = [g for g in plain["meta_gradient"] if g is not None]
    assert len(meta) == 1 and meta[0] != 0
    assert _close(plain["meta_gradient"], zero["meta_gradient"], 2e-2), (
        plain["meta_gradient"],
        zero["meta_gradient"],
    )
