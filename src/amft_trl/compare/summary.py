"""The comparison's report: `runs.csv` (one row per run), `results.csv` and `table.md` (per method: mean and 95%
interval over seeds of every evaluation set, the paired difference to the reference, the budget really spent, the
tuned value) and the plots (accuracy against steps and against compute, the SFT weight, the training reward)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from amft_trl.compare.grid import Grid
from amft_trl.compare.stats import Interval, mean_interval, paired_difference

SPENT_COLUMNS = ("generated_tokens", "validation_generated_tokens", "sft_tokens", "wall_seconds")


def load_runs(out: Path) -> dict[str, dict[int, dict[str, Any]]]:
    """Finished runs of the table: method -> seed -> result."""
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for path in sorted((out / "runs").glob("*/seed-*/result.json")):
        result = json.loads(path.read_text())
        runs.setdefault(result["method"], {})[int(result["seed"])] = result
    return runs


def _fmt(value: float, scale: float = 100.0, digits: int = 1) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value * scale:.{digits}f}"


def _interval(iv: Interval, scale: float = 100.0) -> str:
    if iv.n == 0:
        return "n/a"
    if iv.n == 1 or not math.isfinite(iv.low):
        return f"{_fmt(iv.mean, scale)} (1 seed)"
    return f"{_fmt(iv.mean, scale)} [{_fmt(iv.low, scale)}, {_fmt(iv.high, scale)}]"


def _tokens(value: float) -> str:
    if value >= 1e6:
        return f"{value / 1e6:.2f}M"
    if value >= 1e3:
        return f"{value / 1e3:.1f}k"
    return f"{value:.0f}"


def load_base(out: Path) -> dict[str, Any] | None:
    """The starting model's scores (`base_eval.json`: test scores, validation score, each test set's group)."""
    path = out / "base_eval.json"
    return json.loads(path.read_text()) if path.exists() else None


def summarize(
    grid: Grid, out: Path, runs: dict | None = None, base: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """One row per (method, evaluation set): mean and interval over seeds, paired difference, spent budget."""
    runs = load_runs(out) if runs is None else runs
    base = load_base(out) if base is None else base
    sets = _test_names(base, runs)
    groups = (base or {}).get("groups", {})
    reference = runs.get(grid.reference or "", {})
    rows = []
    for method in grid.methods:
        by_seed = runs.get(method, {})
        if not by_seed:
            continue
        choice = _choice(out, method)
        spent = {c: mean_interval([r["spent"][c] for r in by_seed.values()]).mean for c in SPENT_COLUMNS}
        for name in sets:
            scores = {s: r["final"][name] for s, r in by_seed.items() if name in r["final"]}
            iv = mean_interval(list(scores.values()))
            diff = None
            if reference and method != grid.reference:
                diff = paired_difference(scores, {s: r["final"][name] for s, r in reference.items()})
            rows.append(
                {
                    "method": method,
                    "eval_set": name,
                    "group": groups.get(name, ""),
                    "seeds": iv.n,
                    "mean": iv.mean,
                    "ci_low": iv.low,
                    "ci_high": iv.high,
                    "std": iv.std,
                    "diff_vs_reference": None if diff is None else diff.mean,
                    "diff_ci_low": None if diff is None else diff.low,
                    "diff_ci_high": None if diff is None else diff.high,
                    "tuned": "" if choice is None else json.dumps(choice["chosen"]),
                    "optimizer_steps": grid.budget.max_steps,
                    **spent,
                }
            )
    return rows


def _choice(out: Path, method: str) -> dict[str, Any] | None:
    path = out / "tuning" / method / "choice.json"
    return json.loads(path.read_text()) if path.exists() else None


def _test_names(base: dict[str, Any] | None, runs: dict) -> list[str]:
    if base is not None:
        return list(base["test"])
    for by_seed in runs.values():
        for result in by_seed.values():
            return list(result["final"])
    return []


def write_report(grid: Grid, out: str | Path) -> dict[str, Path]:
    """Write `runs.csv`, `results.csv`, `table.md` and the plots from the finished runs in `out`."""
    from amft_trl.compare import sensitivity

    out = Path(out)
    runs, base = load_runs(out), load_base(out)
    rows = summarize(grid, out, runs, base)
    sweeps = sensitivity.load_sweeps(out)
    sets = _test_names(base, runs or {m: p for by_point in sweeps.values() for m, p in by_point.items()})
    if sweeps:  # the sweep points' rows follow the table's, with the point they ran
        rows = rows + sensitivity.summarize_sweeps(grid, out, sweeps, sets)
    paths = {"results": out / "results.csv", "runs": out / "runs.csv", "table": out / "table.md"}
    if rows:
        with paths["results"].open("w", newline="") as f:
            writer = csv.DictWriter(
                f, fieldnames=list(dict.fromkeys(k for row in rows for k in row)), restval=""
            )
            writer.writeheader()
            writer.writerows(rows)
    with paths["runs"].open("w", newline="") as f:
        writer = csv.writer(f)
        point = ["point"] if sweeps else []
        writer.writerow(["method", *point, "seed", *sets, *SPENT_COLUMNS, "optimizer_steps", "checksum"])
        every = [(m, "", by_seed) for m, by_seed in runs.items()]
        every += [
            (m, json.dumps(grid.methods[m].sweep[i]) if m in grid.methods else str(i), by_seed)
            for m, by_point in sweeps.items()
            for i, by_seed in sorted(by_point.items())
        ]
        for method, label, by_seed in every:
            for seed, r in sorted(by_seed.items()):
                writer.writerow(
                    [
                        method,
                        *([label] if sweeps else []),
                        seed,
                        *(r["final"].get(s) for s in sets),
                        *(r["spent"][c] for c in SPENT_COLUMNS),
                        r["optimizer_steps"],
                        r["checksum"],
                    ]
                )
    table_rows = [r for r in rows if not r.get("point")]
    text = markdown(grid, out, table_rows, sets, base) if runs or not sweeps else _header(grid, base) + "\n"
    if sweeps:
        text += "\n" + sensitivity.markdown(grid, out, sweeps, sets)
        paths.update(sensitivity.plot(grid, out, sweeps, sets))
    paths["table"].write_text(text)
    if runs or not sweeps:
        paths.update(plot(grid, out, runs, sets, base))
    return paths


def _header(grid: Grid, base: dict[str, Any] | None) -> str:
    """The grid's title, task, starting model (with its scores), seeds and budget."""
    b = grid.budget
    return "\n".join(
        [
            f"# Comparison: {grid.name}",
            "",
            f"- task: `{grid.task}` {json.dumps(grid.task_options) if grid.task_options else ''}",
            f"- starting model: `{grid.model}`"
            + (
                f" (scores: {', '.join(f'{k} {_fmt(v)}' for k, v in base['test'].items())}; validation "
                f"{_fmt(base['val'])})"
                if base
                else ""
            ),
            f"- seeds: {grid.seeds}; budget: {b.max_steps} optimizer steps for every method (SFT stage / warm-up: "
            f"{b.sft_steps} / {b.warmup_steps} steps)",
        ]
    )


def markdown(
    grid: Grid, out: Path, rows: list[dict[str, Any]], sets: list[str], base: dict[str, Any] | None
) -> str:
    """The table: accuracy (%) per evaluation set with its 95% interval, the paired difference, the budget."""
    lines = _header(grid, base).split("\n")
    lines += [
        f"- tuning: each tuned method's trials on seed {grid.tuning_seed}, {grid.tuning_max_steps} steps, scored on "
        "the validation split (never the test sets)",
        "- accuracy in %, mean over seeds [95% Student-t interval]; "
        + (
            f"Δ: paired difference to `{grid.reference}` over the same seeds [95% interval]"
            if grid.reference
            else "no reference method in this grid"
        ),
        "",
    ]
    header = ["method", *(f"{s}" for s in sets)]
    if grid.reference:
        header += [f"Δ {s}" for s in sets]
    header += ["generated tok", "val. rollout tok", "SFT tok", "wall s", "tuned"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    by_method: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_method.setdefault(row["method"], {})[row["eval_set"]] = row
    for method, cells in by_method.items():
        first = next(iter(cells.values()))
        line = [f"`{method}`"]
        for s in sets:
            r = cells.get(s)
            line.append(
                _interval(Interval(r["mean"], r["ci_low"], r["ci_high"], r["std"], r["seeds"])) if r else ""
            )
        if grid.reference:
            for s in sets:
                r = cells.get(s)
                if r is None or r["diff_vs_reference"] is None:
                    line.append("ref." if method == grid.reference else "")
                else:
                    iv = Interval(
                        r["diff_vs_reference"], r["diff_ci_low"], r["diff_ci_high"], 0.0, r["seeds"]
                    )
                    mark = " *" if iv.excludes_zero() else ""
                    line.append(_interval(iv) + mark)
        line += [
            _tokens(first["generated_tokens"]),
            _tokens(first["validation_generated_tokens"]),
            _tokens(first["sft_tokens"]),
            f"{first['wall_seconds']:.0f}",
            first["tuned"].replace("|", "/") or "-",
        ]
        lines.append("| " + " | ".join(line) + " |")
    lines += ["", "`*`: the 95% interval of the paired difference excludes 0.", ""]
    tuning = [(m, _choice(out, m)) for m in grid.methods]
    tuning = [(m, c) for m, c in tuning if c]
    if tuning:
        lines += [
            "## Tuning (validation accuracy, %)",
            "",
            "| method | trials (value: val. accuracy) | chosen |",
            "|---|---|---|",
        ]
        for method, choice in tuning:
            trials = "; ".join(
                f"{json.dumps(t)}: {_fmt(v)}"
                for t, v in zip(choice["trials"], choice["val_scores"], strict=True)
            )
            lines.append(f"| `{method}` | {trials} | {json.dumps(choice['chosen'])} |")
        lines.append("")
    ranking = sorted(
        ((m, c[sets[0]]["mean"]) for m, c in by_method.items() if sets and sets[0] in c),
        key=lambda x: -x[1],
    )
    if ranking:
        lines += [f"Ranking on `{sets[0]}` (mean): {ranking_text(ranking)}", ""]
        top = [m for m, v in ranking if _fmt(v) == _fmt(ranking[0][1])]
        std = by_method[top[0]][sets[0]]["std"]
        if base is not None and sets[0] in base["test"] and std is not None and math.isfinite(std):
            gain = ranking[0][1] - base["test"][sets[0]]
            if math.isfinite(gain):
                lines += [separation_text(top, sets[0], gain, std), ""]
    return "\n".join(lines)


def ranking_text(ranking: list[tuple[str, float]]) -> str:
    """`a` 50.0 > `b` 40.0, with the methods whose means print alike (to 0.1 points) joined by `=`, not ranked."""
    groups: list[list[tuple[str, float]]] = []
    for method, value in ranking:
        if groups and _fmt(groups[-1][0][1]) == _fmt(value):
            groups[-1].append((method, value))
        else:
            groups.append([(method, value)])
    if len(groups) == 1 and len(ranking) > 1:
        return f"all {len(ranking)} methods tie at {_fmt(ranking[0][1])}"
    return " > ".join(" = ".join(f"`{m}` {_fmt(v)}" for m, v in group) for group in groups)


def separation_text(top: list[str], eval_set: str, gain: float, std: float) -> str:
    """Whether the best method's gain over the starting model reaches 3 standard deviations over seeds.

    No gain (at the table's precision, 0.1 points) is no separation, whatever the standard deviation: a grid where
    every method scores what the starting model scored has not separated anything, even when its seeds agree."""
    best = f"`{top[0]}`" + (f" (tied with {', '.join(f'`{m}`' for m in top[1:])})" if len(top) > 1 else "")
    if float(_fmt(gain)) <= 0:
        return (
            f"Separation: none. The best method, {best}, gains {_fmt(gain)} points on `{eval_set}` over the "
            "starting model: no method improves on it at this budget."
        )
    separates = std == 0 or gain / std >= 3
    ratio = f"{gain / std:.1f}" if std > 0 else "inf (the seeds agree)"
    return (
        f"Separation: the best method, {best}, gains {_fmt(gain)} points on `{eval_set}` over the starting "
        f"model; its standard deviation over seeds is {_fmt(std)} points, a ratio of {ratio} "
        f"({'at least' if separates else 'below'} 3: "
        f"{'it separates' if separates else 'no method separates at this budget'})."
    )


def _curve(results: dict[int, dict[str, Any]], name: str, x: str, base: dict | None) -> tuple[list, list]:
    """Mean over seeds of the test score at each evaluation point; x = step or total tokens spent."""
    points: dict[int, list[tuple[float, float]]] = {}
    for r in results.values():
        evals = list(r["evals"]) + [{"step": r["optimizer_steps"], "spent": r["spent"], "scores": r["final"]}]
        if base is not None:
            evals = [{"step": 0, "spent": {c: 0.0 for c in SPENT_COLUMNS}, "scores": base["test"]}, *evals]
        for e in evals:
            spent = e["spent"]
            tokens = spent["generated_tokens"] + spent["validation_generated_tokens"] + spent["sft_tokens"]
            points.setdefault(e["step"], []).append((tokens, e["scores"][name]))
    steps = sorted(points)
    xs = [s if x == "step" else sum(t for t, _ in points[s]) / len(points[s]) for s in steps]
    ys = [sum(v for _, v in points[s]) / len(points[s]) for s in steps]
    return xs, ys


def _mean_series(results: dict[int, dict[str, Any]], key: str) -> tuple[list, list]:
    per_step: dict[int, list[float]] = {}
    for r in results.values():
        for step, value in zip(r["series"]["step"], r["series"][key], strict=True):
            if value is not None:
                per_step.setdefault(step, []).append(value)
    steps = sorted(per_step)
    return steps, [sum(per_step[s]) / len(per_step[s]) for s in steps]


def plot(grid: Grid, out: Path, runs: dict, sets: list[str], base: dict[str, Any] | None) -> dict[str, Path]:
    """accuracy_vs_steps.png, accuracy_vs_compute.png, sft_weight.png and reward.png (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    cmap = plt.get_cmap("tab20")
    style = {  # one colour per method (tab20: 12 methods do not repeat), dashed for every other one
        m: {"color": cmap((2 * i) % 20 + (i // 10) % 2), "linestyle": "-" if i % 2 == 0 else "--"}
        for i, m in enumerate(grid.methods)
    }
    paths = {}
    for x, label, fname in (
        ("step", "optimizer step", "accuracy_vs_steps.png"),
        ("tokens", "tokens spent (generated + validation rollouts + SFT)", "accuracy_vs_compute.png"),
    ):
        fig, axes = plt.subplots(1, max(len(sets), 1), figsize=(6 * max(len(sets), 1), 4.2), squeeze=False)
        for ax, name in zip(axes[0], sets, strict=False):
            for method in grid.methods:
                if method in runs:
                    xs, ys = _curve(runs[method], name, x, base)
                    ax.plot(xs, [100 * y for y in ys], marker="o", ms=3, label=method, **style[method])
            ax.set_title(f"{name} (mean over seeds)")
            ax.set_xlabel(label)
            ax.set_ylabel("accuracy (%)")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        paths[fname] = out / fname
        fig.savefig(paths[fname], dpi=110)
        plt.close(fig)
    for key, ylabel, fname in (
        ("mu", "SFT weight (amft/mu)", "sft_weight.png"),
        ("reward", "training reward", "reward.png"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for method in grid.methods:
            if method in runs and not (key == "reward" and method == "sft_only"):
                steps, values = _mean_series(runs[method], key)
                if values:
                    ax.plot(steps, values, label=method, **style[method])
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(f"{ylabel}, mean over seeds")
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths[fname] = out / fname
        fig.savefig(paths[fname], dpi=110)
        plt.close(fig)
    return paths
