"""Failure modes found by a new user and a hostile tester (issue 13), each closed with a clear error or a fix."""

from __future__ import annotations

import json
import logging

import pytest
from conftest import build_trainer, make_prompts
from datasets import Dataset


def build(tmp_path, tiny_model_dir, tokenizer, reward_funcs=None, **overrides):
    return build_trainer(tmp_path, tiny_model_dir, tokenizer, reward_funcs, **overrides)


def logged(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h]


# ---- 3. empty datasets: construction-time errors -------------------------------------------------------------------
@pytest.mark.parametrize("name", ["train_dataset", "sft_dataset", "val_dataset"])
def test_an_empty_dataset_is_refused_at_construction(tmp_path, tiny_model_dir, tokenizer, name):
    empty = {
        "train_dataset": Dataset.from_dict({"prompt": [], "answer": []}),
        "sft_dataset": Dataset.from_dict({"prompt": [], "completion": []}),
        "val_dataset": Dataset.from_dict({"prompt": [], "answer": []}),
    }[name]
    datasets = {"val_dataset": make_prompts(8, seed=3), name: empty}
    with pytest.raises(ValueError, match=rf"`{name}` is empty"):
        build(tmp_path, tiny_model_dir, tokenizer, **datasets)


# ---- 5. a corrupt amft_state.json names the file and what is wrong ----------------------------------------------------
@pytest.fixture
def checkpoint(tmp_path, tiny_model_dir, tokenizer):
    trainer = build(
        tmp_path / "run",
        tiny_model_dir,
        tokenizer,
        max_steps=1,
        save_strategy="steps",
        save_steps=1,
        meta_learning_rate=0.0,
    )
    trainer.train()
    return tmp_path / "run" / "checkpoint-1"


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "is not readable JSON"),
        ("{}", r"has no 'strategy' entry \(found keys \[\]\)"),
        ("[1, 2]", "must hold a JSON object, found list"),
        (
            json.dumps({"balancing": "chord", "strategy": {}}),
            "was written with balancing='chord'.*uses balancing='amft'",
        ),
        (
            json.dumps({"balancing": "amft", "strategy": {"mu": 0.5, "bogus": 1}}),
            "the 'amft' state does not load",
        ),
        (
            json.dumps({"balancing": "amft", "strategy": {"mu": 0.5}, "sft_stream": {"epoch": "x"}}),
            "'sft_stream' must be an object with integer 'epoch' and 'offset'",
        ),
    ],
)
def test_a_corrupt_state_file_is_named(tmp_path, tiny_model_dir, tokenizer, checkpoint, content, message):
    path = checkpoint / "amft_state.json"
    path.write_text(content)
    again = build(tmp_path / "run", tiny_model_dir, tokenizer, max_steps=2, meta_learning_rate=0.0)
    with pytest.raises(ValueError, match=message) as error:
        again.train(resume_from_checkpoint=str(checkpoint))
    assert str(path) in str(error.value)


def test_a_state_file_without_its_strategy_entry_is_refused(tmp_path, tiny_model_dir, tokenizer, checkpoint):
    """The pre-release `controller` key is not read: such a file is named as not written by AMFTTrainer."""
    path = checkpoint / "amft_state.json"
    state = json.loads(path.read_text())
    old = {"controller": state["strategy"], **{k: v for k, v in state.items() if k.endswith("_stream")}}
    path.write_text(json.dumps(old))
    again = build(tmp_path / "run", tiny_model_dir, tokenizer, max_steps=2, meta_learning_rate=0.0)
    with pytest.raises(ValueError, match="has no 'strategy' entry") as error:
        again.train(resume_from_checkpoint=str(checkpoint))
    assert str(path) in str(error.value)


# ---- 6. rewards that are all None: said once, counted, and no meta update ----------------------------------------
def none_reward(completions, **kwargs):
    return [None] * len(completions)


def test_all_none_rewards_are_reported_and_counted(tmp_path, tiny_model_dir, tokenizer, caplog):
    trainer = build(
        tmp_path,
        tiny_model_dir,
        tokenizer,
        reward_funcs=[none_reward],
        val_dataset=make_prompts(8, seed=3),
        max_steps=3,
        meta_update_steps=2,
        entropy_learning_rate=0.0,
        meta_learning_rate=0.1,
    )
    with caplog.at_level(logging.WARNING, logger="amft_trl"):
        trainer.train()
    assert logged(trainer, "amft/skipped_rl_steps") == [1.0, 2.0, 3.0]
    assert caplog.text.count("trained on its SFT term alone") == 1  # warned once, then counted
    # both meta steps (0 and 2) had no defined validation reward: mu was not moved by them
    assert logged(trainer, "amft/skipped_meta_steps")[-1] == 2.0
    assert trainer.strategy.state.num_meta_updates == 0
    assert [h["mu"] for h in trainer.strategy.state.history] == [0.5, 0.5, 0.5]


# ---- 4. a reward column missing from a dataset that feeds rewards: found at construction ---------------------------
def answer_reward(completions, answer, **kwargs):
    return [float(a in str(c)) for c, a in zip(completions, answer, strict=True)]


def test_a_reward_column_missing_from_the_validation_prompts_is_named_at_construction(
    tmp_path, tiny_model_dir, tokenizer
):
    no_answer = Dataset.from_dict({"prompt": [f"Compute {i} + 1 =" for i in range(8)]})
    with pytest.raises(ValueError, match=r"`val_dataset` has no column\(s\) \['answer'\].*answer_reward"):
        build(tmp_path, tiny_model_dir, tokenizer, reward_funcs=[answer_reward], val_dataset=no_answer)
    # without the meta-gradient the validation prompts feed no reward: accepted
    build(
        tmp_path,
        tiny_model_dir,
        tokenizer,
        reward_funcs=[answer_reward],
        val_dataset=no_answer,
        meta_learning_rate=0.0,
    )


# ---- the meta step keeps nothing alive between meta steps -------------------------------------------------------------
def test_no_meta_step_buffer_outlives_its_step(tmp_path, tiny_model_dir, tokenizer):
    import gc
    import weakref

    from amft_trl._meta_step import MetaStep

    trainer = build(
        tmp_path,
        tiny_model_dir,
        tokenizer,
        val_dataset=make_prompts(8, seed=3),
        max_steps=3,
        meta_update_steps=2,
    )
    alive = []
    original = MetaStep.validation_done

    def spy(self, val_reward):
        original(self, val_reward)
        alive.extend(weakref.ref(t) for t in self.grad_u if t is not None)
        alive.append(weakref.ref(self))

    MetaStep.validation_done = spy
    try:
        trainer.train()
    finally:
        MetaStep.validation_done = original
    gc.collect()
    assert len(alive) > 2, "no meta step ran"
    assert all(ref() is None for ref in alive), (
        "a meta step's buffer (or the step itself) is still referenced"
    )
    assert trainer._step_state is None
