"""Per-seed summary of one or more finished `amft-compare` grids, for `docs/source/results.md`.

`amft-compare --report-only` writes each grid's own `table.md`; this prints one markdown table across grids, with the
score of every seed, the mean and its 95% Student-t interval (`amft_trl.compare.stats`), and the paired difference to
a reference run set that may live in another grid (e.g. a sensitivity grid that reruns `two_stage` with another
rate on the same seeds and data). It reads only the runs' `result.json` files.

    python benchmarks/compare_summary.py \
        benchmarks/results/compare/smollm2_addition \
        "benchmarks/results/compare/smollm2_addition_two_stage_rl_lr=two_stage, RL 5e-6" \
        --reference "two_stage, RL 5e-6"

A grid argument is `DIR` or `DIR=LABEL`; with a label, the grid's methods are shown as `LABEL` (one method) or
`LABEL: method`. `--reference` names a row label (a method name for unlabelled grids).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from amft_trl.compare.stats import mean_interval, paired_difference
from amft_trl.compare.summary import load_runs


def _load(grid_dir: Path) -> dict[str, dict[int, dict]]:
    """`{method: {seed: result}}`, methods in the order of the grid's copy (`grid.yaml`), if it is there."""
    runs = load_runs(grid_dir)
    grid_file = grid_dir / "grid.yaml"
    if grid_file.exists():
        order = list(yaml.safe_load(grid_file.read_text()).get("methods") or [])
        runs = dict(sorted(runs.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
    return runs


def _tokens(n: float) -> str:
    return f"{n / 1000:.1f}k" if n >= 1000 else f"{n:.0f}"


def _interval(values: list[float]) -> str:
    iv = mean_interval(values)
    if iv.n < 2:
        return f"{iv.mean:.1f}"
    return f"{iv.mean:.1f} [{iv.low:.1f}, {iv.high:.1f}]"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("grids", nargs="+", help="grid output directories, each DIR or DIR=LABEL")
    parser.add_argument(
        "--reference", default="two_stage", help="row label of the paired differences' reference"
    )
    parser.add_argument(
        "--id-set", default=None, help="in-distribution evaluation set (default: the first one)"
    )
    args = parser.parse_args(argv)

    rows: dict[str, dict[int, dict]] = {}
    for spec in args.grids:
        directory, _, label = spec.partition("=")
        runs = _load(Path(directory))
        if not runs:
            raise SystemExit(f"{directory}: no finished runs (runs/*/seed-*/result.json)")
        for method, by_seed in runs.items():
            name = method if not label else (label if len(runs) == 1 else f"{label}: {method}")
            rows[name] = by_seed
    if args.reference not in rows:
        raise SystemExit(f"--reference {args.reference!r} is not a row; rows: {', '.join(rows)}")

    sets = list(next(iter(next(iter(rows.values())).values()))["final"])
    id_set = args.id_set or sets[0]
    others = [s for s in sets if s != id_set]
    ref = {seed: r["final"][id_set] * 100 for seed, r in rows[args.reference].items()}

    head = [
        "method",
        "seeds",
        f"{id_set} % per seed",
        f"{id_set} mean [95% CI]",
        f"Δ {id_set} vs {args.reference}",
    ]
    head += [f"{s} % per seed" for s in others] + [f"{s} mean" for s in others]
    head += ["tokens generated / SFT, per run (mean)"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name, by_seed in rows.items():
        seeds = sorted(by_seed)
        scores = {s: by_seed[s]["final"][id_set] * 100 for s in seeds}
        if name == args.reference:
            delta = "reference"
        else:
            d = paired_difference(scores, ref)
            star = " *" if d.excludes_zero() else ""
            delta = f"{d.mean:+.1f}" if d.n < 2 else f"{d.mean:+.1f} [{d.low:.1f}, {d.high:.1f}]{star}"
        cells = [
            f"`{name}`",
            ",".join(map(str, seeds)),
            " / ".join(f"{scores[s]:.1f}" for s in seeds),
            _interval(list(scores.values())),
            delta,
        ]
        for s in others:
            cells.append(" / ".join(f"{by_seed[k]['final'][s] * 100:.1f}" for k in seeds))
        for s in others:
            cells.append(_interval([by_seed[k]["final"][s] * 100 for k in seeds]))
        spent = {  # mean over the seeds
            key: sum(by_seed[k]["spent"].get(key, 0.0) for k in seeds) / len(seeds)
            for key in ("generated_tokens", "validation_generated_tokens", "sft_tokens")
        }
        gen = _tokens(spent["generated_tokens"])
        if spent["validation_generated_tokens"]:
            gen += f" + {_tokens(spent['validation_generated_tokens'])} val."
        cells.append(f"{gen} / {_tokens(spent['sft_tokens'])}")
        print("| " + " | ".join(cells) + " |")
    print(f"\n`*`: the 95% interval of the paired difference to `{args.reference}` (same seeds) excludes 0.")


if __name__ == "__main__":
    main()
