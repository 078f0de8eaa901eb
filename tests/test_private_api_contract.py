"""The private TRL / transformers / Accelerate / DeepSpeed members amft-trl relies on (`amft_trl._private_api`), pinned.

Like TRL's own `TestTransformersContinuousBatchingContract`: when a TRL release changes one of these, a test here
fails and names it, instead of AMFT silently training on something else. The most important one: a validation
generation must leave every training metric, log table and token count untouched; the test compares *all* of the
trainer's attributes before and after one, so a container TRL adds would be caught, not only the ones listed in
`isolated_generation`. And the list is complete: a private member of those packages touched anywhere else in
`src/amft_trl` fails `test_no_private_member_is_touched_outside_the_compat_module`.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import time
from collections import deque
from pathlib import Path

import pytest
import torch
from conftest import digit_fraction_reward, make_config, make_demos, make_prompts
from trl import GRPOTrainer
from trl.trainer.utils import shuffle_sequence_dict, split_tensor_dict

from amft_trl import AMFTTrainer, _private_api

SRC = Path(__file__).resolve().parents[1] / "src" / "amft_trl"


@pytest.fixture
def trainer(tmp_path, tiny_model_dir, tokenizer):
    return AMFTTrainer(
        model=tiny_model_dir,
        reward_funcs=[digit_fraction_reward],
        args=make_config(tmp_path, max_steps=2, meta_update_steps=1),
        train_dataset=make_prompts(16, seed=1),
        sft_dataset=make_demos(16, seed=2),
        val_dataset=make_prompts(8, seed=3),
        processing_class=tokenizer,
    )


def _rows(n: int = 2, generations: int = 4):
    return [row for row in make_prompts(n, seed=5) for _ in range(generations)]


def test_private_members_exist_with_the_assumed_signatures():
    for name in (
        "_generate_and_score_completions",
        "_calculate_rewards",
        "_compute_loss",
        "_get_per_token_logps_and_entropies",
    ):
        assert callable(getattr(GRPOTrainer, name, None)), f"GRPOTrainer.{name} is gone"
    params = inspect.signature(GRPOTrainer._get_per_token_logps_and_entropies).parameters
    assert list(params)[1:5] == ["model", "input_ids", "attention_mask", "logits_to_keep"]
    assert "compute_entropy" in params
    # LUFFY generates the on-policy rows only, through TRL's own single-turn generation
    assert list(inspect.signature(GRPOTrainer._generate_single_turn).parameters)[1:5] == [
        "prompt_ids",
        "images",
        "multimodal_fields",
        "num_generations",
    ]
    assert "self._generate_single_turn(" in inspect.getsource(GRPOTrainer._generate)
    # ... with image prompts, from the on-policy rows' own tokenisation
    assert list(inspect.signature(GRPOTrainer._tokenize_prompts).parameters)[1:] == ["prompts"]
    assert "self._tokenize_prompts(prompts)" in inspect.getsource(GRPOTrainer._generate)
    assert "[::num_generations]" in inspect.getsource(
        importlib.import_module("trl.generation.vllm_generation").VLLMGeneration.generate
    )
    for name in ("grpo", "sapo", "bnpo", "dr_grpo", "dapo", "cispo", "vespo", "luspo"):  # LUFFY's normalisers
        assert f'"{name}"' in inspect.getsource(GRPOTrainer._compute_loss), name
    assert list(inspect.signature(GRPOTrainer._calculate_rewards).parameters)[1:] == [
        "inputs",
        "prompts",
        "completions",
        "completion_ids_list",
    ]
    from accelerate.state import GradientState

    assert callable(getattr(GradientState, "_set_sync_gradients", None))
    from accelerate import Accelerator

    assert "deepspeed_engine_wrapped" in inspect.getsource(Accelerator.backward)
    assert callable(_private_api.tokenize)
    # the SFT term renders demonstrations with the tools of the environment their rollouts use
    assert "self._env_tools[name] = tools + methods" in inspect.getsource(GRPOTrainer.__init__)
    assert "tools=self._env_tools[name]" in inspect.getsource(GRPOTrainer._tokenize_prompts)


def test_generation_output_and_its_extra_keys_survive_trls_shuffle_and_split(trainer):
    trainer.model.train()
    out = trainer._generate_and_score_completions(_rows())
    for key in _private_api.GENERATION_KEYS:
        assert key in out, f"TRL's generation no longer returns {key!r}"
    assert out["advantages"].dim() == 1 and len(out["advantages"]) == 8
    for key in ("amft_reward", "amft_group_rewards"):
        assert len(out[key]) == 8, key
    torch.manual_seed(0)
    chunks = split_tensor_dict(shuffle_sequence_dict(out), 2)
    for chunk in chunks:
        assert len(chunk["amft_reward"]) == len(chunk["advantages"]) == 4
    # rows stay aligned: a row's reward and its group's rewards travel together
    merged = torch.cat([c["amft_group_rewards"] for c in chunks])
    rewards = torch.cat([c["amft_reward"] for c in chunks])
    assert all(bool((group == r).any()) for group, r in zip(merged, rewards, strict=True))


def test_calculate_rewards_returns_every_processs_rewards_with_nan_for_none(trainer):
    def half_none(completions, **kwargs):
        return [None if i % 2 else 0.5 for i in range(len(completions))]

    trainer.reward_funcs = [half_none]
    rows = _rows(1)
    rewards = trainer._calculate_rewards(rows, [r["prompt"] for r in rows], ["x"] * 4, [[1]] * 4)
    assert rewards.shape == (4, 1)
    assert torch.isnan(rewards[1::2]).all() and (rewards[::2] == 0.5).all()


def test_compute_loss_reads_the_advantages_after_its_forward(trainer):
    """Per-rollout weights (SRFT) are set from the loss's own forward: TRL must read `inputs["advantages"]` after
    its single `_get_per_token_logps_and_entropies(compute_entropy=True)` call, whose output AMFT reads
    (`AMFTTrainer._reading_loss_forward`)."""
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by the Trainer's loop in training
    inputs = trainer._generate_and_score_completions(_rows())
    assert inputs["advantages"].abs().sum() > 0
    baseline = trainer._compute_loss(trainer.model, dict(inputs))
    calls = []

    def read(logps, entropies):
        calls.append((logps, entropies))
        patched["advantages"] = torch.zeros_like(patched["advantages"])

    patched = dict(inputs)
    with trainer._reading_loss_forward(read):
        loss = trainer._compute_loss(trainer.model, patched)
    assert len(calls) == 1
    logps, entropies = calls[0]
    assert entropies is not None and entropies.shape == inputs["completion_ids"].shape
    assert logps.requires_grad, "the log-probs LUFFY's term is built on must carry the graph"
    assert float(loss) == 0.0 != float(baseline), "TRL read the advantages before the forward"


def test_training_step_hands_what_prepare_inputs_returns_to_compute_loss(trainer):
    """`AMFTTrainer._micro_step` prepares TRL's rollouts itself and hands them, with AMFT's loss arguments, to TRL's
    `training_step`: the Trainer must call `_prepare_inputs` once and pass its return value to `compute_loss`."""
    from transformers import Trainer

    seen = {}

    class Spy(dict):
        pass

    class Probe:
        args = trainer.args
        optimizer = None
        model_accepts_loss_kwargs = False
        compute_loss_func = None
        loss_is_scaled_for_ga = None
        current_gradient_accumulation_steps = 1
        state = trainer.state
        accelerator = trainer.accelerator

        def _prepare_context_parallel_inputs(self, model, inputs):
            return Trainer._prepare_context_parallel_inputs(trainer, model, inputs)

        def _prepare_inputs(self, inputs):
            seen.setdefault("prepared", []).append(inputs)
            return inputs

        def compute_loss_context_manager(self):
            return trainer.compute_loss_context_manager()

        def compute_loss(self, model, inputs, num_items_in_batch=None):
            seen["loss_inputs"] = inputs
            return (trainer.model.lm_head.weight * 0).sum()

    batch = Spy(marker=1)
    Trainer.training_step(Probe(), trainer.model, batch)
    assert len(seen["prepared"]) == 1 and seen["prepared"][0] is batch and seen["loss_inputs"] is batch


def _fingerprint(value, depth: int = 0):
    """A comparable summary of an attribute: primitives and containers of them by value, anything else by id."""
    if isinstance(value, int | float | str | bool | type(None)):
        return value
    if isinstance(value, torch.Tensor):
        return (
            "tensor",
            tuple(value.shape),
            float(value.double().sum()) if value.numel() < 10_000 else id(value),
        )
    if depth < 6 and isinstance(value, dict):
        return ("dict", type(value).__name__, {k: _fingerprint(v, depth + 1) for k, v in value.items()})
    if depth < 6 and isinstance(value, list | tuple | deque):
        return (type(value).__name__, [_fingerprint(v, depth + 1) for v in value][:1000], len(value))
    return ("object", id(value))


def _snapshot(trainer):
    attributes = {k: _fingerprint(v) for k, v in vars(trainer).items()}
    attributes["state"] = {k: _fingerprint(v) for k, v in vars(trainer.state).items()}
    return attributes


def test_validation_generation_leaves_every_training_attribute_untouched(trainer):
    """Fill the training logs with one real step first, so that a leak into any container shows."""
    trainer.args.max_steps = 1
    trainer.train()
    trainer.model.train()
    trainer._metrics["train"]["reward"].append(0.25)  # pending, not yet logged
    before, position = _snapshot(trainer), trainer._val_stream.state_dict()
    counts = dict(trainer._token_counts)
    reward = trainer._validation_backward(trainer.model)
    trainer.model.zero_grad(set_to_none=True)
    after = _snapshot(trainer)
    changed = sorted(k for k in before if before[k] != after[k])
    # the one count it adds to is its own (amft/val_completion_tokens)
    assert changed == ["_token_counts"], f"validation generation changed {changed}"
    grown = {k for k in counts if trainer._token_counts[k] != counts[k]}
    assert grown == {"val_completion"} and trainer._token_counts["val_completion"] > counts["val_completion"]
    assert (
        trainer._val_stream.state_dict() != position
    )  # the one change it makes: the validation stream moved
    assert set(after) == set(before), f"attributes added: {set(after) - set(before)}"
    assert reward == reward, "the validation reward was not read from TRL's metrics"


def test_step_time_covers_the_whole_amft_step(trainer):
    """TRL's `step_time` times only GRPO's `training_step`; AMFT's covers the SFT and meta work as well."""
    original = trainer._sft_micro_step

    def slow(*args, **kwargs):
        time.sleep(0.3)
        return original(*args, **kwargs)

    trainer._sft_micro_step = slow
    trainer.train()
    times = [h["step_time"] for h in trainer.state.log_history if "step_time" in h]
    assert len(times) == 2 and min(times) >= 0.3


# ------------------------------------------------------------------------------------------------ the list is complete


def _owner(path: str) -> type:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def test_overridden_private_members_exist_with_the_pinned_signatures():
    for owner, members in _private_api.OVERRIDDEN.items():
        cls = _owner(owner)
        for name, params in members.items():
            assert hasattr(cls, name), f"{owner}.{name} is gone"
            if params is None:  # a class attribute
                continue
            found = list(inspect.signature(getattr(cls, name)).parameters)[1 : 1 + len(params)]
            assert found == list(params), (
                f"{owner}.{name} now takes {found}, the override assumes {list(params)}"
            )


def test_transformers_accelerate_and_deepspeed_members_exist():
    from accelerate import Accelerator
    from accelerate.state import GradientState
    from transformers import Trainer

    assert "trial" in inspect.signature(Trainer._get_output_dir).parameters
    # the Trainer recreates the schedule it marked as its own (e.g. once DeepSpeed has wrapped the optimizer)
    assert "_created_lr_scheduler" in inspect.getsource(Trainer)
    assert callable(getattr(GradientState, "_set_sync_gradients", None))
    assert "deepspeed_engine_wrapped" in inspect.getsource(Accelerator.backward)
    deepspeed = pytest.importorskip("deepspeed")
    assert _private_api.zero_optimizer_classes()  # both ZeRO optimizer classes still import from these paths
    mixed_precision_linkage = importlib.import_module("deepspeed.utils.mixed_precision_linkage")
    tensor_fragment = importlib.import_module("deepspeed.utils.tensor_fragment")
    assert "lp_param._hp_mapping = " in inspect.getsource(mixed_precision_linkage)
    assert callable(getattr(tensor_fragment.tensor_fragment, "get_lp_grad_fragment", None))
    assert "_index_in_param_group" in inspect.getsource(deepspeed.runtime.bf16_optimizer) + inspect.getsource(
        importlib.import_module("deepspeed.runtime.zero.stage_1_and_2")
    ) + inspect.getsource(tensor_fragment)
    assert callable(deepspeed.utils.safe_get_local_grad) and callable(deepspeed.utils.safe_set_local_grad)


def _foreign_private_names() -> set[str]:
    """Private names of the classes amft-trl subclasses or reaches into: their methods and class attributes, and
    the instance attributes their code assigns (`self._x = ...`)."""
    from accelerate import Accelerator
    from accelerate.state import GradientState
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase, Trainer
    from trl import SFTTrainer

    names: set[str] = set(_private_api.READ["deepspeed"])
    classes = (GRPOTrainer, SFTTrainer, Trainer, Accelerator, GradientState)
    for cls in (*classes, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase):
        for base in cls.__mro__:
            if base.__module__.split(".")[0] in ("trl", "transformers", "accelerate"):
                names |= {n for n in vars(base) if n.startswith("_") and not n.startswith("__")}
                try:
                    source = inspect.getsource(base)
                except (OSError, TypeError):
                    continue
                names |= set(re.findall(r"self\.(_[a-z]\w*)\s*=", source))
    return names


class _Touches(ast.NodeVisitor):
    """Private foreign members used in one module, except `super().name(...)` inside a listed override `name`."""

    def __init__(self, foreign: set[str], overridden: set[str]):
        self.foreign, self.overridden = foreign, overridden
        self.found: list[str] = []
        self.classes: list[bool] = []  # whether each enclosing class derives from a foreign trainer
        self.functions: list[str] = []

    def visit_ClassDef(self, node):
        bases = [ast.unparse(b) for b in node.bases]
        self.classes.append(any(b.endswith("Trainer") or "Metered" in b for b in bases))
        for item in node.body:  # class attributes: `_name = ...` in a trainer subclass redefines TRL's
            targets = item.targets if isinstance(item, ast.Assign) else []
            for target in targets:
                if self.classes[-1] and isinstance(target, ast.Name) and target.id in self.foreign:
                    if target.id not in self.overridden:
                        self.found.append(f"class attribute {node.name}.{target.id} (line {item.lineno})")
            if isinstance(item, ast.FunctionDef) and self.classes[-1] and item.name in self.foreign:
                if item.name not in self.overridden:
                    self.found.append(f"override {node.name}.{item.name} (line {item.lineno})")
        self.generic_visit(node)
        self.classes.pop()

    def visit_FunctionDef(self, node):
        self.functions.append(node.name)
        self.generic_visit(node)
        self.functions.pop()

    def visit_Attribute(self, node):
        name = node.attr
        if name in self.foreign:
            value = ast.unparse(node.value)
            in_trainer = bool(self.classes) and self.classes[-1]
            override_call = value == "super()" and self.functions and self.functions[-1] == name
            if override_call and name in self.overridden:
                pass
            elif value in ("self", "cls") and not in_trainer:
                pass  # an amft-trl object's own attribute that happens to share the name
            else:
                self.found.append(f"{value}.{name} (line {node.lineno})")
        self.generic_visit(node)

    def visit_Call(self, node):
        if isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr", "setattr"):
            if (
                len(node.args) > 1
                and isinstance(node.args[1], ast.Constant)
                and node.args[1].value in self.foreign
            ):
                self.found.append(f"{node.func.id}(..., {node.args[1].value!r}) (line {node.lineno})")
        self.generic_visit(node)

    def visit_ImportFrom(self, node):
        if (node.module or "").split(".")[0] in ("trl", "transformers", "accelerate", "deepspeed"):
            for alias in node.names:
                if alias.name.startswith("_"):
                    self.found.append(f"from {node.module} import {alias.name} (line {node.lineno})")


def test_no_private_member_is_touched_outside_the_compat_module():
    foreign = _foreign_private_names() | {n for names in _private_api.READ.values() for n in names}
    overridden = {n for members in _private_api.OVERRIDDEN.values() for n in members}
    assert {
        "_metrics",
        "_save_checkpoint",
        "_created_lr_scheduler",
        "_set_sync_gradients",
        "_name_or_path",
    } <= foreign
    problems = {}
    for path in sorted(SRC.rglob("*.py")):
        if path.name == "_private_api.py":
            continue
        visitor = _Touches(foreign, overridden)
        visitor.visit(ast.parse(path.read_text()))
        if visitor.found:
            problems[str(path.relative_to(SRC))] = visitor.found
    assert problems == {}, (
        f"private members touched outside amft_trl._private_api (list them there): {problems}"
    )


def test_the_scan_catches_a_private_read():
    """The check above can fail: a direct read, a foreign override and a private import are each reported."""
    foreign = _foreign_private_names()
    code = (
        "from trl.data_utils import _tokenize\n"
        "class T(GRPOTrainer):\n"
        "    def _prepare_inputs(self, x):\n"
        "        return self._metrics\n"
        "def f(trainer):\n"
        "    return getattr(trainer.accelerator, '_set_sync_gradients')\n"
    )
    visitor = _Touches(foreign | {"_set_sync_gradients"}, set())
    visitor.visit(ast.parse(code))
    assert len(visitor.found) == 4, visitor.found


def test_resume_warns_about_tied_weights_in_the_form_the_filter_reads(caplog):
    """transformers' Trainer warns "There were missing keys ... ['lm_head.weight']" when it resumes a model with tied
    weights (saved without the tied copy); `quiet_tied_weights_on_resume` drops exactly that warning."""
    import logging
    from types import SimpleNamespace

    from transformers import Trainer

    from amft_trl import toy

    model = toy.build_model(toy.build_tokenizer(), seed=0)
    assert model.get_parameter("lm_head.weight") is model.get_parameter("model.embed_tokens.weight")
    trainer_logger = logging.getLogger("transformers.trainer")
    propagate, trainer_logger.propagate = (
        trainer_logger.propagate,
        True,
    )  # transformers' loggers do not propagate

    def warn(missing):
        result = SimpleNamespace(missing_keys=missing, unexpected_keys=[])
        Trainer._issue_warnings_after_load(SimpleNamespace(model=model), result)

    try:
        with caplog.at_level(logging.WARNING, logger="transformers.trainer"):
            warn(["lm_head.weight"])
            assert caplog.records[-1].getMessage().startswith(_private_api.MISSING_KEYS_WARNING)
            assert "['lm_head.weight']" in caplog.records[-1].getMessage()
            caplog.clear()
            with _private_api.quiet_tied_weights_on_resume(model):
                warn(["lm_head.weight"])  # the tied copy: nothing is missing
                assert not caplog.records
                warn(["lm_head.weight", "model.norm.weight"])  # a real missing key is still reported
                assert "model.norm.weight" in caplog.text
            caplog.clear()
            warn(["lm_head.weight"])  # the filter is gone after the block
            assert caplog.records
    finally:
        trainer_logger.propagate = propagate


def test_vision_members_exist_with_the_assumed_signatures():
    """The VLM path: TRL's log-prob helper takes every multimodal key its generation output may hold (and
    `_compute_loss` passes them, so the SFT and validation forwards pass the same), its micro-batch splitter for
    pixel values exists, and transformers' `Trainer._load_from_checkpoint` (wrapped to reload VLM checkpoints)."""
    from transformers import Trainer
    from trl import GRPOTrainer
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling
    from trl.trainer.utils import split_pixel_values_by_grid, unsplit_pixel_values_by_grid  # noqa: F401

    from amft_trl._private_api import MULTIMODAL_KEYS

    params = inspect.signature(GRPOTrainer._get_per_token_logps_and_entropies).parameters
    assert set(MULTIMODAL_KEYS) <= set(params)
    source = inspect.getsource(GRPOTrainer._compute_loss)
    assert all(f'inputs.get("{key}")' in source for key in MULTIMODAL_KEYS)
    assert list(inspect.signature(Trainer._load_from_checkpoint).parameters) == [
        "self",
        "resume_from_checkpoint",
        "model",
    ]
    fields = inspect.signature(DataCollatorForVisionLanguageModeling).parameters
    assert {"processor", "max_length", "completion_only_loss"} <= set(fields)
