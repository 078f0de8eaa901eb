"""The results of an evaluation run (`evaluate_model`): plain dataclasses, saved as `results.json` and `results.md`.

Their own module, so that `tables` (the markdown tables) and `model_evaluation` (the run) both depend on it and
not on each other.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from amft_trl.evaluation.tables import markdown_report

__all__ = ["BenchmarkResult", "EvalResults"]


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


@dataclass
class BenchmarkResult:
    """One benchmark's outcome: what was run and its metrics, with every problem's completions and scores."""

    name: str
    label: str
    group: str
    source: str
    reward: str
    template: dict[str, Any]
    num_samples: int
    greedy: bool
    notes: list[str]
    metrics: dict[str, Any]
    problems: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EvalResults:
    """The outcome of `evaluate_model`.

    Attributes:
        model: the model's label (its directory name or hub id unless `model_label` is set).
        model_name_or_path: the path or hub id it came from (or the in-process model's `name_or_path`).
        backend: the generation backend used.
        settings: the run's `EvalConfig` as a dict.
        benchmarks: per benchmark, its `BenchmarkResult`.
        aggregates: per averaged group (`math`, `ood`), the unweighted mean of each metric over its benchmarks.
    """

    model: str
    model_name_or_path: str
    backend: str
    settings: dict[str, Any]
    benchmarks: dict[str, BenchmarkResult]
    aggregates: dict[str, dict[str, Any]]
    created: str = ""

    def __getitem__(self, name: str) -> dict[str, Any]:
        """The metrics of one benchmark (`results["math500"]["accuracy"]`)."""
        return self.benchmarks[name].metrics

    @property
    def metrics(self) -> dict[str, dict[str, Any]]:
        """Per benchmark, its metrics (no completions)."""
        return {name: b.metrics for name, b in self.benchmarks.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "model_name_or_path": self.model_name_or_path,
            "backend": self.backend,
            "created": self.created,
            "settings": self.settings,
            "aggregates": self.aggregates,
            "benchmarks": {name: b.to_dict() for name, b in self.benchmarks.items()},
        }

    def to_markdown(self) -> str:
        """The results as markdown tables (see `amft_trl.evaluation.tables.markdown_report`)."""
        return markdown_report([self])

    def save(self, output_dir: str | os.PathLike) -> Path:
        """Write `results.json` and `results.md` into `output_dir`; returns the JSON path."""
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(
            out / "results.json", json.dumps(self.to_dict(), indent=2, ensure_ascii=False, default=str)
        )
        write_atomic(out / "results.md", self.to_markdown())
        return out / "results.json"

    @classmethod
    def load(cls, path: str | os.PathLike) -> EvalResults:
        """Read a `results.json` (or the directory that holds it)."""
        path = Path(path)
        if path.is_dir():
            path = path / "results.json"
        data = json.loads(path.read_text(encoding="utf-8"))
        benchmarks = {name: BenchmarkResult(**b) for name, b in data["benchmarks"].items()}
        return cls(
            model=data["model"],
            model_name_or_path=data["model_name_or_path"],
            backend=data["backend"],
            settings=data["settings"],
            benchmarks=benchmarks,
            aggregates=data["aggregates"],
            created=data.get("created", ""),
        )
