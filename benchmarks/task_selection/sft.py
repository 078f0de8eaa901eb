"""Usage: python sft.py TASK [LR] [STEPS] -> short SFT on correct demonstrations, re-measure on the 60 held-out problems."""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch
from common import evaluate, load
from tasks import problems, render

task = sys.argv[1]
lr = float(sys.argv[2]) if len(sys.argv) > 2 else 5e-5
steps = int(sys.argv[3]) if len(sys.argv) > 3 else 30
bs = 8
torch.manual_seed(0)
model, tok = load()
test = problems(task, 60, "test")
train = problems(task, min(steps * bs, 78) if task == "gp" else steps * bs, "train")


def batch(items):
    ids, labels = [], []
    for p in items:
        pr = tok(render(tok, p["user"]), add_special_tokens=False).input_ids
        co = tok(p["demo"] + tok.eos_token, add_special_tokens=False).input_ids
        ids.append(pr + co)
        labels.append([-100] * len(pr) + co)
    L = max(map(len, ids))
    pad = tok.pad_token_id
    x = torch.tensor([i + [pad] * (L - len(i)) for i in ids])
    y = torch.tensor([lab + [-100] * (L - len(lab)) for lab in labels])
    m = torch.tensor([[1] * len(i) + [0] * (L - len(i)) for i in ids])
    return x, y, m


opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
model.train()
step_s, losses, mid = [], [], None
for step in range(steps):
    items = [train[(step * bs + j) % len(train)] for j in range(bs)]
    t = time.perf_counter()
    x, y, m = batch(items)
    loss = model(input_ids=x, attention_mask=m, labels=y).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    step_s.append(time.perf_counter() - t)
    losses.append(loss.item())
    if step + 1 == steps // 2:
        mid = evaluate(model, tok, task, test, sampled=False)["greedy_acc"]
        model.train()
    print(step, round(loss.item(), 3), round(step_s[-1], 2), flush=True)
r = evaluate(model, tok, task, test, k=4, sampled=True)
r.update(
    task=task,
    sft_lr=lr,
    sft_steps=steps,
    sft_bs=bs,
    s_per_sft_step=sum(step_s) / len(step_s),
    sft_loss_first=losses[0],
    sft_loss_last=sum(losses[-5:]) / 5,
    greedy_acc_mid=mid,
    s_per_problem=(r["greedy_s"] + r["sample_s"]) / len(test),
)
print(json.dumps(r, indent=1))
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "sft_results.jsonl"), "a") as f:
    f.write(json.dumps(r) + "\n")
