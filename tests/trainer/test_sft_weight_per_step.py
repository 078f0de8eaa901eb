"""The SFT weight each optimizer step really applies equals the `amft/mu` it logs, for every strategy and for the
GRPO layouts that split or reuse a generation batch (`gradient_accumulation_steps`, `steps_per_generation`,
`num_iterations`); and no step logged as training on demonstrations is taken on a zero gradient.

"Applied" is read from the backward passes themselves: a hook on the demonstration tokens' log-probabilities
receives d(loss)/d(log p_t) = -c_t, the coefficient of each token's NLL in what was backpropagated (all micro-steps,
the strategy's per-token and per-prompt weights, the step's normaliser). Their sum over a step is the SFT weight
that step trained with: mu for a token-mean SFT loss, mu times the mean token weight for CHORD-phi and SRFT, and for
HPT its `hpt_sft_coef` on the token mean of the demonstrations the step owns.
"""

from __future__ import annotations

import re
import threading
from typing import ClassVar

import pytest
import torch
from _simulated_processes import _Board, _FakeAccelerator
from conftest import build_trainer, digit_fraction_reward, make_config, make_prompts
from datasets import Dataset
from transformers import TrainerCallback

from amft_trl import AMFTTrainer
from amft_trl.attached_demonstrations import AttachedDemonstrations
from amft_trl.balancing import BalancingStrategy, HPTStrategy, RolloutBatch, StepPlan


def _operand(prompt: str) -> int:
    return int(re.search(r"Compute (\d+)", prompt).group(1))


def _prompts_with_demonstrations(n: int = 32, seed: int = 1) -> Dataset:
    rows = []
    for row in make_prompts(n, seed=seed):
        demonstration = f" {row['answer']}. The answer is {row['answer']}."
        rows.append({**row, "demonstration": demonstration, "parity": _operand(row["prompt"]) % 2})
    return Dataset.from_list(rows)


def parity_reward(completions, parity, **kwargs):
    """1.0 on every rollout of an even prompt, below 1 on odd ones: HPT sends exactly the odd prompts to SFT."""
    varied = digit_fraction_reward(completions)
    return [1.0 if p == 0 else 0.9 * v for p, v in zip(parity, varied, strict=True)]


def always_wrong(completions, **kwargs):
    """Every rollout fails: HPT sends every prompt to SFT (and GRPO's advantages are all 0)."""
    return [0.0] * len(completions)


class AppliedWeights(TrainerCallback):
    """Per optimizer step: the summed NLL coefficients the SFT backward passes applied, the demonstrations trained
    (their decoded completions), and the squared norm of the gradient the optimizer stepped on."""

    def __init__(self, trainer):
        self.applied, self.grad_sq, self.demonstrations = [], [], []
        self._applied, self._demonstrations = 0.0, []
        self.tokenizer = trainer.processing_class
        stats = trainer.sft_term.token_stats

        def spy(model, batch, compute_entropy):
            logps, entropies = stats(model, batch, compute_entropy)
            if logps.requires_grad:
                logps.register_hook(self._record)
                self._demonstrations.append(batch)
            return logps, entropies

        trainer.sft_term.token_stats = spy

    def _record(self, grad: torch.Tensor) -> None:
        self._applied += float(-grad.double().sum())

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.applied.append(self._applied)
        self.grad_sq.append(
            sum(float(p.grad.double().pow(2).sum()) for p in model.parameters() if p.grad is not None)
        )
        self.demonstrations.append(self._demonstrations)
        self._applied, self._demonstrations = 0.0, []


STRATEGIES = {
    "amft": dict(balancing="amft", sft_warmup_steps=1, mu_init=0.3, meta_update_steps=2),
    "fixed": dict(balancing="fixed", mu_init=0.4, sft_warmup_steps=1),
    "sft_then_rl": dict(balancing="sft_then_rl", sft_warmup_steps=2),
    "chord": dict(balancing="chord", chord_mu_warmup_steps=1, chord_mu_decay_steps=2, chord_mu_valley=0.2),
    "chord_phi": dict(
        balancing="chord",
        chord_mu_warmup_steps=1,
        chord_mu_decay_steps=2,
        chord_mu_valley=0.2,
        chord_enable_phi_function=True,
    ),
    "srft": dict(balancing="srft"),
    "hpt": dict(balancing="hpt", hpt_success_reward=0.95, hpt_sft_coef=0.7),
}

# (gradient_accumulation_steps, steps_per_generation, num_iterations): a generation batch over 2 optimizer steps of 1
# or 2 micro-steps, and one reused for a second iteration
LAYOUTS = [(1, 2, 1), (2, 4, 1), (2, 2, 2)]


def _run(tmp_path, tiny_model_dir, tokenizer, reward, **overrides):
    trainer = build_trainer(
        tmp_path,
        tiny_model_dir,
        tokenizer,
        reward_funcs=[reward],
        train_dataset=_prompts_with_demonstrations(),
        val_dataset=make_prompts(8, seed=3),
        **overrides,
    )
    spy = AppliedWeights(trainer)
    trainer.add_callback(spy)
    trainer.train()
    mu = [h["amft/mu"] for h in trainer.state.log_history if "amft/mu" in h]
    return trainer, spy, mu


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: "ga{}-spg{}-it{}".format(*x))
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_each_step_applies_the_sft_weight_it_logs(tmp_path, tiny_model_dir, tokenizer, name, layout):
    ga, spg, iterations = layout
    reward = parity_reward if name == "hpt" else digit_fraction_reward
    _, spy, mu = _run(
        tmp_path,
        tiny_model_dir,
        tokenizer,
        reward,
        max_steps=4,
        gradient_accumulation_steps=ga,
        steps_per_generation=spg,
        num_iterations=iterations,
        **STRATEGIES[name],
    )
    assert len(mu) == len(spy.applied) == 4
    assert spy.applied == pytest.approx(mu, rel=1e-5, abs=1e-9), (spy.applied, mu)
    for step, (weight, grad_sq) in enumerate(zip(mu, spy.grad_sq, strict=True)):
        if weight > 0:
            assert grad_sq > 0, f"step {step + 1} logs mu={weight} but its gradient is zero"
    assert any(0 < w for w in mu), "no step trained on demonstrations: the check would be vacuous"
    if name == "hpt":  # hpt_sft_coef on a step that trains a demonstration, 0 on one that trains none
        assert all(m == 0.0 or m == pytest.approx(0.7) for m in mu), mu


@pytest.mark.parametrize("iterations", [1, 2])
def test_hpt_trains_each_failing_prompt_once_per_pass_on_its_own_step(
    tmp_path, tiny_model_dir, tokenizer, iterations
):
    """Issue 20's repro: every prompt fails, a generation batch of 2 prompts spans 2 optimizer steps. Each step owns
    one prompt and trains its demonstration at the full weight (before the fix: one step twice the SFT loss, the
    other a zero-gradient step logged as mu = 0); with `num_iterations=2` each pass trains it again."""
    trainer, spy, mu = _run(
        tmp_path,
        tiny_model_dir,
        tokenizer,
        always_wrong,
        balancing="hpt",
        max_steps=4,
        steps_per_generation=2,
        num_iterations=iterations,
    )
    assert mu == [1.0, 1.0, 1.0, 1.0]
    assert spy.applied == pytest.approx([1.0] * 4, rel=1e-6)
    assert all(g > 0 for g in spy.grad_sq)
    fractions = [h["amft/hpt_sft_fraction"] for h in trainer.state.log_history if "amft/mu" in h]
    assert fractions == [1.0] * 4

    def trained(step):
        (batch,) = spy.demonstrations[step]  # one SFT forward: one micro-step
        assert batch.completion_ids.size(0) == 1  # the step's one prompt
        return tokenizer.decode(batch.completion_ids[0][batch.completion_mask[0].bool()])

    demos = [trained(s) for s in range(4)]
    if iterations == 1:  # two generation batches of two prompts each: each step trains a different prompt
        assert demos[0] != demos[1] and demos[2] != demos[3]
    else:  # one generation batch, two passes over it: the same two demonstrations, once each per pass
        assert demos[0] != demos[1] and demos[:2] == demos[2:]


@pytest.mark.parametrize("ga, spg", [(2, 1), (2, 3)])
def test_hpt_refuses_a_step_that_spans_two_generation_batches(tmp_path, tiny_model_dir, tokenizer, ga, spg):
    with pytest.raises(ValueError, match=rf"`steps_per_generation` \({spg}\) must be a multiple of"):
        build_trainer(
            tmp_path,
            tiny_model_dir,
            tokenizer,
            reward_funcs=[parity_reward],
            train_dataset=_prompts_with_demonstrations(),
            balancing="hpt",
            gradient_accumulation_steps=ga,
            steps_per_generation=spg,
            per_device_train_batch_size=4,
        )


# ---- a strategy of the attached-demonstrations shape, written outside the package (LUFFY's shape) -------------


class ImitateEveryOtherPrompt(BalancingStrategy):
    """Trains the demonstration of every prompt whose rollouts all scored below 1 (here: the odd ones) at weight 0.5,
    and GRPO on all rollouts: a `train_column` strategy is its gate and its plan, and nothing in the trainer."""

    name: ClassVar[str] = "imitate_odd"
    sft_source: ClassVar[str] = "train_column"
    demonstration_column = "demonstration"

    def plan_after_warmup(self, global_step: int) -> StepPlan:
        return StepPlan(rl_weight=1.0, sft_weight=0.5, rl=True, sft=False)

    def sft_gate(self, rollouts: RolloutBatch) -> torch.Tensor:
        return (rollouts.group_rewards < 1.0).all(dim=1)


class BothPlans(ImitateEveryOtherPrompt):
    def plan_after_warmup(self, global_step: int) -> StepPlan:
        return StepPlan(rl_weight=1.0, sft_weight=0.5, rl=True, sft=True)


def _custom(tmp_path, tiny_model_dir, tokenizer, strategy, **overrides):
    return AMFTTrainer(
        model=tiny_model_dir,
        reward_funcs=[parity_reward],
        args=make_config(tmp_path, **overrides),
        train_dataset=_prompts_with_demonstrations(),
        processing_class=tokenizer,
        strategy=strategy,
    )


def test_a_strategy_attaching_demonstrations_needs_no_trainer_change(tmp_path, tiny_model_dir, tokenizer):
    trainer = _custom(
        tmp_path, tiny_model_dir, tokenizer, ImitateEveryOtherPrompt(), max_steps=4, steps_per_generation=2
    )
    spy = AppliedWeights(trainer)
    trainer.add_callback(spy)
    trainer.train()
    mu = [h["amft/mu"] for h in trainer.state.log_history if "amft/mu" in h]
    assert spy.applied == pytest.approx(mu, rel=1e-5, abs=1e-9)
    assert set(mu) == {0.0, 0.5}, mu  # each step owns one prompt: odd (imitated) or even (not)
    for step, batches in enumerate(spy.demonstrations):
        trained = [tokenizer.decode(b.completion_ids[0][b.completion_mask[0].bool()]) for b in batches]
        assert len(trained) == (1 if mu[step] else 0)
        if trained:  # the odd operand's answer: "<a + b>. The answer is <a + b>."
            assert trained[0].startswith(" ") and "The answer is" in trained[0]


def test_a_plan_with_both_rollouts_and_an_sft_dataset_batch_is_refused(tmp_path, tiny_model_dir, tokenizer):
    trainer = _custom(tmp_path, tiny_model_dir, tokenizer, BothPlans(), max_steps=1)
    with pytest.raises(RuntimeError, match=r"plan sft=False on steps with rollouts"):
        trainer.train()


# ---- the rule itself, on 1 and on 2 (simulated) processes ------------------------------------------------------


def _plan_on(world, rows, rewards, accumulation, steps_per_generation, passes, group=4, tokenize=None):
    """Every micro-step of `passes` passes over one generation batch, on each of `world` processes: per micro-step
    and process, the demonstrations trained (weight 1), whether an SFT forward runs, its normaliser x processes."""
    board, out = _Board(world), [None] * world
    local = len(rows) // world

    def process(rank):
        attached = AttachedDemonstrations(
            HPTStrategy("demonstration", success_reward=1.0),
            _FakeAccelerator(rank, world, board),
            tokenize
            or (
                lambda prompt, demonstration: {"prompt_ids": [1], "completion_ids": [2] * len(demonstration)}
            ),
            pad_token_id=0,
            eos_token_id=3,
            gradient_accumulation_steps=accumulation,
            steps_per_generation=steps_per_generation,
            num_generations=group,
        )
        mine = slice(rank * local, (rank + 1) * local)
        reward = torch.tensor(rewards)
        attached.generation(
            rows[mine],
            {
                "advantages": torch.zeros(local),
                "amft_reward": reward[mine],
                "amft_group_rewards": reward.view(-1, group).repeat_interleave(group, dim=0)[mine],
                "completion_mask": torch.ones(local, 2),
            },
        )
        seen = []
        for _ in range(steps_per_generation * passes):
            micro = attached.micro_step()
            trained, ran, scale = [], micro.sft is not None, None
            if ran:
                lengths = micro.sft.batch.completion_mask.sum(dim=1)
                trained = [int(n) for n, w in zip(lengths, micro.sft.row_weights, strict=True) if w > 0]
                scale = micro.sft.normalizer * world
            seen.append((micro.prompts, micro.prompts_to_sft, trained, ran, scale))
        out[rank] = seen

    threads = [threading.Thread(target=process, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_the_rule_deals_each_gated_prompt_to_one_step_the_same_on_one_and_two_processes():
    """8 prompts x 4 rollouts over K = 2 steps of 2 micro-steps, twice (`num_iterations=2`); the odd prompts fail.
    Prompt q is trained at step q mod 2 of each pass, each process runs the same forwards, and 2 processes train the
    same demonstrations per step with the same normaliser as 1. Demonstration q has q + 1 tokens (to tell them apart)."""
    group, prompts = 4, 8
    rows = [{"prompt": f"p{q}", "demonstration": "x" * (q + 1)} for q in range(prompts) for _ in range(group)]
    rewards = [0.0 if q % 2 else 1.0 for q in range(prompts) for _ in range(group)]
    one = _plan_on(1, rows, rewards, accumulation=2, steps_per_generation=4, passes=2)[0]
    two = _plan_on(2, rows, rewards, accumulation=2, steps_per_generation=4, passes=2)

    def step_tokens(step):  # step k owns the prompts q = k mod 2; only the odd ones are trained
        return sum(q + 1 for q in range(prompts) if q % 2 == 1 and q % 2 == step % 2)

    for step in range(4):  # two passes of two steps
        micro = (2 * step, 2 * step + 1)
        assert sum(one[m][0] for m in micro) == 4  # the prompts it owns
        assert sum(one[m][1] for m in micro) == (4 if step % 2 else 0)  # of them sent to SFT
        trained = sorted(t for m in micro for t in one[m][2])
        assert trained == ([2, 4, 6, 8] if step % 2 else [])  # demonstrations of q = 1, 3, 5, 7
        assert trained == sorted(t for r in range(2) for m in micro for t in two[r][m][2])
        assert sum(two[r][m][0] for r in range(2) for m in micro) == 4
        for m in micro:
            assert one[m][3] == two[0][m][3] == two[1][m][3] == bool(step % 2)  # the same forwards everywhere
            if one[m][3]:
                assert one[m][4] == two[0][m][4] == two[1][m][4] == step_tokens(step)
    # dealt in prompt order to the step's micro-steps in turn: q = 1, 5 then q = 3, 7 on one process
    assert (one[2][2], one[3][2]) == ([2, 6], [4, 8])
    # on two, each deals its own: process 0 holds q = 0..3, process 1 q = 4..7
    assert (two[0][2][2], two[0][3][2], two[1][2][2], two[1][3][2]) == ([2], [4], [6], [8])


def test_the_normaliser_counts_only_the_tokens_trained_on():
    """A multi-turn demonstration's tool replies are not trained on (`assistant_mask`, the batch's `tool_mask`), so the
    step's normaliser, the per-token average of the NLL, counts the assistant's tokens only: 2 of each demonstration's
    5 here, on one process and on two."""

    def tokenize(prompt, demonstration):
        return {"prompt_ids": [1], "completion_ids": [2, 4, 4, 2, 3], "assistant_mask": [1, 0, 0, 0, 1]}

    group, prompts = 4, 4
    rows = [{"prompt": f"p{q}", "demonstration": "x"} for q in range(prompts) for _ in range(group)]
    rewards = [0.0] * (prompts * group)  # every prompt fails: every demonstration is trained
    for world in (1, 2):
        seen = _plan_on(world, rows, rewards, 1, 1, 1, group=group, tokenize=tokenize)
        for rank in range(world):
            (_, _, trained, ran, scale) = seen[rank][0]
            assert ran and scale == 2 * prompts  # not 5 * prompts, the completion tokens
        assert sum(len(seen[r][0][2]) for r in range(world)) == prompts
