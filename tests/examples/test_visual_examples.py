"""`examples/train_visual_tasks.py` and its recipes (`examples/recipes/visual_*.yaml`): the CPU recipe trains
General Points-VL on the tiny offline VLM end to end and evaluates it with `amft-eval`'s gp_vl benchmarks; bad input
is one `error:` line before any model loads."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("PIL")

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "examples" / "recipes"
sys.path.insert(0, str(ROOT / "examples"))

import train_visual_tasks  # noqa: E402

from amft_trl.script_utils import parse_args  # noqa: E402


def parse(argv):
    return parse_args(train_visual_tasks.VisualTaskArguments, argv)


def test_cpu_recipe_trains_the_tiny_vlm_and_evaluates_every_split(tmp_path, capsys):
    out = tmp_path / "gp-vl"
    trainer = train_visual_tasks.main(
        *parse(["--config", str(RECIPES / "visual_general_points_cpu.yaml"), "--output_dir", str(out)])
    )
    assert trainer.state.global_step == 2
    logs = [h for h in trainer.state.log_history if "amft/mu" in h]
    assert any("amft/sft_loss" in h for h in logs)  # the card-image demonstrations trained
    # rollouts were scored by the reference verifier: a random VLM reads no cards (-1.5)
    assert [h["rewards/general_points_verifier_reward/mean"] for h in logs if "reward" in h] == [-1.5]
    results = json.loads((out / "eval" / "results.json").read_text())
    assert set(results["benchmarks"]) == {"gp_vl_id", "gp_vl_ood_rule", "gp_vl_ood_visual"}
    assert all(b["metrics"]["num_problems"] == 2 for b in results["benchmarks"].values())
    assert "8 RL prompts, 8 SFT demonstrations, 2 validation prompts" in capsys.readouterr().out


@pytest.mark.parametrize("recipe", sorted(RECIPES.glob("visual_*.yaml")), ids=lambda p: p.name)
def test_every_visual_recipe_parses(recipe, tmp_path):
    script_args, training_args, model_args = parse(
        ["--config", str(recipe), "--use_cpu", "true", "--output_dir", str(tmp_path)]
    )
    assert training_args.max_steps > training_args.sft_warmup_steps
    assert script_args.task in ("general_points", "virl")
    if recipe.name.endswith("_cpu.yaml"):
        assert script_args.tiny_vlm and model_args.model_name_or_path is None and training_args.bf16 is False
    elif script_args.task == "virl" or script_args.revision:  # TRL's multi-turn loop needs its turn budget
        assert training_args.max_tool_calling_iterations >= script_args.verify_iter


def test_paper_recipes_have_the_papers_settings(tmp_path):
    for name, verify_iter in (("visual_general_points_paper.yaml", 5), ("visual_virl_paper.yaml", 2)):
        script_args, args, model_args = parse(
            ["--config", str(RECIPES / name), "--use_cpu", "true", "--output_dir", str(tmp_path)]
        )
        assert model_args.model_name_or_path == "meta-llama/Llama-3.2-11B-Vision-Instruct"
        assert script_args.visual and script_args.verify_iter == verify_iter
        assert (args.max_steps - args.sft_warmup_steps, args.num_generations, args.beta) == (500, 8, 0.0)
        assert (args.learning_rate, args.mu_init, args.meta_update_steps) == (1e-6, 0.5, 20)


def error_line(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        train_visual_tasks.main(*parse(argv))
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1
    return lines[0]


@pytest.fixture
def no_model(monkeypatch):
    """Bad input must stop the script before any model is built."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(train_visual_tasks, "load_model", refuse)


CPU = ["--config", str(RECIPES / "visual_general_points_cpu.yaml")]


def test_bad_input_is_one_line_before_the_model_loads(no_model, tmp_path, capsys):
    out = ["--output_dir", str(tmp_path)]
    line = error_line([*CPU, *out, "--task", "virl"], capsys)
    assert "task virl needs virl_path" in line
    missing = str(tmp_path / "no-such-folder")
    line = error_line([*CPU, *out, "--task", "virl", "--virl_path", missing], capsys)
    assert f"{missing} is not a folder" in line
    assert "task must be general_points or virl" in error_line([*CPU, *out, "--task", "chess"], capsys)
    line = error_line([*CPU, *out, "--revision", "true"], capsys)
    assert "set max_tool_calling_iterations" in line


def test_virl_splits_the_data_cannot_fill_are_one_line(no_model, tmp_path, capsys):
    from _virl_fixture import write_fixture

    path = write_fixture(tmp_path / "virl", n_routes=3, vision=True)
    argv = [*CPU, "--output_dir", str(tmp_path), "--task", "virl", "--virl_path", path]
    line = error_line(argv + ["--max_tool_calling_iterations", "16"], capsys)
    assert "has 3 routes, the splits ask for 12" in line
