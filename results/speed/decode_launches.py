"""Kernel launches per decoded token, lora.py at a git revision against the working tree's, counted
by flops.decode_launches on the CPU (the outermost aten ops a GPU would launch a kernel for; a
compiled region counts one, as its CUDA graph would). A SmolLM2-shaped model with random weights,
LoRA r16 merged into a copy as train_rl --sample_merged samples, 8 rows, T = 1.

    python results/speed/decode_launches.py REV
"""
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "results" / "speed"))
import flops  # noqa: E402
import lora  # noqa: E402
from old_vs_new import load_old  # noqa: E402

torch.set_num_threads(1)
cfg = lora.load_model(weights=False)[0].config
print(f"kernel launches per decoded token (8 rows, {cfg.num_hidden_layers} layers)")
for name, mod in ((sys.argv[1], load_old(sys.argv[1])), ("working tree", lora)):
    flops.lora = mod  # decode_launches and random_model call whichever lora.py is being counted
    model = mod.merged_copy(flops.random_model(cfg, "cpu", torch.float32, rank=16)).eval()
    eager = flops.decode_launches(model, "cpu", None)
    compiled = flops.decode_launches(model, "cpu", None, decode=mod.compile_decode())
    print(f"{name:>12}: eager {eager}, compiled decode step {compiled}")
