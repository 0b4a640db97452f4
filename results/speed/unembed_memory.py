"""Peak host memory of the unembedding + cross-entropy and its backward at the 1B shape (hidden
2048, vocabulary 128,256, the head frozen as under LoRA) over one 4,096-token micro-batch of answer
positions, float32 on the CPU: every logit at once against lora.unembed_nll's chunks (rows
recomputed in backward). Each way runs in a fresh process; the figure is the rise of its peak
resident memory over what it held before.

    python results/speed/unembed_memory.py
"""
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

if len(sys.argv) > 1:  # one way, in this process
    import torch
    sys.path.insert(0, str(ROOT))
    import lora
    torch.set_num_threads(1)
    torch.manual_seed(0)
    head = torch.nn.Linear(2048, 128256, bias=False).requires_grad_(False)  # LoRA: frozen
    h, y = torch.randn(4096, 2048, requires_grad=True), torch.randint(128256, (4096,))
    h.grad = torch.zeros_like(h)  # allocated before: counted in neither way
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    loss = lora.unembed_nll(head, h, y, max_logits=int(float(sys.argv[1])))
    loss.backward()
    rise = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(f"{rise / 2**20:.2f} {loss.item():.6f}")
    sys.exit()

print("unembedding + cross-entropy, 4,096 rows x 128,256 logits, float32, forward + backward")
for name, max_logits in (("every logit at once", "1e12"), ("lora.unembed_nll's chunks", "2**27")):
    arg = str(int(eval(max_logits)))
    rise, loss = subprocess.run([sys.executable, __file__, arg], capture_output=True, text=True,
                                check=True).stdout.split()
    print(f"{name:>26}: peak memory rises {float(rise):.2f} GiB (loss {loss})")
