"""General Points with card images and sequential revision (AMFT paper, appendix C, Figures 4-5; the
environment of "SFT Memorizes, RL Generalizes", arXiv 2501.17161, github LeslieTrue/SFTvsRL).

The visual variant (GP-VL) shows the hand as an image: four playing cards drawn by `render_hand` on a green
table. The model must read the cards, then write a formula reaching the target, answering with the paper's JSON
`{"cards": [...], "number": [...], "formula": "..."}`.

Scoring follows the reference verifier (`step_rewards` and its reward table, `REWARD_TABLE` here): a wrong card
reading scores -1.5 before the formula is looked at; an illegal formula -3 per fault; wrong numbers -2; a formula
that is a prefix of a solution +1; a formula that reaches nothing -1; a correct solution +5. `verify_answer`
returns the score and the verifier's message, which is what the model reads when it revises.

Differences from the reference, on purpose:

- The cards are drawn by our own PIL code (no image assets); the canvas defaults to 512 px (the reference: 1200).
- Hands come from `general_points.generate_hands`' disjoint train / validation / test pools, not from fresh random
  draws, so evaluation hands never occur in training. Rule-OOD hands hold at least one face card (as in the
  reference's OOD dealing). Each card's suit is drawn deterministically from the hand and the seed.
- Formulas are evaluated exactly (fractions, our own parser, never `eval`). The reference evaluates with Python
  floats, so e.g. `8/(3-8/3)` is 23.999... there and not a solution; here it is.
- The answer is read as JSON first (the last `{...}` object of the text, bounded in length), then with the
  reference's key patterns; a missing formula scores as illegal (-3), as in the reference.
- Like the reference, the `number` field is not verified, and spaces inside a formula are illegal characters.

Sequential revision (`GeneralPointsRevisionEnv`) runs on TRL's own multi-turn loop: pass
`environment_factory=general_points_revision_env_factory(...)` to `GRPOTrainer` / `AMFTTrainer`. The model submits
each answer by calling the `submit_answer` tool with the JSON's three fields; the tool returns the verifier's
message; the loop stops at the first correct answer (further calls are not verified) or after `verify_iter`
verified answers (the reference's `verify_iter=5`). The episode's reward (`get_reward`) is the score of its last
verified answer, so a correct answer found after revisions scores +5 (the reference's outcome; its per-step
returns are summed by its PPO, see `episode_return`).
"""

from __future__ import annotations

import itertools
import json
import math
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from datasets import Dataset

from amft_trl._completions import completion_to_text
from amft_trl.tasks.general_points import (
    DEFAULT_NUM_CARDS,
    DEFAULT_TARGET,
    MAX_FORMULA_CHARS,
    RANKS,
    _check_fractions,
    _check_rule,
    _split_pools,
    evaluate_formula,
    hand_values,
    is_solvable,
    solve,
)

__all__ = [
    "DEFAULT_RESOLUTION",
    "FACE_CARD_COLORS",
    "REWARD_TABLE",
    "SUITS",
    "VERIFY_ITER",
    "GeneralPointsRevisionEnv",
    "GeneralPointsVisualDatasets",
    "build_general_points_visual_datasets",
    "deal_suits",
    "general_points_revision_env_factory",
    "general_points_verifier_reward",
    "make_visual_prompt",
    "reference_solutions",
    "render_card",
    "render_hand",
    "revision_demonstration",
    "verify_answer",
]

#: The reference verifier's scores (`REWARD_FN` in SFTvsRL's `utils_rl.py`).
REWARD_TABLE: dict[str, float] = {
    "CORRECT_SOLUTION": 5.0,
    "PARTIAL_SOLUTION": 1.0,
    "NO_SOLUTION": -1.0,
    "INCORRECT_VISION": -1.5,
    "INCORRECT_NUMBER": -2.0,
    "ILLEGAL_FORMULA": -3.0,
}
#: Verified answers per episode in the reference (`verify_iter`).
VERIFY_ITER = 5
#: Suits: hearts, spades, diamonds, clubs.
SUITS: tuple[str, ...] = ("H", "S", "D", "C")
#: The reference's `face_cards_color`: which suits cards are dealt in. Training uses "black"; the visual OOD "red".
FACE_CARD_COLORS: dict[str, tuple[str, ...]] = {"mixed": SUITS, "red": ("H", "D"), "black": ("S", "C")}
DEFAULT_RESOLUTION = 512
#: Longest answer text the verifier reads (its tail); anything before is ignored.
MAX_ANSWER_CHARS = 4000

_TABLE_GREEN = (0x35, 0x65, 0x4D)
_RED = (200, 16, 32)
_BLACK = (15, 15, 15)


# ---------------------------------------------------------------------------------------- rendering


def _suit_color(suit: str) -> tuple[int, int, int]:
    return _RED if suit in ("H", "D") else _BLACK


def _draw_suit(draw: Any, suit: str, cx: float, cy: float, r: float, color: tuple[int, int, int]) -> None:
    """Draw one suit symbol centred at (cx, cy), about 2r wide, from circles and polygons."""
    if suit == "D":
        draw.polygon([(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)], fill=color)
        return
    if suit == "H":
        lobe = 0.52 * r
        for dx in (-lobe, lobe):
            draw.ellipse([cx + dx - lobe, cy - r, cx + dx + lobe, cy - r + 2 * lobe], fill=color)
        draw.polygon(
            [(cx - 2 * lobe, cy - r + lobe * 1.1), (cx + 2 * lobe, cy - r + lobe * 1.1), (cx, cy + r)],
            fill=color,
        )
        return
    if suit == "S":
        lobe = 0.5 * r
        for dx in (-lobe, lobe):
            draw.ellipse(
                [cx + dx - lobe, cy + 0.1 * r - lobe, cx + dx + lobe, cy + 0.1 * r + lobe], fill=color
            )
        draw.polygon(
            [(cx - 2 * lobe, cy + 0.05 * r), (cx + 2 * lobe, cy + 0.05 * r), (cx, cy - r)], fill=color
        )
    else:  # clubs
        lobe = 0.42 * r
        for dx, dy in ((0, -0.5 * r), (-0.55 * r, 0.1 * r), (0.55 * r, 0.1 * r)):
            draw.ellipse([cx + dx - lobe, cy + dy - lobe, cx + dx + lobe, cy + dy + lobe], fill=color)
    draw.polygon([(cx, cy), (cx - 0.4 * r, cy + r), (cx + 0.4 * r, cy + r)], fill=color)  # the stem


@lru_cache(maxsize=64)
def _font(size: int) -> Any:
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def render_card(rank: str, suit: str, width: int = 100) -> Any:
    """One playing card as a PIL image (`width` x 1.4 `width`): white face, rank in the corners and large in the
    middle, the suit symbol under it, red for hearts and diamonds, black for spades and clubs. Deterministic.

    Raises:
        ValueError: for an unknown rank or suit, or a width under 24 pixels.
    """
    from PIL import Image, ImageDraw

    if rank not in RANKS:
        raise ValueError(f"Unknown rank {rank!r}; ranks are {RANKS}.")
    if suit not in SUITS:
        raise ValueError(f"Unknown suit {suit!r}; suits are {SUITS}.")
    if width < 24:
        raise ValueError(f"Card width must be at least 24 pixels, got {width}.")
    height = round(width * 1.4)
    card = Image.new("RGB", (width, height), _TABLE_GREEN)
    draw = ImageDraw.Draw(card)
    border = max(1, width // 40)
    draw.rounded_rectangle(
        [0, 0, width - 1, height - 1], radius=width // 10, fill="white", outline=_BLACK, width=border
    )
    color = _suit_color(suit)
    big, small = _font(max(8, int(width * 0.42))), _font(max(6, int(width * 0.16)))
    draw.text((width / 2, height * 0.36), rank, fill=color, font=big, anchor="mm")
    _draw_suit(draw, suit, width / 2, height * 0.72, width * 0.16, color)
    draw.text((width * 0.1, height * 0.05), rank, fill=color, font=small, anchor="la")
    draw.text((width * 0.9, height * 0.95), rank, fill=color, font=small, anchor="rd")
    return card


def _layout(num_cards: int, resolution: int) -> tuple[int, int, list[tuple[int, int]]]:
    card_width = int(resolution / num_cards * 0.85)
    card_height = round(card_width * 1.4)
    gap = (resolution - num_cards * card_width) / (num_cards + 1)
    top = (resolution - card_height) // 2
    return card_width, card_height, [(round(gap + i * (card_width + gap)), top) for i in range(num_cards)]


def card_boxes(num_cards: int, resolution: int = DEFAULT_RESOLUTION) -> list[tuple[int, int, int, int]]:
    """Where `render_hand` puts each card: `(left, top, right, bottom)` boxes, left to right."""
    width, height, origins = _layout(num_cards, resolution)
    return [(x, y, x + width, y + height) for x, y in origins]


def render_hand(cards: Sequence[str], suits: Sequence[str], resolution: int = DEFAULT_RESOLUTION) -> Any:
    """The hand as the model sees it: the cards left to right, centred on a square green table.

    A pure function of `(cards, suits, resolution)`: the same hand renders to the same pixels.

    Raises:
        ValueError: for mismatched `cards` / `suits`, an unknown rank or suit, or a resolution too small for
            24-pixel-wide cards.
    """
    from PIL import Image

    if len(cards) != len(suits) or not cards:
        raise ValueError(
            f"render_hand needs one suit per card, got {len(cards)} cards and {len(suits)} suits."
        )
    smallest = math.ceil(24 * len(cards) / 0.85)  # each card at least 24 pixels wide
    if resolution < smallest:
        raise ValueError(
            f"resolution must be at least {smallest} pixels for {len(cards)} cards, got {resolution}."
        )
    canvas = Image.new("RGB", (resolution, resolution), _TABLE_GREEN)
    width, _, origins = _layout(len(cards), resolution)
    for rank, suit, origin in zip(cards, suits, origins):
        canvas.paste(render_card(rank, suit, width), origin)
    return canvas


def deal_suits(cards: Sequence[str], face_card_color: str = "black", seed: int = 0) -> list[str]:
    """One suit per card from `FACE_CARD_COLORS[face_card_color]`, deterministic for the hand and the seed."""
    if face_card_color not in FACE_CARD_COLORS:
        raise ValueError(
            f"face_card_color must be one of {sorted(FACE_CARD_COLORS)}, got {face_card_color!r}."
        )
    rng = random.Random(f"suits/{seed}/{face_card_color}/{'-'.join(cards)}")
    return [rng.choice(FACE_CARD_COLORS[face_card_color]) for _ in cards]


# ---------------------------------------------------------------------------------------- verifier


def _bracketings(n: int) -> list[tuple[tuple[int, int], ...]]:
    """The reference's parenthesisations of `a o b o c o d`: none, one pair around 2..n-1 adjacent numbers, and
    for four numbers `(a o b) o (c o d)`."""
    out: list[tuple[tuple[int, int], ...]] = [()]
    out += [((i, j),) for i in range(n) for j in range(i + 1, n) if (i, j) != (0, n - 1)]
    if n == 4:
        out.append(((0, 1), (2, 3)))
    return out


@lru_cache(maxsize=4096)
def _reference_solutions(values: tuple[int, ...], target: int) -> frozenset[str]:
    found = set()
    n = len(values)
    brackets = _bracketings(n)
    for perm in set(itertools.permutations(values)):
        for ops in itertools.product("+-*/", repeat=n - 1):
            for pairs in brackets:
                opens = Counter(i for i, _ in pairs)
                closes = Counter(j for _, j in pairs)
                text = ""
                for k, value in enumerate(perm):
                    text += "(" * opens[k] + str(value) + ")" * closes[k]
                    if k < n - 1:
                        text += ops[k]
                result = evaluate_formula(text)
                if result is not None and result[0] == target:
                    found.add(text)
    return frozenset(found)


def reference_solutions(values: Sequence[int], target: int = DEFAULT_TARGET) -> frozenset[str]:
    """Every solution string in the reference's search space (all orders of the values, all operators, its
    bracket placements, no spaces): what a formula must be a prefix of to score as a partial solution."""
    return _reference_solutions(tuple(sorted(int(v) for v in values)), int(target))


_KEY_RES = {
    "cards": re.compile(r'"cards"\s*:\s*\[([^\]\n]{0,200})\]'),
    "number": re.compile(r'"number"\s*:\s*\[([^\]\n]{0,200})\]'),
    "formula": re.compile(r"""["']formula["']\s*:\s*["']([^"'\n]{0,""" + str(MAX_FORMULA_CHARS) + r"})[\"']"),
}
_OBJECT_RE = re.compile(r"\{[^{}]{0,2000}\}")


def parse_answer(text: str) -> dict[str, Any]:
    """Read `cards`, `number` and `formula` from an answer: the last JSON object of the (tail of the) text that
    parses, else the reference's key patterns. Missing fields are None. Never raises."""
    text = text[-MAX_ANSWER_CHARS:] if isinstance(text, str) else ""
    for match in reversed(_OBJECT_RE.findall(text)):
        try:
            obj = json.loads(match)
        except ValueError:
            continue
        if isinstance(obj, dict) and "formula" in obj:
            return {key: obj.get(key) for key in ("cards", "number", "formula")}
    found: dict[str, Any] = {}
    for key, pattern in _KEY_RES.items():
        hits = pattern.findall(text)
        found[key] = hits[-1] if hits else None
    return found


def _as_card_list(value: Any) -> list[str]:
    """The reference's list reading: strip brackets, quotes and spaces, split on commas; [] unless 4 items."""
    if isinstance(value, (list, tuple)):
        items = [str(v).strip().strip("'\"") for v in value]
    elif isinstance(value, str):
        items = (
            value.replace("[", "")
            .replace("]", "")
            .replace("'", "")
            .replace('"', "")
            .replace(" ", "")
            .split(",")
        )
    else:
        return []
    return [("10" if item == "T" else item) for item in items]


def _sequence_faults(tokens: list[str]) -> int:
    faults, prev, depth = 0, None, 0
    for token in tokens:
        kind = "number" if token.isdigit() else {"(": "open", ")": "close"}.get(token, "operator")
        if kind in ("number", "open"):
            ok = prev in (None, "operator", "open")
            faults += not ok
            depth += ok and kind == "open"
        elif kind == "operator":
            faults += prev not in ("number", "close")
        else:
            if prev in ("number", "close") and depth > 0:
                depth -= 1
            else:
                faults += 1
        prev = kind
    return faults


def verify_answer(
    answer: str | dict[str, Any],
    cards: Sequence[str],
    face_card_rule: str = "id",
    target: int = DEFAULT_TARGET,
    *,
    visual: bool = True,
) -> tuple[float, str]:
    """Score one answer as the reference verifier does, and say why: `(score, message)`.

    In order: (visual only) the recognised `cards` must equal the hand as a multiset, else -1.5; the formula's
    left-hand side (before any `=`) may hold only digits and `+-*/()` with no spaces, else -3; each misplaced
    token adds -3; numbers not on the cards or used too often add -2, and unused cards another -2; a formula
    reaching the target scores +5; one that cannot be evaluated but starts a reference solution +1; anything
    else -1. Scores are `REWARD_TABLE` sums. Formulas are parsed exactly, never `eval`ed.

    Args:
        answer: the model's text (or an already-parsed `{"cards", "number", "formula"}` dict).
        cards: the hand, e.g. `["A", "3", "K", "6"]`.
        face_card_rule: `"id"` (J = Q = K = 10) or `"ood"` (11, 12, 13).
        target: the number to reach.
        visual: check the card reading (the visual variant; the language variant skips it, as the reference).
    """
    _check_rule(face_card_rule)
    fields = answer if isinstance(answer, dict) else parse_answer(answer)
    values = hand_values(list(cards), face_card_rule)
    if visual and sorted(_as_card_list(fields.get("cards"))) != sorted(str(c) for c in cards):
        return REWARD_TABLE["INCORRECT_VISION"], "you recognized wrong cards"
    formula = fields.get("formula")
    formula = formula.split("=")[0] if isinstance(formula, str) else "None"
    if len(formula) > MAX_FORMULA_CHARS:
        return REWARD_TABLE["ILLEGAL_FORMULA"], "the formula is too long"
    tokens = re.findall(r"\d+|[+\-*/()]", formula)
    if "".join(tokens) != formula:
        return REWARD_TABLE["ILLEGAL_FORMULA"], "illegal characters"
    score, messages = 0.0, []
    faults = _sequence_faults(tokens)
    if faults:
        score += faults * REWARD_TABLE["ILLEGAL_FORMULA"]
        messages.append("the formula is not well formed")
    used = Counter(int(t) for t in tokens if t.isdigit())
    have = Counter(values)
    invalid = sorted(n for n in used if n not in have)
    overused = sorted(n for n in used if n in have and used[n] > have[n])
    unused = sorted(n for n in have if have[n] > used[n])
    if invalid or overused:
        score += REWARD_TABLE["INCORRECT_NUMBER"]
        messages.append(
            f"you used invalid numbers: {invalid}"
            if invalid
            else f"you used numbers: {overused} too many times"
        )
    if unused:
        score += REWARD_TABLE["INCORRECT_NUMBER"]
        messages.append(f"you didn't use numbers: {unused}")
    if score != 0:
        return score, ", ".join(messages) + "."
    result = evaluate_formula(formula)
    if result is not None and result[0] == target:
        return REWARD_TABLE["CORRECT_SOLUTION"], "Correct solution."
    solutions = reference_solutions(values, target)
    if result is None and any(s.startswith(formula) for s in solutions):
        return REWARD_TABLE["PARTIAL_SOLUTION"], "partial solution."
    register = ""
    for token in tokens:
        previous, register = register, register + token
        if not any(s.startswith(register) for s in solutions):
            if not previous:
                return REWARD_TABLE["NO_SOLUTION"], "your formula does not match any solution."
            return (
                REWARD_TABLE["NO_SOLUTION"],
                f"{previous} is partially correct but the full formula does not match any solution.",
            )
    return 0.0, "."


def _per_row(column: Any, n: int, name: str) -> list[Any]:
    if isinstance(column, (str, int, bool)) or column is None:
        return [column] * n
    column = list(column)
    if len(column) != n:
        raise ValueError(
            f"general_points_verifier_reward got {n} completions but {len(column)} values of {name!r}."
        )
    return column


def general_points_verifier_reward(
    completions: Sequence[Any],
    cards: Sequence[Sequence[str]],
    face_card_rule: Sequence[str] | str = "id",
    target: Sequence[int] | int = DEFAULT_TARGET,
    visual: Sequence[bool] | bool = True,
    **kwargs: Any,
) -> list[float]:
    """One-turn reward: `verify_answer`'s score (`REWARD_TABLE`) of each completion's last message.

    Takes the columns of `build_general_points_visual_datasets`' prompt datasets (`cards`, `face_card_rule`,
    `target`, `visual`); other columns are ignored. For the multi-turn revision use `GeneralPointsRevisionEnv`.
    """
    n = len(completions)
    hands = list(cards)
    if len(hands) != n:
        raise ValueError(f"general_points_verifier_reward got {n} completions but {len(hands)} hands.")
    rules, targets = _per_row(face_card_rule, n, "face_card_rule"), _per_row(target, n, "target")
    visuals = _per_row(visual, n, "visual")
    return [
        verify_answer(completion_to_text(c), h, r, int(t), visual=bool(v))[0]
        for c, h, r, t, v in zip(completions, hands, rules, targets, visuals)
    ]


# ---------------------------------------------------------------------------------------- revision


class GeneralPointsRevisionEnv:
    """The sequential-revision environment for TRL's multi-turn loop (`environment_factory`).

    `reset` receives the dataset row (`cards`, `face_card_rule`, `target`, `visual`); the model answers by calling
    `submit_answer`; each call is verified (`verify_answer`) and the message comes back as the tool's reply. The
    episode ends at the first correct answer or after `verify_iter` verified answers; later calls are answered but
    not verified. `get_reward` is the score of the last verified answer (`REWARD_TABLE["ILLEGAL_FORMULA"]` when
    the model never submitted one, as the reference scores an answer without a formula).
    """

    def __init__(self, verify_iter: int = VERIFY_ITER) -> None:
        if verify_iter < 1:
            raise ValueError(f"verify_iter must be >= 1, got {verify_iter}.")
        self.verify_iter = verify_iter
        self.reset()

    def reset(
        self,
        cards: Sequence[str] = (),
        face_card_rule: str = "id",
        target: int = DEFAULT_TARGET,
        visual: bool = True,
        **kwargs: Any,
    ) -> None:
        self.cards = list(cards)
        self.face_card_rule = face_card_rule
        self.target = int(target)
        self.visual = bool(visual)
        self.scores: list[float] = []
        self.messages: list[str] = []
        self.solved = False
        return None

    @property
    def done(self) -> bool:
        return self.solved or len(self.scores) >= self.verify_iter

    def submit_answer(self, cards: list[str], number: list[int], formula: str) -> str:
        """Submit an answer to the card game for verification.

        Args:
            cards: the cards in the hand, e.g. ["A", "3", "K", "6"].
            number: the number each card counts as, in the same order.
            formula: a formula using each number once that equals the target, e.g. "(6-3)*(1+7)=24".

        Returns:
            The verifier's verdict: correct, or why the answer failed.
        """
        if self.done:
            return "The game is over: " + ("you already solved it." if self.solved else "no attempts left.")
        score, message = verify_answer(
            {"cards": cards, "number": number, "formula": formula},
            self.cards,
            self.face_card_rule,
            self.target,
            visual=self.visual,
        )
        self.scores.append(score)
        self.messages.append(message)
        if score == REWARD_TABLE["CORRECT_SOLUTION"]:
            self.solved = True
            return "Correct solution."
        left = self.verify_iter - len(self.scores)
        return f"You failed this trial because {message} Attempts left: {left}."

    def get_reward(self) -> float:
        """The episode's outcome: the score of the last verified answer."""
        return self.scores[-1] if self.scores else REWARD_TABLE["ILLEGAL_FORMULA"]

    @property
    def episode_return(self) -> float:
        """The sum of the verified answers' scores (the reference's `running_reward`)."""
        return float(sum(self.scores))


def general_points_revision_env_factory(verify_iter: int = VERIFY_ITER):
    """An `environment_factory` for `GRPOTrainer` / `AMFTTrainer`: `GeneralPointsRevisionEnv(verify_iter)`.

    Set `max_tool_calling_iterations >= verify_iter` in the config so TRL's loop lets every attempt through."""
    if verify_iter < 1:
        raise ValueError(f"verify_iter must be >= 1, got {verify_iter}.")

    def factory() -> GeneralPointsRevisionEnv:
        return GeneralPointsRevisionEnv(verify_iter)

    return factory


# ---------------------------------------------------------------------------------------- prompts


def _face_card_msg(face_card_rule: str) -> str:
    if _check_rule(face_card_rule) == "id":
        return "'J', 'Q', and 'K' count as '10'"
    return "'J', 'Q', and 'K' count as '11', '12', and '13' respectively"


def make_visual_prompt(
    face_card_rule: str,
    target: int = DEFAULT_TARGET,
    *,
    num_cards: int = DEFAULT_NUM_CARDS,
    cards: Sequence[str] | None = None,
    revision: bool = False,
) -> str:
    """The task text. With `cards` the hand is written out (the language variant); without, the model is told it
    sees the cards in the image. With `revision`, the model is told to submit with the `submit_answer` tool."""
    rule = _face_card_msg(face_card_rule)
    seen = (
        f"You are given these {num_cards} cards: {json.dumps(list(cards))}."
        if cards is not None
        else f"You are observing these {num_cards} cards in the image."
    )
    submit = (
        "Submit your answer by calling the submit_answer tool with these three fields; if it is wrong, you "
        "will be told why and may try again."
        if revision
        else "Your response should be a valid JSON object in this format:"
    )
    return (
        f"You are an expert {target} points card game player. {seen}\n"
        f"Note that {rule}, and each card must be used once.\n"
        f"Your goal is to output a formula that evaluates to {target} using numbers from the cards and operators "
        f"such as '+', '-', '*', '/', '(', ')', and '='.\n{submit}\n"
        f'{{"cards": [the cards], "number": [the numbers on the cards], "formula": "an equation that equals {target}"}}'
    )


def _answer(cards: Sequence[str], face_card_rule: str, target: int) -> dict[str, Any]:
    values = hand_values(cards, face_card_rule)
    formula = solve(values, target)
    if formula is None:
        raise ValueError(f"The hand {list(cards)} cannot reach {target} under the {face_card_rule!r} rule.")
    return {"cards": list(cards), "number": values, "formula": f"{formula}={target}"}


def revision_demonstration(
    cards: Sequence[str], face_card_rule: str, target: int = DEFAULT_TARGET, *, verify_iter: int = VERIFY_ITER
) -> list[dict[str, Any]]:
    """A demonstration in the revision loop's own format: the assistant calls `submit_answer` with a correct
    answer, the tool replies (with what `GeneralPointsRevisionEnv` really replies), and the assistant closes with
    the JSON answer."""
    answer = _answer(cards, face_card_rule, target)
    env = GeneralPointsRevisionEnv(verify_iter)
    env.reset(cards=cards, face_card_rule=face_card_rule, target=target, visual=True)
    reply = env.submit_answer(**answer)
    call = {"type": "function", "function": {"name": "submit_answer", "arguments": answer}}
    return [
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "name": "submit_answer", "content": reply},
        {"role": "assistant", "content": json.dumps(answer)},
    ]


# ---------------------------------------------------------------------------------------- datasets


@dataclass
class GeneralPointsVisualDatasets:
    """The datasets of one GP-VL experiment (all conversational; the visual ones carry an `images` column).

    Attributes:
        rl: RL prompts, training hands, ID rule, black suits.
        sft: demonstrations on the same hands (`prompt`, `completion`, `images`).
        validation: prompts on validation hands (ID rule, black suits), for AMFT's meta-gradient.
        eval_id: test hands, ID rule, black suits.
        eval_ood_rule: test hands holding a face card, J/Q/K = 11/12/13, black suits.
        eval_ood_visual: test hands, ID rule, red suits (colours never seen in training).
    """

    rl: Dataset
    sft: Dataset
    validation: Dataset
    eval_id: Dataset
    eval_ood_rule: Dataset
    eval_ood_visual: Dataset


def _user_message(text: str, visual: bool) -> list[dict[str, Any]]:
    if not visual:  # text models' chat templates expect string content
        return [{"role": "user", "content": text}]
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def _rows(
    hands: Sequence[Sequence[str]],
    face_card_rule: str,
    color: str,
    *,
    target: int,
    seed: int,
    visual: bool,
    revision: bool,
    resolution: int,
    sft: bool,
    verify_iter: int,
) -> Dataset:
    rows = []
    for hand in hands:
        suits = deal_suits(hand, color, seed)
        text = make_visual_prompt(
            face_card_rule, target, num_cards=len(hand), cards=None if visual else hand, revision=revision
        )
        row: dict[str, Any] = {"prompt": _user_message(text, visual)}
        if visual:
            row["images"] = [render_hand(hand, suits, resolution)]
        if sft:
            if revision:
                row["completion"] = revision_demonstration(
                    hand, face_card_rule, target, verify_iter=verify_iter
                )
            else:
                row["completion"] = [
                    {"role": "assistant", "content": json.dumps(_answer(hand, face_card_rule, target))}
                ]
        else:
            row.update(
                cards=list(hand),
                suits=suits,
                face_card_rule=face_card_rule,
                target=int(target),
                visual=visual,
            )
        rows.append(row)
    return Dataset.from_list(rows)


def _eval_hands(
    num: int, *, seed: int, num_cards: int, target: int, split_fractions: tuple[float, float, float]
) -> tuple[list[list[str]], list[list[str]], list[list[str]]]:
    """Disjoint test-pool hands: ID, OOD-visual (both solvable with J = Q = K = 10) and OOD-rule (holding a face
    card, solvable with 11 / 12 / 13)."""
    pool = _split_pools(num_cards, seed, split_fractions)["test"]
    out: dict[str, list[list[str]]] = {"id": [], "visual": [], "rule": []}
    for hand in pool:
        eligible = []
        if is_solvable(hand_values(hand, "id"), target):
            eligible += ["id", "visual"]
        if any(c in "JQK" for c in hand) and is_solvable(hand_values(hand, "ood"), target):
            eligible.append("rule")
        eligible = [k for k in eligible if len(out[k]) < num]
        if eligible:
            key = min(eligible, key=lambda k: len(out[k]))
            shuffled = list(hand)
            random.Random(f"{seed}/{'-'.join(hand)}").shuffle(shuffled)
            out[key].append(shuffled)
        if all(len(v) == num for v in out.values()):
            break
    for key, name in (("id", "ID"), ("rule", "OOD-rule"), ("visual", "OOD-visual")):
        if len(out[key]) < num:
            raise ValueError(
                f"Only {len(out[key])} test hands of {num_cards} cards are left for the {name} evaluation split "
                f"(asked for {num}); ask for fewer or change split_fractions."
            )
    return out["id"], out["rule"], out["visual"]


def build_general_points_visual_datasets(
    num_train: int = 500,
    num_validation: int = 100,
    num_eval: int = 100,
    *,
    seed: int = 0,
    num_cards: int = DEFAULT_NUM_CARDS,
    target: int = DEFAULT_TARGET,
    visual: bool = True,
    revision: bool = False,
    resolution: int = DEFAULT_RESOLUTION,
    train_color: str = "black",
    ood_color: str = "red",
    split_fractions: Sequence[float] = (0.7, 0.15, 0.15),
    verify_iter: int = VERIFY_ITER,
) -> GeneralPointsVisualDatasets:
    """Build GP-VL (or, with `visual=False`, GP-L in the same format) for AMFT: RL, SFT, validation, and the
    reference's three evaluation splits (ID, OOD rule, OOD visual).

    Prompts are conversational; with `visual` each user turn opens with an image part and the row's `images`
    column holds the rendered hand (TRL's format for VLM prompts and demonstrations). Prompt rows carry `cards`,
    `suits`, `face_card_rule`, `target` and `visual` for `general_points_verifier_reward` and
    `GeneralPointsRevisionEnv.reset`. With `revision`, prompts ask for `submit_answer` tool calls and the SFT
    demonstrations are tool-calling conversations (`revision_demonstration`).

    Every hand of one split is absent from every other split (train / validation / test pools, and disjoint
    draws from the test pool for the three evaluation splits).

    Raises:
        ValueError: for bad arguments, or when a split has too few hands (the message names the split).
    """
    if ood_color == train_color:
        raise ValueError(f"ood_color must differ from train_color ({train_color!r}) for a visual OOD split.")
    for name, color in (("train_color", train_color), ("ood_color", ood_color)):
        if color not in FACE_CARD_COLORS:
            raise ValueError(f"{name} must be one of {sorted(FACE_CARD_COLORS)}, got {color!r}.")
    from amft_trl.tasks.general_points import generate_hands

    fractions = _check_fractions(split_fractions)
    common = {"seed": seed, "num_cards": num_cards, "target": target, "split_fractions": fractions}
    train = generate_hands(num_train, split="train", face_card_rule="id", **common)
    validation = generate_hands(num_validation, split="validation", face_card_rule="id", **common)
    test_id, test_rule, test_visual = _eval_hands(
        num_eval, seed=seed, num_cards=num_cards, target=target, split_fractions=fractions
    )
    kw = {
        "target": target,
        "seed": seed,
        "visual": visual,
        "revision": revision,
        "resolution": resolution,
        "verify_iter": verify_iter,
    }
    return GeneralPointsVisualDatasets(
        rl=_rows(train, "id", train_color, sft=False, **kw),
        sft=_rows(train, "id", train_color, sft=True, **kw),
        validation=_rows(validation, "id", train_color, sft=False, **kw),
        eval_id=_rows(test_id, "id", train_color, sft=False, **kw),
        eval_ood_rule=_rows(test_rule, "ood", train_color, sft=False, **kw),
        eval_ood_visual=_rows(test_visual, "id", ood_color, sft=False, **kw),
    )
