"""Usage: python measure.py TASK [--raw]  -> appends a JSON line to results.jsonl"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import evaluate, load
from tasks import problems

task = sys.argv[1]
raw = "--raw" in sys.argv
t0 = time.perf_counter()
model, tok = load()
probs = problems(task, 60, "test")
r = evaluate(model, tok, task, probs, k=4, max_new=24, sampled=not raw, raw=raw)
r.update(
    task=task + (" raw" if raw else ""),
    total_s=time.perf_counter() - t0,
    s_per_problem=(r["greedy_s"] + r.get("sample_s", 0)) / len(probs),
)
print(json.dumps(r, indent=1))
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.jsonl"), "a") as f:
    f.write(json.dumps(r) + "\n")
