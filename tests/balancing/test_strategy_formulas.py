"""The balancing strategies' formulas, plans and config checks, without a trainer (hand computations)."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from amft_trl import AMFTConfig
from amft_trl.balancing import STRATEGIES, FixedMu, SFTThenRL, build_strategy, get_strategy_class
from amft_trl.balancing.chord import ChordStrategy, chord_mu, chord_phi
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
    strategy = ChordStrategy(0, 0, 0.5, 0.5, enable_phi_function=False)
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
    fixed = FixedMu(mu=0.3, sft_warmup_steps=2)
    assert [fixed.plan(t).warmup for t in range(4)] == [True, True, False, False]
    p = fixed.plan(2)
    assert (p.rl_weight, p.sft_weight, p.rl, p.sft) == (pytest.approx(0.7), 0.3, True, True)
    switch = SFTThenRL(sft_warmup_steps=3)
    assert switch.plan(2).warmup and not switch.plan(2).rl
    after = switch.plan(3)
    assert (after.rl_weight, after.sft_weight, after.rl, after.sft) == (1.0, 0.0, True, False)
    chord = ChordStrategy(2, 2, 0.6, 0.2)
    assert chord.plan(0).sft is False and chord.plan(0).rl_weight == 1.0  # mu = 0: no SFT batch at all
    assert chord.plan(2).sft_weight == pytest.approx(0.6)


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
