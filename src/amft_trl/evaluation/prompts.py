r"""Prompt templates: how a benchmark's question becomes the model's input.

A `PromptTemplate` turns a question into chat messages (an optional system message, then the user message
`user` with `{question}` replaced), which the tokenizer's chat template renders; with `chat=False`, or for a
tokenizer without a chat template, the messages are joined as plain text instead. The template used for each
benchmark, and the rendered prompt of every problem, are recorded in `results.json`.

Built-in templates (`TEMPLATES`):

- `boxed` (math default): the question, a blank line, then amft-trl's training instruction
  `amft_trl.math_data.DEFAULT_INSTRUCTION` ("Please reason step by step, and put your final answer within
  \boxed{}.", the Qwen2.5-Math instruction), in the model's chat template. It is what
  `amft_trl.math_data.math_rl_prompts` trains on, so a trained model is evaluated on the prompt it learned.
- `multiple_choice` (ARC-C, GPQA-Diamond, MMLU-Pro default): the question with its lettered options, then an
  instruction to put the letter in `\boxed{}` (what `multiple_choice_reward` reads first).
- `luffy`: the question alone in the model's chat template: LUFFY's `eval_scripts/generate_vllm.py` with its
  default `template='own'` (it drops the system prompt of its data files and applies the chat template to the
  user message). Use it to reproduce LUFFY's prompts exactly.
- `qwen_math`: the Qwen2.5-Math system prompt ("Please reason step by step, and put your final answer within
  \boxed{}.") and the question as the user message (LUFFY's `template='qwen'`).
- `plain`: the question alone (General Points default: its prompt already states the answer format).
- `raw`: the question alone as plain text, no chat template (base models).

Any other string containing `{question}` is used as the user message of a custom template.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from amft_trl.math_data import DEFAULT_INSTRUCTION

__all__ = [
    "MULTIPLE_CHOICE_INSTRUCTION",
    "QWEN_MATH_SYSTEM_PROMPT",
    "TEMPLATES",
    "PromptTemplate",
    "get_template",
]

QWEN_MATH_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
MULTIPLE_CHOICE_INSTRUCTION = (
    "Answer with the letter of the correct option. Please reason step by step, and put the letter of your "
    "final answer within \\boxed{}."
)


@dataclass(frozen=True)
class PromptTemplate:
    """How a question becomes the model's input.

    Attributes:
        name: the template's name (recorded in the results).
        user: the user message; `{question}` is replaced by the question (other braces are left alone).
        system: an optional system message.
        chat: render with the tokenizer's chat template (falls back to plain text when it has none).
        chat_template_kwargs: extra arguments of the chat template (`GRPOConfig.chat_template_kwargs`, e.g.
            `{"enable_thinking": False}`), so that a model is evaluated on the rendering it was trained with.
    """

    name: str
    user: str = "{question}"
    system: str | None = None
    chat: bool = True
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if "{question}" not in self.user:
            raise ValueError(f"Prompt template {self.name!r}: the user message must contain '{{question}}'.")

    def messages(self, question: str | Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """The chat messages for one question. A question given as messages (a conversational prompt) is
        used as is."""
        if not isinstance(question, str):
            return [dict(m) for m in question]
        question = question.strip()
        # The template's own words already in the question (e.g. a dataset that ships the instruction): not twice.
        extra = self.user.replace("{question}", "").strip()
        user = question if extra and extra in question else self.user.replace("{question}", question)
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, {"role": "user", "content": user}]

    def render(self, question: str | Sequence[dict[str, Any]], tokenizer: Any | None) -> tuple[str, bool]:
        """The prompt text for one question, and whether the tokenizer's chat template produced it."""
        messages = self.messages(question)
        if self.chat and tokenizer is not None and getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True, **self.chat_template_kwargs
            )
            return text, True
        return "\n\n".join(str(m.get("content", "")) for m in messages), False

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable description (recorded in `results.json`)."""
        return asdict(self)


TEMPLATES: dict[str, PromptTemplate] = {
    "boxed": PromptTemplate("boxed", "{question}\n\n" + DEFAULT_INSTRUCTION),
    "multiple_choice": PromptTemplate("multiple_choice", "{question}\n\n" + MULTIPLE_CHOICE_INSTRUCTION),
    "luffy": PromptTemplate("luffy"),
    "qwen_math": PromptTemplate("qwen_math", system=QWEN_MATH_SYSTEM_PROMPT),
    "plain": PromptTemplate("plain"),
    "raw": PromptTemplate("raw", chat=False),
}


def get_template(spec: str | PromptTemplate, system_prompt: str | None = None) -> PromptTemplate:
    """A built-in template by name, a custom one from a string with `{question}`, or `spec` itself.

    Args:
        spec: a name from `TEMPLATES`, a user-message string containing `{question}`, or a `PromptTemplate`.
        system_prompt: replaces the template's system message when given.

    Raises:
        ValueError: for an unknown name that is not a template string either.
    """
    if isinstance(spec, PromptTemplate):
        template = spec
    elif spec in TEMPLATES:
        template = TEMPLATES[spec]
    elif "{question}" in spec:
        template = PromptTemplate("custom", spec)
    else:
        raise ValueError(
            f"Unknown prompt template {spec!r}: use one of {sorted(TEMPLATES)} or a string containing "
            "'{question}'."
        )
    return replace(template, system=system_prompt) if system_prompt is not None else template
