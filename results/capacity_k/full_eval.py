"""Stored bits of a capacity run's final adapter on all K facts, two ways, and how the bits spread.

    python results/capacity_k/full_eval.py results/capacity_k/*/ > results/capacity_k/full_eval.txt

Each run folder keeps its final adapter in adapter/ (a copy of ckpt-<last>, a few KB). Per fact,
the bits stored are log2(10^4) minus the answer's loss in bits (plot.py's stored_bits), summed over
all K facts (the log's eval scores the first 200 and scales them to K):
- registered: the model's probabilities as they are;
- calibrated: with one temperature T on the answer logits, fitted to the K facts (a grid in log T,
  refined by a parabola), less its description cost, 0.5 log2(answer tokens) bits. The digit
  predictions are under-confident, so T < 1 gives back bits the registered estimate leaves out.
Per fact: stored (>= 90% of its 13.3 bits), none (<= 1 bit) or partly, registered and calibrated. Each run's
line is printed, and its figures written to full_eval.json in the runs' study folder (plot.py reads it).
"""
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import lora  # noqa: E402
import train_sft  # noqa: E402

TEMPS = np.exp(np.linspace(math.log(0.25), math.log(2.0), 43))
FACT_BITS = math.log2(1e4)


@torch.no_grad()
def answer_nll(model, examples, pad_id):
    """(facts, temperatures) summed answer NLL in nats of each fact at each temperature in TEMPS."""
    out = np.zeros((len(examples), len(TEMPS)))
    temps = torch.tensor(TEMPS, dtype=torch.float32)
    for start in range(0, len(examples), 64):
        chunk = examples[start:start + 64]
        x, at, y = lora.collate(chunk, pad_id, "cpu")
        z = model(x).flatten(0, 1)[at].float()  # (answer tokens, vocab)
        owner = torch.tensor([i for i, (_, m) in enumerate(chunk) for keep in m[1:] if keep])
        for j, T in enumerate(temps):
            nll = -torch.log_softmax(z / T, -1).gather(1, y[:, None])[:, 0]
            out[start:start + len(chunk), j] = torch.zeros(len(chunk)).index_add_(0, owner, nll).numpy()
    return out


def parabola_min(xs, ys, i):
    """(x, y) at the vertex of the parabola through the three points around index i (the point
    itself at the grid's edge)."""
    if i == 0 or i == len(xs) - 1:
        return xs[i], ys[i]
    a, b, c = np.polyfit(xs[i - 1:i + 2], ys[i - 1:i + 2], 2)
    if a <= 0:
        return xs[i], ys[i]
    x = -b / (2 * a)
    return x, a * x * x + b * x + c


def main(runs):
    print(f"{'run':<56}{'K':>5}{'registered':>12}{'calibrated':>12}{'T':>7}{'bits/param':>12}"
          f"{'stored':>8}{'partly':>8}{'none':>6}")
    for run in map(Path, runs):
        if not (run / "adapter").exists():
            continue
        args = json.loads(next(open(run / "log.jsonl")))["args"]
        k, seed = int(args["data"].split(":")[1]), int(args["seed"])
        base, tok, _, _ = lora.load_base(None, "cpu", "auto", [args["rank"]], threads=args["threads"] or 1)
        lora.load_adapter(base, run / "adapter")
        base.eval()
        examples = train_sft.tokenize(train_sft.facts(k, seed), tok, 512, args["data"])[0]
        nll = answer_nll(base, examples, tok.pad_id)
        bits = FACT_BITS - nll / math.log(2)  # (facts, temperatures)
        j1 = int(np.argmin(np.abs(TEMPS - 1.0)))
        total = bits.sum(0)
        jb = int(np.argmax(total))
        log_t, best = parabola_min(np.log(TEMPS), -total, jb)
        n_tokens = sum(sum(m[1:]) for _, m in examples)
        calibrated = -best - 0.5 * math.log2(n_tokens)
        reg = bits[:, j1]
        params = lora.count_parameters(base)
        rec = {"k": k, "seed": seed, "rank": args["rank"], "steps": args["steps"], "lr": args["lr"],
               "params": params, "registered": float(reg.sum()), "calibrated": float(calibrated),
               "temperature": float(math.exp(log_t)), "first_200_scaled": float(reg[:200].sum() * k / min(k, 200)),
               "stored": int((reg >= 0.9 * FACT_BITS).sum()), "none": int((reg <= 1).sum()),
               "partly": int(((reg > 1) & (reg < 0.9 * FACT_BITS)).sum()), "per_fact_sd": float(reg.std())}
        cal = bits[:, jb]  # the per-fact spread at the grid's best temperature
        rec |= {"stored_calibrated": int((cal >= 0.9 * FACT_BITS).sum()), "none_calibrated": int((cal <= 1).sum())}
        out_path = run.parent / "full_eval.json"   # beside the study's runs, where plot.py looks
        results = json.loads(out_path.read_text()) if out_path.exists() else {}
        results[run.name] = rec
        out_path.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
        print(f"{run.name:<56}{k:>5}{rec['registered']:>12.1f}{calibrated:>12.1f}{rec['temperature']:>7.3f}"
              f"{rec['registered'] / params:>12.3f}{rec['stored']:>8}{rec['partly']:>8}{rec['none']:>6}",
              flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
