"""`amft-eval`: evaluate a checkpoint on the field's benchmarks and print the paper's table.

    amft-eval --model Qwen/Qwen2.5-Math-7B --benchmarks math,ood --output-dir eval/qwen-math
    amft-eval --model out/checkpoint-500 --benchmarks data/valid.all.parquet,data/valid.arc_c.parquet
    amft-eval --benchmarks general_points --num-samples 0 --max-new-tokens 128     # the embedded model, greedy
    amft-eval --model M --benchmarks my.jsonl --reward math_accuracy_reward --question-column problem
    amft-eval --model out/qwen-vl --benchmarks gp_vl --backend transformers      # card images, revision loop
    amft-eval --model out/qwen-vl --benchmarks virl_vl --virl-path data/nyc_1k_routes --virl-ood-path data/sf

Bad input (an unknown benchmark, a file without the needed columns, a gold key outside its options, a pass@k
larger than the number of samples, settings that differ from a saved run's) stops with one `error:` line
before any model is loaded. The exit status is 2 for bad input, 130 when interrupted (start the same command
again to resume).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from amft_trl.evaluation.benchmarks import BENCHMARK_GROUPS, BENCHMARKS, REWARDS, EvaluationInputError
from amft_trl.evaluation.prompts import TEMPLATES

__all__ = ["build_parser", "main", "parse_num_samples"]

PROG = "amft-eval"


def parse_num_samples(text: str) -> int | dict[str, int]:
    """`8` -> 8; `aime24=64,amc23=16` -> a mapping; `8,aime24=64` -> `{"default": 8, "aime24": 64}`."""
    out: dict[str, int] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, sep, value = item.rpartition("=")
        key = name.strip() if sep else "default"
        try:
            count = int(value)
        except ValueError:
            raise EvaluationInputError(f"--num-samples: {item!r} is not a number or NAME=NUMBER.") from None
        if count < 0:
            raise EvaluationInputError(f"--num-samples: {item!r} is negative.")
        out[key] = count
    if not out:
        raise EvaluationInputError("--num-samples is empty.")
    return out["default"] if list(out) == ["default"] else out


def _parse_ks(text: str) -> list[int]:
    try:
        ks = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise EvaluationInputError(f"--pass-k: {text!r} is not a comma-separated list of integers.") from None
    if not ks or any(k < 1 for k in ks):
        raise EvaluationInputError(f"--pass-k: {text!r}: every k must be an integer >= 1.")
    return ks


def _parse_json_object(text: str | None, flag: str) -> dict:
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise EvaluationInputError(f"{flag}: not valid JSON ({exc}).") from None
    if not isinstance(value, dict):
        raise EvaluationInputError(f"{flag}: expected a JSON object, got {text!r}.")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of `amft-eval`."""
    names = ", ".join(list(BENCHMARKS) + list(BENCHMARK_GROUPS))
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Evaluate a model on math, out-of-distribution, General Points and visual / multi-turn (GP-VL, V-IRL) benchmarks; write "
        "results.json and the paper's markdown table.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model",
        default=None,
        help="Checkpoint directory or hub id (default: the embedded SmolLM2-135M-Instruct).",
    )
    p.add_argument("--tokenizer", default=None, help="Tokenizer directory or hub id (default: the model's).")
    p.add_argument("--model-name", default=None, help="The model's name in the tables.")
    p.add_argument(
        "--benchmarks",
        required=False,
        default=None,
        help=f"Comma-separated: names ({names}), NAME=FILE_OR_HUB_ID, or files (a LUFFY/verl file expands into "
        "its data sources; other files need --reward).",
    )
    p.add_argument(
        "--num-samples",
        default=None,
        help="Samples per problem: N, or NAME=N pairs, or both (N,aime24=64). Default: 32 on AIME24/AIME25/AMC, "
        "1 elsewhere (LUFFY). 0: greedy only.",
    )
    p.add_argument("--pass-k", default=None, help="k values of pass@k, comma-separated (default: 1 and N).")
    p.add_argument("--no-greedy", action="store_true", help="Do not draw the greedy completion.")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=8192)
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="transformers: sequences per generate call (64 GPU, 16 CPU).",
    )
    p.add_argument("--backend", choices=("auto", "vllm", "transformers"), default="auto")
    p.add_argument(
        "--prompt-template",
        default=None,
        help=f"Override every benchmark's template: one of {sorted(TEMPLATES)} or a string with {{question}}.",
    )
    p.add_argument("--system-prompt", default=None, help="A system message for every prompt.")
    p.add_argument(
        "--chat-template-kwargs",
        default=None,
        help="Extra arguments of the chat template, as JSON (e.g. '{\"enable_thinking\": false}'): the "
        "training config's `chat_template_kwargs`, so the model sees the prompts it was trained on.",
    )
    p.add_argument(
        "--output-dir", default=None, help="Where results go (default: eval_results/<model name>)."
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--max-problems", type=int, default=None, help="Only the first N problems of each benchmark."
    )
    p.add_argument(
        "--reward", default=None, help=f"Reward of plain files: {sorted(REWARDS)} or module.function."
    )
    p.add_argument(
        "--question-column",
        default=None,
        help="Question column of plain files (default: problem/question/prompt).",
    )
    p.add_argument(
        "--answer-column", default=None, help="Answer column of plain files (default: answer, else solution)."
    )
    p.add_argument("--gp-num-eval", type=int, default=100, help="General Points hands per rule.")
    p.add_argument("--gp-num-cards", type=int, default=4, help="General Points cards per hand.")
    p.add_argument("--gp-target", type=int, default=24, help="General Points target.")
    p.add_argument("--gp-seed", type=int, default=0, help="Seed of the General Points deal.")
    p.add_argument(
        "--gp-revision-turns",
        type=int,
        default=5,
        help="gp_vl/gp_l: verified answers per episode (the reference's verify_iter); 0: one JSON answer, no tools.",
    )
    p.add_argument("--gp-resolution", type=int, default=512, help="gp_vl: card image size in pixels.")
    p.add_argument(
        "--virl-path", default=None, help="virl_*: the local V-IRL data folder (route_infos.json, ...)."
    )
    p.add_argument(
        "--virl-ood-path", default=None, help="virl_*_ood_visual: another city's V-IRL data folder."
    )
    p.add_argument(
        "--virl-num-train",
        type=int,
        default=0,
        help="virl_*: routes the training split off first (build_virl_datasets' num_train); evaluation takes the next.",
    )
    p.add_argument(
        "--virl-num-validation", type=int, default=0, help="virl_*: validation routes split off next."
    )
    p.add_argument(
        "--virl-num-eval", type=int, default=None, help="virl_*: evaluation routes (default: the rest)."
    )
    p.add_argument("--virl-seed", type=int, default=0, help="virl_*: seed of the route shuffle.")
    p.add_argument(
        "--virl-verify-iter", type=int, default=2, help="virl_*: wrong answers allowed at one position."
    )
    p.add_argument("--max-turns", type=int, default=64, help="gp_vl/gp_l/virl_*: most answers per episode.")
    p.add_argument(
        "--vllm-kwargs",
        default=None,
        help="JSON object of extra vllm.LLM arguments, e.g. '{\"tensor_parallel_size\": 8}'.",
    )
    p.add_argument(
        "--dtype", default="auto", help="auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16."
    )
    p.add_argument("--no-resume", action="store_true", help="Start over instead of reusing scored problems.")
    p.add_argument(
        "--overwrite", action="store_true", help="Discard saved progress made with other settings."
    )
    p.add_argument("--no-progress", action="store_true", help="No progress bars.")
    p.add_argument("--list-benchmarks", action="store_true", help="List the named benchmarks and exit.")
    return p


def _list_benchmarks() -> str:
    lines = [f"{'name':20} {'group':15} {'default source':40} samples"]
    for info in BENCHMARKS.values():
        source = info.hub_id or {
            "general_points_revision": "amft_trl.tasks.general_points_visual",
            "virl": "--virl-path" if info.split != "ood_visual" else "--virl-ood-path",
        }.get(info.kind, "amft_trl.tasks.general_points")
        lines.append(f"{info.name:20} {info.group:15} {source:40} {info.num_samples}")
    lines.append("groups: " + "; ".join(f"{g} = {','.join(m)}" for g, m in BENCHMARK_GROUPS.items()))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run `amft-eval`; returns the exit status."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    if args.list_benchmarks:
        print(_list_benchmarks())
        return 0
    from amft_trl.evaluation.model_evaluation import EvalConfig, evaluate_model
    from amft_trl.evaluation.tables import markdown_tables

    try:
        if not args.benchmarks:
            raise EvaluationInputError("--benchmarks is required (e.g. --benchmarks math,ood or a file).")
        if args.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise EvaluationInputError(
                f"--dtype must be auto, float32, bfloat16 or float16, got {args.dtype!r}."
            )
        label = args.model_name or (
            os.path.basename(os.path.normpath(args.model)) if args.model else "SmolLM2-135M-Instruct"
        )
        config = EvalConfig(
            num_samples=parse_num_samples(args.num_samples) if args.num_samples is not None else None,
            pass_k=_parse_ks(args.pass_k) if args.pass_k is not None else None,
            greedy=not args.no_greedy,
            temperature=args.temperature,
            top_p=args.top_p,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            backend=args.backend,
            prompt_template=args.prompt_template,
            system_prompt=args.system_prompt,
            chat_template_kwargs=_parse_json_object(args.chat_template_kwargs, "--chat-template-kwargs"),
            seed=args.seed,
            max_problems=args.max_problems,
            output_dir=args.output_dir or os.path.join("eval_results", label),
            resume=not args.no_resume,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            dtype=args.dtype,
            model_label=args.model_name,
            reward=args.reward,
            question_column=args.question_column,
            answer_column=args.answer_column,
            gp_num_eval=args.gp_num_eval,
            gp_num_cards=args.gp_num_cards,
            gp_target=args.gp_target,
            gp_seed=args.gp_seed,
            vllm_kwargs=_parse_json_object(args.vllm_kwargs, "--vllm-kwargs"),
            visual_tasks=dict(
                gp_revision_turns=args.gp_revision_turns,
                gp_resolution=args.gp_resolution,
                virl_path=args.virl_path,
                virl_ood_path=args.virl_ood_path,
                virl_num_train=args.virl_num_train,
                virl_num_validation=args.virl_num_validation,
                virl_num_eval=args.virl_num_eval,
                virl_seed=args.virl_seed,
                virl_verify_iter=args.virl_verify_iter,
                max_turns=args.max_turns,
            ),
        )
        results = evaluate_model(args.model, args.benchmarks, tokenizer=args.tokenizer, config=config)
    except EvaluationInputError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; run the same command again to resume.", file=sys.stderr)
        return 130
    print(markdown_tables(results))
    out = config.output_dir
    print(f"Wrote {os.path.join(out, 'results.json')} and {os.path.join(out, 'results.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
