"""A warm-up that covers the whole run is said, naming both numbers: at construction when `max_steps` is set, at
`train()` when the step count comes from the epochs. `sft_then_rl` with an SFT stage longer than the run is an error;
one exactly as long is SFT alone (how `amft-compare` builds `sft_only`) and is warned about like the others."""

from __future__ import annotations

import warnings

import pytest
from conftest import digit_fraction_reward, make_config, make_demos, make_prompts

from amft_trl import AMFTConfig, AMFTTrainer

COVERS = r"sft_warmup_steps={w} covers the whole run of {n} optimizer steps"


@pytest.mark.parametrize("balancing", ["amft", "fixed"])
def test_the_default_warmup_over_a_short_run_warns_at_construction(tmp_path, balancing):
    """The issue's case: `AMFTConfig(output_dir=..., max_steps=20)` leaves amft / fixed at their 50-step warm-up."""
    with pytest.warns(UserWarning, match=COVERS.format(w=50, n=20) + r" \(max_steps\)"):
        AMFTConfig(
            output_dir=str(tmp_path), max_steps=20, balancing=balancing, use_cpu=True, report_to="none"
        )


@pytest.mark.parametrize("balancing", ["chord", "srft", "hpt"])
def test_a_warmup_set_over_the_whole_run_warns_for_every_strategy(tmp_path, balancing):
    with pytest.warns(UserWarning, match=COVERS.format(w=5, n=5)):
        make_config(tmp_path, balancing=balancing, sft_warmup_steps=5, max_steps=5)


@pytest.mark.parametrize(
    "balancing, warmup, steps", [("amft", 19, 20), ("fixed", 0, 3), ("sft_then_rl", 2, 3), ("hpt", 0, 1)]
)
def test_a_run_with_a_step_of_the_strategy_left_does_not_warn(tmp_path, balancing, warmup, steps):
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*covers the whole run.*")
        make_config(tmp_path, balancing=balancing, sft_warmup_steps=warmup, max_steps=steps)


def test_sft_then_rl_with_a_stage_longer_than_the_run_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=COVERS.format(w=30, n=20) + r".*SFT stage would also be cut short"):
        make_config(tmp_path, balancing="sft_then_rl", sft_warmup_steps=30, max_steps=20)


def test_sft_then_rl_as_long_as_the_run_is_sft_alone_and_warns(tmp_path):
    with pytest.warns(UserWarning, match=COVERS.format(w=20, n=20)):
        make_config(tmp_path, balancing="sft_then_rl", sft_warmup_steps=20, max_steps=20)


def _epoch_trainer(tmp_path, tiny_model_dir, tokenizer, **overrides):
    """No `max_steps`: one epoch of 8 prompts x 4 rollouts, 4 rows per step -> 8 optimizer steps, known at train()."""
    args = make_config(tmp_path, max_steps=-1, num_train_epochs=1, **overrides)
    return AMFTTrainer(
        model=tiny_model_dir,
        reward_funcs=[digit_fraction_reward],
        args=args,
        train_dataset=make_prompts(8, seed=1),
        sft_dataset=make_demos(8, seed=2),
        processing_class=tokenizer,
    )


def test_an_epoch_based_run_is_checked_at_train(tmp_path, tiny_model_dir, tokenizer):
    trainer = _epoch_trainer(tmp_path, tiny_model_dir, tokenizer, balancing="fixed", sft_warmup_steps=50)
    with pytest.warns(UserWarning, match=COVERS.format(w=50, n=8) + r" \(the run's length at train\(\): 1"):
        trainer.train()
    assert [h["amft/mu"] for h in trainer.state.log_history if "amft/mu" in h] == [1.0] * 8


def test_sft_then_rl_longer_than_an_epoch_based_run_fails_at_train_before_a_step(
    tmp_path, tiny_model_dir, tokenizer
):
    trainer = _epoch_trainer(tmp_path, tiny_model_dir, tokenizer, balancing="sft_then_rl", sft_warmup_steps=9)
    with pytest.raises(ValueError, match=COVERS.format(w=9, n=8)):
        trainer.train()
    assert trainer.state.global_step == 0


def test_a_trainer_without_args_warns_when_its_default_warmup_covers_the_run(
    tmp_path, tiny_model_dir, monkeypatch
):
    """`args=None`: TRL's defaults (3 epochs, 8 rollouts per prompt and per step) and AMFT's 50-step warm-up, on 2
    prompts: 6 optimizer steps, all of them SFT."""
    monkeypatch.chdir(tmp_path)  # the default output_dir is relative
    trainer = AMFTTrainer(
        model=tiny_model_dir,
        reward_funcs=[digit_fraction_reward],
        train_dataset=make_prompts(2, seed=1),
        sft_dataset=make_demos(8, seed=2),
        val_dataset=make_prompts(2, seed=3),
    )
    with pytest.warns(UserWarning, match=COVERS.format(w=50, n=6)):
        trainer.train()
