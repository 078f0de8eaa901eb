r"""amft-trl's graders as a Hugging Face `evaluate` metric: accuracy, avg@k and unbiased pass@k.

Load it by path (offline; `amft_trl.evaluation.METRIC_PATH` is this file):

```python
import evaluate
from amft_trl.evaluation import METRIC_PATH

math = evaluate.load(METRIC_PATH, "math")  # or "multiple_choice"
math.compute(predictions=["... so the answer is \\boxed{\\frac{1}{2}}"], references=["0.5"])
# {'accuracy': 1.0, 'num_problems': 1, 'num_samples': 1, 'pass@1': 1.0}
math.compute(predictions=[["\\boxed{3}", "\\boxed{4}"]], references=["4"], k=[1, 2])  # samples per problem
# {'accuracy': 0.5, 'num_problems': 1, 'num_samples': 2, 'pass@1': 0.5, 'pass@2': 1.0}
```

Configurations: `math` (default; `math_accuracy_reward`, math-verify equivalence of the last `\boxed{}` with
the reference) and `multiple_choice` (`multiple_choice_reward`; references are letters or 0-based indices).
Predictions are completions: one string per problem, or a list of sampled completions per problem (all
problems with the same number). A malformed or hostile completion scores 0.
"""

from __future__ import annotations

import datasets
import evaluate

from amft_trl.evaluation.metrics import avg_at_k, pass_at_k
from amft_trl.rewards import math_accuracy_reward, multiple_choice_reward

_DESCRIPTION = (
    "Accuracy, avg@k and unbiased pass@k of completions, graded by amft-trl's math or multiple-choice reward."
)
_KWARGS_DESCRIPTION = """
Args:
    predictions: one completion per problem (list of str), or several sampled completions per problem
        (list of list of str, the same number for every problem).
    references: the gold answer per problem: a final answer (math) or a letter / 0-based index (multiple_choice).
    k: the k of pass@k to report (default: 1 and the number of samples).
Returns:
    accuracy: mean score over problems and samples (avg@k); pass@k for each k; num_problems; num_samples.
"""
_CITATION = """\
@article{chen2021evaluating,
  title={Evaluating Large Language Models Trained on Code},
  author={Chen, Mark and others},
  journal={arXiv preprint arXiv:2107.03374},
  year={2021}
}
"""


class AmftAccuracy(evaluate.Metric):
    """avg@k and unbiased pass@k under amft-trl's math or multiple-choice grader."""

    def _info(self) -> evaluate.MetricInfo:
        if self.config_name not in ("default", "math", "multiple_choice"):
            raise ValueError(f"Unknown configuration {self.config_name!r}: use 'math' or 'multiple_choice'.")
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features(
                    {
                        "predictions": datasets.Sequence(datasets.Value("string")),
                        "references": datasets.Value("string"),
                    }
                ),
                datasets.Features(
                    {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
                ),
            ],
        )

    def _compute(self, predictions, references, k=None):  # noqa: D401 - evaluate's signature
        samples = [list(p) if isinstance(p, (list, tuple)) else [p] for p in predictions]
        n = len(samples[0]) if samples else 0
        if any(len(s) != n for s in samples):
            raise ValueError("Every problem needs the same number of predictions.")
        flat = [text for s in samples for text in s]
        golds = [ref for ref, s in zip(references, samples) for _ in s]
        if self.config_name == "multiple_choice":
            golds = [int(g) if isinstance(g, str) and g.strip().isdigit() else g for g in golds]
            rewards = multiple_choice_reward(flat, answer=golds)
        else:
            rewards = math_accuracy_reward(flat, solution=golds)
        scores = [0.0 if r is None else float(r) for r in rewards]
        per_problem = [scores[i * n : (i + 1) * n] for i in range(len(samples))]
        result = {"accuracy": avg_at_k(per_problem), "num_problems": len(samples), "num_samples": n}
        for kk in sorted(set(k if k is not None else [1, n])):
            result[f"pass@{kk}"] = pass_at_k(per_problem, kk)
        return result
