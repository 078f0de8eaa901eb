"""V-IRL's vision-language variant through TRL's multi-turn loop on the tiny tool-calling VLM: the tool replies carry
the new street view as an image, and each turn's generation and the loss's forward see every image so far. Its
demonstrations (street views inside the completion's tool replies) train the SFT term, processed as whole
conversations (TRL 1.16's VLM collator processes a completion as text, without images)."""

from __future__ import annotations

import math

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
    # The demonstrations (street views in the completion's tool replies) train the SFT term beside the RL term.
    sft_args = make_config(
        tmp_path / "amft",
        max_steps=1,  # one mixed step: RL rollouts and the SFT term (the SFT-only step is the next test's)
        max_completion_length=4096,
        max_tool_calling_iterations=16,
        max_sft_length=8192,
        per_device_train_batch_size=2,
        num_generations=2,
        meta_val_batch_size=1,
        target_entropy_num_samples=2,
        balancing="amft",
        mu_init=0.5,
        meta_learning_rate=0.0,  # Eq. 6's entropy term moves mu; the meta step (validation rollouts) is off
    )
    images_in_forward.clear()
    trainer = AMFTTrainer(
        model=model,
        reward_funcs=[],
        environment_factory=lambda: Recording(data, resolution=32, straight_line_length=0),
        args=sft_args,
        processing_class=processor,
        train_dataset=d.rl,
        sft_dataset=d.sft,
    )
    assert trainer.sft_term.whole_conversations and trainer.sft_term.num_dropped == 0
    trainer.train()
    logged = [h for h in trainer.state.log_history if "amft/sft_loss" in h]
    assert len(logged) == 1
    assert all(math.isfinite(h["amft/sft_loss"]) and h["amft/sft_loss"] > 0 for h in logged)
    assert all(h["amft/mu"] > 0 and h["amft/sft_tokens"] > 0 for h in logged)
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)
    assert max(images_in_forward) == len(d.sft[0]["images"])  # an SFT forward saw every view of its row


def test_virl_vl_demonstrations_train_the_vision_tower_through_the_sft_term(tmp_path, monkeypatch):
    """One SFT-only warm-up step (`sft_then_rl`, no rollouts, no RL term): the vision tower's parameters change, so
    the gradient reached it through the completion's images."""
    import torch
    from _virl_fixture import write_fixture

    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    from amft_trl import AMFTTrainer
    from amft_trl.tasks.virl import build_virl_datasets, virl_env_factory
    from amft_trl.toy import build_tool_vlm_processor, build_vlm

    path = write_fixture(tmp_path / "virl", n_routes=4, vision=True)
    d = build_virl_datasets(path, 2, 1, 1, vision=True, resolution=32, straight_line_length=0)
    processor = build_tool_vlm_processor()
    model = build_vlm(processor)
    model.config.text_config.max_position_embeddings = 65536

    def generate(*args, **kwargs):
        raise AssertionError("the warm-up step generates no rollouts")

    model.generate = generate
    with pytest.warns(UserWarning, match="every step is an SFT warm-up step"):
        args = make_config(
            tmp_path / "out",
            max_steps=1,
            max_completion_length=64,
            max_sft_length=8192,
            per_device_train_batch_size=2,
            num_generations=2,
            balancing="sft_then_rl",
            sft_warmup_steps=1,
        )
    trainer = AMFTTrainer(
        model=model,
        reward_funcs=[],
        environment_factory=virl_env_factory(path, vision=True, resolution=32, straight_line_length=0),
        args=args,
        processing_class=processor,
        train_dataset=d.rl,
        sft_dataset=d.sft,
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "vision_tower" in n}
    assert before
    trainer.train()
    changed = [
        n for n, p in trainer.model.named_parameters() if n in before and not torch.equal(before[n], p)
    ]
    assert changed


def test_a_virl_vl_demonstration_batch_is_the_whole_conversation_trained_on_the_assistants_tokens(tmp_path):
    """The batch of a V-IRL-VL demonstration: its ids are the processor's rendering of the whole conversation (with
    the tools the rollouts see), every image of the row has its pixels, and the loss covers exactly the assistant's
    tokens: its tool calls and closing message, not the tool replies, not an image token."""
    import json

    import torch
    from _virl_fixture import write_fixture

    from amft_trl.sft_data import DemonstrationTools, collate_vision_conversations, tool_schemas
    from amft_trl.tasks.virl import VIRLNavigationEnv, build_virl_datasets
    from amft_trl.toy import build_tool_vlm_processor

    path = write_fixture(tmp_path / "virl", n_routes=4, vision=True)
    sft = build_virl_datasets(path, 2, 1, 1, vision=True, resolution=32, straight_line_length=0).sft
    processor = build_tool_vlm_processor()
    tokenizer = processor.tokenizer
    image_token = tokenizer.convert_tokens_to_ids(processor.image_token)
    schemas = tool_schemas([VIRLNavigationEnv(None).take_action])
    rows = [sft[0], sft[1]]
    batch = collate_vision_conversations(rows, processor, None, "images", DemonstrationTools(default=schemas))
    assert batch.model_inputs["num_images"] == [len(r["images"]) for r in rows] and rows[0]["images"]
    assert batch.model_inputs["pixel_values"].size(0) == sum(len(r["images"]) for r in rows)
    for i, row in enumerate(rows):
        text = processor.apply_chat_template(row["prompt"] + row["completion"], tools=schemas, tokenize=False)
        whole = processor(text=[text], images=row["images"], return_tensors="pt", add_special_tokens=False)
        ids = torch.cat(
            [
                batch.prompt_ids[i][batch.prompt_mask[i].bool()],
                batch.completion_ids[i][batch.completion_mask[i].bool()],
            ]
        )
        assert ids.tolist() == whole["input_ids"][0].tolist()
        assert int((ids == image_token).sum()) == 4 * len(row["images"])  # 4 tokens per image in the tiny VLM
        prompt_text = processor.apply_chat_template(
            row["prompt"], tools=schemas, add_generation_prompt=True, tokenize=False
        )
        prompt = processor(
            text=[prompt_text], images=row["images"][:1], return_tensors="pt", add_special_tokens=False
        )
        assert batch.prompt_ids[i][batch.prompt_mask[i].bool()].tolist() == prompt["input_ids"][0].tolist()
        trained = batch.completion_ids[i][batch.loss_mask[i].bool()]
        assert image_token not in trained.tolist()
        expected = ""
        for message in row["completion"]:
            if message["role"] != "assistant":
                continue
            for call in message["tool_calls"] or []:
                function = call["function"]
                body = json.dumps({"name": function["name"], "arguments": function["arguments"]})
                expected += f"\n<tool_call>\n{body}\n</tool_call><|im_end|>\n"
            if not message["tool_calls"]:
                expected += message["content"][0]["text"] + "<|im_end|>\n"
        assert tokenizer.decode(trained) == expected
        untrained = tokenizer.decode(
            batch.completion_ids[i][(batch.completion_mask[i] - batch.loss_mask[i]).bool()]
        )
        assert untrained.count("<tool_response>") == sum(m["role"] == "tool" for m in row["completion"])


def test_virl_vl_demonstrations_are_cut_only_after_their_last_image(tmp_path):
    """`max_sft_length` cuts a conversation only after its last image token (pixels and placeholders go together):
    a row that would be cut through an image is dropped, and when that drops every row the error names the field."""
    from _virl_fixture import write_fixture

    from amft_trl.sft_data import collate_vision_conversations, prepare_vision_sft_dataset
    from amft_trl.tasks.virl import build_virl_datasets
    from amft_trl.toy import build_tool_vlm_processor

    path = write_fixture(tmp_path / "virl", n_routes=4, vision=True)
    sft = build_virl_datasets(path, 2, 1, 1, vision=True, resolution=32, straight_line_length=0).sft.select(
        [0]
    )
    processor = build_tool_vlm_processor()
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    whole = collate_vision_conversations([sft[0]], processor, None, "images")
    p = whole.prompt_ids.size(1)
    last_image = p + int((whole.completion_ids[0] == image_token).nonzero().max())
    assert last_image + 10 < p + whole.completion_ids.size(
        1
    )  # text (the last replies) follows the last image

    kept, dropped = prepare_vision_sft_dataset(sft, processor, last_image + 10)
    assert (len(kept), dropped) == (1, 0)
    cut = collate_vision_conversations([kept[0]], processor, last_image + 10, "images")
    assert cut.prompt_ids.size(1) + cut.completion_ids.size(1) == last_image + 10
    assert cut.completion_ids[0].tolist() == whole.completion_ids[0, : last_image + 10 - p].tolist()
    assert cut.tool_mask[0].tolist() == whole.tool_mask[0, : last_image + 10 - p].tolist()
    assert cut.model_inputs["pixel_values"].size(0) == len(sft[0]["images"])
    with pytest.raises(ValueError, match=r"none of the 1 image demonstrations fits max_sft_length="):
        prepare_vision_sft_dataset(sft, processor, last_image)


def test_a_template_whose_prompt_is_not_a_prefix_of_the_conversation_is_refused_by_row(tmp_path):
    """A chat template that renders the generation prompt as something the whole conversation does not start with
    (e.g. a thinking header the later turns drop): the completion cannot be split off, so the row is refused."""
    from _virl_fixture import write_fixture

    from amft_trl.sft_data import prepare_vision_sft_dataset
    from amft_trl.tasks.virl import build_virl_datasets
    from amft_trl.toy import build_tool_vlm_processor

    path = write_fixture(tmp_path / "virl", n_routes=4, vision=True)
    sft = build_virl_datasets(path, 2, 1, 1, vision=True, resolution=32, straight_line_length=0).sft
    processor = build_tool_vlm_processor()
    render = processor.apply_chat_template

    def thinking(messages, **kwargs):
        return render(messages, **kwargs) + ("<think>\n" if kwargs.get("add_generation_prompt") else "")

    processor.apply_chat_template = thinking
    with pytest.raises(
        ValueError, match=r"`sft_dataset` row 0: .*the prompt \(with the generation prompt\).* not a prefix"
    ):
        prepare_vision_sft_dataset(sft, processor, None)
