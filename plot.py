"""
plot.py: the figures of "LoRA Without Regret" (Schulman and Thinking Machines Lab, 2025) drawn from
the JSONL logs that train_sft.py and train_rl.py write.

    python plot.py out/                           # per figure: a PNG into out/, a summary table
    python plot.py out/ --to assets/ --smooth 9   # PNGs elsewhere, a wider moving average

It reads out/<run>/log.jsonl and nothing else. Runs are grouped by configuration (script, rank,
layers, batch size, data, ...); the learning rate is what a sweep varies within a configuration.
The "main sweep" is the SFT runs on all layers with the default LoRA settings at the most common
(data, batch size). A figure whose runs are missing is skipped with a line saying what to train.
Every figure it measures also goes to summary.json beside the figures (finding, estimate, 95%
interval, seeds).

    fig1_rank_curves.png    SFT loss against step per rank, the pointwise minimum over LRs
    fig2_lr_vs_loss.png     final loss against LR per rank, and LoRA's optimal LR over FullFT's
    fig3_batch_size.png     learning curves and final loss against batch size, LoRA dashed
    fig4_layers.png         final loss (and RL reward) against LR, LoRA on all / mlp / attn layers
    fig5_rl.png             RL reward against step per rank, and final reward against LR
    fig6_early_rank.png     rank 16 against a higher rank at one LR: the same start of training
    fig7_loss_vs_flops.png  loss against training FLOPs, LoRA against FullFT
    fig8_lora_norms.png     spectral norms of LoRA's A and B during training (the post's finding 11)
    fig9_capacity.png       the post's Figure 1 on random facts; bits stored against bits offered
    fig10_invariance.png    init_A / LR_A changes training (the 2nd direction the invariances leave)
    fig11_gsm8k_long.png    held-out loss against log steps by rank, 600 steps of GSM8K (Figure 1)
"""

import argparse
import json
import math
import re
import statistics
from collections import Counter, defaultdict
from pathlib import Path

import matplotlib
import numpy as np
# the object API: no pyplot, so no display backend and no global state
from matplotlib.figure import Figure

SFT_SWEEP = "train_sft.py --rank 1,16,256,0 --lr_mult 0.3,1,3,10,30"

# -----------------------------------------------------------------------------
# reading the logs


def _series(records, kind, field):
    """(steps, values) of one record type, sorted by step; a repeated step keeps its last record."""
    by_step = {}
    for r in records:
        step, v = r.get("step"), r.get(field)
        if r.get("type") == kind and isinstance(step, (int, float)) and isinstance(v, (int, float)):
            by_step[int(step)] = float(v)
    steps = sorted(by_step)
    return np.array(steps, dtype=float), np.array([by_step[s] for s in steps], dtype=float)


def load_run(path):
    """One run as a flat dict, or None (with a warning) if its log has no usable config record."""
    records, bad = [], 0
    for line in Path(path).read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            # a run killed mid-write leaves half a line: skip it, keep the rest
            bad += bool(line.strip())
            continue
        if isinstance(rec, dict):
            records.append(rec)
    if not records:
        print(f"warning: skip {path}: empty")
        return None
    if bad:
        print(f"warning: {path}: skipped {bad} malformed line(s)")
    cfg = next((r for r in records if r.get("type") == "config"), {})
    a = cfg.get("args")
    try:
        rl = cfg["script"] == "train_rl"
        variant = (bool(a.get("lm_head")), float(a.get("lr_ratio_b", 1)),
                   float(a.get("init_scale", 1)))
        # the post's defaults: no lm_head, one LR for A and B, A's usual init
        plain = variant == (False, 1.0, 1.0)
        # an RL step's batch is questions x samples per question; an SFT step's is sequences
        batch = (int(a.get("questions_per_step", 0)) * int(a.get("group_size", 0)) if rl
                 else int(a.get("batch_size", 0)))
        # a dataset by its folder's or file's name: runs given ../data/gsm8k and /abs/data/gsm8k
        # (another working directory) are the same sweep
        data = Path(str(a.get("data"))).name or str(a.get("data"))
        # an RL task is also its prompt, temperature and length limit: rewards differ across them
        if rl:
            data += "".join(f" {k}={a[k]}" for k in ("instruction", "temperature", "max_new_tokens")
                            if k in a)
        train = [r for r in records if r.get("type") == "train"]
        diverged = any(r.get("type") == "diverged" for r in records)
        last = max([r.get("step", 0) for r in train] or [0])
        total = cfg.get("total_steps") or (a.get("steps") if rl else None)
        # done: its final record, or its last step's eval (a run still evaluating that step is not)
        done = (any(r.get("type") == "final" for r in records)
                or any(r.get("type") == "eval" and r["step"] == last for r in records)
                or not a.get("eval_every"))
        if total and (last < total or not done) and not diverged:
            print(f"warning: skip {path}: unfinished (step {last} of {total}; "
                  "still running, or stopped: --resume finishes it)")
            return None
        return dict(name=cfg.get("name", Path(path).parent.name), rl=rl, rank=int(a["rank"]),
                    lr=float(a["lr"]), seed=int(a.get("seed", 0)),
                    cooldown=float(a.get("cooldown") or 0), layers=str(a.get("layers", "all")),
                    batch_size=batch, data=data, variant=variant, plain=plain,
                    standard=plain and a.get("layers", "all") == "all",
                    params=cfg.get("trainable_params"), diverged=diverged,
                    facts=int(data[6:]) if data.startswith("facts:") and data[6:].isdigit() else 0,
                    # the data a run sees, steps x batch:
                    # a longer run (fig 8's) is no point of a 20-step sweep
                    examples=int(cfg.get("total_steps") or last) * batch,
                    eval_tokens=[(int(r["step"]), r["tokens"]) for r in records
                                 if r.get("type") == "eval" and "tokens" in r],
                    n_eval=cfg.get("n_eval_examples"),
                    n_layers=(cfg.get("model") or {}).get("num_hidden_layers"),
                    ms=sum(r.get("ms", 0) for r in train if isinstance(r.get("ms"), (int, float))),
                    train=_series(records, "train", "reward" if rl else "loss"),
                    flops=_series(records, "train", "flops"),
                    eval=_series(records, "eval", "accuracy" if rl else "loss"),
                    unseen=_series(records, "eval", "unseen_loss"),
                    norms=[(int(r["step"]), r["A"], r["B"]) for r in records
                           if r.get("type") == "norms" and isinstance(r.get("A"), list)
                           and len(r["A"]) == len(r.get("B") or [])])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        print(f"warning: skip {path}: no usable config record ({type(e).__name__}: {e})")
        return None


def load_runs(log_dir):
    """The run dicts of every <run>/log.jsonl under log_dir, at any depth (results/ keeps one
    folder per study). A run whose study folder holds full_eval.json (written by
    results/capacity_k/full_eval.py) gets its entry as run["all_facts"]: its final adapter
    scored on all K facts, registered and calibrated."""
    runs = []
    for p in sorted(Path(log_dir).rglob("log.jsonl")):
        run = load_run(p)
        if run is None:
            continue
        scores = p.parent.parent / "full_eval.json"
        run["all_facts"] = (json.loads(scores.read_text()).get(p.parent.name)
                            if scores.exists() else None)
        runs.append(run)
    return runs


def _tail_mean(v, frac):
    return float(np.mean(v[-max(3, round(frac * len(v))):])) if len(v) else math.nan


def final_loss(run):
    """Last eval loss after step 0, else the mean of the last 10% (at least 3) train losses;
    NaN if diverged."""
    if run["diverged"]:
        return math.nan
    steps, losses = run["eval"]
    return float(losses[-1]) if len(steps) and steps[-1] > 0 else _tail_mean(run["train"][1], 0.1)


def final_reward(run):
    """Mean train reward over the last 20% (at least 3) steps: more episodes than the small
    greedy eval."""
    return math.nan if run["diverged"] else _tail_mean(run["train"][1], 0.2)


def _score(run):   # lower is better for both scripts
    return -final_reward(run) if run["rl"] else final_loss(run)


def _loss_label(runs):
    # a diverged run has no final loss
    if all(len(r["eval"][0]) and r["eval"][0][-1] > 0 for r in runs if not r["diverged"]):
        return "final eval loss (nats/token)"
    return "final loss (nats/token; eval, else mean of last 10% train)"


def group(runs, key):
    """{key: [runs]}, key a run field name or a function of a run."""
    out = defaultdict(list)
    for r in runs:
        out[key(r) if callable(key) else r[key]].append(r)
    return dict(out)


def config(run):
    """Everything but the LR: the runs of one configuration form an LR sweep."""
    keys = ("rl", "rank", "layers", "variant", "batch_size", "data", "examples", "cooldown")
    return tuple(run[k] for k in keys)


def main_sweep(runs, rl=False):
    """Standard runs (all layers, default LoRA settings) at the most common (data, batch size,
    examples seen)."""
    std = [r for r in runs if r["rl"] == rl and r["standard"]]
    if not std:
        return []
    common = Counter((r["data"], r["batch_size"], r["examples"]) for r in std).most_common(1)[0][0]
    return [r for r in std if (r["data"], r["batch_size"], r["examples"]) == common]


def smooth(y, w):
    """Trailing moving average over w steps (fewer at the start): the value at a step uses no
    later steps."""
    c = np.concatenate([[0.0], np.cumsum(y)])
    i = np.arange(1, len(y) + 1)
    lo = np.maximum(0, i - max(1, w))
    return (c[i] - c[lo]) / (i - lo)


def seed_mean(runs, w, kind="train"):
    """(steps, mean, standard error) of the smoothed train (or eval, w = 1) curves of one
    configuration's seeds, on their common steps (empty arrays for no runs)."""
    if not runs:
        return (np.array([]),) * 3
    steps = runs[0][kind][0]
    for r in runs[1:]:
        steps = np.intersect1d(steps, r[kind][0])
    ys = np.array([smooth(r[kind][1], w)[np.isin(r[kind][0], steps)] for r in runs])
    se = ys.std(0, ddof=1) / np.sqrt(len(ys)) if len(ys) > 1 else np.zeros(len(steps))
    return steps, ys.mean(0), se


def _eval_curve(runs):
    """seed_mean of the eval loss from step 1: the untrained model's, far above, would squash
    the differences."""
    steps, mean, se = seed_mean(runs, 1, "eval")
    keep = steps > 0
    return steps[keep], mean[keep], se[keep]


def envelope(runs, w):
    """Pointwise minimum over LRs of the seed-mean smoothed train loss, as the post draws a rank,
    with the standard error over seeds of the LR that gives it: (steps, loss, se)."""
    out = {}
    for rs in group(runs, "lr").values():
        for step, v, e in zip(*seed_mean(rs, w)):
            if step not in out or v < out[step][0]:
                out[step] = (v, e)
    steps = np.array(sorted(out))
    return steps, np.array([out[s][0] for s in steps]), np.array([out[s][1] for s in steps])


# -----------------------------------------------------------------------------
# optimal learning rates


def _parabola_min(x, y):
    """The argmin of y over x (log10 LRs), refined by a parabola through it and its two neighbours
    when both exist and it opens upward, clipped to their range."""
    i = int(np.argmin(y))
    if 0 < i < len(x) - 1:
        a, b, _ = np.polyfit(x[i - 1:i + 2], y[i - 1:i + 2], 2)
        if a > 0:
            return float(np.clip(-b / (2 * a), x[i - 1], x[i + 1]))
    return float(x[i])


def scores_by_lr(runs):
    """{lr: [final loss (or -reward) of each seed]} over a sweep's finished runs, leaving out
    every LR at which any seed diverged: its survivors alone would make an unstable LR look best."""
    out, bad = defaultdict(list), {r["lr"] for r in runs if not math.isfinite(_score(r))}
    for r in runs:
        if r["lr"] not in bad:
            out[r["lr"]].append(_score(r))
    return dict(out)


def at_best_lr(runs, seeds=1):
    """One arm's finished runs at its best LR: the lowest seed-mean score among the LRs that at
    least `seeds` seeds finished (none at which a seed diverged, as in scores_by_lr); [] if none."""
    by_lr = {lr: v for lr, v in scores_by_lr(runs).items() if len(v) >= seeds}
    best = min(by_lr, key=lambda lr: np.mean(by_lr[lr]), default=None)
    return [r for r in runs if r["lr"] == best and not r["diverged"]]


def _lr_fit(by_lr):
    """log10 of the best LR of {lr: [scores]} (seed means per LR), parabola-refined in log10(LR)."""
    lrs = sorted(by_lr)
    return _parabola_min(np.log10(lrs), np.array([np.mean(by_lr[lr]) for lr in lrs]))


def optimal_lr_stats(runs):
    """The optimal LR of a sweep: pooled (the parabola through the seed means) and per seed (each
    seed's own parabola; their mean in log LR with a 95% t interval), and whether the grid
    brackets it (the best mean LR is not at an edge of the grid: otherwise the optimum may lie
    beyond, and is not reported as found; an LR at which a run diverged counts as a worse point)."""
    by_lr = scores_by_lr(runs)
    if len(by_lr) < 2:
        return None
    lrs = sorted(by_lr)
    i = int(np.argmin([np.mean(by_lr[lr]) for lr in lrs]))
    seeds = min(len(v) for v in by_lr.values())
    # with the LRs that only diverged: the loss beyond them is worse
    tried = sorted({r["lr"] for r in runs})
    # where the optimum may lie
    edge = "<=" if lrs[i] == tried[0] else ">=" if lrs[i] == tried[-1] else ""
    at_best = {r["seed"]: _score(r) for r in runs if r["lr"] == lrs[i] and math.isfinite(_score(r))}
    table = seed_table(runs)
    seed_opt = {s: _lr_fit(d) for s, d in table.items() if len(d) >= 2}
    m, tlo, thi = mean_ci(list(seed_opt.values()))
    return dict(lr=10 ** _lr_fit(by_lr), bracketed=not edge, edge=edge, seeds=seeds,
                best=by_lr[lrs[i]], best_lr=lrs[i], by_seed=at_best, seed_opt=seed_opt,
                t_lr=10 ** m, t_lo=10 ** tlo, t_hi=10 ** thi, oos=out_of_sample(table))


def same_grid(arms):
    """{arm: runs} at one grid density. A midpoint is an LR halfway (in log) between its two
    neighbours where they are a whole grid step apart (the arm's widest step), as added around one
    arm's optimum; it counts only where every arm has one, else the finer grid would charge the
    coarser arms its smaller parabola error as a gap or a ratio. Made for a regular grid with
    midpoints added singly (as results/ ran them): an arm uniformly finer than another is not
    thinned, and a grid with a hole (a wider step) may lose the point halfway across a normal
    one."""
    def midpoints(rs):
        lrs = sorted({r["lr"] for r in rs})
        half = max((b / a for a, b in zip(lrs, lrs[1:])), default=1.0) ** 0.5
        near = lambda ratio: math.isclose(ratio, half, rel_tol=0.05)
        return {x for a, x, b in zip(lrs, lrs[1:], lrs[2:]) if near(x / a) and near(b / x)}
    mids = {k: midpoints(rs) for k, rs in arms.items()}
    if all(mids.values()):
        return arms
    return {k: [r for r in rs if r["lr"] not in mids[k]] for k, rs in arms.items()}


def seed_table(runs):
    """{seed: {lr: score}} over the LRs scores_by_lr keeps (none at which any seed diverged)."""
    keep, out = scores_by_lr(runs), defaultdict(dict)
    for r in runs:
        if r["lr"] in keep and math.isfinite(_score(r)):
            out[r["seed"]][r["lr"]] = _score(r)
    return dict(out)


def out_of_sample(table):
    """{seed: its score at the LR the other seeds choose}: each seed's LR picked by the mean of the
    others at the LRs they share with it (leave one seed out), so a comparison "at each arm's best
    LR" does not pick the LR on the very seeds it then reports (the winner's curse)."""
    out = {}
    for s, mine in table.items():
        others = {lr: [d[lr] for t, d in table.items() if t != s and lr in d] for lr in mine}
        others = {lr: v for lr, v in others.items() if v}
        if others:
            out[s] = mine[min(others, key=lambda lr: np.mean(others[lr]))]
    return out


T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
        10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def t975(df):
    """Student's t 0.975 quantile (the half-width factor of a two-sided 95% interval): the table,
    the next smaller df's (a wider interval) between its entries, and above 30 df 1.96 + 2.4/df
    (within 0.002)."""
    return T975.get(df) or (1.96 + 2.4 / df if df > 30 else T975[max(k for k in T975 if k < df)])


def mean_ci(values):
    """(mean, low, high): a 95% Student-t interval over seeds (NaN bounds with fewer than 2). With 3
    seeds t = 4.30: wider than a bootstrap over 3 values, which covers far less than 95%."""
    v = np.array([x for x in values if math.isfinite(x)], dtype=float)
    if len(v) < 2:
        return (float(v.mean()) if len(v) else math.nan), math.nan, math.nan
    h = t975(len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))
    return float(v.mean()), float(v.mean() - h), float(v.mean() + h)


def gap_interval(a, b):
    """Mean of a minus mean of b, unpaired, with a 95% Welch-t interval (df = the smaller n - 1,
    the conservative choice). For seed scores that share no data order; paired_gap pairs them
    when they do."""
    a, b = (np.array([x for x in v if math.isfinite(x)], dtype=float) for v in (a, b))
    d = float(a.mean() - b.mean())
    if min(len(a), len(b)) < 2:
        return d, math.nan, math.nan
    h = t975(min(len(a), len(b)) - 1) * math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    return d, d - h, d + h


def paired_gap(a, b):
    """a minus b, each {seed: score}: the mean difference over shared seeds with a 95% t interval
    (a seed fixes the data order, and pairing takes it out of the gap); unpaired with fewer than
    2 shared."""
    shared = sorted(set(a) & set(b))
    if len(shared) >= 2:
        return mean_ci([a[s] - b[s] for s in shared])
    return gap_interval(list(a.values()), list(b.values()))


def _ci(lo, hi, fmt="{:.3g}"):
    return f"[{fmt.format(lo)}, {fmt.format(hi)}]" if math.isfinite(lo) else "(1 seed: no interval)"


def _est(m, lo, hi, fmt="{:+.4f}"):   # an estimate and its interval, as the tables print them
    return f"{fmt.format(m)} {_ci(lo, hi, fmt)}"


def claim(claims, finding, quantity, estimate, lo=math.nan, hi=math.nan, seeds=None, verdict=None,
          null=0.0):
    """Append one measured figure of a finding to `claims` (the list a figure returns, which
    summary.json gathers). The verdict, unless given, says only where the 95% interval lies
    against `null` (0 for a difference, 1 or 10 for a ratio)."""
    ok = all(isinstance(v, (int, float)) and math.isfinite(v) for v in (lo, hi))
    if verdict is None:
        verdict = ("no interval (one seed)" if not ok
                   else f"interval spans {null:g}" if lo <= null <= hi
                   else f"above {null:g}" if lo > null else f"below {null:g}")
    claims.append(dict(finding=finding, quantity=quantity, estimate=float(estimate),
                       interval=[float(lo), float(hi)] if ok else None, seeds=seeds,
                       verdict=verdict))


def optimal_lrs(runs):
    """{rank: optimal LR} over one group of runs (one data set, batch size and layer set), where
    2+ LRs finished."""
    by_rank = {rank: scores_by_lr(rs) for rank, rs in group(runs, "rank").items()}
    return {k: 10 ** _lr_fit(by_lr) for k, by_lr in by_rank.items() if len(by_lr) >= 2}


def _ratio(opt, claims, stats=None, finding=None, what="optimal LR, LoRA / FullFT", ref=None):
    """Median over LoRA ranks of LoRA's optimal LR / FullFT's, and lines saying it per rank. With
    seeds: each seed's optimum is the parabola through its own sweep, and the ratio is the mean of
    the seeds' log ratios (paired by seed) with a 95% t interval; the ratio of the pooled optima
    follows. A flag where an optimum is not bracketed by its grid. ref: FullFT's stats for each
    rank where they differ by rank (at that rank's grid density), else stats[0]."""
    stats, ref = stats or {}, ref or {}
    per_rank = {k: v / (ref[k]["lr"] if ref.get(k) else opt[0])
                for k, v in sorted(opt.items()) if k > 0} if 0 in opt else {}
    if not per_rank:
        return None, "optimal-LR ratio needs FullFT and LoRA sweeps"
    items, found = [], []
    for k, pooled in per_rank.items():
        st, st0 = stats.get(k), ref.get(k, stats.get(0))
        # a bound, never reported as found
        if st and st0 and not (st["bracketed"] and st0["bracketed"]):
            bound = {("", "<="): ">=", ("", ">="): "<=",
                     (">=", ""): ">=", ("<=", ""): "<="}.get((st["edge"], st0["edge"]), "?")
            items.append(f"rank {k}: {bound}{pooled:.2g}x (optimum not bracketed)")
            continue
        shared = sorted(set(st["seed_opt"]) & set(st0["seed_opt"])) if st and st0 else []
        if len(shared) >= 2:
            m, lo, hi = mean_ci([st["seed_opt"][s] - st0["seed_opt"][s] for s in shared])
            found.append(10 ** m)
            if finding:
                claim(claims, finding, f"rank {k}: optimal LR of LoRA / FullFT "
                               "(per-seed optima, t on log ratio)",
                      10 ** m, lo=10 ** lo, hi=10 ** hi, seeds=len(shared), null=10)
            items.append(f"rank {k}: {10 ** m:.2g}x {_ci(10 ** lo, 10 ** hi, fmt='{:.2g}')} "
                         f"({len(shared)} seeds; pooled {pooled:.2g}x)")
        else:
            found.append(pooled)
            items.append(f"rank {k}: {pooled:.2g}x (pooled)")
    # bounds stay out of the median where optima were found
    med = statistics.median(found or per_rank.values())
    per_line = 1 if stats else 3   # 3 ranks a line fit a legend title; one a line with intervals
    lines = [", ".join(items[i:i + per_line]) for i in range(0, len(items), per_line)]
    return med, "\n".join([f"{what}: {med:.2g}x (median over ranks)"] + lines)


# -----------------------------------------------------------------------------
# figures: each takes (runs, smoothing window) and returns (figure or None, its table or what it
# needs, the claims it measured)


def _fig(ncols=1, width=None, ratios=None):
    # at most 1,600 pixels wide: what a README page shows unscaled
    width = width or (7 if ncols == 1 else 12)
    fig = Figure(figsize=(width, 4.5), dpi=min(150, 1600 / width), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False, width_ratios=ratios)[0]
    for ax in axes:
        ax.grid(alpha=0.3)
    return fig, axes


def _label(rank):
    return "FullFT" if rank == 0 else f"rank {rank}"


def _ranks(runs):   # LoRA ranks ascending, FullFT last so that it is drawn on top
    return sorted({r["rank"] for r in runs}, key=lambda k: (k == 0, k))


def _colors(ranks, cmap="plasma"):
    """A sequential colour per LoRA rank (dark = low rank), black for FullFT (rank 0)."""
    lora = sorted(k for k in set(ranks) if k > 0)
    cols = {k: matplotlib.colormaps[cmap](0.8 * i / max(1, len(lora) - 1))
            for i, k in enumerate(lora)}
    return {**cols, 0: "black"}


def _lr_line(ax, runs, metric, **style):
    """A sweep as final metric against LR: the mean over seeds at each LR with +-1 SE bars, the
    line joining only the LRs that every seed of the line ran (one seed set per curve); a point
    with fewer seeds is a hollow marker of its own; a diverged run is an x at the top edge (its
    loss is not a number)."""
    by_lr = group(runs, "lr")
    lrs = np.array(sorted(by_lr))
    vals = [[v for v in map(metric, by_lr[lr]) if math.isfinite(v)] for lr in lrs]
    mean = np.array([np.mean(v) if v else math.nan for v in vals])
    se = np.array([np.std(v, ddof=1) / math.sqrt(len(v)) if len(v) > 1 else 0.0 for v in vals])
    most = max(map(len, vals), default=0)
    full = np.array([bool(v) and len(v) == most for v in vals])
    ax.errorbar(lrs[full], mean[full], yerr=se[full], marker="o", ms=4, capsize=2, **style)
    for lr, m, v in zip(lrs, mean, vals):
        if v and len(v) < most:
            ax.plot([lr], [m], "o", ms=7, mfc="white", color=style.get("color"), zorder=3)
    bad = np.array([r["lr"] for r in runs if r["diverged"]])
    if len(bad):   # x in data units, y in axes units: the top edge whatever the loss range
        first = "diverged" not in [line.get_label() for line in ax.lines]
        ax.plot(bad, [0.97] * len(bad), "x", color=style.get("color"),
                transform=ax.get_xaxis_transform(), label="diverged" if first else "_nolegend_")


def _band(ax, x, mean, se, color, **kw):
    """A curve with its +-1 SE band."""
    ax.plot(x, mean, color=color, **kw)
    ax.fill_between(x, mean - se, mean + se, color=color, alpha=0.2, lw=0)


def _legend(ax, **kw):
    """A legend with the "diverged" entry last, whichever sweep drew it first."""
    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda i: labels[i] == "diverged")
    ax.legend([handles[i] for i in order], [labels[i] for i in order], **kw)


def fig_rank_curves(runs, w=5):
    claims = []  # what this figure measures: main() writes them to summary.json
    sweep = [r for r in main_sweep(runs) if len(r["train"][0]) and not r["diverged"]]
    if not sweep:
        return None, f"needs an SFT sweep over ranks and LRs ({SFT_SWEEP})", claims
    # one seed set for every curve (LRs that lack one are left out): the curves differ by rank,
    # not by seeds run
    seeds = set.intersection(*({r["seed"] for r in rs} for rs in group(sweep, "rank").values()))
    cells = group([r for r in sweep if r["seed"] in seeds], lambda r: (r["rank"], r["lr"])).values()
    sweep = [r for rs in cells if {r["seed"] for r in rs} == seeds for r in rs]
    (fig, (ax,)), by_rank, cols = _fig(), group(sweep, "rank"), _colors(r["rank"] for r in sweep)
    rows = [f"seeds {sorted(seeds)} (those every rank ran)",
            "rank     runs  steps  loss at last step"]
    for k in _ranks(sweep):
        steps, loss, se = envelope(by_rank[k], w)
        # +-1 SE over seeds
        _band(ax, steps, loss, se, color=cols[k], lw=2 if k == 0 else 1.3, label=_label(k))
        rows.append(f"{_label(k):9} {len(by_rank[k]):4} {int(steps[-1]):6}  {loss[-1]:.4f}")
    ax.set(xscale="log", xlabel="step", ylabel=f"train loss (nats/token, {w}-step mean)",
           title="LoRA rank vs FullFT (min over LRs; band: +-1 SE over seeds)")
    ax.legend()
    return fig, "\n".join(rows), claims


def fig_lr_sweep(runs, w=5):
    claims = []  # what this figure measures: main() writes them to summary.json
    sweep = main_sweep(runs)
    by_rank = {k: rs for k, rs in group(sweep, "rank").items() if len({r["lr"] for r in rs}) >= 2}
    if not by_rank:
        return None, f"needs an SFT sweep over 2+ LRs per rank ({SFT_SWEEP})", claims
    fig, (ax, side) = _fig(2, width=12, ratios=(1.4, 1))
    cols, opt = _colors(by_rank), optimal_lrs(sweep)
    stats = {k: optimal_lr_stats(rs) for k, rs in by_rank.items()}
    # each LoRA rank against FullFT at the grid density both ran (below: the ranks' spread too)
    pair = {k: {a: optimal_lr_stats(rs) for a, rs in same_grid({k: rs, 0: by_rank[0]}).items()}
            for k, rs in by_rank.items() if k and 0 in by_rank}
    rows = ["rank     runs seeds  pooled opt. LR  bracketed  best final loss  "
            "minus FullFT's, paired by seed [95% CI]   out of sample [95% CI]   "
            "per-seed optimum [95% t CI]"]
    for k in [k for k in _ranks(sweep) if k in by_rank]:
        _lr_line(ax, by_rank[k], final_loss, color=cols[k], lw=2 if k == 0 else 1.3,
                 label=_label(k))
        st = stats[k]
        if not st:   # fewer than 2 LRs finished: no optimum
            continue
        # at the mean of the seeds' optima, dotted if bracketed; dashed where the grid's edge is
        # the best it found
        ax.axvline(st["t_lr"] if len(st["seed_opt"]) >= 2 else st["lr"], color=cols[k],
                   ls=":" if st["bracketed"] else "--", lw=0.8)
        gap, oos = "", ""
        if k != 0 and stats.get(0):
            mine, ref = pair[k][k], pair[k][0]
            gap = _est(*paired_gap(mine["by_seed"], ref["by_seed"]))
            oos = _oos_gap(mine, ref, claims, sign=1,
                           finding="High-rank LoRA reaches FullFT's loss (SFT)",
                           quantity=f"{_label(k)} minus FullFT, final loss, "
                                    "each seed's LR chosen by the others (nats)")
        if k and len(st["seed_opt"]) >= 2:
            claim(claims, "The optimal LR is nearly independent of rank",
                  f"{_label(k)}: optimal LR (per-seed parabola, t on log LR)",
                  st["t_lr"], lo=st["t_lo"], hi=st["t_hi"], seeds=len(st["seed_opt"]),
                  verdict="one rank's estimate")
        per_seed = f"{st['t_lr']:.3g} {_ci(st['t_lo'], st['t_hi'])} ({len(st['seed_opt'])} seeds)"
        found = (f"{st['lr']:14.3g}" if st["bracketed"]
                 else f"{st['edge'] + format(st['lr'], '.3g'):>14}")
        rows.append(f"{_label(k):9} {len(by_rank[k]):4} {st['seeds']:5}  {found}  "
                    f"{'yes' if st['bracketed'] else 'NO: at edge':11} "
                    f"{np.mean(st['best']):.4f}           {gap:27}  {oos:25} {per_seed}")
    # the pooled optima too at each pair's grid density
    pooled = {0: opt[0], **{k: p[k]["lr"] for k, p in pair.items() if p[k] and p[0]}}
    text = _ratio(pooled, claims, stats={k: p[k] for k, p in pair.items()},
                  ref={k: p[0] for k, p in pair.items()},
                  finding="LoRA's optimal LR is ~10x FullFT's (SFT)")[1]
    lora = {k: optimal_lr_stats(rs) for k, rs in same_grid(
        {k: rs for k, rs in by_rank.items() if k}).items()}
    lora_opt = {k: st["t_lr"] for k, st in lora.items() if st and len(st["seed_opt"]) >= 2}
    if len(lora_opt) >= 2:
        spread = max(lora_opt.values()) / min(lora_opt.values())
        claim(claims, "The optimal LR is nearly independent of rank",
              f"largest / smallest optimal LR over ranks {sorted(lora_opt)}",
              spread, verdict=f"within {spread:.2g}x over ranks {min(lora_opt)}-{max(lora_opt)}")
    main, main_steps = {id(r) for r in sweep}, sweep[0]["examples"] // sweep[0]["batch_size"]
    # the post: ~15x in short runs, ~10x in long ones. The change, paired by seed (a seed fixes
    # the data order)
    log_ratio = lambda st, st0: {s: v - st0["seed_opt"][s] for s, v in st["seed_opt"].items()
                                 if s in st0["seed_opt"]}
    for key, rs in group([r for r in runs if not r["rl"] and r["standard"] and id(r) not in main],
                         lambda r: (r["data"], r["batch_size"], r["examples"])).items():
        # another study with both arms swept (e.g. 80 steps against the main sweep's 20): does
        # the ratio move?
        other = {k: optimal_lr_stats(g) for k, g in group(rs, "rank").items()
                 if len({r["lr"] for r in g}) >= 2}
        if 0 in other and len(other) >= 2:
            steps = key[2] // key[1]
            finding = f"LoRA's optimal LR over FullFT's, {steps}-step runs"
            what = f"{steps} steps of {key[1]} ({Path(key[0]).name}): optimal LR, LoRA / FullFT"
            text += "\n" + _ratio(optimal_lrs(rs), claims, stats=other, finding=finding,
                                  what=what)[1]
            for k in sorted(k for k in other
                            if k and other[k] and other.get(0) and pair.get(k, {}).get(k)
                            and pair[k][0]):
                there, here = log_ratio(other[k], other[0]), log_ratio(pair[k][k], pair[k][0])
                if len(set(there) & set(here)) >= 2:
                    m, lo, hi = (10 ** v for v in paired_gap(there, here))
                    claim(claims, "LoRA's optimal LR is ~10x FullFT's (SFT)",
                          f"rank {k}: the LR ratio at {steps} steps / at {main_steps} steps, "
                          "paired by seed (below 1: the ratio falls with training length)",
                          m, lo=lo, hi=hi, seeds=len(set(there) & set(here)), null=1)
                    text += (f"\nrank {k}, ratio at {steps} / at {main_steps} steps (paired): "
                             f"{m:.2f}x {_ci(lo, hi, '{:.2f}')}")
    ax.set(xscale="log", xlabel="learning rate", ylabel=_loss_label(sweep),
           title="LR vs final loss per rank (seed mean +-1 SE; hollow: fewer seeds)")
    _legend(ax, fontsize=8, loc="upper center", ncol=3)
    side.axis("off")   # the ratios as the README quotes them: each seed's own optimum, t over seeds
    side.text(0, 1, re.sub(r"; pooled [^)]*\)", ")", text).replace(" (gsm8k)", ""),
              va="top", fontsize=8)
    return fig, "\n".join(rows + [text]), claims


def fig_batch_size(runs, w=5):
    """The post's batch-size finding: LoRA's loss gap to FullFT grows with the batch size. One row
    of panels per study: plain SFT runs of one (data, examples seen, layers) where LoRA and FullFT
    each ran 2+ batch sizes."""
    claims = []  # what this figure measures: main() writes them to summary.json
    where = group([r for r in runs if not r["rl"] and r["plain"]],
                  lambda r: (r["data"], r["examples"], r["layers"]))
    # LoRA's, FullFT's sizes
    n = lambda g, lora: len({r["batch_size"] for r in g if bool(r["rank"]) == lora})
    keys = sorted(k for k, g in where.items() if n(g, lora=True) >= 2 and n(g, lora=False) >= 2)
    if not keys:
        return None, ("needs SFT runs at 2+ batch sizes "
                      "(train_sft.py --batch_size 8,32 --rank 16,0 --lr_mult 1,3,10,30)"), claims
    fig = Figure(figsize=(12, 4.5 * len(keys)), dpi=min(150, 1600 / 12), layout="constrained")
    rows = [row for (left, right), key in zip(fig.subplots(len(keys), 2, squeeze=False), keys)
            for row in _batch_study(left, right, where[key], key, w=w, claims=claims)]
    fig.suptitle("Batch size effects: LoRA (dashed, dotted) vs FullFT (solid)")
    return fig, "\n".join(rows), claims


def _batch_study(left, right, rs, key, w, claims):
    """One study's curves at each arm's best LR (left), LoRA's gap to FullFT paired by seed
    (right); table rows."""
    arms = {ck: _arm_row(g, final_loss)
            for ck, g in group(rs, lambda r: (r["rank"], r["batch_size"])).items()}
    n_sizes = Counter(k for k, _ in arms)
    # ranks that ran 2+ batch sizes
    arms = {(k, bs): a for (k, bs), a in arms.items() if n_sizes[k] >= 2}
    sizes = sorted({bs for _, bs in arms})
    bs_col = {bs: matplotlib.colormaps["viridis"](0.85 * i / (len(sizes) - 1))
              for i, bs in enumerate(sizes)}
    rank_col = _colors(k for k, _ in arms)
    lora = sorted({k for k, _ in arms if k})
    dash = {k: ("--", ":", "-.")[i % 3] for i, k in enumerate(lora)} | {0: "-"}
    rows = [f"{key[0]}, {key[1]} examples a run, layers: {key[2]}",
            "rank      batch  steps  LRs  seeds  best LR   final loss at it [95% CI]    "
            "minus FullFT's, paired [95% CI]"]
    gaps, oos = {}, {}   # oos: each seed's gap with the LRs the other seeds chose (out_of_sample)
    for (k, bs), (st, by_seed, text) in sorted(arms.items(), key=lambda kv: (kv[0][0] == 0, kv[0])):
        mine = [r for r in rs if (r["rank"], r["batch_size"]) == (k, bs)]
        steps, mean, se = seed_mean(at_best_lr(mine), w)
        # x in examples seen: runs at different batch sizes line up at the same data;
        # FullFT solid, LoRA dashed
        left.plot(steps * bs, mean, dash[k], color=bs_col[bs], label=f"{_label(k)}, batch {bs}")
        gap = ""
        if k != 0 and (0, bs) in arms:
            gaps[(k, bs)] = {s: v - arms[(0, bs)][1][s] for s, v in by_seed.items()
                             if s in arms[(0, bs)][1]}
            gap, ref = _est(*paired_gap(by_seed, arms[(0, bs)][1])), arms[(0, bs)][0]
            oos[(k, bs)] = ({s: v - ref["oos"][s] for s, v in st["oos"].items() if s in ref["oos"]}
                            if st and ref else {})
        rows.append(f"{_label(k):9} {bs:6} {int(steps[-1]) if len(steps) else 0:6} "
                    f"{len({r['lr'] for r in mine}):4} {len(by_seed):5}  "
                    f"{_best_lr_text(st, mine):9} {text:28}  {gap}")
    # the claim is about the gap, so the panel draws it, paired by seed
    for k in sorted({k for k, _ in gaps}):
        pts = [(bs, mean_ci(list(gaps[(k, bs)].values()))) for bs in sizes if (k, bs) in gaps]
        x, m = [p[0] for p in pts], np.array([p[1][0] for p in pts])
        err = np.nan_to_num(np.array([[p[1][0] - p[1][1], p[1][2] - p[1][0]] for p in pts]).T)
        right.errorbar(x, m, yerr=err, fmt=dash[k] + "o", capsize=3, color=rank_col[k],
                       label=f"{_label(k)} minus FullFT")
        lo_bs, hi_bs = x[0], x[-1]
        # in sample, then out
        for gs, how in ((gaps, ""), (oos, ", each seed at the LRs the other seeds chose")):
            a, b = gs[(k, hi_bs)], gs[(k, lo_bs)]
            if lo_bs == hi_bs or not (a and b):   # out of sample needs 2+ seeds and LRs
                continue
            d, lo, hi = paired_gap(a, b)
            claim(claims, "LoRA pays more than FullFT at large batch sizes",
                  f"{_label(k)}: gap to FullFT at batch {hi_bs} minus at batch {lo_bs} "
                  f"({key[0]}, {key[2]}, nats){how}",
                  d, lo=lo, hi=hi, seeds=len(set(a) & set(b)))
            rows.append(f"{_label(k)}'s gap to FullFT at batch {hi_bs} "
                        f"minus at batch {lo_bs}{how}: {_est(d, lo, hi)}")
    right.axhline(0, color="gray", lw=0.8)
    # ylim: an early climb to 8 nats is off the plot
    left.set(xscale="log", xlabel="training examples (steps x batch size)",
             ylabel=f"train loss (nats/token, {w}-step mean)",
             title="Learning curves (best LR, seed mean; cut at 2x the last loss)",
             ylim=(None, 2 * max(line.get_ydata()[-1] for line in left.lines)))
    right.set(xscale="log", xlabel="batch size (sequences)",
              title=f"LoRA's gap to FullFT vs batch size ({key[2]})",
              ylabel="final loss, LoRA minus FullFT (paired by seed, 95% CI)")
    right.set_xticks(sizes, [str(s) for s in sizes])
    right.minorticks_off()   # else log-axis minor labels (2x10^1) crowd the batch sizes
    left.legend(fontsize=7), right.legend(fontsize=8)
    return rows


def _oos_gap(st, ref, claims, sign=1, finding=None, quantity=None):
    """The gap to a reference arm with each seed's LR chosen out of sample (see out_of_sample), as
    text; recorded as a claim when a finding is named."""
    if not (st and ref and st["oos"] and ref["oos"]):  # one seed: no other seed to choose its LR by
        return ""
    a, b = {s: sign * v for s, v in st["oos"].items()}, {s: sign * v for s, v in ref["oos"].items()}
    d, lo, hi = paired_gap(a, b)
    if finding:
        claim(claims, finding, quantity, d, lo=lo, hi=hi, seeds=len(set(a) & set(b)))
    return _est(d, lo, hi)


def _arm_row(rs, metric):
    """(optimal-LR stats, {seed: metric at the best grid LR}, mean [95% CI] text) of one
    arm's sweep."""
    st = optimal_lr_stats(rs)
    by_seed = {s: (-v if rs[0]["rl"] else v) for s, v in st["by_seed"].items()} if st else \
        {r["seed"]: metric(r) for r in rs if math.isfinite(metric(r))}
    return st, by_seed, _est(*mean_ci(list(by_seed.values())), "{:.4f}")


def _best_lr_text(st, rs):
    if not st:
        return f"{rs[0]['lr']:.3g} (one LR)"
    edge = "" if st["bracketed"] else f" (grid edge: optimum {st['edge']})"
    return f"{st['best_lr']:.3g}" + edge


def fig_layers(runs, w=5):
    claims = []  # what this figure measures: main() writes them to summary.json
    panels = []
    for rl in (False, True):
        where = {(r["data"], r["batch_size"], r["examples"]) for r in main_sweep(runs, rl)}
        rs = [r for r in runs if r["rl"] == rl and r["rank"] > 0 and r["plain"]
              and (r["data"], r["batch_size"], r["examples"]) in where]
        # "all" only at the ranks the others ran
        others = {r["rank"] for r in rs if r["layers"] != "all"}
        by = group([r for r in rs if r["layers"] != "all" or r["rank"] in others],
                   lambda r: (r["layers"], r["rank"]))
        if len({ly for ly, _ in by}) >= 2:
            panels.append((rl, by))
    if not panels:
        return None, ("needs LoRA runs on 2+ layer sets beside the main sweep "
                      "(train_sft.py --rank 16 --layers mlp,attn --lr_mult 1,3,10,30)"), claims
    fig, axes = _fig(len(panels), width=9 if len(panels) == 1 else 14)
    title = ("Which layers get LoRA: learning rate vs final "
             + " / ".join("reward" if rl else "loss" for rl, _ in panels))
    rows = []
    for ax, (rl, by) in zip(axes, panels):
        metric, what = (final_reward, "reward") if rl else (final_loss, "loss")
        layer_sets = sorted({ly for ly, _ in by},
                            key=lambda s: ({"all": 0, "mlp": 1, "attn": 2}.get(s, 3), s))
        ranks = sorted({k for _, k in by})
        arms = {key: _arm_row(rs, metric) for key, rs in by.items()}
        # the post's recommendation is the reference
        ref = next((key for key in by if key[0] == "mlp"), None)
        ref_name = ref[0] + " rank " + str(ref[1]) if ref else "-"
        rows.append(f"{'train_rl' if rl else 'train_sft'}: layers  rank  params  LRs  seeds  "
                    f"best LR   final {what} at it [95% CI]   minus {ref_name}, paired by seed "
                    "[95% CI]   out of sample [95% CI]")
        for (ly, k), rs in sorted(by.items(),
                                  key=lambda kv: (layer_sets.index(kv[0][0]), kv[0][1])):
            params = f", {rs[0]['params'] / 1e6:.3g}M params" if rs[0]["params"] else ""
            _lr_line(ax, rs, metric, color=f"C{layer_sets.index(ly)}",
                     ls=["-", "--", ":", "-."][ranks.index(k) % 4], label=f"{ly}, rank {k}{params}")
            st, by_seed, text = arms[(ly, k)]
            gap, oos = "", ""
            if ref and (ly, k) != ref:
                gap = _est(*paired_gap(by_seed, arms[ref][1]))
                oos = _oos_gap(st, arms[ref][0], claims, sign=-1 if rl else 1,
                               finding="Attention-only LoRA trails MLP-only" + " (RL)" * rl,
                               quantity=f"{ly} rank {k} minus {ref[0]} rank {ref[1]}, "
                                        f"final {what}, each seed's LR chosen by the others")
            rows.append(f"  {ly:13} {k:4}  {(rs[0]['params'] or 0) / 1e6:5.2f}M "
                        f"{len({r['lr'] for r in rs}):4} {len(by_seed):5}  "
                        f"{_best_lr_text(st, rs):9} {text:28}  {gap:27}  {oos}")
        ylabel = ("final reward (mean of last 20% steps)" if rl
                  else _loss_label([r for rs in by.values() for r in rs]))
        ax.set(xscale="log", xlabel="learning rate", ylabel=ylabel,
               title=(f"{'RL' if rl else 'SFT'}: LoRA on different layers" if len(panels) > 1
                      else title) + " (seed mean +-1 SE)")
        _legend(ax, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    if len(panels) > 1:
        fig.suptitle(title)
    return fig, "\n".join(rows), claims


def fig_rl(runs, w=5):
    claims = []  # what this figure measures: main() writes them to summary.json
    sweep = main_sweep(runs, rl=True)
    if not sweep:
        return None, "needs train_rl.py runs (train_rl.py --rank 1,8,0 --lr_mult 3,10,30)", claims
    fig, (left, right) = _fig(2, width=15)
    by_rank, cols, opt = group(sweep, "rank"), _colors(r["rank"] for r in sweep), optimal_lrs(sweep)
    arms = {k: _arm_row(rs, final_reward) for k, rs in by_rank.items()}
    rows = ["rank      LRs  seeds  best LR   final reward at it [95% CI]   "
            "minus FullFT's, paired by seed [95% CI]   out of sample [95% CI]"]
    for k in _ranks(sweep):
        lw, (st, by_seed, text) = 2 if k == 0 else 1.3, arms[k]
        if best := [r for r in at_best_lr(by_rank[k]) if len(r["train"][0])]:
            _band(left, *seed_mean(best, w), color=cols[k], lw=lw,
                  label=f"{_label(k)}, LR {best[0]['lr']:.2g}, {len(best)} seed(s)")
        gap, oos = "", ""
        if k != 0 and 0 in arms:
            gap = _est(*paired_gap(by_seed, arms[0][1]), "{:+.3f}")
            oos = _oos_gap(st, arms[0][0], claims, sign=-1,
                           finding="RL: rank-1 LoRA matches FullFT",
                           quantity=f"{_label(k)} minus FullFT, final reward, "
                                    "each seed's LR chosen by the others")
        rows.append(f"{_label(k):9} {len({r['lr'] for r in by_rank[k]}):4} {len(by_seed):5}  "
                    f"{_best_lr_text(st, by_rank[k]):9} {text:30} {gap:27}  {oos}")
        _lr_line(right, by_rank[k], final_reward, color=cols[k], lw=lw, label=_label(k))
    stats = {k: a[0] for k, a in arms.items()}
    text = _ratio(opt, claims, stats=stats, finding="RL: LoRA's optimal LR is ~10x FullFT's")[1]
    rows += _lr_range(by_rank, stats, claims)
    left.set(xlabel="step", ylabel=f"train reward ({w}-step mean, seed mean +-1 SE)",
             title="Reward during training (best LR per rank)")
    right.set(xscale="log", xlabel="learning rate", ylabel="final reward (mean of last 20% steps)",
              title="Final reward vs learning rate (seed mean +-1 SE)")
    left.legend(fontsize=8)
    _legend(right, title=text, fontsize=8, title_fontsize=8, loc="upper left",
            bbox_to_anchor=(1.01, 1))
    fig.suptitle("RL: LoRA vs full fine-tuning")
    return fig, "\n".join(rows + [text]), claims


def _lr_range(by_rank, stats, claims):
    """The post's wider range of good LRs for LoRA, as lines: each arm's final reward at every
    grid LR, what a 2x step down and up from its best grid LR costs (paired by seed), and LoRA's
    cost minus FullFT's (paired by seed: below 0 means LoRA's range is wider that way), also as
    claims."""
    rows, costs = ["final reward at each LR, mean over seeds [95% CI], "
                   "and the cost of a 2x step from the best grid LR"], {}
    for k, rs in sorted(by_rank.items(), key=lambda kv: (kv[0] == 0, kv[0])):
        if not stats.get(k):
            continue
        by_lr = {lr: {r["seed"]: final_reward(r) for r in g} for lr, g in group(rs, "lr").items()}
        top = stats[k]["best_lr"]
        for lr in sorted(by_lr):
            reward = _est(*mean_ci(list(by_lr[lr].values())), "{:.3f}")
            rows.append(f"  {_label(k):9} LR {lr:9.3g} ({lr / top:5.3g}x best) "
                        f"{reward}, {len(by_lr[lr])} seed(s)")
        for way, f in (("down", 0.5), ("up", 2.0)):
            near = next((v for lr, v in by_lr.items()
                         if math.isclose(lr, top * f, rel_tol=0.05)), None)
            if near is None:
                continue
            costs[k, way] = {s: by_lr[top][s] - near[s] for s in set(by_lr[top]) & set(near)}
            cost = _est(*mean_ci(list(costs[k, way].values())), "{:+.3f}")
            rows.append(f"  {_label(k):9} a 2x step {way:4} "
                        f"costs {cost} over {len(costs[k, way])} seed(s)")
    for (k, way), c in sorted(costs.items()):
        if k and (0, way) in costs:
            paired = paired_gap(c, costs[0, way])
            claim(claims, "RL: LoRA has a wider range of good LRs",
                  f"a 2x LR step {way} from the best grid LR: {_label(k)}'s cost minus FullFT's "
                  "(reward, paired by seed; below 0: LoRA's range is wider)",
                  *paired, seeds=len(set(c) & set(costs[0, way])))
            gap = _est(*paired, "{:+.3f}")
            rows.append(f"  {way:4}: {_label(k)}'s cost minus FullFT's {gap} "
                        "(below 0: LoRA's range is wider)")
    return rows


def _rank_pair_diffs(low, high, lr):
    """(steps from 2 on, per-seed raw loss differences low - high at those steps) for the seeds
    both ranks ran at lr. Step 1 is left out: with B = 0 every rank's first loss is the base
    model's, equal by construction, so it would only pull an early mean toward 0."""
    rows, steps = [], None
    for a in low[lr]:
        for b in high[lr]:
            if a["seed"] == b["seed"]:
                st, ia, ib = np.intersect1d(a["train"][0], b["train"][0], return_indices=True)
                keep = st >= 2
                steps = st[keep] if steps is None else steps
                rows.append((a["train"][1][ia] - b["train"][1][ib])[keep][:len(steps)])
    n = min(map(len, rows)) if rows else 0
    return (steps[:n], np.array([r[:n] for r in rows])) if rows else (None, None)


def fig_early_rank(runs, w=5):
    """The post: with alpha/r scaling, ranks start training identically at the same LR. The lowest
    rank against the highest that shares an LR with it (and the post's own pair, rank 16 against
    256, where both ran), paired by seed (a seed fixes the batches): the loss difference from
    step 2 (step 1 is equal by construction) over its first and last 10% of steps (2 at least),
    95% t intervals."""
    claims = []  # what this figure measures: main() writes them to summary.json
    sweep = [r for r in main_sweep(runs) if len(r["train"][0]) and not r["diverged"]]
    lora_ranks = sorted({r["rank"] for r in sweep if r["rank"] > 0})
    by = {k: group([r for r in sweep if r["rank"] == k], "lr") for k in lora_ranks}
    pairs = []
    if lora_ranks:
        lo = lora_ranks[0]
        hi = next((k for k in sorted(lora_ranks, reverse=True)
                   if k > lo and set(by[k]) & set(by[lo])), None)
        pairs = [(lo, hi)] if hi else []
        if 16 in by and 256 in by and (16, 256) != (lo, hi) and set(by[16]) & set(by[256]):
            pairs.append((16, 256))
    if not pairs:
        return None, ("needs SFT runs at two ranks with the same LR "
                      "(train_sft.py --rank 16,256 --lr 1e-3)"), claims
    fig, (left, right) = _fig(2)
    lo, hi = pairs[0]
    lr = min(set(by[lo]) & set(by[hi]), key=lambda lr: np.mean([final_loss(r) for r in by[lo][lr]]))
    cols = _colors([lo, hi])
    for k in (lo, hi):
        _band(left, *seed_mean(by[k][lr], w), color=cols[k],
              label=f"{_label(k)} ({len(by[k][lr])} seeds)")
    lines = []
    for c, (a, b) in enumerate(pairs):
        steps, d = _rank_pair_diffs(by[a], by[b], lr)
        if steps is None or not len(steps):
            continue
        n = max(2, len(steps) // 10)
        # the first and last 10%
        spans = [(d[:, :n].mean(1), f"steps {steps[0]:.0f}-{steps[n - 1]:.0f}"),
                 (d[:, -n:].mean(1), f"steps {steps[-n]:.0f}-{steps[-1]:.0f}")]
        se = d.std(0, ddof=1) / math.sqrt(len(d)) if len(d) > 1 else np.zeros(d.shape[1])
        _band(right, steps, d.mean(0), se, color=f"C{c + 3}",
              label=f"rank {a} minus rank {b} ({len(d)} seeds)")
        for v, where in spans:
            claim(claims, "With alpha/r, ranks start identically",
                  f"rank {a} minus rank {b} at one LR, train loss over {where} (nats)",
                  *mean_ci(list(v)), seeds=len(d))
        lines.append(f"rank {a} - rank {b} at LR {lr:.3g}, {len(d)} seed(s): "
                     + ", ".join(f"{where} {_est(np.mean(v), *mean_ci(list(v))[1:])}"
                                 for v, where in spans)
                     + " (step 1: equal by construction)")
    right.axhline(0, color="gray", lw=0.8)
    left.set(xscale="log", xlabel="step",
             ylabel=f"train loss (nats/token, {w}-step mean; seed mean +-1 SE)",
             title="Learning curves")
    right.set(xscale="log", xlabel="step",
              ylabel="loss difference, paired by seed (nats/token; mean +-1 SE)",
              title="Loss difference from step 2 (step 1 is equal by construction)")
    left.legend(), right.legend(fontsize=8)
    fig.suptitle(f"Ranks at the same LR ({lr:.2g}): the same start of training (1/r scaling)")
    return fig, "\n".join(lines), claims


def fig_flops(runs, w=5):
    """Loss against cumulative training FLOPs, each rank at its best LR (best seed mean), as the
    mean over the seeds every rank ran there, with a +-1 SE band: the seeds share their batches
    across ranks, so the curves compare like with like."""
    claims = []  # what this figure measures: main() writes them to summary.json
    logged = [r for r in main_sweep(runs) if len(r["flops"][0])]
    by_rank = {k: rs for k, rs in group(logged, "rank").items() if scores_by_lr(rs)}
    if not by_rank:
        return None, f"needs SFT runs with FLOPs in their logs ({SFT_SWEEP})", claims
    fig, (ax,) = _fig()
    cols, rows = _colors(by_rank), ["rank      best LR  seeds  FLOPs/step  vs FullFT  total FLOPs"]
    bests = {k: [r for r in at_best_lr(rs) if len(r["train"][0])] for k, rs in by_rank.items()}
    # one seed set for every curve: the seeds every rank ran at its best LR
    common = set.intersection(*({r["seed"] for r in best} for best in bests.values()))
    curves = {}
    for k, best in bests.items():
        best = [r for r in best if r["seed"] in common] or best
        curves[k] = (best[0]["lr"], best,
                     float(np.mean([r["flops"][1][-1] / r["flops"][0][-1] for r in best])))
    for k in _ranks([r for rs in by_rank.values() for r in rs]):
        lr, best, per_step = curves[k]
        steps, mean, se = seed_mean(best, w)
        _band(ax, steps * per_step, mean, se, color=cols[k], lw=2 if k == 0 else 1.3,
              label=f"{_label(k)}, LR {lr:.2g}, {len(best)} seed(s)")
        rel = f"{per_step / curves[0][2]:9.3f}" if 0 in curves else "        -"
        rows.append(f"{_label(k):9} {lr:8.3g}  {len(best):5}  {per_step:10.3g}  {rel}  "
                    f"{per_step * steps[-1]:.3g}")
    ax.set(xscale="log", xlabel="training FLOPs (cumulative, forward + backward)",
           ylabel=f"train loss (nats/token, {w}-step mean; seed mean +-1 SE)",
           title="Loss vs training compute: LoRA vs FullFT (best LR)")
    ax.legend(fontsize=8)
    return fig, "\n".join(rows), claims


def fig_norms(runs, w=5):
    """The post's finding 11: B starts at zero and grows during training; by the end of its long
    runs B had larger spectral norms than A. Drawn: median over the adapted matrices of ||A||_2
    and ||B||_2 per eval, for the longest configurations on real data (on facts where there are
    none), each at its best LR (its first seed). The table adds, for every configuration run with
    2+ seeds (facts included), ||B|| / ||A|| at the last eval (median over matrices): its mean
    over seeds, 95% interval."""
    claims = []  # what this figure measures: main() writes them to summary.json
    every = [r for r in runs if len(r["norms"]) >= 2 and not r["diverged"]]
    if not every:
        return None, ("needs LoRA runs with evals "
                      "(train_sft.py logs the spectral norms of A and B at each eval)"), claims
    longest = lambda r: (-r["norms"][-1][0], r["name"])   # the finding is about the end of training
    drawn = []
    for rs_ in group([r for r in every if not r["facts"]] or every, config).values():
        drawn.append(min(at_best_lr(rs_) or rs_, key=lambda r: r["seed"]))
    rs = sorted(drawn, key=longest)[:3]
    fig, (ax,) = _fig(width=8)
    rows = ["run                                              step"
            "  median |A|_2  median |B|_2  B > A in"]
    for i, r in enumerate(rs):
        steps = np.array([s for s, _, _ in r["norms"]])
        on = "" if r["layers"] == "all" else " on " + r["layers"]
        for which, ls in (("A", "-"), ("B", "--")):
            v = np.array([a if which == "A" else b for _, a, b in r["norms"]])
            q1, med, q3 = np.percentile(v, [25, 50, 75], axis=1)
            ax.plot(steps, med, ls, color=f"C{i}", marker="o", ms=3,
                    label=f"{which}: {_label(r['rank'])}{on}, {steps[-1]} steps, LR {r['lr']:.2g}")
            ax.fill_between(steps, q1, q3, color=f"C{i}", alpha=0.12, lw=0)
        step, a, b = r["norms"][-1]
        rows.append(f"{r['name'][:48]:48} {step:5}  {np.median(a):12.4f}  {np.median(b):12.4f}  "
                    f"{sum(y > x for x, y in zip(a, b))}/{len(a)} matrices")
    # part: of the 7 matrices of each layer (q, k, v, o, gate, up, down: lora_modules' order)
    def ratio(r, part=None):
        a, b = (np.array(v, dtype=float) for v in r["norms"][-1][1:])
        q = b / np.maximum(a, 1e-12)
        return float(np.median(q if part is None else q.reshape(-1, 7)[:, part]))
    split = lambda r: (r["layers"] == "all" and r["n_layers"]
                       and len(r["norms"][-1][1]) == 7 * r["n_layers"])
    seeded = [g for g in (at_best_lr(rs_, seeds=2) for rs_ in group(every, config).values()) if g]
    rows += ["", "configuration at its best LR (2+ seeds, longest first)      step  seeds  "
                 "|B|/|A| at the end [95% CI]   attention matrices       MLP matrices"]
    for g in sorted(seeded, key=lambda g: longest(g[0])):
        parts = [None] + ([slice(0, 4), slice(4, 7)] if all(split(r) for r in g) else [])
        stats = [mean_ci([ratio(r, p) for r in g]) for p in parts]
        cells = [f"{m:.3f} {_ci(lo, hi, '{:.3f}'):16}" for m, lo, hi in stats]
        # the seeds' common name
        name, step = re.sub(r"_s[0-9]+$", "", g[0]["name"]), g[0]["norms"][-1][0]
        kinds = ("all matrices", "attention matrices", "MLP matrices")
        for (m, lo, hi), which in zip(stats, kinds):
            claim(claims, "B ends with a larger norm than A",
                  f"{name}, step {step}: |B|/|A| at the end, {which}",
                  m, lo=lo, hi=hi, seeds=len(g), null=1)
        rows.append(f"{name[:56]:56} {step:5}  {len(g):5}  " + "  ".join(cells))
    above = [r["name"] for r in rs if np.median(r["norms"][-1][2]) > np.median(r["norms"][-1][1])]
    ends = ("B ends above A in " + ", ".join(above) if above
            else "B ends below A in every run drawn (the table: where it ends above)")
    ax.set(xlabel="step", ylabel="spectral norm (median; band: quartiles)",
           title=f"LoRA's A (solid) and B (dashed): B grows from zero;\n{ends}")
    ax.legend(fontsize=7, loc="upper left")
    return fig, "\n".join(rows), claims


BITS_PER_FACT = math.log2(1e4)   # train_sft.facts: a 4-digit code drawn uniformly
# the finding the facts runs test
CAPACITY = "Low ranks fall behind FullFT once the data exceed their capacity"


def stored_bits(run, at=-1, unseen=False):
    """Bits of the facts' codes a run has stored at its at-th eval: the K codes hold K log2(10^4)
    bits, and what the model still needs to be told is its summed log loss on the answers, in bits,
    scaled from the eval facts to all K. No model can predict an unseen code better than uniform
    digits, so this is a lower bound on what the weights hold about the codes (a format not yet
    learnt counts against it). unseen=True measures against the loss on facts the run never saw
    instead: that cancels the format but adds the overconfidence memorising brings."""
    if run["diverged"] or not run["eval_tokens"] or not run["n_eval"]:
        return math.nan
    if at == -1 and not unseen and run.get("all_facts"):
        return run["all_facts"]["registered"]  # the final adapter scored on all K facts
    steps, losses = run["eval"]
    tokens = dict(run["eval_tokens"])[int(steps[at])] / run["n_eval"]   # answer tokens per fact
    told = losses[at] * tokens / math.log(2)
    us, ul = run["unseen"]
    base = (ul[us == steps[at]][0] * tokens / math.log(2) if unseen and steps[at] in us
            else BITS_PER_FACT)
    return run["facts"] * (base - told)


def _plateau_gain(run):
    """The fraction of its final stored bits a run gained over the last quarter of its steps."""
    steps = run["eval"][0]
    q = int(np.argmin(np.abs(steps - 0.75 * steps[-1])))
    last = stored_bits(run)
    return (last - stored_bits(run, q)) / abs(last) if last else math.nan


def log_ratio_ci(a, b):
    """a / b, each {seed: positive value}: the geometric mean ratio over shared seeds with a 95% t
    interval on log."""
    logs = [{s: math.log(v) for s, v in d.items() if v > 0} for d in (a, b)]
    return tuple(math.exp(v) for v in paired_gap(*logs))   # exp(NaN) is NaN: no interval stays none


def _rank_doubling(bits, where, row_where, rows, claims):
    """Bits stored by rank r over rank r/2, paired by seed, for each such pair in
    {rank: {seed: bits}}: 2 where capacity binds both (a capacity limit; a fixed learning speed
    per step predicts no such ratio)."""
    for r2, b2 in sorted(bits.items()):
        b1 = bits.get(r2 // 2)
        if r2 > 1 and b1 and len(set(b1) & set(b2)) >= 2:
            rat, lo, hi = log_ratio_ci(b2, b1)
            claim(claims, CAPACITY, f"{where}: bits stored by rank {r2} / by rank {r2 // 2}, "
                            "paired by seed (2 if capacity binds both)",
                  rat, lo=lo, hi=hi, seeds=len(set(b1) & set(b2)), null=2)
            rows.append(f"{row_where}: rank {r2} stores {rat:.2f}x [{lo:.2f}, {hi:.2f}] "
                        f"what rank {r2 // 2} stores (paired by seed)")


def capacity_select(runs):
    """fig_capacity's runs, grouped by (layers, K): the study (the group of runs with the FullFT
    control and the most arms), the longer runs of it, and the shorter ones (fewer examples at the
    study's batch size and LR decay). Returns (studies, longer, shorter)."""
    rs = [r for r in runs
          if r["facts"] and r["plain"] and len(r["eval"][0]) >= 2 and not r["diverged"]]
    studies, longer, shorter = {}, {}, {}
    for key, mine in group(rs, lambda r: (r["layers"], r["facts"])).items():
        by_len = group(mine, lambda r: (r["examples"], r["batch_size"], r["cooldown"]))
        studies[key] = max(by_len.values(), key=lambda g: (any(r["rank"] == 0 for r in g),
                                                           len({r["rank"] for r in g}),
                                                           g[0]["examples"], len(g)))
        s0 = studies[key][0]
        longer[key] = [g for g in by_len.values() if g[0]["examples"] > s0["examples"]]
        same_recipe = lambda g: (g[0]["cooldown"], g[0]["batch_size"]) == (s0["cooldown"],
                                                                         s0["batch_size"])
        shorter[key] = [g for g in by_len.values()
                        if g[0]["examples"] < s0["examples"] and same_recipe(g)]
    return studies, longer, shorter


def capacity_table(studies, longer, shorter, claims):
    """fig_capacity's numbers: (table rows, the right panel's points {(layers, rank, steps):
    [(K, bits, lo, hi)]}, each short LR sweep's arms at their best LR {(layers, K): {rank: runs}},
    Figure 1's curves (K, the study's runs, each arm's runs at its best LR) or None). The claims
    are appended to `claims`."""
    points, early = defaultdict(list), defaultdict(dict)
    rows = ["layers          facts   bits  rank    params      LR  seeds  final loss  unseen  "
            "bits stored [95% CI]   bits/param [95% CI]    last-quarter gain   "
            "minus FullFT, paired [95% CI]"]
    # the shorter runs: a point each on the right panel, or an LR sweep the middle panel draws
    for key, groups in shorter.items():
        for g in groups:
            for rank, rs_ in group(g, "rank").items():
                if len(by_lr := scores_by_lr(rs_)) > 1:
                    loss = ", ".join(f"{lr:.3g} {np.mean(v):.3f}"
                                     for lr, v in sorted(by_lr.items()))
                    n_steps = g[0]["examples"] // g[0]["batch_size"]
                    rows.append(f"{key[0]} at {key[1]} facts, {_label(rank)}, {n_steps} steps: "
                                f"final loss at LR {loss}")
                    early[key][rank] = at_best_lr(rs_)
                    continue
                n = g[0]["examples"] // g[0]["batch_size"]
                bits = mean_ci([stored_bits(r) for r in rs_])
                points[key[0], rank, n].append((key[1], *bits))
                what = f"{_label(rank)} on {key[0]}, {key[1]} facts, {n} steps: bits stored"
                claim(claims, CAPACITY, what, *bits, seeds=len(rs_))
    curves, per_seed, best_lr = None, {}, {}
    for (layers, k), mine in sorted(studies.items()):
        # each rank's best LR among those run at its largest seed count: a one-seed variant (the
        # half-LR run) does not stand in for the study's LR, run at more seeds
        most = lambda rs: max(Counter(r["lr"] for r in rs).values())
        arms = {rank: [r for r in mine if r["rank"] == rank] for rank in _ranks(mine)}
        bests = {rank: at_best_lr(rs, seeds=most(rs)) for rank, rs in arms.items()}
        best_lr.update({(layers, k, rank): best[0]["lr"] for rank, best in bests.items()})
        full = {r["seed"]: stored_bits(r) for r in bests.get(0, [])}
        for rank, best in bests.items():
            per_seed[layers, k, rank] = bits = {r["seed"]: stored_bits(r) for r in best}
            (m, lo, hi), p = mean_ci(bits.values()), best[0]["params"]
            gain = mean_ci([_plateau_gain(r) for r in best])[0]
            paired = paired_gap(bits, full) if rank and len(full) and len(bits) else None
            gap = _est(*paired, "{:+.0f}") if paired else ""
            unseen = (np.mean([r["unseen"][1][-1] for r in best])
                      if all(len(r["unseen"][1]) for r in best) else math.nan)
            rows.append(f"{layers:15} {k:5} {k * BITS_PER_FACT:6.0f}  {_label(rank):7} {p:8,} "
                        f"{best[0]['lr']:7.2g}  {len(best):5}  "
                        f"{np.mean([final_loss(r) for r in best]):10.4f}  {unseen:6.3f}  "
                        f"{m:7.0f} {_ci(lo, hi, '{:.0f}'):14}  "
                        f"{m / p:7.3f} {_ci(lo / p, hi / p, '{:.3f}'):14}  {gain:+17.1%}   {gap}")
            if len(best[0]["unseen"][0]):
                n = best[0]["examples"] // best[0]["batch_size"]
                points[layers, rank, n].append((k, m, lo, hi))
                claim(claims, CAPACITY, f"{_label(rank)} on {layers}, {k} facts "
                                f"({k * BITS_PER_FACT:.0f} bits): bits stored",
                      m, lo=lo, hi=hi, seeds=len(best),
                      verdict=f"{m / (k * BITS_PER_FACT):.0%} of the data's bits")
                if rank:
                    claim(claims, CAPACITY, f"{_label(rank)} on {layers}, {k} facts: "
                                    "bits stored per trainable parameter",
                          m / p, lo=lo / p, hi=hi / p, seeds=len(best),
                          verdict="below 2 (the post's assumption)" if hi / p < 2 else None, null=2)
                    if paired:
                        what = (f"{_label(rank)} minus FullFT on {layers}, {k} facts: "
                                "bits stored, paired by seed")
                        claim(claims, CAPACITY, what, *paired, seeds=len(set(bits) & set(full)))
        # Figure 1: the largest such K
        if 0 in bests and len(bests) > 1 and all(len(r["unseen"][0]) for r in mine):
            curves = max([c for c in (curves, (k, mine, bests)) if c],
                         key=lambda c: (c[0], len(c[1])))
    for (layers, k), groups in longer.items():   # a plateau: training longer adds little
        for g in groups:
            s0, c, long_bits = studies[layers, k][0], g[0]["cooldown"], {}
            at = f"{layers} at {k} facts"
            times = (f"{g[0]['examples'] / s0['examples']:g}x"
                     + f" (LR decay {c:g})" * (c != s0["cooldown"]))
            for rank in _ranks(g):
                long_bits[rank] = long = {r["seed"]: stored_bits(r) for r in g if r["rank"] == rank
                                          and r["lr"] == best_lr.get((layers, k, rank))}
                short = per_seed.get((layers, k, rank), {})
                if not set(long) & set(short):
                    continue
                short = {s: v for s, v in short.items() if s in long}   # paired: seeds both ran
                rat, lo, hi = log_ratio_ci(long, short)
                m, mlo, mhi = mean_ci(long.values())
                p = next(r["params"] for r in g if r["rank"] == rank)
                n = g[0]["examples"] // g[0]["batch_size"]
                points[layers, rank, n].append((k, m, mlo, mhi))
                claim(claims, CAPACITY, f"{_label(rank)} on {layers}, {k} facts: "
                                f"bits stored after {times} the steps / after 1x, "
                                "paired by seed (1 at a plateau)",
                      rat, lo=lo, hi=hi, seeds=len(set(long) & set(short)), null=1)
                what = (f"{_label(rank)} on {layers}, {k} facts, {times} the steps: "
                        "bits stored per trainable parameter")
                claim(claims, CAPACITY, what, m / p, lo=mlo / p, hi=mhi / p, seeds=len(long),
                      null=2)
                gain = mean_ci([_plateau_gain(r) for r in g if r["rank"] == rank])[0]
                rows.append(f"{at}, {_label(rank)} trained {times} as long: "
                            f"{_est(m, mlo, mhi, '{:.0f}')} bits, "
                            f"{_est(m / p, mlo / p, mhi / p, '{:.3f}')} bits/param, "
                            f"{rat:.3f}x [{lo:.3f}, {hi:.3f}] the 1x run's bits "
                            f"(paired by seed); last-quarter gain {gain:+.1%}")
            _rank_doubling(long_bits, f"{layers}, {k} facts, {times} the steps",
                           f"{at}, {times} as long", rows=rows, claims=claims)
    for layers, k in studies:
        if (layers, k, 0) in per_seed:   # beside the FullFT control
            by_rank = {rank: b for (ly, kk, rank), b in per_seed.items() if (ly, kk) == (layers, k)}
            _rank_doubling(by_rank, f"{layers}, {k} facts", f"{layers} at {k} facts", rows=rows,
                           claims=claims)
    return rows, points, early, curves


def capacity_draw(curves, early, longer, points, decision):
    """fig_capacity's figure: Figure 1 (left), the short sweep's first steps (if any), bits stored
    against the bits offered, and the capacity decision's runs against their length (right)."""
    k, mine, bests = curves
    ear, cols = early.get((mine[0]["layers"], k), {}), _colors(bests)
    n_axes = 2 + bool(ear) + bool(decision)
    fig = Figure(figsize=(14, 9 if n_axes > 2 else 4.5), dpi=110, layout="constrained")
    axes = list(fig.subplots(2 if n_axes > 2 else 1, 2).flat)
    for ax in axes[n_axes:]:
        ax.remove()
    axes = axes[:n_axes]
    for ax in axes:
        ax.grid(alpha=0.3)
    left, right = axes[0], axes[1 + bool(ear)]
    # the post draws each arm at its own best LR: here with evals every few steps
    for rank, best in ear.items():
        axes[1].plot(*_eval_curve(best)[:2], color=cols.get(rank, "gray"),
                     lw=2 if rank == 0 else 1.3,
                     label=f"{_label(rank)}, LR {best[0]['lr']:.0e} "
                           f"({len(best)} seed{'s' * (len(best) > 1)})")
        n = best[0]["examples"] // best[0]["batch_size"]
    if ear:
        axes[1].axvline((1 - best[0]["cooldown"]) * n, color="gray", ls=":", lw=1,
                        label="LR decay to 0 starts")
        axes[1].set(xlabel="step", ylabel="eval loss on the trained facts (nats/token)",
                    ylim=(0, None),
                    title=f"The first {n} steps, each arm at its best LR (the table's sweep)")
        axes[1].legend(fontsize=7)
    for rank, best in bests.items():
        _band(left, *_eval_curve(best), color=cols[rank], lw=2 if rank == 0 else 1.3,
              label=f"{_label(rank)} ({best[0]['params']:,} params, LR {best[0]['lr']:.2g}, "
                    f"{len(best)} seed{'s' * (len(best) > 1)})")
    # the plateau check: the same arms trained longer; the shortest dashed, longer ones dotted,
    # then dash-dotted
    for j, g in enumerate(sorted(longer.get((mine[0]["layers"], k), []),
                                 key=lambda g: g[0]["examples"])):
        factor = g[0]["examples"] / mine[0]["examples"]
        for rank, rs_ in group(g, "rank").items():
            steps, mean, _ = _eval_curve(rs_)
            left.plot(steps, mean, ("--", ":", "-.")[j % 3], color=cols.get(rank, "gray"), lw=1,
                      label=f"{_label(rank)}, {factor:g}x the steps ({len(rs_)} seeds)")
    left.axhline(math.log(10) * 4 / 5, color="gray", ls="--", lw=1,
                 label="no code stored (uniform digits, end token learnt)")
    left.set(xscale="log", xlabel="step (log)",
             ylabel="eval loss on the trained facts (nats/token)",
             title=f"{k} random facts ({k * BITS_PER_FACT:,.0f} bits), {mine[0]['layers']}: "
                   "the post's Figure 1")
    left.set_ylim(0, left.get_ylim()[1] * 1.45)   # headroom: the legend sits above the curves
    left.legend(fontsize=7, loc="upper right")
    marks = dict(zip(sorted({n for ly, _, n in points if ly == mine[0]["layers"]}), "v^osDP*X"))
    for (layers, rank, n), pts in sorted(points.items(),
                                         key=lambda t: (t[0][1] == 0, t[0][1], t[0][2])):
        if layers == mine[0]["layers"]:
            k_, y, lo, hi = (np.array(c, dtype=float) for c in zip(*sorted(pts)))
            err = [np.nan_to_num(y - lo), np.nan_to_num(hi - y)]
            right.errorbar(k_ * BITS_PER_FACT, y, yerr=err, capsize=2, lw=1, marker=marks[n],
                           color=cols.get(rank, "gray"), ms=7, label=f"{_label(rank)}, {n:,} steps")
    # y = x, log-log
    right.axline((1e3, 1e3), (1e4, 1e4), color="gray", ls="--", lw=1, label="every bit stored")
    right.set(xscale="log", yscale="log", xlabel="bits in the data (K facts x 13.3)",
              ylim=(100, None), ylabel="bits stored (seed mean, 95% CI)",
              title=f"Stored against offered, {mine[0]['layers']}")
    right.legend(fontsize=6, ncol=2)
    if decision:
        _draw_decision(axes[-1], decision)
    return fig


def _draw_decision(ax, decision):
    """Bits stored on all K facts against training steps (log2), linear in bits so that ~10% a
    doubling shows: for the lowest rank (the decision's subject; the others' points are in the
    table), one line per (LR, K), seeds averaged, registered (filled) and calibrated (hollow,
    dotted)."""
    lowest = min(r for r, _, _ in decision)
    keys = sorted((t for t in decision if t[0] == lowest), key=lambda t: (-t[1], t[2]))
    ks = sorted({k for _, _, k in keys})
    marks = dict(zip(ks, "osD^v"))
    colors = {r: f"C{i}" for i, r in enumerate(sorted({r for r, _, _ in keys}))}
    for rank, lr, k in keys:
        by_steps = decision[rank, lr, k]
        steps = sorted(by_steps)
        reg = [np.mean([v[1] for v in by_steps[n]]) for n in steps]
        cal = [np.mean([v[2] for v in by_steps[n]]) for n in steps]
        seeds = max(len(by_steps[n]) for n in steps)
        ls = "-" if lr == max(lr_ for r_, lr_, _ in keys if r_ == rank) else "--"
        ax.plot(steps, reg, ls, marker=marks[k], color=colors[rank], ms=7,
                label=f"{_label(rank)}, LR {lr:.0e}, K = {k} ({seeds} seed{'s' * (seeds > 1)})")
        ax.plot(steps, cal, ":", marker=marks[k], color=colors[rank], ms=7, mfc="none", lw=0.8)
    ax.plot([], [], ":", color="gray", marker="o", mfc="none", label="calibrated (one temperature)")
    ax.set(xscale="log", xlabel="training steps (log2)", ylabel="bits stored, all K facts",
           title=f"The capacity decision, {_label(lowest)}: bits stored against length "
                 "(a capacity is flat)")
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=6, ncol=2)


def capacity_decision(runs, claims):
    """The runs scored on all K facts (full_eval.json): table rows and {(rank, LR, K): {steps:
    [(seed, registered bits, calibrated bits)]}}; a claim each, registered and calibrated."""
    scored = [r for r in runs if r.get("all_facts") and not r["diverged"]]
    # the decision's recipe is its runs' LR decay; another decay (the pilot's) is a variant, listed
    # but not averaged in as if it were another seed
    recipe = Counter(r["cooldown"] for r in scored).most_common(1)[0][0] if scored else None
    decision = defaultdict(lambda: defaultdict(list))
    rows = ["", "scored on all K facts (results/capacity_k/full_eval.py): registered = the model's "
                "probabilities, calibrated = one fitted temperature T, less its cost",
            "rank      LR      K   steps  seed  registered  calibrated      T  bits/param  "
            "facts stored / partly / none (registered)"]
    for r in sorted(scored, key=lambda r: (r["rank"], -r["lr"], r["facts"], r["examples"],
                                           r["seed"])):
        e, n = r["all_facts"], r["examples"] // r["batch_size"]
        variant = r["cooldown"] != recipe
        if not variant:
            decision[r["rank"], r["lr"], r["facts"]][n].append((r["seed"], e["registered"],
                                                                e["calibrated"]))
        rows.append(f"{_label(r['rank']):7} {r['lr']:6.0e} {r['facts']:5} {n:7,} {r['seed']:5}  "
                    f"{e['registered']:10.0f}  {e['calibrated']:10.0f}  {e['temperature']:5.2f}  "
                    f"{e['registered'] / e['params']:10.3f}  "
                    f"{e['stored']} / {e['partly']} / {e['none']}"
                    + f"   (LR decay {r['cooldown']:g}: a variant, not drawn)" * variant)
    for (rank, lr, k), by_steps in sorted(decision.items()):
        for n, vals in sorted(by_steps.items()):
            where = f"{_label(rank)}, LR {lr:.0e}, {k} facts, {n:,} steps"
            for i, what in ((1, "registered"), (2, "calibrated")):
                m, lo, hi = mean_ci([v[i] for v in vals])
                claim(claims, CAPACITY, f"{where}: bits stored on all K facts, {what}", m,
                      lo=lo, hi=hi, seeds=len(vals))
    return rows, decision


def fig_capacity(runs, w=5):
    """The post's Figure 1 and its capacity argument on K random facts (known information), LoRA of
    each rank and full fine-tuning of one matrix. Figure 1's shape: eval loss on the trained facts
    against log step (seed mean +-1 SE); where runs sweep LRs over a short run, its first steps with
    each arm at its best LR; bits stored against the bits offered per rank (colour) and length
    (marker) under the all-stored diagonal; and the runs scored on all K facts against their
    length. A capacity is a line flat in K and in steps. The table: every study on facts (layers,
    K, examples), then the all-K scores."""
    claims = []  # what this figure measures: main() writes them to summary.json
    studies, longer, shorter = capacity_select(runs)
    if not studies:
        return None, "needs runs on --data facts:K (see results/README.md, capacity)", claims
    rows, points, early, curves = capacity_table(studies, longer, shorter, claims)
    decision_rows, decision = capacity_decision([r for r in runs if r["facts"]], claims)
    rows += decision_rows if decision else []
    if curves is None:
        need = "(no figure: needs facts runs with an unseen-key eval, beside FullFT)"
        return None, "\n".join(rows + [need]), claims
    fig = capacity_draw(curves, early, longer=longer, points=points, decision=decision)
    return fig, "\n".join(rows), claims


def fig_invariance(runs, w=5):
    """The post's invariances leave two directions of (alpha, init_A, LR_A, LR_B) that matter; this
    draws the second, init_A / LR_A, alone: --init_scale c with --lr_ratio_b 1/c keeps alpha x
    init_A x LR_B fixed. Eval loss per c (seed mean +-1 SE) and each c's final loss minus c = 1's
    with a 95% interval over seeds."""
    claims = []  # what this figure measures: main() writes them to summary.json
    rs = [r for r in runs if r["rank"] > 0 and (r["diverged"] or len(r["eval"][0]) >= 2)
          and r["variant"][0] is False and abs(r["variant"][1] * r["variant"][2] - 1) < 1e-9]
    by = group(rs, lambda r: (r["data"], r["rank"], r["layers"], r["lr"], r["batch_size"],
                              r["examples"]))
    by = {k: v for k, v in by.items()
          if len({r["variant"] for r in v}) >= 2 and any(r["plain"] for r in v)}
    if not by:
        return None, ("needs LoRA runs at --init_scale c --lr_ratio_b 1/c "
                      "for several c beside c = 1 (README: invariances)"), claims
    key = max(by, key=lambda k: len(by[k]))
    fig, (ax,) = _fig()
    rows = [f"{key[0]}, rank {key[1]} on {key[2]}, LR {key[3]:.2g}",
            "init_scale  lr_ratio_b  seeds  diverged  final loss  "
            "minus c=1, paired by seed [95% CI]"]
    # c = 1, by seed
    ref = {r["seed"]: final_loss(r) for r in by[key] if r["plain"] and not r["diverged"]}
    variants = sorted(group(by[key], "variant").items(), key=lambda kv: kv[0][2])
    for i, ((_, ratio, init), every) in enumerate(variants):
        vs = [r for r in every if not r["diverged"]]
        if not vs:
            rows.append(f"{init:10g}  {ratio:10g}  {len(every):5}  {len(every):8}")
            continue
        bad = len(every) - len(vs)
        _band(ax, *_eval_curve(vs), color=f"C{i}",
              label=f"init x{init:g}, LR_B/LR_A {ratio:g}"
                    + (f" ({bad} of {len(every)} diverged)" if bad else ""))
        # a seed fixes the facts and the batches
        by_seed = {r["seed"]: final_loss(r) for r in vs}
        d, lo, hi = paired_gap(by_seed, ref)
        unpaired = len(set(by_seed) & set(ref)) < 2
        gap = ("(the reference)" if vs[0]["plain"]
               else _est(d, lo, hi) + " (unpaired: under 2 seeds shared)" * unpaired)
        if not vs[0]["plain"]:
            claim(claims, "Only two of (alpha, init_A, LR_A, LR_B) matter",
                  f"init_A x {init:g}, LR_B / LR_A {ratio:g}: final loss minus "
                  f"c = 1's ({bad} of {len(every)} seeds diverged; nats)",
                  d, lo=lo, hi=hi, seeds=len(vs))
        rows.append(f"{init:10g}  {ratio:10g}  {len(every):5}  {bad:8}  "
                    f"{np.mean([final_loss(r) for r in vs]):10.4f}  {gap}")
    ax.set(xlabel="step", ylabel="eval loss (nats/token; seed mean +-1 SE; step 0 not drawn)",
           title="The second direction alone: init_A / LR_A x c (alpha x init_A x LR_B fixed)")
    ax.legend()
    return fig, "\n".join(rows), claims


LONG = "Low ranks fall off FullFT's curve on real data (the post's Figure 1)"
LONG_RUNS = "train_sft.py --data gsm8k --steps 600 --eval_every 25 (results/README.md, Figure 1)"


def fig_long_gsm8k(runs, w=5, min_steps=600):
    """The post's Figure 1 on real data: held-out loss against log steps by rank, one LR each,
    for the SFT runs of at least min_steps steps on GSM8K, read by the rules registered in
    results/README.md before they ran: linear in log steps (R^2 >= 0.9 from step 25) for FullFT
    and ranks 16 and 256; rank 1 falls off (its gap to FullFT at the end at least twice its gap
    at step 100, and a flatter slope), ranks 16 and 256 within 0.01 nats of FullFT from step 100.
    One seed gives no interval."""
    claims = []
    long = [r for r in runs if not r["rl"] and r["standard"] and "gsm8k" in r["data"]
            and not r["diverged"] and len(r["eval"][0]) and r["eval"][0][-1] >= min_steps]
    by_rank = {k: min(rs, key=lambda r: r["seed"]) for k, rs in group(long, "rank").items()}
    if 0 not in by_rank or len(by_rank) < 2:
        return None, f"needs FullFT and a LoRA rank, {min_steps}+ steps ({LONG_RUNS})", claims
    (fig, (ax,)), cols = _fig(), _colors(by_rank)
    curve = lambda r: tuple(a[r["eval"][0] >= 25] for a in r["eval"])  # step 0 is every arm's
    full_x, full_y = curve(by_rank[0])
    gap = lambda r, step: float(np.interp(step, *curve(r)) - np.interp(step, full_x, full_y))
    rows = [f"one seed; held-out loss at steps 25-{int(full_x[-1])}",
            "arm       LR        loss at 100  at end   slope/decade  R^2 (log steps)  "
            "gap to FullFT at 100  at end  most from 100"]
    for k in _ranks(by_rank.values()):
        r = by_rank[k]
        x, y = curve(r)
        ax.plot(x, y, marker="o", ms=3, color=cols[k], lw=2 if k == 0 else 1.3,
                label=f"{_label(k)}, LR {r['lr']:.3g}")
        slope, icpt = np.polyfit(np.log10(x), y, 1)
        r2 = 1 - np.sum((y - (slope * np.log10(x) + icpt)) ** 2) / np.sum((y - y.mean()) ** 2)
        gaps = [gap(r, s) for s in x[x >= 100]]
        worst = max(gaps, key=abs) if gaps else math.nan
        rows.append(f"{_label(k):9} {r['lr']:.3g}  {np.interp(100, x, y):11.4f}  {y[-1]:.4f}  "
                    f"{slope:+12.4f}  {r2:15.3f}  {gap(r, 100):+20.4f}  {gap(r, x[-1]):+.4f}  "
                    f"{worst:+.4f}")
        if k != 1:
            claim(claims, LONG, f"{_label(k)}: R^2 of held-out loss on log10(step), steps 25-"
                  f"{int(x[-1])}", r2, seeds=1,
                  verdict=f"{'linear' if r2 >= 0.9 else 'not linear'} in log steps by the "
                          "registered rule (R^2 >= 0.9), one seed")
        if k in (16, 256):
            claim(claims, LONG, f"{_label(k)} minus FullFT: largest gap from step 100 (nats)",
                  worst, seeds=1,
                  verdict=f"{'within' if abs(worst) <= 0.01 else 'not within'} 0.01 nats of "
                          "FullFT (registered), one seed")
        if k == 1:
            grows = gap(r, x[-1]) >= 2 * gap(r, 100) and gap(r, x[-1]) > 0
            flatter = slope > np.polyfit(np.log10(full_x), full_y, 1)[0]
            claim(claims, LONG, f"rank 1 minus FullFT at step {int(x[-1])} over at step 100",
                  gap(r, x[-1]) / gap(r, 100) if gap(r, 100) else math.nan, seeds=1,
                  verdict=("falls off (gap at least doubles, slope flatter), one seed"
                           if grows and flatter else
                           "does not fall off by the registered rule, one seed"))
    ax.set(xscale="log", xlabel="step (log scale)", ylabel="held-out loss (nats/token)",
           title="GSM8K, batch 8, one LR per arm: the post's Figure 1 on real data")
    ticks = [t for t in (25, 50, 100, 200, 400, 800, 1600) if t < full_x[-1] / 1.2]
    ticks.append(int(full_x[-1]))
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()   # else log-axis minor labels (3x10^1) crowd the steps
    ax.legend()
    return fig, "\n".join(rows), claims


FIGURES = [("fig1_rank_curves.png", fig_rank_curves), ("fig2_lr_vs_loss.png", fig_lr_sweep),
           ("fig3_batch_size.png", fig_batch_size), ("fig4_layers.png", fig_layers),
           ("fig5_rl.png", fig_rl), ("fig6_early_rank.png", fig_early_rank),
           ("fig7_loss_vs_flops.png", fig_flops), ("fig8_lora_norms.png", fig_norms),
           ("fig9_capacity.png", fig_capacity), ("fig10_invariance.png", fig_invariance),
           ("fig11_gsm8k_long.png", fig_long_gsm8k)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0], allow_abbrev=False)
    p.add_argument("logs", nargs="?", default="out", help="folder holding <run>/log.jsonl")
    p.add_argument("--to", default=None, help="folder for the PNGs (default: the log folder)")
    p.add_argument("--smooth", type=int, default=5,
                   help="moving-average window (steps) for learning curves")
    a = p.parse_args(argv)
    if not Path(a.logs).is_dir():
        p.error(f"{a.logs} is not a folder: pass the --out folder of train_sft.py / train_rl.py")
    runs = load_runs(a.logs)
    claims = []
    hours = sum(r["ms"] for r in runs) / 3.6e6
    print(f"{len(runs)} runs in {a.logs}; their training steps took {hours:.1f} hours "
          "(the logged step times; evals, loading and caching not counted)")
    out = Path(a.to or a.logs)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, make in FIGURES:
        # the facts runs feed their own figures, the batch study (the data with the most batch
        # sizes wins) and the norms table (not its drawing)
        on_facts = make in (fig_capacity, fig_invariance)
        mine = (runs if make in (fig_batch_size, fig_norms)
                else [r for r in runs if bool(r["facts"]) == on_facts])
        fig, text, found = make(mine, a.smooth)
        claims += found
        if fig is None:
            print(f"skip {name}: {text}")
            continue
        fig.savefig(out / name)
        written.append(out / name)
        print(f"wrote {out / name}\n" + "\n".join("  " + line for line in text.splitlines()))
    # every figure above, as data: a reader's script can check a claim of the README without
    # parsing its prose
    summary = out / "summary.json"   # beside the figures: nothing is written into the logs folder
    summary.write_text(json.dumps({"runs": len(runs), "claims": claims}, indent=1) + "\n")
    print(f"wrote {summary}: {len(claims)} measured figures "
          "(estimate, 95% interval, seeds, what the interval says)")
    return written


if __name__ == "__main__":
    main()
