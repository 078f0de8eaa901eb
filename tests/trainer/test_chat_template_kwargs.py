"""`GRPOConfig.chat_template_kwargs` (e.g. Qwen3's `enable_thinking=False`) reach the demonstrations: GRPOTrainer
renders the rollout prompts with them, so the SFT term, attached demonstrations (HPT, ReLIFT, LUFFY) and image
demonstrations are rendered with them too; otherwise the SFT term trains on a prompt format the rollouts never
see."""

from __future__ import annotations

import pytest
from conftest import build_trainer

#: The toy template plus a flag that changes the rendering as Qwen3's `enable_thinking=False` does: a preamble, and a
#: generation prompt that already holds the (empty) reasoning block every assistant turn renders (`<|system|>` here).
FLAG = "{% if enable_thinking is defined and not enable_thinking %}"
FLAG_TEMPLATE = (
    FLAG + "<|system|>5<|end|>{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>"
    "{% if m['role'] == 'assistant' %}<|system|>{% endif %}"
    "{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>" + FLAG + "<|system|>{% endif %}{% endif %}"
)
OFF = {"enable_thinking": False}


@pytest.fixture
def flag_tokenizer(tiny_model_dir):
    """A fresh copy (the `tokenizer` fixture is shared by the session's tests), with the flag template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = FLAG_TEMPLATE
    return tokenizer


def render(tokenizer, messages, **kwargs):
    return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"]


def test_sft_demonstrations_are_rendered_as_the_rollout_prompts(tmp_path, tiny_model_dir, flag_tokenizer):
    from amft_trl.toy import addition_demos, addition_prompts

    demos = addition_demos(4, seed=2, conversational=True)
    trainer = build_trainer(
        tmp_path,
        tiny_model_dir,
        flag_tokenizer,
        train_dataset=addition_prompts(8, seed=1, conversational=True),
        sft_dataset=demos,
        balancing="fixed",
        chat_template_kwargs=OFF,
    )
    for i, demo in enumerate(demos):
        row = trainer.sft_term.dataset[i]
        rollout_prompt = trainer._tokenize_prompts([demo["prompt"]])[0][0]  # GRPOTrainer's own rendering
        assert row["prompt_ids"] == rollout_prompt
        assert row["prompt_ids"] + row["completion_ids"] == render(
            flag_tokenizer, demo["prompt"] + demo["completion"], **OFF
        )
        # the flag matters: without it the prompt is another token sequence
        assert row["prompt_ids"] != render(flag_tokenizer, demo["prompt"], add_generation_prompt=True)


def test_attached_demonstrations_are_rendered_with_them(tmp_path, tiny_model_dir, flag_tokenizer):
    """HPT's / ReLIFT's demonstrations of an RL prompt (`SFTTerm.tokenize_demonstration`) and LUFFY's off-policy
    completions split where the rollout prompt ends."""
    from amft_trl.toy import addition_prompts

    prompts = addition_prompts(8, seed=1, conversational=True)
    prompts = prompts.add_column("demonstration", [f"The answer is {a}." for a in prompts["answer"]])
    kwargs = dict(train_dataset=prompts, sft_dataset=None, chat_template_kwargs=OFF)
    hpt = build_trainer(tmp_path / "hpt", tiny_model_dir, flag_tokenizer, balancing="hpt", **kwargs)
    prompt, demonstration = prompts[0]["prompt"], prompts[0]["demonstration"]
    example = hpt.sft_term.tokenize_demonstration(prompt, demonstration)
    completion = [{"role": "assistant", "content": demonstration}]
    assert example["prompt_ids"] == hpt._tokenize_prompts([prompt])[0][0]
    assert example["prompt_ids"] + example["completion_ids"] == render(
        flag_tokenizer, prompt + completion, **OFF
    )
    # LUFFY: the demonstration's tokens after the rollout prompt, not the reasoning block the prompt already holds
    luffy = build_trainer(tmp_path / "luffy", tiny_model_dir, flag_tokenizer, balancing="luffy", **kwargs)
    group = [dict(prompts[0])] * luffy.num_generations
    off_policy = luffy._luffy.prepare(group)[0]
    expected = flag_tokenizer(demonstration + "<|end|>")["input_ids"]
    assert (
        off_policy
        == expected[: luffy.args.max_completion_length]
        == example["completion_ids"][: len(off_policy)]
    )


def test_image_demonstrations_are_rendered_with_them():
    """The VLM path (TRL's collator renders without them) renders the rows itself when there are template kwargs."""
    pytest.importorskip("PIL")
    from trl.data_utils import prepare_multimodal_messages

    from amft_trl.sft_data import collate_vision_sft, vision_demonstration
    from amft_trl.toy import VLM_CHAT_TEMPLATE, build_vlm_processor, image_addition_demos

    processor = build_vlm_processor()
    flagged = FLAG + "<|system|>5<|end|>{% endif %}" + VLM_CHAT_TEMPLATE
    processor.chat_template = processor.tokenizer.chat_template = flagged
    demos = image_addition_demos(2, seed=0)
    batch = collate_vision_sft([demos[0], demos[1]], processor, 512, "images", None, OFF)
    plain = collate_vision_sft([demos[0], demos[1]], processor, 512, "images")
    for i, demo in enumerate(demos):
        ids = batch.prompt_ids[i][batch.prompt_mask[i].bool()].tolist()
        completion = batch.completion_ids[i][batch.completion_mask[i].bool()].tolist()
        expected = processor.apply_chat_template(
            prepare_multimodal_messages(demo["prompt"] + demo["completion"], images=demo["images"]),
            tokenize=True,
            return_dict=True,
            **OFF,
        )["input_ids"][0]
        assert ids + completion == expected
        plain_ids = plain.prompt_ids[i][plain.prompt_mask[i].bool()].tolist()
        assert plain_ids != ids and processor.tokenizer.decode(ids).startswith("<|system|>5")
        # an attached image demonstration (HPT / ReLIFT on image prompts) too
        attached = vision_demonstration(
            processor, demo["prompt"], demo["completion"], demo["images"], 512, None, OFF
        )
        assert attached["prompt_ids"] == ids
