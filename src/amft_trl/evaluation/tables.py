"""Markdown tables in the layout of the AMFT paper: models as rows, benchmarks as columns, accuracy in %.

- Math and out-of-distribution (the paper's Table 2, LUFFY's and HPT's main table): AIME24, AIME25, AMC,
  MATH500, Minerva, Olympiad, their unweighted average, then ARC-C, GPQA-D, MMLU-Pro and their average.
- General Points (the paper's Table 3, text variant): ID and OOD (rule).
- Any other benchmark in a table of its own.
- Then, per model, every metric of every benchmark (avg@k, pass@k, greedy) and the prompt template used.

Each figure is the benchmark's headline accuracy: avg@k over its k samples, or greedy accuracy when no samples
were drawn. Pass several `EvalResults` to compare models in one table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from amft_trl.evaluation.benchmarks import BENCHMARK_GROUPS


class _BenchmarkResult(Protocol):
    label: str
    group: str
    reward: str
    template: dict[str, Any]
    num_samples: int
    metrics: dict[str, Any]


class EvalResults(Protocol):
    """What the tables read of an `amft_trl.evaluation.results.EvalResults` (which imports this module, not the
    other way round)."""

    model: str
    backend: str
    settings: dict[str, Any]
    benchmarks: Mapping[str, _BenchmarkResult]
    aggregates: dict[str, dict[str, Any]]


__all__ = ["markdown_report", "markdown_tables"]

_GROUP_AVG_LABEL = {"math": "Avg. (math)", "ood": "Avg. (OOD)"}


def _pct(value: Any) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = [_row(header), "|" + "|".join("---" for _ in header) + "|"]
    lines += [_row(r) for r in rows]
    return "\n".join(lines)


def _ordered(results: Sequence[EvalResults], group: str) -> list[tuple[str, str]]:
    """(name, label) of the benchmarks of a group present in any result, in the paper's order."""
    order = list(BENCHMARK_GROUPS.get(group, ()))
    seen: dict[str, str] = {}
    for r in results:
        for name, b in r.benchmarks.items():
            if b.group == group and name not in seen:
                seen[name] = b.label
    return sorted(
        seen.items(), key=lambda item: (order.index(item[0]) if item[0] in order else len(order), item[0])
    )


_EPISODE_TITLES = {
    "gp_vl": "General Points-VL (card images)",
    "gp_l": "General Points-L (reference verifier)",
    "virl_vl": "V-IRL (street views)",
    "virl_l": "V-IRL (text observations)",
}


def markdown_tables(results: EvalResults | Sequence[EvalResults]) -> str:
    """The comparison tables only (one row per model), without the per-benchmark details."""
    results = [results] if not isinstance(results, Sequence) else list(results)
    parts: list[str] = []
    main_groups = [g for g in ("math", "ood") if _ordered(results, g)]
    if main_groups:
        header, rows = ["Model"], []
        for group in main_groups:
            header += [label for _, label in _ordered(results, group)] + [_GROUP_AVG_LABEL[group]]
        for r in results:
            cells = [r.model]
            for group in main_groups:
                cells += [_pct(r.benchmarks[n].metrics.get("accuracy")) if n in r.benchmarks else "–"
                          for n, _ in _ordered(results, group)]  # fmt: skip
                cells.append(_pct(r.aggregates.get(group, {}).get("accuracy")))
            rows.append(cells)
        parts.append(
            "Math (in-distribution) and out-of-distribution benchmarks, accuracy (%):\n\n"
            + _table(header, rows)
        )
    for group, title in (
        ("general_points", "General Points, accuracy"),
        *((g, f"{t}, success rate") for g, t in _EPISODE_TITLES.items()),
        ("other", "Other benchmarks, accuracy"),
    ):
        columns = _ordered(results, group)
        if not columns:
            continue
        rows = [
            [r.model]
            + [
                _pct(r.benchmarks[n].metrics.get("accuracy")) if n in r.benchmarks else "–"
                for n, _ in columns
            ]
            for r in results
        ]
        parts.append(f"{title} (%):\n\n" + _table(["Model"] + [label for _, label in columns], rows))
    parts.append(_footnote(results))
    return "\n\n".join(parts) + "\n"


def _footnote(results: Sequence[EvalResults]) -> str:
    lines = []
    for r in results:
        by_metric: dict[str, list[str]] = {}
        for b in r.benchmarks.values():
            by_metric.setdefault(b.metrics.get("headline", "?"), []).append(b.label)
        metrics = "; ".join(f"{m} on {', '.join(labels)}" for m, labels in by_metric.items())
        s = r.settings
        lines.append(
            f"{r.model}: {metrics}. Sampling: temperature {s.get('temperature')}, top-p {s.get('top_p')}, at most "
            f"{s.get('max_new_tokens')} new tokens, seed {s.get('seed')}; backend {r.backend}."
        )
    return "\n".join(f"- {line}" for line in lines)


def _details(r: EvalResults) -> str:
    rows = []
    for b in r.benchmarks.values():
        m = b.metrics
        sampled = ", ".join(f"{k} {_pct(v)}" for k, v in m.items() if k.startswith(("avg@", "pass@")))
        rows.append(
            [
                b.label,
                str(m.get("num_problems")),
                str(b.num_samples),
                sampled or "–",
                _pct(m.get("greedy")),
                b.template.get("name", "?"),
                b.reward,
            ]
        )
    header = ["Benchmark", "problems", "samples", "sampled (%)", "greedy (%)", "template", "reward"]
    return f"{r.model}, every metric:\n\n" + _table(header, rows)


def markdown_report(results: EvalResults | Sequence[EvalResults]) -> str:
    """The comparison tables, then each model's per-benchmark details (what `results.md` holds)."""
    results = [results] if not isinstance(results, Sequence) else list(results)
    return markdown_tables(results) + "\n" + "\n\n".join(_details(r) for r in results) + "\n"
