"""Candidate tasks: each returns a list of problems {"user": str, "answer": int|None, "demo": str, ...}.

Prompts are rendered through the tokenizer's chat template (add_generation_prompt=True) in `render`.
Scoring: last integer in the completion == answer; for General Points the module's reward.
"""

from __future__ import annotations

import importlib.util
import random
import re

INT_RE = re.compile(r"-?\d+")
SUFFIX = " Answer with just the number."


def last_int(text: str):
    m = INT_RE.findall(text.replace(",", ""))
    return int(m[-1]) if m else None


def _demo_module():
    spec = importlib.util.spec_from_file_location("amft_demo", "/work/main/examples/demo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def gen_add2(rng):
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return {
        "user": f"What is {a} + {b}?" + SUFFIX,
        "answer": a + b,
        "demo": f"{a} + {b} = {a + b}. The answer is {a + b}.",
    }


def gen_mul21(rng):
    a, b = rng.randint(10, 99), rng.randint(2, 9)
    return {
        "user": f"What is {a} * {b}?" + SUFFIX,
        "answer": a * b,
        "demo": f"{a} * {b} = {a * b}. The answer is {a * b}.",
    }


def gen_sum3(rng):
    a, b, c = (rng.randint(1, 30) for _ in range(3))
    s = a + b + c
    return {
        "user": f"What is {a} + {b} + {c}?" + SUFFIX,
        "answer": s,
        "demo": f"{a} + {b} + {c} = {s}. The answer is {s}.",
    }


def gen_abc(rng):
    a, b, c = (rng.randint(1, 9) for _ in range(3))
    v = a + b * c
    return {
        "user": f"What is {a} + {b} * {c}?" + SUFFIX,
        "answer": v,
        "demo": f"{b} * {c} = {b * c}, {a} + {b * c} = {v}. The answer is {v}.",
    }


GENS = {"add2": gen_add2, "mul21": gen_mul21, "sum3": gen_sum3, "abc": gen_abc}


def problems(task: str, n: int, split: str):
    """Deterministic problems; 'test' and 'train' use different seeds and train excludes test items."""
    if task == "gp":
        from amft_trl.tasks import general_points as gp

        demo = _demo_module()
        hands = gp.generate_hands(
            n,
            split=split,
            face_card_rule="id",
            num_cards=demo.NUM_CARDS,
            target=demo.TARGET,
            split_fractions=demo.SPLIT_FRACTIONS,
        )
        return [
            {
                "user": demo.prompt(h, "id"),
                "answer": None,
                "cards": h,
                "rule": "id",
                "target": demo.TARGET,
                "demo": demo.answer(h, "id"),
            }
            for h in hands
        ]
    gen = GENS[task]
    if split == "test":
        rng = random.Random(1234)
        return [gen(rng) for _ in range(n)]
    test = {p["user"] for p in problems(task, 60, "test")}
    rng, out = random.Random(99), []
    while len(out) < n:
        p = gen(rng)
        if p["user"] not in test:
            out.append(p)
    return out


def score(task: str, probs, completions):
    """1.0/0.0 per completion; len(completions) == k * len(probs), grouped per problem (repeat_interleave order)."""
    k = len(completions) // len(probs)
    rep = [p for p in probs for _ in range(k)]
    if task == "gp":
        from amft_trl.tasks import general_points as gp

        return gp.general_points_reward(
            completions,
            cards=[p["cards"] for p in rep],
            face_card_rule=[p["rule"] for p in rep],
            target=[p["target"] for p in rep],
        )
    return [1.0 if last_int(c) == p["answer"] else 0.0 for c, p in zip(completions, rep)]


def render(tok, user: str) -> str:
    return tok.apply_chat_template(
        [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
    )
