"""`evaluate_model`: generate, grade, aggregate, save; resumable.

The run, per benchmark: render every prompt with the benchmark's template, then take the problems not scored yet
in chunks (one `generate` batch each on transformers, 256 prompts on vLLM); for each chunk draw one greedy
completion and `num_samples` sampled completions per problem, grade them with the benchmark's reward, and append
one line per problem to `<output_dir>/progress/<benchmark>.jsonl`. A run that is interrupted and started again
with the same settings reads those lines back and generates only the rest; a run whose settings differ from the
saved ones stops with the differing fields named (use another `output_dir` or `overwrite=True`). At the end
`results.json` (settings, every problem's prompt, completions and scores, the metrics and the averages) and
`results.md` (the markdown tables) are written.

Every check (benchmark names, files, columns, gold keys, `k <= num_samples`, the saved progress) runs before
the model is loaded. A completion that breaks its reward scores 0.0 and the run goes on.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from amft_trl.evaluation.backends import (
    GenerationBackend,
    SamplingSettings,
    TransformersBackend,
    VLLMBackend,
    vllm_available,
)
from amft_trl.evaluation.benchmarks import (
    Benchmark,
    EvaluationInputError,
    GeneralPointsOptions,
    load_benchmarks,
)
from amft_trl.evaluation.metrics import avg_at_k, mean, pass_at_k
from amft_trl.evaluation.multiturn import episode_metrics, play
from amft_trl.evaluation.prompts import get_template
from amft_trl.evaluation.results import BenchmarkResult, EvalResults

__all__ = ["AVERAGED_GROUPS", "BenchmarkResult", "EvalConfig", "EvalResults", "evaluate_model"]

logger = logging.getLogger(__name__)

#: Groups whose benchmarks are averaged (unweighted) into one figure, as in the paper's tables.
AVERAGED_GROUPS: tuple[str, ...] = ("math", "ood")
_PROGRESS_DIR = "progress"


@dataclass
class EvalConfig:
    """Settings of an evaluation run (all recorded in `results.json`).

    Defaults are LUFFY's: temperature 0.6, top-p 0.95, avg@32 on AIME24/AIME25/AMC and avg@1 elsewhere,
    8192 new tokens at most.

    Attributes:
        num_samples: sampled completions per problem: one number for every benchmark, a mapping
            `{benchmark: n}` (key `"default"` for the others), or None for each benchmark's own default. 0 draws
            no samples (greedy only).
        pass_k: the k of the reported `pass@k`; default `[1, n]`. Each k must be at most every sampled
            benchmark's `num_samples`.
        greedy: also draw one greedy completion per problem and report greedy accuracy.
        temperature: sampling temperature (0: greedy sampling).
        top_p: nucleus sampling.
        max_new_tokens: longest completion, in tokens.
        batch_size: transformers backend: sequences per `generate` call (default 64 on a GPU, 16 on CPU).
        backend: `"auto"` (vLLM when installed, a GPU is present and the model is a path or hub id; else
            transformers), `"vllm"` or `"transformers"`.
        prompt_template: overrides every benchmark's template: a name (`boxed`, `multiple_choice`, `luffy`,
            `qwen_math`, `plain`, `raw`) or a string with `{question}`.
        system_prompt: a system message added to every prompt (replaces the template's).
        chat_template_kwargs: extra arguments of the chat template for every prompt, as `GRPOConfig`'s (e.g.
            `{"enable_thinking": False}`): evaluate with the rendering the model was trained with.
        seed: seeds sampling and GPQA's option shuffle.
        max_problems: evaluate the first N problems of each benchmark only (smoke runs).
        output_dir: where progress, `results.json` and `results.md` go (None: nothing is written).
        resume: reuse the problems already scored in `output_dir` (same settings only).
        overwrite: discard saved progress made with other settings instead of stopping.
        progress: show a progress bar per benchmark.
        dtype: dtype of a model loaded from a path (`auto`: bfloat16 on a GPU, float32 on CPU).
        model_label: the model's name in the tables (default: its directory name or hub id).
        reward: the reward of plain local files (a name or a dotted path).
        question_column: the question column of plain local files.
        answer_column: the answer column of plain local files.
        gp_num_eval: General Points hands per rule.
        gp_num_cards: cards per General Points hand.
        gp_target: the General Points target.
        gp_seed: seed of the General Points deal (the train/validation/test split of hands).
        vllm_kwargs: extra arguments of `vllm.LLM`.
        visual_tasks: settings of the revision and V-IRL benchmarks (`gp_vl_*`, `gp_l_*`, `virl_*`): fields of
            `amft_trl.evaluation.multiturn.VisualTaskOptions` (`gp_revision_turns`, `virl_path`, ...); the General
            Points deal comes from the `gp_*` fields above.
    """

    num_samples: int | dict[str, int] | None = None
    pass_k: list[int] | None = None
    greedy: bool = True
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 8192
    batch_size: int | None = None
    backend: str = "auto"
    prompt_template: str | None = None
    system_prompt: str | None = None
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    max_problems: int | None = None
    output_dir: str | None = None
    resume: bool = True
    overwrite: bool = False
    progress: bool = True
    dtype: str = "auto"
    model_label: str | None = None
    reward: str | None = None
    question_column: str | None = None
    answer_column: str | None = None
    gp_num_eval: int = 100
    gp_num_cards: int = 4
    gp_target: int = 24
    gp_seed: int = 0
    vllm_kwargs: dict[str, Any] = field(default_factory=dict)
    visual_tasks: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        """Raise `EvaluationInputError` for an out-of-range setting."""
        if self.temperature < 0:
            raise EvaluationInputError(f"temperature must be >= 0, got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise EvaluationInputError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.max_new_tokens < 1:
            raise EvaluationInputError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}.")
        if self.batch_size is not None and self.batch_size < 1:
            raise EvaluationInputError(f"batch_size must be >= 1, got {self.batch_size}.")
        if self.backend not in ("auto", "vllm", "transformers"):
            raise EvaluationInputError(f"backend must be auto, vllm or transformers, got {self.backend!r}.")
        if not isinstance(self.chat_template_kwargs, Mapping):
            raise EvaluationInputError(
                f"chat_template_kwargs must be a mapping (a JSON object), got {self.chat_template_kwargs!r}."
            )
        if self.max_problems is not None and self.max_problems < 1:
            raise EvaluationInputError(f"max_problems must be >= 1, got {self.max_problems}.")
        counts = self.num_samples.values() if isinstance(self.num_samples, Mapping) else [self.num_samples]
        if any(n is not None and (not isinstance(n, int) or n < 0) for n in counts):
            raise EvaluationInputError(f"num_samples must be integers >= 0, got {self.num_samples!r}.")
        if self.pass_k is not None and any(not isinstance(k, int) or k < 1 for k in self.pass_k):
            raise EvaluationInputError(f"pass@k needs integers k >= 1, got {self.pass_k!r}.")
        self.visual_task_options()

    def visual_task_options(self) -> Any:
        """The `VisualTaskOptions` of this run (the General Points deal from the `gp_*` fields)."""
        from amft_trl.evaluation.multiturn import VisualTaskOptions

        known = {f.name for f in fields(VisualTaskOptions)}
        unknown = sorted(set(self.visual_tasks) - known)
        if unknown:
            raise EvaluationInputError(f"visual_tasks: unknown settings {unknown}; see VisualTaskOptions.")
        deal = dict(gp_num_eval=self.gp_num_eval, gp_num_cards=self.gp_num_cards, gp_target=self.gp_target)
        return VisualTaskOptions(**{**deal, "gp_seed": self.gp_seed, **self.visual_tasks})


# --------------------------------------------------------------------------------------------- settings


def _samples_for(config: EvalConfig, benchmark: Benchmark) -> int:
    value = config.num_samples
    if isinstance(value, Mapping):
        if benchmark.name in value:
            return int(value[benchmark.name])
        value = value.get("default")
    if value is not None:
        return int(value)
    return benchmark.num_samples if benchmark.num_samples is not None else 1


def _pass_ks(config: EvalConfig, n: int) -> list[int]:
    if n == 0:
        return []
    ks = config.pass_k if config.pass_k is not None else [1, n]
    return sorted(set(ks))


def _check_plan(config: EvalConfig, benchmarks: Sequence[Benchmark], plan: Mapping[str, int]) -> None:
    if isinstance(config.num_samples, Mapping):
        unknown = sorted(set(config.num_samples) - {b.name for b in benchmarks} - {"default"})
        if unknown:
            raise EvaluationInputError(f"num_samples names benchmark(s) {unknown} that are not evaluated.")
    for b in benchmarks:
        n = plan[b.name]
        if n == 0 and not config.greedy:
            raise EvaluationInputError(f"{b.name}: num_samples is 0 and greedy is off: nothing to evaluate.")
        for k in config.pass_k or []:
            if k > n:
                raise EvaluationInputError(
                    f"pass@{k}: k={k} is larger than the number of samples of {b.name} ({n}); raise "
                    f"--num-samples (e.g. --num-samples {k} or {b.name}={k}) or lower --pass-k."
                )


# --------------------------------------------------------------------------------------------- model identity


def _model_identity(model: Any) -> tuple[str, str, dict[str, Any]]:
    """(label, name_or_path, fingerprint) of a model given as a path, hub id, or loaded module."""
    if isinstance(model, (str, os.PathLike)):
        name = str(model)
        if os.path.isdir(name):
            path = os.path.abspath(name)
            stamps = {
                f: os.path.getmtime(os.path.join(path, f))
                for f in sorted(os.listdir(path))
                if f.endswith((".safetensors", ".bin", ".json"))
            }
            return os.path.basename(path.rstrip("/")), path, {"path": path, "files": stamps}
        return name, name, {"hub_id": name}
    name = str(getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__)
    return (
        os.path.basename(name.rstrip("/")) or name,
        name,
        {"in_process": name, "weights": _weights_hash(model)},
    )


def _weights_hash(model: Any) -> str:
    """A cheap fingerprint of in-process weights (the first values of every tensor), for resuming safely."""
    import torch

    digest = hashlib.sha256()
    with torch.no_grad():
        for name, param in model.named_parameters():
            head = param.detach().reshape(-1)[:16].to("cpu", torch.float64)
            digest.update(name.encode() + str(tuple(param.shape)).encode() + head.numpy().tobytes())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------------------------- progress files


def _fingerprint(
    config: EvalConfig, benchmark: Benchmark, n: int, model_fp: dict[str, Any], tokenizer_name: str
) -> dict[str, Any]:
    episode = {"episode": benchmark.episode.describe()} if benchmark.episode is not None else {}
    return {
        **episode,
        "model": model_fp,
        "tokenizer": tokenizer_name,
        "benchmark": benchmark.name,
        "source": benchmark.source,
        "problems": benchmark.content_hash(),
        "num_problems": len(benchmark.problems),
        "reward": benchmark.reward_name,
        "template": benchmark.template.to_dict(),
        "num_samples": n,
        "greedy": config.greedy,
        "temperature": config.temperature,
        "top_p": config.top_p,
        "max_new_tokens": config.max_new_tokens,
        "seed": config.seed,
    }


def _progress_path(output_dir: str, name: str) -> Path:
    return Path(output_dir) / _PROGRESS_DIR / f"{name}.jsonl"


def _read_progress(path: Path, fingerprint: dict[str, Any], config: EvalConfig) -> dict[str, dict[str, Any]]:
    """The records saved by an earlier run with the same fingerprint (an empty dict when there are none)."""
    if not path.exists():
        return {}
    lines = path.read_text(encoding="utf-8").splitlines()
    try:
        saved = json.loads(lines[0])["fingerprint"] if lines else None
    except (json.JSONDecodeError, KeyError, TypeError):
        saved = None
    if saved != json.loads(json.dumps(fingerprint, default=str)):
        if config.overwrite or saved is None:
            path.unlink()
            return {}
        differing = sorted(
            k for k in set(saved) | set(fingerprint) if saved.get(k) != _jsonable(fingerprint.get(k))
        )
        raise EvaluationInputError(
            f"{path} holds results of a run with other settings ({', '.join(differing)} differ); use another "
            "--output-dir or --overwrite."
        )
    records: dict[str, dict[str, Any]] = {}
    for line in lines[1:]:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut off by the interruption: that problem is generated again
        if isinstance(record, dict) and "id" in record:
            records[str(record["id"])] = record
    return records


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


# --------------------------------------------------------------------------------------------- scoring


def _score(
    benchmark: Benchmark, problems: Sequence[Any], completions: Sequence[Sequence[str]]
) -> list[list[float | None]]:
    """Grade completions (per problem) with the benchmark's reward. None where the reward gave no number (a gold
    it cannot parse, an exception); the caller scores those 0.0 and counts them."""
    flat: list[str] = []
    owners: list[int] = []
    for index, texts in enumerate(completions):
        flat.extend(texts)
        owners.extend([index] * len(texts))
    if not flat:
        return [[] for _ in problems]
    columns = sorted({key for p in problems for key in p.reward_kwargs})

    def call(texts: list[str], rows: list[int]) -> list[Any]:
        kwargs = {c: [problems[r].reward_kwargs.get(c) for r in rows] for c in columns}
        return list(benchmark.reward(texts, **kwargs))

    try:
        values = call(flat, owners)
        if len(values) != len(flat):
            raise ValueError(f"the reward returned {len(values)} scores for {len(flat)} completions")
    except Exception as exc:  # one bad completion must not stop the run: grade one by one
        logger.warning("%s: %s raised %r on a batch; grading completions one by one.", benchmark.name,
                       benchmark.reward_name, exc)  # fmt: skip
        values = []
        for text, owner in zip(flat, owners):
            try:
                values.append(call([text], [owner])[0])
            except Exception:
                values.append(None)
    scores: list[list[float | None]] = [[] for _ in problems]
    for value, owner in zip(values, owners):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
        scores[owner].append(float(value) if ok else None)
    return scores


def _sample(text: str, score: float | None) -> dict[str, Any]:
    """One completion's record; a completion the reward could not grade scores 0.0 and is marked."""
    return {"text": text, "score": 0.0, "unscored": True} if score is None else {"text": text, "score": score}


# --------------------------------------------------------------------------------------------- metrics


def _metrics(records: Sequence[Mapping[str, Any]], n: int, greedy: bool, ks: Sequence[int]) -> dict[str, Any]:
    metrics: dict[str, Any] = {"num_problems": len(records), "num_samples": n}
    if n:
        samples = [[s["score"] for s in r["samples"]] for r in records]
        metrics[f"avg@{n}"] = avg_at_k(samples)
        for k in ks:
            metrics[f"pass@{k}"] = pass_at_k(samples, k)
    if greedy:
        metrics["greedy"] = mean([r["greedy"]["score"] for r in records])
    graded = [s for r in records for s in [*r["samples"], *([r["greedy"]] if r.get("greedy") else [])]]
    metrics["unscored"] = sum(1 for s in graded if s.get("unscored"))
    metrics["headline"] = f"avg@{n}" if n else "greedy"
    metrics["accuracy"] = metrics[metrics["headline"]]
    return metrics


def _aggregates(results: Mapping[str, BenchmarkResult]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for group in AVERAGED_GROUPS:
        members = [r for r in results.values() if r.group == group]
        if not members:
            continue
        entry: dict[str, Any] = {"benchmarks": [r.name for r in members]}
        for key in ("accuracy", "greedy", "pass@1"):
            values = [r.metrics.get(key) for r in members]
            if all(v is not None for v in values):
                entry[key] = mean(values)
        out[group] = entry
    return out


# --------------------------------------------------------------------------------------------- model loading


def _load_tokenizer(source: str, processor: bool = False) -> Any:
    from transformers import AutoProcessor, AutoTokenizer

    return (AutoProcessor if processor else AutoTokenizer).from_pretrained(source)


def _load_model(path: str, dtype: str, vision: bool = False) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    cuda = torch.cuda.is_available()
    if dtype == "auto":
        torch_dtype = torch.bfloat16 if cuda else torch.float32
    else:
        torch_dtype = getattr(torch, dtype)
    auto = AutoModelForImageTextToText if vision else AutoModelForCausalLM
    model = auto.from_pretrained(path, dtype=torch_dtype)
    return model.to("cuda" if cuda else "cpu")


# --------------------------------------------------------------------------------------------- the run


def evaluate_model(
    model: str | os.PathLike | Any | None,
    benchmarks: str | Sequence[str | Benchmark],
    *,
    tokenizer: Any | None = None,
    config: EvalConfig | None = None,
    backend: str | GenerationBackend | None = None,
    **settings: Any,
) -> EvalResults:
    """Evaluate a model on benchmarks: sampled and greedy completions, graded, aggregated, saved.

    Args:
        model: a checkpoint directory, a hub id, None (the embedded SmolLM2-135M-Instruct), or a loaded
            causal LM (then pass its `tokenizer`; it is used in place, on its device, and left in the mode it
            was in).
        benchmarks: names, groups (`math`, `ood`, `general_points`), `NAME=SOURCE` pairs, file paths (a
            comma-separated string or a list), or `Benchmark` objects (`benchmark_from_dataset`).
        tokenizer: the tokenizer (object or path); default: the model's.
        config: the run's settings (`EvalConfig`).
        backend: `"auto"`, `"vllm"` or `"transformers"` (sets `config.backend`), or a ready generation backend
            (any `GenerationBackend`, e.g. one that calls an inference server).
        **settings: `EvalConfig` fields overriding `config` (`num_samples=0, max_new_tokens=64, ...`).

    Returns:
        `EvalResults`; also written to `config.output_dir` when set.

    Raises:
        EvaluationInputError: bad benchmarks, files, settings or saved progress, before any model is loaded.

    Example (the held-out General Points hands, greedy, on a model being trained):

    ```python
    from amft_trl.evaluation import benchmark_from_dataset, evaluate_model
    from amft_trl.rewards import general_points_reward

    results = evaluate_model(
        trainer.model, [benchmark_from_dataset("general_points_id", data.eval_id, general_points_reward,
                                               group="general_points", label="ID")],
        tokenizer=trainer.processing_class, num_samples=0, max_new_tokens=128,
    )
    results["general_points_id"]["greedy"]
    ```
    """
    if isinstance(backend, str):
        settings["backend"], backend = backend, None
    unknown = sorted(set(settings) - {f.name for f in fields(EvalConfig)})
    if unknown:
        raise TypeError(f"evaluate_model() got unknown settings {unknown}; see EvalConfig.")
    config = replace(config or EvalConfig(), **settings)
    config.check()

    # ---- everything that can fail on input, before any model is loaded ----
    loaded = load_benchmarks(
        benchmarks,
        reward=config.reward,
        question_column=config.question_column,
        answer_column=config.answer_column,
        seed=config.seed,
        general_points=GeneralPointsOptions(
            config.gp_num_eval, config.gp_num_cards, config.gp_target, config.gp_seed
        ),
        max_problems=config.max_problems,
        visual_tasks=config.visual_task_options(),
    )
    if config.prompt_template is not None or config.system_prompt is not None:
        for b in loaded:
            spec = config.prompt_template if config.prompt_template is not None else b.template
            try:
                b.template = get_template(spec, config.system_prompt)
            except ValueError as exc:
                raise EvaluationInputError(str(exc)) from None
    if config.chat_template_kwargs:
        for b in loaded:
            b.template = replace(b.template, chat_template_kwargs=dict(config.chat_template_kwargs))
    plan = {b.name: _samples_for(config, b) for b in loaded}
    _check_plan(config, loaded, plan)

    if config.backend == "vllm" and backend is None:
        if not (model is None or isinstance(model, (str, os.PathLike))):
            raise EvaluationInputError("backend 'vllm' needs a model path or hub id, not a loaded model.")
        if not vllm_available():
            raise EvaluationInputError(
                "backend 'vllm' needs vLLM installed (pip install 'amft-trl[vllm]') and a GPU."
            )
    if model is None or isinstance(model, (str, os.PathLike)):
        from amft_trl.embedded_model import resolve_model_name_or_path

        try:
            model = resolve_model_name_or_path(None if model is None else str(model))
        except (ValueError, FileNotFoundError) as exc:
            raise EvaluationInputError(str(exc)) from None
    else:
        while not hasattr(model, "generate") and hasattr(model, "module"):  # DDP / accelerate wrappers
            model = model.module
    label, name_or_path, model_fp = _model_identity(model)
    label = config.model_label or label
    tokenizer_name = tokenizer if isinstance(tokenizer, (str, os.PathLike)) else None
    tokenizer_name = str(tokenizer_name or getattr(tokenizer, "name_or_path", "") or name_or_path)

    saved: dict[str, dict[str, dict[str, Any]]] = {}
    fingerprints = {}
    for b in loaded:
        fingerprints[b.name] = _fingerprint(config, b, plan[b.name], model_fp, tokenizer_name)
        saved[b.name] = {}
        if config.output_dir is not None:
            path = _progress_path(config.output_dir, b.name)
            if not config.resume and path.exists():
                path.unlink()
            saved[b.name] = _read_progress(path, fingerprints[b.name], config)
    todo = {b.name: [p for p in b.problems if p.id not in saved[b.name]] for b in loaded}

    # ---- tokenizer, model and backend (the model only when something is left to generate) ----
    images = any(b.needs_images for b in loaded)
    if images and config.backend == "vllm" and backend is None:
        raise EvaluationInputError(
            "The image benchmarks run on the transformers backend: use --backend transformers."
        )
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = _load_tokenizer(str(tokenizer or name_or_path), processor=images)
    if images and not hasattr(tokenizer, "image_processor") and backend is None:
        raise EvaluationInputError(
            f"{[b.name for b in loaded if b.needs_images]}: image benchmarks need the model's processor (a "
            "vision-language model), not a tokenizer."
        )
    if any(todo[b.name] for b in loaded if b.episode is not None):
        from amft_trl.evaluation.multiturn import check_tool_parsing

        check_tool_parsing(tokenizer, next(b.name for b in loaded if b.episode is not None))
    engine = backend
    if engine is None and any(todo.values()):
        engine = _make_backend(model, tokenizer, config, vision=images)
    backend_name = getattr(engine, "name", "none (all problems already scored)")

    results: dict[str, BenchmarkResult] = {}
    for b in loaded:
        records, chat = _run_benchmark(
            b, plan[b.name], config, tokenizer, engine, saved[b.name], fingerprints[b.name]
        )
        n = plan[b.name]
        results[b.name] = BenchmarkResult(
            name=b.name,
            label=b.label or b.name,
            group=b.group,
            source=b.source,
            reward=b.reward_name,
            template={**b.template.to_dict(), "chat_template_applied": chat},
            num_samples=n,
            greedy=config.greedy,
            notes=list(b.notes),
            metrics={**_metrics(records, n, config.greedy, _pass_ks(config, n)), **episode_metrics(records)},
            problems=records,
        )
    out = EvalResults(
        model=label,
        model_name_or_path=name_or_path,
        backend=backend_name,
        settings=_jsonable(asdict(config)),
        benchmarks=results,
        aggregates=_aggregates(results),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )
    if config.output_dir is not None:
        out.save(config.output_dir)
    return out


def _make_backend(model: Any, tokenizer: Any, config: EvalConfig, vision: bool = False) -> GenerationBackend:
    is_path = isinstance(model, (str, os.PathLike))
    use_vllm = not vision and (
        config.backend == "vllm" or (config.backend == "auto" and is_path and vllm_available())
    )
    if use_vllm:
        kwargs = dict(config.vllm_kwargs)
        if config.dtype != "auto":
            kwargs.setdefault("dtype", config.dtype)
        return VLLMBackend(model, getattr(tokenizer, "name_or_path", None), seed=config.seed, **kwargs)
    if is_path:
        model = _load_model(str(model), config.dtype, vision=vision)
    batch_size = config.batch_size or (
        64 if getattr(model, "device", None) is not None and model.device.type == "cuda" else 16
    )
    if hasattr(tokenizer, "image_processor"):  # a processor: images go through it, text through its tokenizer
        return TransformersBackend(model, tokenizer.tokenizer, batch_size=batch_size, processor=tokenizer)
    return TransformersBackend(model, tokenizer, batch_size=batch_size)


def _encode(tokenizer: Any, text: str, chat: bool) -> list[int]:
    # A chat template already holds the special tokens it needs; plain text gets the tokenizer's (e.g. BOS).
    return list(tokenizer(text, add_special_tokens=not chat)["input_ids"])


def _run_benchmark(
    benchmark: Benchmark,
    n: int,
    config: EvalConfig,
    tokenizer: Any,
    engine: GenerationBackend | None,
    saved: dict[str, dict[str, Any]],
    fingerprint: dict[str, Any],
) -> tuple[list[dict[str, Any]], bool]:
    """Generate and grade the problems not saved yet; the records of all problems, and whether the chat
    template rendered the prompts."""
    rendered = {p.id: benchmark.template.render(p.question, tokenizer) for p in benchmark.problems}
    todo = [p for p in benchmark.problems if p.id not in saved]
    path = _progress_path(config.output_dir, benchmark.name) if config.output_dir is not None else None
    if todo:
        assert engine is not None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                path.write_text(
                    json.dumps({"fingerprint": fingerprint}, default=str) + "\n", encoding="utf-8"
                )
            else:
                with path.open("rb+") as f:  # end a line cut off by an interruption, so new lines start clean
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        f.write(b"\n")
        sample_settings = SamplingSettings(config.temperature, config.top_p, config.max_new_tokens)
        greedy_settings = SamplingSettings(0.0, 1.0, config.max_new_tokens)
        per_call = max(1, int(getattr(engine, "problems_per_call", lambda _n: 16)(max(n, 1))))
        bar = _progress_bar(benchmark.name, len(benchmark.problems), len(saved), config.progress)
        try:
            for start in range(0, len(todo), per_call):
                chunk = todo[start : start + per_call]
                seed = config.seed + int(
                    hashlib.sha256(f"{benchmark.name}/{chunk[0].id}".encode()).hexdigest()[:8], 16
                )
                if benchmark.episode is not None or benchmark.needs_images:  # multi-turn, or images
                    greedy = (
                        play(benchmark, chunk, 1, engine, tokenizer, greedy_settings, seed)
                        if config.greedy
                        else None
                    )
                    sampled = (
                        play(benchmark, chunk, n, engine, tokenizer, sample_settings, seed) if n else None
                    )
                    lines = []
                    for i, problem in enumerate(chunk):
                        record = {
                            "id": problem.id,
                            "greedy": None if greedy is None else greedy[i][0],
                            "samples": [] if sampled is None else sampled[i],
                        }
                        saved[problem.id] = record
                        lines.append(json.dumps(record, ensure_ascii=False))
                    if path is not None:
                        with path.open("a", encoding="utf-8") as f:
                            f.write("\n".join(lines) + "\n")
                    bar.update(len(chunk))
                    continue
                ids = [_encode(tokenizer, *rendered[p.id]) for p in chunk]
                greedy_texts = engine.generate(ids, 1, greedy_settings, seed) if config.greedy else None
                sample_texts = engine.generate(ids, n, sample_settings, seed) if n else [[] for _ in chunk]
                greedy_scores = _score(benchmark, chunk, greedy_texts) if greedy_texts is not None else None
                sample_scores = _score(benchmark, chunk, sample_texts)
                lines = []
                for i, problem in enumerate(chunk):
                    record = {
                        "id": problem.id,
                        "greedy": None
                        if greedy_texts is None
                        else _sample(greedy_texts[i][0], greedy_scores[i][0]),
                        "samples": [_sample(t, s) for t, s in zip(sample_texts[i], sample_scores[i])],
                    }
                    saved[problem.id] = record
                    lines.append(json.dumps(record, ensure_ascii=False))
                if path is not None:
                    with path.open("a", encoding="utf-8") as f:
                        f.write("\n".join(lines) + "\n")
                bar.update(len(chunk))
        finally:
            bar.close()
    records = []
    for p in benchmark.problems:
        record = saved[p.id]
        records.append(
            {
                "id": p.id,
                "prompt": rendered[p.id][0],
                "gold": p.gold,
                "greedy": record.get("greedy"),
                "samples": record.get("samples", []),
                **({"meta": p.meta} if p.meta else {}),
            }
        )
    return records, any(chat for _, chat in rendered.values())


def _progress_bar(name: str, total: int, done: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc=name, unit="problem", disable=not enabled, leave=True)
