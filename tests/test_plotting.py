"""amft_trl.plotting: one call draws the training dynamics of a real (short) AMFT run to a PNG."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import digit_fraction_reward, make_config, make_demos, make_prompts

pytest.importorskip("matplotlib")

from amft_trl import AMFTTrainer  # noqa: E402
from amft_trl.plotting import DEFAULT_FILENAME, plot_training_dynamics  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory, tiny_model_dir):
    """A real 6-step AMFT run (1 warm-up step, meta steps every 2 mixed steps) with a checkpoint at the end."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("amft-run")
    args = make_config(
        out,
        max_steps=6,
        sft_warmup_steps=1,
        logging_steps=1,
        meta_update_steps=2,
        save_strategy="steps",
        save_steps=6,
    )
    trainer = AMFTTrainer(
        model=tiny_model_dir,
        reward_funcs=[digit_fraction_reward],
        args=args,
        train_dataset=make_prompts(32, seed=1),
        sft_dataset=make_demos(32, seed=2),
        val_dataset=make_prompts(16, seed=3),
        processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
    )
    trainer.train()
    return trainer, out


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert len(data) > 10_000, f"{path} is suspiciously small ({len(data)} bytes): an empty figure?"


def test_recorded_history_has_what_the_plot_draws(recorded_run):
    trainer, _ = recorded_run
    history = trainer.state.log_history
    keys = {key for entry in history for key in entry}
    assert {"amft/mu", "amft/entropy", "amft/target_entropy", "amft/val_reward", "reward", "step"} <= keys
    warmup = [h for h in history if "amft/mu" in h][0]
    assert "reward" not in warmup, (
        "the warm-up step logged a reward: the plot's missing-key handling is untested"
    )


def test_plot_from_log_history(recorded_run, tmp_path):
    trainer, _ = recorded_run
    path = plot_training_dynamics(
        trainer.state.log_history,
        tmp_path / "sub" / "dynamics.png",
        title="tiny model, 6 steps",
        extra={"held-out accuracy": [(0, 0.0), (3, 0.25), (6, 0.5)]},
    )
    assert path == tmp_path / "sub" / "dynamics.png"
    assert_png(path)


def test_plot_from_trainer_defaults_to_its_output_dir(recorded_run):
    trainer, out = recorded_run
    path = plot_training_dynamics(trainer)
    assert path == out / DEFAULT_FILENAME
    assert_png(path)
    path.unlink()


def test_plot_from_output_dir_reads_trainer_state(recorded_run, tmp_path):
    _, out = recorded_run
    # the latest checkpoint-* when the directory itself has no trainer_state.json
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text(json.dumps({"log_history": [{"step": 1}]}))
    shutil.copytree(out / "checkpoint-6", tmp_path / "checkpoint-6")
    assert_png(plot_training_dynamics(tmp_path))
    assert (tmp_path / DEFAULT_FILENAME).is_file()
    # the directory's own trainer_state.json wins, and a trainer_state.json path works too
    top = tmp_path / "top"
    top.mkdir()
    shutil.copy(out / "checkpoint-6" / "trainer_state.json", top / "trainer_state.json")
    assert_png(plot_training_dynamics(top))
    assert_png(plot_training_dynamics(top / "trainer_state.json", top / "from_file.png"))


def test_non_amft_history_is_refused(tmp_path):
    grpo_history = [{"step": 1, "loss": 0.1, "reward": 0.5}, {"step": 2, "loss": 0.05, "reward": 0.7}]
    with pytest.raises(ValueError, match="no amft/mu in log history: is this an AMFTTrainer run"):
        plot_training_dynamics(grpo_history, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_output_path_required_for_a_bare_history():
    with pytest.raises(ValueError, match="output_path is required"):
        plot_training_dynamics([{"step": 1, "amft/mu": 1.0}])


def test_missing_directory_state_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no trainer_state.json"):
        plot_training_dynamics(tmp_path)


def test_output_dir_without_checkpoints_says_how_to_get_the_history(recorded_run, tmp_path):
    """The CPU recipes set save_strategy 'no': the example's output directory holds the model, not the history."""
    trainer, _ = recorded_run
    out = tmp_path / "example-output"
    trainer.save_model(str(out))
    with pytest.raises(FileNotFoundError) as error:
        plot_training_dynamics(out)
    message = str(error.value)
    assert "trainer.save_state()" in message and "save_strategy" in message
    assert "plot_training_dynamics(trainer)" in message
    trainer.state.save_to_json(str(out / "trainer_state.json"))  # what trainer.save_state() writes
    assert_png(plot_training_dynamics(out))


def test_a_strategys_own_signals_are_drawn(tmp_path):
    """CHORD's schedule, HPT's fraction, SRFT's rollout weight (above 1) LUFFY's off-policy share and weight, and ReLIFT's buffer fill and SFT steps share the weights' axis; without the
    demonstrations' entropy H_t, the rollouts' entropy TRL logs fills the lower panel."""
    history = [
        {
            "step": t,
            "amft/mu": 0.1,
            "amft/chord_mu": 0.5,
            "amft/hpt_sft_fraction": 0.25,
            "amft/srft_rl_weight": 1.4,
            "amft/luffy_off_policy_fraction": 0.2,
            "amft/luffy_importance_weight": 0.03 * t,
            "amft/relift_buffer_fill": 0.25 * (t % 4),
            "amft/relift_sft_step": float(t == 4),
        }
        | {"reward": 0.1 * t, "entropy": 1.0 / t}
        for t in range(1, 6)
    ]
    path = plot_training_dynamics(history, tmp_path / "strategy.png")
    assert path.stat().st_size > 10_000
