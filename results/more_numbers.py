"""The figures results/README quotes beside plot.py's tables, recomputed from the committed logs with plot.py's
own helpers (run from the repository root: python results/more_numbers.py):
  GSM8K sweep: paired ratios of per-seed optimal LRs between ranks; held-out loss between ranks at one LR.
  RL: rank 1 minus FullFT in the middle of the run (steps 11-20), each at its best LR.
  Batch size on facts: the gap's growth from batch 10 to 40 at each common LR, and with the divergence rule off.
  Capacity decision: the two-seed figures from capacity_k/full_eval.txt (bits on all K facts)."""
import math
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import plot  # noqa: E402

R = Path(__file__).resolve().parent
est = lambda d, f="{:+.4f}": f"{f.format(d[0])} [{f.format(d[1])}, {f.format(d[2])}]"

print("GSM8K, 20 steps: optimal LR of one rank / another's, per-seed parabola optima paired by seed (t on log ratio)")
by = plot.group(plot.main_sweep(plot.load_runs(R / "sft_gsm8k")), "rank")
opt = {k: plot.optimal_lr_stats(rs)["seed_opt"] for k, rs in by.items()}   # {seed: log10 optimal LR}
for a, b in ((16, 256), (64, 256), (4, 256), (1, 256), (1, 16)):
    m, lo, hi = plot.paired_gap(opt[a], opt[b])
    n = len(set(opt[a]) & set(opt[b]))
    print(f"  rank {a} / rank {b}: {10 ** m:.2f}x [{10 ** lo:.2f}, {10 ** hi:.2f}] ({n} seeds)")
print("GSM8K, 20 steps: held-out loss at LR 9.25e-4 (the grid's central point, 7x the formula), paired by seed")
at = lambda k: {r["seed"]: plot.final_loss(r) for r in by[k] if math.isclose(r["lr"], 9.25e-4, rel_tol=1e-2)}
for a, b in ((1, 256), (16, 256)):
    A, B = at(a), at(b)
    print(f"  rank {a} minus rank {b}: {est(plot.paired_gap(A, B))} ({len(set(A) & set(B))} seeds)")

print("RL: mean sampled reward over steps 11-20, rank 1 minus FullFT, each at its best LR, paired by seed")
rl = plot.group(plot.main_sweep(plot.load_runs(R / "rl"), rl=True), "rank")
def mid(rs):
    steps = lambda r: np.asarray(r["train"][0])
    return {r["seed"]: float(np.asarray(r["train"][1])[(steps(r) >= 11) & (steps(r) <= 20)].mean())
            for r in plot.at_best_lr(rs)}
print(f"  {est(plot.paired_gap(mid(rl[1]), mid(rl[0])), '{:+.3f}')}")

for study, layer in (("batch_facts", "29.down_proj"), ("batch_up", "29.up_proj")):
    loss = defaultdict(dict)   # (rank, batch, lr) -> {seed: final loss}, diverged runs left out
    for r in plot.load_runs(R / study):
        if not r["diverged"]:
            loss[(r["rank"], r["batch_size"], r["lr"])][r["seed"]] = plot.final_loss(r)
    print(f"batch size, 100 facts, {layer}: LoRA's gap to FullFT at batch 40 minus at batch 10, paired by seed")
    gap = lambda k, bs, lr_k, lr_f: {s: v - loss[(0, bs, lr_f)][s] for s, v in loss.get((k, bs, lr_k), {}).items()
                                     if s in loss.get((0, bs, lr_f), {})}
    for lr in sorted({lr for _, _, lr in loss}):
        for k in (32, 128):
            g40, g10 = gap(k, 40, lr, lr), gap(k, 10, lr, lr)
            if len(set(g40) & set(g10)) >= 2:
                print(f"  both arms at LR {lr:.3g}, rank {k}: {est(plot.paired_gap(g40, g10), '{:+.3f}')}")
    # the divergence rule off: an arm's best LR is the lowest mean over the seeds that survived there
    best = lambda k, bs: min((lr for kk, b, lr in loss if (kk, b) == (k, bs)),
                             key=lambda lr: np.mean(list(loss[(k, bs, lr)].values())))
    for k in (32, 128):
        g40, g10 = gap(k, 40, best(k, 40), best(0, 40)), gap(k, 10, best(k, 10), best(0, 10))
        print(f"  each arm at its best LR counting diverged LRs' survivors, rank {k}: "
              f"{est(plot.paired_gap(g40, g10), '{:+.2f}')} ({len(set(g40) & set(g10))} seeds)")

print("capacity decision, rank 1 at 16,000 steps: bits stored on all K facts (capacity_k/full_eval.txt), over seeds")
full = {}   # (K, seed) -> bits
for line in open(R / "capacity_k" / "full_eval.txt"):
    name = line.split()[0] if line.strip() and not line.startswith("#") else ""
    if name.startswith("sft_facts") and "_r1_" in name and name.endswith("_16000"):
        full[(int(name[9:name.index("_r1_")]), 1 if "_s1_" in name else 0)] = float(line.split()[1])
two = sorted({k for k, s in full if s == 1})
for k in two:
    m, lo, hi = plot.mean_ci([full[(k, s)] for s in (0, 1)])
    print(f"  K = {k}: {m:.0f} [{lo:.0f}, {hi:.0f}] bits, "
          f"{m / 2112:.3f} [{lo / 2112:.3f}, {hi / 2112:.3f}] bits/param (2 seeds)")
if len(two) == 2:
    m, lo, hi = plot.log_ratio_ci(*({s: full[(k, s)] for s in (0, 1)} for k in reversed(two)))
    print(f"  K = {two[1]} over K = {two[0]}, paired by seed: {m:.3f}x [{lo:.3f}, {hi:.3f}]")
