"""The strategies that read demonstrations from the RL dataset (HPT, LUFFY, ReLIFT) with image prompts, on the tiny
LLaVA (`amft_trl.toy.build_vlm`): each demonstration carries its row's images into the model.

- HPT: every prompt fails, so every demonstration is trained; the logged SFT loss is a hand-built token-mean NLL of
  TRL's VLM collation of the rows (images included), which differs without the images, and the vision tower moves.
- LUFFY: the off-policy rows hold the demonstration's tokens, are scored and trained on with their images.
- ReLIFT: the buffered all-failed prompts keep their images into the SFT step (hand-built NLL again), and through a
  checkpoint (the images are stored in `amft_state.json`).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import grpo_kwargs, make_config
from transformers import AutoModelForImageTextToText, AutoProcessor

from amft_trl import AMFTTrainer
from amft_trl.toy import build_vlm, build_vlm_processor, digit_fraction_reward, image_addition_prompts

COMMON = grpo_kwargs(
    per_device_train_batch_size=8, max_completion_length=6, max_steps=1, seed=7
)  # 2 prompts x 4 rollouts per step


def solution(answer: str) -> str:
    return f" {answer}. The answer is {answer}."


def prompts_with_solutions(n: int = 16, seed: int = 1):
    data = image_addition_prompts(n, seed=seed)
    return data.add_column("solution", [solution(a) for a in data["answer"]])


def always_wrong(completions, **kwargs):
    """Every rollout fails: every prompt goes to its demonstration (HPT) / into the buffer (ReLIFT)."""
    return [0.0] * len(completions)


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny-llava")
    processor = build_vlm_processor()
    build_vlm(processor).save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def processor(vlm_dir):
    return AutoProcessor.from_pretrained(vlm_dir)


def trainer_for(tmp_path, vlm_dir, processor, reward_funcs, **overrides):
    train_dataset = overrides.pop("train_dataset", None) or prompts_with_solutions()
    return AMFTTrainer(
        model=vlm_dir,
        reward_funcs=reward_funcs,
        args=make_config(tmp_path, **{**COMMON, **overrides}),
        train_dataset=train_dataset,
        processing_class=processor,
    )


def history(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h]


def vision_params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "vision_tower" in n}


def hand_logps(vlm_dir, processor, rows, with_images: bool = True) -> torch.Tensor:
    """Log-probs of each row's `solution` tokens after its prompt and image, on the untrained model: TRL's VLM
    collation (completion-only labels) and a plain forward. Without images, the same tokens are read as text (the
    image tokens' own embeddings), so the vision tower is bypassed. (T,) over all rows' completion tokens."""
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    collate = DataCollatorForVisionLanguageModeling(processor=processor, completion_only_loss=True)
    examples = [
        {
            "prompt": copy.deepcopy(row["prompt"]),
            "completion": [{"role": "assistant", "content": row["solution"]}],
            "images": [row["image"]],
        }
        for row in rows
    ]
    batch = collate(examples)
    model = AutoModelForImageTextToText.from_pretrained(vlm_dir).eval()
    with torch.no_grad():
        if with_images:
            logits = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                pixel_values=batch["pixel_values"],
            ).logits
        else:
            embeds = model.get_input_embeddings()(batch["input_ids"])
            logits = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    logps = torch.log_softmax(logits[:, :-1].double(), -1)
    return logps.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)[mask]


def hand_nll(vlm_dir, processor, rows, with_images: bool = True) -> float:
    """The token-mean NLL of the rows' solutions (`hand_logps`)."""
    return float(-hand_logps(vlm_dir, processor, rows, with_images).mean())


def first_rows_of_groups(rows, group=4):
    return [rows[i] for i in range(0, len(rows), group)]


# ---- HPT ----------------------------------------------------------------------------------------------------------
def test_hpt_trains_each_failing_prompts_demonstration_with_its_images(tmp_path, vlm_dir, processor):
    trainer = trainer_for(
        tmp_path,
        vlm_dir,
        processor,
        [always_wrong],
        balancing="hpt",
        hpt_demonstration_column="solution",
    )
    seen = []
    generation = trainer._attached.generation
    trainer._attached.generation = lambda inputs, out: seen.extend(inputs) or generation(inputs, out)
    batches = []
    sft_step = trainer._sft_micro_step

    def spy(model, batch, *args, **kwargs):
        batches.append(batch)
        return sft_step(model, batch, *args, **kwargs)

    trainer._sft_micro_step = spy
    before = vision_params(trainer.model)
    trainer.train()
    assert history(trainer, "amft/hpt_sft_fraction") == [1.0]  # every prompt failed: all go to SFT
    assert history(trainer, "amft/mu") == [1.0]
    assert len(batches) == 1 and "pixel_values" in batches[0].model_inputs
    assert batches[0].model_inputs["num_images"] == [1, 1]
    prompts = first_rows_of_groups(seen)
    assert len(prompts) == 2
    logged = history(trainer, "amft/sft_loss")
    assert logged[0] == pytest.approx(hand_nll(vlm_dir, processor, prompts), rel=1e-5)
    assert abs(logged[0] - hand_nll(vlm_dir, processor, prompts, with_images=False)) > 1e-2
    # every advantage is 0 (all rollouts fail): only the demonstrations' images can have moved the vision tower
    assert any(not torch.equal(before[n], p) for n, p in vision_params(trainer.model).items())


def test_hpt_text_demonstrations_of_conversational_prompts_are_the_assistants_message(
    tmp_path, vlm_dir, processor
):
    """A string demonstration of a conversational prompt is tokenised as its assistant message (text and images
    alike); its completion tokens are the ones TRL's VLM collator gives it."""
    trainer = trainer_for(
        tmp_path, vlm_dir, processor, [always_wrong], balancing="hpt", hpt_demonstration_column="solution"
    )
    row = trainer.train_dataset[0]
    with_images = trainer.sft_term.tokenize_demonstration(row["prompt"], row["solution"], [row["image"]])
    text = trainer.sft_term.tokenize_demonstration(row["prompt"], row["solution"])
    assert with_images["completion_ids"] == text["completion_ids"]
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert with_images["prompt_ids"].count(image_token) == 4 and image_token not in text["prompt_ids"]
    # truncation never cuts the image tokens: a prompt that leaves no room for a completion token is dropped
    trainer.args.max_sft_length = len(with_images["prompt_ids"])
    assert trainer.sft_term.tokenize_demonstration(row["prompt"], row["solution"], [row["image"]]) is None
    trainer.args.max_sft_length = len(with_images["prompt_ids"]) + 2
    cut = trainer.sft_term.tokenize_demonstration(row["prompt"], row["solution"], [row["image"]])
    assert cut["completion_ids"] == with_images["completion_ids"][:2]
    assert trainer.sft_term.collate_demonstrations([cut]).completion_mask.sum() == 2


def image_parts(data):
    """The same rows with each image inside its prompt (`{"type": "image", "image": ...}`) and no image column."""
    from datasets import Dataset, Features, Image, List, Value

    rows = []
    for row in data:
        content = [
            {"type": "image", "image": row["image"], "text": None},
            {"type": "text", "image": None, "text": row["prompt"][0]["content"]},
        ]
        rows.append({"prompt": [{"role": "user", "content": content}], "solution": row["solution"]})
    part = {"type": Value("string"), "image": Image(), "text": Value("string")}
    message = {"role": Value("string"), "content": List(part)}
    return Dataset.from_list(rows, features=Features({"prompt": List(message), "solution": Value("string")}))


def from_image_parts(row):
    (message,) = row["prompt"]
    image, text = message["content"]
    return {**row, "prompt": [{"role": "user", "content": text["text"]}], "image": image["image"]}


def test_hpt_and_relift_take_the_images_of_prompts_with_image_parts(tmp_path, vlm_dir, processor):
    """Prompts that carry their images in image parts (no image column): the demonstrations are trained with them,
    and ReLIFT's buffer takes them out of the prompt (so that the checkpoint can store them)."""
    trainer = trainer_for(
        tmp_path,
        vlm_dir,
        processor,
        [always_wrong],
        balancing="hpt",
        hpt_demonstration_column="solution",
        train_dataset=image_parts(prompts_with_solutions()),
    )
    seen = []
    generation = trainer._attached.generation
    trainer._attached.generation = lambda inputs, out: seen.extend(inputs) or generation(inputs, out)
    trainer.train()
    prompts = [from_image_parts(row) for row in first_rows_of_groups(seen)]
    assert history(trainer, "amft/sft_loss")[0] == pytest.approx(
        hand_nll(vlm_dir, processor, prompts), rel=1e-5
    )

    relift = trainer_for(
        tmp_path / "relift",
        vlm_dir,
        processor,
        [always_wrong],
        balancing="relift",
        relift_demonstration_column="solution",
        train_dataset=image_parts(prompts_with_solutions(4)),
    )
    row = relift.train_dataset[0]
    prompt, solution, images = relift._relift.entry(row, "solution")
    assert solution == row["solution"] and images == [row["prompt"][0]["content"][0]["image"]]
    assert "image" not in prompt[0]["content"][0] and row["prompt"][0]["content"][0]["image"] is not None
    relift.strategy.add_failed([(prompt, solution, images)])
    json.dumps(relift.strategy.state_dict())
    (batch,) = relift._relift.sft_batches(relift.strategy.buffer, 1)
    assert batch.model_inputs["num_images"] == [1]


@pytest.mark.parametrize("own_demonstration", ["kept", "empty"])
def test_hpt_placeholder_row_of_a_process_without_demonstrations_carries_images(
    tmp_path, vlm_dir, processor, own_demonstration
):
    """2 simulated processes, one prompt each: process 1's prompt fails (its demonstration is trained), process 0's
    succeeds. Process 0 still runs the SFT forward (DDP / ZeRO-3 need equal forward counts) on a zero-weight row that
    carries its prompt's image, so the vision tower runs on both: its own demonstration, or, when that is empty, its
    prompt with EOS as completion."""
    import threading

    from _simulated_processes import _Board, _FakeAccelerator

    from amft_trl.attached_demonstrations import AttachedDemonstrations
    from amft_trl.balancing import HPTStrategy

    trainer = trainer_for(
        tmp_path, vlm_dir, processor, [always_wrong], balancing="hpt", hpt_demonstration_column="solution"
    )
    data = trainer.train_dataset
    rows = [data[0]] * 4 + [data[1]] * 4
    if own_demonstration == "empty":
        rows[:4] = [{**data[0], "solution": ""}] * 4
    rewards = torch.tensor([1.0] * 4 + [0.0] * 4)
    board, out = _Board(2), [None, None]

    def process(rank):
        attached = AttachedDemonstrations(
            HPTStrategy("solution"),
            _FakeAccelerator(rank, 2, board),
            trainer.sft_term.tokenize_demonstration,
            pad_token_id=processor.tokenizer.pad_token_id,
            eos_token_id=processor.tokenizer.eos_token_id,
            gradient_accumulation_steps=1,
            steps_per_generation=1,
            num_generations=4,
            image_column="image",
            collate=trainer.sft_term.collate_demonstrations,
            placeholder=trainer.sft_term.vision_placeholder,
        )
        mine = slice(rank * 4, rank * 4 + 4)
        attached.generation(
            rows[mine],
            {
                "advantages": torch.zeros(4),
                "amft_reward": rewards[mine],
                "amft_group_rewards": rewards.view(2, 4).repeat_interleave(4, dim=0)[mine],
                "completion_mask": torch.ones(4, 2),
            },
        )
        out[rank] = attached.micro_step().sft

    threads = [threading.Thread(target=process, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    placeholder, trained = out
    assert placeholder.row_weights.tolist() == [0.0] and trained.row_weights.tolist() == [1.0]
    assert placeholder.normalizer == trained.normalizer == trained.batch.num_tokens / 2
    for micro in out:
        assert (
            micro.batch.model_inputs["num_images"] == [1]
            and micro.batch.model_inputs["pixel_values"].shape[0] == 1
        )
    eos = processor.tokenizer.decode(
        placeholder.batch.completion_ids[0][placeholder.batch.completion_mask[0].bool()]
    )
    assert (eos == processor.tokenizer.eos_token + "<|end|>") == (own_demonstration == "empty")


# ---- LUFFY --------------------------------------------------------------------------------------------------------
def test_luffy_puts_each_demonstration_with_its_images_into_the_group(
    tmp_path, vlm_dir, processor, monkeypatch
):
    from trl import GRPOTrainer

    generated = []
    original = GRPOTrainer._generate_single_turn

    def generation_spy(self, prompt_ids, images, multimodal_fields, num_generations, *args, **kwargs):
        generated.append(
            (len(prompt_ids), len(images), len(multimodal_fields["pixel_values"]), num_generations)
        )
        return original(self, prompt_ids, images, multimodal_fields, num_generations, *args, **kwargs)

    monkeypatch.setattr(GRPOTrainer, "_generate_single_turn", generation_spy)
    trainer = trainer_for(
        tmp_path,
        vlm_dir,
        processor,
        [digit_fraction_reward],
        balancing="luffy",
        luffy_demonstration_column="solution",
        max_completion_length=32,  # the whole demonstration fits
    )
    seen, outs = [], []
    generate = trainer._generate_and_score_completions

    def spy(inputs):
        seen.extend(inputs)
        out = generate(inputs)
        outs.append(out)
        return out

    trainer._generate_and_score_completions = spy
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    (out,) = outs
    # the demonstrations cost no generation: 3 of each group's 4 rows are generated, each with its image
    assert generated == [(6, 6, 6, 3)]
    assert out["amft_off_policy"].tolist() == [True, False, False, False] * 2
    tokenizer = processor.tokenizer
    for row in (0, 4):
        ids = out["completion_ids"][row][out["completion_mask"][row].bool()].tolist()
        assert tokenizer.decode(ids) == seen[row]["solution"] + "<|end|>"
    assert (
        out["pixel_values"].shape[0] == 8 and out["num_images"] == [1] * 8
    )  # every row is trained with its image
    for key in (
        "amft/luffy_off_policy_fraction",
        "amft/luffy_importance_weight",
        "amft/luffy_off_policy_reward",
    ):
        assert len(history(trainer, key)) == 1, key
    # the off-policy tokens' probabilities the loss used are those of the demonstration after its image
    prompts = first_rows_of_groups(seen)
    logps = hand_logps(vlm_dir, processor, prompts)
    assert history(trainer, "amft/luffy_off_policy_prob")[0] == pytest.approx(
        float(logps.exp().mean()), rel=1e-5
    )
    blind = hand_logps(vlm_dir, processor, prompts, with_images=False)  # and without the images they differ
    assert (blind - logps).abs().max() > 0.1
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before if "vision_tower" in n)


# ---- ReLIFT -------------------------------------------------------------------------------------------------------
def relift(tmp_path, vlm_dir, processor, callbacks=(), **overrides):
    trainer = trainer_for(
        tmp_path,
        vlm_dir,
        processor,
        [always_wrong],
        balancing="relift",
        relift_demonstration_column="solution",
        relift_buffer_size=2,  # step 0's two prompts fill it: step 1 is the SFT step
        max_steps=2,
        **overrides,
    )
    for callback in callbacks:
        trainer.add_callback(callback)
    return trainer


def test_relift_trains_the_buffered_demonstrations_with_their_images(tmp_path, vlm_dir, processor):
    trainer = relift(tmp_path, vlm_dir, processor)
    seen, batches = [], []
    fill, sft_batches = trainer._relift.fill, trainer._relift.sft_batches
    trainer._relift.fill = lambda inputs, rewards: seen.extend(inputs) or fill(inputs, rewards)
    trainer._relift.sft_batches = lambda entries, n: batches.extend(sft_batches(entries, n)) or batches[-n:]
    before = vision_params(trainer.model)
    trainer.train()
    assert history(trainer, "amft/relift_sft_step") == [0.0, 1.0]
    assert len(batches) == 1 and batches[0].model_inputs["num_images"] == [1, 1]
    prompts = first_rows_of_groups(seen)
    assert len(prompts) == 2
    # step 0's advantages are all 0 (every rollout fails): step 1 starts from the untrained weights
    logged = history(trainer, "amft/sft_loss")
    assert len(logged) == 1 and logged[0] == pytest.approx(hand_nll(vlm_dir, processor, prompts), rel=1e-5)
    assert abs(logged[0] - hand_nll(vlm_dir, processor, prompts, with_images=False)) > 1e-2
    assert any(not torch.equal(before[n], p) for n, p in vision_params(trainer.model).items())


def test_relift_buffer_keeps_its_images_through_a_checkpoint(tmp_path, vlm_dir, processor):
    import numpy as np
    from transformers import TrainerCallback

    from amft_trl.balancing.relift import ReLIFTStrategy

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step >= 1

    straight = relift(tmp_path / "a", vlm_dir, processor)
    straight.train()
    first = relift(tmp_path / "b", vlm_dir, processor, [StopAt()], save_strategy="steps", save_steps=1)
    first.train()
    state = json.loads(json.dumps(first.strategy.state_dict()))  # what amft_state.json holds
    restored = ReLIFTStrategy("solution", buffer_size=2)
    restored.load_state_dict(state)
    for kept, reloaded in zip(first.strategy.buffer, restored.buffer, strict=True):
        assert reloaded[:2] == kept[:2] and len(reloaded[2]) == 1
        assert np.array_equal(np.asarray(reloaded[2][0]), np.asarray(kept[2][0])), (
            "the image is kept pixel for pixel"
        )
    second = relift(tmp_path / "b", vlm_dir, processor)
    second.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-1"))
    assert history(second, "amft/sft_loss") == pytest.approx(history(straight, "amft/sft_loss"), rel=1e-6)
    for (name, x), (_, y) in zip(
        straight.model.named_parameters(), second.model.named_parameters(), strict=True
    ):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=name)


# ---- the VLM example script -------------------------------------------------------------------------------------
def test_vlm_example_script_runs_hpt_on_the_rows_demonstrations(tmp_path, vlm_dir):
    import sys
    from pathlib import Path

    from datasets import DatasetDict

    examples = Path(__file__).resolve().parents[2] / "examples" / "vlm"
    sys.path.insert(0, str(examples))
    import train_vlm

    prompts = image_addition_prompts(8, seed=1).rename_column("answer", "solution")
    demos = [f"\\boxed{{{s}}}" if i % 2 == 0 else "" for i, s in enumerate(prompts["solution"])]
    data = DatasetDict(
        {
            "train": prompts.add_column("completion", demos),
            "validation": image_addition_prompts(4, 3).rename_column("answer", "solution"),
        }
    )
    data.save_to_disk(tmp_path / "data")
    argv = ["--config", str(examples / "qwen2_5_vl_3b_1gpu.yaml"), "--model_name_or_path", vlm_dir]
    argv += [
        "--dataset_name",
        str(tmp_path / "data"),
        "--output_dir",
        str(tmp_path / "out"),
        "--dtype",
        "float32",
    ]
    argv += ["--bf16", "false", "--use_cpu", "true", "--gradient_checkpointing", "false", "--max_steps", "1"]
    argv += ["--balancing", "hpt", "--sft_warmup_steps", "0", "--per_device_train_batch_size", "8"]
    argv += ["--gradient_accumulation_steps", "1", "--num_generations", "4", "--max_completion_length", "4"]
    argv += ["--save_strategy", "no", "--hpt_accuracy_threshold", "0.5"]
    trainer = train_vlm.main(*train_vlm.parse_args(argv))
    # the demonstrations stay in the RL prompts, under the strategy's column (default `demonstration`)
    assert trainer.state.global_step == 1 and "demonstration" in trainer.train_dataset.column_names
    # the step's two prompts fail; one has a demonstration (the other's is empty, so it is not trained)
    assert history(trainer, "amft/hpt_sft_fraction") == [0.5] and len(history(trainer, "amft/sft_loss")) == 1
    # kept as `completion` (strings, beside conversational prompts), TRL would guess the rows' format at random
    with pytest.raises(ValueError, match=r"train_dataset\['completion'\].*Rename the column"):
        train_vlm.main(*train_vlm.parse_args([*argv, "--hpt_demonstration_column", "completion"]))


@pytest.mark.parametrize("balancing", ["hpt", "luffy", "relift"])
def test_a_demonstration_column_trl_reads_the_format_from_must_match_the_prompts(
    tmp_path, vlm_dir, processor, balancing
):
    """`completion` holding strings beside conversational prompts is refused (TRL's `is_conversational` picks one of
    the two columns at random); holding assistant messages, it is the prompts' format and accepted."""
    data = prompts_with_solutions(8)
    field = {f"{balancing}_demonstration_column": "completion"}
    strings = data.rename_column("solution", "completion")
    with pytest.raises(
        ValueError, match=rf"balancing='{balancing}'.*\['completion'\].*not a list of messages"
    ):
        trainer_for(
            tmp_path, vlm_dir, processor, [always_wrong], balancing=balancing, train_dataset=strings, **field
        )
    messages = data.map(lambda row: {"completion": [{"role": "assistant", "content": row["solution"]}]})
    trainer = trainer_for(
        tmp_path, vlm_dir, processor, [always_wrong], balancing=balancing, train_dataset=messages, **field
    )
    assert trainer.strategy.demonstration_column == "completion"
