"""amft_trl.evaluation with real generation: the tiny offline model, the `amft-eval` CLI, and (GPU) vLLM."""

from __future__ import annotations

import importlib
import json
import os

import pytest
import torch

from amft_trl.evaluation import EvalResults, benchmark_from_dataset, evaluate_model, get_template
from amft_trl.evaluation.cli import main
from amft_trl.rewards import math_accuracy_reward, multiple_choice_reward

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "eval")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUESTIONS = [
    "Compute 3 + 4 =",
    "Compute 12 + 7 = ?",
    "Add",
    "Compute 1 + 1 and then explain the answer",
    "5 + 5",
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # much faster on the shared 2-core CI machine
    yield
    torch.set_num_threads(threads)


def exact_reward(completions, answer, **kwargs):
    return [1.0 if c == a else 0.0 for c, a in zip(completions, answer)]


@torch.no_grad()
def greedy_by_hand(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Greedy decoding one token at a time: full forward pass, no cache, no padding, argmax."""
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    new = []
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids).logits[0, -1]
        token = int(torch.argmax(logits))
        if token == tokenizer.eos_token_id:
            break
        new.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return tokenizer.decode(new, skip_special_tokens=True)


def test_greedy_evaluation_of_the_tiny_model_matches_a_hand_computation(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    template = get_template("plain")
    by_hand = [
        greedy_by_hand(model, tokenizer, template.render(q, tokenizer)[0], max_new_tokens=6)
        for q in QUESTIONS
    ]
    # Even problems' gold is the hand-decoded greedy answer, odd ones' something the model cannot write.
    rows = [{"prompt": q, "answer": by_hand[i] if i % 2 == 0 else "\x01"} for i, q in enumerate(QUESTIONS)]
    expected = sum(exact_reward([by_hand[i]], [r["answer"]])[0] for i, r in enumerate(rows)) / len(rows)
    assert expected == pytest.approx(3 / 5)

    model.train()  # evaluate_model switches to eval mode and back
    bench = [benchmark_from_dataset("echo", rows, exact_reward, gold_column="answer")]
    in_process = evaluate_model(
        model, bench, tokenizer=tokenizer, num_samples=0, max_new_tokens=6, batch_size=3, progress=False
    )
    assert model.training
    assert [p["greedy"]["text"] for p in in_process.benchmarks["echo"].problems] == by_hand
    assert (
        in_process["echo"]["greedy"] == pytest.approx(expected) and in_process["echo"]["headline"] == "greedy"
    )

    from_path = evaluate_model(tiny_model_dir, bench, num_samples=0, max_new_tokens=6, progress=False)
    assert from_path.metrics == in_process.metrics and from_path.backend == "transformers"


def regrade(problem: dict, reward_name: str) -> list[float]:
    texts = [s["text"] for s in problem["samples"]] + [problem["greedy"]["text"]]
    if reward_name == "math_accuracy_reward":
        return math_accuracy_reward(texts, solution=[problem["gold"]] * len(texts))
    return multiple_choice_reward(texts, answer=[problem["gold"]] * len(texts))


def test_cli_end_to_end(tiny_model_dir, tmp_path, capsys):
    out = str(tmp_path / "eval")
    args = [
        "--model", tiny_model_dir, "--model-name", "tiny",
        "--benchmarks", f"math500={FIXTURES}/math500.jsonl,arc_c={FIXTURES}/arc_c.jsonl,general_points_ood",
        "--num-samples", "2,arc_c=3", "--pass-k", "1,2", "--max-new-tokens", "5", "--gp-num-eval", "2",
        "--output-dir", out, "--no-progress",
    ]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert (
        "| Model | MATH500 | Avg. (math) | ARC-C | Avg. (OOD) |" in printed
        and "| Model | OOD (rule) |" in printed
    )
    saved = json.load(open(os.path.join(out, "results.json")))
    assert set(saved["benchmarks"]) == {"math500", "arc_c", "general_points_ood"}
    assert saved["model"] == "tiny" and saved["backend"] == "transformers"
    assert saved["settings"]["max_new_tokens"] == 5 and saved["settings"]["num_samples"] == {
        "default": 2,
        "arc_c": 3,
    }
    for name, count, n in (("math500", 4, 2), ("arc_c", 3, 3), ("general_points_ood", 2, 2)):
        b = saved["benchmarks"][name]
        assert b["metrics"]["num_problems"] == count and all(len(p["samples"]) == n for p in b["problems"])
        assert set(b["metrics"]) >= {f"avg@{n}", "pass@1", "pass@2", "greedy", "accuracy"}
    for name in ("math500", "arc_c"):  # the stored scores are the rewards of the stored completions
        b = saved["benchmarks"][name]
        for p in b["problems"]:
            assert regrade(p, b["reward"]) == [s["score"] for s in p["samples"]] + [p["greedy"]["score"]]
    assert saved["benchmarks"]["arc_c"]["template"]["name"] == "multiple_choice"
    assert open(os.path.join(out, "results.md")).read().startswith("Math (in-distribution)")

    # Started again: everything is read back, nothing regenerated, the same results.
    progress = os.path.join(out, "progress", "math500.jsonl")
    before = open(progress).read()
    assert main(args) == 0
    assert open(progress).read() == before
    assert EvalResults.load(out).metrics == {k: v["metrics"] for k, v in saved["benchmarks"].items()}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--benchmarks", "math500,gsm8k"], "Unknown benchmark 'gsm8k'"),
        (["--benchmarks", f"math500={FIXTURES}/arc_c.jsonl"], "math500: row 0"),
        (["--benchmarks", f"arc_c={FIXTURES}/math500.jsonl"], "math500.jsonl): row 0: no options"),
        (
            ["--benchmarks", f"math500={FIXTURES}/math500.jsonl", "--num-samples", "2", "--pass-k", "4"],
            "pass@4",
        ),
        (["--benchmarks", "math500", "--num-samples", "two"], "--num-samples"),
        (
            ["--benchmarks", "math500", "--chat-template-kwargs", "enable_thinking=false"],
            "--chat-template-kwargs",
        ),
        (
            ["--benchmarks", "math500", "--chat-template-kwargs", "[1]"],
            "--chat-template-kwargs: expected a JSON",
        ),
    ],
)
def test_cli_bad_input_is_one_line(extra, message, tmp_path, capsys):
    assert main(["--model", str(tmp_path / "never-loaded"), "--output-dir", str(tmp_path), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("amft-eval: error: ") and message in err and "\n" not in err


def test_console_script_is_declared():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        target = tomllib.load(f)["project"]["scripts"]["amft-eval"]
    module, func = target.split(":")
    assert getattr(importlib.import_module(module), func) is main


# --------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_greedy_completions_are_the_same_on_vllm_and_transformers(tmp_path):
    from conftest import build_model, build_tokenizer

    path = str(tmp_path / "model")
    tokenizer = build_tokenizer()
    build_model(tokenizer, hidden_size=256).save_pretrained(path)  # vLLM's kernels need head_dim 64
    tokenizer.save_pretrained(path)
    rows = [{"prompt": q, "answer": "-"} for q in QUESTIONS]
    bench = [benchmark_from_dataset("echo", rows, exact_reward)]
    common = dict(num_samples=0, max_new_tokens=16, progress=False, dtype="float32")
    hf = evaluate_model(path, bench, **common, backend="transformers")
    vllm = evaluate_model(
        path, bench, **common, backend="vllm", vllm_kwargs={"dtype": "float32", "enforce_eager": True}
    )
    texts = [[p["greedy"]["text"] for p in r.benchmarks["echo"].problems] for r in (hf, vllm)]
    assert vllm.backend == "vllm" and hf.backend == "transformers"
    assert texts[0] == texts[1]
