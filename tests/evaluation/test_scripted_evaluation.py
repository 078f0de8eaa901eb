"""amft_trl.evaluation without a real model: benchmark layouts, bad input, metrics, resume, tables, `evaluate`.

Generation is scripted (`ScriptedBackend`: completions chosen per problem), so every metric has a hand-computed
expected value; the real graders (`math_accuracy_reward`, `multiple_choice_reward`) score them. The tiny model,
the CLI and the backends are in `test_tiny_model_evaluation.py`.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from fractions import Fraction

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from amft_trl.evaluation import (
    BENCHMARKS,
    EvalResults,
    EvaluationInputError,
    GeneralPointsOptions,
    benchmark_from_dataset,
    evaluate_model,
    load_benchmark,
    load_benchmarks,
    markdown_tables,
    pass_at_k,
    pass_at_k_problem,
)
from amft_trl.evaluation.metrics import avg_at_k
from amft_trl.tasks.general_points import build_general_points_datasets, general_points_reward

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "eval")


def fixture(name: str) -> str:
    return os.path.join(FIXTURES, name)


# --------------------------------------------------------------------------------------------- helpers


class ScriptedBackend:
    """A generation backend whose completions are chosen per problem by `answer(problem, n, greedy)`."""

    name = "scripted"

    def __init__(self, tokenizer, benchmarks, answer, per_call=2, fail_on_call=None):
        self.by_ids = {}
        for b in benchmarks:
            for p in b.problems:
                text, chat = b.template.render(p.question, tokenizer)
                self.by_ids[tuple(tokenizer(text, add_special_tokens=not chat)["input_ids"])] = (b, p)
        self.answer, self.per_call, self.fail_on_call = answer, per_call, fail_on_call
        self.calls, self.generated = 0, []

    def problems_per_call(self, n):
        return self.per_call

    def generate(self, prompt_ids, n, settings, seed):
        self.calls += 1
        if self.fail_on_call is not None and self.calls == self.fail_on_call:
            raise KeyboardInterrupt  # an interruption in the middle of the run
        out = []
        for ids in prompt_ids:
            benchmark, problem = self.by_ids[tuple(ids)]
            self.generated.append((benchmark.name, problem.id, settings.greedy))
            texts = self.answer(benchmark, problem, n, settings.greedy)
            assert len(texts) == n
            out.append(texts)
        return out


HOSTILE = [
    "\\boxed{",  # unclosed
    "{" * 5000 + "\\boxed{1}",  # deep nesting
    "<think> never closed \\boxed{5}",
    "\\boxed{" + "9" * 100_000 + "}",  # longer than the answer cap
    "\x00\ufffd \\boxed{\\frac{}{}}",
]


def graded_answer(benchmark, problem, n, greedy):
    """Problem i: greedy correct iff i is even; sample j correct iff j < i; wrong samples are hostile text."""
    i = int(problem.id)
    right = f"Reasoning... so the answer is \\boxed{{{problem.gold}}}."
    if greedy:
        return [right if i % 2 == 0 else "\\boxed{999}"]
    return [right if j < i else HOSTILE[(i + j) % len(HOSTILE)] for j in range(n)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # much faster on the shared 2-core CI machine
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------- metrics


def brute_force_pass_at_k(n: int, c: int, k: int) -> Fraction:
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    hits = sum(any(samples[i] for i in subset) for subset in subsets)
    return Fraction(hits, len(subsets))


def test_pass_at_k_matches_brute_force_enumeration():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                expected = brute_force_pass_at_k(n, c, k)
                assert math.isclose(pass_at_k_problem(n, c, k), float(expected), abs_tol=1e-12), (n, c, k)
    # pass@1 is the fraction correct; larger k never lowers it
    assert pass_at_k_problem(32, 5, 1) == pytest.approx(5 / 32)
    assert pass_at_k_problem(32, 5, 8) > pass_at_k_problem(32, 5, 4)


def test_pass_at_k_rejects_k_above_samples_and_averages_problems():
    with pytest.raises(ValueError, match="k=3"):
        pass_at_k_problem(2, 1, 3)
    scores = [[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]]
    # by hand: problem 1: 1 - C(3,2)/C(4,2) = 1/2; problem 2: 1 - C(2,2)/C(4,2) = 5/6
    assert pass_at_k(scores, 2) == pytest.approx((1 / 2 + 5 / 6) / 2)
    assert avg_at_k(scores) == pytest.approx((1 / 4 + 2 / 4) / 2)
    assert pass_at_k(scores, 1) == pytest.approx(avg_at_k(scores))


# --------------------------------------------------------------------------------------------- layouts


def test_math_layouts_read_their_gold_columns():
    math500 = load_benchmark("math500", fixture("math500.jsonl"))
    assert [p.gold for p in math500.problems] == ["5", "\\frac{3}{4}", "(1,1)", "2\\sqrt{2}"]
    assert math500.problems[0].reward_kwargs == {"solution": "5"}
    assert math500.group == "math" and math500.template.name == "boxed" and math500.num_samples == 1
    aime = load_benchmark("aime24", fixture("aime24.jsonl"))
    assert [p.gold for p in aime.problems] == ["401", "24"] and aime.num_samples == 32
    olympiad = load_benchmark("olympiadbench", fixture("olympiadbench.jsonl"))
    assert olympiad.problems[0].question.startswith("Compute the sum")
    assert [p.gold for p in olympiad.problems] == ["5", "2, -2"]  # the final_answer list, joined


def test_arc_gpqa_mmlu_pro_layouts_map_their_answer_keys():
    arc = load_benchmark("arc_c", fixture("arc_c.jsonl"))
    assert [p.gold for p in arc.problems] == ["B", "A", "B"]  # "1" of labels 1-4 is the first option: A
    assert "A) sunlight\nB) sand\nC) plastic\nD) noise" in arc.problems[1].question
    assert arc.problems[2].meta["letters"] == "ABC"

    gpqa = load_benchmark("gpqa_diamond", fixture("gpqa_diamond.jsonl"), seed=3)
    rows = [json.loads(line) for line in open(fixture("gpqa_diamond.jsonl"))]
    for p, row in zip(gpqa.problems, rows):
        source = [row["Correct Answer"]] + [row[f"Incorrect Answer {i}"] for i in (1, 2, 3)]
        order = p.meta["option_order"]
        assert sorted(order) == [0, 1, 2, 3]
        assert p.meta["options"] == [source[i] for i in order]
        assert p.meta["options"]["ABCD".index(p.gold)] == row["Correct Answer"]
    again = load_benchmark("gpqa_diamond", fixture("gpqa_diamond.jsonl"), seed=3)
    assert [p.meta["option_order"] for p in again.problems] == [p.meta["option_order"] for p in gpqa.problems]

    mmlu = load_benchmark("mmlu_pro", fixture("mmlu_pro.jsonl"))
    assert [p.gold for p in mmlu.problems] == ["B", "C"]
    assert "J) 15" in mmlu.problems[0].question and mmlu.problems[0].meta["letters"] == "ABCDEFGHIJ"


def write_luffy_file(path, rows):
    """A parquet file in the exact schema of LUFFY's data/valid.*.parquet (verl's RL format, pandas index)."""
    system = (
        'Your task is to follow a systematic, thorough reasoning process... "<think>\n {thoughts} </think>\n"'
    )
    records = [
        {
            "data_source": source,
            "prompt": [{"content": system, "role": "system"}, {"content": question, "role": "user"}],
            "ability": "math",
            "reward_model": {"ground_truth": gold, "style": "rule"},
            "extra_info": {"index": i, "split": "default"},
            "__index_level_0__": i,
        }
        for i, (source, question, gold) in enumerate(rows)
    ]
    pq.write_table(pa.Table.from_pylist(records), path)


LUFFY_ROWS = (
    [("math", "What is $1+1$?", "2"), ("math", "What is $2\\cdot 3$?", "6")]
    + [("aime", "Find $10^2+1$.", "101"), ("aime", "Find $2^{10}$.", "1024")] * 4  # LUFFY repeats AIME rows
    + [
        ("arc_c", "Which is a metal?\n\nA) wood\nB) copper\nC) paper\nD) cloth\n", "B"),
        ("arc_c", "Which is alive?\n\n1) rock\n2) tree\n3) water\n4) air\n", "2"),
        (
            "gpqa",
            "Answer the following multiple choice question. The last line of your response should be of the "
            "following format: 'ANSWER: $LETTER'.\n\nConsider:\n1) X\n2) Y\nWhich holds?\n\nA) 1<2\nB) 2<1\n"
            "C) both\n\nD) neither",
            "C",
        ),
    ]
)


def test_luffy_evaluation_files_load_as_they_are(tmp_path):
    path = str(tmp_path / "valid.all.parquet")
    write_luffy_file(path, LUFFY_ROWS)
    loaded = {b.name: b for b in load_benchmarks([path])}
    assert list(loaded) == ["math500", "aime24", "arc_c", "gpqa_diamond"]
    assert [p.question for p in loaded["math500"].problems] == ["What is $1+1$?", "What is $2\\cdot 3$?"]
    aime = loaded["aime24"]
    assert [(p.question, p.gold) for p in aime.problems] == [
        ("Find $10^2+1$.", "101"),
        ("Find $2^{10}$.", "1024"),
    ]
    assert "repeats problems (up to 4 times" in aime.notes[0]
    arc = loaded["arc_c"].problems
    assert (arc[0].gold, arc[1].gold) == ("B", "B")  # "2" of 1)..4) is the second option
    assert "A) rock\nB) tree\nC) water\nD) air" in arc[1].question and arc[1].meta["relabelled_from"] == list(
        "1234"
    )
    gpqa = loaded["gpqa_diamond"].problems[0]
    assert gpqa.meta["letters"] == "ABCD" and gpqa.gold == "C"  # the numbered statements are not options
    # one benchmark of a multi-source file, by name
    assert len(load_benchmark("aime24", path)) == 2 and load_benchmark("math500", path).name == "math500"


def test_general_points_benchmarks_are_the_task_modules_eval_splits():
    bench = load_benchmarks("general_points", general_points=GeneralPointsOptions(num_eval=20))
    data = build_general_points_datasets(num_train=1, num_validation=1, num_eval=20)
    for b, split in zip(bench, (data.eval_id, data.eval_ood)):
        assert [p.question for p in b.problems] == split["prompt"]
        assert [p.reward_kwargs["cards"] for p in b.problems] == split["cards"]
        assert b.group == "general_points" and b.reward is general_points_reward
    assert [b.label for b in bench] == ["ID", "OOD (rule)"]


def test_general_points_eval_splits_of_a_training_run_are_scored_in_process(tokenizer):
    from amft_trl.tasks.general_points import demonstration

    data = build_general_points_datasets(num_train=1, num_validation=1, num_eval=6, conversational=True)
    bench = [
        benchmark_from_dataset(
            "general_points_id", data.eval_id, general_points_reward, group="general_points"
        ),
        benchmark_from_dataset(
            "general_points_ood", data.eval_ood, "general_points_reward", group="general_points"
        ),
    ]

    def solve_even_hands(
        benchmark, problem, n, greedy
    ):  # a solution on even hands, a wrong formula on odd ones
        kw = problem.reward_kwargs
        right = demonstration(kw["cards"], kw["face_card_rule"], kw["target"])
        return [right if int(problem.id) % 2 == 0 else '{"formula": "1+1=2"}'] * n

    backend = ScriptedBackend(tokenizer, bench, solve_even_hands)
    results = evaluate_model("m", bench, tokenizer=tokenizer, backend=backend, num_samples=0, progress=False)
    assert (
        results["general_points_id"]["greedy"]
        == results["general_points_ood"]["greedy"]
        == pytest.approx(3 / 6)
    )
    prompt = results.benchmarks["general_points_ood"].problems[0]["prompt"]
    assert prompt == tokenizer.apply_chat_template(
        data.eval_ood[0]["prompt"], tokenize=False, add_generation_prompt=True
    )


# --------------------------------------------------------------------------------------------- bad input


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def bad_file(tmp_path, name, rows):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_bad_input_fails_with_one_line_before_any_model_is_loaded(tmp_path, monkeypatch):
    import amft_trl.evaluation.model_evaluation as model_evaluation

    def no_loading(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded")

    monkeypatch.setattr(model_evaluation, "_load_model", no_loading)
    monkeypatch.setattr(model_evaluation, "_load_tokenizer", no_loading)
    model = "./no/such/checkpoint"  # would fail too, but later: the input errors come first

    with pytest.raises(EvaluationInputError) as e:
        evaluate_model(model, "math500,aime2024")
    assert "'aime2024'" in one_line_error(e) and "math500" in one_line_error(e)

    no_question = bad_file(tmp_path, "q.jsonl", [{"text": "What is 1+1?", "answer": "2"}])
    with pytest.raises(EvaluationInputError) as e:
        evaluate_model(model, f"math500={no_question}")
    assert (
        "math500" in one_line_error(e)
        and "no question column" in one_line_error(e)
        and "'text'" in str(e.value)
    )

    no_gold = bad_file(tmp_path, "g.jsonl", [{"problem": "What is 1+1?", "hint": "2"}])
    with pytest.raises(EvaluationInputError, match="row 0.*no gold-answer column"):
        evaluate_model(model, f"math500={no_gold}")

    arc = bad_file(tmp_path, "arc.jsonl", [{"question": "Q?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "E"}])  # fmt: skip
    with pytest.raises(EvaluationInputError) as e:
        evaluate_model(model, f"arc_c={arc}")
    assert "arc_c" in one_line_error(e) and "'E'" in str(e.value) and "['A', 'B']" in str(e.value)

    mmlu = bad_file(tmp_path, "mmlu.jsonl", [{"question": "Q?", "options": ["a", "b", "c"], "answer": "D", "answer_index": 3}])  # fmt: skip
    with pytest.raises(
        EvaluationInputError, match=r"mmlu_pro \(.*mmlu.jsonl\): row 0: the gold key 'D' is not"
    ):
        evaluate_model(model, f"mmlu_pro={mmlu}")

    luffy = str(tmp_path / "luffy.parquet")
    write_luffy_file(
        luffy, [("arc_c", "Pick one.\n\nA) x\nB) y\n", "B")] * 2 + [("arc_c", "Or?\n\nA) x\n", "C")]
    )
    with pytest.raises(EvaluationInputError, match=r"arc_c \(.*luffy.parquet\): row 2: the gold key 'C'"):
        evaluate_model(model, [luffy])

    with pytest.raises(EvaluationInputError) as e:
        evaluate_model(model, f"math500={fixture('math500.jsonl')}", num_samples=4, pass_k=[1, 8])
    assert "pass@8" in one_line_error(e) and "math500 (4)" in str(e.value)

    with pytest.raises(EvaluationInputError, match="does not exist"):
        evaluate_model(model, "math500=" + str(tmp_path / "missing.parquet"))
    with pytest.raises(EvaluationInputError, match="name the reward"):
        evaluate_model(model, [fixture("math500.jsonl")])


# --------------------------------------------------------------------------------------------- the run


def math_and_mc(tokenizer, **kwargs):
    return load_benchmarks(
        [f"math500={fixture('math500.jsonl')}", f"mmlu_pro={fixture('mmlu_pro.jsonl')}"], **kwargs
    )


def test_scores_and_metrics_match_a_hand_computation(tokenizer, tmp_path):
    benchmarks = math_and_mc(tokenizer)
    backend = ScriptedBackend(tokenizer, benchmarks, graded_answer, per_call=3)
    results = evaluate_model(
        "unused-hub-id", benchmarks, tokenizer=tokenizer, backend=backend, num_samples=4, pass_k=[1, 2, 4],
        output_dir=str(tmp_path), progress=False,
    )  # fmt: skip
    m = results["math500"]
    # 4 problems; problem i has i correct samples of 4, greedy right on problems 0 and 2 (hostile text elsewhere)
    assert m["avg@4"] == pytest.approx((0 + 1 + 2 + 3) / 16)
    assert m["pass@1"] == pytest.approx(m["avg@4"])
    assert m["pass@2"] == pytest.approx((0 + (1 - 3 / 6) + (1 - 1 / 6) + 1) / 4)
    assert m["pass@4"] == pytest.approx(3 / 4)
    assert m["greedy"] == pytest.approx(2 / 4) and m["accuracy"] == m["avg@4"] and m["headline"] == "avg@4"
    mc = results["mmlu_pro"]  # 2 problems: 0 and 1 correct samples of 4
    assert mc["avg@4"] == pytest.approx(1 / 8) and mc["greedy"] == pytest.approx(1 / 2)
    assert results.aggregates["math"]["accuracy"] == pytest.approx(6 / 16)
    assert results.aggregates["ood"]["greedy"] == pytest.approx(1 / 2)
    # every completion is graded once; nothing is generated twice
    assert len(backend.generated) == 2 * (4 + 2)

    saved = json.loads((tmp_path / "results.json").read_text())
    problem = saved["benchmarks"]["math500"]["problems"][3]
    assert [s["score"] for s in problem["samples"]] == [1.0, 1.0, 1.0, 0.0]
    assert problem["gold"] == "2\\sqrt{2}" and problem["greedy"]["score"] == 0.0
    template = saved["benchmarks"]["math500"]["template"]
    assert template["name"] == "boxed" and "\\boxed{}" in template["user"]
    question = "What is $\\sqrt{8}$ in simplest form?"
    expected_prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question + "\n\nPlease reason step by step, and put your final answer within "
          "\\boxed{}."}], tokenize=False, add_generation_prompt=True,
    )  # fmt: skip
    assert problem["prompt"] == expected_prompt
    assert saved["settings"]["temperature"] == 0.6 and saved["settings"]["top_p"] == 0.95
    assert EvalResults.load(tmp_path).metrics == results.metrics


def test_chat_template_kwargs_render_every_prompt(tiny_model_dir, tmp_path):
    """`chat_template_kwargs` (amft-eval's `--chat-template-kwargs`, a grid's training settings in amft-compare)
    reach the chat template of every prompt, and are recorded with the template (so a resumed run with other ones
    starts over)."""
    from dataclasses import replace

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)  # not the session's: its template is changed
    tokenizer.chat_template = (
        "{% if enable_thinking is defined and not enable_thinking %}<|system|>5<|end|>{% endif %}"
        + tokenizer.chat_template
    )
    off = {"enable_thinking": False}
    benchmarks = math_and_mc(tokenizer)
    flagged = [replace(b, template=replace(b.template, chat_template_kwargs=off)) for b in benchmarks]
    # the backend knows the prompts only as rendered with the kwargs: any other rendering is a KeyError
    backend = ScriptedBackend(tokenizer, flagged, graded_answer, per_call=3)
    results = evaluate_model(
        "unused-hub-id", benchmarks, tokenizer=tokenizer, backend=backend, num_samples=0,
        chat_template_kwargs=off, output_dir=str(tmp_path), progress=False,
    )  # fmt: skip
    assert results["math500"]["greedy"] == pytest.approx(2 / 4) and len(backend.generated) == 6
    saved = json.loads((tmp_path / "results.json").read_text())["benchmarks"]["math500"]
    assert saved["problems"][0]["prompt"].startswith("<|system|>5<|end|>")
    assert saved["template"]["chat_template_kwargs"] == off
    with pytest.raises(EvaluationInputError, match="chat_template_kwargs must be a mapping"):
        evaluate_model("unused-hub-id", benchmarks, tokenizer=tokenizer, chat_template_kwargs=["x"])


def test_a_reward_that_raises_scores_zero_and_the_run_goes_on(tokenizer):
    def touchy_reward(completions, answer, **kwargs):
        if any("BOOM" in c for c in completions):
            raise RuntimeError("grader crashed")
        return [1.0 if c == answer_ else 0.0 for c, answer_ in zip(completions, answer)]

    rows = [{"prompt": f"Say {w}", "answer": w} for w in ("yes", "no", "maybe")]
    bench = benchmark_from_dataset("echo", rows, touchy_reward)
    answers = {"yes": ["yes", "BOOM"], "no": ["BOOM", "BOOM"], "maybe": ["maybe", "maybe"]}
    backend = ScriptedBackend(
        tokenizer, [bench], lambda b, p, n, g: answers[p.gold or p.reward_kwargs["answer"]][:n]
    )
    results = evaluate_model(
        "x", [bench], tokenizer=tokenizer, backend=backend, num_samples=2, greedy=False, progress=False
    )
    assert [[s["score"] for s in p["samples"]] for p in results.benchmarks["echo"].problems] == [
        [1, 0],
        [0, 0],
        [1, 1],
    ]
    assert results["echo"]["unscored"] == 3 and results["echo"]["avg@2"] == pytest.approx(3 / 6)


def test_an_interrupted_run_resumes_from_the_scored_problems(tokenizer, tmp_path):
    out = str(tmp_path / "run")
    kwargs = dict(tokenizer=tokenizer, num_samples=2, output_dir=out, progress=False)
    benchmarks = math_and_mc(tokenizer)
    first = ScriptedBackend(tokenizer, benchmarks, graded_answer, per_call=1, fail_on_call=5)
    with pytest.raises(
        KeyboardInterrupt
    ):  # calls 1-4: problems 0 and 1 (greedy + sampled); dies on problem 2
        evaluate_model("model-a", benchmarks, backend=first, **kwargs)
    progress = tmp_path / "run" / "progress" / "math500.jsonl"
    assert [json.loads(line).get("id") for line in progress.read_text().splitlines()[1:]] == ["0", "1"]
    assert not (tmp_path / "run" / "results.json").exists()
    with progress.open("a") as f:
        f.write('{"id": "2", "greedy": {"te')  # a line cut off by the interruption

    benchmarks = math_and_mc(tokenizer)
    second = ScriptedBackend(tokenizer, benchmarks, graded_answer, per_call=1)
    resumed = evaluate_model("model-a", benchmarks, backend=second, **kwargs)
    assert {(b, p) for b, p, _ in second.generated} == {("math500", "2"), ("math500", "3"), ("mmlu_pro", "0"), ("mmlu_pro", "1")}  # fmt: skip

    benchmarks = math_and_mc(tokenizer)
    straight = evaluate_model(
        "model-a", benchmarks, backend=ScriptedBackend(tokenizer, benchmarks, graded_answer), tokenizer=tokenizer,
        num_samples=2, progress=False,
    )  # fmt: skip
    assert resumed.metrics == straight.metrics
    assert [p["samples"] for p in resumed.benchmarks["math500"].problems] == [
        p["samples"] for p in straight.benchmarks["math500"].problems
    ]

    # A finished run: nothing is generated again (no backend, no model needed).
    again = evaluate_model("model-a", math_and_mc(tokenizer), **kwargs)
    assert again.backend.startswith("none") and again.metrics == resumed.metrics

    # Other settings in the same directory: refused, with the differing field named; or started over.
    with pytest.raises(EvaluationInputError) as e:
        evaluate_model("model-a", math_and_mc(tokenizer), temperature=1.0, **kwargs)
    assert "temperature" in one_line_error(e) and "--overwrite" in str(e.value)
    benchmarks = math_and_mc(tokenizer)
    third = ScriptedBackend(tokenizer, benchmarks, graded_answer)
    evaluate_model("model-a", benchmarks, backend=third, temperature=1.0, overwrite=True, **kwargs)
    assert len(third.generated) == 2 * 6


def test_markdown_table_has_the_papers_layout(tokenizer):
    rows = [{"prompt": "p", "answer": "a"}]

    def run(label, score):
        benches = [
            benchmark_from_dataset(name, rows, lambda completions, **kw: [score] * len(completions), group=group,
                                   label=BENCHMARKS[name].label)
            for name, group in (("olympiadbench", "math"), ("aime24", "math"), ("gpqa_diamond", "ood"))
        ] + [benchmark_from_dataset("general_points_id", rows, lambda completions, **kw: [1.0] * len(completions),
                                    group="general_points", label="ID")]  # fmt: skip
        backend = ScriptedBackend(tokenizer, benches, lambda b, p, n, g: ["x"] * n)
        return evaluate_model("m", benches, tokenizer=tokenizer, backend=backend, num_samples=1, model_label=label,
                              progress=False)  # fmt: skip

    table = markdown_tables([run("base", 0.0), run("AMFT", 1.0)])
    lines = table.splitlines()
    assert (
        "| Model | AIME24 | Olympiad | Avg. (math) | GPQA-D | Avg. (OOD) |" in lines
    )  # the paper's column order
    assert "| base | 0.0 | 0.0 | 0.0 | 0.0 | 0.0 |" in lines
    assert "| AMFT | 100.0 | 100.0 | 100.0 | 100.0 | 100.0 |" in lines
    assert "| Model | ID |" in lines and "| AMFT | 100.0 |" in lines
    assert "avg@1 on Olympiad, AIME24, GPQA-D, ID" in table


def test_evaluate_metric_module_loads_by_path():
    evaluate = pytest.importorskip("evaluate")
    from amft_trl.evaluation import METRIC_PATH

    math_metric = evaluate.load(METRIC_PATH, "math")
    result = math_metric.compute(
        predictions=[["\\boxed{\\frac{1}{2}}", "\\boxed{3}"], ["\\boxed{", "\\boxed{7}"]],
        references=["0.5", "7"],
    )
    assert result["accuracy"] == pytest.approx(0.5) and result["num_samples"] == 2
    assert result["pass@2"] == pytest.approx(1.0) and result["pass@1"] == pytest.approx(0.5)
    mc = evaluate.load(METRIC_PATH, "multiple_choice")
    assert (
        mc.compute(predictions=["The answer is (B)", "\\boxed{A}"], references=["B", "2"])["accuracy"] == 0.5
    )
