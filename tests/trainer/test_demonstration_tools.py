"""Demonstrations are rendered with the tool list their rollouts are rendered with: the trainer's environment tools
by default (as GRPOTrainer renders rollout prompts), a row's `tools` column when it has one (as TRL's SFTTrainer reads
it), and exactly as before when there are no tools."""

from __future__ import annotations

import json

import pytest
from conftest import make_config

pytest.importorskip("PIL")

#: The tiny VLM's template with a tool list (the toy VLM template renders none).
TOOLS_PREAMBLE = "{% if tools %}<|system|>TOOLS {{ tools | tojson }}<|end|>{% endif %}"


def render(tokenizer, messages, **kwargs):
    return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"]


def qwen_tokenizer():
    from trl.chat_template_utils import qwen2_5_chat_template

    from amft_trl.toy import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.chat_template = qwen2_5_chat_template
    return tokenizer


def revision_trainer(tmp_path, tokenizer, sft, environment_factory):
    from amft_trl import AMFTTrainer
    from amft_trl.tasks.general_points_visual import build_general_points_visual_datasets
    from amft_trl.toy import build_model

    data = build_general_points_visual_datasets(4, 2, 1, visual=False, revision=True, num_cards=3, target=10)
    model = build_model(tokenizer)
    model.config.max_position_embeddings = 8192
    args = make_config(tmp_path, max_steps=1, num_generations=2, max_sft_length=4096, meta_update_steps=100)
    trainer = AMFTTrainer(
        model=model,
        reward_funcs=[],
        environment_factory=environment_factory,
        args=args,
        processing_class=tokenizer,
        train_dataset=data.rl,
        sft_dataset=sft if sft is not None else data.sft,
        val_dataset=data.validation,
    )
    return trainer, data


def test_revision_demonstrations_are_rendered_with_the_environments_tools(tmp_path, monkeypatch):
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    from amft_trl.tasks.general_points_visual import general_points_revision_env_factory

    tokenizer = qwen_tokenizer()
    trainer, data = revision_trainer(tmp_path, tokenizer, None, general_points_revision_env_factory(3))
    assert [t.__name__ for t in trainer.tools] == ["submit_answer"]
    for i in range(len(data.sft)):
        row = trainer.sft_term.dataset[i]
        prompt, completion = data.sft[i]["prompt"], data.sft[i]["completion"]
        # the rollout's prompt, as GRPOTrainer renders it (`tools=self.tools`, the generation prompt)
        rollout = render(tokenizer, prompt, tools=trainer.tools, add_generation_prompt=True)
        whole = render(tokenizer, prompt + completion, tools=trainer.tools)
        assert row["prompt_ids"] == rollout
        assert row["prompt_ids"] + row["completion_ids"] == whole
        text = tokenizer.decode(row["prompt_ids"])
        assert (
            "<tools>" in text and '"name": "submit_answer"' in text and "Submit an answer to the card" in text
        )
        without = render(tokenizer, prompt, add_generation_prompt=True)
        assert row["prompt_ids"] != without


def test_tool_replies_of_text_demonstrations_are_not_trained_on(tmp_path, monkeypatch):
    """A multi-turn demonstration (General Points' revision loop) trains the assistant's turns only: the tool call and
    the final answer with their end of turn, not the verifier's reply or the turn header after it, as GRPO masks tool
    replies out of its rollouts."""
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    from amft_trl.sft_data import trained_tokens
    from amft_trl.tasks.general_points_visual import general_points_revision_env_factory

    tokenizer = qwen_tokenizer()
    trainer, data = revision_trainer(tmp_path, tokenizer, None, general_points_revision_env_factory(3))
    batch = trainer.sft_term.collate(list(range(len(data.sft))))
    for i in range(len(data.sft)):
        call, reply, answer = data.sft[i]["completion"]
        row = trainer.sft_term.dataset[i]
        ids, mask = row["completion_ids"], row["assistant_mask"]
        trained = tokenizer.decode([t for t, m in zip(ids, mask) if m])
        untrained = tokenizer.decode([t for t, m in zip(ids, mask) if not m])
        assert reply["role"] == "tool" and reply["content"] in untrained and reply["content"] not in trained
        assert "<tool_response>" in untrained and "<tool_response>" not in trained
        assert "<tool_call>" in trained and '"submit_answer"' in trained and answer["content"] in trained
        assert trained.count("<|im_end|>") == 2  # each assistant turn's end of turn is learnt
        assert untrained.count("<|im_start|>assistant") == 1  # the header of the turn after the reply is not
        # the batch's loss mask is the row's: the SFT term's token count is the assistant tokens
        assert batch.loss_mask[i, : len(ids)].tolist() == mask and int(batch.loss_mask[i].sum()) == sum(mask)
        # the same demonstration attached to its RL prompt (HPT, ReLIFT): the same mask, and its trained tokens
        # (HPT's normaliser, the metered SFT tokens) are the assistant's only
        attached = trainer.sft_term.tokenize_demonstration(data.sft[i]["prompt"], data.sft[i]["completion"])
        assert attached["completion_ids"] == ids and attached["assistant_mask"] == mask
        assert trained_tokens(attached) == sum(mask) < len(ids)


def test_a_tools_column_overrides_the_trainers_tools_and_null_means_none(tmp_path, monkeypatch):
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset

    from amft_trl.tasks.general_points_visual import (
        build_general_points_visual_datasets,
        general_points_revision_env_factory,
    )

    sft = build_general_points_visual_datasets(
        4, 2, 1, visual=False, revision=True, num_cards=3, target=10
    ).sft
    schema = {"type": "function", "function": {"name": "lookup_rules", "description": "Read the rules."}}
    rows = [dict(r) for r in sft]
    rows[0]["tools"] = json.dumps([schema])  # TRL's SFTTrainer format: JSON text
    rows[1]["tools"] = None  # no tools for this row
    rows[2]["tools"] = "[]"
    rows[3]["tools"] = json.dumps([schema])
    tokenizer = qwen_tokenizer()
    trainer, _ = revision_trainer(
        tmp_path, tokenizer, Dataset.from_list(rows), general_points_revision_env_factory(3)
    )
    tokenized = trainer.sft_term.dataset
    assert tokenized[0]["prompt_ids"] == render(
        tokenizer, rows[0]["prompt"], tools=[schema], add_generation_prompt=True
    )
    assert "lookup_rules" in tokenizer.decode(tokenized[0]["prompt_ids"])
    assert '"submit_answer"' not in tokenizer.decode(tokenized[0]["prompt_ids"])
    for i in (1, 2):
        assert tokenized[i]["prompt_ids"] == render(tokenizer, rows[i]["prompt"], add_generation_prompt=True)


def test_without_tools_demonstrations_are_tokenised_as_before(tokenizer):
    """No trainer tools, no column: the same ids as the tokenisation without any tool argument (bit-identical)."""
    from amft_trl._private_api import tokenize
    from amft_trl.sft_data import DemonstrationTools, tokenize_sft_dataset
    from amft_trl.toy import addition_demos

    demos = addition_demos(6, seed=2, conversational=True)
    tokenized, dropped = tokenize_sft_dataset(demos, tokenizer, 64, tools=DemonstrationTools())
    assert dropped == 0
    for row, demo in zip(tokenized, demos):
        prompt = tokenize(tokenizer, demo["prompt"], add_generation_prompt=True)["input_ids"]
        whole = tokenize(tokenizer, demo["prompt"] + demo["completion"])["input_ids"]
        assert row["prompt_ids"] == prompt and row["prompt_ids"] + row["completion_ids"] == whole
    assert tokenize_sft_dataset(demos, tokenizer, 64)[0].to_dict() == tokenized.to_dict()


def test_bad_tools_columns_are_refused_by_row(tokenizer):
    from datasets import Dataset

    from amft_trl.sft_data import tokenize_sft_dataset
    from amft_trl.toy import addition_demos

    standard = addition_demos(2, seed=2).add_column("tools", ["[]", "[]"])
    with pytest.raises(ValueError, match="`tools` column, but its demonstrations are standard"):
        tokenize_sft_dataset(standard, tokenizer, 64)
    rows = [dict(r) for r in addition_demos(3, seed=2, conversational=True)]
    for r, tools in zip(rows, ["[]", "[{not json", "[]"]):
        r["tools"] = tools
    with pytest.raises(ValueError, match=r"row 1: .*`tools` is a string that is not JSON"):
        tokenize_sft_dataset(Dataset.from_list(rows), tokenizer, 64)
    rows[1]["tools"] = '{"name": "f"}'
    with pytest.raises(ValueError, match=r"row 1: .*expected a list of JSON-schema dicts"):
        tokenize_sft_dataset(Dataset.from_list(rows), tokenizer, 64)


def test_each_environments_tools_by_the_rows_environment_column(tmp_path, monkeypatch):
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    from amft_trl import AMFTTrainer
    from amft_trl.tasks.general_points_visual import (
        build_general_points_visual_datasets,
        general_points_revision_env_factory,
    )
    from amft_trl.toy import build_model

    class Hinting:
        def reset(self, **kwargs):
            return None

        def get_reward(self):
            return 0.0

        def hint(self, topic: str) -> str:
            """Give a hint.

            Args:
                topic: what the hint is about.
            """
            return "Use multiplication."

    factories = {"gp": general_points_revision_env_factory(3), "hints": Hinting}
    tokenizer = qwen_tokenizer()
    data = build_general_points_visual_datasets(4, 2, 1, visual=False, revision=True, num_cards=3, target=10)
    sft = data.sft.add_column("environment", ["gp", "hints", "gp", "hints"])
    rl = data.rl.add_column("environment", ["gp"] * len(data.rl))
    model = build_model(tokenizer)
    model.config.max_position_embeddings = 8192
    common = dict(
        model=model,
        reward_funcs=[],
        environment_factory=factories,
        args=make_config(
            tmp_path, max_steps=1, num_generations=2, max_sft_length=4096, meta_update_steps=100
        ),
        processing_class=tokenizer,
        train_dataset=rl,
        val_dataset=data.validation.add_column("environment", ["gp"] * len(data.validation)),
    )
    trainer = AMFTTrainer(sft_dataset=sft, **common)
    for i, name in enumerate(["gp", "hints", "gp", "hints"]):
        text = tokenizer.decode(trainer.sft_term.dataset[i]["prompt_ids"])
        assert ('"submit_answer"' in text) == (name == "gp") and ('"hint"' in text) == (name == "hints")
    with pytest.raises(ValueError, match="row 0: .*several environments .* `environment` column"):
        AMFTTrainer(sft_dataset=data.sft, **common)
    bad = data.sft.add_column("environment", ["gp", "nav", "gp", "gp"])
    with pytest.raises(ValueError, match="row 1: .*'nav', which is not one of the trainer's environments"):
        AMFTTrainer(sft_dataset=bad, **common)


def test_image_demonstrations_are_rendered_with_their_tools():
    """The VLM path (TRL's collator renders prompt-completion rows without tools) renders the row's tools itself: the
    ids are the processor's rendering of the conversation with them; without tools, the collator's own."""
    from trl.data_utils import prepare_multimodal_messages

    from amft_trl.sft_data import DemonstrationTools, collate_vision_sft, prepare_vision_sft_dataset
    from amft_trl.toy import VLM_CHAT_TEMPLATE, build_vlm_processor, image_addition_demos

    processor = build_vlm_processor()
    processor.chat_template = processor.tokenizer.chat_template = TOOLS_PREAMBLE + VLM_CHAT_TEMPLATE
    demos = image_addition_demos(2, seed=0)
    schema = {"type": "function", "function": {"name": "zoom", "description": "Zoom in."}}
    with_tools = demos.add_column("tools", [json.dumps([schema]), None])
    tools = DemonstrationTools()
    kept, dropped = prepare_vision_sft_dataset(with_tools, processor, 512, tools=tools)
    assert dropped == 0
    batch = collate_vision_sft([kept[0], kept[1]], processor, 512, "images", tools)
    plain = collate_vision_sft([demos[0], demos[1]], processor, 512, "images")
    for i, row_tools in enumerate([[schema], None]):
        demo = demos[i]
        ids = batch.prompt_ids[i][batch.prompt_mask[i].bool()].tolist()
        completion = batch.completion_ids[i][batch.completion_mask[i].bool()].tolist()
        expected = processor.apply_chat_template(
            prepare_multimodal_messages(demo["prompt"] + demo["completion"], images=demo["images"]),
            tools=row_tools,
            tokenize=True,
            return_dict=True,
        )["input_ids"][0]
        assert ids + completion == expected
        text = processor.tokenizer.decode(ids)
        assert ('"zoom"' in text) == (row_tools is not None)
        assert text.count("<image>") == 4  # the image's tokens, expanded by the processor
        if row_tools is None:  # no tools: exactly TRL's collator
            plain_ids = plain.prompt_ids[i][plain.prompt_mask[i].bool()].tolist()
            assert ids == plain_ids
    assert batch.model_inputs["pixel_values"].equal(plain.model_inputs["pixel_values"])
