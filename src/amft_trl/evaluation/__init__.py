"""Evaluation the way the field reports it: a checkpoint in, the paper's table out.

```python
from amft_trl.evaluation import evaluate_model

results = evaluate_model("path/or/hub-id", "math,ood", output_dir="eval")  # LUFFY's defaults
results.aggregates["math"]["accuracy"], results["aime24"]["avg@32"], results["math500"]["greedy"]
print(results.to_markdown())
```

or from the command line: `amft-eval --model path/or/hub-id --benchmarks math,ood --output-dir eval`.

- `benchmarks`: named benchmarks (math: `math500`, `aime24`, `aime25`, `amc23`, `minerva`, `olympiadbench`;
  out-of-distribution multiple choice: `arc_c`, `gpqa_diamond`, `mmlu_pro`; `general_points_id`,
  `general_points_ood`), read from the hub or from local files (LUFFY's evaluation parquet files as they
  are), and any local file with a question and an answer column graded by a named reward.
- `metrics`: avg@k, the unbiased pass@k estimator, greedy accuracy, per benchmark and averaged over the math
  and the out-of-distribution sets.
- `backends`: vLLM on a GPU, batched transformers `generate` otherwise.
- `model_evaluation`: `EvalConfig` and `evaluate_model` (generate, grade, aggregate, save; resumable).
- `tables`: markdown tables in the layout of the AMFT paper (Tables 2 and 3).
- `amft_accuracy.py` (`METRIC_PATH`): the graders and pass@k as a Hugging Face `evaluate` metric.
"""

from __future__ import annotations

import os

from amft_trl.evaluation.backends import GenerationBackend, SamplingSettings, TransformersBackend, VLLMBackend
from amft_trl.evaluation.benchmarks import (
    BENCHMARK_GROUPS,
    BENCHMARKS,
    REWARDS,
    Benchmark,
    BenchmarkInfo,
    EvaluationInputError,
    GeneralPointsOptions,
    Problem,
    benchmark_from_dataset,
    load_benchmark,
    load_benchmarks,
    resolve_reward,
)
from amft_trl.evaluation.metrics import avg_at_k, pass_at_k, pass_at_k_problem
from amft_trl.evaluation.model_evaluation import BenchmarkResult, EvalConfig, EvalResults, evaluate_model
from amft_trl.evaluation.multiturn import VisualTaskOptions
from amft_trl.evaluation.prompts import TEMPLATES, PromptTemplate, get_template
from amft_trl.evaluation.tables import markdown_report, markdown_tables

#: Path of the Hugging Face `evaluate` metric module: `evaluate.load(METRIC_PATH, "math")`.
METRIC_PATH: str = os.path.join(os.path.dirname(os.path.abspath(__file__)), "amft_accuracy.py")

__all__ = [
    "BENCHMARKS",
    "BENCHMARK_GROUPS",
    "METRIC_PATH",
    "REWARDS",
    "TEMPLATES",
    "Benchmark",
    "BenchmarkInfo",
    "BenchmarkResult",
    "EvalConfig",
    "EvalResults",
    "EvaluationInputError",
    "GeneralPointsOptions",
    "GenerationBackend",
    "Problem",
    "PromptTemplate",
    "SamplingSettings",
    "TransformersBackend",
    "VLLMBackend",
    "VisualTaskOptions",
    "avg_at_k",
    "benchmark_from_dataset",
    "evaluate_model",
    "get_template",
    "load_benchmark",
    "load_benchmarks",
    "markdown_report",
    "markdown_tables",
    "pass_at_k",
    "pass_at_k_problem",
    "resolve_reward",
]
