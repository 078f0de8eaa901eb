"""Tests of amft_trl.tasks.general_points_visual: the reference verifier's scores, the rendering, the three
evaluation splits, and the sequential-revision environment."""

from __future__ import annotations

import builtins
import json
import time
from collections import Counter

import pytest

from amft_trl.tasks import general_points_visual as gpv
from amft_trl.tasks.general_points_visual import (
    REWARD_TABLE,
    GeneralPointsRevisionEnv,
    build_general_points_visual_datasets,
    card_boxes,
    general_points_verifier_reward,
    render_card,
    render_hand,
    verify_answer,
)

HAND = ["8", "3", "K", "3"]  # ID values 8, 3, 10, 3


def answer(formula, cards=("3", "3", "8", "K"), number=(3, 3, 8, 10)) -> str:
    return json.dumps({"cards": list(cards), "number": list(number), "formula": formula})


# Scores worked out by hand from the reference's `step_rewards` (utils_rl.py in LeslieTrue/SFTvsRL).
SCORE_TABLE = [
    ("correct", answer("3+3+8+10=24"), 5.0),
    ("correct, no '=' part", answer("3+3+8+10"), 5.0),
    (
        "cards read in another order, 10 used twice, a 3 unused",
        answer("3*8*(10/10)", cards=("K", "3", "8", "3")),
        -4.0,
    ),
    (
        "wrong card reading beats a correct formula",
        answer("3+3+8+10=24", cards=("3", "3", "8", "Q")),
        -1.5,
    ),
    ("three cards read", answer("3+3+8+10=24", cards=("3", "8", "K")), -1.5),
    ("spaces are illegal characters", answer("3 + 3 + 8 + 10"), -3.0),
    ("letters are illegal", answer("__import__('os')"), -3.0),
    ("no formula at all", '{"cards": ["3", "3", "8", "K"], "number": [3, 3, 8, 10]}', -3.0),
    ("two misplaced tokens add up", answer("10-8)*(3+3)("), -3.0 - 3.0),
    ("unary minus", answer("-3+3+8+10"), -3.0),
    ("a number not on the cards", answer("(10-8)*(4+3)"), -2.0 - 2.0),
    ("a number used twice, another unused", answer("(10-8)*(8+3)"), -2.0 - 2.0),
    ("a card left out", answer("8*3+3"), -2.0),
    ("no solution starts this way", answer("3*3+8+10"), -1.0),
    ("unbalanced but a prefix of a solution", answer("(10+8)+(3+3"), 1.0),
    ("division by zero, not a prefix", answer("10/(3-3)*8"), -1.0),
]


@pytest.mark.parametrize("name,text,expected", SCORE_TABLE, ids=[row[0] for row in SCORE_TABLE])
def test_verifier_scores_match_the_reference_table(name, text, expected):
    assert verify_answer(text, HAND, "id", 24, visual=True)[0] == expected


def test_language_variant_skips_the_card_reading_and_ood_rule_changes_values():
    wrong_reading = answer("3+3+8+10=24", cards=("A", "A", "A", "A"))
    assert verify_answer(wrong_reading, HAND, "id", visual=False)[0] == 5.0
    assert verify_answer(wrong_reading, HAND, "id", visual=True) == (-1.5, "you recognized wrong cards")
    # Under the OOD rule K is 13: the ID solution now uses a number that is not on the cards.
    assert verify_answer(answer("(10-8)*(3+3)"), HAND, "ood")[0] == -4.0
    ood_solution = answer("3*(13-8+3)", number=(3, 3, 8, 13))
    assert verify_answer(ood_solution, HAND, "ood")[0] == 5.0
    assert verify_answer(ood_solution, HAND, "id")[0] == -4.0  # 13 is not a card's value, 10 is unused


def test_exact_arithmetic_where_the_reference_floats_miss():
    # 8/(3-8/3) is 24 exactly; in floats it is 23.999999999999996 (the reference scores it -1).
    text = answer("8/(3-8/3)=24", cards=("3", "3", "8", "8"), number=(3, 3, 8, 8))
    assert verify_answer(text, ["8", "3", "8", "3"])[0] == 5.0


def test_hostile_answers_are_bounded_and_never_evaluated(monkeypatch):
    def no_eval(*args, **kwargs):
        raise AssertionError("eval called")

    monkeypatch.setattr(builtins, "eval", no_eval)
    hostile = [
        answer("9" * 100_000),
        answer("(" * 5000 + "3" + ")" * 5000),
        answer("10**10**10"),
        answer("3" + "*3" * 10_000),
        "{" * 200_000,
        '"formula": "' + "1+" * 100_000,
        answer("()()"),
        "\x00" * 1000,
        answer("８+８+３+３"),  # full-width digits
    ]
    start = time.perf_counter()
    scores = [verify_answer(text, HAND)[0] for text in hostile]
    assert time.perf_counter() - start < 5.0
    assert all(score < 0 for score in scores), scores
    assert general_points_verifier_reward([None, 42, [{"role": "assistant"}]], [HAND] * 3) == [-1.5] * 3


def test_reward_function_reads_conversational_completions_and_columns():
    completions = [
        [{"role": "assistant", "content": "thinking... " + answer("3+3+8+10=24")}],
        "the answer: " + answer("3+3+8+10=24", cards=("3", "3", "8", "J")),
    ]
    assert general_points_verifier_reward(
        completions, [HAND, HAND], ["id", "id"], [24, 24], [True, True]
    ) == [5, -1.5]
    assert general_points_verifier_reward(completions, [HAND, HAND], "id", 24, False) == [5.0, 5.0]
    with pytest.raises(ValueError, match="2 completions but 1 hands"):
        general_points_verifier_reward(completions, [HAND])


def test_reference_solutions_cover_the_reference_search_space():
    sols = gpv.reference_solutions([3, 3, 8, 10])
    assert "(10+8)+(3+3)" in sols and "3+3+8+10" in sols and "3*8*(10-3)" not in sols
    for s in sols:
        assert sorted(
            int(t)
            for t in s.replace("(", " ")
            .replace(")", " ")
            .replace("+", " ")
            .replace("-", " ")
            .replace("*", " ")
            .replace("/", " ")
            .split()
        ) == [3, 3, 8, 10]
    assert gpv.reference_solutions([1, 1, 1, 1]) == frozenset()


# --------------------------------------------------------------------------------------- revision


def test_revision_ends_at_the_first_correct_answer_and_scores_the_outcome():
    env = GeneralPointsRevisionEnv(verify_iter=5)
    env.reset(cards=HAND, face_card_rule="id", target=24, visual=True)
    first = env.submit_answer(["3", "3", "8", "K"], [3, 3, 8, 10], "3*3+8+10")
    assert first.startswith("You failed this trial because") and "Attempts left: 4" in first
    assert env.get_reward() == -1.0 and not env.done
    assert env.submit_answer(["3", "3", "8", "K"], [3, 3, 8, 10], "3+3+8+10=24") == "Correct solution."
    assert env.done and env.get_reward() == 5.0
    # After the correct answer nothing is verified any more: a later wrong answer changes nothing.
    assert "already solved" in env.submit_answer(["A"], [1], "1")
    assert env.scores == [-1.0, 5.0] and env.get_reward() == 5.0 and env.episode_return == 4.0


def test_revision_ends_at_the_turn_limit():
    env = GeneralPointsRevisionEnv(verify_iter=3)
    env.reset(cards=HAND, face_card_rule="id", target=24)
    replies = [env.submit_answer(["3", "3", "8", "K"], [3, 3, 8, 10], "3*3+8+10") for _ in range(5)]
    assert len(env.scores) == 3 and env.done
    assert "Attempts left: 0" in replies[2] and "no attempts left" in replies[3]
    assert env.get_reward() == -1.0
    # The correct answer after the limit is not verified.
    env.submit_answer(["3", "3", "8", "K"], [3, 3, 8, 10], "3+3+8+10")
    assert env.get_reward() == -1.0 and not env.solved
    env.reset(cards=HAND)
    assert env.get_reward() == REWARD_TABLE["ILLEGAL_FORMULA"] and env.scores == []  # nothing submitted
    with pytest.raises(ValueError, match="verify_iter"):
        GeneralPointsRevisionEnv(verify_iter=0)


# --------------------------------------------------------------------------------------- rendering


def test_rendering_is_deterministic_and_each_card_is_drawn_where_recorded():
    cards, suits = ["10", "K", "A", "7"], ["H", "S", "D", "C"]
    image = render_hand(cards, suits, 256)
    assert image.tobytes() == render_hand(cards, suits, 256).tobytes()
    boxes = card_boxes(4, 256)
    width = boxes[0][2] - boxes[0][0]
    for box, rank, suit in zip(boxes, cards, suits):
        assert image.crop(box).tobytes() == render_card(rank, suit, width).tobytes()
    # Ranks are told apart by their pixels, suits too; red suits are red, black ones are not.
    faces = {r: render_card(r, "S", width).tobytes() for r in gpv.RANKS}
    assert len(set(faces.values())) == len(gpv.RANKS)
    assert len({render_card("7", s, width).tobytes() for s in gpv.SUITS}) == 4

    def red_pixels(img):
        return sum(1 for r, g, b in img.getdata() if r > 150 and g < 80 and b < 80)

    assert red_pixels(render_card("Q", "H", width)) > 50 and red_pixels(render_card("Q", "D", width)) > 50
    assert red_pixels(render_card("Q", "S", width)) == 0 and red_pixels(render_card("Q", "C", width)) == 0
    with pytest.raises(ValueError, match="one suit per card"):
        render_hand(cards, suits[:3])
    with pytest.raises(ValueError, match="resolution must be at least 113 pixels for 4 cards, got 64"):
        render_hand(cards, suits, 64)
    with pytest.raises(ValueError, match="Unknown rank"):
        render_card("11", "H")


@pytest.fixture(scope="module")
def datasets():
    return build_general_points_visual_datasets(6, 3, 4, resolution=128, revision=True)


def test_the_images_show_the_recorded_cards(datasets):
    for split in (datasets.rl, datasets.eval_ood_rule, datasets.eval_ood_visual):
        for row in split:
            (image,) = row["images"]
            assert image.tobytes() == render_hand(row["cards"], row["suits"], 128).tobytes()
            assert row["prompt"][0]["content"][0]["type"] == "image"


def test_splits_are_disjoint_and_follow_the_reference(datasets):
    def hands(ds):
        return {tuple(sorted(h)) for h in ds["cards"]}

    named = {
        "rl": datasets.rl,
        "validation": datasets.validation,
        "eval_id": datasets.eval_id,
        "eval_ood_rule": datasets.eval_ood_rule,
        "eval_ood_visual": datasets.eval_ood_visual,
    }
    sets = {name: hands(ds) for name, ds in named.items()}
    names = list(sets)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not sets[a] & sets[b], (a, b)
    assert set(datasets.eval_ood_rule["face_card_rule"]) == {"ood"}
    assert all(any(c in ("J", "Q", "K") for c in h) for h in datasets.eval_ood_rule["cards"])
    assert (
        set(datasets.eval_id["face_card_rule"]) == set(datasets.eval_ood_visual["face_card_rule"]) == {"id"}
    )
    train_suits = {
        s
        for ds in (datasets.rl, datasets.validation, datasets.eval_id, datasets.eval_ood_rule)
        for row in ds["suits"]
        for s in row
    }
    assert train_suits <= {"S", "C"}
    assert {s for row in datasets.eval_ood_visual["suits"] for s in row} <= {"H", "D"}
    assert "'11', '12', and '13'" in datasets.eval_ood_rule[0]["prompt"][0]["content"][1]["text"]


def test_demonstrations_are_revision_conversations_the_environment_accepts(datasets):
    assert len(datasets.sft) == len(datasets.rl)
    for demo, prompt in zip(datasets.sft, datasets.rl):
        call, tool, final = demo["completion"]
        assert tool == {**tool, "role": "tool", "content": "Correct solution."}
        env = GeneralPointsRevisionEnv()
        env.reset(cards=prompt["cards"], face_card_rule="id", target=24)
        args = call["tool_calls"][0]["function"]["arguments"]
        assert env.submit_answer(**args) == "Correct solution." and env.get_reward() == 5.0
        assert verify_answer(final["content"], prompt["cards"])[0] == 5.0
        assert Counter(args["cards"]) == Counter(prompt["cards"])


def test_language_variant_and_bad_arguments():
    d = build_general_points_visual_datasets(2, 1, 1, visual=False)
    assert "images" not in d.rl.column_names and d.rl[0]["visual"] is False
    assert json.dumps(d.rl[0]["cards"]) in d.rl[0]["prompt"][0]["content"]
    assert verify_answer(d.sft[0]["completion"][0]["content"], d.rl[0]["cards"], visual=False)[0] == 5.0
    with pytest.raises(ValueError, match="ood_color must differ"):
        build_general_points_visual_datasets(1, 1, 1, ood_color="black")
    with pytest.raises(ValueError, match="test hands of 2 cards are left for the .* evaluation split"):
        build_general_points_visual_datasets(0, 0, 10_000, num_cards=2, target=24)
