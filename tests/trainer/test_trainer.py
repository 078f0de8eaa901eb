"""AMFTTrainer behaviour: GRPO equivalence, warm-up, gradient-accumulation invariance, resume, metrics, data."""

from __future__ import annotations

import pytest
import torch
from conftest import digit_fraction_reward, grpo_kwargs, make_config, make_demos, make_prompts
from transformers import AutoModelForCausalLM, TrainerCallback

from amft_trl import AMFTTrainer

AMFT_METRICS = [
    "amft/mu",
    "amft/entropy",
    "amft/target_entropy",
    "amft/entropy_term",
    "amft/meta_term",
    "amft/meta_gradient",
    "amft/sft_loss",
    "amft/rl_loss",
    "amft/val_reward",
]


def build(tmp_path, tiny_model_dir, tokenizer, args, **datasets):
    datasets.setdefault("train_dataset", make_prompts(32, seed=1))
    return AMFTTrainer(
        model=tiny_model_dir,
        reward_funcs=[digit_fraction_reward],
        args=args,
        processing_class=tokenizer,
        **datasets,
    )


def history(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h]


def test_mu_pinned_to_zero_equals_grpo(tmp_path, tiny_model_dir, tokenizer, prompts):
    """mu = 0, no warm-up, no controller: the same parameters as TRL's GRPOTrainer, same seed and arguments."""
    from trl import GRPOConfig, GRPOTrainer

    common = grpo_kwargs(seed=7)
    amft_args = make_config(
        tmp_path / "amft",
        **common,
        mu_init=0.0,
        mu_min=0.0,
        mu_max=0.0,
        sft_warmup_steps=0,
        meta_learning_rate=0.0,
    )
    amft = build(tmp_path, tiny_model_dir, tokenizer, amft_args, train_dataset=prompts)
    amft.train()
    grpo = GRPOTrainer(
        model=tiny_model_dir,
        reward_funcs=[digit_fraction_reward],
        args=GRPOConfig(output_dir=str(tmp_path / "grpo"), **common),
        train_dataset=prompts,
        processing_class=tokenizer,
    )
    grpo.train()
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    changed = False
    for (name, a), (_, b) in zip(amft.model.named_parameters(), grpo.model.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{name} differs from GRPOTrainer")
        changed |= not torch.equal(a, initial[name])
    assert changed, "training did not move the parameters: the comparison would be vacuous"


def test_warmup_generates_nothing_and_sft_loss_falls(tmp_path, tiny_model_dir, tokenizer, demos, val_prompts):
    args = make_config(tmp_path, max_steps=8, sft_warmup_steps=6, learning_rate=5e-3, meta_update_steps=10)
    trainer = build(tmp_path, tiny_model_dir, tokenizer, args, sft_dataset=demos, val_dataset=val_prompts)
    generated_at = []
    original = trainer._generate_and_score_completions

    def spy(inputs):
        generated_at.append(trainer.state.global_step)
        return original(inputs)

    trainer._generate_and_score_completions = spy
    trainer.train()
    assert generated_at and min(generated_at) == 6, f"generation during warm-up: {generated_at}"
    mu = history(trainer, "amft/mu")
    assert mu[:6] == [1.0] * 6 and mu[6] == pytest.approx(0.5)
    sft = history(trainer, "amft/sft_loss")
    assert sft[5] < sft[0] - 0.5, f"SFT loss did not fall during warm-up: {sft[:6]}"
    # H* is measured after the warm-up, on the warmed-up policy
    assert trainer.strategy.target_entropy is not None
    assert history(trainer, "amft/target_entropy")[0] == pytest.approx(trainer.strategy.target_entropy)


def test_all_metrics_logged_and_validation_isolated(tmp_path, tiny_model_dir, tokenizer, demos):
    from datasets import Dataset

    val = Dataset.from_list([{"prompt": f"Validate {i} + {i} ="} for i in range(8)])
    args = make_config(tmp_path, max_steps=3, meta_update_steps=2, log_completions=False)
    trainer = build(tmp_path, tiny_model_dir, tokenizer, args, sft_dataset=demos, val_dataset=val)
    seen_prompts = []
    original_log = AMFTTrainer.log

    def log(self, logs, start_time=None):
        seen_prompts.extend(self._logs["prompt"])
        return original_log(self, logs, start_time)

    trainer.log = log.__get__(trainer)
    trainer.train()
    logged = set().union(*[h.keys() for h in trainer.state.log_history])
    missing = [m for m in AMFT_METRICS if m not in logged]
    assert not missing, f"metrics not logged: {missing}"
    assert len(history(trainer, "amft/meta_gradient")) == 2  # steps 0 and 2
    assert seen_prompts and not any("Validate" in str(p) for p in seen_prompts), "validation rollouts leaked"
    # the training reward is the training rollouts' only: one value per step, logged every step
    assert len(history(trainer, "reward")) == 3
    # the token count is the training rollouts' only: the last step (2) is a meta step, whose validation rollouts
    # come after the training generation that logged `num_tokens`
    assert trainer.state.num_input_tokens_seen == history(trainer, "num_tokens")[-1]


def _trajectory(trainer):
    return {
        "mu": [h["mu"] for h in trainer.strategy.state.history],
        "sft_loss": history(trainer, "amft/sft_loss"),
        "rl_loss": history(trainer, "amft/rl_loss"),
        "entropy": history(trainer, "amft/entropy"),
        "meta_gradient": history(trainer, "amft/meta_gradient"),
    }


def test_gradient_accumulation_invariance(tmp_path, tiny_model_dir, tokenizer, demos, val_prompts):
    """Per-device batch 4 x accumulation 1 and 2 x 2: same losses and mu trajectory."""
    runs = []
    for bs, ga in [(4, 1), (2, 2)]:
        args = make_config(
            tmp_path / f"{bs}x{ga}",
            per_device_train_batch_size=bs,
            gradient_accumulation_steps=ga,
            num_generations=2,
            max_steps=4,
            sft_warmup_steps=1,
            meta_update_steps=2,
            meta_gradient_form="raw",
            meta_learning_rate=50.0,
            entropy_learning_rate=0.05,
            sft_per_device_train_batch_size=4 // ga,
        )
        trainer = build(tmp_path, tiny_model_dir, tokenizer, args, sft_dataset=demos, val_dataset=val_prompts)
        trainer.train()
        runs.append(_trajectory(trainer))
    a, b = runs
    assert len(a["mu"]) == 3 and len(set(a["mu"])) > 1, "mu did not move: the comparison would be vacuous"
    for key in a:
        assert len(a[key]) == len(b[key]), key
        assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key


TOKEN_KEYS = ("amft/sft_tokens", "amft/completion_tokens", "amft/val_completion_tokens")


def test_token_counts_are_logged_cumulatively(
    tmp_path, tiny_model_dir, tokenizer, demos, val_prompts, monkeypatch
):
    """`amft/*_tokens` (what `amft-compare` reads for its budgets): the demonstration tokens of the SFT batches drawn,
    and the completion tokens of the training and of the validation rollouts, each counted independently here."""
    from trl import GRPOTrainer

    from amft_trl.sft_data import InfiniteStream

    counted = {"amft/completion_tokens": 0.0, "amft/val_completion_tokens": 0.0}
    per_step = []
    original = GRPOTrainer._generate_and_score_completions

    def counting(self, inputs):
        out = original(self, inputs)
        key = "amft/val_completion_tokens" if self._generation.validation else "amft/completion_tokens"
        counted[key] += float(out["completion_mask"].sum())
        return out

    monkeypatch.setattr(GRPOTrainer, "_generate_and_score_completions", counting)
    args = make_config(tmp_path, max_steps=3, sft_warmup_steps=1, meta_update_steps=2)
    trainer = build(tmp_path, tiny_model_dir, tokenizer, args, sft_dataset=demos, val_dataset=val_prompts)

    class Record(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if "loss" in logs:
                per_step.append({k: logs[k] for k in TOKEN_KEYS})

    trainer.add_callback(Record())
    trainer.train()
    drawn = InfiniteStream(len(trainer.sft_dataset), seed=args.seed).take(
        3 * args.per_device_train_batch_size
    )
    sft = float(sum(len(trainer.sft_dataset[i]["completion_ids"]) for i in drawn))
    assert per_step[-1] == {"amft/sft_tokens": sft, **counted}
    assert counted["amft/val_completion_tokens"] > 0 and counted["amft/completion_tokens"] > 0
    assert per_step[0]["amft/completion_tokens"] == 0  # the warm-up step generates nothing
    assert [s["amft/sft_tokens"] for s in per_step] == sorted({s["amft/sft_tokens"] for s in per_step})


class StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


def test_resume_gives_identical_mu_trajectory(tmp_path, tiny_model_dir, tokenizer, demos, val_prompts):
    common = dict(
        max_steps=6,
        sft_warmup_steps=1,
        meta_update_steps=2,
        entropy_learning_rate=0.05,
        meta_learning_rate=0.05,
        save_strategy="steps",
        save_steps=3,
    )

    def trainer(name):
        args = make_config(tmp_path / name, **common)
        return build(tmp_path, tiny_model_dir, tokenizer, args, sft_dataset=demos, val_dataset=val_prompts)

    straight = trainer("a")
    straight.train()
    first = trainer("b")
    first.add_callback(StopAt(3))  # interrupted at the checkpoint, same 6-step schedule
    first.train()
    second = trainer("b")
    second.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-3"))

    mu_straight = [h["mu"] for h in straight.strategy.state.history]
    mu_resumed = [h["mu"] for h in second.strategy.state.history]
    for key in TOKEN_KEYS:  # the cumulative token counts continue from the checkpoint's
        logged = [[h[key] for h in t.state.log_history if key in h] for t in (straight, second)]
        assert logged[1][-1] == logged[0][-1] > 0, key
    assert len(mu_straight) == 5 and len(set(mu_straight)) > 1
    assert mu_resumed == pytest.approx(mu_straight, rel=1e-6)
    for (name, a), (_, b) in zip(
        straight.model.named_parameters(), second.model.named_parameters(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_resume_from_foreign_checkpoint_fails_clearly(
    tmp_path, tiny_model_dir, tokenizer, demos, val_prompts
):
    args = make_config(
        tmp_path / "c", max_steps=2, save_strategy="steps", save_steps=1, meta_learning_rate=0.0
    )
    trainer = build(tmp_path, tiny_model_dir, tokenizer, args, sft_dataset=demos)
    trainer.train()
    (tmp_path / "c" / "checkpoint-1" / "amft_state.json").unlink()
    again = build(tmp_path, tiny_model_dir, tokenizer, args, sft_dataset=demos)
    with pytest.raises(FileNotFoundError, match="amft_state.json"):
        again.train(resume_from_checkpoint=str(tmp_path / "c" / "checkpoint-1"))


def test_mu_pinned_to_one_is_sft_only(tmp_path, tiny_model_dir, tokenizer, demos):
    args = make_config(tmp_path, mu_init=1.0, mu_min=1.0, mu_max=1.0, max_steps=2)
    trainer = build(tmp_path, tiny_model_dir, tokenizer, args, sft_dataset=demos)
    trainer._generate_and_score_completions = lambda inputs: pytest.fail(
        "rollouts generated with mu pinned to 1"
    )
    trainer.train()
    assert history(trainer, "amft/sft_loss") and not history(trainer, "amft/rl_loss")


@pytest.mark.parametrize("fmt", ["standard", "conversational", "messages"])
def test_sft_tokenization_masks_the_prompt(tmp_path, tiny_model_dir, tokenizer, fmt):
    from datasets import Dataset

    if fmt == "standard":
        rows = [{"prompt": "Compute 2 + 3 =", "completion": " 5."}]
        expected = " 5.<|end|>"
    elif fmt == "conversational":
        rows = [
            {
                "prompt": [{"role": "user", "content": "Compute 2 + 3 ="}],
                "completion": [{"role": "assistant", "content": " 5."}],
            }
        ]
        expected = " 5.<|end|>"
    else:
        rows = [
            {
                "messages": [
                    {"role": "user", "content": "Compute 2 + 3 ="},
                    {"role": "assistant", "content": " 5."},
                ]
            }
        ]
        expected = " 5.<|end|>"
    args = make_config(tmp_path, meta_learning_rate=0.0)
    trainer = build(tmp_path, tiny_model_dir, tokenizer, args, sft_dataset=Dataset.from_list(rows))
    example = trainer.sft_dataset[0]
    assert tokenizer.decode(example["completion_ids"]) == expected
    assert "Compute 2 + 3 =" in tokenizer.decode(example["prompt_ids"])


def test_sft_stats_at_temperature_one_regardless_of_sampling_temperature(
    tmp_path, tiny_model_dir, tokenizer, demos, val_prompts
):
    """The plain-logits path (sampling temperature != 1) and TRL's fused head (temperature 1) agree."""
    from amft_trl.sft_data import collate_sft

    fused = build(
        tmp_path,
        tiny_model_dir,
        tokenizer,
        make_config(tmp_path / "t1"),
        sft_dataset=demos,
        val_dataset=val_prompts,
    )
    plain = build(
        tmp_path,
        tiny_model_dir,
        tokenizer,
        make_config(tmp_path / "t07", temperature=0.7),
        sft_dataset=demos,
        val_dataset=val_prompts,
    )
    batch = collate_sft([fused.sft_dataset[i] for i in range(4)], tokenizer.pad_token_id)
    with torch.no_grad():
        lp_a, ent_a = fused.sft_term.token_stats(fused.model, batch, compute_entropy=True)
        lp_b, ent_b = plain.sft_term.token_stats(plain.model, batch, compute_entropy=True)
    mask = batch.completion_mask.bool()
    torch.testing.assert_close(lp_a[mask], lp_b[mask], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ent_a[mask], ent_b[mask], rtol=1e-4, atol=1e-4)


def test_conversational_end_to_end(tmp_path, tiny_model_dir, tokenizer):
    args = make_config(tmp_path, max_steps=2, meta_update_steps=1)
    trainer = build(
        tmp_path,
        tiny_model_dir,
        tokenizer,
        args,
        train_dataset=make_prompts(16, seed=1, conversational=True),
        sft_dataset=make_demos(16, seed=2, conversational=True),
        val_dataset=make_prompts(8, seed=3, conversational=True),
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    assert len(history(trainer, "amft/meta_gradient")) == 2


def test_non_finite_entropy_is_skipped_counted_and_logged(tmp_path, tiny_model_dir, tokenizer, demos, caplog):
    args = make_config(tmp_path, max_steps=3, meta_learning_rate=0.0, entropy_learning_rate=0.1)
    trainer = build(tmp_path, tiny_model_dir, tokenizer, args, sft_dataset=demos)
    record = trainer.strategy.record

    def corrupt(measurements):
        measurements.entropy = float("nan")
        record(measurements)

    trainer.strategy.record = corrupt
    trainer.train()
    assert [h["mu"] for h in trainer.strategy.state.history] == [0.5, 0.5, 0.5]
    assert history(trainer, "amft/skipped_nonfinite")[-1] == 3.0
    assert "non-finite entropy" in caplog.text


def test_rollout_rewards_by_hand():
    """The reward each strategy reads (ReLIFT's failures, LUFFY's logged demonstration reward, the group rewards):
    weighted and summed as GRPOTrainer sums them, a NaN function skipped, NaN when no function scored the row."""
    import torch

    from amft_trl.trainer import rollout_rewards

    nan = float("nan")
    rewards = torch.tensor([[1.0, 2.0], [nan, 2.0], [nan, nan], [0.0, -1.0]])
    total = rollout_rewards(rewards, torch.tensor([1.0, 0.5]))
    assert total[[0, 1, 3]].tolist() == [2.0, 1.0, -0.5] and torch.isnan(total[2])
