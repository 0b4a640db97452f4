"""
flops.py: parameters, FLOPs, memory and capacity of LoRA against full fine-tuning (FullFT), from
the model's shape alone, then checked against torch's FlopCounterMode and a stopwatch.

    # the post's parameter table, FLOPs, memory, capacity; then any config, rank and layers
    python flops.py --model llama-3.1-8b
    python flops.py --model path/to/config.json --rank 64 --layers mlp --lm_head
    # CPU: count and time SmolLM2-135M's training step
    python flops.py --measure --threads 1
    # GPU (bf16 autocast): LoRA vs FullFT steps, time and memory
    python flops.py --measure --seq_len 2048 --batch 8
    # capacity: a run's bits against LoRA's
    python flops.py --model llama-3.1-8b --log out/sft/log.jsonl
    # MoE (analytic only), machine-readable
    python flops.py --model qwen3-30b-a3b --json
    # CUDA: SFT tok/s, MFU, memory, sampler, bf16 checks (< 5 min)
    python flops.py --gpu

Conventions. A multiply-add (MAC) is 2 FLOPs. Per token, a d_out x d_in matrix costs d_in d_out MACs
for y = W x, d_in d_out for the input gradient x_bar = W^T y_bar and, only if W trains, d_in d_out
for W_bar += y_bar x^T: FullFT 3N^2 against LoRA's 2N^2 + 6NR for N x N (the post's count). So a
framework that reports 6 x params FLOPs per token for LoRA overstates its work by about 1.5x, and a
LoRA step is about 2/3 of a FullFT step, not "no faster". Attention's q.k^T and att.v are counted
over the full T x T (as FlopCounterMode counts SDPA), and autograd's skipped input gradients before
the first trainable weight are modelled, so the analytic count equals the counter's.
"""

import argparse
import json
import math
import os
import re
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

import lora
from lora import Config, UserError, train_flops_per_token
from lora import config_shape as shape, layer_matrices as matrices

# -----------------------------------------------------------------------------
# Shapes: published config.json values (lora.Llama builds each, Qwen3-MoE too; a Mixtral config
# stays a dict of its shape: counted, not built)


def _dense(V, h, i, L, H, kv, tied, hd=0, mt="llama"):
    return Config(vocab_size=V, hidden_size=h, intermediate_size=i, num_hidden_layers=L,
                  num_attention_heads=H, num_key_value_heads=kv, head_dim=hd,
                  tie_word_embeddings=tied, model_type=mt, qk_norm=mt == "qwen3")


presets = {
    "smollm2-135m": _dense(49152, 576, 1536, 30, H=9, kv=3, tied=True),
    "smollm2-360m": _dense(49152, 960, 2560, 32, H=15, kv=5, tied=True),
    "smollm2-1.7b": _dense(49152, 2048, 8192, 24, H=32, kv=32, tied=True),
    "llama-3.2-1b": _dense(128256, 2048, 8192, 16, H=32, kv=8, tied=True),
    "llama-3.2-3b": _dense(128256, 3072, 8192, 28, H=24, kv=8, tied=True, hd=128),
    "llama-3.1-8b": _dense(128256, 4096, 14336, 32, H=32, kv=8, tied=False),
    "llama-3.1-70b": _dense(128256, 8192, 28672, 80, H=64, kv=8, tied=False),
    "qwen3-8b": _dense(151936, 4096, 12288, 36, H=32, kv=8, tied=False, hd=128, mt="qwen3"),
    "qwen3-30b-a3b": Config(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048,
                            num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                            head_dim=128, num_experts=128, qk_norm=True, num_experts_per_tok=8,
                            moe_intermediate_size=768, tie_word_embeddings=False,
                            intermediate_size=6144, norm_topk_prob=True),
}


def load_config(name):
    """A preset name, a config.json (or a folder holding one) or a .gguf file -> Config
    (a dict for Mixtral)."""
    if name.lower() in presets:
        return presets[name.lower()]
    p = Path(name).expanduser()
    if p.suffix == ".gguf" and p.is_file():
        return lora.load_model(p)[0].config
    p = p / "config.json" if p.is_dir() else p
    if not p.is_file():
        raise UserError(f"unknown model {name!r}: pass a preset ({', '.join(presets)}), "
                        "a config.json or a model folder")
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{p} is not valid JSON ({e.msg}): "
                        "copy config.json again from the model's hub page")
    if d.get("model_type") == "qwen3_moe":
        return Config.from_hf(d)
    if d.get("num_local_experts"):  # Mixtral's names for the same thing
        d = {**d, "num_experts": d["num_local_experts"],
             "moe_intermediate_size": d["intermediate_size"]}
    if d.get("num_experts"):  # Qwen3-MoE: every layer sparse is assumed (decoder_sparse_step 1)
        need = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                            "num_experts_per_tok", "moe_intermediate_size") if not d.get(k)]
        if need:
            raise UserError(f"{p} lacks {', '.join(need)}: "
                            "copy the full config.json of the MoE model")
        return d
    return Config.from_hf(d)


def model_params(cfg):
    """Parameters of the whole model (tied embeddings once), biases and norms included."""
    s = shape(cfg)
    h, hd, L = s["hidden_size"], s["head_dim"], s["num_hidden_layers"]
    weights = sum(d_in * d_out * c for _, d_in, d_out, c, _ in matrices(cfg))
    layer = weights + 2 * h + 2 * hd * bool(s["qk_norm"])
    if s.get("attention_bias"):
        layer += (s["num_attention_heads"] + 2 * s["num_key_value_heads"]) * hd
    layer += (h * bool(s.get("o_proj_bias"))
              + (2 * s.get("intermediate_size", 0) + h) * bool(s.get("mlp_bias")))
    return s["vocab_size"] * h * (1 if s.get("tie_word_embeddings") else 2) + L * layer + h


# -----------------------------------------------------------------------------
# Parameters: LoRA's A (r x d_in) and B (d_out x r) hold r (d_in + d_out) per adapted matrix


def lora_params(cfg, rank, layers="all", lm_head=False):
    """Trainable LoRA parameters per matrix type (summed over layers) and their 'total'. MoE experts
    each get rank / num_experts_per_tok, the post's rule, which keeps LoRA's share of the expert
    parameters equal to that of dense layers. rank 0: the matrices' own weights (FullFT of them)."""
    s = shape(cfg)
    plan = lora.layer_plan(layers, s["num_hidden_layers"])
    out = {}
    for name, d_in, d_out, copies, active in matrices(cfg):
        if n_layers := sum(name in p for p in plan):
            per = ((lora.expert_rank(rank, active) if active > 1 else rank) * (d_in + d_out)
                   if rank else d_in * d_out)
            out[name] = per * copies * n_layers
    h, V = s["hidden_size"], s["vocab_size"]
    out["lm_head"] = (rank * (h + V) if rank else h * V) * lm_head
    out["total"] = sum(out.values())
    return out


POST_TABLE = [("mlp", 256, "0.49B"), ("attn", 256, "0.25B"), ("all", 256, "0.70B"),
              ("mlp", 128, "0.24B"), ("all", 1, "3M")]


def post_table(cfg):
    """The post's Llama-3.1-8B table for any model. Its figures are LoRA on the layer set
    PLUS the unembedding (lm_head): without it, mlp r=256 would be 0.45B, not 0.49B, and
    attn 0.22B, not 0.25B."""
    return [dict(layers=lay, rank=r, params=lora_params(cfg, r, lay, lm_head=True)["total"],
                 without_lm_head=lora_params(cfg, r, lay)["total"], post=post)
            for lay, r, post in POST_TABLE]


def human(n):
    """0.49B / 2.75M / 5.30K: the post's style (hundreds of millions written as 0.xxB)."""
    for div, limit, unit in ((1e12, 1e12, "T"), (1e9, 1e8, "B"), (1e6, 1e5, "M"), (1e3, 1e3, "K")):
        if abs(n) >= limit:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


# -----------------------------------------------------------------------------
# FLOPs: multiply-adds (MACs) per token of one training step, forward + backward; 1 MAC = 2 FLOPs


def matrix_macs(d_in, d_out, rank=0):
    """MACs per token for one d_out x d_in matrix, forward + backward. FullFT (rank 0): 3 d_in d_out
    (y = W x, x_bar = W^T y_bar, W_bar += y_bar x^T). LoRA: 2 d_in d_out for the frozen W (no W_bar)
    plus 3 r d_in for A and 3 r d_out for B, which each do the same three products.
    For N x N: 3N^2 against 2N^2 + 6NR, the post's count."""
    return 3 * d_in * d_out if rank == 0 else 2 * d_in * d_out + 3 * rank * (d_in + d_out)


# -----------------------------------------------------------------------------
# Memory: training state in bytes (not activations: they scale with batch x seq_len, see --measure)

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def memory_bytes(cfg, rank=0, layers="all", lm_head=False, dtype="bf16"):
    """Weights, gradients, fp32 master copy and Adam's two fp32 moments, their total, and
    'sampling': the weights in bf16, what an inference server holds (the post's layout argument:
    training keeps grads and moments in fp32, sampling bf16 weights or less). FullFT in a 2-byte
    dtype is the usual mixed precision, 2 + 2 + 4 + 8 = 16 B/param, as fp32's 4 + 4 + 8. LoRA
    keeps the frozen base in dtype and the adapters in fp32 (as lora.py does), with fp32 grads
    and moments: 16 B each."""
    P, b = model_params(cfg), BYTES[dtype]
    if rank == 0:  # on a layer subset only those weights train (train_sft --rank 0 --layers ...)
        T = P if lora.is_full(0, layers) else lora_params(cfg, 0, layers, lm_head)["total"]
        parts = dict(weights=P * b, grads=T * b, master=0 if b == 4 else T * 4, adam=T * 8)
    else:
        n = lora_params(cfg, rank, layers, lm_head)["total"]
        parts = dict(weights=P * b + n * 4, grads=n * 4, master=0, adam=n * 8)
    return {**parts, "total": sum(parts.values()), "sampling": P * BYTES["bf16"]}


def fsdp_memory_bytes(cfg, rank=0, gpus=8, layers="all", lm_head=False, dtype="bf16",
                      device_gib=80):
    """Training state per GPU under N-way FSDP (train_sft.py --fsdp) on GPUs of device_gib:
    every part of memory_bytes sharded N ways, plus the unsharded weights of two transformer
    blocks in `dtype` (the one computing and the one prefetched), or, where lora.fsdp_reshard
    keeps LoRA's gathered base from forward to backward, the whole base in `dtype`. Activations
    excluded."""
    mats = matrices(cfg)
    block = sum(d_in * d_out * copies for _, d_in, d_out, copies, _ in mats) * BYTES[dtype]
    total = memory_bytes(cfg, rank, layers, lm_head, dtype=dtype)["total"]
    if gpus == 1:
        return total
    base = model_params(cfg) * BYTES[dtype]
    keeps = not lora.fsdp_reshard(rank, base, device_gib * 2**30)
    return total / gpus + (base if keeps else 2 * block)


# -----------------------------------------------------------------------------
# Capacity: networks store about 2 bits per parameter (Allen-Zhu & Li, 2024); an SFT dataset holds
# at most its description length; an RL episode gives about 1 bit (the post's argument)

BITS_PER_PARAM = 2
MATH_BITS = 10_000 * 32                # the post's MATH run: ~10,000 problems x 32 samples x 1 bit
R1_ZERO_EPISODES = 10_400 * 32 * 16    # DeepSeek-R1-Zero: 10,400 steps x 32 questions x 16 samples


def capacity_bits(cfg, rank, layers="all", lm_head=False):
    return BITS_PER_PARAM * lora_params(cfg, rank, layers, lm_head)["total"]


def min_rank(cfg, bits, layers="all", lm_head=False):
    """The smallest rank whose capacity holds `bits`."""
    return max(1, math.ceil(bits / capacity_bits(cfg, 1, layers, lm_head)))


def log_bits(path):
    """(bits, 'sft' or 'rl', config record) of a train_sft.py / train_rl.py log. SFT: the first
    epoch's summed log loss, sum(loss x tokens) / ln 2, a code length for the data (the model as it
    learns is the code), so an upper bound on its information. RL: 1 bit per episode."""
    if not Path(path).is_file():
        raise UserError(f"no log at {path}: "
                        "pass out/<run>/log.jsonl as written by train_sft.py or train_rl.py")
    rows = lora.read_jsonl(path)
    config = next((r for r in rows if r.get("type") == "config"), {})
    train = [r for r in rows if r.get("type") == "train"]
    if any("episodes" in r for r in train):
        return float(sum(r.get("episodes", 0) for r in train)), "rl", config
    first = [r for r in train if r.get("epoch", 0) <= 1 + 1e-9 and "loss" in r and "tokens" in r]
    if not first:
        raise UserError(f"{path} has no train records with loss and tokens (or episodes): "
                        "log at least one step")
    return sum(r["loss"] * r["tokens"] for r in first) / math.log(2), "sft", config


# -----------------------------------------------------------------------------
# Report: the numbers as one dict (--json), then as tables


def report(cfg, name, rank=16, layers="all", lm_head=False, seq_len=2048, log=None):
    s, P, Ts = shape(cfg), model_params(cfg), (256, 2048, 8192, 32768, 131072)
    f = lambda r, **kw: train_flops_per_token(cfg, r, layers,
                                              **{"seq_len": seq_len, "lm_head": lm_head, **kw})
    N = s["hidden_size"]
    rep = dict(model=name, shape={k: v for k, v in s.items() if not isinstance(v, dict)}, params=P,
               seq_len=seq_len, rank=rank, layers=layers, lm_head=lm_head,
               lora_params_per_rank=lora_params(cfg, 1, "all", lm_head=True),
               lora_params=lora_params(cfg, rank, layers, lm_head), post_table=post_table(cfg))
    rep["flops"] = dict(
        matrix_macs_fullft=matrix_macs(N, N), matrix_macs_lora=matrix_macs(N, N, rank),
        matrix_ratio=matrix_macs(N, N, rank) / matrix_macs(N, N),
        fullft_no_attention=f(0, attention=False), lora_no_attention=f(rank, attention=False),
        fullft=f(0), lora=f(rank),
        ratio_no_attention=f(rank, attention=False) / f(0, attention=False), ratio=f(rank) / f(0),
        ratio_by_rank={r: f(r) / f(0) for r in (1, 4, 16, 64, 256, 1024)},
        ratio_by_seq_len={T: f(rank, seq_len=T) / f(0, seq_len=T) for T in Ts},
        attention_share={T: 1 - f(0, attention=False) / f(0, seq_len=T) for T in Ts})
    arms = (("FullFT", 0), ("LoRA", rank))
    rep["memory"] = {dt: {m: memory_bytes(cfg, r, layers, lm_head, dtype=dt) for m, r in arms}
                     for dt in ("fp32", "bf16")}
    rep["memory_presets_bf16"] = {
        k: {m: memory_bytes(c, r, layers, lm_head)["total"] for m, r in arms}
        | {"sampling": memory_bytes(c)["sampling"]} for k, c in presets.items()}
    rep["fsdp_per_gpu_bf16"] = {k: {f"{m} x{n}": fsdp_memory_bytes(c, r, n, layers, lm_head=lm_head)
                                    for m, r in arms for n in (1, 2, 4, 8)}
                                for k, c in presets.items()}
    rep["capacity"] = dict(
        bits_by_rank={r: capacity_bits(cfg, r, layers, lm_head) for r in (1, 16, 256)},
        fullft_bits=BITS_PER_PARAM * P, math_bits=MATH_BITS, r1_zero_episodes=R1_ZERO_EPISODES,
        llama8b_rank1_bits=capacity_bits(presets["llama-3.1-8b"], 1, "all", lm_head=True))
    if log:
        bits, kind, conf = log_bits(log)
        rep["capacity"]["log"] = dict(path=str(log), kind=kind, bits=bits,
                                      trainable_params=conf.get("trainable_params"),
                                      min_rank=min_rank(cfg, bits, layers, lm_head))
    return rep


def print_report(rep):
    s, fl, R, gib = rep["shape"], rep["flops"], rep["rank"], lambda b: f"{b / 2**30:8.1f}"
    L, h, V = s["num_hidden_layers"], s["hidden_size"], s["vocab_size"]
    E, k = s.get("num_experts"), s.get("num_experts_per_tok")
    where = rep["layers"] + (" + lm_head" if rep["lm_head"] else "")
    ffn = (f"{E} experts x {s['moe_intermediate_size']} (top {k})" if E
           else f"intermediate {s['intermediate_size']}")
    tied = "tied" if s.get("tie_word_embeddings") else "untied"
    print(f"== {rep['model']}: hidden {h}, {ffn}, {L} layers, {s['num_attention_heads']} heads "
          f"({s['num_key_value_heads']} kv) x {s['head_dim']}, vocab {V}, "
          f"{tied}: {rep['params']:,} params")
    print("\nLoRA parameters, r (d_in + d_out) per adapted matrix"
          f"{f' (rank / {k} on each of {E} experts)' if E else ''}")
    print(f"  {'matrix':10} {'d_in x d_out':>14} {'per rank':>12} {f'r={R} on {where}':>24}")
    dims = {n: f"{a} x {b}" + (f" x{c}" if c > 1 else "") for n, a, b, c, _ in matrices(s)}
    dims["lm_head"] = f"{h} x {V}"
    for n, per in rep["lora_params_per_rank"].items():
        at = rep["lora_params"].get(n)
        per = per if n != "total" else lora_params(s, 1, rep["layers"], rep["lm_head"])["total"]
        print(f"  {n:10} {dims.get(n, ''):>14} {per:>12,} {f'{at:,}' if at else '-':>24}")
    u = {lay: lora_params(s, 1, lay)["total"] for lay in ("mlp", "attn")}
    mlp = (f"{L} x 3 x {E}/{k} x ({h} + {s['moe_intermediate_size']})" if E
           else f"{L} x 3 x ({h} + {s['intermediate_size']})")
    attn = " + ".join(f"{n[0]} {a + b}" for n, a, b, *_ in matrices(s)[:4])
    is_8b = rep["post_table"] == post_table(presets["llama-3.1-8b"])
    print("\nThe post's table (Llama-3.1-8B) is LoRA on the layer set "
          f"PLUS the unembedding (lm_head). Per unit of rank: mlp {u['mlp']:,} = {mlp}; "
          f"attn {u['attn']:,} = {L} x ({attn}); lm_head {h + V:,} = {h} + {V}")
    print(f"  {'layers':6} {'rank':>5} {'params':>14} {'rounded':>8} {'post':>6} "
          f"{'without lm_head':>16}")
    for row in rep["post_table"]:
        print(f"  {row['layers']:6} {row['rank']:>5} {row['params']:>14,} "
              f"{human(row['params']):>8} {row['post'] if is_8b else '-':>6} "
              f"{human(row['without_lm_head']):>16}")
    print("\nFLOPs per token of a training step (forward + backward; 1 multiply-add = 2 FLOPs), "
          f"LoRA r={R} on {where}")
    print(f"  one {h} x {h} matrix: FullFT 3N^2 = {fl['matrix_macs_fullft']:,} MACs, "
          f"LoRA 2N^2 + 6NR = {fl['matrix_macs_lora']:,}: "
          f"ratio {fl['matrix_ratio']:.4f} = 2/3 + 2R/N")
    print(f"  {'whole model':22} {'FullFT':>12} {'LoRA':>12} {'LoRA/FullFT':>12}")
    rows = (("matrices only", "_no_attention"), (f"+ attention, T={rep['seq_len']}", ""))
    for label, key in rows:
        print(f"  {label:22} {fl['fullft' + key] / 1e9:>6.2f} GFLOP "
              f"{fl['lora' + key] / 1e9:>6.2f} GFLOP {fl['ratio' + key]:>12.3f}")
    print("  ratio by rank:    "
          + "  ".join(f"r={r} {v:.3f}" for r, v in fl["ratio_by_rank"].items()))
    print("  ratio by seq_len: "
          + "  ".join(f"T={t} {v:.3f}" for t, v in fl["ratio_by_seq_len"].items()))
    print("  attention's share of FullFT: "
          + "  ".join(f"T={t} {v:.0%}" for t, v in fl["attention_share"].items()))
    print("\nTraining memory, GiB: weights, grads, fp32 master, fp32 Adam moments "
          "(activations excluded), against bf16 sampling")
    print(f"  {'method':10} {'dtype':5} {'weights':>8} {'grads':>8} {'master':>8} {'adam':>8} "
          f"{'total':>8} {'sampling':>8} {'train/sample':>12}")
    cols = ("weights", "grads", "master", "adam", "total", "sampling")
    for dt, m in rep["memory"].items():
        for method, b in m.items():
            print(f"  {method if method == 'FullFT' else f'LoRA r={R}':10} {dt:5} "
                  + " ".join(gib(b[c]) for c in cols)
                  + f" {b['total'] / b['sampling']:>11.2f}x")
    print(f"  presets in bf16, GiB: {'sampling':>8} {'FullFT':>8} {f'LoRA r={R}':>9}")
    for name, m in rep["memory_presets_bf16"].items():
        print(f"  {name:20} " + " ".join(gib(m[c]) for c in ("sampling", "FullFT"))
              + f" {m['LoRA'] / 2**30:9.1f}")
    print("\nPer GPU under N-way FSDP (train_sft.py --fsdp), bf16, GiB: "
          "training state / N + two unsharded blocks, or for LoRA whose bf16 base is under a "
          "quarter of 80 GB the whole gathered base (lora.fsdp_reshard; activations excluded; "
          "* = over an 80 GB GPU's ~74 GiB usable)")
    print(f"  {'preset':20} " + " ".join(f"{'FullFT x' + str(n):>10}" for n in (1, 2, 4, 8)) + " "
          + " ".join(f"{f'r={R} x{n}':>10}" for n in (1, 2, 4, 8)))
    for name, m in rep["fsdp_per_gpu_bf16"].items():
        cell = lambda v: f"{v / 2**30:9.1f}" + ("*" if v / 2**30 > 74 else " ")
        print(f"  {name:20} " + " ".join(cell(m[f'FullFT x{n}']) for n in (1, 2, 4, 8)) + " "
              + " ".join(cell(m[f'LoRA x{n}']) for n in (1, 2, 4, 8)))
    c = rep["capacity"]
    print(f"\nCapacity at {BITS_PER_PARAM} bits per parameter, LoRA on {where}: "
          + ", ".join(f"rank {r} {human(b)} bits" for r, b in c["bits_by_rank"].items())
          + f"; FullFT {human(c['fullft_bits'])} bits")
    print(f"  the post's MATH RL: 10,000 problems x 32 samples x 1 bit = {c['math_bits']:,} bits; "
          f"rank-1 LoRA on Llama-3.1-8B (all + lm_head) holds {c['llama8b_rank1_bits']:,}, "
          f"{c['llama8b_rank1_bits'] / c['math_bits']:.0f}x that")
    print(f"  the post's DeepSeek-R1-Zero: 10,400 steps x 32 questions x 16 samples "
          f"= {c['r1_zero_episodes']:,} episodes = {human(c['r1_zero_episodes'])} bits, "
          f"{c['r1_zero_episodes'] / c['llama8b_rank1_bits']:.2f}x that rank-1 capacity")
    if "log" in c:
        g, n = c["log"], c["log"]["trainable_params"] or 0
        what = "summed first-epoch log loss" if g["kind"] == "sft" else "episodes x 1 bit"
        print(f"  {g['path']}: {human(g['bits'])} bits ({what}); the run trained {n:,} params "
              f"= {human(BITS_PER_PARAM * n)} bits; "
              f"LoRA on {where} here needs rank >= {g['min_rank']}")


# =============================================================================
# Benchmarks: the accounting above checked against torch's FLOP counter and a stopwatch, the SFT
# step and sampler against transformers + PEFT, the GPU benchmark (--gpu), the MoE layer (--moe).
# Above this line is all that the post's tables need.
# =============================================================================

# -----------------------------------------------------------------------------
# Measurement: torch's FLOP counter, a stopwatch and memory, on a random-init model of the shape

# dense bf16 tensor-core FLOP/s from datasheets, matched as whole words
PEAKS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "B200": 2250e12, "A100": 312e12,
         "L40S": 362e12, "L4": 121e12, "RTX 4090": 165e12}


def device_peak(device):
    """(peak FLOP/s, what it is): the GPU's datasheet bf16 dense peak; on CPU a measured rate, the
    median of 5 fp32 2048^3 matmuls at the thread count in use (no datasheet fits a shared CPU)."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAKS.items() if re.search(rf"\b{k}\b", name)), None)
        return peak, (f"{name}, bf16 dense datasheet peak" if peak
                      else f"{name}: unknown peak, add it to PEAKS")
    a, b, times = torch.randn(2048, 2048), torch.randn(2048, 2048), []
    for _ in range(6):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return (2 * 2048 ** 3 / statistics.median(times[1:]),
            f"fp32 2048^3 matmul on {torch.get_num_threads()} CPU thread(s), measured")


def _forward_backward(model, idx, tgt, amp):
    with lora.autocast(idx.device, amp):
        loss = model(idx, tgt)
    loss.backward()


def counted_flops(model, idx, tgt, amp=None):
    """FLOPs of one forward + backward by torch.utils.flop_counter.FlopCounterMode. Its registry
    lacks the CPU flash-attention ops (attention would count 0 on CPU), so they get torch's own
    SDPA formulas, and the in-place addmm_ (LoRALinear's B matmul), which gets addmm's."""
    from torch.utils import flop_counter as fc
    aten = torch.ops.aten
    cpu_sdpa = {
        aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *a, out_shape=None, **kw: fc.sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda g, q, k, v, *a, out_shape=None, **kw: fc.sdpa_backward_flop_count(g, q, k, v),
        aten.addmm_: lambda y, a, b, *args, out_shape=None, **kw: fc.mm_flop(a, b)}
    with fc.FlopCounterMode(display=False, custom_mapping=cpu_sdpa) as counter:
        _forward_backward(model, idx, tgt, amp)
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def activation_bytes(model, idx, tgt, amp=None):
    """Bytes autograd keeps for backward from one forward (each storage once, parameters excluded):
    the part of training memory that grows with batch x seq_len."""
    params, saved = {p.untyped_storage().data_ptr() for p in model.parameters()}, {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            saved[st.data_ptr()] = st.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _forward_backward(model, idx, tgt, amp)
    model.zero_grad(set_to_none=True)
    return sum(saved.values())


def state_bytes(model, opt):
    """Bytes of live weights, gradients and Adam moments (each storage once; tied weights once)."""
    seen, out = set(), dict(weights=0, grads=0, adam=0)
    tensors = [("weights", p) for p in model.parameters()]
    tensors += [("grads", p.grad) for p in model.parameters()]
    tensors += [("adam", t) for st in opt.state.values() for t in st.values()
                if torch.is_tensor(t) and t.dim()]
    for kind, t in tensors:
        if t is not None and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            out[kind] += t.untyped_storage().nbytes()
    return out


def measure(cfg, rank, layers, lm_head, seq_len, batch, steps, device="auto", compile=False):
    """Count, time and weigh real AdamW training steps of FullFT and LoRA on a random-init model of
    this shape (the weights' values change nothing measured), interleaved FullFT, LoRA, FullFT, ...
    so that a noisy machine slows both alike. Adapters are fp32 and bf16 autocast runs on CUDA
    (lora.pick_device). compile: time torch.compile(model) as train_sft.py --compile does (the
    untimed warm-up step compiles)."""
    if isinstance(cfg, dict):
        raise UserError("a Mixtral config is counted, not built "
                        "(lora.Llama's MoE is Qwen3-MoE's): measure a preset")
    dev, _, amp, how = lora.pick_device(device)
    cuda = dev.startswith("cuda")
    room = (torch.cuda.get_device_properties(dev).total_memory if cuda
            else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    if 20 * model_params(cfg) > room:  # FullFT's 16 B/param, the LoRA copy and activations
        raise UserError(f"FullFT of this model does not fit in {room / 2**30:.0f} GiB: "
                        "measure a smaller preset such as smollm2-135m")
    torch.manual_seed(0)
    runs = {}
    # as train_sft.py: each arm on the per-layer plan of --layers
    for method, r in (("FullFT", 0), ("LoRA", rank)):
        model, opt = lora.prepare_training(lora.Llama(cfg), r, 1e-5, layers=layers, lm_head=lm_head,
                                           device=dev)
        runs[method] = dict(model=model, fwd=torch.compile(model) if compile else model, opt=opt,
                            rank=r, times=[])
    idx, tgt = (torch.randint(cfg.vocab_size, (batch, seq_len), device=dev) for _ in range(2))
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for i in range(steps + 1):  # step 0 warms up (allocator, Adam state) and is not timed
        for run in runs.values():
            # the last step also gives this method's peak, as if it were alone
            if cuda and i == steps:
                before = torch.cuda.memory_allocated()
                resident = sum(state_bytes(run["model"], run["opt"]).values())
                torch.cuda.reset_peak_memory_stats()
            sync()
            t0 = time.perf_counter()
            run["opt"].zero_grad(set_to_none=True)
            _forward_backward(run["fwd"], idx, tgt, amp)
            sync()
            t1 = time.perf_counter()
            run["opt"].step()
            sync()
            # forward + backward, optimizer
            run["times"].append((1000 * (t1 - t0), 1000 * (time.perf_counter() - t1)))
            if i == 0:
                run["warmup_s"] = time.perf_counter() - t0   # with compile: the compilation
            if cuda and i == steps:
                run["peak"] = resident + torch.cuda.max_memory_allocated() - before
    peak, peak_what = device_peak(dev)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    out = dict(device=how, peak_flops=peak, peak=peak_what, batch=batch, seq_len=seq_len, rank=rank,
               layers=layers, steps=steps, threads=torch.get_num_threads(), compiled=compile,
               process_max_rss=rss)
    tokens = batch * seq_len
    for method, run in runs.items():
        r, model = run["rank"], run["model"]
        args = (cfg, r, layers, seq_len)
        analytic = tokens * train_flops_per_token(*args, lm_head=lm_head)
        post_flops = tokens * train_flops_per_token(*args, lm_head=lm_head, skip=False)
        causal_flops = tokens * train_flops_per_token(*args, lm_head=lm_head, causal=True)
        med = lambda f: statistics.median(f(*t) for t in run["times"][1:])
        # the state before the counter frees the grads
        ms, state = med(lambda fb, o: fb + o), state_bytes(model, run["opt"])
        out[method] = m = dict(
            counted_flops=counted_flops(model, idx, tgt, amp), analytic_flops=analytic,
            post_convention_flops=post_flops,
            ms=ms, optimizer_ms=med(lambda fb, o: o), tokens_per_s=tokens / ms * 1e3,
            flops_per_s=analytic / ms * 1e3, mfu=causal_flops / ms * 1e3 / peak if peak else None,
            state=state, analytic_state=memory_bytes(cfg, r, layers, lm_head, dtype="fp32"),
            activation_bytes=activation_bytes(model, idx, tgt, amp), peak_bytes=run.get("peak"),
            fwd_bwd_ms=med(lambda fb, o: fb), warmup_s=run["warmup_s"])
        m["counter_vs_analytic"] = m["counted_flops"] / analytic - 1
        m["state_bytes"] = sum(m["state"].values())
        m["analytic_state_bytes"] = m["analytic_state"]["total"]
    full, lo = out["FullFT"], out["LoRA"]
    lo["mfu_if_counted_as_fullft"] = (full["analytic_flops"] / lo["ms"] * 1e3 / peak
                                      if peak else None)
    out["time_ratio"] = lo["ms"] / full["ms"]
    out["flop_ratio"] = lo["analytic_flops"] / full["analytic_flops"]
    out["fwd_bwd_time_ratio"] = lo["fwd_bwd_ms"] / full["fwd_bwd_ms"]
    out["time_ratio_ci"] = paired_ratio_interval([sum(t) for t in runs["LoRA"]["times"][1:]],
                                                 [sum(t) for t in runs["FullFT"]["times"][1:]])
    return out


def paired_ratio_interval(a, b, draws=2000, seed=0):
    """95% bootstrap interval of median(a) / median(b) over interleaved steps, resampled in
    pairs (a slow moment of the machine slows both members of a pair); None under 5 pairs."""
    if len(a) < 5:
        return None
    g, n = torch.Generator().manual_seed(seed), len(a)
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    idx = torch.randint(n, (draws, n), generator=g)
    r = (a[idx].median(1).values / b[idx].median(1).values).sort().values
    return [r[int(0.025 * draws)].item(), r[int(0.975 * draws) - 1].item()]


def print_measured(m):
    full, lo = m["FullFT"], m["LoRA"]
    print(f"\nMeasured on {m['device']}{', torch.compile' if m['compiled'] else ''}, random init, "
          f"{m['batch']} x {m['seq_len']} tokens, LoRA r={m['rank']} on {m['layers']}, "
          f"median of {m['steps']} interleaved AdamW steps; "
          f"peak {m['peak_flops'] or 0:.3g} FLOP/s ({m['peak']})")
    G = 2 ** 30
    warmup = "warm-up step s (compiles)" if m["compiled"] else "warm-up step s"
    rows = [("FLOPs/step, FlopCounterMode", "counted_flops", "{:.4g}", 1),
            ("FLOPs/step, analytic", "analytic_flops", "{:.4g}", 1),
            ("counter vs analytic", "counter_vs_analytic", "{:+.2%}", 1),
            ("post's 2N^2 for every frozen W", "post_convention_flops", "{:.4g}", 1),
            ("ms/step", "ms", "{:.1f}", 1),
            ("  of which optimizer.step", "optimizer_ms", "{:.1f}", 1),
            ("tokens/s", "tokens_per_s", "{:.0f}", 1),
            ("achieved FLOP/s", "flops_per_s", "{:.3g}", 1),
            ("MFU", "mfu", "{:.1%}", 1),
            ("state GiB (weights+grads+adam)", "state_bytes", "{:.3f}", G),
            ("  analytic, fp32 row", "analytic_state_bytes", "{:.3f}", G),
            ("saved activations GiB", "activation_bytes", "{:.3f}", G),
            ("peak GiB, CUDA, this method alone", "peak_bytes", "{:.3f}", G),
            (warmup, "warmup_s", "{:.1f}", 1)]
    print(f"  {'':32} {'FullFT':>12} {'LoRA':>12}")
    for label, key, fmt, scale in rows:
        cells = [fmt.format(r[key] / scale) if r.get(key) is not None else "n/a"
                 for r in (full, lo)]
        print(f"  {label:32} " + " ".join(f"{c:>12}" for c in cells))
    if lo["mfu_if_counted_as_fullft"]:
        print("  LoRA's MFU if its FLOPs were counted as FullFT's "
              f"(as if frozen weights got weight gradients): {lo['mfu_if_counted_as_fullft']:.1%}")
    ci = m.get("time_ratio_ci")
    ci = (f" [{ci[0]:.3f}, {ci[1]:.3f}] (95%, pairs of steps resampled)" if ci
          else " (no interval under 5 steps)")
    print(f"  LoRA/FullFT time {m['time_ratio']:.3f}{ci} measured "
          f"({m['fwd_bwd_time_ratio']:.3f} for forward + backward alone), "
          f"{m['flop_ratio']:.3f} analytic FLOPs (which leave out the optimizer)")
    print(f"  process max RSS {m['process_max_rss'] / 2**30:.2f} GiB, both models together "
          "(a CPU peak is about state + activations)")


# -----------------------------------------------------------------------------
# Speed on real work: the project's SFT step and sampler against transformers + PEFT, if installed

LAYERS7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _hf_peft(base, tok, rank):
    """The same weights as a transformers model, with a PEFT LoRA of the same shape
    (B = 0 at start)."""
    try:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as d:
        lora.save_model(base, d, tokenizer=tok)
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32,
                                                  attn_implementation="sdpa")
    config = LoraConfig(r=rank, lora_alpha=32, lora_dropout=0.0, target_modules=LAYERS7)
    return get_peft_model(hf, config).train()


def _sft_examples(tok, data, n, max_len=512):
    """(ids, assistant mask) of n training rows: GSM8K from --data, else built-in synth problems."""
    rows = lora.load_gsm8k(data, "train")[0] if data else lora.synth_problems(n)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))[:n].tolist()
    rows = [rows[i] for i in order]
    out = []
    for r in rows:
        ids, mask = tok.render_chat(lora.gsm8k_messages(r))
        out.append((ids[:max_len], mask[:max_len]))
    return out


def _hf_sft_step(model, batch, micro, pad_id):
    """What TRL's SFTTrainer does by default: micro-batches in data order, each right-padded to its
    longest row, labels -100 off the answer, the loss over all logits, summed to the batch mean."""
    n = sum(sum(m[1:]) for _, m in batch)
    for i in range(0, len(batch), micro):
        chunk = batch[i:i + micro]
        x = lora.pad_right([ids for ids, _ in chunk], pad_id)
        att = lora.pad_right([[1] * len(ids) for ids, _ in chunk])
        answer = [[t if m else -100 for t, m in zip(ids, mask)] for ids, mask in chunk]
        labels = lora.pad_right(answer, -100)
        k = int((labels[:, 1:] != -100).sum())
        (model(input_ids=x, attention_mask=att, labels=labels).loss * k / n).backward()


def speed(model_name, data, rank, rounds, batch=8, micro=4, prompts=8, samples=8, max_new=48,
          temperature=0.7):
    """Interleaved medians over `rounds` (after a warm-up round) of: a GSM8K SFT step (LoRA, batch /
    micro-batch, completion-only loss), the same LoRA step on equal work (4 x 256 tokens, loss on
    every position) and a FullFT one, and RL-shaped sampling (prompts x samples, stop at end of
    turn); each also through transformers + PEFT when they are installed."""
    base, tok = lora.load_model(model_name)
    ours, opt = lora.prepare_training(base, rank, 1e-5)
    full, full_opt = lora.prepare_training(base, 0, 1e-5)
    hf = _hf_peft(base, tok, rank)
    hf_opt = None
    if hf:
        trainable = [p for p in hf.parameters() if p.requires_grad]
        hf_opt = torch.optim.AdamW(trainable, 1e-5, betas=(0.9, 0.95))
    examples = _sft_examples(tok, data, batch * (rounds + 1))
    rows = (lora.load_gsm8k(data, "test")[0][:prompts] if data
            else lora.synth_problems(prompts, seed=1, max_steps=1))
    instr = "Solve the problem in one short sentence, then end with '#### <number>'."
    chats = [lora.gsm8k_messages(r, with_answer=False, instruction=instr) for r in rows]
    prompt_ids = [tok.render_chat(c, add_generation_prompt=True)[0] for c in chats]
    eq = torch.randint(base.config.vocab_size, (4, 257), generator=torch.Generator().manual_seed(0))
    eq_tokens = eq[:, :-1].numel()
    times = {}

    def timed(name, fn, tokens):
        t0 = time.perf_counter()
        extra = fn()
        s = time.perf_counter() - t0
        times.setdefault(name, []).append((s, tokens if extra is None else extra))

    def step(model, opt, loss_fn):
        def run():
            loss_fn()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return run

    def count_real(outs):
        return sum(len(o) for o in outs)

    for r in range(rounds + 1):
        b = examples[r * batch:(r + 1) * batch]
        n, real = sum(sum(m[1:]) for _, m in b), sum(len(ids) for ids, _ in b)
        sft_loss = lambda: lora.batch_loss(ours, b, micro, tok.pad_id, device="cpu", amp=None,
                                           scale_tokens=n, backward=True)
        timed("sft", step(ours, opt, sft_loss), real)
        if hf:
            timed("sft_hf", step(hf, hf_opt, lambda: _hf_sft_step(hf, b, micro, tok.pad_id)), real)
        timed("eq", step(ours, opt, lambda: ours(eq[:, :-1], eq[:, 1:]).backward()), eq_tokens)
        if hf:
            timed("eq_hf", step(hf, hf_opt, lambda: hf(input_ids=eq, labels=eq).loss.backward()),
                  eq_tokens)
        timed("eq_full", step(full, full_opt, lambda: full(eq[:, :-1], eq[:, 1:]).backward()),
              eq_tokens)
        g = torch.Generator().manual_seed(r)
        timed("sample", lambda: count_real(lora.generate(
            ours, [p for p in prompt_ids for _ in range(samples)], max_new, temperature,
            stop_ids=tok.stop_ids, generator=g, pad_id=tok.pad_id)[0]), 0)
        if hf:
            def hf_sample():
                width = max(map(len, prompt_ids))
                x = torch.tensor([[tok.pad_id] * (width - len(p)) + p for p in prompt_ids])
                with torch.no_grad():
                    pads = (x == tok.pad_id).sum(1, keepdim=True)
                    mask = (x != tok.pad_id) | (torch.arange(x.shape[1]) >= pads)
                    out = hf.generate(input_ids=x, attention_mask=mask, do_sample=True,
                                      temperature=temperature, top_k=0, top_p=1.0,
                                      max_new_tokens=max_new, num_return_sequences=samples,
                                      eos_token_id=tok.stop_ids, pad_token_id=tok.pad_id)
                new = out[:, x.shape[1]:].tolist()
                end = lambda o: next((i + 1 for i, t in enumerate(o) if t in tok.stop_ids), len(o))
                return sum(end(o) for o in new)
            timed("sample_hf", hf_sample, 0)
    # tokens/s, warm-up dropped
    med = lambda name: statistics.median(tok_ / s for s, tok_ in times[name][1:])
    res = {k: med(k) for k in times}
    res.update(rank=rank, rounds=rounds, threads=torch.get_num_threads(), batch=batch, micro=micro,
               data=data or "synth", hf=hf is not None)
    return res


def print_speed(s):
    print(f"\nSpeed on real work ({s['threads']} thread(s), median tokens/s of {s['rounds']} "
          f"interleaved rounds after a warm-up; LoRA r={s['rank']} on all layers, AdamW)")
    rows = [("SFT on " + s["data"] + f", batch {s['batch']} / micro {s['micro']}, "
             "answer-only loss (real tokens/s)", "sft", "sft_hf"),
            ("equal work, 4 x 256 tokens, loss everywhere: LoRA step", "eq", "eq_hf"),
            ("equal work: FullFT step (the project's)", "eq_full", None),
            ("RL-shaped sampling, 8 prompts x 8, <= 48 tokens, T=0.7 (real tokens/s)",
             "sample", "sample_hf")]
    print(f"  {'work':90} {'project':>9} {'HF+PEFT':>9} {'ratio':>7}")
    for label, k, h in rows:
        hv = s.get(h) if h else None
        print(f"  {label:90} {s[k]:9.0f} {'-' if hv is None else f'{hv:.0f}':>9} "
              f"{'' if hv is None else f'{s[k] / hv:.2f}x':>7}")
    print(f"  LoRA / FullFT step time on equal work: {s['eq_full'] / s['eq']:.2f}")
    if not s["hf"]:
        print("  (pip install transformers peft to time the same work through them; "
              "the project never imports them)")


# -----------------------------------------------------------------------------
# The GPU benchmark (--gpu): what a CUDA user of train_sft.py / train_rl.py gets, on random weights
# of real shapes (the values change no speed or memory figure; nothing is downloaded)


class StageTimeout(Exception):
    pass


def run_stage(name, seconds, fn, out):
    """out[name] = fn(partial), under its own time limit (None: none): a stage that overruns or
    fails (an OOM on a smaller GPU) records one line saying so, keeps what it had measured (fn
    writes its figures into `partial` as it goes), and the benchmark goes on to the next."""

    def alarm(*_):
        raise StageTimeout
    old = signal.signal(signal.SIGALRM, alarm)
    if seconds:
        signal.alarm(seconds)
    t0 = time.perf_counter()
    partial = {}
    try:
        out[name] = fn(partial)
    except StageTimeout:
        out[name] = {**partial, "error": f"over its {seconds} s limit"}
    except Exception as e:  # noqa: BLE001  (reported, then the next stage)
        msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        out[name] = {**partial, "error": f"{type(e).__name__}: {msg}"}
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    out[name]["stage_s"] = time.perf_counter() - t0
    return out[name]


class StagePool:
    """Stages under one time limit: each adds its share (seconds; None: no limit) and may use what
    earlier stages left unused, so the whole run stays within the sum of the shares."""

    def __init__(self, out):
        self.out, self.granted, self.spent = out, 0.0, 0.0

    def run(self, name, share, fn):
        self.granted += share or 0
        seconds = share and max(1, math.ceil(self.granted - self.spent))
        r = run_stage(name, seconds, fn, self.out)
        self.spent += r["stage_s"]
        return r


def random_model(cfg, dev, dtype, rank=0, seed=0):
    """A randomly initialised model of cfg's shape, built on the device in `dtype` (an 8B model is
    never materialised on the host), with fp32 LoRA adapters of this rank on every layer."""
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(dev):
            model = lora.Llama(cfg)
            if rank:
                lora.apply_lora(model, rank)
    finally:
        torch.set_default_dtype(prev)
    return model.train()


def _sync(dev):
    if str(dev).startswith("cuda"):
        torch.cuda.synchronize()


def sft_speed(cfg, dev, amp, rank=16, batch=1, seq=4096, steps=5, compile=False, backend=None,
              partial=None):
    """tokens/s, MFU and peak memory of LoRA SFT steps (AdamW, answer loss on every token) at one
    micro-batch of batch x seq tokens; with compile, the blocks as train_sft.py --compile compiles
    them and how many graphs that made. partial: a dict that holds the figures so far."""
    partial = {} if partial is None else partial
    from torch._dynamo.utils import counters
    model = random_model(cfg, dev, amp or torch.float32, rank)
    if compile:
        torch._dynamo.reset()
        counters.clear()
        lora.compile_blocks(model, **({"backend": backend} if backend else {}))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5,
                            fused=str(dev).startswith("cuda"))
    x, y = (torch.randint(cfg.vocab_size, (batch, seq), device=dev) for _ in range(2))
    cuda, times = str(dev).startswith("cuda"), []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for i in range(steps + 2):  # two untimed steps: compilation, allocator, Adam state
        _sync(dev)
        t0 = time.perf_counter()
        with lora.autocast(dev, amp):
            loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(dev)
        times.append(time.perf_counter() - t0)
        partial.update(first_step_s=times[0], steps_timed=max(0, i - 1))
        if i >= 2:
            partial.update(tokens_per_s=batch * seq / statistics.median(times[2:]))
    s = statistics.median(times[2:])
    # what the kernels compute
    flops = batch * seq * train_flops_per_token(cfg, rank, "all", seq, causal=True)
    peak, _ = device_peak(str(dev))
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return dict(tokens_per_s=batch * seq / s, ms=1000 * s, mfu=flops / s / peak if peak else None,
                first_step_s=times[0], peak_gib=peak_gib,
                loss=loss.item(), graphs=counters["stats"]["unique_graphs"] if compile else None,
                graph_breaks=sum(counters["graph_break"].values()) if compile else None)


def copy_bandwidth(dev, nbytes=2**30):
    """Bytes/s of a device-to-device copy (read + write counted), the median of 5."""
    a = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=dev)
    b, times = torch.empty_like(a), []
    for _ in range(6):
        _sync(dev)
        t0 = time.perf_counter()
        b.copy_(a)
        _sync(dev)
        times.append(time.perf_counter() - t0)
    return 2 * a.nbytes / statistics.median(times[1:])


def sampler_speed(cfg, dev, amp, rank=16, rows=64, new_tokens=256, prompt_len=128, group=8,
                  bandwidth=None, backend=None, out=None):
    """RL-shaped sampling (rows = prompts x group, no stop id: every row decodes new_tokens) under
    autocast, as train_rl.py samples: the adapters unmerged and from a merged copy, each eager and
    with the compiled decode step (train_rl --compile). Per way: tokens/s, the fraction of the
    bandwidth floor (the time to read every weight and the KV cache once per decoded token) and
    the kernel launches of one decode step. Each is timed on its second generation (the first
    compiles), the launches at the same shape: they compile nothing new."""
    from torch._dynamo.utils import counters
    model = random_model(cfg, dev, amp or torch.float32, rank).eval()
    prompts = [torch.randint(cfg.vocab_size, (prompt_len,)).tolist() for _ in range(rows // group)]
    prompts = [p for p in prompts for _ in range(group)]
    shp = shape(cfg)
    kv_per_pos = (2 * shp["num_hidden_layers"] * shp["num_key_value_heads"] * shp["head_dim"]
                  * (amp or torch.float32).itemsize)
    bandwidth = bandwidth or copy_bandwidth(dev)
    out = {} if out is None else out  # filled as each way is measured: kept if a later one overruns
    out.update(rows=rows, new_tokens=new_tokens, bandwidth_gb_s=bandwidth / 1e9)
    for way, sampler in (("unmerged", model), ("merged", lora.merged_copy(model))):
        weights = sum(p.numel() * p.element_size() for p in sampler.parameters())
        moved = sum(weights + rows * kv_per_pos * (prompt_len + t) for t in range(new_tokens))
        for compiled in (False, True):
            options = {"backend": backend} if backend else {}
            decode = lora.compile_decode(**options) if compiled else None
            graphs = counters["stats"]["unique_graphs"]
            times = []
            for i in range(2):
                g = torch.Generator(device=dev).manual_seed(0)
                _sync(dev)
                t0 = time.perf_counter()
                with lora.autocast(dev, amp):
                    toks, _ = lora.generate(sampler, prompts, new_tokens, generator=g,
                                            decode=decode)
                _sync(dev)
                times.append(time.perf_counter() - t0)
            n = sum(map(len, toks))
            out[f"{way}_{'compiled' if compiled else 'eager'}"] = dict(
                tokens_per_s=n / times[1], s=times[1], first_s=times[0], floor_s=moved / bandwidth,
                of_floor=moved / bandwidth / times[1],
                launches=decode_launches(sampler, dev, amp, decode=decode, rows=rows,
                                         length=prompt_len + new_tokens),
                graphs=counters["stats"]["unique_graphs"] - graphs)
    return out


# aten ops that launch no kernel on a GPU (views, metadata, a .to() that returns its input)
NO_KERNEL = {"view", "_unsafe_view", "reshape", "t", "transpose", "permute", "select", "slice",
             "unsqueeze", "squeeze", "expand", "as_strided", "alias", "detach", "to", "contiguous",
             "lift_fresh", "empty", "empty_strided", "resolve_conj", "resolve_neg", "promote_types",
             "result_type", "split", "chunk", "narrow", "unbind"}


def decode_launches(model, dev, amp, decode=None, rows=8, length=24):
    """Kernel launches per decoded token (one decode step and its sampling), from the profiler: on
    CUDA the runtime's launch calls (a CUDA graph's replay counts one); elsewhere the outermost
    aten ops that would launch a kernel on a GPU (views and no-op casts left out) and each compiled
    region as one, as its CUDA graph would be. The difference between 3 new tokens and 2 after a
    prompt that makes them `length` long: a compiled step then has the static cache (the graph)
    of the generation it is counted for, and compiles nothing new."""
    from torch.profiler import ProfilerActivity, profile
    cuda, vocab = str(dev).startswith("cuda"), model.config.vocab_size
    P = length - 3 + (length % 128 == 1)  # 2 and 3 new tokens in the same 128-slot bucket
    prompts = [[1 + i % (vocab - 1) for i in range(P)]] * rows

    def count(n):
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            with lora.autocast(dev, amp):
                g = torch.Generator(device=dev).manual_seed(0)
                lora.generate(model, prompts, n, generator=g, decode=decode)
            _sync(dev)
        if cuda:
            return sum(e.count for e in prof.key_averages()
                       if "LaunchKernel" in e.key or "GraphLaunch" in e.key)
        # a compiled region counts one, as its CUDA graph's replay would on a GPU
        launches = lambda e: (e.name.startswith("Torch-Compiled Region")
                              or e.name.startswith("aten::") and e.name[6:] not in NO_KERNEL)

        # counted once, at the outermost op that launches: aten::linear, not also its mm
        def outermost(e):
            p = e.cpu_parent
            while p is not None and not launches(p):
                p = p.cpu_parent
            return p is None
        return sum(launches(e) and outermost(e) for e in prof.events())
    count(3)  # warm-up
    return count(3) - count(2)


def sdpa_backends(cfg, dev, amp, kv_lengths=(130, 131, 257, 513)):
    """Which SDPA kernels accept each attention call of the model: training (causal, grouped keys)
    and decoding, the model's own call (one token against the KV cache under the mask Llama.forward
    builds), with the kernels generate allows (lora.decode_attention: no cuDNN on CUDA). PyTorch
    takes the first that accepts, in the order listed. And the first decode call's time at several
    new KV lengths: a kernel that plans per shape shows as a slow first call at each."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    shp, dtype = shape(cfg), amp or torch.float32
    H, kv, hd = shp["num_attention_heads"], shp["num_key_value_heads"], shp["head_dim"]
    order = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
             SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    q, k, v = (torch.randn(2, n, 256, hd, device=dev, dtype=dtype) for n in (H, kv, kv))
    out = {"train": []}
    for b in order:
        try:
            with sdpa_kernel([b]):
                F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            out["train"].append(b.name.lower())
        except RuntimeError:
            pass
    attn = random_model(replace(cfg, num_hidden_layers=1), dev, dtype).eval()
    seen, probe, real = [], [False], F.scaled_dot_product_attention

    def spy(*a, **kw):  # the model's own decode call, tried with each kernel alone
        if probe[0]:
            probe[0] = False
            for b in order:
                try:
                    with sdpa_kernel([b]):
                        real(*a, **kw)
                    seen.append(b.name.lower())
                except RuntimeError:
                    pass
        return real(*a, **kw)
    F.scaled_dot_product_attention, first_ms = spy, {}
    try:
        with torch.no_grad(), lora.autocast(dev, amp):
            for i, L in enumerate((64, *kv_lengths)):  # the first, untimed, probes the kernels
                cache = lora.KVCache(attn.config, 8, L + 1, device=dev, dtype=dtype)
                attn(torch.randint(100, (8, L), device=dev), cache=cache)
                probe[0] = i == 0
                _sync(dev)
                t0 = time.perf_counter()
                with lora.decode_attention(dev):
                    attn(torch.randint(100, (8, 1), device=dev), cache=cache)
                _sync(dev)
                first_ms[L] = 1000 * (time.perf_counter() - t0) if i else None
    finally:
        F.scaled_dot_product_attention = real
    out["decode"] = seen
    out["decode_first_call_ms"] = {L: ms for L, ms in first_ms.items() if ms is not None}
    return out


def importance_ratio(model, sampler, dev, amp, rows=16, new_tokens=32, prompt_len=64):
    """exp(learner - sampler log-probability) of every sampled token at step 0, as train_rl.py
    computes it: `sampler` draws with the KV cache, `model` rescores (lora.completion_logprobs)."""
    prompts = [torch.randint(model.config.vocab_size, (prompt_len,),
                             generator=torch.Generator().manual_seed(i)).tolist()
               for i in range(rows)]
    with lora.autocast(dev, amp):
        g = torch.Generator(device=dev).manual_seed(0)
        comps, old = lora.generate(sampler, prompts, new_tokens, generator=g)
        model.train()
        with torch.no_grad():
            new = torch.cat(lora.completion_logprobs(model, prompts, comps))
    old_lp = torch.tensor([v for lp in old for v in lp], device=dev, dtype=torch.float64)
    return (new.double() - old_lp).exp()


def bf16_agreement(cfg, dev, amp, rank=16, seq=512):
    """bf16 autocast against float32 on the same weights: the loss and the gradient of the adapters
    (B randomised so that A gets one too); then RL's importance ratio p_learner / p_sampler at step
    0 with train_rl.py's GPU setup (bf16 base, fp32 adapters, bf16 autocast), sampling with the
    adapters unmerged and from a merged bf16 copy (--sample_merged), whose merge rounds."""
    model = random_model(cfg, dev, torch.float32, rank)
    for m in lora.lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B.weight, std=0.02)
    x, y = (torch.randint(cfg.vocab_size, (1, seq), device=dev) for _ in range(2))
    res = {}
    for name, dtype in (("fp32", None), ("bf16", amp or torch.bfloat16)):
        model.zero_grad(set_to_none=True)
        with lora.autocast(dev, dtype):
            loss = model(x, y)
        loss.backward()
        grads = [p.grad.flatten() for p in model.parameters() if p.grad is not None]
        res[name] = (loss.item(), torch.cat(grads))
    (l32, g32), (l16, g16) = res["fp32"], res["bf16"]
    out = dict(loss_fp32=l32, loss_rel_diff=abs(l16 - l32) / abs(l32),
               grad_cosine=F.cosine_similarity(g16, g32, dim=0).item(),
               grad_rel_norm_diff=((g16 - g32).norm() / g32.norm()).item())
    del model
    model = random_model(cfg, dev, torch.bfloat16, rank)
    for m in lora.lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B.weight, std=0.02)
    for kind, sampler in (("unmerged", model), ("merged", lora.merged_copy(model))):
        r = importance_ratio(model, sampler, dev, torch.bfloat16)
        out[kind] = dict(ratio_mean=r.mean().item(), ratio_min=r.min().item(),
                         ratio_max=r.max().item(), abs_log_ratio_mean=r.log().abs().mean().item())
    return out


def gpu_benchmark(device="auto", train_shapes=("llama-3.2-1b", "llama-3.1-8b"),
                  sample_shape="llama-3.2-1b", seq=4096, steps=5, rows=64, new_tokens=256,
                  backend=None, limits=None, say=print):
    """Every stage of the GPU benchmark, each under its own limit (seconds); returns their
    results and prints a line per figure as it goes. Runs anywhere: a CPU with tiny shapes
    is its dry run."""
    dev, _, amp, how = lora.pick_device(device)
    # shares of five minutes (4 x 45 + 120); a stage may use what earlier ones left
    lim = dict(sft=45, sample=90, sdpa=10, agree=20) | (limits or {})
    out = dict(device=how)
    pool = StagePool(out)
    # Triton compiles its launchers with the C compiler in $CC, else gcc or clang on the PATH
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")
    out["c_compiler"] = cc
    say(f"gpu benchmark on {how}; LoRA r16 on every layer, random weights of each shape; "
        f"C compiler for Triton: {cc or 'none found (set CC)'}")
    for name in train_shapes:
        cfg = load_config(name) if isinstance(name, str) else name
        label = name if isinstance(name, str) else "custom"
        for compiled in (False, True):
            key = f"sft_{label}_{'compiled' if compiled else 'eager'}"
            stage = lambda partial: sft_speed(cfg, dev, amp, rank=16, batch=1, seq=seq,
                                              steps=steps, compile=compiled, backend=backend,
                                              partial=partial)
            r = pool.run(key, lim["sft"], stage)
            kept = (f" (kept: {r['tokens_per_s']:,.0f} tok/s over {r['steps_timed']} timed steps)"
                    if "error" in r and "tokens_per_s" in r else "")
            say(f"{key}: " + (r["error"] + kept if "error" in r else
                f"{r['tokens_per_s']:,.0f} tok/s, {r['ms']:.0f} ms/step of 1 x {seq}"
                + (f", MFU {r['mfu']:.1%}" if r["mfu"] else "")
                + (f", peak {r['peak_gib']:.1f} GiB" if r["peak_gib"] else "")
                + (f", {r['graphs']} graphs, {r['graph_breaks']} breaks, "
                   f"first step {r['first_step_s']:.0f} s" if compiled else "")))
    cfg = load_config(sample_shape) if isinstance(sample_shape, str) else sample_shape
    stage = lambda partial: sampler_speed(cfg, dev, amp, rank=16, rows=rows,
                                          new_tokens=new_tokens, backend=backend, out=partial)
    r = pool.run("sample", lim["sample"], stage)
    ways = "; ".join(f"{k.replace('_', ' ')}: {v['tokens_per_s']:,.0f} tok/s, "
                     f"{v['of_floor']:.1%} of the floor, {v['launches']} launches a token"
                     + (f", {v['graphs']} graph(s)" if "compiled" in k else "")
                     for k, v in r.items() if isinstance(v, dict))
    head = (f"{r['rows']} rows x {r['new_tokens']} tokens, "
            f"{r['bandwidth_gb_s']:.0f} GB/s copy bandwidth; " if "rows" in r else "")
    say("sample: " + (f"{r['error']}; kept: " if "error" in r else "") + head + ways)
    r = pool.run("sdpa", lim["sdpa"], lambda _: sdpa_backends(cfg, dev, amp))
    chosen = lambda ks: f"{ks[0]} (accepted by {', '.join(ks)})" if ks else "none"
    say("sdpa: " + (r["error"] if "error" in r else
                    f"training uses {chosen(r['train'])}; "
                    f"decoding (the model's own call) uses {chosen(r['decode'])}; "
                    "its first call at KV lengths " + ", ".join(
                        f"{L}: {ms:.2f} ms" for L, ms in r["decode_first_call_ms"].items())))
    r = pool.run("agree", lim["agree"], lambda _: bf16_agreement(cfg, dev, amp))
    say("bf16 vs fp32: " + (r["error"] if "error" in r else
        f"loss {r['loss_fp32']:.4f}, relative difference {r['loss_rel_diff']:.1e}; "
        f"adapter gradient cosine {r['grad_cosine']:.5f} "
        f"(relative norm of the difference {r['grad_rel_norm_diff']:.3f})"))
    if "error" not in r:
        say("RL importance ratio at step 0, bf16: " + "; ".join(
            f"sampling {k}: mean {r[k]['ratio_mean']:.4f} "
            f"[{r[k]['ratio_min']:.3f}, {r[k]['ratio_max']:.3f}], "
            f"mean |log ratio| {r[k]['abs_log_ratio_mean']:.4f}" for k in ("unmerged", "merged")))
    out["total_s"] = pool.spent
    say(f"stages took {pool.spent:.0f} s" + (f" of their {pool.granted:.0f} s" if pool.granted
                                             else ""))
    return out


# -----------------------------------------------------------------------------
# The MoE layer (--moe): the model's expert loop against a grouped version


def moe_speed(tokens=2048, hidden=576, width=192, experts=32, top_k=4, rank=8, rounds=5, seed=0):
    """Forward + backward time of one MoE layer with per-expert LoRA (rank / top_k each): the
    model's loop over the experts that got tokens (lora.SparseMoE) against a grouped version that
    pads every expert's tokens to the busiest one and runs each projection as one batched matmul
    over stacked (merged) expert weights. Medians of interleaved rounds; returns ms for each."""
    torch.manual_seed(seed)
    cfg = Config(hidden_size=hidden, model_type="qwen3_moe", num_experts=experts,
                 num_experts_per_tok=top_k, moe_intermediate_size=width, norm_topk_prob=True)
    moe = lora.SparseMoE(cfg)
    torch.nn.init.normal_(moe.gate.weight, std=0.5)
    holder = torch.nn.Module()
    holder.config, holder.mlp = cfg, moe
    lora.apply_lora(holder, rank, layers="mlp")
    # non-zero adapters, so that the check below covers them
    for m in lora.lora_modules(holder).values():
        torch.nn.init.normal_(m.lora_B.weight, std=0.05)
    x = torch.randn(tokens, hidden, requires_grad=True)

    def grouped(x):
        probs = torch.softmax(moe.gate(x), -1, dtype=torch.float32)
        w, chosen = probs.topk(top_k, -1)
        w = (w / w.sum(-1, keepdim=True)).to(x.dtype)
        flat = chosen.flatten()
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=experts)
        cap = int(counts.max())
        slot = torch.arange(len(flat)) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
        xs = x.new_zeros(experts, cap, hidden)
        xs[flat[order], slot] = x[order // top_k]
        W = lambda p: torch.stack([getattr(e, p).merged_weight() for e in moe.experts])
        gate = F.silu(torch.bmm(xs, W("gate_proj").transpose(1, 2)))
        h = gate * torch.bmm(xs, W("up_proj").transpose(1, 2))
        ys = torch.bmm(h, W("down_proj").transpose(1, 2))
        out = torch.zeros_like(x)
        return out.index_add(0, order // top_k, ys[flat[order], slot] * w.flatten()[order, None])

    with torch.no_grad():
        diff = (grouped(x) - moe(x)).abs().max().item()
        if diff > 1e-4:
            raise RuntimeError(f"the grouped MoE layer differs from lora.SparseMoE by {diff:.2g}: "
                               "the timing would compare two functions")
    times = {"loop": [], "grouped": []}
    for _ in range(rounds + 1):
        for name, f in (("loop", moe), ("grouped", grouped)):
            t0 = time.perf_counter()
            f(x).square().mean().backward()
            times[name].append((time.perf_counter() - t0) * 1000)
    return {k: statistics.median(v[1:]) for k, v in times.items()} | {"max_abs_diff": diff}


# -----------------------------------------------------------------------------
# main


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and adapter")
    g.add_argument("--model", default="smollm2-135m", help=f"a preset ({', '.join(presets)}), "
                   "a config.json or model folder, or a .gguf")
    g.add_argument("--rank", type=int, default=16,
                   help="LoRA rank (the post's table uses its own ranks)")
    g.add_argument("--layers", default="all",
                   help="all, mlp, attn, or matrix names joined by , or +")
    g.add_argument("--lm_head", action="store_true", help="also put LoRA on the unembedding")
    g = p.add_argument_group("analysis")
    g.add_argument("--seq_len", type=int, default=None,
                   help="tokens per sequence (default 2048; 256 with --measure)")
    g.add_argument("--log", default=None, help="a train_sft.py / train_rl.py log.jsonl: "
                   "its bits against LoRA's capacity")
    g = p.add_argument_group("measurement")
    g.add_argument("--measure", action="store_true",
                   help="count, time and weigh real FullFT and LoRA training steps")
    g.add_argument("--batch", type=int, default=1, help="sequences per measured step")
    g.add_argument("--steps", type=int, default=3,
                   help="timed steps per method, after one warm-up step")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda")
    g.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    g.add_argument("--compile", action="store_true", help="--measure: time torch.compile'd steps "
                   "(the warm-up compiles)")
    g.add_argument("--speed", action="store_true", help="time real SFT steps and sampling, "
                   "against transformers + PEFT if installed")
    g.add_argument("--data", default=None,
                   help="--speed: a GSM8K folder for the SFT batches and prompts "
                   "(default: built-in synth)")
    g.add_argument("--rounds", type=int, default=3, help="--speed: timed rounds after a warm-up")
    g.add_argument("--moe", action="store_true", help="time an MoE layer with per-expert LoRA: "
                   "the expert loop vs grouped matmuls")
    g.add_argument("--gpu", action="store_true", help="the GPU benchmark: LoRA SFT tokens/s, "
                   "MFU and memory on Llama-3.2-1B and 3.1-8B shapes (eager, compiled), "
                   "sampler speed against the bandwidth floor, SDPA kernels, bf16 against fp32; "
                   "random weights, each stage under its own time limit")
    p.add_argument("--json", action="store_true", help="one JSON object instead of tables")
    a = p.parse_args(argv)
    if min(a.rank, a.seq_len or 1, a.batch, a.steps) < 1:
        raise UserError("--rank, --seq_len, --batch and --steps must be positive integers "
                        "(FullFT is always shown beside LoRA)")
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.moe:
        t = moe_speed(rounds=max(a.rounds, 5))
        return print(json.dumps(t)) if a.json else print(
            "MoE layer (2048 tokens, hidden 576, 32 experts x 192, top 4, "
            "LoRA rank 8 = 2 per expert), forward + backward, median ms: "
            f"expert loop {t['loop']:.1f}, grouped bmm {t['grouped']:.1f} "
            f"(loop / grouped {t['loop'] / t['grouped']:.2f})")
    if a.gpu:
        if not torch.cuda.is_available() or a.device == "cpu":
            raise UserError("--gpu benchmarks Llama-3.2-1B and 3.1-8B shapes on a CUDA GPU, "
                            "and torch sees none (on a CPU: --measure or --speed; "
                            "test_lora.py dry-runs --gpu on tiny shapes)")
        out = gpu_benchmark(a.device)
        return print(json.dumps(out, indent=1)) if a.json else None
    if a.speed:
        s = speed(None if a.model == "smollm2-135m" else a.model, a.data, a.rank, a.rounds)
        return print(json.dumps(s, indent=1)) if a.json else print_speed(s)
    cfg, seq_len = load_config(a.model), a.seq_len or (256 if a.measure else 2048)
    rep = report(cfg, a.model, a.rank, a.layers, lm_head=a.lm_head, seq_len=seq_len, log=a.log)
    if a.measure:
        rep["measured"] = measure(cfg, a.rank, a.layers, a.lm_head, seq_len=seq_len, batch=a.batch,
                                  steps=a.steps, device=a.device, compile=a.compile)
    if a.json:
        return print(json.dumps(rep, indent=1))
    print_report(rep)
    if a.measure:
        print_measured(rep["measured"])


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
