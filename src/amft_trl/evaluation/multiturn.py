"""Multi-turn and image benchmarks: General Points with sequential revision (GP-L, GP-VL) and V-IRL navigation.

The tasks of the AMFT paper's appendix C (from "SFT Memorizes, RL Generalizes", arXiv 2501.17161), scored by
success rate:

- `gp_vl_id`, `gp_vl_ood_rule`, `gp_vl_ood_visual`: General Points with the hand as a card image
  (`amft_trl.tasks.general_points_visual`), J/Q/K = 10 / J/Q/K = 11/12/13 / suits of unseen colours;
- `gp_l_id`, `gp_l_ood_rule`: the same with the hand written out (the language variant, the reference verifier);
- `virl_vl_id`, `virl_vl_ood_rule`, `virl_vl_ood_visual` and `virl_l_*`: V-IRL routes from a local data folder
  (`amft_trl.tasks.virl`), absolute actions / relative actions / another city's routes, with street views or text.

An episode runs the environment the training uses (`GeneralPointsRevisionEnv`, `VIRLNavigationEnv`): `reset` gets
the problem's dataset row and may append to the prompt, the environment's public methods are the tools the chat
template shows, each tool call in the model's answer (parsed with TRL's `parse_response`) is executed and its reply
(text, or text and an image) appended as a `tool` message, and the model answers again. The episode ends when the
model answers without a tool call, when the environment says it is over (solved, or out of attempts), or after
`max_turns` answers. Success is the environment's own verdict (`solved` / `success`); the episode's reward
(`get_reward`, the training reward) is recorded too.

TRL runs this loop inside `GRPOTrainer` (`_tool_call_loop`), which cannot be called without a trainer; this module
runs the same steps over the evaluation's generation backend. Differences from the training loop: each turn's prompt
is the whole conversation rendered again by the chat template (TRL appends the new tokens to the previous ones; the
two agree unless a template rewrites earlier assistant turns), the budget is `max_new_tokens` per answer (TRL's
`max_completion_length` bounds the whole episode), and the loop stops as soon as the environment is over (TRL lets
the model answer the last verdict, which changes no score).
"""

from __future__ import annotations

import copy
import inspect
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from amft_trl.evaluation.backends import SamplingSettings

__all__ = ["EpisodeTask", "VisualTaskOptions", "play"]


@dataclass(frozen=True)
class VisualTaskOptions:
    """How the General Points revision and V-IRL benchmarks are built.

    Attributes:
        gp_num_eval: hands per General Points split.
        gp_num_cards / gp_target / gp_seed: the deal (as `build_general_points_visual_datasets`).
        gp_resolution: the card image's size in pixels.
        gp_revision_turns: verified answers per episode (the reference's `verify_iter = 5`); 0: one plain JSON
            answer without tools, graded by the same verifier (for models trained without the revision loop).
        virl_path: the V-IRL data folder (`route_infos.json`, and for the vision variant `gps_pano_mapping.pkl`
            and `street_views/`).
        virl_ood_path: another city's folder (the visual OOD split).
        virl_num_train / virl_num_validation: the routes the training split off first (`build_virl_datasets`'
            counts): the evaluation routes are the next ones of the same seeded shuffle.
        virl_num_eval: evaluation routes (None: all the remaining ones; the OOD city: its first ones).
        virl_seed: the seed of the route shuffle.
        virl_verify_iter: wrong answers allowed at one position (the reference's V-IRL `verify_iter = 2`).
        virl_resolution: the size of each street view in pixels.
        virl_straight_line_length: `forward()` points between intersections (as in training).
        max_turns: the most answers per episode.
    """

    gp_num_eval: int = 100
    gp_num_cards: int = 4
    gp_target: int = 24
    gp_seed: int = 0
    gp_resolution: int = 512
    gp_revision_turns: int = 5
    virl_path: str | None = None
    virl_ood_path: str | None = None
    virl_num_train: int = 0
    virl_num_validation: int = 0
    virl_num_eval: int | None = None
    virl_seed: int = 0
    virl_verify_iter: int = 2
    virl_resolution: int = 256
    virl_straight_line_length: int = 2
    max_turns: int = 64

    def __post_init__(self) -> None:
        from amft_trl.evaluation.problems import EvaluationInputError

        minimum = {"gp_revision_turns": 0, "virl_verify_iter": 1, "max_turns": 1, "virl_num_train": 0}
        minimum.update(virl_num_validation=0, gp_resolution=32, virl_resolution=8)
        for name, low in minimum.items():
            if getattr(self, name) < low:
                raise EvaluationInputError(f"{name} must be >= {low}, got {getattr(self, name)}.")
        if self.virl_num_eval is not None and self.virl_num_eval < 1:
            raise EvaluationInputError(f"virl_num_eval must be >= 1, got {self.virl_num_eval}.")


@dataclass
class EpisodeTask:
    """How one benchmark's problems are played.

    Attributes:
        environment_factory: makes one environment per episode (what training passes as `environment_factory`).
        success: the environment's verdict at the end of an episode.
        finished: whether the environment is over (no further answer can change the outcome).
        max_turns: the most answers per episode.
    """

    environment_factory: Callable[[], Any]
    success: Callable[[Any], bool]
    finished: Callable[[Any], bool]
    max_turns: int

    def describe(self) -> str:
        return f"max_turns={self.max_turns}"


# --------------------------------------------------------------------------------------------- the loop


def environment_tools(environment: Any) -> list[Callable]:
    """The environment's tools, chosen as `GRPOTrainer` chooses them: its public methods but `reset` and
    `get_reward`."""
    return [
        getattr(environment, name)
        for name, _ in inspect.getmembers(type(environment), predicate=inspect.isfunction)
        if name not in ("reset", "get_reward") and not name.startswith("_")
    ]


def _tokenizer_of(processing_class: Any) -> Any:
    return getattr(processing_class, "tokenizer", processing_class)


def check_tool_parsing(processing_class: Any, what: str) -> None:
    """Make the tokenizer able to parse tool calls (TRL's `add_response_schema`), or raise naming the benchmark."""
    from trl.chat_template_utils import add_response_schema

    tokenizer = _tokenizer_of(processing_class)
    if getattr(tokenizer, "response_template", None) or getattr(tokenizer, "response_schema", None):
        return
    try:
        add_response_schema(processing_class)
    except Exception as exc:
        from amft_trl.evaluation.problems import EvaluationInputError

        raise EvaluationInputError(
            f"{what}: the model's chat template has no tool-call parser TRL knows ({exc}); the revision and "
            "navigation episodes need one (set tokenizer.response_schema, or use --gp-revision-turns 0 for "
            "General Points answered in one JSON message)."
        ) from None


@dataclass
class _Episode:
    problem: Any
    messages: list[dict[str, Any]]
    images: list[Any]
    environment: Any = None
    tools: list[Callable] | None = None
    transcript: list[dict[str, Any]] | None = None
    turns: int = 0
    done: bool = False


def _start(problem: Any, task: EpisodeTask | None) -> _Episode:
    messages = copy.deepcopy(problem.question) if not isinstance(problem.question, str) else None
    if messages is None:
        messages = [{"role": "user", "content": problem.question}]
    episode = _Episode(problem, messages, list(problem.images or []), transcript=[])
    if task is None:
        return episode
    episode.environment = task.environment_factory()
    episode.tools = environment_tools(episode.environment)
    observation = episode.environment.reset(**problem.reward_kwargs)
    if observation is not None:  # appended to the last message, as GRPOTrainer does
        content = messages[-1]["content"]
        if isinstance(observation, list) and isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if isinstance(observation, str) and isinstance(content, list):
            observation = [{"type": "text", "text": observation}]
        messages[-1] = {**messages[-1], "content": content + observation}
    return episode


def _render(processing_class: Any, episode: _Episode, template_kwargs: dict[str, Any]) -> str:
    kwargs: dict[str, Any] = {**template_kwargs, "tokenize": False, "add_generation_prompt": True}
    if episode.tools:
        kwargs["tools"] = episode.tools
    return processing_class.apply_chat_template(episode.messages, **kwargs)


def _generate(
    engine: Any,
    processing_class: Any,
    episodes: Sequence[_Episode],
    settings: SamplingSettings,
    seed: int,
    template_kwargs: dict[str, Any],
) -> tuple[list[str], list[str]]:
    """The rendered prompts (with the chat template's extra arguments `template_kwargs`) and one answer to each."""
    texts = [_render(processing_class, e, template_kwargs) for e in episodes]
    if any(e.images for e in episodes):
        if not hasattr(engine, "generate_multimodal"):
            from amft_trl.evaluation.problems import EvaluationInputError

            raise EvaluationInputError(
                f"the {getattr(engine, 'name', type(engine).__name__)} backend cannot take images; use "
                "--backend transformers for the image benchmarks."
            )
        outputs = engine.generate_multimodal(texts, [list(e.images) for e in episodes], 1, settings, seed)
    else:
        tokenizer = _tokenizer_of(processing_class)
        ids = [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        outputs = engine.generate(ids, 1, settings, seed)
    return texts, [out[0] for out in outputs]


def _call_tools(episode: _Episode, calls: list[dict[str, Any]]) -> None:
    """Execute the tool calls as `GRPOTrainer._tool_call_loop` does: a failing call answers `{"error": ...}`."""
    tools = {tool.__name__: tool for tool in episode.tools or []}
    for call in calls:
        function = call.get("function", {}) if isinstance(call, dict) else {}
        name = function.get("name", "unknown")
        try:
            if call.get("type") != "function":
                raise ValueError(f"Unsupported tool call type: {call.get('type')}")
            if name not in tools:
                raise ValueError(f"Tool {name} not found.")
            result = tools[name](**(function.get("arguments") or {}))
        except Exception as exc:
            result = {"error": str(exc)}
        content = result if isinstance(result, list) else str(result)
        if isinstance(content, list):
            episode.images += [
                p["image"] for p in content if isinstance(p, dict) and p.get("type") == "image"
            ]
            recorded = [p if p.get("type") != "image" else {"type": "image"} for p in content]
        else:
            recorded = content
        episode.messages.append({"role": "tool", "name": name, "content": content})
        episode.transcript.append({"role": "tool", "name": name, "content": recorded})


def _grade(benchmark: Any, problem: Any, text: str) -> float | None:
    try:
        value = benchmark.reward([text], **{k: [v] for k, v in problem.reward_kwargs.items()})[0]
    except Exception:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
    return float(value) if ok else None


def play(
    benchmark: Any,
    problems: Sequence[Any],
    n: int,
    engine: Any,
    processing_class: Any,
    settings: SamplingSettings,
    seed: int,
) -> list[list[dict[str, Any]]]:
    """Play `n` episodes per problem; per problem, one record per episode: `text` (the transcript, as JSON),
    `score` (1.0 for success, else 0.0), `reward` (the environment's `get_reward`), `turns`.

    A benchmark without an `episode` task (General Points answered in one message, with its image) is one answer
    per episode, scored by the benchmark's reward.
    """
    task: EpisodeTask | None = benchmark.episode
    episodes = [_start(p, task) for p in problems for _ in range(n)]
    max_turns = task.max_turns if task is not None else 1
    template_kwargs = getattr(benchmark.template, "chat_template_kwargs", None) or {}
    for turn in range(max_turns):
        active = [e for e in episodes if not e.done]
        if not active:
            break
        prompts, outputs = _generate(
            engine, processing_class, active, settings, seed + 1009 * turn, template_kwargs
        )
        tokenizer = _tokenizer_of(processing_class)
        for episode, prompt, text in zip(active, prompts, outputs):
            episode.turns += 1
            if task is None:
                episode.transcript.append({"role": "assistant", "content": text})
                episode.done = True
                continue
            from trl.chat_template_utils import parse_response

            # Parsed as TRL parses a rollout's answer: its tokens, after the prompt's, with the episode's tools.
            ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
            prefix = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
            message = (
                parse_response(tokenizer, ids, prefix=prefix, tools=episode.tools)
                if ids
                else {"role": "assistant", "content": ""}
            )
            episode.messages.append(message)
            episode.transcript.append(copy.deepcopy(message))
            calls = message.get("tool_calls")
            if not calls:
                episode.done = True
                continue
            _call_tools(episode, calls)
            episode.done = task.finished(episode.environment)
    records: list[list[dict[str, Any]]] = [[] for _ in problems]
    for i, episode in enumerate(episodes):
        owner = i // n
        if task is None:
            text = episode.transcript[0]["content"] if episode.transcript else ""
            score = _grade(benchmark, episode.problem, text)
            record = {"text": text, "score": 0.0 if score is None else score}
            if score is None:
                record["unscored"] = True
        else:
            env = episode.environment
            record = {
                "text": json.dumps(episode.transcript, ensure_ascii=False, default=str),
                "score": 1.0 if task.success(env) else 0.0,
                "reward": float(env.get_reward()),
                "turns": episode.turns,
            }
        records[owner].append(record)
    return records


def episode_metrics(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The mean environment reward and answers per episode, over greedy and sampled episodes alike."""
    graded = [
        s for r in records for s in [*r.get("samples", []), *([r["greedy"]] if r.get("greedy") else [])]
    ]
    graded = [s for s in graded if "reward" in s]
    if not graded:
        return {}
    return {
        "mean_reward": sum(s["reward"] for s in graded) / len(graded),
        "mean_turns": sum(s["turns"] for s in graded) / len(graded),
    }


# --------------------------------------------------------------------------------------------- benchmarks


def _success_reward(completions: Sequence[Any], **columns: Any) -> list[float]:
    """1.0 where `general_points_verifier_reward` scores a correct solution, else 0.0 (the success rate)."""
    from amft_trl.tasks.general_points_visual import REWARD_TABLE, general_points_verifier_reward

    return [
        float(s == REWARD_TABLE["CORRECT_SOLUTION"])
        for s in general_points_verifier_reward(completions, **columns)
    ]


def general_points_revision_benchmark(info: Any, options: VisualTaskOptions) -> Any:
    """A General Points benchmark of `build_general_points_visual_datasets`' evaluation split `info.split`."""
    from amft_trl.evaluation.problems import Benchmark, EvaluationInputError, Problem
    from amft_trl.evaluation.prompts import TEMPLATES
    from amft_trl.tasks import general_points_visual as gpv

    visual = info.visual
    turns = options.gp_revision_turns
    try:
        data = gpv.build_general_points_visual_datasets(
            0,
            0,
            options.gp_num_eval,
            seed=options.gp_seed,
            num_cards=options.gp_num_cards,
            target=options.gp_target,
            visual=visual,
            revision=turns > 0,
            resolution=options.gp_resolution,
            verify_iter=max(turns, 1),
        )
    except ValueError as exc:
        raise EvaluationInputError(f"{info.name}: {exc}") from None
    dataset = {"id": data.eval_id, "ood_rule": data.eval_ood_rule, "ood_visual": data.eval_ood_visual}[
        info.split
    ]
    problems = []
    for i, row in enumerate(dataset):
        columns = {k: row[k] for k in ("cards", "suits", "face_card_rule", "target", "visual")}
        gold = json.dumps(gpv._answer(row["cards"], row["face_card_rule"], row["target"]))
        problems.append(Problem(str(i), row["prompt"], gold, columns, images=row.get("images")))
    episode = None
    if turns > 0:
        episode = EpisodeTask(
            gpv.general_points_revision_env_factory(turns),
            success=lambda env: env.solved,
            finished=lambda env: env.done,
            max_turns=min(options.max_turns, turns + 1),
        )
    source = (
        f"amft_trl.tasks.general_points_visual {info.split} hands: {options.gp_num_cards} cards, target "
        f"{options.gp_target}, seed {options.gp_seed}, {'images ' + str(options.gp_resolution) + ' px' if visual else 'text'}, "
        + (f"sequential revision, {turns} verified answers" if turns else "one answer")
    )
    return Benchmark(
        name=info.name,
        problems=problems,
        reward=_success_reward,
        reward_name="general_points_revision_success" if turns else "general_points_verifier_success",
        group=info.group,
        label=info.label,
        template=TEMPLATES["plain"],
        source=source,
        num_samples=info.num_samples,
        episode=episode,
    )


def _never(
    completions: Sequence[Any], **columns: Any
) -> list[float]:  # episodes are scored by the environment
    raise NotImplementedError("V-IRL episodes are scored by their environment.")


def virl_benchmark(info: Any, options: VisualTaskOptions, source: str | None = None) -> Any:
    """A V-IRL benchmark: the held-out routes of `options.virl_path` (or `source`), or the OOD city's routes."""
    from amft_trl.evaluation.problems import Benchmark, EvaluationInputError, Problem
    from amft_trl.evaluation.prompts import TEMPLATES
    from amft_trl.tasks import virl

    ood_city = info.split == "ood_visual"
    path = source or (options.virl_ood_path if ood_city else options.virl_path)
    if path is None:
        flag = "--virl-ood-path" if ood_city else "--virl-path"
        raise EvaluationInputError(
            f"{info.name}: needs a local V-IRL data folder (the hub is not read): pass {flag} PATH or "
            f"{info.name}=PATH."
        )
    vision = info.visual
    try:
        data = virl.load_virl_data(os.path.expanduser(path), vision=vision)
        if ood_city:
            count = len(data.routes) if options.virl_num_eval is None else options.virl_num_eval
            if count > len(data.routes):
                raise virl.VIRLDataError(
                    f"V-IRL data: cannot build the visual OOD split: {path} has {len(data.routes)} routes, "
                    f"{count} asked."
                )
            indices = list(range(count))
        else:
            rest = len(data.routes) - options.virl_num_train - options.virl_num_validation
            count = rest if options.virl_num_eval is None else options.virl_num_eval
            _, _, indices = virl.split_route_indices(
                len(data.routes),
                options.virl_num_train,
                options.virl_num_validation,
                max(count, 0),
                seed=options.virl_seed,
                path=path,
            )
        if not indices:
            raise virl.VIRLDataError(f"V-IRL data: no evaluation routes left in {path}.")
        rows = virl.virl_prompt_dataset(
            data,
            indices,
            absolute_action=info.split != "ood_rule",
            vision=vision,
            seed=options.virl_seed,
            resolution=options.virl_resolution,
            straight_line_length=options.virl_straight_line_length,
        )
    except virl.VIRLDataError as exc:
        raise EvaluationInputError(f"{info.name}: {exc}") from None
    problems = []
    for i, row in zip(indices, rows):
        columns = {k: row[k] for k in ("route_index", "absolute_action", "vision", "seed")}
        problems.append(Problem(str(i), row["prompt"], None, columns, images=row.get("images")))
    verify_iter = options.virl_verify_iter
    episode = EpisodeTask(
        virl.virl_env_factory(
            path,
            vision=vision,
            verify_iter=verify_iter,
            straight_line_length=options.virl_straight_line_length,
            resolution=options.virl_resolution,
        ),
        success=lambda env: env.success,
        finished=lambda env: env.finished,
        max_turns=options.max_turns,
    )
    space = "relative" if info.split == "ood_rule" else "absolute"
    return Benchmark(
        name=info.name,
        problems=problems,
        reward=_never,
        reward_name="virl_success",
        group=info.group,
        label=info.label,
        template=TEMPLATES["plain"],
        source=(
            f"{os.path.abspath(path)}: {len(indices)} routes (after {options.virl_num_train} train + "
            f"{options.virl_num_validation} validation, seed {options.virl_seed})"
            if not ood_city
            else f"{os.path.abspath(path)}: its first {len(indices)} routes"
        )
        + f", {space} actions, {'street views' if vision else 'text observations'}, verify_iter {verify_iter}",
        num_samples=info.num_samples,
        episode=episode,
    )
