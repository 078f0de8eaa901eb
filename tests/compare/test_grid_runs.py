"""The comparison runner (`amft_trl.compare`): statistics by hand, bad grids, the CI smoke grid end to end, resume."""

from __future__ import annotations

import copy
import csv
import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch

from amft_trl.compare import METHODS, GridError, grid_tasks, load_grid, parse_grid, run_grid
from amft_trl.compare import runs as runs_module
from amft_trl.compare.cli import main as compare_main
from amft_trl.compare.stats import mean_interval, paired_difference

# ------------------------------------------------------------------------------------------------ statistics

T_975_DOF2 = 4.302652729749464  # Student-t 97.5% quantile, 2 degrees of freedom (tables)
T_975_DOF4 = 2.776445105197793


def test_mean_interval_against_hand_computation():
    iv = mean_interval([0.2, 0.4, 0.6])
    # mean 0.4; s = sqrt((0.04 + 0 + 0.04) / 2) = 0.2; half width = t * s / sqrt(3)
    half = T_975_DOF2 * 0.2 / math.sqrt(3)
    assert iv.n == 3 and iv.mean == pytest.approx(0.4)
    assert iv.std == pytest.approx(0.2)
    assert (iv.low, iv.high) == pytest.approx((0.4 - half, 0.4 + half))
    assert half == pytest.approx(0.496827, abs=1e-6)

    five = mean_interval([1.0, 2.0, 3.0, 4.0, 5.0])  # s = sqrt(2.5)
    assert five.half_width == pytest.approx(T_975_DOF4 * math.sqrt(2.5) / math.sqrt(5))

    one = mean_interval([0.3])
    assert one.mean == 0.3 and math.isnan(one.low) and math.isnan(one.high) and not one.excludes_zero()
    assert mean_interval([]).n == 0


def test_paired_difference_against_hand_computation():
    method = {0: 0.5, 1: 0.7, 2: 0.4}
    reference = {0: 0.3, 1: 0.4, 2: 0.4, 3: 0.9}  # seed 3 has no partner: left out
    diff = paired_difference(method, reference)
    # differences 0.2, 0.3, 0.0: mean 1/6; s^2 = ((1/30)^2 + (2/15)^2 + (1/6)^2) / 2 = 7/300
    s = math.sqrt(7 / 300)
    assert diff.n == 3 and diff.mean == pytest.approx(1 / 6)
    assert diff.std == pytest.approx(s)
    assert diff.half_width == pytest.approx(T_975_DOF2 * s / math.sqrt(3))
    assert not diff.excludes_zero()  # 0.167 +- 0.379
    assert paired_difference({0: 0.9, 1: 0.8, 2: 0.85}, {0: 0.1, 1: 0.15, 2: 0.1}).excludes_zero()


# ------------------------------------------------------------------------------------------------ grids

SMOKE = {
    "name": "ci-smoke",
    "task": "toy_addition",
    "task_options": {"pretrain_steps": 20, "num_test": 12, "num_ood": 12, "num_val": 8},
    "model": "toy",
    "seeds": [0, 1],
    "budget": {"max_steps": 4, "sft_steps": 2, "warmup_steps": 1, "eval_every": 2},
    "checkpoint_every": 2,
    "training": {
        "learning_rate": 1.0e-3,
        "lr_scheduler_type": "constant",
        "per_device_train_batch_size": 8,
        "num_generations": 4,
        "max_completion_length": 6,
        "sft_per_device_train_batch_size": 8,
        "meta_update_steps": 2,
        "meta_val_batch_size": 4,
    },
    "methods": ["two_stage", "amft"],
}


def _grid(**changes):
    raw = copy.deepcopy(SMOKE)
    raw.update(changes)
    return raw


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"methods": ["two_stage", "magic"]}, "unknown method 'magic'"),
        ({"training": {"learning_rte": 1.0}}, "`training.learning_rte` is not an AMFTConfig field"),
        ({"methods": {"fixed": {"args": {"mu": 0.3}}}}, "`methods.fixed.args.mu` is not an AMFTConfig field"),
        (
            {"methods": {"fixed": {"tune": {"mu_init": []}}}},
            "`methods.fixed.tune.mu_init` must be a non-empty list",
        ),
        (
            {"methods": {"two_stage": {"tune": {"sft_learning_rate": [1e-3]}}}, "tuning": {"max_steps": 2}},
            "`tuning.max_steps` = 2 must exceed budget.sft_steps",
        ),
        ({"training": {"max_steps": 9}}, "`training.max_steps` is set by the runner"),
        ({"seeds": [0, 0]}, "`seeds` repeats a seed"),
        ({"seeds": []}, "`seeds` must be a non-empty list"),
        (
            {"budget": {"max_steps": 4, "sft_steps": 4}},
            "`budget.sft_steps` = 4 must be < budget.max_steps = 4",
        ),
        ({"budget": {"sft_steps": 1}}, "`budget.max_steps` is required"),
        ({"task": "chess"}, "unknown task 'chess'"),
        ({"task_options": {"pretrain": 3}}, "unknown option(s) ['pretrain']"),
        ({"learning_rate": 3}, "unknown grid entry 'learning_rate'"),
        ({"reference": "fixed"}, "`reference` = 'fixed' must be one of the grid's methods"),
    ],
)
def test_bad_grid_is_named(changes, message):
    with pytest.raises(GridError) as error:
        parse_grid(_grid(**changes))
    assert message in str(error.value)


class _NoDemos(grid_tasks.ToyAddition):
    name = "toy_no_demos"

    def build(self):
        data = super().build()
        data.sft = None
        data.train = data.train.remove_columns("demonstration")
        return data


@pytest.mark.parametrize(
    "method, message",
    [
        ("sft_only", "method 'sft_only' trains on demonstrations, but task 'toy_no_demos' has none"),
        ("hpt", "method 'hpt' reads one demonstration per RL prompt"),
    ],
)
def test_task_without_demonstrations_is_refused(monkeypatch, tmp_path, method, message):
    monkeypatch.setitem(grid_tasks.TASKS, "toy_no_demos", _NoDemos)
    grid = parse_grid(_grid(task="toy_no_demos", methods=["grpo_only", method]))
    with pytest.raises(GridError, match=message):
        run_grid(grid, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_budgets_that_do_not_fit_the_data(tmp_path):
    small = {
        "max_operand": 3,
        "num_val": 2,
        "num_test": 4,
        "pretrain_steps": 0,
    }  # 16 pairs: 10 training prompts
    grid = parse_grid(
        _grid(task_options=small, training={**SMOKE["training"], "per_device_train_batch_size": 48})
    )
    with pytest.raises(GridError, match="a step needs 12 RL prompts but the task has 10"):
        run_grid(grid, tmp_path / "a", progress=False)
    grid = parse_grid(_grid(task_options=small))
    with pytest.raises(GridError, match="meta_val_batch_size = 4 exceeds the 2 validation prompts"):
        run_grid(grid, tmp_path / "b", progress=False)
    grid = parse_grid(_grid(training={**SMOKE["training"], "num_generations": 3}))
    with pytest.raises(GridError, match="method 'two_stage'"):  # TRL's own check, named with the method
        run_grid(grid, tmp_path / "c", progress=False)


def test_started_in_several_processes_is_refused(monkeypatch, tmp_path):
    # under `accelerate launch` / torchrun every process would train the same runs and write the same files
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(GridError, match=r"started in 2 \(WORLD_SIZE=2"):
        run_grid(parse_grid(_grid()), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_bad_grid_is_one_line(tmp_path, capsys):
    path = tmp_path / "grid.yaml"
    path.write_text(
        "task: toy_addition\nseeds: [0]\nbudget: {max_steps: 4}\nmethods: [sft_only, gpro_only]\n"
    )
    assert compare_main([str(path), "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown method 'gpro_only'" in err
    assert compare_main([str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ the CI smoke grid


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "smoke"
    path = out.parent / "smoke.yaml"
    import yaml

    path.write_text(yaml.safe_dump(SMOKE))
    assert compare_main([str(path), "--output-dir", str(out), "--no-progress"]) == 0
    return out, path


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_smoke_grid_end_to_end(smoke):
    out, _ = smoke
    for name in (
        "table.md",
        "results.csv",
        "runs.csv",
        "accuracy_vs_steps.png",
        "accuracy_vs_compute.png",
        "sft_weight.png",
        "reward.png",
        "base_eval.json",
        "grid.yaml",
    ):
        assert (out / name).is_file(), name
    rows = _rows(out / "results.csv")
    assert {(r["method"], r["eval_set"]) for r in rows} == {
        (m, s) for m in ("two_stage", "amft") for s in ("addition_id", "addition_ood")
    }
    runs = {(r["method"], int(r["seed"])): r for r in _rows(out / "runs.csv")}
    assert set(runs) == {(m, s) for m in ("two_stage", "amft") for s in (0, 1)}
    for row in rows:  # the table's numbers are the statistics of the per-run numbers
        scores = [float(runs[(row["method"], s)][row["eval_set"]]) for s in (0, 1)]
        assert float(row["seeds"]) == 2 and float(row["mean"]) == pytest.approx(sum(scores) / 2)
        iv = mean_interval(scores)
        if math.isfinite(iv.low):
            assert float(row["ci_low"]) == pytest.approx(iv.low)
        if row["method"] == "amft":
            ref = [float(runs[("two_stage", s)][row["eval_set"]]) for s in (0, 1)]
            assert float(row["diff_vs_reference"]) == pytest.approx(
                (scores[0] - ref[0] + scores[1] - ref[1]) / 2
            )
    table = (out / "table.md").read_text()
    assert "| `amft` |" in table and "| `two_stage` |" in table and "Δ addition_id" in table

    for seed in (0, 1):
        amft = json.loads((out / "runs" / "amft" / f"seed-{seed}" / "result.json").read_text())
        two = json.loads((out / "runs" / "two_stage" / f"seed-{seed}" / "result.json").read_text())
        # budgets are measured: AMFT's meta steps generate validation rollouts, the two-stage pipeline none
        assert amft["spent"]["generated_tokens"] > 0 and amft["spent"]["validation_generated_tokens"] > 0
        assert two["spent"]["generated_tokens"] > 0 and two["spent"]["validation_generated_tokens"] == 0
        assert amft["spent"]["sft_tokens"] > 0 and two["spent"]["sft_tokens"] > 0
        assert amft["optimizer_steps"] == two["optimizer_steps"] == 4
        assert [e["step"] for e in amft["evals"]] == [2] and [e["step"] for e in two["evals"]] == [2]
        assert amft["series"]["step"] == [1, 2, 3, 4] and amft["series"]["mu"][0] == 1.0  # warm-up step
        assert two["series"]["mu"] == [1.0, 1.0, 0.0, 0.0]
        assert not (
            out / "runs" / "amft" / f"seed-{seed}" / "train"
        ).exists()  # checkpoints removed when done


def test_smoke_grid_budgets_are_the_recorded_ones(smoke):
    """The token budgets of every run and periodic evaluation, equal to those recorded (CPU, torch 2.13) before
    `AMFTTrainer` logged its own token counts and the runner stopped subclassing its private methods to count them.
    A trainer change that moves them changes what the comparison publishes."""
    out, _ = smoke
    recorded = json.loads((FIXTURES / "compare_smoke_budgets.json").read_text())
    found = {}
    for method in SMOKE["methods"]:
        for seed in SMOKE["seeds"]:
            result = json.loads((out / "runs" / method / f"seed-{seed}" / "result.json").read_text())
            tokens = {k: v for k, v in result["spent"].items() if k != "wall_seconds"}
            evals = [
                {"step": e["step"], **{k: v for k, v in e["spent"].items() if k != "wall_seconds"}}
                for e in result["evals"]
            ]
            found[f"{method}/seed-{seed}"] = {"spent": tokens, "evals": evals}
    assert found == recorded


def test_starting_model_reloads_with_the_tokenizer_it_was_trained_with(smoke):
    from amft_trl import toy

    out, _ = smoke
    model, tokenizer = runs_module.load_model(str(out / "base_model"))
    text = "Compute 13 + 4 = 17. The answer is 17."
    assert tokenizer(text)["input_ids"] == toy.build_tokenizer()(text)["input_ids"]


def test_two_stage_is_trl_sft_then_grpo_from_its_final_weights(smoke):
    out, _ = smoke
    from transformers import AutoModelForCausalLM

    base = runs_module.parameter_checksum(AutoModelForCausalLM.from_pretrained(out / "base_model"))
    for seed in (0, 1):
        stage = json.loads((out / "runs" / "two_stage" / f"seed-{seed}" / "result.json").read_text())[
            "two_stage"
        ]
        assert stage["sft_trainer"] == "SFTTrainer" and stage["rl_trainer"] == "GRPOTrainer"
        assert stage["sft_steps"] == 2 and stage["rl_steps"] == 2
        # the SFT stage moved the weights, and the RL stage starts from exactly where it ended
        assert stage["rl_start_checksum"] == stage["sft_final_checksum"] != base


def test_finished_grid_is_skipped_and_never_overwritten(smoke, tmp_path):
    out, path = smoke
    result = out / "runs" / "amft" / "seed-0" / "result.json"
    before = result.stat().st_mtime_ns
    run_grid(load_grid(path), out, progress=False)  # everything finished: nothing runs again
    assert result.stat().st_mtime_ns == before
    other = parse_grid(_grid(seeds=[5]))
    with pytest.raises(GridError, match="holds the results of a different grid"):
        run_grid(other, out, progress=False)
    assert result.exists()


class _TrainerWarnings(logging.Handler):
    """What transformers' Trainer logs (its logger does not propagate to pytest's caplog)."""

    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        logging.getLogger("transformers.trainer").addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("transformers.trainer").removeHandler(self)


def test_interrupted_grid_resumes_to_the_same_result(tmp_path, monkeypatch):
    grid = parse_grid(_grid(methods=["amft"], budget={"max_steps": 4, "warmup_steps": 1, "eval_every": 2}))
    straight = run_grid(grid, tmp_path / "straight", progress=False)

    original = runs_module._Recorder.on_step_end

    def interrupt(self, args, state, control, **kwargs):
        original(self, args, state, control, **kwargs)
        if self.run.seed == 1 and state.global_step == 3:
            raise KeyboardInterrupt("stopped by the test")

    monkeypatch.setattr(runs_module._Recorder, "on_step_end", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_grid(grid, tmp_path / "resumed", progress=False)
    half = tmp_path / "resumed" / "runs" / "amft"
    assert (half / "seed-0" / "result.json").exists() and not (half / "seed-1" / "result.json").exists()
    assert (half / "seed-1" / "train" / "checkpoint-2").is_dir()
    monkeypatch.setattr(runs_module._Recorder, "on_step_end", original)
    warnings = _TrainerWarnings()
    with warnings:
        run_grid(grid, tmp_path / "resumed", progress=False)
    # the toy model ties lm_head to the embedding, saved once: resuming must not warn that lm_head.weight is missing
    assert not [m for m in warnings.messages if "missing keys" in m]  # (the handler sees it without the fix)

    for seed in (0, 1):
        a = json.loads((straight / "runs" / "amft" / f"seed-{seed}" / "result.json").read_text())
        b = json.loads((half / f"seed-{seed}" / "result.json").read_text())
        assert b["checksum"] == a["checksum"]  # bit-identical weights after resuming from checkpoint-2
        assert b["final"] == a["final"] and b["evals"][0]["scores"] == a["evals"][0]["scores"]
        for key in ("generated_tokens", "validation_generated_tokens", "sft_tokens"):
            assert b["spent"][key] == a["spent"][key], key
        assert b["series"]["mu"] == pytest.approx(a["series"]["mu"], rel=1e-9)


def test_determinism_evaluating_does_not_change_training(tmp_path):
    """Periodic evaluation runs inside training: it must leave the run's random streams alone."""
    every_two = parse_grid(_grid(methods=["grpo_only"], seeds=[0], budget={"max_steps": 4, "eval_every": 2}))
    at_end = parse_grid(_grid(methods=["grpo_only"], seeds=[0], budget={"max_steps": 4, "eval_every": 4}))
    a = run_grid(every_two, tmp_path / "a", progress=False) / "runs" / "grpo_only" / "seed-0" / "result.json"
    b = run_grid(at_end, tmp_path / "b", progress=False) / "runs" / "grpo_only" / "seed-0" / "result.json"
    a, b = json.loads(a.read_text()), json.loads(b.read_text())
    assert [e["step"] for e in a["evals"]] == [2] and b["evals"] == []
    assert a["checksum"] == b["checksum"]


# ------------------------------------------------------------------------------------------------ the GPU recipe

FIXTURES = Path(__file__).parents[1] / "fixtures"
RECIPE = Path(__file__).parents[2] / "benchmarks" / "grids" / "math_gpu.yaml"


def test_gpu_recipe_is_a_valid_grid():
    grid = load_grid(RECIPE)
    assert grid.model == "Qwen/Qwen2.5-Math-1.5B" and grid.task == "math"
    assert grid.task_options["dataset"] == "Elliott/Openr1-Math-46k-8192"
    assert grid.task_options["benchmarks"] == "math,ood"
    assert set(grid.methods) == set(METHODS)  # every method, the reference included
    assert all(entry.trials for entry in grid.methods.values())  # every method tuned, 3 trials each
    assert {len(entry.trials) for entry in grid.methods.values()} == {3}


def test_gpu_recipe_smoke_on_the_tiny_model(tmp_path):
    """The recipe as written, made tiny: the toy model, a local slice of the data, local copies of the benchmarks."""
    import yaml

    raw = yaml.safe_load(RECIPE.read_text())
    raw["model"] = "toy"
    raw["seeds"] = [0]
    raw["task_options"].update(
        dataset=str(FIXTURES / "openr1_math_sample.jsonl"),
        validation_size=2,
        max_new_tokens=8,
        benchmarks=f"math500={FIXTURES / 'eval' / 'math500.jsonl'},arc_c={FIXTURES / 'eval' / 'arc_c.jsonl'}",
    )
    raw["budget"] = {"max_steps": 3, "sft_steps": 1, "warmup_steps": 1, "eval_every": 3}
    raw["evaluation"] = {"num_samples": 0, "backend": "transformers"}
    for key in ("use_vllm", "vllm_mode", "vllm_gpu_memory_utilization", "bf16", "gradient_checkpointing"):
        raw["training"].pop(key)
    raw["training"].update(
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        num_generations=2,
        sft_per_device_train_batch_size=2,
        max_completion_length=8,
        max_sft_length=128,
    )
    raw["methods"] = {
        m: {"args": raw["methods"][m].get("args", {})}
        for m in ("two_stage", "amft", "hpt", "luffy", "relift")
    }
    raw["methods"]["amft"]["args"].update(meta_update_steps=1, meta_val_batch_size=2)
    out = run_grid(parse_grid(raw), tmp_path / "math", progress=False)
    rows = _rows(out / "results.csv")
    assert {(r["method"], r["eval_set"], r["group"]) for r in rows} == {
        (m, s, g)
        for m in ("two_stage", "amft", "hpt", "luffy", "relift")
        for s, g in (("math500", "ID"), ("arc_c", "OOD"))
    }


def test_tuning_scores_the_validation_split_only(tmp_path):
    grid = parse_grid(
        _grid(
            methods={"grpo_only": {"tune": {"learning_rate": [1.0e-2, 1.0e-4]}}, "sft_only": {}},
            seeds=[0],
            budget={"max_steps": 2, "eval_every": 1},
            tuning={"seed": 7, "max_steps": 2},
        )
    )
    with pytest.raises(GridError, match=r"--methods: \['fixed'\] are not methods of this grid"):
        run_grid(grid, tmp_path / "tuned", progress=False, methods=["fixed"])
    out = run_grid(grid, tmp_path / "tuned", progress=False, methods=["grpo_only"])
    assert not (out / "runs" / "sft_only").exists()  # --methods: only the named ones run
    choice = json.loads((out / "tuning" / "grpo_only" / "choice.json").read_text())
    trials = [
        json.loads((out / "tuning" / "grpo_only" / f"trial-{i}" / "result.json").read_text()) for i in (0, 1)
    ]
    for trial in trials:
        assert trial["final"] == {} and trial["evals"] == []  # the test sets are never looked at
        assert trial["seed"] == 7 and 0.0 <= trial["val"] <= 1.0
    assert choice["val_scores"] == [t["val"] for t in trials]
    best = max(range(2), key=lambda i: (choice["val_scores"][i], -i))
    assert choice["chosen"] == choice["trials"][best]
    run = json.loads((out / "runs" / "grpo_only" / "seed-0" / "result.json").read_text())
    assert run["settings"]["learning_rate"] == choice["chosen"]["learning_rate"] and run["final"]
    assert json.dumps(choice["chosen"]) in (out / "table.md").read_text()


def test_two_stage_stopped_in_its_rl_stage_redoes_a_lost_sft_stage(smoke, tmp_path, monkeypatch):
    out, _ = smoke
    straight = json.loads((out / "runs" / "two_stage" / "seed-0" / "result.json").read_text())
    grid = parse_grid(_grid(methods=["two_stage"], seeds=[0]))
    original = runs_module._Recorder.on_step_end

    def interrupt(self, args, state, control, **kwargs):
        original(self, args, state, control, **kwargs)
        if self.offset == 2 and state.global_step == 1:  # the first step of the RL stage
            raise KeyboardInterrupt("stopped by the test")

    monkeypatch.setattr(runs_module._Recorder, "on_step_end", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_grid(grid, tmp_path / "g", progress=False)
    monkeypatch.setattr(runs_module._Recorder, "on_step_end", original)
    run = tmp_path / "g" / "runs" / "two_stage" / "seed-0"
    assert (run / "sft_stage.json").exists() and (run / "sft_final" / "config.json").exists()
    import shutil

    shutil.rmtree(run / "sft_final")  # as in a fresh clone: the SFT stage's weights are not committed
    shutil.rmtree(run / "sft")
    run_grid(grid, tmp_path / "g", progress=False)
    resumed = json.loads((run / "result.json").read_text())
    assert resumed["checksum"] == straight["checksum"] and resumed["final"] == straight["final"]
    assert resumed["spent"]["sft_tokens"] == straight["spent"]["sft_tokens"]


def test_a_changed_starting_model_stops_a_resumed_grid(smoke, tmp_path):
    out, path = smoke
    grid_dir = tmp_path / "copy"
    shutil.copytree(out, grid_dir)
    base_eval = grid_dir / "base_eval.json"
    recorded = json.loads(base_eval.read_text())
    model, _ = runs_module.load_model(str(grid_dir / "base_model"))
    assert recorded["start_checksum"] == runs_module.parameter_checksum(model)

    # a grid directory from before the checksum was recorded gets it added, nothing else changes
    del recorded["start_checksum"]
    base_eval.write_text(json.dumps(recorded))
    result = grid_dir / "runs" / "amft" / "seed-0" / "result.json"
    before = result.read_bytes()
    run_grid(load_grid(path), grid_dir, progress=False)
    again = json.loads(base_eval.read_text())
    assert again.pop("start_checksum") == runs_module.parameter_checksum(model) and again == recorded
    assert result.read_bytes() == before

    # other starting weights (a retrained toy model, another hub revision): refused before anything trains
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    model.save_pretrained(grid_dir / "base_model")
    shutil.rmtree(grid_dir / "runs" / "amft" / "seed-1")
    with pytest.raises(GridError, match="starting model .* is not the one this grid's runs"):
        run_grid(load_grid(path), grid_dir, progress=False)
    assert not (grid_dir / "runs" / "amft" / "seed-1").exists()


# ------------------------------------------------------------------------------------------------ the report


def _hand_built_report(tmp_path, scores: dict[str, list[float]], base_score: float) -> str:
    """table.md from hand-built results: `scores[method]` is the `id` score of each seed."""
    from amft_trl.compare.summary import SPENT_COLUMNS, markdown, summarize

    grid = parse_grid(_grid(methods=list(scores)))
    runs = {
        method: {
            seed: {"final": {"id": value}, "spent": dict.fromkeys(SPENT_COLUMNS, 0.0)}
            for seed, value in enumerate(values)
        }
        for method, values in scores.items()
    }
    base = {"test": {"id": base_score}, "val": base_score, "groups": {"id": "ID"}}
    rows = summarize(grid, tmp_path, runs, base)
    return markdown(grid, tmp_path, rows, ["id"], base)


def test_report_no_gain_is_no_separation(tmp_path):
    # every method scores 0 on every seed, like the starting model: std 0, gain 0 -- not "a ratio of inf"
    text = _hand_built_report(tmp_path, {"sft_only": [0.0, 0.0], "fixed": [0.0, 0.0]}, 0.0)
    assert "inf" not in text and "it separates" not in text
    assert "Separation: none" in text and "gains 0.0 points" in text
    # a loss is no separation either, however small its spread
    text = _hand_built_report(tmp_path, {"fixed": [0.40, 0.41, 0.40]}, 0.5)
    assert "Separation: none" in text and "it separates" not in text
    # a real gain with agreeing seeds still separates; a gain inside 3 std does not
    text = _hand_built_report(tmp_path, {"fixed": [0.6, 0.6]}, 0.5)
    assert "gains 10.0 points" in text and "at least 3: it separates" in text
    text = _hand_built_report(tmp_path, {"fixed": [0.5, 0.7]}, 0.5)  # gain 10, std 14.1
    assert "a ratio of 0.7 (below 3: no method separates at this budget)" in text


def test_report_ties_print_as_ties(tmp_path):
    text = _hand_built_report(tmp_path, {"sft_only": [0.0, 0.0], "fixed": [0.0, 0.0]}, 0.0)
    assert "Ranking on `id` (mean): all 2 methods tie at 0.0" in text
    assert ">" not in text.split("Ranking on")[1].splitlines()[0]
    scores = {"sft_only": [0.5, 0.5], "fixed": [0.4, 0.6], "amft": [0.7, 0.7], "chord": [0.2, 0.2]}
    text = _hand_built_report(tmp_path, scores, 0.1)
    assert "(mean): `amft` 70.0 > `sft_only` 50.0 = `fixed` 50.0 > `chord` 20.0" in text
    # two methods tied at the top: the separation sentence names both
    text = _hand_built_report(tmp_path, {"fixed": [0.6, 0.6], "amft": [0.6, 0.6]}, 0.5)
    assert "the best method, `fixed` (tied with `amft`), gains 10.0 points" in text


@pytest.mark.parametrize(
    "methods, training, message",
    [
        (
            {"sft_only": {}, "fixed": {"args": {"learning_rate": -1}}},
            {},
            "method 'fixed': `learning_rate` must be",
        ),
        (
            {"sft_only": {}, "two_stage": {"args": {"sft_learning_rate": -1}}},
            {},
            "method 'two_stage': `sft_learning_rate` must be",
        ),
        (
            {"sft_only": {}, "fixed": {"tune": {"learning_rate": [1e-3, -1e-3]}}},
            {},
            "method 'fixed' (trial {'learning_rate': -0.001}): `learning_rate` must be",
        ),
        ({"grpo_only": {}}, {"adam_beta2": 1.0}, "method 'grpo_only': the optimizer"),
        (
            {"grpo_only": {}},
            {"lr_scheduler_type": "cosine_with_min_lr"},
            "lr_scheduler_type='cosine_with_min_lr'",
        ),
    ],
)
def test_values_torch_would_refuse_stop_the_grid_before_it_runs(tmp_path, methods, training, message):
    # `learning_rate: -1` used to pass the grid check: sft_only trained, then fixed died mid-grid in torch's optimizer
    grid = parse_grid(_grid(methods=methods, training={**SMOKE["training"], **training}))
    with pytest.raises(GridError) as error:
        run_grid(grid, tmp_path / "out", progress=False)
    assert message in str(error.value)
    assert not (tmp_path / "out").exists()  # refused before anything was written or trained


def test_trl_stage_configs_get_the_optimizer_check():
    # SFTConfig / GRPOConfig accept what torch refuses; the grid check builds their optimizer and schedule too
    from trl import SFTConfig

    from amft_trl.config import check_optimizer_settings

    config = SFTConfig(output_dir="/nonexistent", learning_rate=-1.0, report_to=[], use_cpu=True, bf16=False)
    with pytest.raises(ValueError, match=r"optimizer .*learning_rate=-1.0.*Invalid learning rate"):
        check_optimizer_settings(config, 10)


# ------------------------------------------------------------------------------------------------ a grid's directory


def _recorded(tmp_path, raw):
    """An output directory holding the results of grid `raw` (its record and one finished run)."""
    out = tmp_path / "out"
    runs_module.prepare_output_dir(parse_grid(raw), out, overwrite=False)
    (out / "runs" / "amft" / "seed-0").mkdir(parents=True)
    (out / "runs" / "amft" / "seed-0" / "result.json").write_text("{}")
    return out


def test_added_seeds_extend_a_grid_and_keep_its_runs(tmp_path):
    import yaml

    out = _recorded(tmp_path, _grid())
    runs_module.prepare_output_dir(parse_grid(_grid(seeds=[0, 1, 2])), out, overwrite=False)
    assert yaml.safe_load((out / "grid.yaml").read_text())["seeds"] == [0, 1, 2]  # the record is the grid now
    assert (out / "runs" / "amft" / "seed-0" / "result.json").exists()
    # writing a default out is the same grid
    same = _grid(seeds=[0, 1, 2], budget={**SMOKE["budget"], "eval_every": 2}, reference="two_stage")
    runs_module.prepare_output_dir(parse_grid(same), out, overwrite=False)


@pytest.mark.parametrize(
    "changes, named",
    [
        ({"seeds": [0]}, "(`seeds` differs; seeds [0, 1] there, [0] here: seeds can be added to a grid"),
        (
            {"seeds": [0, 1, 2], "budget": {**SMOKE["budget"], "max_steps": 6}},
            "(`seeds`, `budget.max_steps` differ",
        ),
        ({"training": {**SMOKE["training"], "learning_rate": 0.1}}, "(`training.learning_rate` differs"),
        ({"methods": ["two_stage", "amft", "fixed"]}, "(`methods.fixed` differs"),
    ],
)
def test_a_different_grid_is_refused_naming_what_differs(tmp_path, changes, named):
    out = _recorded(tmp_path, _grid())
    with pytest.raises(GridError) as error:
        runs_module.prepare_output_dir(parse_grid(_grid(**changes)), out, overwrite=False)
    assert named in str(error.value) and "--overwrite" in str(error.value)
    assert (out / "runs" / "amft" / "seed-0" / "result.json").exists()


def test_added_seeds_that_move_the_default_tuning_seed_say_how_to_keep_it(tmp_path):
    tuned = {"two_stage": {}, "fixed": {"tune": {"mu_init": [0.2, 0.4]}}}
    out = _recorded(tmp_path, _grid(methods=tuned))  # tuning seed: max(seeds) + 1 = 2
    with pytest.raises(
        GridError, match=r"`tuning.seed` defaults to max\(seeds\) \+ 1: set `tuning: \{seed: 2\}`"
    ):
        runs_module.prepare_output_dir(
            parse_grid(_grid(methods=tuned, seeds=[0, 1, 2])), out, overwrite=False
        )
    kept = _grid(methods=tuned, seeds=[0, 1, 2], tuning={"seed": 2})
    runs_module.prepare_output_dir(parse_grid(kept), out, overwrite=False)


def test_cli_ctrl_c_is_one_line_and_exit_130(tmp_path, capsys, monkeypatch):
    path = tmp_path / "grid.yaml"
    import yaml

    path.write_text(yaml.safe_dump(SMOKE))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runs_module, "run_grid", interrupted)
    assert compare_main([str(path), "--output-dir", str(tmp_path / "out"), "--no-progress"]) == 130
    captured = capsys.readouterr()
    assert captured.err.strip() == "amft-compare: interrupted; run the same command again to resume."
    assert "Traceback" not in captured.out + captured.err


def test_luffy_demonstrations_are_metered_as_demonstration_tokens_not_generated(tmp_path):
    """LUFFY's off-policy rows are the prompts' demonstrations: the budget counts them as demonstration tokens trained
    on, and only the rollouts TRL generated as generated tokens."""
    raw = _grid(methods=["luffy"], seeds=[0], budget={"max_steps": 3, "eval_every": 3})
    out = run_grid(parse_grid(raw), tmp_path / "luffy", progress=False)
    run = json.loads((out / "runs" / "luffy" / "seed-0" / "result.json").read_text())
    steps, prompts, length = 3, 8 // 4, 6  # per_device_train_batch_size / num_generations prompts per step
    # every toy demonstration (" a + b = c" style, several tokens) fills max_completion_length = 6 tokens
    assert run["spent"]["sft_tokens"] == steps * prompts * 1 * length
    # 3 generated rollouts of at most 6 tokens per prompt, never the 4th (the demonstration's slot)
    assert 0 < run["spent"]["generated_tokens"] <= steps * prompts * 3 * length


def test_evaluation_renders_prompts_with_the_trainings_chat_template_kwargs(monkeypatch):
    """A grid whose training renders prompts with `chat_template_kwargs` evaluates (test sets and validation split)
    with the same ones; without them, none are passed."""
    import amft_trl.evaluation as evaluation

    seen = []

    def recording(model, benchmarks, **settings):
        seen.append(settings.get("chat_template_kwargs"))
        return {b.name: {"accuracy": 0.5} for b in benchmarks}

    monkeypatch.setattr(evaluation, "evaluate_model", recording)
    off = {"enable_thinking": False}
    for training, expected in (
        (SMOKE["training"], None),
        ({**SMOKE["training"], "chat_template_kwargs": off}, off),
    ):
        grid = parse_grid(_grid(training=training))
        data = grid_tasks.build_task(grid.task, grid.task_options).build()
        for split in ("test", "val"):
            seen.clear()
            runs_module.evaluate(None, None, grid, data, split=split)
            assert seen == [expected], split
