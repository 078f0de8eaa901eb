"""AMFTTrainer trains on General Points with sequential revision through TRL's own multi-turn loop
(`environment_factory`), on the tiny offline text model."""

from __future__ import annotations

import pytest
from conftest import make_config

pytest.importorskip("PIL")


def tool_tokenizer():
    """The toy tokenizer with a chat template that renders tool calls and that TRL knows how to parse."""
    from trl.chat_template_utils import qwen2_5_chat_template

    from amft_trl.toy import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.chat_template = qwen2_5_chat_template
    return tokenizer


def test_amft_trains_with_the_revision_environment_in_the_loop(tmp_path, monkeypatch):
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    from amft_trl import AMFTTrainer
    from amft_trl.tasks.general_points_visual import (
        GeneralPointsRevisionEnv,
        build_general_points_visual_datasets,
        general_points_revision_env_factory,
    )
    from amft_trl.toy import build_model

    data = build_general_points_visual_datasets(4, 2, 1, visual=False, revision=True, num_cards=3, target=10)
    tokenizer = tool_tokenizer()
    model = build_model(tokenizer)
    model.config.max_position_embeddings = 4096  # RoPE: prompts with the tool schema are long
    made: list[GeneralPointsRevisionEnv] = []
    resets: list[tuple[str, ...]] = []
    base = general_points_revision_env_factory(verify_iter=2)

    class Recording(GeneralPointsRevisionEnv):
        def reset(self, cards=(), **kwargs):
            resets.append(tuple(sorted(cards)))
            return super().reset(cards, **kwargs)

    def factory():
        made.append(Recording(base().verify_iter))
        return made[-1]

    args = make_config(
        tmp_path, max_steps=1, max_completion_length=8, max_tool_calling_iterations=2, max_sft_length=2048
    )
    trainer = AMFTTrainer(
        model=model,
        reward_funcs=[],
        environment_factory=factory,
        args=args,
        processing_class=tokenizer,
        train_dataset=data.rl,
        sft_dataset=data.sft,
        val_dataset=data.validation,
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 1 and "amft/meta_gradient" in logs[0]  # the meta step ran
    reward_keys = [k for k in logs[0] if k.startswith("rewards/Recording")]
    assert reward_keys, sorted(logs[0])
    # Every rollout was reset with its row's hand, and scored by the environment (a random model never submits,
    # so each episode scores as an answer without a formula).
    episodes = [env for env in made if env.cards]
    assert episodes and all(len(env.cards) == 3 for env in episodes)
    assert all(env.get_reward() == -3.0 for env in episodes)
    # The meta step's validation rollouts (GRPOTrainer's `_generate_and_score_completions` on validation prompts)
    # run the same loop: the environments were reset with validation hands too.
    validation_hands = {tuple(sorted(h)) for h in data.validation["cards"]}
    train_hands = {tuple(sorted(h)) for h in data.rl["cards"]}
    assert validation_hands & set(resets) and train_hands & set(resets), (
        resets,
        validation_hands,
        train_hands,
    )
    changed = [n for n, p in trainer.model.named_parameters() if not p.detach().equal(before[n])]
    assert changed


def scripted_generate(tokenizer, correct_at: int | None):
    """A stand-in for `model.generate` that answers like a model using the tool: a wrong `submit_answer` call
    each turn, a correct one at turn `correct_at` (1-based; None: never), and a plain final message once the
    verifier said "Correct solution."."""
    import json
    import re

    import torch

    from amft_trl.tasks.general_points_visual import _answer

    def generate(input_ids, attention_mask=None, **kwargs):
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            text = tokenizer.decode(ids[mask.bool()])
            cards = json.loads(re.search(r"You are given these \d+ cards: (\[[^\]]*\])", text).group(1))
            turn = text.count("<tool_response>") + 1
            if "Correct solution." in text:
                reply = "Solved.<|im_end|>"
            else:
                answer = _answer(cards, "id", 10)
                if turn != correct_at:
                    answer["formula"] = "+".join(str(n) for n in answer["number"]) + "+99"
                call = json.dumps({"name": "submit_answer", "arguments": answer})
                reply = f"<tool_call>\n{call}\n</tool_call><|im_end|>"
            rows.append(tokenizer(reply, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
        width = max(map(len, rows))
        completion = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, completion.to(input_ids.device)], dim=1)

    return generate


@pytest.mark.parametrize("correct_at,expected_scores", [(2, [-2.0, 5.0]), (None, [-2.0, -2.0, -2.0])])
def test_trls_loop_stops_at_the_first_correct_answer_or_the_turn_limit(
    tmp_path, monkeypatch, correct_at, expected_scores
):
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    from amft_trl import AMFTTrainer
    from amft_trl.tasks.general_points_visual import (
        GeneralPointsRevisionEnv,
        build_general_points_visual_datasets,
    )
    from amft_trl.toy import build_model

    data = build_general_points_visual_datasets(4, 2, 1, visual=False, revision=True, num_cards=3, target=10)
    tokenizer = tool_tokenizer()
    model = build_model(tokenizer)
    model.config.max_position_embeddings = 8192
    model.generate = scripted_generate(tokenizer, correct_at)
    episodes: list[list[float]] = []

    class Recording(GeneralPointsRevisionEnv):
        def get_reward(self):
            episodes.append(list(self.scores))
            return super().get_reward()

    # TRL's own limit is looser than the environment's: the environment ends the revision.
    args = make_config(
        tmp_path,
        max_steps=1,
        max_completion_length=2048,
        max_tool_calling_iterations=4,
        max_sft_length=2048,
        meta_update_steps=100,
    )
    trainer = AMFTTrainer(
        model=model,
        reward_funcs=[],
        environment_factory=lambda: Recording(verify_iter=3),
        args=args,
        processing_class=tokenizer,
        train_dataset=data.rl,
        sft_dataset=data.sft,
        val_dataset=data.validation,
    )
    trainer.train()
    (log,) = [h for h in trainer.state.log_history if "loss" in h]
    assert log["tools/call_frequency"] > 0
    assert episodes and all(scores == expected_scores for scores in episodes), episodes
    assert log["rewards/Recording/mean"] == expected_scores[-1]


def test_virl_episodes_run_in_trls_loop_one_action_per_turn(tmp_path, monkeypatch):
    """A scripted policy that always takes the ground-truth action reaches every destination through TRL's loop."""
    import json
    import re

    import torch
    from test_virl import write_fixture

    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    from amft_trl import AMFTTrainer
    from amft_trl.tasks.virl import VIRLNavigationEnv, build_rail, build_virl_datasets, load_virl_data
    from amft_trl.toy import build_model

    path = write_fixture(tmp_path / "virl", n_routes=4, vision=False)
    data = load_virl_data(path)
    rails = {i: build_rail(r, straight_line_length=0)[1] for i, r in enumerate(data.routes)}
    d = build_virl_datasets(path, 2, 1, 1, straight_line_length=0)
    tokenizer = tool_tokenizer()
    model = build_model(tokenizer)
    model.config.max_position_embeddings = 65536

    def generate(input_ids, attention_mask=None, **kwargs):
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            text = tokenizer.decode(ids[mask.bool()])
            rail = rails[int(re.search(r"Cafe (\d+)", text).group(1))]
            done = text.count("Correct action.")
            if done >= len(rail):
                reply = "Arrived.<|im_end|>"
            else:
                step = rail[done]
                args = {"action": step.action, "current_observation": step.observation}
                reply = (
                    "<tool_call>\n"
                    + json.dumps({"name": "take_action", "arguments": args})
                    + "\n</tool_call>"
                )
            rows.append(tokenizer(reply, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
        width = max(map(len, rows))
        completion = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, completion], dim=1)

    model.generate = generate
    episodes: list[VIRLNavigationEnv] = []

    class Recording(VIRLNavigationEnv):
        def get_reward(self):
            episodes.append(self)
            return super().get_reward()

    args = make_config(
        tmp_path,
        max_steps=1,
        max_completion_length=4096,
        max_tool_calling_iterations=16,
        max_sft_length=4096,
        meta_update_steps=100,
        per_device_train_batch_size=2,
        num_generations=2,
    )
    trainer = AMFTTrainer(
        model=model,
        reward_funcs=[],
        environment_factory=lambda: Recording(data, straight_line_length=0),
        args=args,
        processing_class=tokenizer,
        train_dataset=d.rl,
        sft_dataset=d.sft,
        val_dataset=d.validation,
    )
    trainer.train()
    assert episodes and all(env.success for env in episodes)
    assert all(sum(env.scores) == len(env.rail) for env in episodes)
