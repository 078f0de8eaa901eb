"""The balancing strategies' formulas, plans and config checks, without a trainer (hand computations)."""

from __future__ import annotations

import logging
import math
from typing import ClassVar

import pytest
import torch
from datasets import Dataset

from amft_trl import AMFTConfig
from amft_trl.balancing import (
    STRATEGIES,
    BalancingStrategy,
    FixedMuStrategy,
    SFTThenRLStrategy,
    StepMeasurements,
    StepPlan,
    build_strategy,
    get_strategy_class,
)
from amft_trl.balancing.chord import CHORDStrategy, chord_mu, chord_phi
from amft_trl.balancing.hpt import hpt_gate
from amft_trl.balancing.srft import sequence_entropy, srft_rollout_advantages, srft_sft_weights


def config(tmp_path, **kwargs):
    defaults = dict(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False)
    defaults.update(kwargs)
    return AMFTConfig(**defaults)


# ---- CHORD ------------------------------------------------------------------------------------------------------
def test_chord_mu_schedule_by_hand():
    # W = 4, D = 8, peak 0.8, valley 0.1
    expected = {
        0: 0.0,
        1: 0.2,
        3: 0.6,
        4: 0.8,  # cos(0) = 1: the peak
        8: 0.1 + 0.7 * 0.5 * (1 + math.cos(math.pi * 4 / 8)),  # half-way: (peak + valley) / 2
        11: 0.1 + 0.7 * 0.5 * (1 + math.cos(math.pi * 7 / 8)),
        12: 0.1,
        100: 0.1,
    }
    for t, mu in expected.items():
        assert chord_mu(t, 4, 8, 0.8, 0.1) == pytest.approx(mu, abs=1e-12), t
    assert chord_mu(8, 4, 8, 0.8, 0.1) == pytest.approx(0.45)
    # no warm-up, no decay: the valley from step 0
    assert chord_mu(0, 0, 0, 0.9, 0.3) == 0.3


def test_chord_phi_is_p_times_one_minus_p_and_carries_no_gradient():
    logps = torch.log(torch.tensor([[0.5, 0.9, 0.1]])).requires_grad_()
    phi = chord_phi(logps)
    torch.testing.assert_close(phi, torch.tensor([[0.25, 0.09, 0.09]]))
    assert not phi.requires_grad
    strategy = CHORDStrategy(0, 0, 0.5, 0.5, enable_phi_function=False)
    assert strategy.sft_token_weights(logps, None, torch.ones(1, 3)) is None


# ---- SRFT -------------------------------------------------------------------------------------------------------
def test_srft_weights_on_a_hand_built_batch():
    entropies = torch.tensor([[1.0, 3.0, 9.0], [0.5, 0.5, 0.5]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])  # the 9.0 is padding
    h = sequence_entropy(entropies, mask)
    torch.testing.assert_close(h, torch.tensor([2.0, 0.5]))
    w = srft_sft_weights(entropies, mask, coef=0.5)
    torch.testing.assert_close(w[0], torch.full((3,), 0.5 * math.exp(-2.0)))
    torch.testing.assert_close(w[1], torch.full((3,), 0.5 * math.exp(-0.5)))

    rewards = torch.tensor([1.0, 0.0, float("nan"), -1.0])
    ent = torch.tensor([[2.0, 2.0], [1.0, 1.0], [1.0, 1.0], [0.3, 0.3]])
    adv = srft_rollout_advantages(rewards, ent, torch.ones(4, 2), coef=0.1)
    torch.testing.assert_close(adv, torch.tensor([0.1 * math.exp(2.0), -1.0, 0.0, -1.0]))


def test_srft_rollout_weight_cap(tmp_path):
    # H = 5.7 nats per token: 0.1 exp(H) = 29.9, the weight a high-entropy model's positive rollouts get
    rewards = torch.tensor([1.0, 1.0, 0.0, float("nan")])
    ent = torch.tensor([[5.7, 5.7], [1.0, 1.0], [5.7, 5.7], [5.7, 5.7]])
    mask = torch.ones(4, 2)
    uncapped = srft_rollout_advantages(rewards, ent, mask, coef=0.1)
    assert uncapped[0].item() == pytest.approx(0.1 * math.exp(5.7)) and uncapped[0].item() > 29
    capped = srft_rollout_advantages(rewards, ent, mask, coef=0.1, max_weight=2.0)
    # the cap takes the high-entropy positive rollout down to 2; a weight below it and the negatives are unchanged
    torch.testing.assert_close(capped, torch.tensor([2.0, 0.1 * math.exp(1.0), -1.0, 0.0]))

    # from the config, through the strategy the trainer builds
    from amft_trl.balancing.base import RolloutBatch

    batch = RolloutBatch(
        advantages=torch.zeros(4),
        rewards=rewards,
        group_rewards=rewards.repeat(4, 1),
        completion_mask=mask,
        entropies=ent,
    )
    default = build_strategy(config(tmp_path, balancing="srft"))
    assert default.rl_weight_max is None  # the paper's rule by default
    torch.testing.assert_close(default.rl_advantages(batch), uncapped)
    strategy = build_strategy(config(tmp_path, balancing="srft", srft_rl_weight_max=2.0))
    torch.testing.assert_close(strategy.rl_advantages(batch), capped)


# ---- HPT --------------------------------------------------------------------------------------------------------
def test_hpt_gate_counts_correct_rollouts_with_at_most():
    group = torch.tensor(
        [
            [0.0, 0.0, 0.0, 0.0],  # accuracy 0
            [1.0, 0.0, 0.0, 0.0],  # 0.25
            [1.0, 1.0, 0.0, float("nan")],  # 0.5 (NaN counts as wrong)
            [1.5, 1.0, 1.0, 1.0],  # 1.0 (>= success reward)
        ]
    )
    assert hpt_gate(group, success_reward=1.0, threshold=0.0).tolist() == [True, False, False, False]
    assert hpt_gate(group, success_reward=1.0, threshold=0.25).tolist() == [True, True, False, False]
    assert hpt_gate(group, success_reward=1.2, threshold=0.25).tolist() == [True, True, True, True]


# ---- plans -------------------------------------------------------------------------------------------------------
def test_mu_family_plans():
    fixed = FixedMuStrategy(mu=0.3, sft_warmup_steps=2)
    assert [fixed.plan(t).warmup for t in range(4)] == [True, True, False, False]
    p = fixed.plan(2)
    assert (p.rl_weight, p.sft_weight, p.rl, p.sft) == (pytest.approx(0.7), 0.3, True, True)
    switch = SFTThenRLStrategy(sft_warmup_steps=3)
    assert switch.plan(2).warmup and not switch.plan(2).rl
    after = switch.plan(3)
    assert (after.rl_weight, after.sft_weight, after.rl, after.sft) == (1.0, 0.0, True, False)
    chord = CHORDStrategy(2, 2, 0.6, 0.2)
    assert chord.plan(0).sft is False and chord.plan(0).rl_weight == 1.0  # mu = 0: no SFT batch at all
    assert chord.plan(2).sft_weight == pytest.approx(0.6)


# ---- the SFT warm-up, planned by the base class -------------------------------------------------------------------
class _EveryOtherStep(BalancingStrategy):
    """A strategy written without any warm-up code: it plans only the steps after the warm-up."""

    name: ClassVar[str] = "every_other"
    sft_source: ClassVar[str] = "train_column"

    def __init__(self, sft_warmup_steps: int = 0):
        super().__init__(sft_warmup_steps=sft_warmup_steps)
        self.asked: list[int] = []

    def plan_after_warmup(self, global_step: int) -> StepPlan:
        self.asked.append(global_step)
        return StepPlan(rl_weight=1.0, sft_weight=0.0, rl=True, sft=global_step % 2 == 0)


def test_a_strategy_gets_the_warmup_plan_without_writing_it():
    strategy = _EveryOtherStep(sft_warmup_steps=3)
    plans = [strategy.plan(t) for t in range(6)]
    assert plans[:3] == [StepPlan(rl_weight=0.0, sft_weight=1.0, rl=False, sft=True, warmup=True)] * 3
    assert plans[3:] == [
        StepPlan(rl_weight=1.0, sft_weight=0.0, rl=True, sft=False),
        StepPlan(rl_weight=1.0, sft_weight=0.0, rl=True, sft=True),
        StepPlan(rl_weight=1.0, sft_weight=0.0, rl=True, sft=False),
    ]
    assert strategy.asked == [3, 4, 5]  # its own rule is never asked about a warm-up step
    # the warm-up draws from sft_dataset, whatever the strategy's own steps need
    assert strategy.needs_sft_dataset and not _EveryOtherStep(sft_warmup_steps=0).needs_sft_dataset
    with pytest.raises(NotImplementedError, match="plan_after_warmup"):
        BalancingStrategy(sft_warmup_steps=1).plan(1)


@pytest.mark.parametrize("balancing", sorted(STRATEGIES))
def test_every_strategy_plans_the_warmup_through_the_base_class(tmp_path, balancing):
    strategy = build_strategy(config(tmp_path, balancing=balancing, sft_warmup_steps=2, max_steps=10))
    assert type(strategy).plan is BalancingStrategy.plan  # no strategy writes its own warm-up branch
    assert [strategy.plan(t) for t in range(2)] == [StepPlan.warmup_step()] * 2
    assert not strategy.plan(2).warmup
    assert strategy.needs_sft_dataset  # the warm-up's demonstrations come from sft_dataset


@pytest.mark.parametrize(
    "balancing, overrides",
    [
        ("hpt", {}),
        ("luffy", {}),
        ("relift", {}),
        ("fixed", {"mu_init": 0.0}),
        ("amft", {"mu_init": 0.0, "mu_min": 0.0, "mu_max": 0.0}),
    ],
)
def test_sft_dataset_is_needed_for_the_warmup_alone(tmp_path, balancing, overrides):
    # strategies whose own steps never draw from sft_dataset need it exactly when there is a warm-up
    for warmup in (0, 2):
        args = config(tmp_path, balancing=balancing, sft_warmup_steps=warmup, max_steps=10, **overrides)
        assert build_strategy(args).needs_sft_dataset == (warmup > 0), warmup


def test_step_measurements_declare_the_plan():
    assert StepMeasurements().plan is None
    plan = StepPlan(rl_weight=0.5, sft_weight=0.5)
    assert StepMeasurements(plan=plan).plan is plan


# ---- the demonstration column of HPT, LUFFY and ReLIFT -----------------------------------------------------------
@pytest.mark.parametrize("balancing", ["hpt", "luffy", "relift"])
@pytest.mark.parametrize("column", ["", None, 3])
def test_demonstration_column_field_must_name_a_column(tmp_path, balancing, column):
    field = f"{balancing}_demonstration_column"
    with pytest.raises(ValueError) as raised:
        config(tmp_path, balancing=balancing, max_steps=10, **{field: column})
    assert str(raised.value) == (
        f"balancing='{balancing}' needs `{field}`: the column of train_dataset that holds each prompt's "
        f"demonstration; got {column!r}."
    )


@pytest.mark.parametrize("balancing", ["hpt", "luffy", "relift"])
def test_demonstration_column_must_be_in_train_dataset(tmp_path, balancing):
    field = f"{balancing}_demonstration_column"
    strategy = build_strategy(config(tmp_path, balancing=balancing, max_steps=10, **{field: "target"}))
    without = Dataset.from_dict({"prompt": ["1+1="], "demonstration": ["2"]})
    with pytest.raises(ValueError) as raised:
        strategy.check_datasets(train_dataset=without, sft_dataset=None, val_dataset=None)
    assert str(raised.value) == (
        f"balancing='{balancing}' reads each prompt's demonstration from train_dataset['target'] (`{field}`), but "
        "train_dataset has the columns ['prompt', 'demonstration']."
    )
    with_column = Dataset.from_dict({"prompt": ["1+1="], "target": ["2"]})
    strategy.check_datasets(train_dataset=with_column, sft_dataset=None, val_dataset=None)
    strategy.check_datasets(train_dataset=None, sft_dataset=None, val_dataset=None)  # nothing to check yet


def test_luffy_without_off_policy_rollouts_reads_no_column(tmp_path):
    args = config(tmp_path, balancing="luffy", max_steps=10, luffy_num_off_policy=0)
    without = Dataset.from_dict({"prompt": ["1+1="]})
    build_strategy(args).check_datasets(train_dataset=without, sft_dataset=None, val_dataset=None)


# ---- registry and config -----------------------------------------------------------------------------------------
def test_registry_names_the_choices(tmp_path):
    assert set(STRATEGIES) == {"amft", "fixed", "sft_then_rl", "chord", "srft", "hpt", "luffy", "relift"}
    with pytest.raises(ValueError, match=r"`balancing` must be one of \['amft', 'chord'"):
        get_strategy_class("grpo")
    with pytest.raises(ValueError, match="balancing"):
        config(tmp_path, balancing="grpo")
    for name in STRATEGIES:
        extra = {"sft_warmup_steps": 2} if name == "sft_then_rl" else {}
        assert build_strategy(config(tmp_path, balancing=name, **extra)).name == name


@pytest.mark.parametrize(
    "balancing, expected",
    [("amft", 50), ("fixed", 50), ("chord", 0), ("srft", 0), ("hpt", 0), ("luffy", 0), ("relift", 0)],
)
def test_warmup_default_is_the_strategys(tmp_path, balancing, expected):
    assert config(tmp_path, balancing=balancing).sft_warmup_steps == expected
    assert config(tmp_path, balancing=balancing, sft_warmup_steps=3).sft_warmup_steps == 3


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"balancing": "sft_then_rl"}, "sft_warmup_steps"),
        ({"balancing": "sft_then_rl", "sft_warmup_steps": 0}, "sft_warmup_steps"),
        ({"balancing": "chord", "chord_mu_peak": 1.5}, "chord_mu_peak"),
        ({"balancing": "chord", "chord_mu_valley": 0.6, "chord_mu_peak": 0.5}, "chord_mu_valley"),
        ({"balancing": "chord", "chord_mu_decay_steps": -1}, "chord_mu_decay_steps"),
        ({"balancing": "srft", "srft_sft_coef": -0.5}, "srft_sft_coef"),
        ({"balancing": "srft", "srft_rl_coef": float("inf")}, "srft_rl_coef"),
        ({"balancing": "srft", "srft_rl_weight_max": 0.0}, "srft_rl_weight_max"),
        ({"balancing": "srft", "srft_rl_weight_max": float("nan")}, "srft_rl_weight_max"),
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"learning_rate": float("nan")}, "learning_rate"),
        ({"balancing": "hpt", "hpt_demonstration_column": ""}, "hpt_demonstration_column"),
        ({"balancing": "hpt", "hpt_accuracy_threshold": 1.0}, "hpt_accuracy_threshold"),
        ({"balancing": "hpt", "hpt_sft_coef": -1.0}, "hpt_sft_coef"),
        ({"balancing": "fixed", "mu_init": 1.5}, "mu_init"),
        ({"sft_warmup_learning_rate": 1e-3, "sft_warmup_steps": 0}, "sft_warmup_steps"),
        ({"reset_optimizer_after_warmup": True, "sft_warmup_steps": 0}, "sft_warmup_steps"),
        ({"sft_warmup_learning_rate": -1.0}, "sft_warmup_learning_rate"),
    ],
)
def test_bad_strategy_fields_are_named(tmp_path, overrides, field):
    with pytest.raises(ValueError, match=field):
        config(tmp_path, **overrides)


def test_sft_then_rl_without_its_stage_length_says_what_it_needs(tmp_path):
    # the user never set sft_warmup_steps: the error says what is needed, not "got None"
    with pytest.raises(ValueError) as error:
        config(tmp_path, balancing="sft_then_rl")
    assert "`sft_then_rl` needs `sft_warmup_steps` >= 1" in str(error.value)
    assert "None" not in str(error.value)


def test_fields_of_another_strategy_are_reported_as_ignored(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="amft_trl.config"):
        config(tmp_path, balancing="chord", meta_learning_rate=0.3, chord_mu_peak=0.7)
    assert "meta_learning_rate=0.3 (amft)" in caplog.text
    assert "chord_mu_peak" not in caplog.text
    caplog.clear()
    # mu_init is read by amft and by fixed: named once, with both strategies
    with caplog.at_level(logging.WARNING, logger="amft_trl.config"):
        config(tmp_path, balancing="chord", mu_init=0.3)
    assert caplog.text.count("mu_init") == 1
    assert "mu_init=0.3 (amft, fixed)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="amft_trl.config"):
        config(tmp_path, balancing="amft")
    assert "ignored" not in caplog.text


def test_cpu_machine_defaults_to_float32(tmp_path):
    """TRL defaults bf16 to True, which transformers refuses without a bf16 accelerator (README quick start)."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: bf16 stays TRL's default")
    args = AMFTConfig(output_dir=str(tmp_path), report_to="none")
    assert args.bf16 is False
