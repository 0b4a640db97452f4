"""
Interop tests (to merge into test_lora.py): tokenizer files written from any Tokenizer, chat
rendering as apply_chat_template tokenizes, full-attention configs, PEFT's target rules, the
recorded base model, tied-head warnings, merge without hard-coded names, file permissions.
Reference numbers were checked against transformers 5 / PEFT 0.21; nothing here imports them.
"""

import json
import os
import warnings

import pytest
import torch
import torch.nn as nn

import lora
from lora import UserError
from test_lora import (CHAT, CHAT_IDS, GSM8K_TEXT, TINY_MERGES, ids, randomize_lora, tiny_model, tiny_tokenizer_json,
                       tiny_vocab, write_gguf, write_hf_folder)

TEXTS = [GSM8K_TEXT, "12345678901234567890 3.14 -42 1e-5 0x1F 2024-01-02",
         "Héllo wörld — naïve café, 日本語, 🤖🎉, Ελληνικά, e\u0301 (combining), ﬁ Å",
         "   leading\n\n\n\ttabs\t\t and   runs    of spaces   \r\n trailing   ",
         "def f(x):\n    return [i**2 for i in range(x) if i % 2 == 0]  # sq\n\nclass A:\n\tpass\n",
         "<|im_start|>user\nhi<|im_end|>\n don't I'M we'LL", "", " ", "\n"]


def umask():
    m = os.umask(0)
    os.umask(m)
    return m


@pytest.fixture(scope="module")
def smol():
    return lora.load_model()


# -----------------------------------------------------------------------------
# save_model writes the tokenizer: a GGUF-loaded model becomes a folder that reloads identically


def test_gguf_default_saved_with_tokenizer_reloads_identically(smol, tmp_path):
    model, tok = smol
    lora.save_model(model, tmp_path, tokenizer=tok)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "generation_config.json", "model.safetensors",
                                            "tokenizer.json", "tokenizer_config.json"]
    for f in os.listdir(tmp_path):  # not mkstemp's 0600
        assert os.stat(tmp_path / f).st_mode & 0o777 == 0o666 & ~umask(), f
    model2, tok2 = lora.load_model(tmp_path)
    for s in TEXTS:
        assert tok2.encode(s) == tok.encode(s), s
    assert tok2.render_chat(CHAT, add_generation_prompt=True) == tok.render_chat(CHAT, add_generation_prompt=True)
    assert (tok2.stop_ids, tok2.bos_id, tok2.eos_id, tok2.add_bos, tok2.nfc, tok2.pattern, tok2.chat_template) == \
           (tok.stop_ids, tok.bos_id, tok.eos_id, tok.add_bos, tok.nfc, tok.pattern, tok.chat_template)
    x = torch.tensor([tok.encode(GSM8K_TEXT)[:40]])
    with torch.no_grad():
        assert torch.equal(model2(x), model(x))
    tj = json.loads((tmp_path / "tokenizer.json").read_text())
    tc = json.loads((tmp_path / "tokenizer_config.json").read_text())
    # SmolLM2's own tokenizer.json: 48,900 merges, Digits + ByteLevel, <|im_start|>/<|im_end|>
    assert len(tj["model"]["merges"]) == 48900 and tj["model"]["merges"][:3] == ["Ġ t", "Ġ a", "i n"]
    assert [p["type"] for p in tj["pre_tokenizer"]["pretokenizers"]] == ["Digits", "ByteLevel"]
    assert tj["post_processor"]["type"] == "ByteLevel" and all(t["special"] for t in tj["added_tokens"])
    assert (tc["bos_token"], tc["eos_token"], tc["add_bos_token"], tc["model_max_length"]) == ("<|im_start|>", "<|im_end|>", False, 8192)
    assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == 2


def test_merges_rebuilt_from_ranks():
    tok = lora.tokenizer_from_json(tiny_tokenizer_json())
    assert tok.merges() == [tuple(lora._token_bytes(p) for p in m) for m in TINY_MERGES]


@pytest.mark.parametrize("pattern", ["GPT2_PATTERN", "DIGITS_PATTERN", "LLAMA3_PATTERN", "QWEN2_PATTERN"])
@pytest.mark.parametrize("nfc,add_bos", [(False, False), (True, True)])
def test_tokenizer_json_round_trip_keeps_pattern_nfc_and_bos(tmp_path, pattern, nfc, add_bos):
    src = lora.tokenizer_from_json(tiny_tokenizer_json())
    tok = lora.Tokenizer(src.ranks, src.special, getattr(lora, pattern), src.special["<|endoftext|>"], [],
                         "{{ '<|im_start|>' }}", nfc=nfc, add_bos=add_bos)
    tok.save_hf(tmp_path)
    back = lora.load_tokenizer(tmp_path)
    assert (back.pattern, back.nfc, back.add_bos, back.bos_id, back.stop_ids, back.chat_format) == \
           (tok.pattern, nfc, add_bos, tok.bos_id, tok.stop_ids, "chatml")
    for s in TEXTS:
        assert back.encode(s) == tok.encode(s), s
    tj = json.loads((tmp_path / "tokenizer.json").read_text())
    steps = tj["pre_tokenizer"].get("pretokenizers", [tj["pre_tokenizer"]])
    want = {"GPT2_PATTERN": ["ByteLevel"], "DIGITS_PATTERN": ["Digits", "ByteLevel"]}.get(pattern, ["Split", "ByteLevel"])
    assert [s["type"] for s in steps] == want and (tj["normalizer"] == {"type": "NFC"}) == nfc
    assert ('"TemplateProcessing"' in json.dumps(tj["post_processor"])) == add_bos


def test_llama3_tokenizer_model_gets_a_real_template(tmp_path):
    import base64
    vocab = tiny_vocab()
    (tmp_path / "tokenizer.model").write_text("\n".join(f"{base64.b64encode(lora._token_bytes(t)).decode()} {i}" for t, i in vocab.items()))
    tok = lora.load_tokenizer(tmp_path)
    tok.save_hf(tmp_path / "out")
    tc = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    import jinja2  # transformers renders with jinja2: the written template gives what render_chat encodes
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " the "}]
    text = jinja2.Template(tc["chat_template"]).render(messages=chat, bos_token=tc["bos_token"], add_generation_prompt=False)
    assert tok.encode(text, bos=False) == tok.render_chat(chat)[0] and tc["add_bos_token"] is True
    assert lora.load_tokenizer(tmp_path / "out").render_chat(chat) == tok.render_chat(chat)


def test_save_model_still_copies_tokenizer_files_from_a_folder(tmp_path):
    model = tiny_model()
    (tmp_path / "src").mkdir()
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
WS_CHAT_IDS = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712, 8182, 2,
               198, 1, 4093, 3805, 33, 34, 27, 35, 32, 47, 2, 198, 1, 520, 9531, 16506, 36, 34, 216, 2, 198, 1, 4093, 198,
               197, 2231, 2, 198, 1, 520, 9531, 198, 2, 198]


def test_render_chat_matches_apply_chat_template_on_whitespace(smol):
    _, tok = smol
    ids_, mask = tok.render_chat(WS_CHAT)
    assert ids_ == WS_CHAT_IDS
    # the straddling "\n\n\n" holds answer characters, so it is learned; the empty answer learns its <|im_end|> only
    assert [tok.decode([i]) for i, m in zip(ids_, mask) if m] == ["\n\n\n", "4", "2", " ", "<|im_end|>", "<|im_end|>"]
    assert tok.render_chat(CHAT, add_generation_prompt=True)[0] == CHAT_IDS


@pytest.mark.parametrize("content", ["  two spaces", "\n\nnewlines", "trailing  \n", "", "42 is it", "\t\ttab", " "])
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
    assert learned.endswith(content + "<|im_end|>") and len(learned) <= len(content + "<|im_end|>") + 1


def test_llama3_render_chat_strips_and_encodes_digits_after_header():
    vocab = tiny_vocab()
    special = {s: len(vocab) + i for i, s in enumerate(["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                                         "<|end_header_id|>", "<|eot_id|>"])}
    ranks = {lora._token_bytes(t): i for t, i in vocab.items()}
    tok = lora.Tokenizer(ranks, special, lora.LLAMA3_PATTERN, special["<|begin_of_text|>"], [special["<|end_of_text|>"]],
                         "<|start_header_id|>", add_bos=True)
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": " \n 123 the \n"}]
    ids_, mask = tok.render_chat(chat)
    text = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nq<|eot_id|>" \
           "<|start_header_id|>assistant<|end_header_id|>\n\n123 the<|eot_id|>"
    assert ids_ == tok.encode(text, bos=False)
    assert tok.decode([i for i, m in zip(ids_, mask) if m]) == "123 the<|eot_id|>"


# -----------------------------------------------------------------------------
# configs: full attention stays full attention through transformers


@pytest.mark.parametrize("mt", ["mistral", "qwen2", "qwen3"])
def test_saved_config_says_no_sliding_window(tmp_path, mt):
    model = tiny_model(model_type=mt, qk_norm=mt == "qwen3", attention_bias=mt == "qwen2")
    lora.save_model(model, tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    assert "sliding_window" in d and d["sliding_window"] is None  # absent would read as 4096 in MistralConfig
    assert d.get("use_sliding_window", False) is False
    assert lora.Config.from_hf(d) == model.config


# -----------------------------------------------------------------------------
# adapters: PEFT's target rules, unsupported features, recorded base, tied heads


def names_of(model):
    return sorted(lora.lora_modules(model))


L = lambda i, m: f"model.layers.{i}.{m}"  # noqa: E731


@pytest.mark.parametrize("extra,want", [
    (dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1]), [L(1, "self_attn.q_proj"), L(1, "self_attn.v_proj")]),
    (dict(target_modules=["q_proj", "down_proj"], layers_to_transform=0, layers_pattern="layers"),
     [L(0, "mlp.down_proj"), L(0, "self_attn.q_proj")]),
    (dict(target_modules=["q_proj", "k_proj"], exclude_modules=[L(0, "self_attn.k_proj")]),
     [L(0, "self_attn.q_proj"), L(1, "self_attn.k_proj"), L(1, "self_attn.q_proj")]),
    (dict(target_modules="all-linear", exclude_modules=r".*\.mlp\..*"),
     sorted(L(i, f"self_attn.{p}_proj") for i in (0, 1) for p in "qkvo")),
    # an exact module name is taken as is, outside layers_to_transform (PEFT's rule)
    (dict(target_modules=[L(0, "mlp.up_proj"), "v_proj"], layers_to_transform=[1]), [L(0, "mlp.up_proj"), L(1, "self_attn.v_proj")]),
    (dict(target_modules="all-linear"), sorted(n for n, m in tiny_model().named_modules() if isinstance(m, nn.Linear) and n != "lm_head")),
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


@pytest.mark.parametrize("fields,want", [({}, "tiny.gguf"), ({"general.name": "Tiny Model 1B"}, "tiny.gguf"),
                                         ({"general.name": "someorg/tiny-1b"}, "someorg/tiny-1b"),
                                         ({"general.repo_url": "https://huggingface.co/org2/tiny"}, "org2/tiny")])
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
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["base_model_name_or_path"] == want


def test_default_model_records_its_hub_id(smol):
    assert smol[0].name_or_path == smol[1].name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_lm_head_adapter_on_tied_base_warns(tmp_path):
    tied = lora.apply_lora(tiny_model(tie_word_embeddings=True), rank=2, lm_head=True)
    with pytest.warns(UserWarning, match="tied embeddings.*untied base or without --lm_head"):
        lora.save_adapter(tied, tmp_path / "a")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lora.save_adapter(lora.apply_lora(tiny_model(), rank=2, lm_head=True), tmp_path / "b")
        lora.save_adapter(lora.apply_lora(tiny_model(tie_word_embeddings=True), rank=2), tmp_path / "c")


def test_merge_lora_unties_any_shared_weight_without_knowing_names():
    class TinyLM(nn.Module):  # no .model.embed_tokens: the LoRA section must not assume Llama's names
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
