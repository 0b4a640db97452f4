"""The CPU speed of lora.py at a git revision against the working tree's, interleaved in one
process: a GSM8K SFT step (LoRA r16 on every layer, batch 8 in micro-batches of 4, answer-only
loss, forward + backward + AdamW) and RL-shaped sampling (8 prompts x 8 samples, <= 48 new tokens,
T = 0.7). Same weights, data and threads for both; medians of interleaved rounds after a warm-up.

    python results/speed/old_vs_new.py REV --data path/to/gsm8k [--rounds 5]
"""
import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import lora  # noqa: E402


def load_old(rev):
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:lora.py"], check=True,
                         capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "lora_old.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("lora_old", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def setup(mod, rows):
    model, tok = mod.load_model()
    mod.apply_lora(model, 16)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    examples = [tok.render_chat(mod.gsm8k_messages(r)) for r in rows[:8]]
    prompts = [tok.render_chat(mod.gsm8k_messages(r, with_answer=False),
                               add_generation_prompt=True)[0] for r in rows[8:16]]
    return model, tok, opt, examples, [p for p in prompts for _ in range(8)]


def sft_step(mod, model, opt, examples, pad_id):
    n = sum(sum(m[1:]) for _, m in examples)
    mod.batch_loss(model, examples, 4, pad_id, "cpu", None, n, True)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return sum(len(ids) for ids, _ in examples)


def sample(mod, model, tok, prompts):
    g = torch.Generator().manual_seed(0)
    out, _ = mod.generate(model, prompts, 48, temperature=0.7, stop_ids=tok.stop_ids,
                          generator=g, pad_id=tok.pad_id, vocab=tok.vocab_size)
    return sum(map(len, out))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("rev")
    p.add_argument("--data", required=True)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    rows = lora.read_jsonl(Path(a.data) / "train.jsonl")[:16]
    mods = {"old": load_old(a.rev), "new": lora}
    arms = {k: setup(m, rows) for k, m in mods.items()}
    times = {(k, w): [] for k in mods for w in ("sft", "sample")}
    for i in range(a.rounds + 1):  # the first round warms up
        for k, m in mods.items():
            model, tok, opt, examples, prompts = arms[k]
            for what, run in (("sft", lambda: sft_step(m, model, opt, examples, tok.pad_id)),
                              ("sample", lambda: sample(m, model, tok, prompts))):
                t0 = time.perf_counter()
                n = run()
                if i:
                    times[k, what].append(n / (time.perf_counter() - t0))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {a.rounds} rounds, "
          f"old = lora.py at {a.rev}, new = the working tree")
    for what in ("sft", "sample"):
        old, new = (statistics.median(times[k, what]) for k in ("old", "new"))
        print(f"{what:7} old {old:8.1f} tok/s  new {new:8.1f} tok/s  new / old {new / old:.3f}  "
              f"(per round: " + ", ".join(f"{n / o:.3f}" for o, n in
                                          zip(times['old', what], times['new', what])) + ")")


if __name__ == "__main__":
    main()
