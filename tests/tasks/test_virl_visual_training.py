"""V-IRL's vision-language variant through TRL's multi-turn loop on the tiny tool-calling VLM: the tool replies carry
the new street view as an image, and each turn's generation and the loss's forward see every image so far. Its
demonstrations (street views inside the completion's tool replies) are refused by name: TRL 1.16's VLM collator
processes a completion as text, without images."""

from __future__ import annotations

import pytest
from conftest import make_config

pytest.importorskip("PIL")


def test_virl_street_views_in_tool_replies_train_on_the_tiny_vlm(tmp_path, monkeypatch):
    import json
    import re

    import torch
    from _virl_fixture import write_fixture

    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    from amft_trl import AMFTTrainer
    from amft_trl.tasks.virl import VIRLNavigationEnv, build_rail, build_virl_datasets, load_virl_data
    from amft_trl.toy import build_tool_vlm_processor, build_vlm

    path = write_fixture(tmp_path / "virl", n_routes=4, vision=True)
    data = load_virl_data(path, vision=True)
    rails = {i: build_rail(r, straight_line_length=0)[1] for i, r in enumerate(data.routes)}
    d = build_virl_datasets(path, 2, 1, 1, vision=True, resolution=32, straight_line_length=0)
    processor = build_tool_vlm_processor()
    tokenizer = processor.tokenizer
    model = build_vlm(processor)
    model.config.text_config.max_position_embeddings = 65536
    images_per_turn: list[int] = []

    def generate(input_ids, attention_mask=None, pixel_values=None, **kwargs):
        texts = [tokenizer.decode(ids[mask.bool()]) for ids, mask in zip(input_ids, attention_mask)]
        # every image of every row (the prompt's view and each reply's) came with the rows
        assert pixel_values is not None
        assert pixel_values.size(0) == sum(t.count(processor.image_token) for t in texts) // 4
        rows = []
        for i, text in enumerate(texts):
            rail = rails[int(re.search(r"Cafe (\d+)", text).group(1))]
            done = text.count("Correct action.")
            images_per_turn.append(text.count(processor.image_token) // 4)
            if done >= len(rail):
                reply = "Arrived."
            else:
                step = rail[done]
                action = step.action
                if i % 2 == 1 and "<tool_response>" not in text:  # each group's second rollout errs once
                    action = "forward()" if action == "stop()" else "stop()"
                args = {"action": action, "current_observation": step.observation}
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
    images_in_forward: list[int] = []  # images per row of each forward (the loss's and the log-probs')

    def count(module, args, kwargs):
        if kwargs.get("pixel_values") is not None:
            ids = kwargs["input_ids"]
            tokens = int((ids == processor.tokenizer.convert_tokens_to_ids(processor.image_token)).sum())
            assert kwargs["pixel_values"].size(0) * 4 == tokens  # every image token has its image
            images_in_forward.append(tokens // 4 // ids.size(0))

    model.register_forward_pre_hook(count, with_kwargs=True)
    episodes: list[VIRLNavigationEnv] = []

    class Recording(VIRLNavigationEnv):
        def get_reward(self):
            episodes.append(self)
            return super().get_reward()

    args = make_config(
        tmp_path,
        max_steps=2,
        max_completion_length=4096,
        max_tool_calling_iterations=16,
        max_sft_length=8192,
        per_device_train_batch_size=2,
        num_generations=2,
        meta_val_batch_size=1,
        target_entropy_num_samples=2,
        mu_init=0.0,
        mu_min=0.0,
        mu_max=0.0,
    )
    trainer = AMFTTrainer(
        model=model,
        reward_funcs=[],
        environment_factory=lambda: Recording(data, resolution=32, straight_line_length=0),
        args=args,
        processing_class=processor,
        train_dataset=d.rl,
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "vision_tower" in n}
    trainer.train()
    assert episodes and all(env.success for env in episodes)
    # every route reached, half the rollouts after one wrong action (-1, then the right one): rewards differ
    assert {sum(env.scores) - len(env.rail) for env in episodes} == {0.0, -1.0}
    assert max(images_per_turn) >= 3  # the prompt's view and at least two replies' views
    assert max(images_in_forward) >= 3  # the loss's forward saw the replies' views too
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters() if n in before)
    with pytest.raises(ValueError, match=r"`sft_dataset` row 0: its completion holds 3 image part\(s\)"):
        AMFTTrainer(
            model=model,
            reward_funcs=[],
            environment_factory=lambda: Recording(data, resolution=32, straight_line_length=0),
            args=args,
            processing_class=processor,
            train_dataset=d.rl,
            sft_dataset=d.sft,
        )
