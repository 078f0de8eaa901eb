"""Tests of amft_trl.rewards: math accuracy, boxed format, multiple choice (general points: see
tasks/test_general_points.py)."""

from __future__ import annotations

import threading
import time

import pytest

from amft_trl import rewards
from amft_trl.rewards import (
    boxed_format_reward,
    general_points_reward,
    math_accuracy_reward,
    multiple_choice_reward,
)

# A final answer that makes sympy compute 9^(9^(9^9)): math-verify never returns on it without a
# hard time limit (a SIGALRM cannot interrupt the big-integer power either).
PATHOLOGICAL = r"The answer is \boxed{9^{9^{9^{9}}}}"


def conv(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


MATH_CASES = [
    # (id, completion, gold, expected)
    ("boxed-int", r"So the result is \boxed{12}.", "12", 1.0),
    ("boxed-frac", r"Thus \boxed{\frac{1}{3}}", r"\frac{1}{3}", 1.0),
    ("equivalent-form", r"\boxed{\frac{2}{6}}", r"\frac{1}{3}", 1.0),
    ("tuple", r"We get \boxed{(2, 1)}", "(2,1)", 1.0),
    ("polynomial", r"\boxed{1 + 2x + x^2}", "x^2+2x+1", 1.0),
    ("sqrt", r"\boxed{\sqrt{2}}", r"\sqrt{2}", 1.0),
    ("no-box-anchored", r"The final answer is $\frac{1}{3}$.", r"\frac{1}{3}", 1.0),
    ("last-box-wins", r"First \boxed{5}, no wait: \boxed{7}", "7", 1.0),
    ("last-box-wrong", r"First \boxed{7}, no wait: \boxed{5}", "7", 0.0),
    ("nested-braces", r"\boxed{\frac{\sqrt{4}}{2}}", "1", 1.0),
    ("escaped-braces", r"\boxed{\{1, 2\}}", r"\{1,2\}", 1.0),
    ("escaped-braces-wrong", r"\boxed{\{1, 3\}}", r"\{1,2\}", 0.0),
    ("after-think", r"<think>maybe \boxed{3}</think> Final: \boxed{4}", "4", 1.0),
    ("only-think-has-answer", r"<think>so \boxed{4}</think> I am not sure.", "4", 0.0),
    ("think-nothing-after", r"<think>so \boxed{4}</think>", "4", 0.0),
    ("think-whitespace-after", "<think>so \\boxed{4}</think>\n  \n", "4", 0.0),
    ("unclosed-think", r"<think>so \boxed{4} and then I ran out of tokens", "4", 0.0),
    ("wrong", r"\boxed{13}", "12", 0.0),
    ("unclosed-box", r"\boxed{12", "12", 0.0),
    ("empty-box", r"\boxed{}", "12", 0.0),
    ("empty", "", "12", 0.0),
    ("garbage", "}{}{\\\\boxed{{{{$$$", "12", 0.0),
    ("binary-garbage", "\x00\x01\ufffd\u202e", "12", 0.0),
    ("huge-literal", r"\boxed{" + "9" * 5000 + "}", "12", 0.0),
    ("huge-power-text", r"\boxed{10^{10000}}", "12", 0.0),
    ("deep-parens", r"\boxed{" + "(" * 300 + "1" + ")" * 300 + "}", "1", 0.0),
    ("unicode-digits", r"\boxed{١٢}", "12", 0.0),
    ("fullwidth-digits", r"\boxed{１２}", "12", 0.0),
    ("too-long-answer", r"\boxed{" + "1+" * 2000 + "1}", "2001", 0.0),
]


@pytest.mark.parametrize(
    ("completion", "gold", "expected"), [c[1:] for c in MATH_CASES], ids=[c[0] for c in MATH_CASES]
)
def test_math_accuracy_reward_table(completion, gold, expected):
    assert math_accuracy_reward([completion], [gold]) == [expected]


# Shorthand LaTeX that TeX renders correctly (a macro argument may be a single token instead of a braced group;
# spacing commands change spacing only). Each pair is the same number, so grading must give 1.0 both ways: the
# completion's boxed answer against the gold, and the gold's form as the answer against the shorthand as gold.
SHORTHAND = [
    ("frac12", r"\frac12", r"\frac{1}{2}"),
    ("neg-frac12", r"-\frac12", r"-\frac{1}{2}"),
    ("frac-spaced", r"\frac 1 2", r"\frac{1}{2}"),
    ("frac-macro-arg", r"\frac1\pi", r"\frac{1}{\pi}"),
    ("frac-group-then-token", r"\frac{\sqrt3}2", r"\frac{\sqrt{3}}{2}"),
    ("sqrt2", r"\sqrt2", r"\sqrt{2}"),
    ("coef-sqrt3", r"2\sqrt3", r"2\sqrt{3}"),
    ("cube-root", r"\sqrt[3]2", r"\sqrt[3]{2}"),
    ("dfrac", r"\dfrac{1}{2}", r"\frac{1}{2}"),
    ("dfrac12", r"\dfrac12", r"\frac{1}{2}"),
    ("tfrac34", r"\tfrac34", r"\frac{3}{4}"),
    ("degrees", r"90^\circ", "90"),
    ("degrees-braced", r"90^{\circ}", "90"),
    ("percent", r"50\%", "50"),
    ("negative-thin-space", r"1\!000", "1000"),
    ("thin-space", r"1\,000", "1000"),
    ("medium-space", r"1\:000", "1000"),
    ("thin-space-unit", r"3\,\text{cm}", "3"),
    ("left-right-tuple", r"\left(1,2\right)", "(1,2)"),
    ("left-right-interval", r"\left[0,1\right)", "[0,1)"),
    ("frac-then-digit", r"\frac123", r"\frac{3}{2}"),  # TeX: \frac takes one token each: (1/2) * 3
    ("sqrt-then-digit", r"\sqrt23", r"3\sqrt{2}"),  # sqrt(2) * 3
]
# Different numbers (or order) in either direction: 0.0 both ways.
SHORTHAND_WRONG = [
    ("frac123-is-not-1/23", r"\frac123", r"\frac{1}{23}"),
    ("sqrt23-is-not-sqrt(23)", r"\sqrt23", r"\sqrt{23}"),
    ("frac12-is-not-2", r"\frac12", r"\frac{2}{1}"),
    ("tuple-reversed", r"\left(1,2\right)", "(2,1)"),
    ("interval-reversed", r"\left[0,1\right)", "(0,1]"),
]


@pytest.mark.parametrize(
    ("shorthand", "canonical"), [c[1:] for c in SHORTHAND], ids=[c[0] for c in SHORTHAND]
)
def test_math_accuracy_reward_reads_shorthand_latex_both_ways(shorthand, canonical):
    assert math_accuracy_reward([r"\boxed{" + shorthand + "}"], [canonical]) == [1.0]
    assert math_accuracy_reward([r"\boxed{" + canonical + "}"], [shorthand]) == [1.0]


@pytest.mark.parametrize(
    ("shorthand", "other"), [c[1:] for c in SHORTHAND_WRONG], ids=[c[0] for c in SHORTHAND_WRONG]
)
def test_math_accuracy_reward_shorthand_keeps_wrong_answers_wrong(shorthand, other):
    assert math_accuracy_reward([r"\boxed{" + shorthand + "}"], [other]) == [0.0]
    assert math_accuracy_reward([r"\boxed{" + other + "}"], [shorthand]) == [0.0]


def test_math_accuracy_reward_shorthand_in_an_unboxed_final_answer():
    assert math_accuracy_reward([r"The final answer is $\frac12$."], [r"\frac{1}{2}"]) == [1.0]


@pytest.mark.parametrize(
    ("text", "expanded"),
    [
        (r"\frac12", r"\frac{1}{2}"),
        (r"\frac123", r"\frac{1}{2}3"),
        (r"\frac 1 2", r"\frac{1}{2}"),
        (r"\frac1\pi", r"\frac{1}{\pi}"),
        (r"\frac{\sqrt3}2", r"\frac{\sqrt{3}}{2}"),
        (r"\sqrt[3]2", r"\sqrt[3]{2}"),
        (r"\dfrac{1}2", r"\dfrac{1}{2}"),
        (r"1\,000\!", "1000"),
        (r"\left(1,\;2\right)", r"\left(1,2\right)"),
        (r"\fraction12", r"\fraction12"),  # another control word: untouched
        (r"\\,x", r"\\,x"),  # a line break followed by a comma, not a thin space
        (r"\{1,2\}", r"\{1,2\}"),
        (r"\frac{1", r"\frac{1"),  # unclosed: copied
        ("", ""),
    ],
)
def test_tex_shorthand_is_expanded_as_tex_reads_it(text, expanded):
    assert rewards._expand_tex_shorthand(text) == expanded


def test_tex_shorthand_expansion_is_linear_on_hostile_input():
    """It runs in this process, on golds of any length too: no quadratic blow-up, no recursion error."""
    hostile = [
        "{" * 50_000 + "}" * 50_000,
        "\\frac{" * 20_000 + "}" * 20_000,
        "\\sqrt" * 20_000,
        "}{\\" * 20_000,
    ]
    start = time.monotonic()
    for text in hostile:
        rewards._expand_tex_shorthand(text)
    assert time.monotonic() - start < 5.0  # about 0.2 s on this project's 2-core CPU


def test_math_accuracy_reward_batch_standard_and_conversational_agree():
    texts = [c[1] for c in MATH_CASES]
    golds = [c[2] for c in MATH_CASES]
    expected = [c[3] for c in MATH_CASES]
    assert math_accuracy_reward(texts, golds) == expected
    assert math_accuracy_reward([conv(t) for t in texts], golds) == expected


@pytest.mark.parametrize(
    "gold",
    ["", "   ", None, r"\frac{", "{}{}"],
    ids=["empty", "blank", "none", "unclosed-frac", "braces"],
)
def test_math_accuracy_reward_unparseable_gold_is_none(gold):
    assert math_accuracy_reward([r"\boxed{1}"], [gold]) == [None]


@pytest.mark.parametrize(
    "completion",
    [None, 42, [], [{"role": "assistant"}], [{"content": None}], {"weird": "dict"}, [[["deep"]]]],
    ids=["none", "int", "empty-list", "no-content", "none-content", "dict", "nested-list"],
)
def test_math_accuracy_reward_malformed_completion_objects_score_zero(completion):
    assert math_accuracy_reward([completion], ["1"]) == [0.0]


def test_math_accuracy_reward_uses_last_assistant_message_and_text_parts():
    completion = [
        {"role": "assistant", "content": r"\boxed{1}"},
        {"role": "tool", "content": "tool output"},
        {
            "role": "assistant",
            "content": [{"type": "text", "text": r"Final: \boxed{"}, {"type": "text", "text": "2}"}],
        },
    ]
    assert math_accuracy_reward([completion, completion], ["2", "1"]) == [1.0, 0.0]


def test_math_accuracy_reward_length_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="2 completions but 1 solutions"):
        math_accuracy_reward(["a", "b"], ["1"])


def test_math_accuracy_reward_from_a_non_main_thread():
    results: list = []
    errors: list = []

    def work():
        try:
            results.append(
                math_accuracy_reward(
                    [r"\boxed{\frac{1}{2}}", r"\boxed{3}", conv(r"\boxed{0.5}")], ["1/2"] * 3
                )
            )
        except Exception as exc:  # pragma: no cover - the assertion below reports it
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert results == [[1.0, 0.0, 1.0]] * 3


@pytest.fixture
def short_timeout(monkeypatch):
    monkeypatch.setattr(rewards, "MATH_REWARD_TIMEOUT_SECONDS", 1.0)
    math_accuracy_reward([r"\boxed{1}"], ["1"])  # start the worker outside the timed region
    return rewards.MATH_REWARD_TIMEOUT_SECONDS


def _bound(timeout: float, n_completions: int, n_golds: int) -> float:
    # Each gold parse and each completion is one request, each bounded by the timeout; one more second
    # covers killing the stuck worker and spawning its replacement.
    return (n_completions + n_golds) * timeout + 1.0


def test_pathological_completion_returns_within_the_timeout_bound(short_timeout):
    start = time.monotonic()
    assert math_accuracy_reward([PATHOLOGICAL], ["7"]) == [0.0]
    assert time.monotonic() - start < _bound(short_timeout, 1, 1)
    # The killed worker is replaced: grading still works afterwards.
    assert math_accuracy_reward([r"\boxed{7}", PATHOLOGICAL, r"\boxed{7}"], ["7"] * 3) == [1.0, 0.0, 1.0]


def test_pathological_completion_in_a_non_main_thread(short_timeout):
    out: list = []
    start = time.monotonic()
    thread = threading.Thread(target=lambda: out.append(math_accuracy_reward([conv(PATHOLOGICAL)], ["7"])))
    thread.start()
    thread.join(timeout=60)
    assert out == [[0.0]]
    assert time.monotonic() - start < _bound(short_timeout, 1, 1)


def test_fallback_grades_in_process_when_the_worker_cannot_start(monkeypatch):
    monkeypatch.setattr(rewards, "_WORKER_SCRIPT", "/nonexistent/amft_worker.py")
    monkeypatch.setattr(rewards, "_worker", None)
    monkeypatch.setattr(rewards, "MATH_WORKER_START_TIMEOUT_SECONDS", 10.0)
    assert math_accuracy_reward([r"\boxed{4}", r"\boxed{5}", r"\boxed{4}"], ["4", "4", r"\frac{"]) == [
        1.0,
        0.0,
        None,
    ]
    assert rewards._worker is not None and rewards._worker.broken_reason
    rewards._worker.close()


BOXED_FORMAT_CASES = [
    ("one-box", r"The answer is \boxed{5}.", 1.0),
    ("one-box-nested", r"\boxed{\frac{1}{2}}", 1.0),
    ("box-with-space", r"\boxed {5}", 1.0),
    ("after-think", r"<think>\boxed{1} \boxed{2}</think> so \boxed{2}", 1.0),
    ("two-boxes", r"\boxed{1} or \boxed{2}", 0.0),
    ("no-box", "The answer is 5.", 0.0),
    ("empty-box", r"\boxed{}", 0.0),
    ("blank-box", r"\boxed{  }", 0.0),
    ("unclosed", r"\boxed{5", 0.0),
    ("unbalanced-inner", r"\boxed{\frac{1}{2}", 0.0),
    ("think-nothing-after", r"<think>\boxed{2}</think>", 0.0),
    ("unclosed-think", r"<think>\boxed{2}", 0.0),
    ("empty", "", 0.0),
    ("huge", r"\boxed{" + "9" * 5000 + "}", 0.0),
    ("deep-braces", r"\boxed{" + "{" * 3000 + "}" * 3000 + "}", 0.0),
    ("garbage", "\x00{}}{\\boxed", 0.0),
]


@pytest.mark.parametrize(
    ("completion", "expected"), [c[1:] for c in BOXED_FORMAT_CASES], ids=[c[0] for c in BOXED_FORMAT_CASES]
)
def test_boxed_format_reward_table(completion, expected):
    assert boxed_format_reward([completion]) == [expected]
    assert boxed_format_reward([conv(completion)]) == [expected]


MC_CASES = [
    ("boxed", r"... so \boxed{C}", "C", 1.0),
    ("boxed-parens", r"\boxed{(C)}", "C", 1.0),
    ("boxed-text", r"\boxed{\text{C}}", "C", 1.0),
    ("boxed-with-option-text", r"\boxed{C. 42 kg}", "C", 1.0),
    ("boxed-wrong", r"\boxed{B}", "C", 0.0),
    ("boxed-not-a-letter", r"\boxed{42}", "C", 0.0),
    ("boxed-two-letters", r"\boxed{CD}", "C", 0.0),
    ("answer-is-parens", "Therefore, the answer is (C).", "C", 1.0),
    ("answer-is-bare", "The answer is C", "C", 1.0),
    ("answer-colon", "Answer: C", "C", 1.0),
    ("answer-bold", "**Answer:** (D)", "D", 1.0),
    ("last-phrase-wins", "The answer is (A). Wait, re-checking... the answer is (B).", "B", 1.0),
    ("article-is-not-a-choice", "The answer is a number larger than 3.", "A", 0.0),
    ("word-is-not-a-choice", "The answer is Carbon.", "C", 0.0),
    ("lowercase-gold", "Answer: C", "c", 1.0),
    ("gold-in-parens", "Answer: C", "(C)", 1.0),
    ("gold-index", "Answer: C", 2, 1.0),
    ("gold-index-wrong", "Answer: C", 0, 0.0),
    ("mmlu-pro-letter-j", r"\boxed{J}", "J", 1.0),
    ("after-think", "<think>The answer is (A)</think> The answer is (B)", "B", 1.0),
    ("think-nothing-after", "<think>The answer is (B)</think>", "B", 0.0),
    ("no-answer", "I don't know.", "A", 0.0),
    ("empty", "", "A", 0.0),
    ("garbage", "((((((((((", "A", 0.0),
    ("huge", "Answer: " + "9" * 5000, "A", 0.0),
    ("fullwidth-letter", "Answer: Ｃ", "C", 0.0),
]


@pytest.mark.parametrize(
    ("completion", "gold", "expected"), [c[1:] for c in MC_CASES], ids=[c[0] for c in MC_CASES]
)
def test_multiple_choice_reward_table(completion, gold, expected):
    assert multiple_choice_reward([completion], [gold]) == [expected]
    assert multiple_choice_reward([conv(completion)], [gold]) == [expected]


@pytest.mark.parametrize("gold", ["", "AB", "42", None, -1, 26, True, 1.5], ids=repr)
def test_multiple_choice_reward_uninterpretable_gold_is_none(gold):
    assert multiple_choice_reward(["Answer: A"], [gold]) == [None]


def test_general_points_reward_is_reexported():
    from amft_trl.tasks.general_points import general_points_reward as original

    assert general_points_reward is original


def test_math_reward_without_the_math_extra_says_so_in_one_line(monkeypatch):
    """math-verify is the `math` extra, not a core dependency: the math reward names the extra when it is missing."""
    import importlib.util

    from amft_trl import rewards

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "math_verify" else real(name, *a)
    )
    with pytest.raises(ImportError) as error:
        rewards.math_accuracy_reward(["\\boxed{1}"], ["1"])
    assert str(error.value) == "the math reward needs math-verify: pip install 'amft-trl[math]'"
    monkeypatch.setattr(importlib.util, "find_spec", real)
    assert rewards.math_accuracy_reward(["\\boxed{1}"], ["1"]) == [1.0]
