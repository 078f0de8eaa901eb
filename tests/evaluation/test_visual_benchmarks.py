"""`amft-eval`'s multi-turn and image benchmarks (General Points with sequential revision, GP-VL card images,
V-IRL routes): the episodes run the training environments, and success is scored as the environment decides.

Scripted backends stand in for the model where the test is about scoring (they answer through the real chat
template and TRL's tool-call parser); the tiny offline VLM runs the image path for real.
"""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("PIL")

from amft_trl.evaluation import EvaluationInputError, SamplingSettings, evaluate_model  # noqa: E402
from amft_trl.evaluation.cli import main as eval_main  # noqa: E402
from amft_trl.tasks.general_points import hand_values  # noqa: E402
from amft_trl.tasks.general_points_visual import _answer  # noqa: E402

FAST = dict(num_samples=0, max_new_tokens=8, progress=False)


def tool_tokenizer():
    from trl.chat_template_utils import qwen2_5_chat_template

    from amft_trl.toy import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.chat_template = qwen2_5_chat_template
    return tokenizer


def tool_call(name: str, arguments: dict) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


class ScriptedBackend:
    """Answers each prompt with `policy(text)`; records the prompts and images it was given."""

    name = "scripted"

    def __init__(self, tokenizer, policy):
        self.tokenizer, self.policy, self.calls = tokenizer, policy, []

    def problems_per_call(self, n):
        return 4

    def generate(self, prompt_ids, n, settings: SamplingSettings, seed):
        texts = [self.tokenizer.decode(ids) for ids in prompt_ids]
        self.calls += [(t, []) for t in texts]
        return [[self.policy(t, []) for _ in range(n)] for t in texts]

    def generate_multimodal(self, texts, images, n, settings, seed):
        self.calls += list(zip(texts, images))
        return [[self.policy(t, imgs) for _ in range(n)] for t, imgs in zip(texts, images)]


def gp_policy(correct_at_turn: int, face_card_rule: str = "id", target: int = 10, cards_of=None):
    """A wrong `submit_answer` (a number not on the cards) until turn `correct_at_turn`, then a correct one."""

    def policy(text, images):
        cards = (
            cards_of(images) if cards_of else json.loads(re.search(r"these \d+ cards: (\[[^\]]*\])", text)[1])
        )
        turn = text.count("<tool_response>") + 1
        try:
            answer = _answer(cards, face_card_rule, target)
        except ValueError:  # a hand that rule cannot solve: its sum
            values = hand_values(cards, face_card_rule)
            answer = {"cards": cards, "number": values, "formula": "+".join(map(str, values))}
        if turn < correct_at_turn:
            answer["formula"] = "+".join(str(n) for n in answer["number"]) + "+99"
        return tool_call("submit_answer", answer)

    return policy


GP = dict(gp_num_eval=3, gp_num_cards=3, gp_target=10)


@pytest.mark.parametrize("turns, expected", [(5, 1.0), (2, 1.0), (1, 0.0)])
def test_revision_succeeds_only_when_the_turn_limit_lets_the_revision_through(turns, expected):
    tokenizer = tool_tokenizer()
    backend = ScriptedBackend(tokenizer, gp_policy(correct_at_turn=2))
    results = evaluate_model(
        "unused", "gp_l_id", tokenizer=tokenizer, backend=backend, visual_tasks={"gp_revision_turns": turns},
        **GP, **FAST,
    )  # fmt: skip
    metrics = results["gp_l_id"]
    assert metrics["greedy"] == metrics["accuracy"] == expected
    # The environment's reward: +5 for the correct second answer; -2 (a number not on the cards) when cut at one.
    assert metrics["mean_reward"] == (5.0 if expected else -2.0)
    assert metrics["mean_turns"] == min(turns, 2)
    transcript = json.loads(results.benchmarks["gp_l_id"].problems[0]["greedy"]["text"])
    assert transcript[0]["tool_calls"][0]["function"]["name"] == "submit_answer"
    assert transcript[1]["role"] == "tool" and "failed" in transcript[1]["content"]


def test_ood_rule_is_scored_with_its_own_face_card_values():
    tokenizer = tool_tokenizer()
    ood = ScriptedBackend(tokenizer, gp_policy(1, "ood"))
    id_rule = ScriptedBackend(tokenizer, gp_policy(1, "id"))
    kw = dict(tokenizer=tokenizer, visual_tasks={"gp_revision_turns": 1}, **GP, **FAST)
    assert evaluate_model("unused", "gp_l_ood_rule", backend=ood, **kw)["gp_l_ood_rule"]["greedy"] == 1.0
    # OOD-rule hands hold a face card: J/Q/K = 10 gives numbers that are not on the cards.
    assert evaluate_model("unused", "gp_l_ood_rule", backend=id_rule, **kw)["gp_l_ood_rule"]["greedy"] == 0.0


def vlm_tool_processor():
    """The tiny LLaVA processor with a chat template TRL parses tool calls for (the scripted backend reads the text)."""
    from trl.chat_template_utils import qwen3_vl_chat_template

    from amft_trl.toy import build_vlm_processor

    processor = build_vlm_processor()
    processor.chat_template = processor.tokenizer.chat_template = qwen3_vl_chat_template
    return processor


def test_visual_revision_sends_the_card_image_and_reads_the_answer():
    from amft_trl.tasks.general_points_visual import build_general_points_visual_datasets

    data = build_general_points_visual_datasets(0, 0, 3, num_cards=3, target=10, resolution=96, revision=True)
    hands = {
        split: {row["images"][0].tobytes(): row["cards"] for row in getattr(data, f"eval_{split}")}
        for split in ("id", "ood_visual")
    }
    processor = vlm_tool_processor()
    for split in ("id", "ood_visual"):
        backend = ScriptedBackend(
            processor.tokenizer, gp_policy(2, cards_of=lambda images, s=split: hands[s][images[0].tobytes()])
        )
        name = f"gp_vl_{split}"
        results = evaluate_model(
            "unused",
            name,
            tokenizer=processor,
            backend=backend,
            visual_tasks={"gp_resolution": 96},
            **GP,
            **FAST,
        )
        assert results[name]["greedy"] == 1.0
        # Every turn sees the hand's image (and nothing else); the prompt does not write the cards out.
        assert len(backend.calls) == 6 and all(len(images) == 1 for _, images in backend.calls)
        assert all("observing these 3 cards in the image" in text for text, _ in backend.calls)


def test_ood_visual_hands_are_red_and_id_hands_black():
    from amft_trl.evaluation import load_benchmarks
    from amft_trl.evaluation.multiturn import VisualTaskOptions

    options = VisualTaskOptions(gp_num_eval=4, gp_num_cards=3, gp_target=10, gp_resolution=96)
    loaded = {b.name: b for b in load_benchmarks("gp_vl", visual_tasks=options)}
    suits = {name: {s for p in b.problems for s in p.reward_kwargs["suits"]} for name, b in loaded.items()}
    assert suits["gp_vl_id"] <= {"S", "C"} and suits["gp_vl_ood_visual"] <= {"H", "D"}
    hands = {
        name: {tuple(sorted(p.reward_kwargs["cards"])) for p in b.problems} for name, b in loaded.items()
    }
    assert (
        not hands["gp_vl_id"] & hands["gp_vl_ood_visual"] and not hands["gp_vl_id"] & hands["gp_vl_ood_rule"]
    )


def test_single_answer_mode_on_the_tiny_vlm_end_to_end(tmp_path):
    """`--gp-revision-turns 0`: one JSON answer per hand, images through the processor into a real VLM."""
    import torch

    from amft_trl.toy import build_vlm, build_vlm_processor

    processor = build_vlm_processor()
    model = build_vlm(processor)
    model.config.text_config.max_position_embeddings = 2048
    seen = []
    generate = model.generate

    def recording_generate(**kwargs):
        seen.append(kwargs["pixel_values"].shape)
        return generate(**kwargs)

    model.generate = recording_generate
    results = evaluate_model(
        model, "gp_vl_id,gp_vl_ood_visual", tokenizer=processor, output_dir=str(tmp_path), num_samples=1,
        max_new_tokens=4, progress=False, visual_tasks={"gp_revision_turns": 0, "gp_resolution": 96},
        gp_num_eval=2, gp_num_cards=3, gp_target=10,
    )  # fmt: skip
    assert len(seen) == 4 and all(
        shape[0] == 2 and shape[1] == 3 for shape in seen
    )  # 2 hands, greedy + 1 sample
    for name in ("gp_vl_id", "gp_vl_ood_visual"):
        metrics = results[name]
        # A random model writes no card reading: every answer fails the verifier.
        assert metrics["greedy"] == metrics["avg@1"] == 0.0 and metrics["num_problems"] == 2
    assert "success rate" in (tmp_path / "results.md").read_text()
    assert torch.is_tensor(model.lm_head.weight)


def test_revision_needs_a_tool_call_parser():
    from amft_trl.toy import build_vlm_processor

    with pytest.raises(
        EvaluationInputError, match="gp_vl_id: the model's chat template has no tool-call parser"
    ):
        evaluate_model(
            "unused", "gp_vl_id", tokenizer=build_vlm_processor(), backend=ScriptedBackend(None, None),
            visual_tasks={"gp_resolution": 96}, **GP, **FAST,
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------- V-IRL


def virl_policy(path, *, correct: bool, absolute: bool = True):
    """Takes each rail position's ground-truth action (or a wrong one), reading the route from the prompt."""
    from amft_trl.tasks.virl import build_rail, load_virl_data

    data = load_virl_data(path)
    rails = {i: build_rail(r, absolute_action=absolute)[1] for i, r in enumerate(data.routes)}

    def policy(text, images):
        rail = rails[int(re.search(r"Cafe (\d+)", text)[1])]
        step = rail[text.count("Correct action.")]
        action = step.action if correct else "turn_direction(west)"
        return tool_call("take_action", {"action": action, "current_observation": step.observation})

    return policy


@pytest.fixture(scope="module")
def virl_dirs(tmp_path_factory):
    from _virl_fixture import write_fixture

    root = tmp_path_factory.mktemp("virl-eval")
    return write_fixture(root / "nyc", n_routes=4), write_fixture(root / "other", n_routes=2)


@pytest.mark.parametrize("name, absolute", [("virl_l_id", True), ("virl_l_ood_rule", False)])
def test_virl_ground_truth_actions_succeed_and_wrong_ones_fail(virl_dirs, name, absolute):
    path, _ = virl_dirs
    tokenizer = tool_tokenizer()
    options = {"virl_path": path, "virl_num_train": 2, "virl_num_validation": 1}
    outcomes = {}
    for correct in (True, False):
        backend = ScriptedBackend(tokenizer, virl_policy(path, correct=correct, absolute=absolute))
        results = evaluate_model(
            "unused", name, tokenizer=tokenizer, backend=backend, visual_tasks=options, **FAST
        )
        outcomes[correct] = results[name]
    assert outcomes[True]["greedy"] == 1.0 and outcomes[False]["greedy"] == 0.0
    assert outcomes[True]["num_problems"] == 1  # the routes left after 2 train + 1 validation
    # Ground truth: +1 per rail position (start, 2 forward points per leg, 3 intersections). Wrong: two -1 at the
    # first position (verify_iter 2), then the episode is over.
    assert outcomes[True]["mean_reward"] == outcomes[True]["mean_turns"] == 1 + 3 * 3
    assert outcomes[False]["mean_reward"] == -2.0 and outcomes[False]["mean_turns"] == 2


def test_virl_evaluation_routes_are_the_training_splits_held_out_routes(virl_dirs):
    from amft_trl.evaluation import load_benchmarks
    from amft_trl.evaluation.multiturn import VisualTaskOptions
    from amft_trl.tasks.virl import build_virl_datasets

    path, other = virl_dirs
    data = build_virl_datasets(path, 2, 1, 1)
    options = VisualTaskOptions(virl_path=path, virl_ood_path=other, virl_num_train=2, virl_num_validation=1)
    loaded = {b.name: b for b in load_benchmarks("virl_vl", visual_tasks=options)}
    assert [p.reward_kwargs["route_index"] for p in loaded["virl_vl_id"].problems] == data.eval_id[
        "route_index"
    ]
    assert [p.reward_kwargs["absolute_action"] for p in loaded["virl_vl_ood_rule"].problems] == [False]
    assert len(loaded["virl_vl_ood_visual"].problems) == 2  # the other city's routes
    assert all(len(p.images) == 1 for b in loaded.values() for p in b.problems)  # the first street views


def test_virl_vision_episode_sends_each_new_street_view(virl_dirs):
    path, _ = virl_dirs
    processor = vlm_tool_processor()
    backend = ScriptedBackend(processor.tokenizer, virl_policy(path, correct=True))
    results = evaluate_model(
        "unused", "virl_vl_id", tokenizer=processor, backend=backend, **FAST,
        visual_tasks={"virl_path": path, "virl_num_train": 3, "virl_resolution": 16},
    )  # fmt: skip
    assert results["virl_vl_id"]["greedy"] == 1.0
    # Turn k sees the first view and the k - 1 views the environment sent back.
    assert [len(images) for _, images in backend.calls] == list(range(1, 11))


@pytest.mark.parametrize(
    "argv, expected",
    [
        (
            ["--benchmarks", "virl_l_id"],
            "virl_l_id: needs a local V-IRL data folder (the hub is not read): pass --virl-path",
        ),
        (["--benchmarks", "virl_vl_ood_visual"], "pass --virl-ood-path PATH or virl_vl_ood_visual=PATH"),
        (
            ["--benchmarks", "virl_l_id", "--virl-path", "/nonexistent/virl"],
            "/nonexistent/virl is not a folder",
        ),
        (["--benchmarks", "virl_l_id=/nonexistent/virl"], "/nonexistent/virl is not a folder"),
        (["--benchmarks", "gp_vl", "--gp-revision-turns", "-1"], "gp_revision_turns must be >= 0, got -1"),
    ],
)
def test_bad_input_is_one_line_before_any_model_loads(argv, expected, capsys, tmp_path):
    assert eval_main([*argv, "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err


def test_incomplete_virl_folder_names_the_missing_file(tmp_path, capsys):
    from _virl_fixture import write_fixture

    path = write_fixture(tmp_path / "text-only", vision=False)
    assert eval_main(["--benchmarks", "virl_vl_id", "--virl-path", path, "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "gps_pano_mapping.pkl" in err, err


def test_revision_episodes_on_a_real_tiny_model_through_transformers_generate(tmp_path):
    """The text path end to end: the chat template with the tool schema, batched `generate`, TRL's parser on
    whatever a random model writes (no tool call: the episode ends after one answer and fails), saved and resumed."""
    from amft_trl.toy import build_model

    tokenizer = tool_tokenizer()
    model = build_model(tokenizer)
    model.config.max_position_embeddings = 4096
    kw = dict(
        tokenizer=tokenizer, output_dir=str(tmp_path), num_samples=2, max_new_tokens=6, progress=False, **GP
    )
    results = evaluate_model(model, "gp_l_id", **kw)
    metrics = results["gp_l_id"]
    assert metrics["num_problems"] == 3 and metrics["greedy"] == metrics["avg@2"] == 0.0
    assert metrics["mean_turns"] == 1.0 and metrics["mean_reward"] == -3.0  # never submitted: -3
    assert results.backend == "transformers"
    again = evaluate_model(model, "gp_l_id", **kw)  # resumed from the saved episodes, nothing generated
    assert again.backend.startswith("none") and again["gp_l_id"] == metrics


def test_cli_evaluates_a_saved_vlm_checkpoint(tmp_path, capsys):
    """`amft-eval --model DIR --benchmarks gp_vl`: the processor and the image-text model are loaded from the folder."""
    from amft_trl.toy import build_vlm, build_vlm_processor

    processor = build_vlm_processor()
    model = build_vlm(processor)
    model.config.text_config.max_position_embeddings = 2048
    model.save_pretrained(tmp_path / "vlm")
    processor.save_pretrained(tmp_path / "vlm")
    argv = ["--model", str(tmp_path / "vlm"), "--benchmarks", "gp_vl", "--gp-revision-turns", "0"]
    argv += ["--gp-resolution", "96", "--gp-num-eval", "2", "--gp-num-cards", "3", "--gp-target", "10"]
    argv += [
        "--num-samples",
        "0",
        "--max-new-tokens",
        "4",
        "--output-dir",
        str(tmp_path / "eval"),
        "--no-progress",
    ]
    assert eval_main(argv) == 0
    assert "General Points-VL (card images), success rate (%)" in capsys.readouterr().out
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["backend"] == "transformers" and len(results["benchmarks"]) == 3
