"""`examples/demo.py` (what `make demo` runs): its task helpers, and the whole pipeline on the tiny model.

The real demo (SmolLM2-135M, several minutes) is not run here; `--tiny` runs the same code path (task, greedy
evaluation, AMFT training with warm-up, mixed and meta steps, metrics.json, plot, summary) on the offline tiny
random model in a few seconds.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))

import demo  # noqa: E402

from amft_trl.tasks import general_points as gp  # noqa: E402

SUMMARY_KEYS = {"reward", "mu", "entropy", "id_accuracy", "ood_accuracy"}


@pytest.fixture(scope="module")
def task():
    return demo.build_task(num_train=16, num_val=8, num_eval=8)


def test_demonstrations_are_correct_answers(task):
    rl, sft = task["rl"], task["sft"]
    assert list(sft["prompt"]) == list(rl["prompt"])
    rewards = gp.general_points_reward(
        list(sft["completion"]), cards=rl["cards"], face_card_rule=rl["face_card_rule"], target=rl["target"]
    )
    assert rewards == [1.0] * len(rl)


def test_held_out_sets_are_disjoint_from_training(task):
    def value_sets(dataset):
        return {tuple(sorted(gp.hand_values(h, "id"))) for h in dataset["cards"]}

    train = value_sets(task["rl"])
    for name in ("validation", "eval_id", "eval_ood"):
        assert not train & value_sets(task[name]), name
    assert set(task["eval_ood"]["face_card_rule"]) == {"ood"}
    assert set(task["eval_id"]["face_card_rule"]) == {"id"}


def test_prompts_state_the_rule_and_target():
    cards = ["3", "K", "2"]
    assert "J, Q, K = 10" in demo.prompt(cards, "id")
    assert "11, 12, 13" in demo.prompt(cards, "ood")
    assert f"Make {demo.TARGET}" in demo.prompt(cards, "id")
    assert json.loads(demo.answer(["5", "3", "2"], "id"))["formula"].endswith(f"={demo.TARGET}")


def test_tiny_demo_end_to_end(tmp_path, capsys):
    demo.main(["--tiny", "--output-dir", str(tmp_path)])
    out = capsys.readouterr().out

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for phase in ("before", "after"):
        assert SUMMARY_KEYS <= set(metrics[phase]), metrics[phase]
        for key in ("id_accuracy", "ood_accuracy"):
            assert 0.0 <= metrics[phase][key] <= 1.0
    settings = metrics["settings"]
    assert settings["sft_warmup_steps"] < settings["max_steps"]
    logged_steps = {h["step"] for h in metrics["log_history"] if "amft/mu" in h}
    assert logged_steps == set(range(1, settings["max_steps"] + 1))
    assert any("reward" in h for h in metrics["log_history"])  # a mixed step ran
    assert any("amft/val_reward" in h for h in metrics["log_history"])  # and a meta step
    assert len(metrics["timings_s"]["steps"]) == settings["max_steps"]
    assert metrics["before"]["mu"] == settings["mu_init"]

    plot = tmp_path / "training_dynamics.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(tmp_path / "metrics.json") in out and str(plot) in out
    assert "held-out ID accuracy" in out and "held-out OOD accuracy" in out
