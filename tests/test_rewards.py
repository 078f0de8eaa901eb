"""Tests of amft_trl.rewards: math accuracy, boxed format, multiple choice (general points: see
test_general_points.py)."""

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
