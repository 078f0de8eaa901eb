"""What a benchmark is: its problems, the reward that grades them, and the error bad evaluation input raises.

Shared by the benchmark loaders (`amft_trl.evaluation.benchmarks`) and the multi-turn episodes
(`amft_trl.evaluation.multiturn`), which build benchmarks of their own; neither imports the other for these.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from amft_trl.evaluation.prompts import TEMPLATES, PromptTemplate

__all__ = ["Benchmark", "EvaluationInputError", "Problem"]


class EvaluationInputError(ValueError):
    """Bad evaluation input (benchmark name, file, column, gold key, setting), found before any model loads."""


@dataclass
class Problem:
    """One problem of a benchmark.

    Attributes:
        id: stable identifier within the benchmark (its position after loading), used to resume.
        question: the question text (rendered through the benchmark's template), or chat messages used as is.
        gold: the gold answer, for display in the results.
        reward_kwargs: the columns the benchmark's reward reads for this problem (`solution`, `answer`,
            `cards`/`face_card_rule`/`target`, or a file's own columns).
        meta: anything worth recording (options and their order, the source row, ...).
        images: the images of the prompt's image parts, in order (General Points-VL, V-IRL street views).
    """

    id: str
    question: str | list[dict[str, Any]]
    gold: Any
    reward_kwargs: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)
    images: list[Any] | None = None


@dataclass
class Benchmark:
    """A set of problems, the reward that grades them and the template their prompts are rendered with.

    Attributes:
        name: the benchmark's key in the results (`math500`, `my_file`, ...).
        problems: the problems.
        reward: a reward with TRL's signature `f(completions, **columns) -> list[float | None]`.
        reward_name: how the reward is named in the results.
        group: `"math"` and `"ood"` are averaged into the table's two `Avg.` columns; `"general_points"` has its
            own table; anything else (`"other"`) is listed on its own.
        label: the column header in the markdown table (default: `name`).
        template: how a question becomes the prompt.
        source: where the problems came from (a hub id, a file, `"in-memory"`).
        num_samples: this benchmark's default number of samples per problem (None: the run's default).
        notes: remarks recorded in the results (duplicates collapsed, options relabelled, ...).
        episode: how a multi-turn problem is played (`amft_trl.evaluation.multiturn.EpisodeTask`); None: one
            answer per problem.
    """

    name: str
    problems: list[Problem]
    reward: Callable[..., list[float | None]]
    reward_name: str
    group: str = "other"
    label: str | None = None
    template: PromptTemplate = TEMPLATES["plain"]
    source: str = "in-memory"
    num_samples: int | None = None
    notes: list[str] = field(default_factory=list)
    episode: Any = None

    @property
    def needs_images(self) -> bool:
        """Whether its prompts carry images (a vision-language model and processor are needed)."""
        return any(p.images for p in self.problems)

    def __len__(self) -> int:
        return len(self.problems)

    def content_hash(self) -> str:
        """A hash of the problems' questions, golds and reward columns (part of the resume fingerprint)."""
        digest = hashlib.sha256()
        for p in self.problems:
            digest.update(
                json.dumps([p.id, p.question, p.reward_kwargs], sort_keys=True, default=str).encode()
            )
        return digest.hexdigest()[:16]
