"""
flops.py: parameters, FLOPs, memory and capacity of LoRA against full fine-tuning (FullFT), from
the model's shape alone, then checked against torch's FlopCounterMode and a stopwatch.

    python flops.py --model llama-3.1-8b                  # the post's parameter table, FLOPs, memory, capacity
    python flops.py --model path/to/config.json --rank 64 --layers mlp --lm_head
    python flops.py --measure --threads 1                 # CPU: count and time SmolLM2-135M's training step
    python flops.py --measure --seq_len 2048 --batch 8    # GPU (bf16 autocast): the README's benchmark
    python flops.py --model llama-3.1-8b --log out/sft/log.jsonl   # capacity: a run's bits against LoRA's
    python flops.py --model qwen3-30b-a3b --json          # MoE (analytic only), machine-readable

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
import resource
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

import lora
from lora import Config, UserError

# -----------------------------------------------------------------------------
# Shapes: published config.json values; MoE models are plain dicts (Llama() cannot build them)


def _dense(V, h, i, L, H, kv, tied, hd=0, mt="llama"):
    return Config(vocab_size=V, hidden_size=h, intermediate_size=i, num_hidden_layers=L, num_attention_heads=H,
                  num_key_value_heads=kv, head_dim=hd, tie_word_embeddings=tied, model_type=mt, qk_norm=mt == "qwen3")


presets = {
    "smollm2-135m": _dense(49152, 576, 1536, 30, 9, 3, True),
    "smollm2-360m": _dense(49152, 960, 2560, 32, 15, 5, True),
    "smollm2-1.7b": _dense(49152, 2048, 8192, 24, 32, 32, True),
    "llama-3.2-1b": _dense(128256, 2048, 8192, 16, 32, 8, True),
    "llama-3.2-3b": _dense(128256, 3072, 8192, 28, 24, 8, True, hd=128),
    "llama-3.1-8b": _dense(128256, 4096, 14336, 32, 32, 8, False),
    "llama-3.1-70b": _dense(128256, 8192, 28672, 80, 64, 8, False),
    "qwen3-8b": _dense(151936, 4096, 12288, 36, 32, 8, False, hd=128, mt="qwen3"),
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, num_hidden_layers=48,
                          num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                          num_experts_per_tok=8, moe_intermediate_size=768, tie_word_embeddings=False),
}


def load_config(name):
    """A preset name, a config.json (or a folder holding one) or a .gguf file -> Config, or a dict for MoE."""
    if name.lower() in presets:
        return presets[name.lower()]
    p = Path(name).expanduser()
    if p.suffix == ".gguf" and p.is_file():
        return lora.load_model(p)[0].config
    p = p / "config.json" if p.is_dir() else p
    if not p.is_file():
        raise UserError(f"unknown model {name!r}: pass a preset ({', '.join(presets)}), a config.json or a model folder")
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{p} is not valid JSON ({e.msg}): copy config.json again from the model's hub page")
    if d.get("num_local_experts"):  # Mixtral's names for the same thing
        d = {**d, "num_experts": d["num_local_experts"], "moe_intermediate_size": d["intermediate_size"]}
    if d.get("num_experts"):  # Qwen3-MoE: every layer sparse is assumed (decoder_sparse_step 1)
        need = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                            "num_experts_per_tok", "moe_intermediate_size") if not d.get(k)]
        if need:
            raise UserError(f"{p} lacks {', '.join(need)}: copy the full config.json of the MoE model")
        return d
    return Config.from_hf(d)


def shape(cfg):
    """The fields the formulas read, as a dict, from a Config, a config dict or a model."""
    cfg = getattr(cfg, "config", cfg)
    s = dict(cfg) if isinstance(cfg, dict) else asdict(cfg)
    s["num_key_value_heads"] = s.get("num_key_value_heads") or s["num_attention_heads"]
    s["head_dim"] = s.get("head_dim") or s["hidden_size"] // s["num_attention_heads"]
    s.setdefault("qk_norm", s.get("model_type", "").startswith("qwen3"))
    return s


def matrices(cfg):
    """Each layer's matrices in forward order: (name, d_in, d_out, copies, active). `copies` hold
    parameters, `active` of them touch each token: 1 and 1 in dense layers, num_experts and
    num_experts_per_tok for MoE experts."""
    s = shape(cfg)
    h, q, kv = s["hidden_size"], s["num_attention_heads"] * s["head_dim"], s["num_key_value_heads"] * s["head_dim"]
    attn = [("q_proj", h, q, 1, 1), ("k_proj", h, kv, 1, 1), ("v_proj", h, kv, 1, 1), ("o_proj", q, h, 1, 1)]
    if s.get("num_experts"):
        E, k, i = s["num_experts"], s["num_experts_per_tok"], s["moe_intermediate_size"]
        return attn + [("router", h, E, 1, 1), ("gate_proj", h, i, E, k), ("up_proj", h, i, E, k), ("down_proj", i, h, E, k)]
    i = s["intermediate_size"]
    return attn + [("gate_proj", h, i, 1, 1), ("up_proj", h, i, 1, 1), ("down_proj", i, h, 1, 1)]


def targets(layers):
    """'all', 'mlp', 'attn', or names joined by ',' or '+' -> the set of adapted matrix names."""
    if isinstance(layers, str):
        layers = lora.LAYER_SETS.get(layers) or [n for n in layers.replace("+", ",").split(",") if n.strip()]
    bad = [n for n in layers if n not in lora.LAYER_SETS["all"]]
    if bad:
        raise UserError(f"layer name {bad[0]!r} is unknown: use all, mlp, attn or names from {', '.join(lora.LAYER_SETS['all'])}")
    return set(layers)


def model_params(cfg):
    """Parameters of the whole model (tied embeddings once), biases and norms included."""
    s = shape(cfg)
    h, hd, L = s["hidden_size"], s["head_dim"], s["num_hidden_layers"]
    layer = sum(d_in * d_out * c for _, d_in, d_out, c, _ in matrices(cfg)) + 2 * h + 2 * hd * bool(s["qk_norm"])
    if s.get("attention_bias"):
        layer += (s["num_attention_heads"] + 2 * s["num_key_value_heads"]) * hd
    layer += h * bool(s.get("o_proj_bias")) + (2 * s.get("intermediate_size", 0) + h) * bool(s.get("mlp_bias"))
    return s["vocab_size"] * h * (1 if s.get("tie_word_embeddings") else 2) + L * layer + h


# -----------------------------------------------------------------------------
# Parameters: LoRA's A (r x d_in) and B (d_out x r) hold r (d_in + d_out) per adapted matrix


def lora_params(cfg, rank, layers="all", lm_head=False):
    """Trainable LoRA parameters per matrix type (summed over layers) and their 'total'. MoE experts
    each get rank / num_experts_per_tok, the post's rule, which keeps LoRA's share of the expert
    parameters equal to that of dense layers."""
    s, chosen = shape(cfg), targets(layers)
    out = {}
    for name, d_in, d_out, copies, active in matrices(cfg):
        if name in chosen:
            n = rank * (d_in + d_out) * copies * s["num_hidden_layers"]
            out[name] = n // active if n % active == 0 else n / active
    out["lm_head"] = rank * (s["hidden_size"] + s["vocab_size"]) if lm_head else 0
    out["total"] = sum(out.values())
    return out


POST_TABLE = [("mlp", 256, "0.49B"), ("attn", 256, "0.25B"), ("all", 256, "0.70B"), ("mlp", 128, "0.24B"), ("all", 1, "3M")]


def post_table(cfg):
    """The post's Llama-3.1-8B table for any model. Its figures are LoRA on the layer set PLUS the
    unembedding (lm_head): without it, mlp r=256 would be 0.45B, not 0.49B, and attn 0.22B, not 0.25B."""
    return [dict(layers=lay, rank=r, params=lora_params(cfg, r, lay, lm_head=True)["total"],
                 without_lm_head=lora_params(cfg, r, lay)["total"], post=post) for lay, r, post in POST_TABLE]


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


def attention_macs(cfg, seq_len, backward=True):
    """MACs per token per layer of q.k^T and att.v: each of T queries meets all T keys in every query
    head (grouped KV heads are shared, the products are not): 2 H hd T forward. Full T x T, not halved
    for the causal mask, which is FlopCounterMode's convention (a causal flash kernel does about half).
    Backward 5 H hd T, as the counter counts it: d_att, dv, dq, dk and flash attention's recomputed q.k^T."""
    s = shape(cfg)
    return s["num_attention_heads"] * s["head_dim"] * seq_len * (7 if backward else 2)


def train_macs_per_token(cfg, rank=0, layers="all", seq_len=2048, attention=True, lm_head=False, skip=True):
    """MACs per token of a training step (rank 0: FullFT), walking the layers in forward order.
    skip=True counts what autograd runs: with the embedding frozen, no gradient reaches the residual
    stream before the first adapted matrix, so matrices there get no input gradient (under LoRA on
    all layers, layer 0's q/k/v; under mlp-only LoRA, all of layer 0's attention). skip=False is the
    post's idealisation, every frozen matrix 2N^2; the two differ by under 1% past a few layers."""
    s, full = shape(cfg), rank == 0
    chosen = set() if full else targets(layers) | ({"lm_head"} if lm_head else set())
    m = {name: (d_in, d_out, active) for name, d_in, d_out, _, active in matrices(cfg)}
    m["lm_head"] = (s["hidden_size"], s["vocab_size"], 1)

    def mm(name, grad_in):
        d_in, d_out, active = m[name]
        r = rank / active  # MoE: each active expert's adapter has rank / experts per token
        macs = active * d_in * d_out * (1 + grad_in + full)  # forward, input grad if needed, W_bar if trained
        return macs + (active * r * (3 * d_out + (2 + grad_in) * d_in) if name in chosen else 0)

    g = full or not skip  # does the residual stream carry a gradient here?
    total = 0
    for _ in range(s["num_hidden_layers"]):
        total += sum(mm(n, g) for n in ("q_proj", "k_proj", "v_proj"))
        qkv = g or bool(chosen & {"q_proj", "k_proj", "v_proj"})  # does attention run backward?
        total += attention_macs(cfg, seq_len, backward=qkv) if attention else 0
        total += mm("o_proj", qkv)
        g = g or qkv or "o_proj" in chosen
        total += sum(mm(n, g) for n in ("router", "gate_proj", "up_proj") if n in m)
        hidden = g or bool(chosen & {"gate_proj", "up_proj"})
        total += mm("down_proj", hidden)
        g = g or hidden or "down_proj" in chosen
    return total + mm("lm_head", g)  # the embedding is a lookup: no MACs


def train_flops_per_token(cfg, rank=0, layers="all", seq_len=2048, attention=True, lm_head=False, skip=True):
    """FLOPs per token of a training step: 2 x train_macs_per_token."""
    return 2 * train_macs_per_token(cfg, rank, layers, seq_len, attention, lm_head, skip)


# -----------------------------------------------------------------------------
# Memory: training state in bytes (activations excluded: they scale with batch x seq_len, see --measure)

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def memory_bytes(cfg, rank=0, layers="all", lm_head=False, dtype="bf16"):
    """Weights, gradients, fp32 master copy and Adam's two fp32 moments, their total, and 'sampling':
    the weights alone in dtype, what an inference server holds (the post's layout argument).
    FullFT in a 2-byte dtype is the usual mixed precision, 2 + 2 + 4 + 8 = 16 B/param, as fp32's
    4 + 4 + 8. LoRA keeps the frozen base in dtype and the adapters in fp32 (as lora.py does), with
    fp32 grads and moments: 16 B per adapter parameter."""
    P, b = model_params(cfg), BYTES[dtype]
    if rank == 0:
        parts = dict(weights=P * b, grads=P * b, master=0 if b == 4 else P * 4, adam=P * 8)
    else:
        n = lora_params(cfg, rank, layers, lm_head)["total"]
        parts = dict(weights=P * b + n * 4, grads=n * 4, master=0, adam=n * 8)
    return {**parts, "total": sum(parts.values()), "sampling": P * b}


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
        raise UserError(f"no log at {path}: pass out/<run>/log.jsonl as written by train_sft.py or train_rl.py")
    rows = lora.read_jsonl(path)
    config = next((r for r in rows if r.get("type") == "config"), {})
    train = [r for r in rows if r.get("type") == "train"]
    if any("episodes" in r for r in train):
        return float(sum(r.get("episodes", 0) for r in train)), "rl", config
    first = [r for r in train if r.get("epoch", 0) <= 1 + 1e-9 and "loss" in r and "tokens" in r]
    if not first:
        raise UserError(f"{path} has no train records with loss and tokens (or episodes): log at least one step")
    return sum(r["loss"] * r["tokens"] for r in first) / math.log(2), "sft", config
