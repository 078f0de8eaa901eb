"""DeepSpeed ZeRO-2 with `offload_optimizer`: one AMFT step steps on exactly `(1 - mu) g_RL + mu g_SFT`.

AMFT takes an RL and an SFT backward in every micro-step. DeepSpeed releases before 0.19.0 silently lost the
gradients of some backward passes of an optimizer step under ZeRO-1/2 with the optimizer offloaded to the CPU
(DeepSpeed PRs #7967 and #7981): at GA 1 the step then used `mu g_SFT` alone. `amft_trl._deepspeed_check` refuses offloading on those releases;
this test checks the step itself on the DeepSpeed installed here.

How it is exact: the optimizer is Adam (DeepSpeed's CPU Adam, the one offloading runs) with `eps` far above every
gradient entry, so its first step is `-lr * g / (|g| + eps)`, i.e. SGD with rate `lr / eps` to 1e-6 relative. Three
runs of one step from the same weights, on the same deterministic rollouts and the same demonstrations:

- RL only (mu pinned to 0, no DeepSpeed): `delta_RL = -(lr / eps) g_RL`;
- SFT only (mu pinned to 1, no DeepSpeed): `delta_SFT = -(lr / eps) g_SFT`;
- AMFT entropy-only at mu = 0.3 under ZeRO-2 + `offload_optimizer`: must equal `0.7 delta_RL + 0.3 delta_SFT`.

(The AMFT step is taken at GA 1, where the RL and SFT backward share a micro-step, and at GA 2.) All runs happen in
one subprocess, this file executed as a script (DeepSpeed sets up a process group); it writes the weights before and
after each step. The test is skipped when DeepSpeed or its CPU Adam op (a C++ extension built on first use: 3 min 40 s
on this project's 2-core CPU, then loaded from torch's extension cache) is not available.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve()
MU = 0.3
LEARNING_RATE = 1e4
# lr / eps = 1e-2 is the SGD-like rate; |g| < 1 here, so |g| / eps (the distance from SGD) is below 1e-6.
ADAM_EPSILON = 1e6

needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed"
)


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("ACCELERATE_USE_CPU", None)  # it would turn DeepSpeed into plain multi-CPU
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE.parents[1]), env.get("PYTHONPATH")) if p)
    return env


CPU_ADAM_UNAVAILABLE = 77  # the runner's exit status when DeepSpeed's CPU Adam op cannot be built or loaded


def _run(model_dir: str, out: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, str(HERE), model_dir, str(out)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if proc.returncode == CPU_ADAM_UNAVAILABLE:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        pytest.skip(f"DeepSpeed's CPU Adam op cannot be built or loaded on this machine: {tail}")
    if proc.returncode != 0:
        raise AssertionError(f"run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return torch.load(out, weights_only=True)


@needs_deepspeed
def test_zero2_offload_steps_on_the_mixed_gradient(tiny_model_dir, tmp_path):
    """GA 1: the RL and SFT backward of one micro-step (#7981); GA 2: across micro-steps as well (#7967)."""
    result = _run(tiny_model_dir, tmp_path / "result.pt")
    plain, zero_runs = result["plain"], result["zero"]
    delta_rl = plain["rl_only"] - plain["before"]
    delta_sft = plain["sft_only"] - plain["before"]
    expected = (1 - MU) * delta_rl + MU * delta_sft
    scale = float(expected.abs().max())
    # Float32 rounding of weights of order 1: measured 1e-7 (7e-5 of the largest entry of the step).
    tolerance = 1e-3 * scale
    # A step that lost the RL backward (DeepSpeed < 0.19.0) takes `mu delta_SFT`: far outside that tolerance.
    assert float((MU * delta_sft - expected).abs().max()) > 100 * tolerance
    # The plain trainer takes the same mixed step (the reference agrees with the trainer's own path).
    assert float((plain["mixed"] - plain["before"] - expected).abs().max()) <= tolerance

    for ga, zero in zero_runs.items():
        assert zero["distributed_type"] == "DistributedType.DEEPSPEED" and zero["offload"] == "cpu"
        assert zero["optimizer"] == "DeepSpeedCPUAdam"
        assert zero["gradient_accumulation_steps"] == ga
        assert zero["mu"] == pytest.approx(MU)
        assert torch.equal(zero["before"], plain["before"])
        error = float((zero["after"] - zero["before"] - expected).abs().max())
        assert error <= tolerance, (ga, error, scale)


# ------------------------------------------------------------------------------- refusing offload on old DeepSpeed


def _offload(key: str = "offload_optimizer", device: str = "cpu", stage: int = 2) -> dict:
    return {"zero_optimization": {"stage": stage, key: {"device": device}}}


@pytest.mark.parametrize(
    ("config", "field"),
    [
        (_offload(), "zero_optimization.offload_optimizer.device='cpu'"),
        (_offload("offload_param", "nvme", stage=3), "zero_optimization.offload_param.device='nvme'"),
        ({"zero_optimization": {"stage": 2, "cpu_offload": True}}, "zero_optimization.cpu_offload='cpu'"),
    ],
)
@pytest.mark.parametrize("version", ["0.18.9", "0.17.6", "0.19.0rc1", "0.18.10+aeb10bb", "unknown"])
def test_offload_is_refused_before_the_fixed_deepspeed(config, field, version):
    from amft_trl._deepspeed_check import check_deepspeed_offload

    with pytest.raises(ValueError) as info:
        check_deepspeed_offload(config, version)
    message = str(info.value)
    assert f"DeepSpeed {version} is installed" in message and field in message
    assert "DeepSpeed >= 0.19.0" in message and "amft-trl[deepspeed]" in message


@pytest.mark.parametrize("version", ["0.19.0", "0.19.8", "0.20.0", "1.0.0.dev0"])
def test_offload_is_accepted_on_the_fixed_deepspeed(version):
    from amft_trl._deepspeed_check import check_deepspeed_offload

    check_deepspeed_offload(_offload(), version)
    check_deepspeed_offload(_offload("offload_param", stage=3), version)


def test_no_offload_or_no_deepspeed_is_never_refused():
    from amft_trl._deepspeed_check import check_deepspeed_offload

    check_deepspeed_offload(None, None)
    check_deepspeed_offload(None, "0.10.0")
    for config in (
        {},
        {"zero_optimization": {"stage": 2}},
        _offload(device="none"),
        _offload("offload_param", "none"),
    ):
        check_deepspeed_offload(config, "0.18.9")


def test_a_deepspeed_config_without_deepspeed_names_the_extra():
    from amft_trl._deepspeed_check import check_deepspeed_offload

    with pytest.raises(ImportError, match=r"DeepSpeed is not installed.*pip install 'amft-trl\[deepspeed\]'"):
        check_deepspeed_offload({"zero_optimization": {"stage": 2}}, None)


def test_the_installed_version_is_read_from_package_metadata():
    from importlib.metadata import version

    from amft_trl._deepspeed_check import installed_deepspeed_version

    expected = version("deepspeed") if importlib.util.find_spec("deepspeed") is not None else None
    assert installed_deepspeed_version() == expected


def test_the_deepspeed_extras_require_the_fixed_release():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    from amft_trl._deepspeed_check import DEEPSPEED_OFFLOAD_FIX_VERSION

    project = tomllib.loads((HERE.parents[2] / "pyproject.toml").read_text())["project"]
    for extra in ("deepspeed", "dev"):
        specs = [s for s in project["optional-dependencies"][extra] if s.startswith("deepspeed")]
        assert specs == [f"deepspeed>={DEEPSPEED_OFFLOAD_FIX_VERSION}"], (extra, specs)


# ------------------------------------------------------------------------------------------------ the runner


def _flat_weights(model) -> torch.Tensor:
    return torch.cat([p.detach().to(torch.float64).flatten().cpu() for p in model.parameters()])


def _length_reward(completions, **kwargs) -> list[float]:
    """Varies within every group of the deterministic rollouts, so GRPO's advantages (and g_RL) are not zero."""
    from amft_trl._completions import completion_to_text

    return [len(completion_to_text(c)) / 10 for c in completions]


def _one_step(
    model_dir: str, output_dir: str, mu: tuple[float, float, float], ga: int, offload: bool
) -> tuple[torch.Tensor, torch.Tensor, object]:
    """One AMFT step; returns (weights before, weights after, trainer)."""
    from _parallel_runner import DeterministicRolloutTrainer

    from amft_trl import AMFTConfig
    from amft_trl.toy import addition_demos, addition_prompts

    mu_init, mu_min, mu_max = mu
    deepspeed = None
    if offload:
        deepspeed = {
            "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
            "optimizer": {
                "type": "AdamW",
                "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
            },
            "train_micro_batch_size_per_gpu": "auto",
            "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto",
        }
    args = AMFTConfig(
        output_dir=output_dir,
        per_device_train_batch_size=8 // ga,
        gradient_accumulation_steps=ga,
        num_generations=4,
        max_completion_length=6,
        max_steps=1,
        learning_rate=LEARNING_RATE,
        adam_epsilon=ADAM_EPSILON,
        weight_decay=0.0,
        max_grad_norm=0.0,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        report_to="none",
        use_cpu=True,
        bf16=False,  # GRPOConfig's default is bf16, under which DeepSpeed keeps bf16 weights
        logging_steps=1,
        save_strategy="no",
        seed=7,
        sft_warmup_steps=0,
        mu_init=mu_init,
        mu_min=mu_min,
        mu_max=mu_max,
        meta_learning_rate=0.0,
        entropy_learning_rate=0.0 if mu_min == mu_max else 0.05,
        target_entropy=1.0,
        max_sft_length=64,
        disable_tqdm=True,
        deepspeed=deepspeed,
    )
    trainer = DeterministicRolloutTrainer(
        model=model_dir,
        reward_funcs=_length_reward,
        args=args,
        train_dataset=addition_prompts(32, seed=1),
        sft_dataset=addition_demos(32, seed=2),
    )
    before = _flat_weights(trainer.model)
    trainer.train()
    return before, _flat_weights(trainer.model), trainer


def main() -> None:
    """Write {"plain": reference steps, "zero": {GA: ZeRO-2 offload step}} to the path given as argument."""
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("output")
    cli = parser.parse_args()
    try:  # built on first use (minutes), then loaded from torch's extension cache
        from deepspeed.ops.op_builder import CPUAdamBuilder

        CPUAdamBuilder().load(verbose=False)
    except Exception as error:
        print(f"{type(error).__name__}: {error}", file=sys.stderr)
        raise SystemExit(CPU_ADAM_UNAVAILABLE) from error
    work = os.path.join(os.path.dirname(os.path.abspath(cli.output)), "runs")
    # The reference steps do not depend on the accumulation layout (the same 8 rollouts and 8 demonstrations,
    # normalised over the whole step; GA 1 and GA 2 agreed to 1e-8), so they are taken once, at GA 1.
    before, rl_only, _ = _one_step(cli.model_dir, f"{work}/rl", (0.0, 0.0, 0.0), 1, offload=False)
    _, sft_only, _ = _one_step(cli.model_dir, f"{work}/sft", (1.0, 1.0, 1.0), 1, offload=False)
    _, mixed, _ = _one_step(cli.model_dir, f"{work}/mixed", (MU, 0.05, 0.95), 1, offload=False)
    result = {
        "plain": {"before": before, "rl_only": rl_only, "sft_only": sft_only, "mixed": mixed},
        "zero": {},
    }
    for ga in (1, 2):
        before, after, trainer = _one_step(
            cli.model_dir, f"{work}/zero{ga}", (MU, 0.05, 0.95), ga, offload=True
        )
        config = trainer.accelerator.state.deepspeed_plugin.deepspeed_config
        used = [h["amft/mu"] for h in trainer.state.log_history if "amft/mu" in h]
        result["zero"][ga] = {
            "before": before,
            "after": after,
            "distributed_type": str(trainer.accelerator.distributed_type),
            "offload": config["zero_optimization"]["offload_optimizer"]["device"],
            "optimizer": type(trainer.accelerator.deepspeed_engine_wrapped.engine.basic_optimizer).__name__,
            "gradient_accumulation_steps": config["gradient_accumulation_steps"],
            "mu": used[0] if used else None,  # the SFT weight the step used
        }
    torch.save(result, cli.output)


if __name__ == "__main__":
    main()
