"""AMFTConfig validation and AMFTTrainer construction-time errors."""

from __future__ import annotations

import re

import pytest
from conftest import digit_fraction_reward, make_config

from amft_trl import AMFTConfig, AMFTTrainer


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"mu_init": 1.5, "mu_max": 1.0}, "mu_init"),
        ({"mu_min": -0.1}, "mu_min"),
        ({"mu_max": 1.2}, "mu_max"),
        ({"mu_min": 0.6, "mu_max": 0.4, "mu_init": 0.5}, "mu_min"),
        ({"mu_init": 0.01}, "mu_init"),
        ({"meta_learning_rate": -1e-4}, "meta_learning_rate"),
        ({"entropy_learning_rate": -5e-4}, "entropy_learning_rate"),
        ({"meta_update_steps": 0}, "meta_update_steps"),
        ({"sft_warmup_steps": -1}, "sft_warmup_steps"),
        ({"target_entropy": float("nan")}, "target_entropy"),
        ({"meta_gradient_form": "adam"}, "meta_gradient_form"),
        ({"sft_per_device_train_batch_size": 0}, "sft_per_device_train_batch_size"),
        ({"max_sft_length": 1}, "max_sft_length"),
        ({"meta_val_batch_size": 0}, "meta_val_batch_size"),
        # accepted by TrainingArguments, refused by torch only when the trainer builds the optimizer / schedule
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"adam_beta1": 1.5}, "adam_beta1=1.5"),
        ({"adam_epsilon": -1.0}, "adam_epsilon=-1.0"),
        ({"lr_scheduler_type": "cosine_with_min_lr"}, "lr_scheduler_type='cosine_with_min_lr'"),
        (  # refused by AMFTTrainer.create_scheduler at train time before: now at construction
            {
                "sft_warmup_steps": 2,
                "sft_warmup_learning_rate": 1e-3,
                "lr_scheduler_type": "reduce_lr_on_plateau",
                "eval_strategy": "steps",
                "eval_steps": 1,
            },
            "cannot be split into a warm-up phase",
        ),
    ],
)
def test_bad_config_values_name_the_field(tmp_path, overrides, field):
    with pytest.raises(ValueError, match=field):
        make_config(tmp_path, **overrides)


def test_defaults_match_the_documented_values(tmp_path):
    args = AMFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    assert (args.mu_init, args.mu_min, args.mu_max) == (0.5, 0.05, 0.95)
    assert args.entropy_learning_rate == 5e-4
    assert (args.meta_update_steps, args.sft_warmup_steps) == (20, 50)
    assert args.target_entropy is None
    assert args.meta_gradient_form == "normalized"
    assert (args.meta_learning_rate, args.meta_val_batch_size) == (0.02, 16)


def _trainer(tmp_path, tiny_model_dir, tokenizer, **kwargs):
    args = kwargs.pop("args", None) or make_config(tmp_path)
    return AMFTTrainer(
        model=tiny_model_dir,
        reward_funcs=[digit_fraction_reward],
        args=args,
        processing_class=tokenizer,
        **kwargs,
    )


def test_sft_dataset_required_when_mu_can_be_positive(
    tmp_path, tiny_model_dir, tokenizer, prompts, val_prompts
):
    with pytest.raises(ValueError, match="sft_dataset"):
        _trainer(tmp_path, tiny_model_dir, tokenizer, train_dataset=prompts, val_dataset=val_prompts)


def test_sft_dataset_columns_are_named(tmp_path, tiny_model_dir, tokenizer, prompts, val_prompts):
    from datasets import Dataset

    bad = Dataset.from_list([{"question": "q", "answer": "a"}])
    with pytest.raises(ValueError, match=r"prompt.*completion.*messages.*\['question', 'answer'\]"):
        _trainer(
            tmp_path,
            tiny_model_dir,
            tokenizer,
            train_dataset=prompts,
            sft_dataset=bad,
            val_dataset=val_prompts,
        )


def test_meta_gradient_needs_validation_data(tmp_path, tiny_model_dir, tokenizer, prompts, demos):
    with pytest.raises(ValueError, match="val_dataset"):
        _trainer(tmp_path, tiny_model_dir, tokenizer, train_dataset=prompts, sft_dataset=demos)


def test_args_must_be_amft_config(tmp_path, tiny_model_dir, tokenizer, prompts, demos):
    from trl import GRPOConfig

    args = GRPOConfig(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        per_device_train_batch_size=4,
        num_generations=4,
    )
    with pytest.raises(TypeError, match="AMFTConfig"):
        _trainer(tmp_path, tiny_model_dir, tokenizer, args=args, train_dataset=prompts, sft_dataset=demos)


def test_plain_grpo_needs_no_sft_data(tmp_path, tiny_model_dir, tokenizer, prompts):
    args = make_config(tmp_path, mu_init=0.0, mu_min=0.0, mu_max=0.0)
    trainer = _trainer(tmp_path, tiny_model_dir, tokenizer, args=args, train_dataset=prompts)
    assert trainer.sft_dataset is None


def test_all_truncated_sft_raises_and_partial_is_reported(
    tmp_path, tiny_model_dir, tokenizer, prompts, caplog
):
    from datasets import Dataset

    long_prompt = "Compute " + " + ".join(["1"] * 60) + " ="
    rows = [{"prompt": long_prompt, "completion": " 60"}] * 3 + [
        {"prompt": "Compute 1 + 1 =", "completion": " 2"}
    ]
    args = make_config(tmp_path, max_sft_length=16, meta_learning_rate=0.0)
    trainer = _trainer(
        tmp_path,
        tiny_model_dir,
        tokenizer,
        args=args,
        train_dataset=prompts,
        sft_dataset=Dataset.from_list(rows),
    )
    assert trainer.sft_num_dropped == 3 and len(trainer.sft_dataset) == 1
    assert "dropped" in caplog.text
    with pytest.raises(ValueError, match="max_sft_length"):
        _trainer(
            tmp_path,
            tiny_model_dir,
            tokenizer,
            args=args,
            train_dataset=prompts,
            sft_dataset=Dataset.from_list(rows[:3]),
        )


def test_streaming_datasets_are_refused_with_a_clear_error(
    tmp_path, tiny_model_dir, tokenizer, prompts, demos
):
    with pytest.raises(TypeError, match="sft_dataset.*map-style"):
        _trainer(
            tmp_path,
            tiny_model_dir,
            tokenizer,
            args=make_config(tmp_path, meta_learning_rate=0.0),
            train_dataset=prompts,
            sft_dataset=demos.to_iterable_dataset(),
        )


def test_vllm_requested_without_vllm_fails_before_loading_the_model(tmp_path, prompts, demos, val_prompts):
    from trl.import_utils import is_vllm_available

    if is_vllm_available():
        pytest.skip("vLLM is installed")
    args = make_config(tmp_path, use_vllm=True)
    with pytest.raises(ImportError, match="use_vllm=False"):
        # a model path that does not exist: the error must come before any loading is attempted
        AMFTTrainer(
            model=str(tmp_path / "no-such-model"),
            reward_funcs=digit_fraction_reward,
            args=args,
            train_dataset=prompts,
            sft_dataset=demos,
            val_dataset=val_prompts,
        )


def test_liger_kernel_flag_is_accepted(tmp_path):
    """TRL 1.16's liger path only swaps layer kernels; the losses AMFT adds go through the same head."""
    assert make_config(tmp_path, use_liger_kernel=True).use_liger_kernel


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu"}, "offload_optimizer.device='cpu'"),
        ({"ACCELERATE_DEEPSPEED_ZERO_STAGE": "0"}, "zero_optimization.stage=0"),
    ],
)
def test_meta_gradient_with_unsupported_deepspeed_fails_before_loading_the_model(
    tmp_path, monkeypatch, prompts, demos, val_prompts, env, message
):
    """What `accelerate launch` with a DeepSpeed config puts in the environment is checked before the model loads."""
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match=re.escape(message)):
        AMFTTrainer(
            model=str(tmp_path / "no-such-model"),
            reward_funcs=digit_fraction_reward,
            args=make_config(tmp_path),
            train_dataset=prompts,
            sft_dataset=demos,
            val_dataset=val_prompts,
        )
