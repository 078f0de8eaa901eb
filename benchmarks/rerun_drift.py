"""How far a rerun of a finished `amft-compare` grid moved from the committed one (issue 25: reproducibility).

Both directories hold a grid's `runs.csv` (one row per run: method, sweep point, seed, scores, parameter checksum).
Runs are matched on (method, point, seed); for each evaluation set this prints how many reruns trained bit-identical
weights (same checksum), how far single runs moved, and, per method and point, the rerun's mean minus the committed
mean with the 95% interval of the paired difference over seeds (`amft_trl.compare.stats.paired_difference`). It
reads only the two `runs.csv` files.

    python benchmarks/rerun_drift.py benchmarks/results/compare/toy_addition_sensitivity \\
        benchmarks/results/compare/toy_addition_sensitivity_other_kernels

A rerun on the same host from the same code is expected to be bit-identical; a rerun with other CPU kernels (another
host, `ATEN_CPU_CAPABILITY`, another thread count) is expected to move within the seed intervals.
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

from amft_trl.compare.stats import mean_interval, paired_difference

Key = tuple[str, str, int]


def load(grid_dir: Path) -> dict[Key, dict[str, str]]:
    """`{(method, point, seed): row}` from a grid's `runs.csv`."""
    with open(grid_dir / "runs.csv", newline="") as handle:
        return {
            (row["method"], row.get("point", ""), int(row["seed"])): row for row in csv.DictReader(handle)
        }


def score_columns(row: dict[str, str]) -> list[str]:
    """The evaluation columns of `runs.csv` (the ones between `seed` and the budget columns)."""
    names = list(row)
    return names[names.index("seed") + 1 : names.index("generated_tokens")]


def drift(reference: dict[Key, dict[str, str]], rerun: dict[Key, dict[str, str]]) -> str:
    """The markdown report (see the module docstring)."""
    keys = sorted(set(reference) & set(rerun))
    if not keys:
        raise SystemExit("no run is in both grids (matched on method, sweep point and seed)")
    lines = [
        f"{len(keys)} runs in both grids ({len(reference)} committed, {len(rerun)} rerun); "
        f"{sum(reference[k]['checksum'] == rerun[k]['checksum'] for k in keys)} trained bit-identical weights "
        "(same parameter checksum).",
        "",
    ]
    for column in score_columns(reference[keys[0]]):
        moved = [100 * (float(rerun[k][column]) - float(reference[k][column])) for k in keys]
        absolute = [abs(m) for m in moved]
        lines += [
            f"### `{column}`",
            "",
            f"Single runs: {sum(a > 0 for a in absolute)} of {len(keys)} changed score; |change| mean "
            f"{sum(absolute) / len(absolute):.1f}, largest {max(absolute):.1f} points. Rerun - committed over all runs: "
            f"{_fmt(mean_interval(moved))}.",
            "",
            "| method | point | committed mean | rerun mean | rerun - committed, paired over seeds [95% CI] |",
            "|---|---|---|---|---|",
        ]
        groups: dict[tuple[str, str], list[int]] = defaultdict(list)
        for method, point, seed in keys:
            groups[(method, point)].append(seed)
        for (method, point), seeds in groups.items():
            ref = {s: 100 * float(reference[(method, point, s)][column]) for s in seeds}
            new = {s: 100 * float(rerun[(method, point, s)][column]) for s in seeds}
            lines.append(
                f"| `{method}` | {point or '-'} | {sum(ref.values()) / len(ref):.1f} | {sum(new.values()) / len(new):.1f}"
                f" | {_fmt(paired_difference(new, ref))} |"
            )
        lines.append("")
    return "\n".join(lines)


def _fmt(interval) -> str:
    if interval.n < 2:
        return f"{interval.mean:+.1f} (1 run)"
    return f"{interval.mean:+.1f} [{interval.low:+.1f}, {interval.high:+.1f}]"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference", type=Path, help="the committed grid's output directory")
    parser.add_argument("rerun", type=Path, help="the rerun's output directory")
    args = parser.parse_args(argv)
    print(drift(load(args.reference), load(args.rerun)))


if __name__ == "__main__":
    main()
