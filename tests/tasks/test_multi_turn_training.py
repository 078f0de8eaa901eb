"""AMFTTrainer trains with sequential revision (General Points) and one-action-per-turn episodes (V-IRL) through
TRL's own multi-turn loop (`environment_factory`), on the tiny offline text model with a scripted `generate`."""

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


def scripted_generate(tokenizer, correct_at):
    """A stand-in for `model.generate` that answers like a model using the tool: a wrong `submit_answer` call
    each turn, a correct one at turn `correct_at(cards)` (1-based; None: never), and a plain final message once the
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
                if turn != correct_at(cards):
                    answer["formula"] = "+".join(str(n) for n in answer["number"]) + "+99"
                call = json.dumps({"name": "submit_answer", "arguments": answer})
                reply = f"<tool_call>\n{call}\n</tool_call><|im_end|>"
            rows.append(tokenizer(reply, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
        width = max(map(len, rows))
        completion = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, completion.to(input_ids.device)], dim=1)

    return generate


def test_trls_loop_stops_at_the_first_correct_answer_or_the_turn_limit(tmp_path, monkeypatch):
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    from amft_trl import AMFTTrainer
    from amft_trl.tasks.general_points_visual import (
        GeneralPointsRevisionEnv,
        build_general_points_visual_datasets,
    )
    from amft_trl.toy import build_model

    data = build_general_points_visual_datasets(8, 2, 1, visual=False, revision=True, num_cards=3, target=10)
    # One hand the scripted model solves at its second try, one it never solves.
    sums = [sum(int(c) if c.isdigit() else 1 if c == "A" else 10 for c in h) % 2 for h in data.rl["cards"]]
    data.rl = data.rl.select([sums.index(0), sums.index(1)])

    def correct_at(cards):
        return 2 if sum(int(c) if c.isdigit() else 1 if c == "A" else 10 for c in cards) % 2 == 0 else None

    tokenizer = tool_tokenizer()
    model = build_model(tokenizer)
    model.config.max_position_embeddings = 8192
    model.generate = scripted_generate(tokenizer, correct_at)
    episodes: list[tuple[list[str], list[float]]] = []

    class Recording(GeneralPointsRevisionEnv):
        def get_reward(self):
            episodes.append((list(self.cards), list(self.scores)))
            return super().get_reward()

    # TRL's own limit is looser than the environment's: the environment ends the revision.
    args = make_config(
        tmp_path,
        max_steps=1,
        num_generations=2,
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
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    (log,) = [h for h in trainer.state.log_history if "loss" in h]
    assert log["tools/call_frequency"] > 0 and "amft/meta_gradient" in log
    assert any(not p.detach().equal(before[n]) for n, p in trainer.model.named_parameters())
    # The meta step's validation rollouts (GRPOTrainer's `_generate_and_score_completions` on validation prompts)
    # ran the same loop: environments were reset with validation hands and scored by the same script.
    validation = {tuple(h) for h in data.validation["cards"]}
    assert any(tuple(cards) in validation for cards, _ in episodes)
    train = {tuple(h) for h in data.rl["cards"]}
    rollouts = [scores for cards, scores in episodes if tuple(cards) in train]  # (the rest: the meta step's)
    # Solved at the second try: the loop stops there (+5). Never solved: three verified tries, the fourth call
    # (TRL allows four) is answered but not verified; the outcome is the last verified score.
    expected = {True: [-2.0, 5.0], False: [-2.0, -2.0, -2.0]}
    assert sorted(len(scores) for scores in rollouts) == [2, 2, 3, 3]
    assert all(scores == expected[correct_at(cards) == 2] for cards, scores in episodes), episodes
    assert log["rewards/Recording/mean"] == (5.0 - 2.0) / 2


def test_virl_episodes_run_in_trls_loop_one_action_per_turn(tmp_path, monkeypatch):
    """A scripted policy that always takes the ground-truth action reaches every destination through TRL's loop."""
    import json
    import re

    import torch
    from _virl_fixture import write_fixture

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
