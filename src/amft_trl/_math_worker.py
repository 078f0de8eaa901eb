"""Math grading worker: a child process that `amft_trl.rewards.math_accuracy_reward` talks to.

Run as a script (`python _math_worker.py`), not imported: it must not import the `amft_trl` package
(which pulls in torch and the trainer). It reads one JSON request per line on stdin and writes one JSON
reply per line on stdout:

- `{"op": "gold", "gold": str}` -> `{"ok": bool}`: whether math-verify parses the gold answer into a
  math object (a bare string fallback does not count);
- `{"op": "grade", "gold": str, "answer": str}` -> `{"reward": float | null}`: TRL's `accuracy_reward`
  applied to the (already extracted) final answer.

The parent enforces the time bound: it kills this process when a reply is late. The process runs in its
own main thread, so math-verify's SIGALRM timeouts also work here as an inner, best-effort bound.
"""

import json
import logging
import os
import sys

# Never let a module next to this file shadow a real one.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]


def _reply(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main() -> None:
    """Serve grading requests until stdin closes."""
    try:
        from math_verify import parse
        from trl.rewards import accuracy_reward
    except Exception as exc:  # reported to the parent, which falls back to in-process grading
        _reply({"ready": False, "error": f"{type(exc).__name__}: {exc}"})
        return
    for name in ("math_verify", "math_verify.parser", "math_verify.grader", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    _reply({"ready": True})

    for line in sys.stdin:
        try:
            request = json.loads(line)
            op = request.get("op")
            if op == "gold":
                parsed = parse(str(request["gold"]))
                _reply({"ok": any(not isinstance(item, str) for item in parsed)})
            elif op == "grade":
                completion = [{"role": "assistant", "content": str(request["answer"])}]
                reward = accuracy_reward([completion], [str(request["gold"])])[0]
                _reply({"reward": None if reward is None else float(reward)})
            else:
                _reply({"error": f"unknown op {op!r}"})
        except Exception as exc:
            _reply({"error": f"{type(exc).__name__}: {exc}"})


if __name__ == "__main__":
    main()
