"""GPU-only scale-out checks: bf16 meta step, DeepSpeed ZeRO-3 on GPUs, vLLM rollouts (colocate, server), liger.

Skipped where there is no CUDA device (always in CI). Run on a GPU machine with `pytest -m gpu tests/distributed/test_gpu.py`.
The vLLM server test also needs a running server: start `trl vllm-serve --model <dir>` on the model that
`AMFT_VLLM_SERVER_MODEL` names, and set `AMFT_VLLM_SERVER_PORT` (default 8000).
"""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch
from conftest import (
    build_model,
    build_tokenizer,
    digit_fraction_reward,
    make_config,
    make_demos,
    make_prompts,
)

from amft_trl import AMFTTrainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")


@pytest.fixture(scope="module")
def gpu_model_dir(tmp_path_factory) -> str:
    """A tiny random Qwen2 with head_dim 64 (vLLM's attention kernels do not take the CPU fixture's head_dim 8)."""
    path = tmp_path_factory.mktemp("tiny-qwen2-gpu")
    tokenizer = build_tokenizer()
    build_model(tokenizer, hidden_size=256).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def gpu_config(tmp_path, **overrides):
    return make_config(tmp_path, use_cpu=False, bf16=True, max_steps=4, sft_warmup_steps=1, **overrides)


def make_trainer(model_dir, args, trainer_cls=AMFTTrainer):
    return trainer_cls(
        model=model_dir,
        reward_funcs=digit_fraction_reward,
        args=args,
        train_dataset=make_prompts(32, seed=1),
        sft_dataset=make_demos(32, seed=2),
        val_dataset=make_prompts(16, seed=3),
    )


def meta_gradients(trainer) -> list[float]:
    return [h["amft/meta_gradient"] for h in trainer.state.log_history if "amft/meta_gradient" in h]


def test_bf16_meta_step_on_cuda(gpu_model_dir, tmp_path):
    trainer = make_trainer(gpu_model_dir, gpu_config(tmp_path))
    trainer.train()
    grads = meta_gradients(trainer)
    assert grads and all(math.isfinite(g) for g in grads)


class RecordsValidationWeights(AMFTTrainer):
    """Records, at each validation generation, the step whose weights vLLM holds."""

    def _validation_backward(self, model):
        self.validation_weight_steps = getattr(self, "validation_weight_steps", [])
        reward = super()._validation_backward(model)
        self.validation_weight_steps.append((self.state.global_step, self._last_loaded_step))
        return reward


@needs_vllm
def test_vllm_colocate_validation_uses_current_weights(gpu_model_dir, tmp_path):
    args = gpu_config(
        tmp_path,
        use_vllm=True,
        vllm_mode="colocate",
        vllm_gpu_memory_utilization=0.3,
        vllm_enable_sleep_mode=False,
    )
    trainer = make_trainer(gpu_model_dir, args, RecordsValidationWeights)
    trainer.train()
    assert trainer.validation_weight_steps, "no meta step ran"
    assert all(step == loaded for step, loaded in trainer.validation_weight_steps), (
        trainer.validation_weight_steps
    )
    assert all(math.isfinite(g) for g in meta_gradients(trainer))


@needs_vllm
@pytest.mark.skipif("AMFT_VLLM_SERVER_MODEL" not in os.environ, reason="no vLLM server named")
def test_vllm_server_mode(tmp_path):
    args = gpu_config(
        tmp_path,
        use_vllm=True,
        vllm_mode="server",
        vllm_server_port=int(os.environ.get("AMFT_VLLM_SERVER_PORT", "8000")),
    )
    trainer = make_trainer(os.environ["AMFT_VLLM_SERVER_MODEL"], args, RecordsValidationWeights)
    trainer.train()
    assert trainer.validation_weight_steps
    assert all(step == loaded for step, loaded in trainer.validation_weight_steps)


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="liger-kernel is not installed")
def test_liger_kernels_give_the_same_meta_gradient(gpu_model_dir, tmp_path):
    """TRL's liger path swaps layer kernels only: g_mu must match the plain run up to bf16 rounding."""
    plain = make_trainer(gpu_model_dir, gpu_config(tmp_path / "plain"))
    plain.train()
    liger = make_trainer(gpu_model_dir, gpu_config(tmp_path / "liger", use_liger_kernel=True))
    liger.train()
    for a, b in zip(meta_gradients(plain), meta_gradients(liger), strict=True):
        assert math.isclose(a, b, rel_tol=5e-2), (meta_gradients(plain), meta_gradients(liger))


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
@pytest.mark.parametrize("processes", [1, 2])
def test_zero3_meta_gradient_on_gpus(tiny_model_dir, tmp_path, processes):
    """ZeRO-3 with the meta-gradient on 1 and 2 GPUs (NCCL) against the plain single-GPU run on the same global batch."""
    if torch.cuda.device_count() < processes:
        pytest.skip(f"needs {processes} CUDA devices")
    from _parallel_launch import _close, _run

    common = ("--cuda", "--sgd", "--max_steps=4")
    plain = _run(tiny_model_dir, tmp_path / "plain" / "r.json", *common)
    zero = _run(
        tiny_model_dir,
        tmp_path / "zero" / "r.json",
        *common,
        "--deepspeed_stage=3",
        deepspeed_env=True,
        processes=processes,
    )
    assert zero["world_size"] == processes
    assert sum(g is not None for g in zero["meta_gradient"]) == 2
    assert _close(plain["meta_gradient"], zero["meta_gradient"], 2e-2), (
        plain["meta_gradient"],
        zero["meta_gradient"],
    )
    assert _close(plain["mu"], zero["mu"], 3e-4), (plain["mu"], zero["mu"])
    assert _close(plain["sft_loss"], zero["sft_loss"], 1e-3)
