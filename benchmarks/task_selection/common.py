import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
import time

import torch

torch.set_num_threads(1)
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402


def load():
    from amft_trl.embedded_model import embedded_model_path

    p = embedded_model_path()
    tok = AutoTokenizer.from_pretrained(p)
    model = AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32)
    model.eval()
    return model, tok


@torch.no_grad()
def generate(model, tok, texts, k=1, sample=False, max_new=24, bs=60):
    """Returns (completions [len(texts)*k, grouped per text], completion token lengths)."""
    side, tok.padding_side = tok.padding_side, "left"
    outs, lens = [], []
    eos = tok.eos_token_id
    for s in range(0, len(texts), bs):
        b = tok(texts[s : s + bs], return_tensors="pt", padding=True)
        kw = (
            dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, num_return_sequences=k)
            if sample
            else dict(do_sample=False)
        )
        o = model.generate(**b, max_new_tokens=max_new, pad_token_id=tok.pad_token_id, **kw)
        gen = o[:, b["input_ids"].shape[1] :]
        for row in gen:
            r = row.tolist()
            lens.append(r.index(eos) + 1 if eos in r else len(r))
        outs += tok.batch_decode(gen, skip_special_tokens=True)
    tok.padding_side = side
    return outs, lens


def evaluate(model, tok, task, probs, k=4, max_new=24, sampled=True, seed=0, raw=False):
    from tasks import render, score

    texts = [p["user"] if raw else render(tok, p["user"]) for p in probs]
    res = {}
    t = time.perf_counter()
    g, gl = generate(model, tok, texts, max_new=max_new)
    res["greedy_s"] = time.perf_counter() - t
    gs = score(task, probs, g)
    res["greedy_acc"] = sum(gs) / len(gs)
    res["greedy_len"] = sum(gl) / len(gl)
    res["greedy_examples"] = list(zip([p["user"] for p in probs[:6]], g[:6]))
    res["prompt_tokens"] = sum(len(tok(x).input_ids) for x in texts) / len(texts)
    if sampled:
        torch.manual_seed(seed)
        t = time.perf_counter()
        smp, sl = generate(model, tok, texts, k=k, sample=True, max_new=max_new, bs=30)
        res["sample_s"] = time.perf_counter() - t
        ss = score(task, probs, smp)
        res["sample_acc"] = sum(ss) / len(ss)
        groups = [ss[i * k : (i + 1) * k] for i in range(len(probs))]
        res["any_correct"] = sum(max(g_) > 0 for g_ in groups) / len(groups)
        res["mixed_groups"] = sum(0 < sum(g_) < k for g_ in groups) / len(groups)
        res["sample_len"] = sum(sl) / len(sl)
        res["sample_examples"] = smp[:8]
    return res
