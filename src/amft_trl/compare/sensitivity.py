"""The report of a grid's knob sweeps (`sweep:` entries, `amft_trl.compare.grid`): how good each method is with its
knob set badly, well, or left at its default, with no tuning.

Per method and test set: every point's mean accuracy over seeds with its 95% interval; the best and the worst point
(by mean); the mean over the knob grid (each seed's average over the points, then the mean and interval over seeds);
the point at the method's default (what the grid would run without the sweep: its `args`, else the `AMFTConfig`
default, else the grid's budget). Where `fixed` and another method both sweep `mu_init`, the paired difference
(method - fixed) on the same seeds at each starting mu, and the method's final mu per start (does the controller
bring different starts together?). Plot: accuracy against the knob value, one curve per method, one panel per knob.
"""

from __future__ import annotations

import json
import math
from dataclasses import fields
from pathlib import Path
from typing import Any

from amft_trl.compare.grid import SWEEP_BUDGET_FIELDS, Grid
from amft_trl.compare.stats import Interval, mean_interval, paired_difference

SWEEP_COLUMNS = ("point", "is_default", "final_mu_mean", "final_mu_low", "final_mu_high")


def load_sweeps(out: Path) -> dict[str, dict[int, dict[int, dict[str, Any]]]]:
    """Finished sweep runs: method -> point index -> seed -> result."""
    sweeps: dict[str, dict[int, dict[int, dict[str, Any]]]] = {}
    for path in sorted((out / "sweeps").glob("*/point-*/seed-*/result.json")):
        result = json.loads(path.read_text())
        index = int(path.parent.parent.name.removeprefix("point-"))
        sweeps.setdefault(result["method"], {}).setdefault(index, {})[int(result["seed"])] = result
    return sweeps


def default_point(grid: Grid, method: str) -> dict[str, Any]:
    """The value of each swept field when the method is not swept: its `args`, else what makes it the method,
    else the `AMFTConfig` default; `budget.*` fields from the grid's budget."""
    from amft_trl import AMFTConfig

    entry = grid.methods[method]
    settings = grid.settings(method)
    defaults = {f.name: f.default for f in fields(AMFTConfig)}
    out = {}
    for key in dict.fromkeys(k for p in entry.sweep for k in p):  # in the order the points name them
        if key in SWEEP_BUDGET_FIELDS:
            out[key] = getattr(grid.budget, key.removeprefix("budget."))
        else:
            out[key] = settings.get(key, defaults.get(key))
    return out


def point_label(point: dict[str, Any]) -> str:
    return ", ".join(f"{k.removeprefix('budget.')}={v}" for k, v in point.items())


def final_mu(result: dict[str, Any]) -> float | None:
    values = [v for v in result["series"]["mu"] if v is not None]
    return float(values[-1]) if values else None


def summarize_sweeps(
    grid: Grid, out: Path, sweeps: dict | None = None, sets: list[str] | None = None
) -> list[dict[str, Any]]:
    """One row per (method, point, test set): mean and interval over seeds, whether it is the default, final mu."""
    sweeps = load_sweeps(out) if sweeps is None else sweeps
    rows = []
    for method, entry in grid.methods.items():
        if not entry.sweep or method not in sweeps:
            continue
        default = default_point(grid, method)
        for index, point in enumerate(entry.sweep):
            by_seed = sweeps[method].get(index, {})
            if not by_seed:
                continue
            mus = [m for m in (final_mu(r) for r in by_seed.values()) if m is not None]
            mu = mean_interval(mus) if mus else None
            for name in sets or list(next(iter(by_seed.values()))["final"]):
                iv = mean_interval([r["final"][name] for r in by_seed.values() if name in r["final"]])
                rows.append(
                    {
                        "method": method,
                        "eval_set": name,
                        "point": json.dumps(point),
                        "point_index": index,
                        "is_default": all(point[k] == default.get(k) for k in point),
                        "seeds": iv.n,
                        "mean": iv.mean,
                        "ci_low": iv.low,
                        "ci_high": iv.high,
                        "std": iv.std,
                        "final_mu_mean": None if mu is None else mu.mean,
                        "final_mu_low": None if mu is None else mu.low,
                        "final_mu_high": None if mu is None else mu.high,
                    }
                )
    return rows


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value * 100:.1f}"


def _iv(iv: Interval) -> str:
    if iv.n == 0:
        return "n/a"
    if iv.n == 1 or not math.isfinite(iv.low):
        return f"{_fmt(iv.mean)} (1 seed)"
    return f"{_fmt(iv.mean)} [{_fmt(iv.low)}, {_fmt(iv.high)}]"


def method_summary(
    grid: Grid, method: str, points: dict[int, dict[int, dict[str, Any]]], name: str
) -> dict[str, Any]:
    """Best, worst and default point (each with its interval over seeds) and the mean over the knob grid."""
    entry = grid.methods[method]
    per_point = {
        i: mean_interval([r["final"][name] for r in by_seed.values()])
        for i, by_seed in points.items()
        if by_seed
    }
    best = max(per_point, key=lambda i: (per_point[i].mean, -i))
    worst = min(per_point, key=lambda i: (per_point[i].mean, i))
    seeds = sorted(set.intersection(*(set(points[i]) for i in per_point)))  # seeds every point ran on
    grid_mean = mean_interval(
        [sum(points[i][s]["final"][name] for i in per_point) / len(per_point) for s in seeds]
    )
    default = default_point(grid, method)
    default_index = next((i for i, p in enumerate(entry.sweep) if all(p[k] == default[k] for k in p)), None)
    return {
        "best": (entry.sweep[best], per_point[best]),
        "worst": (entry.sweep[worst], per_point[worst]),
        "grid_mean": grid_mean,
        "default": (default, per_point.get(default_index) if default_index is not None else None),
        "points_run": len(per_point),
        "points": len(entry.sweep),
    }


def _mu_index(grid: Grid, method: str) -> dict[float, int]:
    """mu_init -> point index, for a sweep whose points differ in mu_init only."""
    sweep = grid.methods[method].sweep if method in grid.methods else []
    if not sweep or any(set(p) != {"mu_init"} for p in sweep):
        return {}
    return {float(p["mu_init"]): i for i, p in enumerate(sweep)}


def markdown(grid: Grid, out: Path, sweeps: dict, sets: list[str]) -> str:
    """The sensitivity section of `table.md`."""
    lines = [
        "## Knob sensitivity (sweeps: every value on every seed, no tuning)",
        "",
        "Accuracy in %, mean over seeds [95% Student-t interval]. Mean over the grid: each seed's average over the "
        "knob's values, then the mean and interval over seeds. Default: the value the grid runs without the sweep "
        "(the method's `args`, else the `AMFTConfig` default, else the grid's budget).",
        "",
    ]
    for name in sets:
        lines += [
            f"### `{name}`",
            "",
            "| method | knob values | best | mean over the grid | worst | at the default |",
            "|---|---|---|---|---|---|",
        ]
        for method, entry in grid.methods.items():
            if not entry.sweep or method not in sweeps:
                continue
            s = method_summary(grid, method, sweeps[method], name)
            default, default_iv = s["default"]
            ran = f" ({s['points_run']} of {s['points']} run)" if s["points_run"] < s["points"] else ""
            values = "; ".join(point_label(p) for p in entry.sweep) + ran
            lines.append(
                f"| `{method}` | {values} | {_iv(s['best'][1])} at {point_label(s['best'][0])} | "
                f"{_iv(s['grid_mean'])} | {_iv(s['worst'][1])} at {point_label(s['worst'][0])} | "
                + (
                    f"{_iv(default_iv)} at {point_label(default)}"
                    if default_iv is not None
                    else f"not swept ({point_label(default)})"
                )
                + " |"
            )
        lines += [
            "",
            "Every point (final SFT weight: the `amft/mu` of the last step, mean over seeds):",
            "",
            "| method | point | " + name + " | final SFT weight |",
            "|---|---|---|---|",
        ]
        for method, entry in grid.methods.items():
            for i, point in enumerate(entry.sweep):
                by_seed = sweeps.get(method, {}).get(i)
                if not by_seed:
                    continue
                iv = mean_interval([r["final"][name] for r in by_seed.values()])
                mus = [m for m in (final_mu(r) for r in by_seed.values()) if m is not None]
                mu = f"{sum(mus) / len(mus):.3f}" if mus else "-"
                lines.append(f"| `{method}` | {point_label(point)} | {_iv(iv)} | {mu} |")
        lines.append("")
        lines += _versus_fixed(grid, sweeps, name)
    return "\n".join(lines)


def _versus_fixed(grid: Grid, sweeps: dict, name: str) -> list[str]:
    """Paired difference method - fixed at the same mu_init, and the method's final mu per start."""
    fixed = _mu_index(grid, "fixed")
    lines = []
    for method in grid.methods:
        mine = _mu_index(grid, method)
        if method == "fixed" or not fixed or not mine or method not in sweeps or "fixed" not in sweeps:
            continue
        shared = [mu for mu in mine if mu in fixed]
        lines += [
            f"`{method}` - `fixed` at the same starting mu (paired over seeds, points), and `{method}`'s final mu "
            "(mean over seeds [95% interval]):",
            "",
            f"| mu_init | `{method}` | `fixed` | Δ {name} | final mu of `{method}` |",
            "|---|---|---|---|---|",
        ]
        finals = []
        for mu in shared:
            a = sweeps[method].get(mine[mu], {})
            b = sweeps["fixed"].get(fixed[mu], {})
            if not a or not b:
                continue
            diff = paired_difference(
                {s: r["final"][name] for s, r in a.items()}, {s: r["final"][name] for s, r in b.items()}
            )
            mus = [m for m in (final_mu(r) for r in a.values()) if m is not None]
            mu_iv = mean_interval(mus) if mus else None
            if mu_iv is not None:
                finals.append((mu, mu_iv.mean))
            mu_text = (
                "-"
                if mu_iv is None
                else (
                    f"{mu_iv.mean:.3f}"
                    + (f" [{mu_iv.low:.3f}, {mu_iv.high:.3f}]" if math.isfinite(mu_iv.low) else "")
                )
            )
            mark = " *" if diff.n > 1 and diff.excludes_zero() else ""
            lines.append(
                f"| {mu} | {_iv(mean_interval([r['final'][name] for r in a.values()]))} | "
                f"{_iv(mean_interval([r['final'][name] for r in b.values()]))} | {_iv(diff)}{mark} | {mu_text} |"
            )
        lines.append("")
        if len(finals) > 1:
            start = max(m for m, _ in finals) - min(m for m, _ in finals)
            end = max(v for _, v in finals) - min(v for _, v in finals)
            lines += [
                f"Convergence of `{method}`'s mu: starts spread over {start:.2f}, final mu (mean over seeds) spread "
                f"over {end:.3f} ({min(v for _, v in finals):.3f} to {max(v for _, v in finals):.3f}), "
                f"{end / start:.0%} of the starting spread.",
                "",
            ]
    if lines:
        lines.append("`*`: the 95% interval of the paired difference excludes 0.")
        lines.append("")
    return lines


def log_axis(values: list[float]) -> bool:
    """Whether a knob's values are drawn on a log axis: all positive, the largest at least 30 times the smallest
    (e.g. a shaping gamma of 0.01 to 10, or a buffer of 4 to 128 prompts, which a linear axis would crowd into its
    left edge)."""
    return bool(values) and min(values) > 0 and max(values) / min(values) >= 30


def plot(grid: Grid, out: Path, sweeps: dict, sets: list[str]) -> dict[str, Path]:
    """sensitivity.png: accuracy against the knob value, one curve per method, one panel per (knob, test set); a
    knob whose values span a factor of 30 or more is drawn on a log axis (`log_axis`)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    panels: dict[tuple[str, ...], list[str]] = {}
    for method, entry in grid.methods.items():
        if entry.sweep and method in sweeps:
            panels.setdefault(tuple(sorted({k for p in entry.sweep for k in p})), []).append(method)
    if not panels:
        return {}
    rows, cols = len(sets), len(panels)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.8 * rows), squeeze=False, sharey="row")
    for r, name in enumerate(sets):
        for c, (knob, methods) in enumerate(panels.items()):
            ax = axes[r][c]
            numeric = len(knob) == 1 and all(
                isinstance(p[knob[0]], int | float) for m in methods for p in grid.methods[m].sweep
            )
            labels: list[str] = []
            xs_all = [p[knob[0]] for m in methods for p in grid.methods[m].sweep] if numeric else [0, 1]
            log = numeric and log_axis(xs_all)
            span = (math.log10(max(xs_all) / min(xs_all)) if log else max(xs_all) - min(xs_all)) or 1.0
            for j, method in enumerate(methods):
                dodge = (j - (len(methods) - 1) / 2) * 0.012 * span  # the curves' error bars side by side
                xs, ys, lo, hi = [], [], [], []
                for i, point in enumerate(grid.methods[method].sweep):
                    by_seed = sweeps[method].get(i)
                    if not by_seed:
                        continue
                    iv = mean_interval([res["final"][name] for res in by_seed.values()])
                    if numeric:
                        x = point[knob[0]]
                    else:
                        label = point_label(point)
                        if label not in labels:
                            labels.append(label)
                        x = labels.index(label)
                    xs.append(x * 10**dodge if log else x + dodge)
                    ys.append(100 * iv.mean)
                    low = iv.low if math.isfinite(iv.low) else iv.mean
                    high = iv.high if math.isfinite(iv.high) else iv.mean
                    lo.append(100 * (iv.mean - low))
                    hi.append(100 * (high - iv.mean))
                ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", ms=4, capsize=3, label=method)
            if log:
                ax.set_xscale("log")
                ax.set_xticks(sorted(set(xs_all)))
                ax.set_xticklabels([f"{x:g}" for x in sorted(set(xs_all))])
                ax.tick_params(axis="x", which="minor", bottom=False, labelbottom=False)
            if not numeric:
                ax.set_xticks(range(len(labels)))
                ax.set_xticklabels(labels, rotation=20, fontsize=7, ha="right")
            ax.set_xlabel(", ".join(k.removeprefix("budget.") for k in knob))
            ax.set_ylabel(f"{name} accuracy (%)")
            ax.set_title(f"{name}: mean over seeds, 95% interval", fontsize=9)
            ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "sensitivity.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {"sensitivity.png": path}
