r"""Verifiable rewards with TRL's reward-function signature.

Every reward here is `f(completions, **dataset_columns) -> list[float | None]`, accepts standard (`str`)
and conversational (list of `{"role", "content"}` messages) completions, and never raises on model
output: garbage scores 0.0.

- `math_accuracy_reward(completions, solution)`: math-verify equivalence of the final answer with the
  gold `solution` (TRL's `accuracy_reward` does the grading), `None` when the gold cannot be parsed.
- `boxed_format_reward(completions)`: exactly one well-formed `\boxed{}` in the final answer.
- `multiple_choice_reward(completions, answer)`: the final choice letter against `answer`.
- `general_points_reward(completions, cards, face_card_rule, target)`: see
  `amft_trl.tasks.general_points`.

Time bound of `math_accuracy_reward`: math-verify's own timeouts use SIGALRM, which only works in the
main thread, and cannot interrupt a long computation inside C code anyway (`\boxed{9^{9^{9^{9}}}}` makes
sympy compute a number with billions of digits). So grading runs in a separate worker process
(`_math_worker.py`, one per training process, started on first use) and every request to it is bounded
by `MATH_REWARD_TIMEOUT_SECONDS`; a late worker is killed (SIGKILL works whatever it is doing) and the
completion scores 0.0. This works the same from any thread. Input is also capped: an answer longer than
`MATH_MAX_ANSWER_CHARS`, or nested deeper than `MATH_MAX_ANSWER_DEPTH`, scores 0.0 without being
parsed. If the worker cannot be started at all, grading falls back to TRL's `accuracy_reward`
in-process (with a warning): then only the input caps apply.

Shorthand LaTeX: TRL's `accuracy_reward` parses the answer without math-verify's "malformed operator"
fixes, while math-verify parses the gold with them, so `\boxed{\frac12}` scored 0.0 against `\frac{1}{2}` but
1.0 the other way round. Both the answer and the gold are now written out the way TeX reads them before grading
(`_expand_tex_shorthand`, linear time): a single-token argument of `\frac`, `\dfrac`, `\tfrac`, `\cfrac`,
`\binom` and `\sqrt` is braced (`\frac123` is `\frac{1}{2}3`, as TeX renders it, not `\frac{1}{23}`), and
spacing commands (`\,`, `\!`, `\;`, `\quad`, `~`, ...) are dropped.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from amft_trl._completions import (
    completion_to_text,
    count_boxed,
    final_answer_segment,
    last_boxed_content,
    last_match,
)
from amft_trl.tasks.general_points import general_points_reward

__all__ = [
    "MATH_MAX_ANSWER_CHARS",
    "MATH_MAX_ANSWER_DEPTH",
    "MATH_REWARD_TIMEOUT_SECONDS",
    "MATH_WORKER_START_TIMEOUT_SECONDS",
    "boxed_format_reward",
    "general_points_reward",
    "math_accuracy_reward",
    "multiple_choice_reward",
]

logger = logging.getLogger(__name__)

#: Upper bound, in seconds, on grading one completion (and on parsing one gold answer). A call to
#: `math_accuracy_reward` returns within about `(len(completions) + distinct golds) * this`, plus the
#: time to (re)start the worker process after a kill.
MATH_REWARD_TIMEOUT_SECONDS: float = 5.0
#: Longest final answer (the content of the last `\boxed{}`, or the tail of the answer text when there is
#: no box) that is handed to math-verify; a longer boxed answer scores 0.0.
MATH_MAX_ANSWER_CHARS: int = 2000
#: Deepest bracket nesting ((), [], {} together) of a final answer handed to math-verify; a deeper answer
#: scores 0.0 unparsed (math-verify's parsing time grows exponentially with nesting).
MATH_MAX_ANSWER_DEPTH: int = 32
#: How long to wait for the worker process to import math-verify and report ready.
MATH_WORKER_START_TIMEOUT_SECONDS: float = 60.0

_WORKER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_math_worker.py")


class _WorkerUnavailable(RuntimeError):
    pass


class _MathGradingWorker:
    """A child process running `_math_worker.py`, with a per-request deadline. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._replies: queue.Queue | None = None
        self._ready = False
        self.broken_reason: str | None = None

    def _spawn(self) -> None:
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        proc = subprocess.Popen(
            [sys.executable, _WORKER_SCRIPT],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            env=env,
        )
        replies: queue.Queue = queue.Queue()

        def pump(stream: Any = proc.stdout, sink: queue.Queue = replies) -> None:
            try:
                for line in stream:
                    sink.put(line)
            except (OSError, ValueError):
                pass
            sink.put(None)  # end of stream: the process is gone

        threading.Thread(target=pump, name="amft-math-grader-reader", daemon=True).start()
        self._proc, self._replies, self._ready = proc, replies, False

    def _kill(self) -> None:
        proc, self._proc, self._replies, self._ready = self._proc, None, None, False
        if proc is None:
            return
        try:
            proc.kill()
            proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            pass
        for stream in (proc.stdin, proc.stdout):
            try:
                stream.close()
            except (OSError, ValueError, AttributeError):
                pass

    def _get(self, deadline: float) -> dict | None:
        assert self._replies is not None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                line = self._replies.get(timeout=remaining)
            except queue.Empty:
                return None
            if line is None:
                return None
            try:
                reply = json.loads(line)
            except json.JSONDecodeError:
                continue  # stray output; keep waiting for the real reply
            if isinstance(reply, dict):
                return reply

    def _ensure_ready(self) -> None:
        if self._proc is None or self._proc.poll() is not None:
            self._kill()
            self._spawn()
        if not self._ready:
            reply = self._get(time.monotonic() + MATH_WORKER_START_TIMEOUT_SECONDS)
            if not reply or not reply.get("ready"):
                reason = (reply or {}).get("error", "no reply")
                self._kill()
                raise _WorkerUnavailable(f"math grading worker did not start: {reason}")
            self._ready = True

    def request(self, payload: dict, timeout: float) -> dict | None:
        """Send one request; the reply, or None when it is late or the worker died (it is then killed)."""
        with self._lock:
            self._ensure_ready()
            assert self._proc is not None and self._proc.stdin is not None
            try:
                self._proc.stdin.write(json.dumps(payload) + "\n")
                self._proc.stdin.flush()
            except (OSError, ValueError):
                self._kill()
                return None
            reply = self._get(time.monotonic() + timeout)
            if reply is None:
                self._kill()
                self._spawn()  # start the replacement now so its imports overlap with other work
            return reply

    def close(self) -> None:
        """Stop the worker process."""
        with self._lock:
            self._kill()


_worker: _MathGradingWorker | None = None
_worker_guard = threading.Lock()
_fallback_warned = False


def _get_worker() -> _MathGradingWorker:
    global _worker
    with _worker_guard:
        if _worker is None:
            _worker = _MathGradingWorker()
        return _worker


def _shutdown_worker() -> None:
    if _worker is not None:
        _worker.close()


def _forget_worker_in_child() -> None:
    # After fork the child must not share the parent's pipes; it starts its own worker when needed.
    global _worker, _worker_guard
    _worker, _worker_guard = None, threading.Lock()


atexit.register(_shutdown_worker)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_worker_in_child)


def _grade_in_process(gold: str, answer: str) -> float | None:
    from trl.rewards import accuracy_reward

    try:
        return accuracy_reward([[{"role": "assistant", "content": answer}]], [gold])[0]
    except Exception:  # math-verify should not raise, but a reward must not crash a run
        return 0.0


def _gold_ok_in_process(gold: str) -> bool:
    from math_verify import parse

    in_main = threading.current_thread() is threading.main_thread()
    try:
        return any(not isinstance(item, str) for item in parse(gold, parsing_timeout=5 if in_main else None))
    except Exception:
        return False


# Macros whose arguments TeX lets be a single token (`\frac12` is `\frac{1}{2}`, `\sqrt2` is `\sqrt{2}`), with their
# number of arguments. math-verify's answer parsing (TRL's `accuracy_reward`) reads only braced arguments, while its
# default parsing of the gold rewrites some shorthand by regex, not always as TeX does (`\frac123` becomes
# `\frac{1}{23}`; TeX renders (1/2)3). Both sides are therefore expanded here, the way TeX reads them.
_SINGLE_TOKEN_ARGUMENT_MACROS = {
    "frac": 2, "dfrac": 2, "tfrac": 2, "cfrac": 2, "binom": 2, "dbinom": 2, "tbinom": 2, "sqrt": 1,
}  # fmt: skip
# Spacing commands: in math mode they only change spacing (`1\,000` is 1000, `x\,y` is xy).
_SPACING_MACROS = {",", ":", ";", "!", ">", " ", "quad", "qquad", "thinspace", "medspace", "thickspace"}
_SPACING_CHARACTERS = {"~"}
# Brace groups deeper than this are copied as they are (hostile input; answers deeper than MATH_MAX_ANSWER_DEPTH
# are refused anyway).
_EXPAND_MAX_DEPTH = 64


def _closing_braces(text: str) -> list[int]:
    r"""For each index of `text`, the index just past the `}` that closes a `{` there (len(text) if unclosed).

    One pass with a stack; escaped braces (`\{`, `\}`) and other control symbols are skipped.
    """
    closing = [0] * len(text)
    stack: list[int] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            stack.append(i)
        elif ch == "}" and stack:
            closing[stack.pop()] = i + 1
        i += 1
    for opened in stack:
        closing[opened] = len(text)
    return closing


def _tex_token(text: str, i: int, closing: list[int]) -> int:
    """End of the TeX token starting at `text[i]`: a control word, a control symbol, a brace group or a character."""
    if text[i] == "\\":
        j = i + 1
        if j < len(text) and text[j].isalpha():
            while j < len(text) and text[j].isalpha():
                j += 1
            return j
        return min(j + 1, len(text))
    return closing[i] if text[i] == "{" else i + 1


def _expand_tex_shorthand(text: str) -> str:
    r"""`text` with the shorthand TeX accepts written out: single-token macro arguments braced, spacing removed.

    `\frac12` -> `\frac{1}{2}`, `\frac123` -> `\frac{1}{2}3` (as TeX reads it), `\sqrt2` -> `\sqrt{2}`,
    `\sqrt[3]2` -> `\sqrt[3]{2}`, `\frac1\pi` -> `\frac{1}{\pi}`, `\dfrac12` -> `\dfrac{1}{2}`; `\,`, `\:`, `\;`,
    `\!`, `\ `, `\quad`, `~` and the like are removed. Linear in the length of `text` (brace groups nested deeper
    than `_EXPAND_MAX_DEPTH` are copied unchanged); never raises.
    """
    closing = _closing_braces(text)
    out: list[str] = []
    _expand_into(text, 0, len(text), 0, closing, out)
    return "".join(out)


def _group(text: str, start: int, end: int, depth: int, closing: list[int], out: list[str]) -> None:
    """Copy the brace group `text[start:end]` (from `{` to its `}`, or to the end when unclosed), expanded."""
    closed = end - start >= 2 and text[end - 1] == "}"
    inner_end = end - 1 if closed else end
    out.append("{")
    if depth < _EXPAND_MAX_DEPTH:
        _expand_into(text, start + 1, inner_end, depth + 1, closing, out)
    else:
        out.append(text[start + 1 : inner_end])
    if closed:
        out.append("}")


def _expand_into(text: str, start: int, stop: int, depth: int, closing: list[int], out: list[str]) -> None:
    i = start
    while i < stop:
        ch = text[i]
        if ch in _SPACING_CHARACTERS:
            i += 1
            continue
        if ch == "{":
            end = min(_tex_token(text, i, closing), stop)
            _group(text, i, end, depth, closing, out)
            i = end
            continue
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        end = min(_tex_token(text, i, closing), stop)
        name = text[i + 1 : end]
        i = end
        if name in _SPACING_MACROS:
            continue
        out.append("\\" + name)
        arguments = _SINGLE_TOKEN_ARGUMENT_MACROS.get(name)
        if arguments is None:
            continue
        if name == "sqrt":  # optional index: \sqrt[3]{x}
            j = _skip_spaces(text, i, stop)
            if j < stop and text[j] == "[":
                close = text.find("]", j, stop)
                if close != -1:
                    out.append(text[j : close + 1])
                    i = close + 1
        for _ in range(arguments):
            j = _skip_spaces(text, i, stop)
            if j >= stop or text[j] in "}]":
                break
            end = min(_tex_token(text, j, closing), stop)
            if text[j] == "{":
                _group(text, j, end, depth, closing, out)
            else:
                out.append("{" + text[j:end] + "}")
            i = end


def _skip_spaces(text: str, i: int, stop: int) -> int:
    while i < stop and text[i].isspace():
        i += 1
    return i


_GOLD_ANCHOR_RE = re.compile(r"\\boxed|(?<!\\)\$|\\\(|\\\[")


def _normalize_gold(gold: Any) -> str:
    r"""The gold answer in a form math-verify parses reliably.

    Dataset answers are usually bare LaTeX (`(2, 1)`, `x^2+2x+1`, `\sqrt{2}`), which math-verify's default
    extraction misreads or drops; wrapped in `\boxed{}` they parse. A gold that already carries its own
    anchor (`\boxed`, `$...$`, `\(...\)`, `\[...\]`), e.g. a full worked solution, is kept as is.
    """
    text = "" if gold is None else _expand_tex_shorthand(str(gold)).strip()
    if not text or _GOLD_ANCHOR_RE.search(text):
        return text
    return "\\boxed{" + text + "}"


def _grading_text(completion: Any) -> str | None:
    """What math-verify gets to see for one completion, or None when it scores 0.0 unseen."""
    segment = final_answer_segment(completion_to_text(completion))
    if segment is None or not segment.strip():
        return None
    if count_boxed(segment):
        boxed = last_boxed_content(segment, max_chars=MATH_MAX_ANSWER_CHARS)
        if boxed is None or not boxed.strip():
            return None  # the last box is unclosed, empty or too long: malformed final answer
        text = "\\boxed{" + _expand_tex_shorthand(boxed) + "}"
    else:
        text = _expand_tex_shorthand(segment[-MATH_MAX_ANSWER_CHARS:])
    return None if _nesting_depth(text) > MATH_MAX_ANSWER_DEPTH else text


def _nesting_depth(text: str) -> int:
    depth = deepest = 0
    for ch in text:
        if ch in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in ")]}":
            depth = max(depth - 1, 0)
    return deepest


#: The one line a missing `math` extra gives.
MATH_EXTRA_MISSING = "the math reward needs math-verify: pip install 'amft-trl[math]'"


def _require_math_verify() -> None:
    """math-verify is the `math` extra, not a core dependency: say so in one line when it is missing."""
    import importlib.util

    if importlib.util.find_spec("math_verify") is None:
        raise ImportError(MATH_EXTRA_MISSING)


def math_accuracy_reward(
    completions: Sequence[Any], solution: Sequence[str], **kwargs: Any
) -> list[float | None]:
    r"""Score 1.0 when a completion's final answer is mathematically equivalent to `solution`, else 0.0.

    The final answer is the content of the last `\boxed{...}` (balanced braces) when there is one, and
    only the text after the last `</think>` is considered when that tag is present (an unclosed `<think>`
    or nothing after `</think>` scores 0.0). Grading is TRL's `accuracy_reward` (math-verify), run in a
    worker process with a deadline of `MATH_REWARD_TIMEOUT_SECONDS` per completion, so it is safe to call
    from any thread and a pathological answer cannot stall training. Shorthand LaTeX that TeX renders
    (`\frac12`, `\sqrt2`, `\dfrac34`, `1\,000`) is read as TeX reads it, in the answer and in the gold alike.

    Args:
        completions: standard (`str`) or conversational (list of messages) completions.
        solution: the gold answer of each completion's prompt (e.g. `"\frac{1}{3}"`, `"(2, 1)"`, `"42"`).
            A bare answer is graded as if boxed (math-verify reads bare LaTeX unreliably); a gold with its
            own `\boxed{}` or `$...$` (e.g. a full worked solution) is used as is.
        **kwargs: other dataset columns, ignored.

    Returns:
        One reward per completion: 1.0, 0.0, or None when the gold answer cannot be parsed (TRL then
        skips the example).

    Raises:
        ImportError: math-verify is not installed (`pip install 'amft-trl[math]'`).
    """
    _require_math_verify()
    golds = [_normalize_gold(s) for s in solution]
    if len(golds) != len(completions):
        raise ValueError(
            f"math_accuracy_reward got {len(completions)} completions but {len(golds)} solutions."
        )
    texts = [_grading_text(c) for c in completions]

    worker = _get_worker()
    gold_ok: dict[str, bool] = {}
    rewards: list[float | None] = []
    for gold, text in zip(golds, texts):
        if worker.broken_reason is None:
            try:
                if gold not in gold_ok:
                    reply = worker.request({"op": "gold", "gold": gold}, MATH_REWARD_TIMEOUT_SECONDS)
                    gold_ok[gold] = bool(reply and reply.get("ok"))
                if not gold_ok[gold]:
                    rewards.append(None)
                elif text is None:
                    rewards.append(0.0)
                else:
                    reply = worker.request(
                        {"op": "grade", "gold": gold, "answer": text}, MATH_REWARD_TIMEOUT_SECONDS
                    )
                    value = None if reply is None else reply.get("reward", 0.0)
                    rewards.append(float(value) if isinstance(value, (int, float)) else 0.0)
                continue
            except (_WorkerUnavailable, OSError) as exc:
                worker.broken_reason = str(exc)
                _warn_fallback(worker.broken_reason)
        # Fallback: no worker process; grade in this process (input cap only, no hard deadline).
        if gold not in gold_ok:
            gold_ok[gold] = _gold_ok_in_process(gold)
        if not gold_ok[gold]:
            rewards.append(None)
        elif text is None:
            rewards.append(0.0)
        else:
            value = _grade_in_process(gold, text)
            rewards.append(0.0 if value is None else float(value))
    return rewards


def _warn_fallback(reason: str) -> None:
    global _fallback_warned
    if not _fallback_warned:
        _fallback_warned = True
        logger.warning(
            "math_accuracy_reward: %s. Grading in-process instead: answers are length-capped but not "
            "time-bounded.",
            reason,
        )


def boxed_format_reward(completions: Sequence[Any], **kwargs: Any) -> list[float]:
    r"""Score 1.0 when the final answer holds exactly one well-formed, non-empty `\boxed{...}`, else 0.0.

    Only the text after the last `</think>` counts when that tag is present; an unclosed `<think>` scores
    0.0. Well-formed means balanced braces within `MATH_MAX_ANSWER_CHARS` characters.

    Args:
        completions: standard (`str`) or conversational (list of messages) completions.
        **kwargs: dataset columns, ignored.
    """
    rewards = []
    for completion in completions:
        segment = final_answer_segment(completion_to_text(completion))
        ok = False
        if segment is not None and count_boxed(segment) == 1:
            content = last_boxed_content(segment, max_chars=MATH_MAX_ANSWER_CHARS)
            ok = content is not None and bool(content.strip())
        rewards.append(1.0 if ok else 0.0)
    return rewards


# Choice letters: a single uppercase letter, optionally in parentheses, not followed by a word character.
_ANSWER_PHRASE_RE = re.compile(
    r"(?i:answer)(?:\s+(?i:is))?\s*[:：]?\s*(?:\*\*)?\s*\(?([A-Z])\)?(?![A-Za-z0-9_])"
)
_BOXED_CHOICE_RE = re.compile(r"^\(?([A-Z])\)?(?:[.:)]\s*.*|\s+.*)?$", re.DOTALL)
_LATEX_WRAPPER_RE = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\s*\{([^{}]*)\}")


def _extract_choice(text: str) -> str | None:
    segment = final_answer_segment(text)
    if segment is None or not segment.strip():
        return None
    if count_boxed(segment):
        boxed = last_boxed_content(segment, max_chars=200)
        if boxed is None:
            return None
        boxed = _LATEX_WRAPPER_RE.sub(r"\1", boxed).strip()
        match = _BOXED_CHOICE_RE.match(boxed)
        return match.group(1) if match else None
    last = last_match(_ANSWER_PHRASE_RE, segment)
    return last.group(1) if last else None


def _gold_letter(answer: Any) -> str | None:
    if isinstance(answer, bool):
        return None
    if isinstance(answer, int):
        return chr(ord("A") + answer) if 0 <= answer < 26 else None
    if isinstance(answer, str):
        stripped = answer.strip().strip("()").strip()
        if len(stripped) == 1 and "A" <= stripped.upper() <= "Z":
            return stripped.upper()
    return None


def multiple_choice_reward(
    completions: Sequence[Any], answer: Sequence[Any], **kwargs: Any
) -> list[float | None]:
    r"""Score 1.0 when a completion's final choice letter equals `answer`, else 0.0.

    The choice is read from the last `\boxed{...}` when there is one (`\boxed{C}`, `\boxed{(C)}`,
    `\boxed{\text{C}}`, `\boxed{C. 42}`), otherwise from the last phrase like "The answer is (C)",
    "the answer is C" or "Answer: C" (the letter must be uppercase, so "the answer is a number" is not
    read as choice A). Only text after the last `</think>` counts when that tag is present.

    Args:
        completions: standard (`str`) or conversational (list of messages) completions.
        answer: the gold choice of each prompt: a letter (`"C"`, `"(c)"`) or a 0-based index (`2`, as in
            MMLU-Pro's `answer_index`).
        **kwargs: other dataset columns, ignored.

    Returns:
        1.0 or 0.0 per completion; None when the gold answer is neither a letter nor an index.
    """
    if len(answer) != len(completions):
        raise ValueError(
            f"multiple_choice_reward got {len(completions)} completions but {len(answer)} answers."
        )
    rewards: list[float | None] = []
    for completion, gold in zip(completions, answer):
        gold_letter = _gold_letter(gold)
        if gold_letter is None:
            rewards.append(None)
            continue
        rewards.append(1.0 if _extract_choice(completion_to_text(completion)) == gold_letter else 0.0)
    return rewards
