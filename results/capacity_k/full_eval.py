"""Stored bits of a capacity_k run's final adapter on all K facts, not the 200 its log scores (K > 200).

    python results/capacity_k/full_eval.py results/capacity_k/sft_facts800_r1_*_16000 ...

Each run folder keeps its final adapter in adapter/ (a copy of ckpt-<last>, a few KB). Per fact, the bits stored
are log2(10^4) minus the summed answer loss in bits, as plot.py's stored_bits; the script prints the sum over all
K facts, the log's estimate (the first 200 facts scaled to K) and the spread over facts.
"""
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import lora  # noqa: E402
import train_sft  # noqa: E402

for run in map(Path, sys.argv[1:]):
    args = json.loads(next(open(run / "log.jsonl")))["args"]
    k, seed = int(args["data"].split(":")[1]), int(args["seed"])
    base, tok, dev, amp = lora.load_base(None, "cpu", "auto", [args["rank"]], threads=args["threads"] or 1)
    lora.load_adapter(base, run / "adapter")
    bits = np.array([math.log2(1e4) - train_sft.evaluate(base, [e], 1, tok.pad_id, dev, amp)
                     * train_sft.answer_tokens([e]) / math.log(2)
                     for e in train_sft.tokenize(train_sft.facts(k, seed), tok, 512, args["data"])[0]])
    print(f"{run.name}: all {k} facts {bits.sum():.1f} bits ({bits.sum() / lora.count_parameters(base):.3f} "
          f"bits/param); the first 200 x {k / 200:g}: {bits[:200].sum() * k / 200:.1f}; per fact mean "
          f"{bits.mean():.3f}, sd {bits.std():.3f}", flush=True)
