"""`check_reward_columns`: the columns reward functions require, checked on every dataset that feeds them."""

from __future__ import annotations

import asyncio
import functools
import inspect
import re

import pytest
from datasets import Dataset

from amft_trl._reward_columns import (
    COLUMNS_NOT_PASSED,
    ENVIRONMENTS_KWARG,
    TRL_REWARD_KWARGS,
    check_reward_columns,
)
from amft_trl.rewards import boxed_format_reward, math_accuracy_reward, multiple_choice_reward

TRAIN = Dataset.from_dict({"prompt": ["1+1?"], "solution": ["2"], "answer": ["B"]})
VAL = Dataset.from_dict({"prompt": ["2+2?"], "solution": ["4"]})


def _error(reward_funcs, datasets, **kwargs) -> str:
    with pytest.raises(ValueError) as info:
        check_reward_columns(reward_funcs, datasets, **kwargs)
    return str(info.value)


def test_a_column_missing_from_the_validation_set_names_the_set_the_reward_and_the_column():
    message = _error([multiple_choice_reward], {"train_dataset": TRAIN, "val_dataset": VAL})
    assert "`val_dataset` has no column(s) ['answer']" in message
    assert "'multiple_choice_reward' requires" in message and "['prompt', 'solution']" in message
    assert "train_dataset" not in message  # the training set has it


def test_every_problem_is_reported_at_once():
    message = _error(
        [multiple_choice_reward, math_accuracy_reward],
        {"train_dataset": Dataset.from_dict({"prompt": ["a"]}), "val_dataset": VAL},
    )
    assert "`train_dataset` has no column(s) ['answer']" in message
    assert "`train_dataset` has no column(s) ['solution']" in message
    assert "`val_dataset` has no column(s) ['answer']" in message
    assert message.count("\n  - ") == 3


def test_rewards_that_need_no_column_are_accepted():
    def kwargs_only(completions, **kwargs):
        return [0.0] * len(completions)

    def defaulted(completions, solution=None, **kwargs):
        return [0.0] * len(completions)

    def everything_trl_passes(
        prompts, completions, completion_ids, trainer_state, log_extra, log_metric, **kw
    ):
        return [0.0] * len(completions)

    empty = Dataset.from_dict({"prompt": ["a"]})
    check_reward_columns(
        [kwargs_only, defaulted, everything_trl_passes, boxed_format_reward, lambda completions, **kw: []],
        {"train_dataset": empty, "val_dataset": empty, "eval_dataset": None},
    )
    check_reward_columns(kwargs_only, {"train_dataset": empty})  # a single reward, as GRPOTrainer accepts


def _scaled(completions, solution, scale, **kwargs):
    return [scale] * len(completions)


class AnswerJudge:
    def __call__(self, completions, answer, **kwargs):
        return [0.0] * len(completions)

    def method(self, completions, answer, **kwargs):
        return [0.0] * len(completions)


async def async_reward(completions, answer, **kwargs):
    return [0.0] * len(completions)


class AsyncJudge:
    async def __call__(self, completions, answer, **kwargs):
        return [0.0] * len(completions)


@pytest.mark.parametrize(
    ("reward", "name", "missing"),
    [
        (functools.partial(_scaled, scale=2.0), "_scaled", "['solution']"),
        (functools.partial(functools.partial(_scaled, scale=2.0)), "_scaled", "['solution']"),
        (AnswerJudge(), "AnswerJudge", "['answer']"),
        (AnswerJudge().method, "method", "['answer']"),
        (async_reward, "async_reward", "['answer']"),
        (AsyncJudge(), "AsyncJudge", "['answer']"),
    ],
    ids=["partial", "nested-partial", "callable-object", "bound-method", "async-function", "async-callable"],
)
def test_partials_callable_objects_and_async_rewards_are_read_through_their_signature(reward, name, missing):
    message = _error([reward], {"val_dataset": Dataset.from_dict({"prompt": ["a"]})})
    assert f"`val_dataset` has no column(s) {missing}, which the reward function {name!r} requires" in message


def test_a_partial_that_binds_the_column_is_accepted():
    check_reward_columns(
        [functools.partial(_scaled, solution="2", scale=1.0)], {"val_dataset": VAL.select_columns(["prompt"])}
    )


def test_reward_models_and_model_ids_are_skipped():
    import torch

    check_reward_columns(["some-org/reward-model", torch.nn.Linear(2, 1)], {"train_dataset": VAL})


def test_several_eval_sets_are_checked_one_by_one():
    eval_sets = {"id": TRAIN, "ood": VAL}
    message = _error([multiple_choice_reward], {"eval_dataset": eval_sets})
    assert "`eval_dataset['ood']` has no column(s) ['answer']" in message and "'id'" not in message


def test_a_reward_without_kwargs_must_accept_everything_trl_passes():
    def strict(prompts, completions, solution):
        return [0.0] * len(completions)

    message = _error([strict], {"train_dataset": TRAIN})
    assert "'strict' takes no **kwargs and does not accept" in message
    assert "['answer', 'completion_ids', 'log_extra', 'log_metric', 'trainer_state']" in message


def test_parameters_trl_never_passes_are_reported():
    def wants_prompt(prompt, completions, **kwargs):
        return [0.0] * len(completions)

    def positional(completions, solution, /, **kwargs):
        return [0.0] * len(completions)

    def wants_environments(environments, **kwargs):
        return [0.0] * len(environments)

    message = _error([wants_prompt, positional, wants_environments], {"train_dataset": TRAIN})
    assert "'wants_prompt' requires ['prompt'], which TRL never passes" in message
    assert "'positional' has positional-only parameter(s) ['completions', 'solution']" in message
    assert "'wants_environments' requires `environments`" in message and "environment_factory" in message
    check_reward_columns([wants_environments], {"train_dataset": TRAIN}, environments=True)


def test_columns_dropped_by_remove_unused_columns_are_reported():
    message = _error(
        [math_accuracy_reward],
        {"train_dataset": TRAIN, "val_dataset": VAL},
        columns_dropped_from=("train_dataset", "eval_dataset"),
    )
    assert (
        "`train_dataset` has the column(s) ['solution']" in message
        and "remove_unused_columns=True" in message
    )
    assert "has no column" not in message  # the column is there, only dropped
    assert "val_dataset" not in message  # AMFT reads validation rows itself: nothing is dropped


def test_datasets_without_known_columns_are_skipped():
    iterable = Dataset.from_dict({"prompt": ["a"]}).to_iterable_dataset().map(lambda x: x)
    check_reward_columns([multiple_choice_reward], {"train_dataset": iterable, "val_dataset": None})


def _call_like_trl(func, row: dict):
    """What `GRPOTrainer._calculate_rewards` (TRL 1.16) does with one row."""
    columns = {
        key: [value] for key, value in row.items() if key not in ("prompt", "completion", "completion_ids")
    }
    kwargs = dict(columns, trainer_state=None, log_extra=None, log_metric=None)
    out = func(prompts=[row["prompt"]], completions=["\\boxed{2}"], completion_ids=[[1]], **kwargs)
    if inspect.isawaitable(out):
        asyncio.run(out)


@pytest.mark.parametrize(
    "reward",
    [
        multiple_choice_reward,
        boxed_format_reward,
        functools.partial(_scaled, scale=1.0),
        AnswerJudge(),
        async_reward,
        lambda prompts, completions, **kw: [0.0],
        lambda completions, trainer_state, solution: [0.0],
        lambda prompts, completions, completion_ids, trainer_state, log_extra, log_metric, solution, answer: [
            0.0
        ],
    ],
)
@pytest.mark.parametrize(
    "row", [{"prompt": "p", "solution": "2"}, {"prompt": "p", "solution": "2", "answer": "A"}]
)
def test_the_check_refuses_exactly_what_trl_cannot_call(reward, row):
    try:
        _call_like_trl(reward, row)
        callable_by_trl = True
    except TypeError:
        callable_by_trl = False
    try:
        check_reward_columns([reward], {"train_dataset": Dataset.from_list([row])})
        accepted = True
    except ValueError:
        accepted = False
    assert accepted == callable_by_trl


def test_the_keywords_match_trls_reward_call():
    """TRL's own reward keywords and the columns it withholds, read off `_calculate_rewards`."""
    from trl import GRPOTrainer

    source = inspect.getsource(GRPOTrainer._calculate_rewards)
    added = set(re.findall(r'(?<!\w)reward_kwargs\["(\w+)"\]\s*=', source))
    assert ENVIRONMENTS_KWARG in added  # (only with an environment factory)
    own = added - {ENVIRONMENTS_KWARG}
    own |= set(re.findall(r"reward_func\(\s*(\w+)=\w+,\s*(\w+)=\w+,\s*(\w+)=\w+", source)[0])
    assert own == TRL_REWARD_KWARGS
    withheld = re.search(r"if key not in \[([^\]]*)\]", source).group(1)
    assert set(re.findall(r'"(\w+)"', withheld)) == COLUMNS_NOT_PASSED
