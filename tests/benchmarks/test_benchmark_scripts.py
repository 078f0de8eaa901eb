"""Smoke tests of `benchmarks/step_cost.py`: its summary arithmetic, and one end-to-end run on the tiny model."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "step_cost.py"


@pytest.fixture(scope="module")
def step_cost():
    spec = importlib.util.spec_from_file_location("step_cost", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _worker(seconds: list[float], peak: int, tokens: int = 0) -> dict:
    steps = [
        {
            "step": i + 1,
            "seconds": s,
            "peak_rss": peak,
            "generate_seconds": 0.5 if tokens else 0.0,
            "generate_calls": 1 if tokens else 0,
            "generated_sequences": 16 if tokens else 0,
            "generated_tokens": tokens,
            "logged_step_time": {"step_time": s / 2} if tokens else {},
        }
        for i, s in enumerate(seconds)
    ]
    return {"steps": steps, "rss_train_begin": 1, "ru_maxrss": peak, "cuda_allocated_train_begin": None}


def test_summary_and_ratios(step_cost):
    workers = {
        "grpo": _worker([100.0, 8.0, 7.0, 9.0], peak=3_000, tokens=512),
        "sft_only": _worker([50.0, 2.0, 2.0, 2.0], peak=3_100),
        "amft": _worker([100.0, 10.0, 10.0, 10.0], peak=3_500, tokens=512),
        "amft_meta": _worker([100.0, 28.0, 30.0, 29.0], peak=3_500 + 2 * 4 * 100, tokens=1024),
    }
    summary = {name: step_cost.summarise(w, warmup=1) for name, w in workers.items()}
    assert summary["grpo"]["median_seconds"] == 8.0  # the warm-up step (100 s) is excluded
    assert summary["grpo"]["warmup_step_seconds"] == [100.0]
    assert summary["grpo"]["logged_step_time_median"] == {"step_time": 4.0}
    assert summary["sft_only"]["tokens_per_second_whole_step"] is None
    assert summary["amft_meta"]["generated_tokens_per_step"] == 1024
    q = step_cost.ratios(summary, num_params=100, param_bytes=4, cuda=False)
    assert q["amft_over_grpo_plus_sft"] == pytest.approx(10.0 / 10.0)
    assert q["amortised_k20_over_grpo_plus_sft"] == pytest.approx((19 * 10.0 + 29.0) / 20 / 10.0)
    assert q["meta_extra_time_over_grpo"] == pytest.approx(19.0 / 8.0)
    assert q["meta_extra_peak_fp32_gradients"] == pytest.approx(2.0)
    # a subset of configurations gives the ratios it can
    assert step_cost.ratios({"amft": summary["amft"]}, 100, 4, False) == {}


def _with_parts(worker: dict, rl: float, sft: float, meta: float, optimizer: float) -> dict:
    for step in worker["steps"]:
        step["cpu_seconds"] = step["seconds"] + 1.0
        step["phase_seconds"] = {"rl": rl, "sft": sft, "meta_validation": meta, "optimizer": optimizer}
        step["phase_cpu_seconds"] = {"rl": rl, "sft": sft, "meta_validation": meta, "optimizer": optimizer}
    return worker


def test_ratios_from_parts(step_cost):
    """GRPO + SFT only rebuilt from the AMFT process's own RL and SFT parts (hand computation)."""
    workers = {
        # step = RL 7 + optimizer 0.5 + rest 0.5 = 8; in the AMFT process the same RL work took 7.5
        "grpo": _with_parts(
            _worker([100.0, 8.0, 8.0], peak=1, tokens=512), rl=7.0, sft=0.0, meta=0.0, optimizer=0.5
        ),
        # 3 = SFT 2 + optimizer 0.5 + rest 0.5
        "sft_only": _with_parts(_worker([100.0, 3.0, 3.0], peak=1), rl=0.0, sft=2.0, meta=0.0, optimizer=0.5),
        # 11 = RL 7.5 + SFT 2.2 + optimizer 0.5 + rest 0.8
        "amft": _with_parts(
            _worker([100.0, 11.0, 11.0], peak=1, tokens=512), rl=7.5, sft=2.2, meta=0.0, optimizer=0.5
        ),
        # 20.3 = RL 7.5 + SFT 2.5 (0.3 of inner products) + validation 8 + optimizer 0.5 + rest 1.8 (1.0 more)
        "amft_meta": _with_parts(
            _worker([100.0, 20.3, 20.3], peak=1, tokens=1024), rl=7.5, sft=2.5, meta=8.0, optimizer=0.5
        ),
    }
    summary = {name: step_cost.summarise(w, warmup=1) for name, w in workers.items()}
    assert summary["amft"]["phase_wall_median"]["rest"] == pytest.approx(0.8)
    assert summary["amft"]["phase_cpu_median"]["rest"] == pytest.approx(1.8)  # CPU s = wall s + 1 here
    q = step_cost.ratios_from_parts(summary, "wall")
    base = 7.5 + 2.2 + (0.5 + 0.5) + (0.5 + 0.5)
    assert q["grpo_plus_sft_from_parts"] == pytest.approx(base)
    assert q["amft_over_grpo_plus_sft"] == pytest.approx(11.0 / base)
    assert q["amft_besides_parts"] == pytest.approx(1.3)
    assert q["grpo_plus_sft_besides_parts"] == pytest.approx(2.0)
    assert q["meta_extra_seconds"] == pytest.approx(8.0 + (1.8 - 0.8) + (2.5 - 2.2))
    assert q["meta_extra_time_over_grpo"] == pytest.approx(9.3 / (7.5 + 1.0))
    assert q["amortised_k20_over_grpo_plus_sft"] == pytest.approx((11.0 + 9.3 / 20) / base)
    # the cross-process ratio on the same data, for contrast: 11 / (8 + 3)
    assert step_cost.ratios(summary, 100, 4, False)["amft_over_grpo_plus_sft"] == pytest.approx(1.0)
    # without the parts (an older src, or a missing configuration) there is nothing to rebuild
    assert step_cost.ratios_from_parts({"amft": summary["amft"]}) == {}


def test_luffy_ratios(step_cost):
    """LUFFY against GRPO: whole step, generation and the rest of the step, each a ratio of medians."""

    def worker(seconds, gen_seconds, sequences):
        steps = [
            {
                "step": i + 1,
                "seconds": s,
                "cpu_seconds": s / 2,
                "peak_rss": 1,
                "generate_seconds": g,
                "generate_cpu_seconds": g / 4,
                "generate_calls": 1,
                "generated_sequences": sequences,
                "generated_tokens": 4 * sequences,
                "logged_step_time": {},
            }
            for i, (s, g) in enumerate(zip(seconds, gen_seconds, strict=True))
        ]
        return {"steps": steps, "rss_train_begin": 1, "ru_maxrss": 1, "cuda_allocated_train_begin": None}

    workers = {
        "grpo": worker([9.0, 4.0, 5.0, 6.0], [9.0, 3.0, 3.0, 3.0], 16),  # the first step is warm-up
        "luffy": worker([9.0, 3.5, 4.0, 4.5], [9.0, 2.0, 2.5, 2.0], 12),
    }
    summary = {name: step_cost.summarise(w, warmup=1) for name, w in workers.items()}
    assert summary["luffy"]["besides_generate_seconds_median"] == pytest.approx(
        1.5
    )  # median of 1.5, 1.5, 2.5
    q = step_cost.ratios(summary, 100, 4, False)
    assert q["luffy_over_grpo"] == pytest.approx(4.0 / 5.0)
    assert q["luffy_generate_over_grpo"] == pytest.approx(2.0 / 3.0)
    assert q["luffy_besides_generate_over_grpo"] == pytest.approx(1.5 / 2.0)
    assert q["luffy_generated_sequences_over_grpo"] == pytest.approx(0.75)
    c = step_cost.ratios(summary, 100, 4, False, time_key="median_cpu_seconds")
    assert c["luffy_over_grpo"] == pytest.approx(0.8)
    assert c["luffy_generate_over_grpo"] == pytest.approx(2.0 / 3.0)
    # CPU besides generate, per step s / 2 - g / 4: luffy 1.25, 1.375, 1.75 (median 1.375); grpo 1.25, 1.75, 2.25
    assert summary["luffy"]["besides_generate_cpu_seconds_median"] == pytest.approx(1.375)
    assert c["luffy_besides_generate_over_grpo"] == pytest.approx(1.375 / 1.75)
    assert "luffy_over_grpo" not in step_cost.ratios({"luffy": summary["luffy"]}, 100, 4, False)


@pytest.mark.slow
def test_end_to_end_tiny_luffy_generates_no_demonstration(tmp_path):
    """LUFFY's demonstration takes a rollout's place: G - 1 generated sequences per prompt, against GRPO's G."""
    out = tmp_path / "tiny_luffy"
    cmd = [
        sys.executable, str(SCRIPT), "--model", "tiny", "--configs", "grpo,luffy",
        "--prompts", "2", "--num-generations", "4", "--completion-length", "4",
        "--steps", "1", "--warmup-steps", "1", "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(Path(f"{out}.json").read_text())
    grpo, luffy = result["summary"]["grpo"], result["summary"]["luffy"]
    assert grpo["generated_sequences_per_step"] == 2 * 4 and grpo["generated_tokens_per_step"] == 2 * 4 * 4
    assert luffy["generated_sequences_per_step"] == 2 * 3 and luffy["generated_tokens_per_step"] == 2 * 3 * 4
    assert result["ratios"]["luffy_generated_sequences_over_grpo"] == 0.75
    assert result["workers"]["luffy"]["trainer_settings"]["balancing"] == "luffy"
    assert "- luffy / grpo = " in Path(f"{out}.md").read_text()


def test_luffy_is_refused_for_image_prompts(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--model",
            "tiny-vlm",
            "--configs",
            "luffy",
            "--out",
            str(tmp_path / "x"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "--configs luffy: text models only" in proc.stderr


@pytest.mark.slow
def test_end_to_end_tiny(tmp_path):
    out = tmp_path / "tiny"
    cmd = [
        sys.executable, str(SCRIPT), "--model", "tiny", "--configs", "amft_meta",
        "--prompts", "2", "--num-generations", "2", "--completion-length", "4", "--sft-batch", "2",
        "--steps", "1", "--warmup-steps", "1", "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(Path(f"{out}.json").read_text())
    meta = result["summary"]["amft_meta"]
    assert meta["measured_steps"] == 1
    # training (2 x 2 rollouts) and validation rollouts (2 x 2), each exactly 4 tokens
    assert meta["generated_tokens_per_step"] == 2 * 2 * 2 * 4
    assert meta["peak_rss"] > 0 and meta["median_seconds"] > 0
    assert "step_time" in meta["logged_step_time_median"]
    assert result["run"]["torch_threads"] == 1
    assert "| amft_meta |" in Path(f"{out}.md").read_text()
    # every part of a meta step was timed, and none inside another (their sum fits in the step)
    step = result["workers"]["amft_meta"]["steps"][-1]
    assert all(step["phase_seconds"][p] > 0 for p in ("rl", "sft", "meta_validation", "optimizer"))
    assert sum(step["phase_seconds"].values()) <= step["seconds"]


@pytest.mark.slow
def test_end_to_end_tiny_vlm(tmp_path):
    """The tiny LLaVA: image prompts, image demonstrations and image validation prompts in a meta step."""
    out = tmp_path / "tiny_vlm"
    cmd = [
        sys.executable, str(SCRIPT), "--model", "tiny-vlm", "--configs", "amft_meta",
        "--prompts", "2", "--num-generations", "2", "--completion-length", "4", "--sft-batch", "2",
        "--steps", "1", "--warmup-steps", "1", "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(Path(f"{out}.json").read_text())
    meta = result["summary"]["amft_meta"]
    assert meta["generated_tokens_per_step"] == 2 * 2 * 2 * 4
    assert "LLaVA" in Path(f"{out}.md").read_text()
    step = result["workers"]["amft_meta"]["steps"][-1]
    assert all(step["phase_seconds"][p] > 0 for p in ("rl", "sft", "meta_validation", "optimizer"))


SUMMARY = Path(__file__).resolve().parents[2] / "benchmarks" / "compare_summary.py"


def _result(grid: Path, method: str, seed: int, acc: float, ood: float) -> None:
    run = grid / "runs" / method / f"seed-{seed}"
    run.mkdir(parents=True)
    spent = {"generated_tokens": 1000.0 * (seed + 1), "validation_generated_tokens": 0.0, "sft_tokens": 500.0}
    run.joinpath("result.json").write_text(
        json.dumps({"method": method, "seed": seed, "final": {"id": acc, "ood": ood}, "spent": spent})
    )


def test_compare_summary_pairs_with_a_reference_from_another_grid(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("compare_summary", SUMMARY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    main, other = tmp_path / "main", tmp_path / "other"
    for seed, (a, b) in enumerate([(0.5, 0.4), (0.7, 0.5), (0.6, 0.6)]):
        _result(main, "fixed", seed, a, 0.1)
        _result(other, "two_stage", seed, b, 0.2)
    main.joinpath("grid.yaml").write_text("methods: {fixed: {}}\n")
    module.main([str(main), f"{other}=ref", "--reference", "ref"])
    rows = {line.split(" | ")[0]: line.split(" | ") for line in capsys.readouterr().out.splitlines()}
    fixed, ref = rows["| `fixed`"], rows["| `ref`"]
    assert fixed[2] == "50.0 / 70.0 / 60.0"
    # mean 60, s = 10, t_{0.975, 2} = 4.302653 -> half-width 24.84
    assert fixed[3] == "60.0 [35.2, 84.8]"
    # paired differences 10, 20, 0: mean 10, s = 10 -> the same half-width; the interval holds 0, so no star
    assert fixed[4] == "+10.0 [-14.8, 34.8]"
    assert ref[4] == "reference"
    assert fixed[-1].startswith("2.0k / 500")  # tokens: the mean over seeds (1k, 2k, 3k)
    with pytest.raises(SystemExit, match="not a row"):
        module.main([str(main), "--reference", "two_stage"])


DRIFT = Path(__file__).resolve().parents[2] / "benchmarks" / "rerun_drift.py"


def _runs_csv(grid: Path, rows: list[tuple[str, int, float, str]]) -> None:
    grid.mkdir()
    lines = ["method,point,seed,id,ood,generated_tokens,sft_tokens,checksum"]
    lines += [
        f'fixed,"{{""mu_init"": {mu}}}",{seed},{acc},0.0,10,5,{checksum}' for mu, seed, acc, checksum in rows
    ]
    grid.joinpath("runs.csv").write_text("\n".join(lines) + "\n")


def test_rerun_drift_matches_runs_and_pairs_over_seeds(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("rerun_drift", DRIFT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    committed, rerun = tmp_path / "committed", tmp_path / "rerun"
    _runs_csv(committed, [(0.1, 0, 0.5, "a"), (0.1, 1, 0.7, "b"), (0.1, 2, 0.6, "c"), (0.9, 0, 0.4, "d")])
    # seed 1 moved by +20 points and seed 2 by +10, seed 0 is bit-identical; mu 0.9 was not rerun
    _runs_csv(rerun, [(0.1, 0, 0.5, "a"), (0.1, 1, 0.9, "x"), (0.1, 2, 0.7, "y")])
    module.main([str(committed), str(rerun)])
    out = capsys.readouterr().out
    assert out.startswith("3 runs in both grids (4 committed, 3 rerun); 1 trained bit-identical weights")
    assert "2 of 3 changed score; |change| mean 10.0, largest 20.0 points" in out
    # paired differences 0, 20, 10: mean 10, s = 10, t_{0.975, 2} = 4.302653 -> half-width 24.8
    assert '| `fixed` | {"mu_init": 0.1} | 60.0 | 70.0 | +10.0 [-14.8, +34.8] |' in out
    assert "### `ood`" in out and "0 of 3 changed score" in out
    with pytest.raises(SystemExit, match="no run is in both"):
        _runs_csv(tmp_path / "other", [(0.5, 0, 0.5, "a")])
        module.main([str(committed), str(tmp_path / "other")])


def test_the_committed_rerun_under_other_kernels_reproduced_every_score():
    """What `docs/source/results.md` reports of the sensitivity grids rerun under other CPU kernels (toy: 50 runs,
    SmolLM2: 2): other weights (no checksum equal), every score the committed one (issue 25). Fails if either committed grid is regenerated apart."""
    spec = importlib.util.spec_from_file_location("rerun_drift", DRIFT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "compare"
    for grid, runs, scores in [
        ("toy_addition_sensitivity", 50, ("addition_id", "addition_ood")),
        ("smollm2_addition_sensitivity", 2, ("add_id", "add_ood")),
    ]:
        committed = module.load(results / grid)
        rerun = module.load(results / f"{grid}_other_kernels")
        assert len(rerun) == runs and set(rerun) <= set(committed)
        for key, row in rerun.items():
            assert row["checksum"] != committed[key]["checksum"]
            assert [row[s] for s in scores] == [committed[key][s] for s in scores]
