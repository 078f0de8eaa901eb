"""AMFT trains on General Points-VL (card images, the reference verifier's reward) with the tiny offline VLM."""

from __future__ import annotations

import pytest
import torch
from conftest import make_config

STRATEGIES = {
    "amft": dict(balancing="amft", meta_update_steps=1),
    "fixed": dict(balancing="fixed", mu_init=0.4),
    "sft_then_rl": dict(balancing="sft_then_rl", sft_warmup_steps=1),
    "chord": dict(balancing="chord", chord_mu_warmup_steps=1, chord_mu_decay_steps=2),
    "srft": dict(balancing="srft"),
}


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_general_points_visual_trains_on_the_tiny_vlm(tmp_path, name):
    from amft_trl import AMFTTrainer
    from amft_trl.tasks.general_points_visual import (
        build_general_points_visual_datasets,
        general_points_verifier_reward,
    )
    from amft_trl.toy import build_vlm, build_vlm_processor

    data = build_general_points_visual_datasets(8, 2, 1, resolution=128)
    processor = build_vlm_processor()
    model = build_vlm(processor)
    model.config.text_config.max_position_embeddings = 2048  # the task prompt is longer than the toy's 256
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "vision_tower" in n}
    args = make_config(
        tmp_path,
        max_steps=2,
        max_completion_length=6,
        max_sft_length=1024,
        meta_val_batch_size=2,
        target_entropy_num_samples=4,
        **STRATEGIES[name],
    )
    trainer = AMFTTrainer(
        model=model,
        reward_funcs=[general_points_verifier_reward],
        args=args,
        processing_class=processor,
        train_dataset=data.rl,
        sft_dataset=data.sft,
        val_dataset=data.validation,
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "amft/mu" in h]
    assert len(logs) == 2
    assert any("amft/sft_loss" in h for h in logs), "no step trained on the card-image demonstrations"
    rewards = [h["rewards/general_points_verifier_reward/mean"] for h in logs if "reward" in h]
    assert rewards, "no step trained on card-image rollouts"
    # An untrained model writes no card reading: every rollout scores the wrong-reading -1.5.
    assert all(r == -1.5 for r in rewards)
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters() if n in before)


def scripted_vlm_generate(processor, hands_by_pixels, correct_at):
    """A stand-in for the tiny VLM's `generate` that reads the cards from the image it is given: each row's
    `pixel_values` are looked up among the hands' own (the prompt's text does not name the cards). It calls
    `submit_answer` with the cards read and a wrong formula until turn `correct_at(cards)` (1-based; None: never),
    where the formula is right, and answers in plain text once the verifier said "Correct solution."."""
    import json

    from amft_trl.tasks.general_points_visual import _answer

    tokenizer = processor.tokenizer
    seen: list[tuple[tuple[str, ...], int]] = []  # (cards read from the image, turn)

    def generate(input_ids, attention_mask=None, pixel_values=None, **kwargs):
        assert pixel_values is not None and pixel_values.size(0) == input_ids.size(0), (
            "the images did not come"
        )
        rows = []
        for ids, mask, pixels in zip(input_ids, attention_mask, pixel_values):
            text = tokenizer.decode(ids[mask.bool()])
            assert text.count(processor.image_token) == 4  # one image, its 4 patch tokens
            (cards,) = [h for key, h in hands_by_pixels if torch.equal(key, pixels)]
            turn = text.count("<tool_response>") + 1
            seen.append((tuple(cards), turn))
            if "Correct solution." in text:
                reply = "Solved."
            else:
                answer = _answer(cards, "id", 10)
                if turn != correct_at(cards):
                    answer["formula"] = "+".join(str(n) for n in answer["number"]) + "+99"
                call = json.dumps({"name": "submit_answer", "arguments": answer})
                reply = f"<tool_call>\n{call}\n</tool_call>"
            rows.append(tokenizer(reply, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
        width = max(map(len, rows))
        completion = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, completion.to(input_ids.device)], dim=1)

    return generate, seen


@pytest.mark.parametrize("name", ["amft", "fixed"])
def test_revision_loop_with_card_images_trains_on_the_tiny_vlm(tmp_path, monkeypatch, name):
    """GP-VL through TRL's multi-turn loop on the tiny VLM with a tool-calling template: every turn's generation and
    the loss's forward see the card image; the meta step's validation rollouts run the same loop."""
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    from amft_trl import AMFTTrainer
    from amft_trl.tasks.general_points_visual import (
        GeneralPointsRevisionEnv,
        build_general_points_visual_datasets,
    )
    from amft_trl.toy import build_tool_vlm_processor, build_vlm

    data = build_general_points_visual_datasets(
        2, 2, 1, revision=True, num_cards=3, target=10, resolution=128, verify_iter=3
    )
    processor = build_tool_vlm_processor()
    hands = [(row["images"][0], row["cards"]) for split in (data.rl, data.validation) for row in split]
    hands_by_pixels = [(processor.image_processor(images=[im])["pixel_values"][0], h) for im, h in hands]
    assert all(  # the script can tell the hands apart by their pixels alone
        not torch.equal(a, b) for i, (a, _) in enumerate(hands_by_pixels) for b, _ in hands_by_pixels[i + 1 :]
    )

    solved = {tuple(h) for _, h in hands[::2]}  # of each split, one hand solved at the second try, one never

    def correct_at(cards):
        return 2 if tuple(cards) in solved else None

    model = build_vlm(processor)
    model.config.text_config.max_position_embeddings = 8192
    model.generate, seen = scripted_vlm_generate(processor, hands_by_pixels, correct_at)
    forwards: list[str] = []  # the text of each forward that carried images
    model.register_forward_pre_hook(
        lambda module, args, kwargs: (
            forwards.extend(processor.tokenizer.decode(ids) for ids in kwargs["input_ids"])
            if kwargs.get("pixel_values") is not None
            else None
        ),
        with_kwargs=True,
    )
    episodes: list[tuple[list[str], list[float]]] = []

    class Recording(GeneralPointsRevisionEnv):
        def get_reward(self):
            episodes.append((list(self.cards), list(self.scores)))
            return super().get_reward()

    before = {n: p.detach().clone() for n, p in model.named_parameters() if "vision_tower" in n}
    args = make_config(
        tmp_path,
        max_steps=2,
        num_generations=2,
        per_device_train_batch_size=2,
        max_completion_length=2048,
        max_tool_calling_iterations=4,
        max_sft_length=4096,
        meta_val_batch_size=2,
        target_entropy_num_samples=2,
        **STRATEGIES[name],
    )
    trainer = AMFTTrainer(
        model=model,
        reward_funcs=[],
        environment_factory=lambda: Recording(verify_iter=3),
        args=args,
        processing_class=processor,
        train_dataset=data.rl,
        sft_dataset=data.sft,
        val_dataset=data.validation,
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "amft/mu" in h]
    assert len(logs) == 2 and all(h["tools/call_frequency"] > 0 for h in logs)
    assert any("amft/sft_loss" in h for h in logs)
    # The cards were read from the image at every turn, up to the third (the revision after two failures).
    assert {turn for _, turn in seen} >= {1, 2, 3}
    # Solved at the second try: two verified answers, the outcome +5; never: three, each the wrong number's -2.
    expected = {True: [-2.0, 5.0], False: [-2.0, -2.0, -2.0]}
    assert episodes and all(scores == expected[correct_at(cards) == 2] for cards, scores in episodes), (
        episodes
    )
    assert {correct_at(cards) == 2 for cards, _ in episodes} == {True, False}
    validation = {tuple(h) for h in data.validation["cards"]}
    if name == "amft":  # the meta step's validation rollouts ran the same loop, with their images
        assert any(tuple(cards) in validation for cards, _ in episodes)
        assert any(cards in validation and turn > 1 for cards, turn in seen)
    else:
        assert not any(tuple(cards) in validation for cards, _ in episodes)
    # The loss's forward ran on multi-turn rollouts (a failed try, the verifier's reply, the revision) with the image.
    assert any("You failed this trial" in text and "<tool_response>" in text for text in forwards)
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters() if n in before)
    # The demonstrations' prompts are the rollouts': the card image and the environment's tool list.
    batch = trainer.sft_term.collate([0])
    prompt = processor.tokenizer.decode(batch.prompt_ids[0][batch.prompt_mask[0].bool()])
    assert (
        prompt.count(processor.image_token) == 4
        and '"name": "submit_answer"' in prompt
        and "<tools>" in prompt
    )
    # Only the assistant's tokens are trained on: the tool call and the final answer, not the verifier's reply.
    completion = batch.completion_ids[0][batch.completion_mask[0].bool()]
    trained = batch.tool_mask[0][batch.completion_mask[0].bool()].bool()
    reply = data.sft[0]["completion"][1]["content"]
    assert data.sft[0]["completion"][1]["role"] == "tool" and reply in processor.tokenizer.decode(completion)
    assert reply not in processor.tokenizer.decode(completion[trained]) and "<tool_response>" not in (
        processor.tokenizer.decode(completion[trained])
    )
    assert "<tool_call>" in processor.tokenizer.decode(completion[trained])
    assert data.sft[0]["completion"][2]["content"] in processor.tokenizer.decode(completion[trained])


def test_image_prompts_in_the_tool_loop_need_pixel_values_as_one_tensor(tmp_path, monkeypatch):
    """A PIL image processor returns numpy `pixel_values`, which TRL 1.16's tool loop cannot split: refused at
    construction, naming the dataset and the image processor (not at the first tool call)."""
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    from transformers import CLIPImageProcessorPil

    from amft_trl import AMFTTrainer
    from amft_trl.tasks.general_points_visual import (
        build_general_points_visual_datasets,
        general_points_revision_env_factory,
    )
    from amft_trl.toy import build_tool_vlm_processor, build_vlm

    data = build_general_points_visual_datasets(
        2, 2, 1, revision=True, num_cards=3, target=10, resolution=128
    )
    processor = build_tool_vlm_processor()
    model = build_vlm(processor)
    processor.image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}
    )
    with pytest.raises(
        ValueError,
        match=r"`train_dataset` has images .*\(CLIPImageProcessorPil\) returns `pixel_values` as list",
    ):
        AMFTTrainer(
            model=model,
            reward_funcs=[],
            environment_factory=general_points_revision_env_factory(3),
            args=make_config(tmp_path, max_sft_length=4096, meta_update_steps=100, num_generations=2),
            processing_class=processor,
            train_dataset=data.rl,
            sft_dataset=data.sft,
            val_dataset=data.validation,
        )
