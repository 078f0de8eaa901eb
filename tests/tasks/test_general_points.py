"""Tests of amft_trl.tasks.general_points: rules, solver (against brute force), parser, reward, datasets."""

from __future__ import annotations

import itertools
import json
import random
from fractions import Fraction

import pytest

from amft_trl.tasks import general_points as gp
from amft_trl.tasks.general_points import (
    build_general_points_datasets,
    card_value,
    demonstration,
    evaluate_formula,
    general_points_reward,
    generate_hands,
    hand_values,
    is_solvable,
    make_prompt,
    rl_prompt_dataset,
    sft_dataset,
    solve,
)


def brute_force_reachable(values: list[int]) -> set[Fraction]:
    """Every value reachable from `values` (each used once) with + - * /: DP over subsets of indices.

    Independent of the solver, which reduces pairs of numbers recursively; this one combines the values
    of complementary sub-multisets.
    """
    n = len(values)
    reach: dict[int, set[Fraction]] = {1 << i: {Fraction(v)} for i, v in enumerate(values)}
    for mask in sorted(range(1, 1 << n), key=lambda m: bin(m).count("1")):
        if mask in reach:
            continue
        out: set[Fraction] = set()
        sub = (mask - 1) & mask
        while sub:
            rest = mask ^ sub
            for a in reach[sub]:
                for b in reach[rest]:
                    out.update((a + b, a - b, a * b))
                    if b != 0:
                        out.add(a / b)
            sub = (sub - 1) & mask
        reach[mask] = out
    return reach[(1 << n) - 1]


def random_hands(rng: random.Random, count: int, num_cards: int) -> list[list[str]]:
    return [[rng.choice(gp.RANKS) for _ in range(num_cards)] for _ in range(count)]


# ------------------------------------------------------------------------------------------ rules


@pytest.mark.parametrize(
    ("card", "rule", "value"),
    [
        ("A", "id", 1),
        ("A", "ood", 1),
        ("7", "id", 7),
        ("10", "ood", 10),
        ("J", "id", 10),
        ("Q", "id", 10),
        ("K", "id", 10),
        ("J", "ood", 11),
        ("Q", "ood", 12),
        ("K", "ood", 13),
    ],
)
def test_card_values(card, rule, value):
    assert card_value(card, rule) == value


@pytest.mark.parametrize(
    ("card", "rule"), [("1", "id"), ("11", "id"), ("Joker", "ood"), ("K", "vision"), ("k", "id")]
)
def test_bad_card_or_rule_is_a_clear_error(card, rule):
    with pytest.raises(ValueError, match="card|face_card_rule"):
        card_value(card, rule)


@pytest.mark.parametrize(
    ("rule", "phrase"),
    [("id", "'J', 'Q', and 'K' all count as '10'"), ("ood", "count as '11', '12', and '13', respectively")],
)
def test_prompt_states_the_rule_in_words(rule, phrase):
    prompt = make_prompt(["A", "3", "K", "6"], rule)
    assert phrase in prompt
    assert '["A", "3", "K", "6"]' in prompt
    assert "24" in prompt and '"formula"' in prompt


# ------------------------------------------------------------------------------------------ solver


def test_solver_agrees_with_brute_force_on_random_hands():
    rng = random.Random(1234)
    seen = {True: 0, False: 0}
    for num_cards, target, count in [(4, 24, 100), (3, 10, 60), (2, 12, 30), (5, 60, 3)]:
        for hand in random_hands(rng, count, num_cards):
            for rule in gp.FACE_CARD_RULES:
                values = hand_values(hand, rule)
                expected = Fraction(target) in brute_force_reachable(values)
                formula = solve(values, target)
                assert (formula is not None) == expected, (hand, rule, target)
                assert is_solvable(values, target) == expected
                seen[expected] += 1
                if formula is not None:  # the solver's formula is a valid answer by the parser too
                    value, numbers = evaluate_formula(formula)
                    assert value == target
                    assert sorted(numbers) == sorted(values)
    assert seen[True] > 50 and seen[False] > 50  # both solvable and unsolvable hands were checked


@pytest.mark.parametrize(
    ("values", "target", "solvable"),
    [
        ([3, 3, 8, 8], 24, True),  # needs a fraction: 8 / (3 - 8/3)
        ([1, 5, 5, 5], 24, True),  # 5 * (5 - 1/5)
        ([1, 1, 1, 1], 24, False),
        ([10, 10, 10, 10], 24, False),
        ([1, 6, 11, 13], 24, True),
        ([24], 24, True),
        ([2, 3], 5, True),
        ([2, 3], 7, False),
    ],
)
def test_solver_known_hands(values, target, solvable):
    assert is_solvable(values, target) is solvable
    if solvable:
        value, numbers = evaluate_formula(solve(values, target))
        assert value == target and sorted(numbers) == sorted(values)


@pytest.mark.parametrize("values", [[], [1] * 6, [1.5, 2, 3, 4], ["1", 2, 3, 4]])
def test_solver_rejects_bad_hands(values):
    with pytest.raises(ValueError):
        solve(values)


# ------------------------------------------------------------------------------------------ parser


@pytest.mark.parametrize(
    ("formula", "value", "numbers"),
    [
        ("10*3-8+2", Fraction(24), [10, 3, 8, 2]),
        ("10*3-8+2=24", Fraction(24), [10, 3, 8, 2]),
        ("8/(3-8/3)", Fraction(24), [8, 3, 8, 3]),
        (" ( 1 + 2 ) * 3 ", Fraction(9), [1, 2, 3]),
        ("2-3-4", Fraction(-5), [2, 3, 4]),  # left-associative
        ("12/4/3", Fraction(1), [12, 4, 3]),
        ("1/3", Fraction(1, 3), [1, 3]),
    ],
)
def test_evaluate_formula_valid(formula, value, numbers):
    assert evaluate_formula(formula) == (value, numbers)


@pytest.mark.parametrize(
    "formula",
    [
        "",
        "2**3",
        "2^3",
        "-3+27",
        "+3",
        "(1+2",
        "1+2)",
        "()",
        "1/0",
        "6/(3-3)",
        "abs(-24)",
        "__import__('os')",
        "x+1",
        "1.5*16",
        "24=25",
        "1+1=2=2",
        "１２+１２",
        "١٢+١٢",
        "3\t+ 4",
        "9" * 5000,
        "10" + "0" * 10000,
        "(" * 50 + "1" + ")" * 50,
        "1+" * 150 + "1",
        "2 3",
        "6*4=24.0",
    ],
)
def test_evaluate_formula_invalid_is_none(formula):
    assert evaluate_formula(formula) is None


def test_evaluate_formula_checks_the_right_hand_side_against_the_target():
    assert evaluate_formula("4*6=24", target=24) is not None
    assert evaluate_formula("4*6=24", target=10) is None


# ------------------------------------------------------------------------------------------ reward

CARDS = ["Q", "8", "3", "2"]  # the paper's case study: 10*3-8+2 = 24 under the ID rule


def answer(formula: str, cards=CARDS, numbers=(10, 8, 3, 2)) -> str:
    return json.dumps({"cards": list(cards), "number": list(numbers), "formula": formula})


REWARD_CASES = [
    # (id, completion, rule, target, expected)
    ("paper-correct", answer("10*3-8+2=24"), "id", 24, 1.0),
    ("no-equals", answer("10*3-8+2"), "id", 24, 1.0),
    ("paper-sft-hallucinated-4", answer("(10 + 2) * (8 / 4)"), "id", 24, 0.0),
    ("paper-rl-wrong-sum", answer("10+8+10+2=30"), "id", 24, 0.0),
    ("wrong-rhs", answer("10*3-8+2=25"), "id", 24, 0.0),
    ("value-not-24", answer("10*3-8-2"), "id", 24, 0.0),
    ("card-unused", answer("10*3-8+2-2+2"), "id", 24, 0.0),
    ("card-used-twice", answer("10*3-8+2+3-3"), "id", 24, 0.0),
    ("ood-rule-q-is-12", answer("12*3-8-2*2"), "ood", 24, 0.0),  # uses 2 twice
    ("ood-correct", answer("(12-8)*3*2"), "ood", 24, 1.0),
    ("ood-with-id-values", answer("10*3-8+2"), "ood", 24, 0.0),
    ("other-target", answer("10+8+3+2=23"), "id", 23, 1.0),
    ("formula-of-another-hand", answer("8/(3-8/3)", ["8", "3", "8", "3"], [8, 3, 8, 3]), "id", 24, 0.0),
    (
        "single-quotes",
        "{'cards': ['Q','8','3','2'], 'number': [10,8,3,2], 'formula': '10*3-8+2'}",
        "id",
        24,
        1.0,
    ),
    ("in-code-fence", "Here you go:\n```json\n" + answer("2+10*3-8") + "\n```", "id", 24, 1.0),
    ("in-code-fence-wrong", "```json\n" + answer("(10-8+2)*3*2") + "\n```", "id", 24, 0.0),  # 2 twice
    ("last-formula-wins", answer("1+1") + " sorry: " + answer("10*3-8+2"), "id", 24, 1.0),
    ("after-think", "<think>" + answer("1+1") + "</think>" + answer("2+10*3-8"), "id", 24, 1.0),
    ("think-nothing-after", "<think>" + answer("10*3-8+2") + "</think>", "id", 24, 0.0),
    ("unclosed-think", "<think>" + answer("10*3-8+2"), "id", 24, 0.0),
    ("no-json", "10*3-8+2=24", "id", 24, 0.0),
    ("empty", "", "id", 24, 0.0),
    ("garbage", '{{{{"formula": "', "id", 24, 0.0),
    ("power", answer("(10-8)**3*3"), "id", 24, 0.0),
    ("names", answer("__import__('os').system('echo')"), "id", 24, 0.0),
    ("call", answer("max(10,8,3,2)"), "id", 24, 0.0),
    ("div-zero", answer("10*3-8+2+0/(3-3)"), "id", 24, 0.0),
    ("unary-minus", answer("-8+10*3+2"), "id", 24, 0.0),
    ("huge-number", answer("9" * 5000), "id", 24, 0.0),
    ("deep-nesting", answer("(" * 500 + "10*3-8+2" + ")" * 500), "id", 24, 0.0),
    ("unicode-digits", answer("١٠*3-8+2"), "id", 24, 0.0),
    ("fullwidth-digits", answer("１０*3-8+2"), "id", 24, 0.0),
    ("decimal", answer("10.0*3-8+2"), "id", 24, 0.0),
]


@pytest.mark.parametrize(
    ("completion", "rule", "target", "expected"),
    [c[1:] for c in REWARD_CASES],
    ids=[c[0] for c in REWARD_CASES],
)
def test_general_points_reward_table(completion, rule, target, expected):
    assert general_points_reward([completion], [CARDS], [rule], [target]) == [expected]
    conversational = [{"role": "assistant", "content": completion}]
    assert general_points_reward([conversational], [CARDS], rule, target) == [expected]


def test_general_points_reward_fraction_solution():
    completion = answer("8/(3-8/3)", ["8", "3", "8", "3"], [8, 3, 8, 3])
    assert general_points_reward([completion], [["8", "3", "8", "3"]], ["id"]) == [1.0]


@pytest.mark.parametrize(
    ("cards", "rule", "target"),
    [(["Z", "8", "3", "2"], "id", 24), (CARDS, "vision", 24), (CARDS, "id", "twenty-four"), (None, "id", 24)],
    ids=["bad-card", "bad-rule", "bad-target", "no-cards"],
)
def test_general_points_reward_bad_columns_score_zero(cards, rule, target):
    assert general_points_reward([answer("10*3-8+2")], [cards], [rule], [target]) == [0.0]


def test_general_points_reward_length_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="2 completions but 1 hands"):
        general_points_reward(["a", "b"], [CARDS], "id")


def test_demonstrations_score_one_and_shuffled_ones_do_not():
    hands = generate_hands(40, split="train", seed=3)
    demos = [demonstration(h, "id") for h in hands]
    assert general_points_reward(demos, hands, "id") == [1.0] * len(hands)
    for demo, hand in zip(demos, hands):
        parsed = json.loads(demo)
        assert parsed["cards"] == hand and parsed["number"] == hand_values(hand, "id")
        assert parsed["formula"].endswith("=24")
    rotated = hands[1:] + hands[:1]
    assert sum(general_points_reward(demos, rotated, "id")) < len(hands) / 2


def test_demonstration_of_unsolvable_hand_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot reach 24"):
        demonstration(["A", "A", "A", "A"], "id")


# ------------------------------------------------------------------------------------------ hands


def test_generate_hands_is_deterministic_and_solvable():
    first = generate_hands(30, split="train", seed=7)
    assert first == generate_hands(30, split="train", seed=7)
    assert first != generate_hands(30, split="train", seed=8)
    assert len({tuple(sorted(h)) for h in first}) == 30
    for hand in first:
        assert len(hand) == 4 and all(card in gp.RANKS for card in hand)
        assert is_solvable(hand_values(hand, "id"))


def test_splits_share_no_hands_even_up_to_id_relabelling():
    def keys(split: str, rule: str) -> set:
        hands = generate_hands(150, split=split, face_card_rule=rule, seed=11)
        return {tuple(sorted(hand_values(h, "id"))) for h in hands}

    train, validation = keys("train", "id"), keys("validation", "id")
    test_id, test_ood = keys("test", "id"), keys("test", "ood")
    assert not train & validation
    assert not train & (test_id | test_ood)
    assert not validation & (test_id | test_ood)


@pytest.mark.parametrize(("num_cards", "target", "count"), [(3, 10, 10), (2, 12, 1), (5, 60, 10)])
def test_generate_hands_other_sizes_and_targets(num_cards, target, count):
    hands = generate_hands(count, split="validation", num_cards=num_cards, target=target, seed=0)
    assert len(hands) == count and all(len(h) == num_cards for h in hands)
    assert all(is_solvable(hand_values(h, "id"), target) for h in hands)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_hands": 5, "split": "dev"}, "split"),
        ({"num_hands": 5, "face_card_rule": "hard"}, "face_card_rule"),
        ({"num_hands": 5, "num_cards": 9}, "num_cards"),
        ({"num_hands": -1}, "num_hands"),
        ({"num_hands": 5, "split_fractions": (0.5, 0.5)}, "split_fractions"),
        ({"num_hands": 5, "split_fractions": (0.9, 0.2, -0.1)}, "split_fractions"),
        ({"num_hands": 10_000}, "Only"),
        ({"num_hands": 1, "num_cards": 1, "target": 24}, "Only"),
    ],
)
def test_generate_hands_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate_hands(**kwargs)


# ------------------------------------------------------------------------------------------ datasets


def test_build_general_points_datasets_roles_and_columns():
    data = build_general_points_datasets(num_train=20, num_validation=8, num_eval=8, seed=5)
    reward_columns = ["prompt", "cards", "face_card_rule", "target", "demonstration"]
    for name in ("rl", "validation", "eval_id", "eval_ood"):
        assert getattr(data, name).column_names == reward_columns
    assert data.sft.column_names == ["prompt", "completion"]
    assert (len(data.rl), len(data.sft), len(data.validation), len(data.eval_id), len(data.eval_ood)) == (
        20,
        20,
        8,
        8,
        8,
    )
    assert set(data.rl["face_card_rule"]) == {"id"} and set(data.eval_ood["face_card_rule"]) == {"ood"}
    assert set(data.rl["target"]) == {24}
    # SFT demonstrations are the RL hands, answered correctly; the RL rows carry the same answer (HPT's column).
    assert list(data.sft["prompt"]) == list(data.rl["prompt"])
    assert list(data.rl["demonstration"]) == list(data.sft["completion"])
    assert (
        general_points_reward(
            data.sft["completion"], data.rl["cards"], data.rl["face_card_rule"], data.rl["target"]
        )
        == [1.0] * 20
    )
    # The rule in each prompt is the rule of its row.
    assert all("'10'." in p for p in data.eval_id["prompt"])
    assert all("'13', respectively" in p for p in data.eval_ood["prompt"])
    # Evaluation hands are solvable under their own rule and never seen in training or validation.
    seen = {tuple(sorted(h)) for h in list(data.rl["cards"]) + list(data.validation["cards"])}
    for row in list(data.eval_id) + list(data.eval_ood):
        assert tuple(sorted(row["cards"])) not in seen
        assert is_solvable(hand_values(row["cards"], row["face_card_rule"]), row["target"])


def test_build_general_points_datasets_conversational_and_smaller_variant():
    data = build_general_points_datasets(
        num_train=6, num_validation=3, num_eval=3, num_cards=3, target=10, conversational=True
    )
    assert data.rl[0]["prompt"][0]["role"] == "user"
    assert "evaluates to 10" in data.rl[0]["prompt"][0]["content"]
    assert data.sft[0]["completion"][0]["role"] == "assistant"
    assert set(data.rl["target"]) == {10} and all(len(c) == 3 for c in data.rl["cards"])
    completions = data.sft["completion"]
    assert (
        general_points_reward(completions, data.rl["cards"], data.rl["face_card_rule"], data.rl["target"])
        == [1.0] * 6
    )


def test_low_level_builders():
    hands = [["A", "2", "3", "4"], ["K", "K", "2", "2"]]
    rl = rl_prompt_dataset(hands, "ood", target=24)
    assert rl["cards"] == hands and rl["face_card_rule"] == ["ood", "ood"]
    sft = sft_dataset(hands, "ood")
    assert json.loads(sft[1]["completion"])["number"] == [13, 13, 2, 2]
    assert (
        len(rl_prompt_dataset([], "id")) == 0 and rl_prompt_dataset([], "id").column_names == rl.column_names
    )
    with pytest.raises(ValueError, match="cannot reach"):
        sft_dataset([["A", "A", "A", "A"]], "id")


def test_every_small_hand_matches_brute_force():
    # Exhaustive over all 3-card hands (multisets) for a small target, both rules.
    for combo in itertools.combinations_with_replacement(gp.RANKS, 3):
        for rule in gp.FACE_CARD_RULES:
            values = hand_values(combo, rule)
            assert is_solvable(values, 10) == (Fraction(10) in brute_force_reachable(values))
