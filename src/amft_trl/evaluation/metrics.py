"""Accuracy metrics over sampled completions: `avg@k`, the unbiased `pass@k` estimator, greedy accuracy.

Definitions (one problem, `n` sampled completions of which `c` are correct):

- `avg@n` is `c / n`, averaged over problems (what LUFFY, HPT and the AMFT paper report as "avg@32").
- `pass@k` is the probability that at least one of `k` completions drawn without replacement from the `n` is
  correct: `1 - C(n - c, k) / C(n, k)` (Chen et al. 2021, "Evaluating Large Language Models Trained on
  Code", the unbiased estimator), averaged over problems. `pass@1` equals `avg@n`.
- greedy accuracy is the score of the one greedy (temperature 0) completion, averaged over problems.

Scores are rewards in [0, 1]; a completion counts as correct when its score is at least 0.5 (the rewards of
`amft_trl.rewards` give exactly 0.0 or 1.0).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["CORRECT_THRESHOLD", "avg_at_k", "mean", "num_correct", "pass_at_k", "pass_at_k_problem"]

#: A completion whose score is at least this counts as correct for `pass@k`.
CORRECT_THRESHOLD = 0.5


def pass_at_k_problem(n: int, c: int, k: int) -> float:
    """Unbiased `pass@k` of one problem with `n` samples, `c` of them correct.

    `1 - C(n - c, k) / C(n, k)`, computed as the product `prod_{i = n - c + 1}^{n} (1 - k / i)` so that no
    binomial coefficient is formed (stable for large `n`).

    Raises:
        ValueError: unless `0 <= c <= n` and `1 <= k <= n`.
    """
    if not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n, got n={n}, c={c}.")
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n (the number of samples), got k={k}, n={n}.")
    if n - c < k:
        return 1.0  # every k-subset holds a correct sample
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def num_correct(scores: Sequence[float]) -> int:
    """Number of scores counted as correct (at least `CORRECT_THRESHOLD`)."""
    return sum(1 for s in scores if s >= CORRECT_THRESHOLD)


def mean(values: Sequence[float]) -> float | None:
    """Arithmetic mean, or None for an empty sequence."""
    values = list(values)
    return sum(values) / len(values) if values else None


def pass_at_k(samples: Sequence[Sequence[float]], k: int) -> float | None:
    """Mean unbiased `pass@k` over problems; `samples[i]` holds the scores of problem i's samples.

    Raises:
        ValueError: when a problem has fewer than `k` samples.
    """
    return mean([pass_at_k_problem(len(s), num_correct(s), k) for s in samples])


def avg_at_k(samples: Sequence[Sequence[float]]) -> float | None:
    """Mean over problems of the mean score of each problem's samples (`avg@k`, k = samples per problem)."""
    return mean([sum(s) / len(s) for s in samples if len(s)])
