"""The example scripts (`examples/train_math.py`, `examples/train_general_points.py`) and their recipes.

End-to-end runs use the tiny offline model and local data: each script trains a couple of steps in one process,
and the General Points script also under `accelerate launch` with 2 CPU processes. Bad input is checked in-process
(fast): it must end in one `error: ...` line, before the trainer (which loads the model) is built.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
CONFIGS = EXAMPLES / "configs"
MATH_FIXTURE = ROOT / "tests" / "fixtures" / "openr1_math_sample.jsonl"
sys.path.insert(0, str(EXAMPLES))

import train_general_points  # noqa: E402
import train_math  # noqa: E402

from amft_trl.script_utils import parse_args  # noqa: E402

# A couple of steps of the CPU recipes on the tiny model: 1 SFT warm-up step, then 1 mixed step with a meta step.
FAST = [
    "--max_steps", "2", "--sft_warmup_steps", "1", "--meta_update_steps", "1", "--max_completion_length", "8",
    "--per_device_train_batch_size", "4", "--num_generations", "4", "--max_sft_length", "1024",
    "--target_entropy_num_samples", "4", "--meta_val_batch_size", "2",
]  # fmt: skip


def _run(
    command: list[str], env_extra: dict[str, str] | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env_extra or {})}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _saved_args(output_dir: Path):
    return torch.load(output_dir / "training_args.bin", weights_only=False)


# ---------------------------------------------------------------------------------------------- end to end


def test_math_script_trains_end_to_end(tiny_model_dir, tmp_path):
    out = tmp_path / "math"
    result = _run(
        [sys.executable, "examples/train_math.py", "--config", "examples/configs/math_cpu.yaml"]
        + ["--model_name_or_path", tiny_model_dir, "--output_dir", str(out)]
        + FAST
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "6 RL prompts, 6 SFT demonstrations, 2 validation prompts" in result.stdout
    assert "Trained 2 steps" in result.stdout
    assert "amft/val_reward" in result.stdout  # the mixed step was a meta step
    assert (out / "model.safetensors").is_file()
    # the recipe sets save_strategy "no": the script still writes the log history the plot reads
    from amft_trl.plotting import plot_training_dynamics

    assert plot_training_dynamics(str(out)).is_file()
    args = _saved_args(out)
    assert args.max_steps == 2 and args.meta_update_steps == 1  # command line over the recipe
    assert args.learning_rate == 1e-5 and args.lr_scheduler_type == "constant"  # from the recipe


def test_general_points_script_trains_end_to_end(tiny_model_dir, tmp_path):
    out = tmp_path / "gp"
    result = _run(
        [
            sys.executable,
            "examples/train_general_points.py",
            "--config",
            "examples/configs/general_points_cpu.yaml",
        ]
        + ["--model_name_or_path", tiny_model_dir, "--output_dir", str(out), "--num_train", "8"]
        + ["--num_validation", "4", "--eval_strategy", "steps", "--eval_steps", "2", "--num_eval", "2"]
        + ["--per_device_eval_batch_size", "4"]
        + FAST
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "8 RL prompts, 8 SFT demonstrations, 4 validation prompts" in result.stdout
    assert "on 1 process" in result.stdout
    assert "Trained 2 steps" in result.stdout
    assert (
        "eval_id_loss" in result.stdout and "eval_ood_loss" in result.stdout
    )  # periodic evaluation, both rules
    # the final evaluation: amft_trl.evaluation on the 2 held-out hands of each rule, greedy
    final = json.loads((out / "eval" / "results.json").read_text())
    greedy = {
        name: final["benchmarks"][name]["metrics"]["greedy"]
        for name in ("general_points_id", "general_points_ood")
    }
    assert all(0.0 <= v <= 1.0 for v in greedy.values()), greedy
    assert "balancing='amft'; mu (SFT weight)" in result.stdout
    assert (out / "model.safetensors").is_file()
    # the table names the trained model (its output directory), not the model it started from
    assert final["model"] == "gp" and "| gp |" in (out / "eval" / "results.md").read_text()
    assert Path(tiny_model_dir).name not in (out / "eval" / "results.md").read_text()


@pytest.mark.parametrize(
    "script, recipe, strategy",
    [
        ("train_math.py", "math_cpu.yaml", ["--balancing", "chord", "--chord_enable_phi_function", "true"]),
        (
            "train_general_points.py",
            "general_points_cpu.yaml",
            ["--balancing", "hpt", "--eval_at_end", "false"],
        ),
        (
            "train_general_points.py",
            "general_points_cpu.yaml",
            ["--balancing", "srft", "--eval_at_end", "false"],
        ),
        (
            "train_general_points.py",
            "general_points_cpu.yaml",
            ["--balancing", "luffy", "--eval_at_end", "false"],
        ),
        (
            "train_general_points.py",
            "general_points_cpu.yaml",
            ["--balancing", "relift", "--relift_buffer_size", "2", "--eval_at_end", "false"],
        ),
    ],
    ids=[
        "math-chord-phi",
        "general-points-hpt",
        "general-points-srft",
        "general-points-luffy",
        "general-points-relift",
    ],
)
def test_scripts_run_other_strategies(tiny_model_dir, tmp_path, script, recipe, strategy):
    """`--balancing ...` is all it takes: HPT, LUFFY and ReLIFT read the RL prompts' `demonstration` column the builders
    write."""
    out = tmp_path / "run"
    result = _run(
        [sys.executable, f"examples/{script}", "--config", f"examples/configs/{recipe}"]
        + ["--model_name_or_path", tiny_model_dir, "--output_dir", str(out), *strategy]
        + FAST
        + ["--num_train", "8", "--num_validation", "4"] * (script != "train_math.py")
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"balancing={strategy[1]!r}" in result.stdout and "Trained 2 steps" in result.stdout
    assert _saved_args(out).balancing == strategy[1]
    assert result.stdout.count("'amft/mu'") == 2  # the warm-up step and the strategy's step


@pytest.mark.slow
def test_general_points_script_under_accelerate_launch_two_cpu_processes(tiny_model_dir, tmp_path):
    out = tmp_path / "gp2"
    accelerate = Path(sys.executable).with_name("accelerate")
    result = _run(
        [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
        + ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
        + ["examples/train_general_points.py", "--config", "examples/configs/general_points_cpu.yaml"]
        + [
            "--model_name_or_path",
            tiny_model_dir,
            "--output_dir",
            str(out),
            "--num_train",
            "8",
            "--num_validation",
            "4",
        ]
        + FAST,
        env_extra={"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 processes" in result.stdout
    assert "Trained 2 steps" in result.stdout
    assert (out / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------- recipes


RECIPES = sorted(CONFIGS.glob("*.yaml"))


def _script_for(recipe: Path):
    return train_math if recipe.name.startswith("math") else train_general_points


def _parse(module, argv):
    script_class = (
        train_math.MathScriptArguments
        if module is train_math
        else train_general_points.GeneralPointsArguments
    )
    return parse_args(script_class, argv)


def test_recipes_exist():
    names = {recipe.name for recipe in RECIPES}
    assert {"math_paper.yaml", "math_1gpu.yaml", "math_cpu.yaml", "general_points_cpu.yaml"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_parses_into_valid_configs(recipe, tmp_path):
    # GPU recipes are parsed with use_cpu so that bf16 validates here; everything else is the recipe's.
    script_args, training_args, model_args = _parse(
        _script_for(recipe), ["--config", str(recipe), "--use_cpu", "true", "--output_dir", str(tmp_path)]
    )
    assert training_args.max_steps > training_args.sft_warmup_steps
    assert training_args.report_to in ([], "none", ["none"])
    if recipe.name.endswith("_cpu.yaml"):
        assert model_args.model_name_or_path is None  # the embedded default model
        assert training_args.bf16 is False


def test_paper_recipe_has_the_papers_hyperparameters(tmp_path):
    script_args, args, model_args = _parse(
        train_math,
        ["--config", str(CONFIGS / "math_paper.yaml"), "--use_cpu", "true", "--output_dir", str(tmp_path)],
    )
    # Table 6
    assert model_args.model_name_or_path == "Qwen/Qwen2.5-Math-7B"
    assert (args.adam_beta1, args.adam_beta2, args.adam_epsilon) == (0.9, 0.95, 1e-8)
    assert (args.learning_rate, args.weight_decay, args.warmup_steps) == (1e-6, 0.1, 0.1)
    assert args.lr_scheduler_type == "cosine" and args.optim == "adamw_torch"
    assert args.sft_warmup_steps == 50 and args.max_steps == 550  # W = 50, then T = 500
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (4, 4)
    assert args.bf16 and model_args.dtype == "bfloat16"
    assert args.max_completion_length == 8192 and args.max_sft_length == 8192
    # Table 7
    assert (args.mu_init, args.mu_min, args.mu_max) == (0.5, 0.05, 0.95)
    assert args.meta_gradient_form == "raw" and args.meta_learning_rate == 1e-4
    assert args.entropy_learning_rate == 5e-4 and args.meta_update_steps == 20 and args.target_entropy is None
    # Text: 8 rollouts per prompt, no KL, vLLM, OpenR1-Math-46k-8192
    assert args.num_generations == 8 and args.beta == 0.0 and args.use_vllm
    assert script_args.dataset_name == "Elliott/Openr1-Math-46k-8192"
    # Global batch 128 on the 8 processes of the ZeRO-3 accelerate config
    from accelerate.commands.config.config_args import load_config_from_file

    zero3 = load_config_from_file(str(EXAMPLES / "accelerate_configs" / "deepspeed_zero3.yaml"))
    assert zero3.deepspeed_config["zero_stage"] == 3
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps * zero3.num_processes == 128


def test_accelerate_configs_load():
    from accelerate.commands.config.config_args import load_config_from_file

    loaded = {p.name: load_config_from_file(str(p)) for p in (EXAMPLES / "accelerate_configs").glob("*.yaml")}
    assert loaded["multi_gpu.yaml"].distributed_type == "MULTI_GPU"
    assert loaded["deepspeed_zero2.yaml"].deepspeed_config["zero_stage"] == 2
    assert loaded["deepspeed_zero3.yaml"].deepspeed_config["zero_stage"] == 3


def test_every_field_can_be_overridden_on_the_command_line(tmp_path):
    recipe = str(CONFIGS / "general_points_cpu.yaml")

    def values(parsed):
        script_args, args, model_args = parsed
        return script_args.num_cards, args.learning_rate, args.sft_warmup_steps, model_args.lora_r

    assert values(_parse(train_general_points, ["--config", recipe])) == (
        3,
        1e-5,
        2,
        16,
    )  # recipe and defaults
    script_args, args, model_args = parsed = _parse(
        train_general_points,
        ["--config", recipe, "--num_cards", "4", "--learning_rate", "0.5", "--sft_warmup_steps", "0"]
        + ["--lora_r", "4", "--model_name_or_path", "some/model", "--output_dir", str(tmp_path)],
    )
    assert values(parsed) == (4, 0.5, 0, 4)
    assert model_args.model_name_or_path == "some/model" and args.output_dir == str(tmp_path)
    assert script_args.target == 10 and args.max_steps == 5  # untouched recipe values stay


# ---------------------------------------------------------------------------------------------- bad input


@pytest.fixture
def no_trainer(monkeypatch):
    """Loading the model fails the test: errors must come before it. The scripts leave to `AMFTTrainer` the checks
    it makes at construction, before `GRPOTrainer.__init__` loads the model; that is where this refuses."""
    from trl import GRPOTrainer

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(GRPOTrainer, "__init__", refuse)


def _error_line(module, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        module.main(*_parse(module, argv))
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, lines
    return lines[0]


def _math_argv(tiny_model_dir, tmp_path, *extra: str) -> list[str]:
    return [
        "--config", str(CONFIGS / "math_cpu.yaml"), "--model_name_or_path", tiny_model_dir,
        "--dataset_name", str(MATH_FIXTURE), "--output_dir", str(tmp_path / "out"), *extra,
    ]  # fmt: skip


def test_missing_model_path(no_trainer, tmp_path, capsys):
    missing = str(tmp_path / "no-such-model")
    line = _error_line(
        train_math, ["--config", str(CONFIGS / "math_cpu.yaml"), "--model_name_or_path", missing], capsys
    )
    assert missing in line and "does not exist" in line


def test_missing_dataset_file(no_trainer, tiny_model_dir, tmp_path, capsys):
    missing = str(tmp_path / "nope.jsonl")
    line = _error_line(train_math, _math_argv(tiny_model_dir, tmp_path, "--dataset_name", missing), capsys)
    assert line == f"error: dataset_name: the dataset file {missing!r} does not exist"
    line = _error_line(
        train_math,
        _math_argv(tiny_model_dir, tmp_path, "--validation_dataset_name", "data/val.parquet"),
        capsys,
    )
    assert "validation_dataset_name" in line and "'data/val.parquet' does not exist" in line


def test_unreadable_dataset_file(no_trainer, tiny_model_dir, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.jsonl"
    corrupt.write_text('{"problem": "1+1", "solution": "\\\\boxed{2}"}\n{"problem": oops\n')
    line = _error_line(
        train_math, _math_argv(tiny_model_dir, tmp_path, "--dataset_name", str(corrupt)), capsys
    )
    assert line.startswith(f"error: dataset_name: cannot read the dataset {str(corrupt)!r}")
    assert "JSON" in line


def test_unknown_recipe_key(no_trainer, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text((CONFIGS / "math_cpu.yaml").read_text() + "\nlearning_rat: 0.1\nnum_epochz: 2\n")
    line = _error_line(train_math, ["--config", str(recipe)], capsys)
    assert "unknown key(s) 'learning_rat', 'num_epochz'" in line and str(recipe) in line


def test_unknown_command_line_argument_and_bad_value(no_trainer, capsys):
    line = _error_line(
        train_math, ["--config", str(CONFIGS / "math_cpu.yaml"), "--learning_rat", "1"], capsys
    )
    assert line == "error: unknown command-line argument(s): --learning_rat 1"
    line = _error_line(
        train_math, ["--config", str(CONFIGS / "math_cpu.yaml"), "--mu_min", "0.9", "--mu_max", "0.2"], capsys
    )
    assert "`mu_min` (0.9) must not exceed `mu_max` (0.2)" in line
    # the recipe is valid: the command line is blamed, not the recipe file
    assert line.startswith("error: invalid value(s) on the command line (--mu_min 0.9 --mu_max 0.2)")
    assert "math_cpu.yaml" not in line


def test_an_invalid_value_in_the_recipe_is_blamed_on_the_recipe(no_trainer, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text((CONFIGS / "math_cpu.yaml").read_text() + "\nmu_min: 0.9\nmu_max: 0.2\n")
    for extra in ([], ["--learning_rate", "0.1"]):  # a valid override does not move the blame
        line = _error_line(train_math, ["--config", str(recipe), *extra], capsys)
        assert (
            line.startswith(f"error: recipe {str(recipe)!r}: ") and "must not exceed `mu_max` (0.2)" in line
        )


def test_a_deepspeed_config_without_deepspeed_names_the_extra(
    no_trainer, monkeypatch, tmp_path, capsys, request
):
    import importlib.metadata

    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    # transformers registers its DeepSpeed config globally before finding DeepSpeed missing: unregister it, or
    # later tests would load models as if under ZeRO.
    request.addfinalizer(unset_hf_deepspeed_config)
    real_version = importlib.metadata.version

    def version(name):
        if name.lower() == "deepspeed":
            raise importlib.metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    config = tmp_path / "ds.json"
    config.write_text(
        json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto"})
    )
    recipe = ["--config", str(CONFIGS / "math_cpu.yaml"), "--output_dir", str(tmp_path / "out")]
    line = _error_line(train_math, [*recipe, "--deepspeed", str(config)], capsys)
    assert (
        line.startswith("error: DeepSpeed is not installed") and "pip install 'amft-trl[deepspeed]'" in line
    )
    monkeypatch.setenv(
        "ACCELERATE_USE_DEEPSPEED", "true"
    )  # what `accelerate launch` with a DeepSpeed config sets
    line = _error_line(train_general_points, ["--config", str(CONFIGS / "general_points_cpu.yaml")], capsys)
    assert (
        line.startswith("error: DeepSpeed is not installed") and "pip install 'amft-trl[deepspeed]'" in line
    )


def test_a_max_sft_length_that_drops_every_demonstration_is_one_line(tiny_model_dir, tmp_path, capsys):
    """Only the trainer (with the tokenizer) can tell: the error comes from its construction, still as one line."""
    line = _error_line(train_math, _math_argv(tiny_model_dir, tmp_path, "--max_sft_length", "2"), capsys)
    assert line.startswith("error: `sft_dataset`: all 6 demonstrations lose their whole completion")
    assert "max_sft_length=2" in line


def test_missing_recipe_file(no_trainer, tmp_path, capsys):
    line = _error_line(train_math, ["--config", str(tmp_path / "nope.yaml")], capsys)
    assert line == f"error: recipe file {str(tmp_path / 'nope.yaml')!r} does not exist"


def test_dataset_without_the_columns_the_data_needs(no_trainer, tiny_model_dir, tmp_path, capsys):
    questions = tmp_path / "questions.jsonl"
    questions.write_text(
        "".join(json.dumps({"question": f"{i}+1?", "answer": str(i + 1)}) + "\n" for i in range(8))
    )
    line = _error_line(
        train_math, _math_argv(tiny_model_dir, tmp_path, "--dataset_name", str(questions)), capsys
    )
    assert "missing the column 'problem'" in line and "'question'" in line


def test_dataset_without_the_columns_a_reward_reads(no_trainer, tiny_model_dir, tmp_path, capsys):
    line = _error_line(
        train_math,
        _math_argv(tiny_model_dir, tmp_path, "--reward_funcs", "amft_trl.rewards.multiple_choice_reward"),
        capsys,
    )
    assert (
        "`train_dataset` has no column(s) ['answer'], which the reward function 'multiple_choice_reward'"
        in line
    )
    assert "`val_dataset` has no column(s) ['answer']" in line
    line = _error_line(
        train_general_points,
        ["--config", str(CONFIGS / "general_points_cpu.yaml"), "--model_name_or_path", tiny_model_dir]
        + ["--reward_funcs", "math_accuracy_reward"],
        capsys,
    )
    assert "unknown reward 'math_accuracy_reward'" in line
    line = _error_line(
        train_general_points,
        ["--config", str(CONFIGS / "general_points_cpu.yaml"), "--model_name_or_path", tiny_model_dir]
        + ["--reward_funcs", "amft_trl.rewards.math_accuracy_reward"],
        capsys,
    )
    assert (
        "`train_dataset` has no column(s) ['solution'], which the reward function 'math_accuracy_reward'"
        in line
    )
    assert "`eval_dataset['ood']` has no column(s) ['solution']" in line  # the held-out hands (eval_at_end)


def test_general_points_task_options_that_cannot_be_dealt(no_trainer, tiny_model_dir, capsys):
    line = _error_line(
        train_general_points,
        ["--config", str(CONFIGS / "general_points_cpu.yaml"), "--model_name_or_path", tiny_model_dir]
        + ["--num_cards", "9"],
        capsys,
    )
    assert "num_cards must be between 1 and 5, got 9" in line


def test_errors_from_the_command_line_are_one_line_without_traceback(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text((CONFIGS / "math_cpu.yaml").read_text() + "\nnot_a_field: 1\n")
    result = _run([sys.executable, "examples/train_math.py", "--config", str(recipe)], timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: unknown key(s) 'not_a_field'")
