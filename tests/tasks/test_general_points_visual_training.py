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
