"""Vision-language models: AMFTTrainer trains a tiny LLaVA (CLIP vision tower + Llama) wherever GRPOTrainer does.

The model and its processor are built offline (`amft_trl.toy.build_vlm`, no torchvision, no hub) and saved once per
module, so every trainer loads identical weights by path. Images are 16x16, each 4 `<image>` tokens.
"""

from __future__ import annotations

import copy
import importlib.util
import math

import pytest
import torch
from conftest import grpo_kwargs, make_config
from transformers import AutoProcessor, TrainerCallback

from amft_trl import AMFTTrainer
from amft_trl.toy import (
    build_tokenizer,
    build_vlm,
    build_vlm_processor,
    digit_fraction_reward,
    image_addition_demos,
    image_addition_prompts,
)

COMMON = grpo_kwargs(max_completion_length=6, max_steps=2, seed=7)
PINNED = dict(mu_min=0.0, mu_max=1.0, meta_learning_rate=0.0, entropy_learning_rate=0.0)


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


@pytest.fixture(scope="module")
def qwen2vl(tmp_path_factory) -> tuple[str, object]:
    """A tiny Qwen2-VL (image_grid_thw, mm_token_type_ids, M-RoPE) and its image-only processor object."""
    from amft_trl.toy import build_qwen2vl, build_qwen2vl_processor

    path = tmp_path_factory.mktemp("tiny-qwen2vl")
    processor = build_qwen2vl_processor()
    build_qwen2vl(processor).save_pretrained(path)
    return str(path), processor


@pytest.fixture(params=["llava", "qwen2vl"])
def family(request, vlm_dir, processor) -> tuple[str, object]:
    if request.param == "llava":
        return vlm_dir, processor
    return request.getfixturevalue("qwen2vl")


def history(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h]


def amft(tmp_path, vlm_dir, processor, reward_funcs=None, callbacks=None, model=None, **overrides):
    names = ("train_dataset", "sft_dataset", "val_dataset", "peft_config")
    datasets = {k: overrides.pop(k) for k in names if k in overrides}
    datasets.setdefault("train_dataset", image_addition_prompts(16, seed=1))
    return AMFTTrainer(
        model=model or vlm_dir,
        reward_funcs=reward_funcs or [digit_fraction_reward],
        args=make_config(tmp_path, **{**COMMON, **overrides}),
        processing_class=processor,
        callbacks=callbacks,
        **datasets,
    )


def is_vision(name: str) -> bool:
    return "vision_tower" in name or ".visual." in name  # LLaVA's CLIP tower; Qwen2-VL's ViT


def vision_params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if is_vision(n)}


# ---- 1. image prompts: GRPOTrainer's path, bit for bit -----------------------------------------------------------
def test_image_prompts_mu_zero_equals_grpo(tmp_path, family):
    from trl import GRPOConfig, GRPOTrainer

    vlm_dir, processor = family
    prompts = image_addition_prompts(16, seed=1)
    ours = amft(
        tmp_path / "amft", vlm_dir, processor, train_dataset=prompts, mu_init=0.0, **{**PINNED, "mu_max": 0.0}
    )
    before = vision_params(ours.model)
    ours.train()
    grpo = GRPOTrainer(
        model=vlm_dir,
        reward_funcs=[digit_fraction_reward],
        args=GRPOConfig(output_dir=str(tmp_path / "grpo"), **COMMON),
        train_dataset=prompts,
        processing_class=processor,
    )
    grpo.train()
    for (name, a), (_, b) in zip(ours.model.named_parameters(), grpo.model.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{name} differs from GRPOTrainer")
    # the images reached the model: its vision tower was trained
    assert any(not torch.equal(before[n], p) for n, p in vision_params(ours.model).items())


# ---- 2. image demonstrations: TRL SFTTrainer's completion-only loss and gradient -------------------------------
class GradientsBeforeStep(TrainerCallback):
    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_image_demonstrations_mu_one_match_sft_trainer(tmp_path, family):
    from transformers import AutoModelForImageTextToText
    from trl import SFTConfig, SFTTrainer

    vlm_dir, processor = family
    demos = image_addition_demos(12, seed=2)
    grads = GradientsBeforeStep()
    ours = amft(
        tmp_path / "amft",
        vlm_dir,
        processor,
        callbacks=[grads],
        sft_dataset=demos,
        mu_init=1.0,
        **{**PINNED, "mu_min": 1.0},
        max_steps=1,
        max_grad_norm=0.0,
        max_sft_length=64,
    )
    used = []
    collate = ours.sft_term.collate
    ours.sft_term.collate = lambda indices: used.extend(indices) or collate(indices)
    ours.train()
    assert len(used) == 4 and grads.grads

    sft = SFTTrainer(
        model=AutoModelForImageTextToText.from_pretrained(vlm_dir),
        args=SFTConfig(
            output_dir=str(tmp_path / "sft"), max_length=64, report_to="none", use_cpu=True, bf16=False
        ),
        train_dataset=demos,
        processing_class=processor,
    )
    assert sft.completion_only_loss
    batch = sft.data_collator([copy.deepcopy(demos[i]) for i in used])
    assert (batch["labels"] == -100).sum() > 4 * 4, "prompt and image tokens are masked"
    image_token = processor.tokenizer.convert_tokens_to_ids(getattr(processor, "image_token", "<image>"))
    assert (batch["input_ids"] == image_token).sum() >= 4 * 4
    assert not (batch["labels"] == image_token).any()
    sft.model.train()
    loss = sft.compute_loss(sft.model, dict(batch))
    loss.backward()
    assert history(ours, "amft/sft_loss")[0] == pytest.approx(float(loss.detach()), rel=1e-5)
    reference = {n: p.grad for n, p in sft.model.named_parameters() if p.grad is not None}
    assert set(reference) == set(grads.grads)
    assert any(is_vision(n) for n in reference), "the image path carries a gradient"
    for name, g in grads.grads.items():
        torch.testing.assert_close(g, reference[name], rtol=1e-4, atol=1e-6, msg=f"gradient of {name}")


def test_messages_layout_gives_the_prompt_completion_batch(tmp_path, vlm_dir, processor):
    from amft_trl.sft_data import collate_vision_sft

    rows = [image_addition_demos(3, seed=5, layout=layout) for layout in ("prompt_completion", "messages")]
    a, b = (collate_vision_sft(list(r), processor, 64, "images") for r in rows)
    for field in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert torch.equal(a.model_inputs["pixel_values"], b.model_inputs["pixel_values"])
    assert a.model_inputs["num_images"] == [1, 1, 1]


def test_truncation_never_cuts_image_tokens(tmp_path, vlm_dir, processor, caplog):
    from datasets import Dataset

    from amft_trl.sft_data import prepare_vision_sft_dataset

    demos = image_addition_demos(12, seed=2)
    rows = demos.to_list()
    for i, row in enumerate(rows):  # prompts of three lengths
        row["prompt"][0]["content"][1]["text"] *= 1 + i % 3
    demos = Dataset.from_list(rows, features=demos.features)
    full, _ = prepare_vision_sft_dataset(demos, processor, None)
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    prompts = [len(b.prompt_ids[0]) for b in (amft_batch(processor, [r]) for r in full)]
    limit = sorted(prompts)[len(prompts) // 2]  # about half the prompts leave no room for a completion token
    expected_dropped = sum(1 for n in prompts if n >= limit)
    assert 0 < expected_dropped < len(prompts)
    kept, dropped = prepare_vision_sft_dataset(demos, processor, limit)
    assert dropped == expected_dropped and len(kept) == len(demos) - dropped
    assert "max_sft_length" in caplog.text
    batch = amft_batch(processor, list(kept), limit)
    assert ((batch.prompt_ids == image_token).sum(1) == 4).all(), "every kept prompt has all its image tokens"
    assert (batch.prompt_mask.sum(1) + batch.completion_mask.sum(1) <= limit).all()
    assert (batch.completion_mask.sum(1) >= 1).all()
    with pytest.raises(ValueError, match=r"sft_dataset.*max_sft_length=8.*never cuts image tokens"):
        prepare_vision_sft_dataset(demos, processor, 8)


def test_single_image_column_and_sampling_temperature(tmp_path, vlm_dir, processor):
    """An `image` column (one image per row) gives the `images` batch; at a sampling temperature other than 1 the SFT
    log-probs (taken at temperature 1 from the logits, not TRL's fused head) still see the images."""
    demos = image_addition_demos(4, seed=2)
    single = demos.map(lambda row: {"image": row["images"][0]}, remove_columns="images")
    a, b = amft_batch(processor, list(demos)), amft_batch_single(processor, list(single))
    assert torch.equal(a.prompt_ids, b.prompt_ids) and torch.equal(
        a.model_inputs["pixel_values"], b.model_inputs["pixel_values"]
    )
    fused = amft(tmp_path / "t1", vlm_dir, processor, sft_dataset=single, meta_learning_rate=0.0)
    direct = amft(
        tmp_path / "t07", vlm_dir, processor, sft_dataset=single, meta_learning_rate=0.0, temperature=0.7
    )
    batch = fused.sft_term.collate([0, 1, 2, 3])
    with torch.no_grad():
        logps_fused, entropy_fused = fused.sft_term.token_stats(fused.model, batch, compute_entropy=True)
        logps_direct, entropy_direct = direct.sft_term.token_stats(direct.model, batch, compute_entropy=True)
    mask = batch.completion_mask.bool()
    torch.testing.assert_close(logps_direct[mask], logps_fused[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy_direct[mask], entropy_fused[mask], rtol=1e-5, atol=1e-5)


def amft_batch_single(processor, rows):
    from amft_trl.sft_data import collate_vision_sft

    return collate_vision_sft(rows, processor, None, "image")


def amft_batch(processor, rows, max_length=None):
    from amft_trl.sft_data import collate_vision_sft

    return collate_vision_sft(rows, processor, max_length, "images")


# ---- 3. bad input: one clear error at construction -------------------------------------------------------------
def test_image_column_with_a_tokenizer(tmp_path, vlm_dir, processor):
    with pytest.raises(
        ValueError, match=r"`train_dataset` has an `image` column.*TokenizersBackend with no image processor"
    ):
        amft(tmp_path, vlm_dir, processor.tokenizer, mu_init=0.0, **{**PINNED, "mu_max": 0.0})


def test_image_parts_in_prompts_with_a_tokenizer(tmp_path, vlm_dir, processor):
    from datasets import Dataset

    from amft_trl.toy import toy_image

    rows = [
        {
            "prompt": [
                {
                    "role": "user",
                    "content": [{"type": "image", "image": toy_image(i)}, {"type": "text", "text": "Hi"}],
                }
            ]
        }
        for i in range(4)
    ]
    with pytest.raises(ValueError, match=r"`train_dataset` has image parts in `prompt`.*no image processor"):
        amft(
            tmp_path,
            vlm_dir,
            processor.tokenizer,
            train_dataset=Dataset.from_list(rows),
            mu_init=0.0,
            **{**PINNED, "mu_max": 0.0},
        )


def test_image_demonstrations_with_a_tokenizer(tmp_path, vlm_dir, processor):
    from conftest import make_prompts

    with pytest.raises(ValueError, match=r"`sft_dataset` has an `images` column.*no image processor"):
        amft(
            tmp_path,
            vlm_dir,
            processor.tokenizer,
            train_dataset=make_prompts(8, seed=1),
            sft_dataset=image_addition_demos(4, seed=2),
            meta_learning_rate=0.0,
        )


def test_image_column_with_a_text_only_model(tmp_path, processor):
    from amft_trl.toy import build_model

    with pytest.raises(
        ValueError, match=r"`train_dataset` has an `image` column.*Qwen2ForCausalLM.*text-only"
    ):
        amft(
            tmp_path,
            None,
            processor,
            model=build_model(build_tokenizer()),
            mu_init=0.0,
            **{**PINNED, "mu_max": 0.0},
        )


def test_an_image_that_cannot_be_loaded_names_its_row(tmp_path, vlm_dir, processor):
    from datasets import Dataset, Image

    rows = image_addition_prompts(4, seed=1).cast_column("image", Image(decode=False)).to_list()
    rows[2]["image"] = {"bytes": b"not an image", "path": None}
    prompts = Dataset.from_list(rows).cast_column("image", Image())
    with pytest.raises(
        ValueError, match=r"`train_dataset` row 2: an image in column `image` cannot be loaded"
    ):
        amft(tmp_path, vlm_dir, processor, train_dataset=prompts, mu_init=0.0, **{**PINNED, "mu_max": 0.0})
    demos = image_addition_demos(4, seed=2)
    rows = demos.to_list()
    rows[3]["images"] = [{"bytes": None, "path": str(tmp_path / "missing.png")}]
    demos = Dataset.from_list(rows, features=demos.features)
    with pytest.raises(
        ValueError, match=r"`sft_dataset` row 3: an image in column `images` cannot be loaded"
    ):
        amft(tmp_path, vlm_dir, processor, sft_dataset=demos, meta_learning_rate=0.0)


def test_image_parts_without_an_image_column(tmp_path, vlm_dir, processor):
    demos = image_addition_demos(4, seed=2).remove_columns("images")
    with pytest.raises(
        ValueError, match=r"`sft_dataset` row 0: column `prompt` has an image part.*no `images`"
    ):
        amft(tmp_path, vlm_dir, processor, sft_dataset=demos, meta_learning_rate=0.0)


def _mixed_demos():
    from datasets import Dataset

    demos = image_addition_demos(8, seed=2)
    rows = demos.to_list()
    for row in rows[1::2]:  # every other demonstration is text-only
        row["images"] = []
        row["prompt"][0]["content"] = [part for part in row["prompt"][0]["content"] if part["type"] == "text"]
    return Dataset.from_list(rows, features=demos.features)


def test_rows_with_and_without_images_train_when_the_model_takes_them(tmp_path, vlm_dir, processor):
    trainer = amft(
        tmp_path, vlm_dir, processor, sft_dataset=_mixed_demos(), meta_learning_rate=0.0, max_steps=2
    )
    trainer.train()
    assert len(history(trainer, "amft/sft_loss")) == 2


class RefusesMixedBatches:
    """A processor that, like Mllama's, refuses a batch where some rows have images and others none."""

    def __init__(self, processor):
        self._processor = processor

    def __getattr__(self, name):
        return getattr(self._processor, name)

    def __call__(self, images=None, text=None, **kwargs):
        if images is not None and any(not im for im in images) and any(im for im in images):
            raise ValueError(
                "If a batch of text is provided, there should be either no images or one per sample"
            )
        return self._processor(images=images, text=text, **kwargs)


def test_rows_with_and_without_images_refused_when_the_processor_cannot(tmp_path, vlm_dir, processor):
    from transformers import AutoModelForImageTextToText

    from amft_trl.vision import check_image_inputs

    model = AutoModelForImageTextToText.from_pretrained(vlm_dir)
    with pytest.raises(
        ValueError, match=r"`sft_dataset` mixes rows with images \(row 0\) and rows without \(row 1\)"
    ):
        check_image_inputs(model, RefusesMixedBatches(processor), {"sft_dataset": _mixed_demos()})
    from datasets import Dataset

    prompts = image_addition_prompts(4, seed=1)
    rows = prompts.to_list()
    rows[2]["image"] = None
    prompts = Dataset.from_list(rows, features=prompts.features)
    with pytest.raises(
        ValueError, match=r"`train_dataset` mixes rows with images \(row 0\) and rows without \(row 2\)"
    ):
        check_image_inputs(model, RefusesMixedBatches(processor), {"train_dataset": prompts})


# ---- 4. the rest of the step with images: Eq. 25, H_t and H*, every strategy, resume ----------------------------
ALPHA = 1e-4


def test_meta_gradient_with_images_matches_finite_differences(tmp_path, vlm_dir, processor):
    """Eq. 25 on the VLM (float64): the logged g_mu against a central difference of the validation surrogate after
    one SGD step `theta(mu) = theta_0 - alpha ((1 - mu) grad L_RL + mu grad L_SFT)`, all inputs carrying images."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(vlm_dir, dtype=torch.float64)
    theta0 = copy.deepcopy(model.state_dict())
    trainer = amft(
        tmp_path,
        vlm_dir,
        processor,
        model=model,
        sft_dataset=image_addition_demos(8, seed=2),
        val_dataset=image_addition_prompts(4, seed=3),
        max_steps=1,
        learning_rate=ALPHA,
        lr_scheduler_type="constant",
        optim="sgd",
        max_grad_norm=0.0,
        weight_decay=0.0,
        mu_init=0.3,
        meta_learning_rate=0.1,
        meta_gradient_form="raw",
        entropy_learning_rate=0.0,
        meta_update_steps=1,
        meta_val_batch_size=2,
        target_entropy_num_samples=4,
        max_completion_length=4,
    )
    rollouts, sft_batches = [], []
    generate, sft_step = trainer._generate_and_score_completions, trainer._sft_micro_step

    def spy_generate(inputs):
        rollouts.append(generate(inputs))
        return rollouts[-1]

    def spy_sft(model, batch, weight, step, *args):
        sft_batches.append((batch, step.sft_tokens))
        return sft_step(model, batch, weight, step, *args)

    trainer._generate_and_score_completions, trainer._sft_micro_step = spy_generate, spy_sft
    trainer.train()
    val_out, rl_inputs = rollouts
    assert "pixel_values" in val_out and "pixel_values" in rl_inputs
    assert sft_batches[0][0].model_inputs["pixel_values"].shape[0] == 4
    logged = [h for h in trainer.state.log_history if "amft/meta_gradient" in h][0]
    mu = logged["amft/mu"]
    assert mu == pytest.approx(0.3)

    def losses():
        l_rl = trainer._compute_loss(trainer.model, rl_inputs)
        l_sft = 0.0
        for batch, tokens in sft_batches:
            logps, _ = trainer.sft_term.token_stats(trainer.model, batch, compute_entropy=False)
            l_sft = l_sft - (logps * batch.completion_mask).sum() / tokens
        return l_rl, l_sft

    def utility() -> (
        torch.Tensor
    ):  # a plain forward with the validation images, independent of TRL's fused head
        ids = torch.cat([val_out["prompt_ids"], val_out["completion_ids"]], 1)
        mask = torch.cat([val_out["prompt_mask"], val_out["completion_mask"]], 1)
        c = val_out["completion_ids"].size(1)
        logits = trainer.model(
            input_ids=ids, attention_mask=mask, pixel_values=val_out["pixel_values"]
        ).logits
        logps = torch.log_softmax(logits[:, -c - 1 : -1].double(), -1)
        logps = logps.gather(-1, val_out["completion_ids"].unsqueeze(-1)).squeeze(-1)
        cmask = val_out["completion_mask"]
        return (val_out["advantages"].unsqueeze(1) * logps * cmask).sum() / cmask.sum()

    names = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    trainer.model.load_state_dict(theta0)
    l_rl, l_sft = losses()
    # CLIP's post-layernorm feeds only its pooled output, which LLaVA does not use: no gradient there
    g_rl = torch.autograd.grad(l_rl, trainable, allow_unused=True, materialize_grads=True)
    g_sft = torch.autograd.grad(l_sft, trainable, allow_unused=True, materialize_grads=True)

    def utility_after_sgd_step(m: float) -> float:
        with torch.no_grad():
            for p, name, gr, gs in zip(trainable, names, g_rl, g_sft, strict=True):
                p.copy_(theta0[name] - ALPHA * ((1 - m) * gr + m * gs))
            return float(utility())

    eps = 0.25
    fd = (utility_after_sgd_step(mu + eps) - utility_after_sgd_step(mu - eps)) / (2 * eps)
    assert abs(fd) > 1e-9, "degenerate check: the surrogate does not depend on mu"
    assert logged["amft/meta_gradient"] == pytest.approx(fd, rel=2e-3)


def test_target_entropy_is_measured_on_image_demonstrations(tmp_path, vlm_dir, processor):
    """H* on image demonstrations equals the mean completion-token entropy of a plain forward of TRL's collated
    batch, images included, at the initial parameters (H* is measured before step 0's update)."""
    from transformers import AutoModelForImageTextToText

    from amft_trl.sft_data import InfiniteStream, _vision_example, vision_collator

    demos = image_addition_demos(8, seed=2)
    trainer = amft(
        tmp_path,
        vlm_dir,
        processor,
        sft_dataset=demos,
        meta_learning_rate=0.0,
        target_entropy_num_samples=4,
        max_steps=1,
    )
    trainer.train()
    logged = history(trainer, "amft/target_entropy")[0]
    indices = InfiniteStream(len(demos), seed=trainer.args.seed + 2).take(4)
    batch = vision_collator(processor, None)([_vision_example(demos[i], "images") for i in indices])
    labels = batch.pop("labels")
    model = AutoModelForImageTextToText.from_pretrained(vlm_dir).eval()
    with torch.no_grad():
        logprobs = torch.log_softmax(model(**batch).logits[:, :-1].double(), -1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    mask = labels[:, 1:] != -100
    assert logged == pytest.approx(float(entropy[mask].mean()), rel=1e-5)
    with torch.no_grad():  # and the images matter: without them (image tokens read as text) it differs
        blind = model.get_input_embeddings()(batch["input_ids"])
        logprobs = torch.log_softmax(
            model(inputs_embeds=blind, attention_mask=batch["attention_mask"]).logits[:, :-1].double(), -1
        )
    assert abs(float((-(logprobs.exp() * logprobs).sum(-1))[mask].mean()) - logged) > 1e-2


STRATEGIES = {
    "amft": dict(balancing="amft", meta_update_steps=1),
    "fixed": dict(balancing="fixed", mu_init=0.4),
    "sft_then_rl": dict(balancing="sft_then_rl", sft_warmup_steps=1),
    "chord": dict(balancing="chord", chord_mu_warmup_steps=1, chord_mu_decay_steps=2),
    "chord_phi": dict(
        balancing="chord", chord_mu_warmup_steps=1, chord_mu_decay_steps=2, chord_enable_phi_function=True
    ),
    "srft": dict(balancing="srft"),
}


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_every_strategy_trains_with_images(tmp_path, vlm_dir, processor, name):
    trainer = amft(
        tmp_path,
        vlm_dir,
        processor,
        sft_dataset=image_addition_demos(8, seed=2),
        val_dataset=image_addition_prompts(4, seed=3),
        meta_val_batch_size=2,
        target_entropy_num_samples=4,
        **STRATEGIES[name],
    )
    before = vision_params(trainer.model)
    trainer.train()
    assert len(history(trainer, "amft/mu")) == 2
    # sft_then_rl: step 0 is the SFT stage, step 1 RL; chord: mu reaches 0 after its decay
    assert history(trainer, "amft/sft_loss"), "no step trained on image demonstrations"
    assert history(trainer, "reward"), "no step trained on image rollouts"
    if name in ("amft", "fixed", "srft"):
        assert len(history(trainer, "amft/sft_loss")) == len(history(trainer, "reward")) == 2
    if name == "amft":
        assert len(history(trainer, "amft/meta_gradient")) == 2
    assert any(not torch.equal(before[n], p) for n, p in vision_params(trainer.model).items())


class StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def test_resume_with_images(tmp_path, vlm_dir, processor):
    def trainer(folder, callbacks=None):
        return amft(
            tmp_path / folder,
            vlm_dir,
            processor,
            callbacks=callbacks,
            sft_dataset=image_addition_demos(8, seed=2),
            balancing="fixed",
            mu_init=0.4,
            max_steps=3,
            save_strategy="steps",
            save_steps=2,
        )

    straight = trainer("a")
    straight.train()
    first = trainer("b", [StopAt(2)])
    first.train()
    second = trainer("b")
    second.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    assert history(second, "amft/sft_loss")[-1] == pytest.approx(
        history(straight, "amft/sft_loss")[-1], rel=1e-5
    )
    for (name, x), (_, y) in zip(
        straight.model.named_parameters(), second.model.named_parameters(), strict=True
    ):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=name)


# ---- 5. LoRA on the language model, vision tower frozen ----------------------------------------------------------
def test_lora_on_the_language_model_leaves_the_vision_tower_unchanged(tmp_path, vlm_dir, processor):
    from peft import LoraConfig

    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)", task_type="CAUSAL_LM"
    )
    trainer = amft(
        tmp_path,
        vlm_dir,
        processor,
        peft_config=lora,
        sft_dataset=image_addition_demos(8, seed=2),
        balancing="fixed",
        mu_init=0.5,
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    assert not any(p.requires_grad for n, p in trainer.model.named_parameters() if "vision_tower" in n)
    trainer.train()
    after = dict(trainer.model.named_parameters())
    vision = [n for n in before if "vision_tower" in n or "multi_modal_projector" in n]
    assert vision and all(torch.equal(before[n], after[n]) for n in vision)
    lora_names = [n for n in before if "lora_" in n]
    assert lora_names and all("language_model" in n for n in lora_names)
    assert any(not torch.equal(before[n], after[n]) for n in lora_names), "LoRA did not train"


# ---- the example script and its recipes -------------------------------------------------------------------------
def test_vlm_example_script_trains_the_tiny_vlm(tmp_path, vlm_dir):
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
    argv += ["--bf16", "false", "--use_cpu", "true", "--gradient_checkpointing", "false", "--max_steps", "2"]
    argv += ["--sft_warmup_steps", "1", "--meta_update_steps", "1", "--per_device_train_batch_size", "4"]
    argv += ["--gradient_accumulation_steps", "1", "--num_generations", "4", "--max_completion_length", "4"]
    argv += ["--meta_val_batch_size", "2", "--target_entropy_num_samples", "4", "--save_strategy", "no"]
    trainer = train_vlm.main(*train_vlm.parse_args(argv))
    assert trainer.state.global_step == 2 and len(trainer.sft_dataset) == 4
    assert not any(p.requires_grad for n, p in trainer.model.named_parameters() if is_vision(n))
    for recipe in ("llama32_vision_11b_paper.yaml",):
        script_args, training_args, _ = train_vlm.parse_args(
            [
                "--config",
                str(examples / recipe),
                "--dataset_name",
                "x",
                "--use_cpu",
                "true",
                "--output_dir",
                str(tmp_path),
            ]
        )
        assert training_args.max_steps == 500 and training_args.num_generations == 8


# ---- DDP and ZeRO with images (tests/_parallel_runner.py --vlm; subprocesses, slow) -------------------------------
@pytest.mark.slow
def test_two_processes_give_the_one_process_trajectory_with_images(tmp_path, vlm_dir):
    """The same global batch on 1 and 2 CPU processes (float64, SGD, GA 2, meta steps): same g_mu, mu, losses and
    parameters. Each process processes its own rows' images; the validation images are split like the prompts."""
    from _parallel_launch import _close, _run

    one = _run(vlm_dir, tmp_path / "one" / "r.json", "--float64", "--vlm")
    two = _run(vlm_dir, tmp_path / "two" / "r.json", "--float64", "--vlm", processes=2)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    meta = [g for g in one["meta_gradient"] if g is not None]
    assert len(meta) == 2 and all(g != 0 for g in meta)
    # g_mu is a small inner product (cancellation): 3e-6 relative here, against 1e-6 in the text version
    assert _close(one["meta_gradient"], two["meta_gradient"], 1e-5), (
        one["meta_gradient"],
        two["meta_gradient"],
    )
    assert _close(one["mu"], two["mu"], 1e-6)
    assert _close(one["sft_loss"], two["sft_loss"], 1e-6)
    # GRPO's loss is near 0 (advantages sum to 0): compared in absolute terms
    pairs = [
        (a, b) for a, b in zip(one["rl_loss"], two["rl_loss"], strict=True) if a is not None or b is not None
    ]
    assert len(pairs) == 3 and all(abs(a - b) < 1e-7 for a, b in pairs), (
        one["rl_loss"],
        two["rl_loss"],
    )
    assert math.isclose(one["param_checksum"], two["param_checksum"], rel_tol=1e-9), (
        one["param_checksum"],
        two["param_checksum"],
    )


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
@pytest.mark.parametrize("stage", [2, 3])
def test_meta_gradient_with_images_under_zero_matches_plain(tmp_path, vlm_dir, stage):
    """ZeRO-2/3, one process, meta steps on (GA 2, SGD), images everywhere: the plain run's g_mu, mu and losses
    (float32 rounding, as in tests/distributed/test_ddp_and_zero.py's text version)."""
    from _parallel_launch import _close, _plain_and_zero

    plain, zero = _plain_and_zero(vlm_dir, tmp_path, stage, "--sgd", "--max_steps=4", "--vlm")
    meta = [g for g in plain["meta_gradient"] if g is not None]
    assert len(meta) == 2 and all(g != 0 for g in meta)
    assert _close(plain["meta_gradient"], zero["meta_gradient"], 2e-2), (
        plain["meta_gradient"],
        zero["meta_gradient"],
    )
    assert _close(plain["mu"], zero["mu"], 3e-4)
    assert _close(plain["sft_loss"], zero["sft_loss"], 1e-4), (plain["sft_loss"], zero["sft_loss"])
    assert _close(plain["rl_loss"], zero["rl_loss"], 1e-4), (plain["rl_loss"], zero["rl_loss"])
