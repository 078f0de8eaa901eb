"""Helpers shared by the reward functions: turning a TRL completion into the text to grade.

TRL passes a reward function either standard completions (`str`) or conversational ones (a list of
`{"role": ..., "content": ...}` messages). Model output is untrusted: every helper here accepts
anything and degrades to an empty string instead of raising.
"""

from __future__ import annotations

import re
from collections import deque
from typing import Any

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

_BOXED_RE = re.compile(r"\\boxed\s*\{")


def last_match(pattern: re.Pattern[str], text: str) -> re.Match[str] | None:
    """The last non-overlapping match of `pattern` in `text`, or None (one linear scan)."""
    tail = deque(pattern.finditer(text), maxlen=1)
    return tail[0] if tail else None


def completion_to_text(completion: Any) -> str:
    """Return the text of one completion, standard (`str`) or conversational (list of messages).

    For a conversational completion the content of the last assistant message is used (the last message
    when none has `role == "assistant"`). Content given as a list of parts (`{"type": "text", "text": ...}`)
    is joined. Anything unexpected (None, numbers, malformed messages) gives `""`.
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return _content_to_text(completion.get("content"))
    if isinstance(completion, (list, tuple)):
        messages = [m for m in completion if isinstance(m, dict)]
        if not messages:
            return ""
        assistant = [m for m in messages if m.get("role") == "assistant"]
        return _content_to_text((assistant or messages)[-1].get("content"))
    return ""


def _content_to_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
        return "".join(parts)
    return ""


def final_answer_segment(text: str) -> str | None:
    """Return the part of `text` that holds the final answer, or None when there is none.

    - with a closing `</think>`: only the text after the last one;
    - with an opening `<think>` that is never closed (reasoning cut off): None;
    - otherwise the whole text.
    """
    close = text.rfind(THINK_CLOSE)
    if close != -1:
        return text[close + len(THINK_CLOSE) :]
    if THINK_OPEN in text:
        return None
    return text


def count_boxed(text: str) -> int:
    r"""Number of `\boxed{` openings in `text`."""
    return len(_BOXED_RE.findall(text))


def last_boxed_content(text: str, max_chars: int | None = None) -> str | None:
    r"""Content of the last `\boxed{...}` in `text`, with balanced braces, or None.

    None when there is no `\boxed{`, when the last one is never closed, or when its content is longer
    than `max_chars`. The scan is linear and stops after `max_chars` characters.
    """
    last = last_match(_BOXED_RE, text)
    if last is None:
        return None
    start = last.end()
    depth = 1
    limit = len(text) if max_chars is None else min(len(text), start + max_chars + 1)
    i = start
    while i < limit:
        ch = text[i]
        if ch == "\\" and i + 1 < limit and text[i + 1] in "{}":
            i += 2  # an escaped brace does not open or close a group
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
        i += 1
    return None
