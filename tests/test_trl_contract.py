"""The private TRL / Accelerate members amft-trl relies on (`amft_trl._trl_compat`), pinned.

Like TRL's own `TestTransformersContinuousBatchingContract`: when a TRL release changes one of these, a test here
fails and names it, instead of AMFT silently training on something else. The most important one: a validation
generation must leave every training metric, log table and token count untouched; the test compares *all* of the
trainer's attributes before and after one, so a container TRL adds would be caught, not only the ones listed in
`isolated_generation`.
"""

from __future__ import annotations

import importlib
import inspect
import time
from collections import deque

import pytest
import torch
from conftest import digit_fraction_reward, make_config, make_demos, make_prompts
from trl import GRPOTrainer
from trl.trainer.utils import shuffle_sequence_dict, split_tensor_dict

from amft_trl import AMFTTrainer, _trl_compat


@pytest.fixture
def trainer(tmp_path, tiny_model_dir, tokenizer):
    return AMFTTrainer(
        model=tiny_model_dir,
        reward_funcs=[digit_fraction_reward],
        args=make_config(tmp_path, max_steps=2, meta_update_steps=1),
        train_dataset=make_prompts(16, seed=1),
        sft_dataset=make_demos(16, seed=2),
        val_dataset=make_prompts(8, seed=3),
        processing_class=tokenizer,
    )


def _rows(n: int = 2, generations: int = 4):
    return [row for row in make_prompts(n, seed=5) for _ in range(generations)]


def test_private_members_exist_with_the_assumed_signatures():
    for name in (
        "_generate_and_score_completions",
        "_calculate_rewards",
        "_compute_loss",
        "_get_per_token_logps_and_entropies",
    ):
        assert callable(getattr(GRPOTrainer, name, None)), f"GRPOTrainer.{name} is gone"
    params = inspect.signature(GRPOTrainer._get_per_token_logps_and_entropies).parameters
    assert list(params)[1:5] == ["model", "input_ids", "attention_mask", "logits_to_keep"]
    assert "compute_entropy" in params
    # LUFFY generates the on-policy rows only, through TRL's own single-turn generation
    assert list(inspect.signature(GRPOTrainer._generate_single_turn).parameters)[1:5] == [
        "prompt_ids",
        "images",
        "multimodal_fields",
        "num_generations",
    ]
    assert "self._generate_single_turn(" in inspect.getsource(GRPOTrainer._generate)
    assert "[::num_generations]" in inspect.getsource(
        importlib.import_module("trl.generation.vllm_generation").VLLMGeneration.generate
    )
    for name in ("grpo", "sapo", "bnpo", "dr_grpo", "dapo", "cispo", "vespo", "luspo"):  # LUFFY's normalisers
        assert f'"{name}"' in inspect.getsource(GRPOTrainer._compute_loss), name
    assert list(inspect.signature(GRPOTrainer._calculate_rewards).parameters)[1:] == [
        "inputs",
        "prompts",
        "completions",
        "completion_ids_list",
    ]
    from accelerate.state import GradientState

    assert callable(getattr(GradientState, "_set_sync_gradients", None))
    from accelerate import Accelerator

    assert "deepspeed_engine_wrapped" in inspect.getsource(Accelerator.backward)
    assert callable(_trl_compat.tokenize)


def test_generation_output_and_its_extra_keys_survive_trls_shuffle_and_split(trainer):
    trainer.model.train()
    out = trainer._generate_and_score_completions(_rows())
    for key in _trl_compat.GENERATION_KEYS:
        assert key in out, f"TRL's generation no longer returns {key!r}"
    assert out["advantages"].dim() == 1 and len(out["advantages"]) == 8
    for key in ("amft_reward", "amft_group_rewards"):
        assert len(out[key]) == 8, key
    torch.manual_seed(0)
    chunks = split_tensor_dict(shuffle_sequence_dict(out), 2)
    for chunk in chunks:
        assert len(chunk["amft_reward"]) == len(chunk["advantages"]) == 4
    # rows stay aligned: a row's reward and its group's rewards travel together
    merged = torch.cat([c["amft_group_rewards"] for c in chunks])
    rewards = torch.cat([c["amft_reward"] for c in chunks])
    assert all(bool((group == r).any()) for group, r in zip(merged, rewards, strict=True))


def test_calculate_rewards_returns_every_processs_rewards_with_nan_for_none(trainer):
    def half_none(completions, **kwargs):
        return [None if i % 2 else 0.5 for i in range(len(completions))]

    trainer.reward_funcs = [half_none]
    rows = _rows(1)
    rewards = trainer._calculate_rewards(rows, [r["prompt"] for r in rows], ["x"] * 4, [[1]] * 4)
    assert rewards.shape == (4, 1)
    assert torch.isnan(rewards[1::2]).all() and (rewards[::2] == 0.5).all()


def test_compute_loss_reads_the_advantages_after_its_forward(trainer):
    """Per-rollout weights (SRFT) are set from the loss's own forward: TRL must read `inputs["advantages"]` after
    its single `_get_per_token_logps_and_entropies(compute_entropy=True)` call."""
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by the Trainer's loop in training
    inputs = trainer._generate_and_score_completions(_rows())
    assert inputs["advantages"].abs().sum() > 0
    baseline = trainer._compute_loss(trainer.model, dict(inputs))
    calls = []

    def hook(entropies):
        calls.append(entropies)
        patched["advantages"] = torch.zeros_like(patched["advantages"])

    patched = dict(inputs)
    trainer._rl_entropy_hook = hook
    loss = trainer._compute_loss(trainer.model, patched)
    assert len(calls) == 1 and calls[0] is not None and calls[0].shape == inputs["completion_ids"].shape
    assert float(loss) == 0.0 != float(baseline), "TRL read the advantages before the forward"


def _fingerprint(value, depth: int = 0):
    """A comparable summary of an attribute: primitives and containers of them by value, anything else by id."""
    if isinstance(value, int | float | str | bool | type(None)):
        return value
    if isinstance(value, torch.Tensor):
        return (
            "tensor",
            tuple(value.shape),
            float(value.double().sum()) if value.numel() < 10_000 else id(value),
        )
    if depth < 6 and isinstance(value, dict):
        return ("dict", type(value).__name__, {k: _fingerprint(v, depth + 1) for k, v in value.items()})
    if depth < 6 and isinstance(value, list | tuple | deque):
        return (type(value).__name__, [_fingerprint(v, depth + 1) for v in value][:1000], len(value))
    return ("object", id(value))


def _snapshot(trainer):
    attributes = {k: _fingerprint(v) for k, v in vars(trainer).items()}
    attributes["state"] = {k: _fingerprint(v) for k, v in vars(trainer.state).items()}
    return attributes


def test_validation_generation_leaves_every_training_attribute_untouched(trainer):
    """Fill the training logs with one real step first, so that a leak into any container shows."""
    trainer.args.max_steps = 1
    trainer.train()
    trainer.model.train()
    trainer._metrics["train"]["reward"].append(0.25)  # pending, not yet logged
    before, position = _snapshot(trainer), trainer._val_stream.state_dict()
    reward = trainer._validation_backward(trainer.model)
    trainer.model.zero_grad(set_to_none=True)
    after = _snapshot(trainer)
    changed = sorted(k for k in before if before[k] != after[k])
    assert changed == [], f"validation generation changed {changed}"
    assert (
        trainer._val_stream.state_dict() != position
    )  # the one change it makes: the validation stream moved
    assert set(after) == set(before), f"attributes added: {set(after) - set(before)}"
    assert reward == reward, "the validation reward was not read from TRL's metrics"


def test_step_time_covers_the_whole_amft_step(trainer):
    """TRL's `step_time` times only GRPO's `training_step`; AMFT's covers the SFT and meta work as well."""
    original = trainer._sft_micro_step

    def slow(*args, **kwargs):
        time.sleep(0.3)
        return original(*args, **kwargs)

    trainer._sft_micro_step = slow
    trainer.train()
    times = [h["step_time"] for h in trainer.state.log_history if "step_time" in h]
    assert len(times) == 2 and min(times) >= 0.3


def test_resume_warns_about_tied_weights_in_the_form_the_filter_reads(caplog):
    """transformers' Trainer warns "There were missing keys ... ['lm_head.weight']" when it resumes a model with tied
    weights (saved without the tied copy); `quiet_tied_weights_on_resume` drops exactly that warning."""
    import logging
    from types import SimpleNamespace

    from transformers import Trainer

    from amft_trl import toy

    model = toy.build_model(toy.build_tokenizer(), seed=0)
    assert model.get_parameter("lm_head.weight") is model.get_parameter("model.embed_tokens.weight")
    trainer_logger = logging.getLogger("transformers.trainer")
    propagate, trainer_logger.propagate = (
        trainer_logger.propagate,
        True,
    )  # transformers' loggers do not propagate

    def warn(missing):
        result = SimpleNamespace(missing_keys=missing, unexpected_keys=[])
        Trainer._issue_warnings_after_load(SimpleNamespace(model=model), result)

    try:
        with caplog.at_level(logging.WARNING, logger="transformers.trainer"):
            warn(["lm_head.weight"])
            assert caplog.records[-1].getMessage().startswith(_trl_compat.MISSING_KEYS_WARNING)
            assert "['lm_head.weight']" in caplog.records[-1].getMessage()
            caplog.clear()
            with _trl_compat.quiet_tied_weights_on_resume(model):
                warn(["lm_head.weight"])  # the tied copy: nothing is missing
                assert not caplog.records
                warn(["lm_head.weight", "model.norm.weight"])  # a real missing key is still reported
                assert "model.norm.weight" in caplog.text
            caplog.clear()
            warn(["lm_head.weight"])  # the filter is gone after the block
            assert caplog.records
    finally:
        trainer_logger.propagate = propagate


def test_vision_members_exist_with_the_assumed_signatures():
    """The VLM path: TRL's log-prob helper takes every multimodal key its generation output may hold (and
    `_compute_loss` passes them, so the SFT and validation forwards pass the same), its micro-batch splitter for
    pixel values exists, and transformers' `Trainer._load_from_checkpoint` (wrapped to reload VLM checkpoints)."""
    from transformers import Trainer
    from trl import GRPOTrainer
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling
    from trl.trainer.utils import split_pixel_values_by_grid, unsplit_pixel_values_by_grid  # noqa: F401

    from amft_trl._trl_compat import MULTIMODAL_KEYS

    params = inspect.signature(GRPOTrainer._get_per_token_logps_and_entropies).parameters
    assert set(MULTIMODAL_KEYS) <= set(params)
    source = inspect.getsource(GRPOTrainer._compute_loss)
    assert all(f'inputs.get("{key}")' in source for key in MULTIMODAL_KEYS)
    assert list(inspect.signature(Trainer._load_from_checkpoint).parameters) == [
        "self",
        "resume_from_checkpoint",
        "model",
    ]
    fields = inspect.signature(DataCollatorForVisionLanguageModeling).parameters
    assert {"processor", "max_length", "completion_only_loss"} <= set(fields)
