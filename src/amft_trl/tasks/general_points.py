"""General Points: the arithmetic card game of the AMFT paper (appendix C.1), text variant.

A hand of cards (A, 2-10, J, Q, K) is dealt; the model must write a formula with + - * / and
parentheses that uses each card's value exactly once and evaluates to the target (24 by default).
Two face-card rules test generalisation:

- `"id"` (in-distribution, training): 'J', 'Q' and 'K' all count as 10;
- `"ood"` (out-of-distribution, evaluation): 'J', 'Q' and 'K' count as 11, 12 and 13.

The answer format is the paper's JSON: `{"cards": [...], "number": [...], "formula": "..."}`.

This module provides the deterministic hand generator with disjoint train/validation/test splits, an
exact solver (rational arithmetic), a formula parser that never `eval`s, the reward
`general_points_reward`, and builders of `datasets.Dataset`s for the three AMFT roles (RL prompts, SFT
demonstrations, validation prompts) and for ID / OOD evaluation.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from typing import Any

from datasets import Dataset

from amft_trl._completions import completion_to_text, final_answer_segment, last_match

__all__ = [
    "DEFAULT_NUM_CARDS",
    "DEFAULT_TARGET",
    "FACE_CARD_RULES",
    "MAX_FORMULA_CHARS",
    "MAX_FORMULA_DEPTH",
    "MAX_NUMBER_DIGITS",
    "RANKS",
    "SPLITS",
    "GeneralPointsDatasets",
    "build_general_points_datasets",
    "card_value",
    "demonstration",
    "evaluate_formula",
    "general_points_reward",
    "generate_hands",
    "hand_values",
    "is_solvable",
    "make_prompt",
    "rl_prompt_dataset",
    "rule_description",
    "sft_dataset",
    "solve",
]

RANKS: tuple[str, ...] = ("A", "2", "3", "4", "5", "6", "7", "8", "9", "10", "J", "Q", "K")
FACE_CARD_RULES: tuple[str, ...] = ("id", "ood")
SPLITS: tuple[str, ...] = ("train", "validation", "test")
DEFAULT_TARGET = 24
DEFAULT_NUM_CARDS = 4
#: Cards per hand that the generator and solver accept (the exhaustive solver gets slow beyond 5).
MIN_NUM_CARDS, MAX_NUM_CARDS = 1, 5
#: Longest formula the reward parses; longer ones score 0.0.
MAX_FORMULA_CHARS = 200
#: Deepest parenthesis nesting the reward parses; deeper formulas score 0.0.
MAX_FORMULA_DEPTH = 16
#: Longest integer literal (in digits) the reward parses; `10**10000`-style numbers score 0.0.
MAX_NUMBER_DIGITS = 4

_FACE_VALUES = {"id": {"J": 10, "Q": 10, "K": 10}, "ood": {"J": 11, "Q": 12, "K": 13}}
_NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}


# --------------------------------------------------------------------------------------------- rules


def _check_rule(face_card_rule: str) -> str:
    if face_card_rule not in FACE_CARD_RULES:
        raise ValueError(f"face_card_rule must be one of {FACE_CARD_RULES}, got {face_card_rule!r}.")
    return face_card_rule


def card_value(card: str, face_card_rule: str) -> int:
    """Value of one card (`"A"`, `"2"`..`"10"`, `"J"`, `"Q"`, `"K"`) under a face-card rule.

    Raises:
        ValueError: for an unknown card or rule.
    """
    _check_rule(face_card_rule)
    if card == "A":
        return 1
    if card in _FACE_VALUES[face_card_rule]:
        return _FACE_VALUES[face_card_rule][card]
    if card in RANKS:
        return int(card)
    raise ValueError(f"Unknown card {card!r}; cards are {RANKS}.")


def hand_values(cards: Sequence[str], face_card_rule: str) -> list[int]:
    """Values of the cards of a hand, in order, under a face-card rule."""
    return [card_value(card, face_card_rule) for card in cards]


def rule_description(face_card_rule: str) -> str:
    """The face-card rule in words, as the prompts state it."""
    if _check_rule(face_card_rule) == "id":
        return "Note that 'J', 'Q', and 'K' all count as '10'."
    return "Note that 'J', 'Q', and 'K' count as '11', '12', and '13', respectively."


# --------------------------------------------------------------------------------------------- solver


@dataclass(frozen=True)
class _Node:
    value: Fraction
    text: str
    prec: int  # 3: a number, 2: a product or quotient, 1: a sum or difference


def _wrap(node: _Node, needs: bool) -> str:
    return f"({node.text})" if needs else node.text


def _combine(a: _Node, b: _Node) -> Iterator[_Node]:
    # Natural forms first (sums, products, larger minus smaller, ...) so demonstrations read well.
    if a.value < b.value:
        a, b = b, a
    yield _Node(a.value + b.value, f"{a.text}+{b.text}", 1)
    yield _Node(a.value * b.value, f"{_wrap(a, a.prec == 1)}*{_wrap(b, b.prec == 1)}", 2)
    yield _Node(a.value - b.value, f"{a.text}-{_wrap(b, b.prec == 1)}", 1)
    if b.value != 0:
        yield _Node(a.value / b.value, f"{_wrap(a, a.prec == 1)}/{_wrap(b, b.prec <= 2)}", 2)
    yield _Node(b.value - a.value, f"{b.text}-{_wrap(a, a.prec == 1)}", 1)
    if a.value != 0:
        yield _Node(b.value / a.value, f"{_wrap(b, b.prec == 1)}/{_wrap(a, a.prec <= 2)}", 2)


def _search(nodes: list[_Node], target: Fraction, dead: set[tuple[Fraction, ...]]) -> _Node | None:
    if len(nodes) == 1:
        return nodes[0] if nodes[0].value == target else None
    key = tuple(sorted(n.value for n in nodes))
    if key in dead:
        return None
    for i, j in itertools.combinations(range(len(nodes)), 2):
        rest = [n for k, n in enumerate(nodes) if k not in (i, j)]
        for combined in _combine(nodes[i], nodes[j]):
            found = _search([*rest, combined], target, dead)
            if found is not None:
                return found
    dead.add(key)
    return None


@lru_cache(maxsize=65536)
def _solve_sorted(values: tuple[int, ...], target: int) -> str | None:
    nodes = [_Node(Fraction(v), str(v), 3) for v in values]
    found = _search(nodes, Fraction(target), set())
    return None if found is None else found.text


def _check_values(values: Sequence[int]) -> tuple[int, ...]:
    values = tuple(values)
    if not MIN_NUM_CARDS <= len(values) <= MAX_NUM_CARDS:
        raise ValueError(f"A hand has {MIN_NUM_CARDS} to {MAX_NUM_CARDS} cards, got {len(values)}.")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"Card values must be integers, got {values!r}.")
    return values


def solve(values: Sequence[int], target: int = DEFAULT_TARGET) -> str | None:
    """An exact solution for a hand's card values, or None when there is none.

    Searches all ways of combining the values with + - * / (each used exactly once, any parenthesisation)
    in exact rational arithmetic, and returns the first formula found, with minimal parentheses:
    `solve([3, 3, 8, 8]) == "8/(3-8/3)"`, `solve([1, 1, 1, 1]) is None`. Deterministic.

    Raises:
        ValueError: for a hand with an unsupported number of cards or non-integer values.
    """
    values = _check_values(values)
    return _solve_sorted(tuple(sorted(values)), int(target))


def is_solvable(values: Sequence[int], target: int = DEFAULT_TARGET) -> bool:
    """Whether the card values can reach `target` with + - * / and parentheses, each used once."""
    return solve(values, target) is not None


# --------------------------------------------------------------------------------------------- parser


class _FormulaError(ValueError):
    pass


_TOKEN_CHARS = frozenset("0123456789+-*/() ")


def _tokenize(formula: str) -> list[str]:
    if any(ch not in _TOKEN_CHARS for ch in formula):  # letters, '**' excepted, unicode digits, '.', ...
        raise _FormulaError("unexpected character")
    tokens = re.findall(r"\d+|[+\-*/()]", formula)
    for token in tokens:
        if token.isdigit() and len(token) > MAX_NUMBER_DIGITS:
            raise _FormulaError("number too long")
    return tokens


class _Parser:
    """Recursive descent over `expr := term (('+'|'-') term)*`, `term := atom (('*'|'/') atom)*`,
    `atom := INT | '(' expr ')'`. No unary operators, no exponentiation."""

    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens
        self.pos = 0
        self.numbers: list[int] = []

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> str:
        token = self.peek()
        if token is None:
            raise _FormulaError("unexpected end")
        self.pos += 1
        return token

    def expr(self, depth: int) -> Fraction:
        value = self.term(depth)
        while self.peek() in ("+", "-"):
            op = self.take()
            rhs = self.term(depth)
            value = value + rhs if op == "+" else value - rhs
        return value

    def term(self, depth: int) -> Fraction:
        value = self.atom(depth)
        while self.peek() in ("*", "/"):
            op = self.take()
            rhs = self.atom(depth)
            if op == "*":
                value = value * rhs
            elif rhs == 0:
                raise _FormulaError("division by zero")
            else:
                value = value / rhs
        return value

    def atom(self, depth: int) -> Fraction:
        token = self.take()
        if token == "(":
            if depth >= MAX_FORMULA_DEPTH:
                raise _FormulaError("nested too deeply")
            value = self.expr(depth + 1)
            if self.take() != ")":
                raise _FormulaError("unbalanced parentheses")
            return value
        if token.isdigit():
            self.numbers.append(int(token))
            return Fraction(int(token))
        raise _FormulaError(f"unexpected token {token!r}")


def evaluate_formula(formula: str, target: int | None = None) -> tuple[Fraction, list[int]] | None:
    """Parse and evaluate a General Points formula exactly, without `eval`.

    Accepts integer literals, binary + - * /, and parentheses (at most `MAX_FORMULA_DEPTH` deep, at most
    `MAX_FORMULA_CHARS` characters, literals of at most `MAX_NUMBER_DIGITS` digits). One trailing
    `= N` is allowed (as in `"10*3-8+2=24"`): the equation must hold, and when `target` is given, `N`
    must equal it.

    Returns:
        `(value, numbers used)` or None when the formula is invalid (any other character, unary minus,
        `**`, division by zero, unbalanced parentheses, a wrong right-hand side, ...).
    """
    if not isinstance(formula, str) or len(formula) > MAX_FORMULA_CHARS:
        return None
    lhs, sep, rhs = formula.partition("=")
    rhs = rhs.strip()
    if sep and (not (rhs.isascii() and rhs.isdigit()) or len(rhs) > MAX_NUMBER_DIGITS):
        return None
    try:
        parser = _Parser(_tokenize(lhs))
        value = parser.expr(0)
        if parser.peek() is not None:
            return None
    except _FormulaError:
        return None
    if sep and (value != int(rhs) or (target is not None and int(rhs) != target)):
        return None  # a false equation, or one that claims another target
    return value, parser.numbers


_FORMULA_RE = re.compile(
    r"""["']formula["']\s*:\s*["']([^"'\n]{0,""" + str(MAX_FORMULA_CHARS) + r"""})["']"""
)


def _extract_formula(text: str) -> str | None:
    segment = final_answer_segment(text)
    if segment is None:
        return None
    last = last_match(_FORMULA_RE, segment)
    return None if last is None else last.group(1)


def _score(completion: Any, cards: Any, face_card_rule: Any, target: Any) -> float:
    try:
        values = hand_values(list(cards), str(face_card_rule))
        target = int(target)
    except (TypeError, ValueError):
        return 0.0
    formula = _extract_formula(completion_to_text(completion))
    if formula is None:
        return 0.0
    result = evaluate_formula(formula, target=target)
    if result is None:
        return 0.0
    value, numbers = result
    return 1.0 if value == target and Counter(numbers) == Counter(values) else 0.0


def _per_example(column: Any, n: int, name: str) -> list[Any]:
    if isinstance(column, (str, int)) or column is None:
        return [column] * n
    column = list(column)
    if len(column) != n:
        raise ValueError(f"general_points_reward got {n} completions but {len(column)} values of {name!r}.")
    return column


def general_points_reward(
    completions: Sequence[Any],
    cards: Sequence[Sequence[str]],
    face_card_rule: Sequence[str] | str,
    target: Sequence[int] | int = DEFAULT_TARGET,
    **kwargs: Any,
) -> list[float]:
    """Score 1.0 when a completion's formula uses each card's value exactly once and equals the target.

    The formula is read from the last `"formula": "..."` entry of the answer (the paper's JSON format;
    single quotes are accepted too), after the last `</think>` when that tag is present. It is parsed by
    `evaluate_formula`, never evaluated as code: only integers, + - * / and parentheses; exponentiation,
    names, calls, unary minus, division by zero, over-long or over-nested formulas all score 0.0.

    Args:
        completions: standard (`str`) or conversational (list of messages) completions.
        cards: each prompt's hand, e.g. `["A", "3", "K", "6"]`.
        face_card_rule: `"id"` (J = Q = K = 10) or `"ood"` (J, Q, K = 11, 12, 13), per prompt or one for all.
        target: the number to reach, per prompt or one for all (default 24).
        **kwargs: other dataset columns, ignored.

    Returns:
        1.0 or 0.0 per completion.
    """
    n = len(completions)
    cards_col = list(cards)
    if len(cards_col) != n:
        raise ValueError(f"general_points_reward got {n} completions but {len(cards_col)} hands.")
    rules = _per_example(face_card_rule, n, "face_card_rule")
    targets = _per_example(target, n, "target")
    return [_score(c, h, r, t) for c, h, r, t in zip(completions, cards_col, rules, targets)]


# --------------------------------------------------------------------------------------------- hands


def _check_fractions(split_fractions: Sequence[float]) -> tuple[float, float, float]:
    fractions = tuple(float(f) for f in split_fractions)
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(
            f"split_fractions must be three positive numbers (train, validation, test) summing to 1, "
            f"got {tuple(split_fractions)!r}."
        )
    return fractions  # type: ignore[return-value]


@lru_cache(maxsize=32)
def _split_pools(num_cards: int, seed: int, split_fractions: tuple[float, float, float]) -> dict[str, list]:
    """Partition every possible hand (a multiset of ranks) into train / validation / test.

    Hands whose values coincide under the ID rule (e.g. J-5-5-5 and Q-5-5-5) always land in the same
    split, so an ID test problem never appears, even relabelled, in training.
    """
    groups: dict[tuple[int, ...], list[tuple[str, ...]]] = {}
    for combo in itertools.combinations_with_replacement(range(len(RANKS)), num_cards):
        if max(Counter(combo).values()) > 4:  # a deck has four cards of each rank
            continue
        hand = tuple(RANKS[i] for i in combo)
        groups.setdefault(tuple(sorted(hand_values(hand, "id"))), []).append(hand)
    rng = random.Random(f"general-points/{num_cards}/{seed}")
    keys = sorted(groups)
    rng.shuffle(keys)
    n_train = round(split_fractions[0] * len(keys))
    n_val = round(split_fractions[1] * len(keys))
    bounds = {
        "train": (0, n_train),
        "validation": (n_train, n_train + n_val),
        "test": (n_train + n_val, None),
    }
    pools = {}
    for split, (lo, hi) in bounds.items():
        hands = [hand for key in keys[lo:hi] for hand in groups[key]]
        rng.shuffle(hands)
        pools[split] = hands
    return pools


def generate_hands(
    num_hands: int,
    *,
    split: str = "train",
    face_card_rule: str = "id",
    seed: int = 0,
    num_cards: int = DEFAULT_NUM_CARDS,
    target: int = DEFAULT_TARGET,
    split_fractions: Sequence[float] = (0.7, 0.15, 0.15),
) -> list[list[str]]:
    """Deal `num_hands` distinct hands of `split` that can reach `target` under `face_card_rule`.

    Deterministic for `(seed, num_cards, split_fractions)`: every possible hand belongs to exactly one of
    the train / validation / test splits, so splits never share a hand (hands that are equal under the ID
    rule share a split too). Card order within a hand is shuffled deterministically.

    Raises:
        ValueError: for bad arguments, or when the split has fewer than `num_hands` solvable hands.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
    _check_rule(face_card_rule)
    if not MIN_NUM_CARDS <= num_cards <= MAX_NUM_CARDS:
        raise ValueError(f"num_cards must be between {MIN_NUM_CARDS} and {MAX_NUM_CARDS}, got {num_cards}.")
    if num_hands < 0:
        raise ValueError(f"num_hands must be >= 0, got {num_hands}.")
    pool = _split_pools(num_cards, seed, _check_fractions(split_fractions))[split]
    hands: list[list[str]] = []
    for hand in pool:
        if len(hands) == num_hands:
            break
        if is_solvable(hand_values(hand, face_card_rule), target):
            shuffled = list(hand)
            random.Random(f"{seed}/{'-'.join(hand)}").shuffle(shuffled)
            hands.append(shuffled)
    if len(hands) < num_hands:
        raise ValueError(
            f"Only {len(hands)} {split} hands of {num_cards} cards can reach {target} under the "
            f"{face_card_rule!r} rule (asked for {num_hands}); ask for fewer or change split_fractions."
        )
    return hands


# --------------------------------------------------------------------------------------------- text


def make_prompt(cards: Sequence[str], face_card_rule: str, target: int = DEFAULT_TARGET) -> str:
    """The task prompt for one hand: the cards, the face-card rule in words, and the JSON answer format."""
    n = len(cards)
    count = _NUMBER_WORDS.get(n, str(n))
    placeholders = ", ".join(f"x{i + 1}" for i in range(n))
    numbers = ", ".join(f"n{i + 1}" for i in range(n))
    return (
        f"You are an expert {target} points card game player. You are given these {count} cards: "
        f"{json.dumps(list(cards))}.\n"
        f"{rule_description(face_card_rule)} Each card must be used exactly once.\n"
        f"Your goal is to output a formula that evaluates to {target}, using the numbers on the cards and "
        f"the operators '+', '-', '*', '/', '(' and ')'.\n"
        f"Answer with a JSON object in this format:\n"
        f'{{"cards": [{placeholders}], "number": [{numbers}], '
        f'"formula": "an equation that equals {target}"}}'
    )


def demonstration(cards: Sequence[str], face_card_rule: str, target: int = DEFAULT_TARGET) -> str:
    """A correct answer for the hand in the paper's JSON format, from the exact solver.

    Raises:
        ValueError: when the hand cannot reach `target`.
    """
    values = hand_values(cards, face_card_rule)
    formula = solve(values, target)
    if formula is None:
        raise ValueError(f"The hand {list(cards)} cannot reach {target} under the {face_card_rule!r} rule.")
    return json.dumps({"cards": list(cards), "number": values, "formula": f"{formula}={target}"})


# --------------------------------------------------------------------------------------------- datasets


def _as_prompt(text: str, conversational: bool) -> Any:
    return [{"role": "user", "content": text}] if conversational else text


def rl_prompt_dataset(
    hands: Sequence[Sequence[str]],
    face_card_rule: str,
    *,
    target: int = DEFAULT_TARGET,
    conversational: bool = False,
) -> Dataset:
    """Prompts for RL, validation or evaluation: columns `prompt`, `cards`, `face_card_rule`, `target`,
    `demonstration`.

    `cards`, `face_card_rule` and `target` are exactly what `general_points_reward` takes, so TRL passes them to it.
    `demonstration` is a correct answer from the exact solver (None for a hand that cannot reach the target), as a
    string or, when `conversational`, an assistant message: what HPT imitates (`hpt_demonstration_column`).
    """
    _check_rule(face_card_rule)
    rows = []
    for hand in hands:
        values = hand_values(hand, face_card_rule)
        answer = demonstration(hand, face_card_rule, target) if is_solvable(values, target) else None
        if answer is not None and conversational:
            answer = [{"role": "assistant", "content": answer}]
        rows.append(
            {
                "prompt": _as_prompt(make_prompt(hand, face_card_rule, target), conversational),
                "cards": list(hand),
                "face_card_rule": face_card_rule,
                "target": int(target),
                "demonstration": answer,
            }
        )
    return _from_rows(rows, ["prompt", "cards", "face_card_rule", "target", "demonstration"])


def sft_dataset(
    hands: Sequence[Sequence[str]],
    face_card_rule: str,
    *,
    target: int = DEFAULT_TARGET,
    conversational: bool = False,
) -> Dataset:
    """SFT demonstrations in TRL's prompt-completion format: columns `prompt` and `completion`.

    With `conversational=True`, `prompt` is `[{"role": "user", ...}]` and `completion` is
    `[{"role": "assistant", ...}]`; otherwise both are plain strings.

    Raises:
        ValueError: when a hand cannot reach `target`.
    """
    rows = []
    for hand in hands:
        answer = demonstration(hand, face_card_rule, target)
        rows.append(
            {
                "prompt": _as_prompt(make_prompt(hand, face_card_rule, target), conversational),
                "completion": [{"role": "assistant", "content": answer}] if conversational else answer,
            }
        )
    return _from_rows(rows, ["prompt", "completion"])


def _from_rows(rows: list[dict], columns: list[str]) -> Dataset:
    if rows:
        return Dataset.from_list(rows)
    return Dataset.from_dict({name: [] for name in columns})


@dataclass
class GeneralPointsDatasets:
    """The datasets of one General Points experiment.

    Attributes:
        rl: RL prompts on training hands, training rule (`prompt`, `cards`, `face_card_rule`, `target`).
        sft: SFT demonstrations (`prompt`, `completion`) on the same training hands.
        validation: prompts on validation hands, training rule (for AMFT's meta-gradient).
        eval_id: prompts on test hands under the ID rule (J = Q = K = 10).
        eval_ood: prompts on test hands under the OOD rule (J, Q, K = 11, 12, 13).
    """

    rl: Dataset
    sft: Dataset
    validation: Dataset
    eval_id: Dataset
    eval_ood: Dataset


def build_general_points_datasets(
    num_train: int = 500,
    num_validation: int = 100,
    num_eval: int = 100,
    *,
    seed: int = 0,
    num_cards: int = DEFAULT_NUM_CARDS,
    target: int = DEFAULT_TARGET,
    conversational: bool = False,
    split_fractions: Sequence[float] = (0.7, 0.15, 0.15),
) -> GeneralPointsDatasets:
    """Build ready datasets for AMFT on General Points: RL, SFT, validation, ID and OOD evaluation.

    Training and validation use the ID rule. The ID and OOD evaluation sets are drawn from the test split,
    so they share no hand with training or validation; each holds hands solvable under its own rule.
    Use `num_cards` / `target` for easier variants (e.g. 3 cards reaching 10).

    Raises:
        ValueError: for bad arguments or when a split has too few solvable hands.
    """
    common = {"seed": seed, "num_cards": num_cards, "target": target, "split_fractions": split_fractions}
    train = generate_hands(num_train, split="train", face_card_rule="id", **common)
    validation = generate_hands(num_validation, split="validation", face_card_rule="id", **common)
    test_id = generate_hands(num_eval, split="test", face_card_rule="id", **common)
    test_ood = generate_hands(num_eval, split="test", face_card_rule="ood", **common)
    kwargs = {"target": target, "conversational": conversational}
    return GeneralPointsDatasets(
        rl=rl_prompt_dataset(train, "id", **kwargs),
        sft=sft_dataset(train, "id", **kwargs),
        validation=rl_prompt_dataset(validation, "id", **kwargs),
        eval_id=rl_prompt_dataset(test_id, "id", **kwargs),
        eval_ood=rl_prompt_dataset(test_ood, "ood", **kwargs),
    )
