"""
train_sft.py: supervised fine-tuning, LoRA at any rank against full fine-tuning, as "LoRA Without
Regret" ran it: constant LR, no warmup, AdamW, batch size counted in sequences, loss on the
assistant tokens only, one epoch.

    python train_sft.py --rank 16 --lr_mult 10                      # LoRA at the post's 10x rule
    python train_sft.py --rank 0 --lr_mult 1                        # FullFT at the fitted LR
    python train_sft.py --data path/to/gsm8k --rank 16 \
        --batch_size 8 --steps 40                                   # CPU, ~5 min (train/test.jsonl)
    python train_sft.py --rank 1,4,16,64,256,0 --lr_mult 1,3,10,30  # 24 runs, base loaded once
    torchrun --nproc_per_node 8 train_sft.py --rank 16 --compile    # DDP: same as one process

Learning rate: --lr sets it; otherwise --lr_mult x the FullFT LR that the post's fit predicts
for the model's hidden size and family (lora.fullft_lr), by default 10x for LoRA and 1x for FullFT.
Each run writes out/<run>/log.jsonl (config, then a record per step and eval) and checkpoints
that --resume continues from.
"""

import argparse
import itertools
import math
import os
import random
import re
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

import lora

# -----------------------------------------------------------------------------
# data: any chat-shaped rows -> (token ids, loss mask); random facts to memorise


def to_messages(row, i=0, where="data"):
    """One dataset row as chat messages. Accepted shapes: 'messages' (Tulu 3, OpenAI style),
    'conversations' with from/value (OpenThoughts, ShareGPT), 'prompt' + 'completion', and
    GSM8K's 'question' + 'answer'."""
    if isinstance(row.get("messages"), list):
        msgs = row["messages"]
    elif isinstance(row.get("conversations"), list):
        roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                 "system": "system"}
        msgs = [{"role": roles.get(m.get("from"), m.get("from")), "content": m.get("value")}
                for m in row["conversations"]]
    elif isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
        msgs = [{"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": row["completion"]}]
    elif isinstance(row.get("question"), str) and isinstance(row.get("answer"), str):
        return lora.gsm8k_messages(row)
    else:
        raise lora.UserError(f"{where} row {i} has fields {sorted(row)}: expected 'messages', "
                             "'conversations', 'prompt' + 'completion', or 'question' + 'answer'")
    for m in msgs:
        if not (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str)):
            raise lora.UserError(f"{where} row {i} has a malformed message {str(m)[:80]}: "
                                 "each needs a role (system/user/assistant) and string content")
    return msgs


def load_data(spec, seed, max_examples, n_eval):
    """(train rows, held-out rows, description) for --data: 'gsm8k' (hub, else synth), 'synth', a
    GSM8K-style folder, a .jsonl file, or a hub dataset name such as allenai/tulu-3-sft-mixture."""
    spec = lora.gsm8k_or_synth(spec)
    if spec.startswith("facts:"):
        k = spec.split(":", 1)[1]
        if not k.isdigit() or int(k) < 1:
            raise lora.UserError(f"--data {spec}: write facts:K "
                                 "with K the number of random facts, e.g. facts:2000")
        rows = facts(int(k), seed)
        # memorisation: the eval rows are trained facts (an unseen random code cannot be predicted)
        bits = int(k) * math.log2(1e4)
        desc = (f"facts: {k} random keys -> 4-digit codes = {bits:.0f} bits "
                f"(seed {seed}; eval on the first {n_eval} trained facts)")
        return rows, rows[:n_eval], desc
    if spec == "synth":
        n = max_examples or 5000
        return (lora.synth_problems(n, seed), lora.synth_problems(n_eval, seed + 10_000),
                f"synth ({n} generated, seed {seed})")
    p = Path(spec)
    if spec == "gsm8k" or (p.is_dir() and (p / "train.jsonl").exists()):
        train, where = lora.load_gsm8k(spec, "train")
        test, _ = lora.load_gsm8k(spec, "test")
        return train, test[:n_eval], f"gsm8k: {where} (held out: test split)"
    if p.is_dir():
        raise lora.UserError(f"{spec} is a folder without train.jsonl: pass a .jsonl file or "
                             "a GSM8K-style folder (train.jsonl, test.jsonl)")
    if p.is_file():
        rows, desc = lora.read_jsonl(p), str(p)
    elif (p.suffix == ".jsonl" or spec.startswith((".", "/", "~"))
          or p.parent.is_dir() and p.parent != Path(".")):
        raise lora.UserError(f"no such file: {spec} (pass an existing .jsonl file or folder, "
                             "gsm8k, synth or a hub dataset name)")
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", spec):
        if not lora.hub_reachable():
            raise lora.UserError(f"{spec} cannot be fetched from the hub (offline): "
                                 "pass --data synth or --data PATH")
        import datasets
        if max_examples:  # stream just the rows needed: OpenThoughts3 is gigabytes
            rows = list(itertools.islice(datasets.load_dataset(spec, split="train", streaming=True),
                                         max_examples + n_eval))
        else:
            rows = list(datasets.load_dataset(spec, split="train"))
        desc = f"{spec} (hub)"
    else:
        raise lora.UserError(f"--data {spec!r} is neither gsm8k, synth, an existing path "
                             "nor a hub dataset name (owner/name)")
    if not rows:
        raise lora.UserError(f"{desc} has no rows: "
                             "pass a .jsonl file with one JSON object per line")
    if len(rows) <= n_eval:
        raise lora.UserError(f"{desc} has {len(rows)} rows and --eval_examples holds {n_eval} "
                             f"out for eval, leaving none to train on: "
                             f"lower --eval_examples or add rows")
    return rows[n_eval:], rows[:n_eval], f"{desc} (held out: first {n_eval} rows)"


def tokenize(rows, tok, max_len, where):
    """[(ids, mask)] with mask marking assistant tokens; truncated to max_len (counted). Rows with
    no assistant token left are dropped (counted)."""
    out, truncated, empty = [], 0, 0
    for i, row in enumerate(rows):
        ids, mask = tok.render_chat(to_messages(row, i, where))
        if len(ids) > max_len:
            ids, mask, truncated = ids[:max_len], mask[:max_len], truncated + 1
        if sum(mask[1:]) == 0:
            empty += 1
            continue
        out.append((ids, mask))
    return out, truncated, empty


def prompt_lengths(rows, tok, where):
    """Tokens before each row's first answer token: what --max_len must exceed."""
    lengths = []
    for i, row in enumerate(rows):
        mask = tok.render_chat(to_messages(row, i, where))[1]
        lengths.append(mask.index(1) if 1 in mask else len(mask))
    return sorted(lengths)


def facts(k, seed=0, digits=4):
    """k random facts to memorise, deterministic per seed: a random 6-letter key, each mapped to a
    random code of `digits` digits. The data's information is known exactly, k x log2(10^digits)
    bits (13.3 a fact at 4 digits), so an adapter's capacity can be set against it (the post's
    'LoRA falls behind once the data holds more than it can store'). Rows are chat messages."""
    rng, keys = random.Random(seed), {}  # a dict keeps insertion order; a set's order would follow
    while len(keys) < k:                  # PYTHONHASHSEED, making the data differ between processes
        keys["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(6))] = None
    rows = []
    for key in keys:
        code = f"{rng.randrange(10 ** digits):0{digits}d}"
        # a short system turn, else chat templates add their default one (SmolLM2's: 20 tokens)
        rows.append({"messages": [{"role": "system", "content": "Recall codes."},
                                  {"role": "user", "content": f"Code of {key}?"},
                                  {"role": "assistant", "content": code}], "code": code})
    return rows


def unseen_facts(trained, n, seed):
    """n facts in the trained ones' format whose keys were never trained: their codes cannot be
    known, so their loss is what a model that learned the format but stored no code would get
    (the baseline the stored bits are measured against)."""
    keys = {r["messages"][1]["content"] for r in trained}
    pool = facts(n + len(keys), seed + 1_000_003)
    return [r for r in pool if r["messages"][1]["content"] not in keys][:n]


# -----------------------------------------------------------------------------
# one run


def train(a, base, tok, data, ddp, grid=None, trunks=None, stop=None):
    """Train one configuration (a: resolved args) from the base model; returns the final eval loss.
    data: .train, .eval, .unseen (facts never trained) examples and .desc. grid: the sweep's
    Progress. trunks(a, model): a TrunkCache of the layers below the first trained one, or None."""
    rank_id, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    total_steps, step_flops, eval_flops, _ = plan(a, base.config, data.train, data.eval)
    run = lora.Run(a, total_steps, "loss", grid, master=rank_id == 0, data_sha=data.sha)
    if run.done is not None:
        return run.done
    model, fwd, opt, trunk = build(a, base, trunks=trunks, master=run.master, world=world, ddp=ddp)
    lrs = [g["lr"] for g in opt.param_groups]
    params = [p for g in opt.param_groups for p in g["params"]]
    state = run.resume(model, opt, fsdp_load_checkpoint if a.fsdp else None)
    first_loss, flops = state.get("first_loss"), state.get("flops", 0.0)
    todo = todo_flops(a, run.start, total_steps, step_flops, eval_flops=eval_flops)
    progress = lora.Progress(todo, grid)
    open_run(run, model, base, data, total_steps=total_steps, world=world)
    eval_at = lambda step: eval_and_log(run, model, tok, data, trunk=trunk, step=step,
                                        progress=progress, flops=eval_flops)
    save = lambda step: save_checkpoint(a, run, step, model, opt=opt, tok=tok,
                                        extra={"flops": flops, "first_loss": first_loss})
    if run.start == 0 and a.eval_every:
        eval_at(0)
    for step, batch in batches(a, data.train, run.start, total_steps):
        t0 = time.time()
        mine = batch[rank_id::world]  # each process: every world-th sequence of the sorted batch
        n_tok = answer_tokens(batch)
        # DDP/FSDP processes must run as many forwards (their collectives pair up)
        forwards = (forwards_per_process(batch, world, a.micro_batch, a.micro_tokens) if ddp
                    else None)
        # forward and backward by micro-batch: the gradient is the mean over all answer tokens
        loss, positions = torch.zeros((), device=a.device), 0
        micro = lora.micro_batches_of(mine, a.micro_batch, tok.pad_id, a.device, count=forwards,
                                      max_tokens=a.micro_tokens)
        for chunk, (x, at, y), n, last in micro:
            # reduce gradients across processes on the last micro-batch (FSDP FullFT: on each)
            sync = last or (a.fsdp and a.rank == 0)
            with lora.grad_sync(fwd, sync), lora.autocast(a.device, a.amp):
                mean = fwd(x, y, at=at) if trunk is None else trunk.loss(fwd, chunk, x, at, y=y)
            (mean * n * world / n_tok).backward()
            loss, positions = loss + mean.detach().float() * n, positions + x.numel()
        if ddp:
            dist.all_reduce(loss)  # on the device: NCCL refuses host tensors
        loss = loss.item() / n_tok
        first_loss = loss if first_loss is None else first_loss
        norm = torch.nn.utils.clip_grad_norm_(params, a.grad_clip or math.inf)
        grad_norm = lora.full(norm).item()
        lora.stop_if_diverged(run.dir, step, loss, grad_norm, name=a.name, lr=a.lr, log=run.log,
                              limit=lora.divergence_limit(first_loss, base.config.vocab_size),
                              first_loss=first_loss)
        # --cooldown: the LR falls linearly to 0 over that last fraction of the steps
        cooldown_steps = a.cooldown * total_steps
        lr_scale = min(1.0, (total_steps - step + 1) / cooldown_steps) if a.cooldown else 1
        for g, lr in zip(opt.param_groups, lrs):
            g["lr"] = lr * lr_scale
        opt.step()
        opt.zero_grad(set_to_none=True)
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        flops += log_step(run, step, batch, mine, cfg=base.config, n_train=len(data.train),
                          progress=progress, trunk=trunk, positions=positions, loss=loss,
                          lr=a.lr * lr_scale, ms=(time.time() - t0) * 1000, flops=flops,
                          grad_norm=grad_norm)
        if a.eval_every and step % a.eval_every == 0 and step != total_steps:
            eval_at(step)
        run.end_step(step, save, stop, ddp)
    return run.finish(eval_at(total_steps) if a.eval_every else float("nan"))


def open_run(run, model, base, data, total_steps, world):
    """The run's config record and banner."""
    a = run.a
    run.open("train_sft", model, base, data.desc,
             what=f"{total_steps} steps of {a.batch_size} sequences",
             n_train_examples=len(data.train), n_eval_examples=len(data.eval), world_size=world,
             total_steps=total_steps, lora_modules=list(lora.lora_modules(model)),
             flops_per_token=lora.train_flops_per_token(base.config, rank=a.rank, layers=a.layers,
                                                        seq_len=a.max_len, lm_head=a.lm_head))


def log_step(run, step, batch, mine, cfg, n_train, progress, trunk, positions, **rec):
    """Write a step's train record and, every --log_every steps, its line; returns the step's
    FLOPs as if every layer ran (comparable across runs); the ETA counts only the work done."""
    a = run.a
    lengths = [len(ids) - 1 for ids, _ in batch]
    work = sequence_flops(cfg, rank=a.rank, layers=a.layers, lm_head=a.lm_head, lengths=lengths)
    progress.add(work - (trunk_flops(cfg, trunk.layers, lengths) if trunk else 0))
    ms, flops = rec["ms"], rec["flops"] + work
    tok_s = sum(lengths) / ms * 1000
    cuda = a.device.startswith("cuda")
    run.write({"type": "train", "step": step, **rec, "flops": flops,
               "tokens": answer_tokens(batch), "seq_tokens": sum(lengths), "tok_s": tok_s,
               "epoch": step / (n_train // a.batch_size),
               "pad_frac": 1 - sum(len(ids) - 1 for ids, _ in mine) / positions}
              | ({"peak_gib": torch.cuda.max_memory_allocated() / 2**30} if cuda else {}))
    if step % a.log_every == 0 or step == run.steps:
        run.say(f"step {step:5d}/{run.steps} | loss {rec['loss']:.4f} | lr {rec['lr']:.2e} | "
                f"{ms:6.0f} ms | {tok_s:7.0f} tok/s | {flops:.3e} FLOPs | {progress}", flush=True)
    return work


def todo_flops(a, start, total_steps, step_flops, eval_flops):
    """The FLOPs a run has left from `start`: its steps and evals (the ETA's denominator)."""
    evals = n_evals(a.eval_every, start, total_steps)
    return (total_steps - start) * step_flops + evals * eval_flops


# -----------------------------------------------------------------------------
# what train() calls: its plan and FLOPs, the model, batches, evals, the frozen-trunk cache, FSDP2


def plan(a, cfg, train_ex, eval_ex):
    """(total steps, FLOPs of an average step, FLOPs of one eval, FLOPs of the whole run): for the
    ETA and the up-front estimate (less the frozen layers a TrunkCache runs once)."""
    total_steps = min(a.steps or 10**9, len(train_ex) // a.batch_size * a.epochs)
    mean_len = sum(len(ids) for ids, _ in train_ex) / len(train_ex)
    first = 0 if a.no_trunk_cache else first_trained_layer(cfg, a.rank, a.layers, a.lm_head)
    step = sequence_flops(cfg, a.rank, a.layers, a.lm_head, lengths=[mean_len] * a.batch_size)
    step -= trunk_flops(cfg, first, [mean_len] * a.batch_size)
    # an eval is a forward pass: about a third of a full fine-tuning step's FLOPs
    lens = [len(ids) for ids, _ in eval_ex]
    evals = (sequence_flops(cfg, rank=0, layers="all", lm_head=False, lengths=lens) / 3
             - trunk_flops(cfg, first, lens)) if a.eval_every else 0
    run_flops = total_steps * step + evals * n_evals(a.eval_every, 0, total_steps)
    return total_steps, step, evals, run_flops


def n_evals(every, start, total):
    """Evals a run makes from `start`: step 0 (fresh runs), each multiple of `every` before the
    end, and the end."""
    return 0 if not every else (start == 0) + (total - 1) // every - start // every + 1


def sequence_flops(cfg, rank, layers, lm_head, lengths):
    """Training FLOPs of sequences of these lengths (attention grows with each one's length)."""
    a = lora.train_flops_per_token(cfg, rank, layers, seq_len=0, lm_head=lm_head)
    # b: per token per unit of sequence length
    b = lora.train_flops_per_token(cfg, rank, layers, seq_len=1, lm_head=lm_head) - a
    return sum(T * (a + b * T) for T in lengths)


def trunk_flops(cfg, first, lengths):
    """Forward FLOPs of layers 0..first-1 for these sequence lengths: what a TrunkCache saves."""
    per_token = sum(d_in * d_out * active for _, d_in, d_out, _, active in lora.layer_matrices(cfg))
    return 2 * first * sum(T * (per_token + lora.attention_macs(cfg, T, backward=False))
                           for T in lengths)


def forwards_per_process(batch, world, micro, micro_tokens):
    """Forwards each DDP/FSDP process runs this step: the most that any one's share of the batch
    needs. Every process plans every share (they all hold the whole batch), so they agree without
    talking; one running fewer forwards than another would leave FSDP's per-block all-gathers
    unmatched, a hang."""
    share = lambda r: [len(ids) for ids, _ in batch[r::world]]  # process r's sequence lengths
    return max(len(lora.micro_batches(share(r), micro, max_tokens=micro_tokens))
               for r in range(world))


def build(a, base, trunks, master, world, ddp):
    """(model, the module the loop calls (DDP-wrapped under torchrun), optimizer, TrunkCache or
    None) for one run: LoRA or FullFT on a copy of the base, on the device; under --fsdp sharded
    (only rank 0 holds weights before that), compiled before sharding when --compile."""
    def reshard(m):
        itemsize = a.amp.itemsize if a.amp else 4  # the gathered (compute) dtype
        base_bytes = sum(p.numel() for p in m.parameters() if not p.requires_grad) * itemsize
        cuda = a.device.startswith("cuda")
        device_bytes = (torch.cuda.get_device_properties(a.device).total_memory if cuda
                        else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        return lora.fsdp_reshard(a.rank, base_bytes, device_bytes, nodes=world // local)

    def shard(m):
        rank0_state = m.state_dict() if master else None
        if a.compile:
            lora.compile_blocks(m)
        mesh = init_device_mesh(a.device.split(":")[0], (world,))
        fsdp_shard(m, mesh, a.amp, rank0_state, reshard=reshard(m))
    model, opt = lora.prepare_training(
        base, a.rank, a.lr, layers=a.layers, lm_head=a.lm_head, alpha=a.alpha,
        init_scale=a.init_scale, lr_ratio_b=a.lr_ratio_b, weight_decay=a.weight_decay,
        beta2=a.beta2, device=a.device, seed=a.seed, shard=shard if a.fsdp else None)
    model.gradient_checkpointing = a.grad_ckpt
    trunk = trunks(a, model) if trunks else None
    if a.compile and not a.fsdp:
        lora.compile_blocks(model)
    fwd = model
    if ddp and not a.fsdp:
        device_ids = [torch.device(a.device).index] if a.device.startswith("cuda") else None
        fwd = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    return model, fwd, opt, trunk


def batches(a, train_ex, start, total_steps):
    """(step, batch sorted by length) from step start + 1 on. The order is a pure function of (seed,
    epoch), so a resumed run sees exactly the batches it would have."""
    per_epoch, order = len(train_ex) // a.batch_size, {}
    for step in range(start + 1, total_steps + 1):
        epoch, k = divmod(step - 1, per_epoch)
        if epoch not in order:
            rng = random.Random(a.seed * 1000 + epoch)
            order[epoch] = rng.sample(range(len(train_ex)), len(train_ex))
        picked = order[epoch][k * a.batch_size:(k + 1) * a.batch_size]
        yield step, sorted((train_ex[i] for i in picked), key=lambda e: len(e[0]))


def answer_tokens(examples):
    return sum(sum(m[1:]) for _, m in examples)


def eval_and_log(run, model, tok, data, trunk, step, progress, flops):
    """The held-out loss at this step, logged with the unseen facts' loss (facts) and the spectral
    norms of each adapter's A and B (the post's finding 11: B ends larger)."""
    a = run.a
    run.say(f"step {step:5d} | evaluating on {len(data.eval)} held-out examples ...",
            end="", flush=True)
    loss_of = lambda ex: evaluate(model, ex, a.micro_batch, tok.pad_id, device=a.device, amp=a.amp,
                                  trunk=trunk, micro_tokens=a.micro_tokens)
    loss = loss_of(data.eval)
    unseen = ({"unseen_loss": loss_of(data.unseen), "unseen_tokens": answer_tokens(data.unseen)}
              if data.unseen else {})
    progress.add(flops)
    # tokens: the answer tokens the loss averages (the facts' stored bits come from loss x tokens)
    tokens = answer_tokens(data.eval)
    run.write({"type": "eval", "step": step, "loss": loss, "tokens": tokens} | unseen)
    if a.rank:  # under FSDP every process gathers each matrix
        dense = lambda w: lora.full(w.detach()).float()
        norm = lambda w: round(torch.linalg.matrix_norm(dense(w), ord=2).item(), 6)
        mods = lora.lora_modules(model).values()
        run.write({"type": "norms", "step": step, "A": [norm(m.lora_A.weight) for m in mods],
                   "B": [norm(m.lora_B.weight) for m in mods]})
    run.say(f" eval loss {loss:.4f} | {progress}")
    return loss


def save_checkpoint(a, run, step, model, opt, tok, extra):
    """Under FSDP a collective (every process gathers, rank 0 writes); else rank 0's alone."""
    if a.fsdp:
        fsdp_save_checkpoint(run.dir, step, model, opt, extra=extra, tokenizer=tok)
    elif run.master:
        lora.save_checkpoint(run.dir, step, model, opt, extra=extra, tokenizer=tok)


@torch.no_grad()
def evaluate(model, examples, micro, pad_id, device, amp, trunk=None, micro_tokens=0):
    model.eval()
    n = answer_tokens(examples)
    loss = lora.batch_loss(model, examples, micro, pad_id, device=device, amp=amp, scale_tokens=n,
                           backward=False, trunk=trunk, max_tokens=micro_tokens)[0].item() / n
    model.train()
    return loss


def first_trained_layer(cfg, rank, layers, lm_head=False):
    """Index of the first layer whose weights train or carry an adapter: every layer before it is
    frozen and sees no gradient, so its output is a fixed function of the tokens (train_sft caches
    it). 0 whenever the embedding trains (full fine-tuning, or a trained lm_head tied to it)."""
    s = lora.config_shape(cfg)
    if lora.is_full(rank, layers) or (lm_head and rank == 0 and s.get("tie_word_embeddings")):
        return 0
    try:
        plan = lora.layer_plan(layers, s["num_hidden_layers"])
    except lora.UserError as e:  # the library speaks of layers; the script names its flag
        raise lora.UserError(f"--layers {layers}: {e}") from None
    return next((i for i, p in enumerate(plan) if p), s["num_hidden_layers"])


class TrunkCache:
    """The output of a model's first L layers for each example, computed once. When every adapter
    (or trained weight) sits at layer L or later, those layers are frozen and get no gradient, so
    their output is a fixed function of the tokens: a run that trains only the last layers skips
    almost all of its forward pass. Padding on the right leaves causal states unchanged, so each
    example's states are kept unpadded and padded per batch.
    tail: only the last layer's MLP trains. The MLP, final norm and head act on each position
    alone, so only the answer positions' inputs to that MLP are kept, and nothing else is run.
    It drives the layers itself (the model's forward knows nothing of it), so it serves a
    single process: DDP and FSDP must run the wrapped model, and get no cache."""

    def __init__(self, model, layers, examples, micro, pad_id, device, amp, tail=False):
        self.layers, self.tail, self.states = layers, tail, {}
        examples = sorted(examples, key=lambda e: len(e[0]))
        last = model.model.layers[-1]
        seen = []  # the residual stream entering the last layer's MLP
        grab = lambda _, args: seen.append(args[0])
        hook = last.post_attention_layernorm.register_forward_pre_hook(grab) if tail else None
        with torch.no_grad(), lora.autocast(device, amp):
            for start, end in lora.micro_batches([len(ids) for ids, _ in examples], micro):
                x = lora.collate(examples[start:end], pad_id, device)[0]
                h = model.model.embed_tokens(x)
                cos, sin = model.rope(torch.arange(x.shape[1], device=x.device)[None], h.dtype)
                # tail: every layer, for the hook to see the last one's MLP input
                for layer in model.model.layers[:None if tail else layers]:
                    h = layer(h, cos, sin)
                # ids kept: the key stays valid
                for i, (ids, mask) in enumerate(examples[start:end]):
                    at = [t for t, keep in enumerate(mask[1:]) if keep]  # the answer positions
                    if tail:
                        state = (seen[-1][i][at].clone(),
                                 torch.tensor([ids[t + 1] for t in at], device=device))
                    else:
                        state = h[i, :len(ids) - 1].clone()
                    self.states[id(ids)] = (ids, state)
        if hook:
            hook.remove()

    @staticmethod
    def only_last_mlp_trains(model):
        last = f"model.layers.{len(model.model.layers) - 1}.mlp."
        trained = [n for n, p in model.named_parameters() if p.requires_grad]
        return bool(trained) and all(n.startswith(last) for n in trained)

    @staticmethod
    def nbytes(cfg, examples, dtype=torch.float32):
        return sum(len(ids) for ids, _ in examples) * cfg.hidden_size * dtype.itemsize

    def batch(self, examples):
        rows = [self.states[id(ids)][1] for ids, _ in examples]
        h = rows[0].new_zeros(len(rows), max(len(r) for r in rows), rows[0].shape[-1])
        for i, r in enumerate(rows):
            h[i, :len(r)] = r
        return self.layers, h

    def loss(self, model, examples, x, at, y):
        """The mean loss over the micro-batch's answer tokens: the layers from L on, the final
        norm and the unembedding at the answer positions (`at`, into x's (B, T))."""
        if not self.tail:
            first, h = self.batch(examples)
            cos, sin = model.rope(torch.arange(x.shape[1], device=x.device)[None], h.dtype)
            for layer in model.model.layers[first:]:
                h = model.block(layer, h, cos, sin)
            h = model.model.norm(h).flatten(0, 1)[at]
            return lora.unembed_nll(model.lm_head, h, y) / len(y)
        h = torch.cat([self.states[id(ids)][1][0] for ids, _ in examples])
        targets = torch.cat([self.states[id(ids)][1][1] for ids, _ in examples])
        last = model.model.layers[-1]
        h = h + last.mlp(last.post_attention_layernorm(h))
        return lora.unembed_nll(model.lm_head, model.model.norm(h), targets) / len(targets)


def trunk_cache(r, model, cfg, data, pad_id, ddp, kept):
    """The TrunkCache of the frozen layers below run r's first trained one, or None (nothing
    frozen, or over TRUNK_CACHE_GB). Built with the run's model (on the device, its frozen layers
    equal the base's) and kept for the next runs that start at the same layer (kept: one at a
    time, memory)."""
    first = first_trained_layer(cfg, r.rank, r.layers, r.lm_head)
    # DDP and FSDP must run the wrapped model
    if first == 0 or r.no_trunk_cache or ddp:
        return None
    tail = TrunkCache.only_last_mlp_trains(model)
    if (first, tail) not in kept:
        kept.clear()
        # facts: the eval rows are training rows, cached once
        unique = {id(ids): (ids, m) for ids, m in data.train + data.eval + data.unseen}
        every = list(unique.values())
        gb = TrunkCache.nbytes(cfg, every) / 2**30
        say = print if not ddp or dist.get_rank() == 0 else (lambda *x, **k: None)
        if gb > TRUNK_CACHE_GB:
            say(f"not caching layers 0-{first - 1}: {gb:.1f} GiB over {TRUNK_CACHE_GB}")
            return None
        say(f"layers 0-{first - 1}{' and the attention of the last' if tail else ''} are frozen: "
            f"running them once over {len(every)} examples ({gb:.2f} GiB kept) ...", flush=True)
        kept[first, tail] = TrunkCache(model, first, every, r.micro_batch, pad_id=pad_id,
                                       device=r.device, amp=r.amp, tail=tail)
    return kept[first, tail]


def fsdp_shard(model, mesh, amp=None, rank0_state=None, reshard=True):
    """Shard each transformer block, then the root (embedding, norm, lm_head), over `mesh` with
    PyTorch's FSDP2 (fully_shard). Parameters become DTensors, each process holding 1/N; a block's
    weights are gathered just for its forward and backward. A frozen base shards like the rest; with
    amp (bf16 on CUDA) blocks compute in bf16 while the sharded float32 weights (the adapters,
    or all of FullFT's) are what AdamW updates, and gradients are reduced in float32.
    Processes other than rank 0 may hold the model on the meta device (no memory, nothing read):
    rank 0's weights (rank0_state: its full state dict; None elsewhere) are broadcast, and each
    process keeps its shard. Every process calls this (collectives).
    reshard=False keeps each block's gathered weights from its forward to its backward: one
    all-gather a micro-batch instead of two, for LoRA, whose frozen base fits whole."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = (MixedPrecisionPolicy(param_dtype=amp, reduce_dtype=torch.float32)
          if amp else MixedPrecisionPolicy())
    device = (torch.device(mesh.device_type, torch.cuda.current_device())
              if mesh.device_type == "cuda" else torch.device("cpu"))
    for block in model.model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        model.to_empty(device=device)
    set_model_state_dict(model, rank0_state or {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    # a buffer, not in the state dict (GGUF may rescale it)
    model.inv_freq = model.inv_freq.to(device)
    dist.broadcast(model.inv_freq, src=0)
    return model


def fsdp_skeleton(model):
    """An unsharded copy of a (sharded) model's structure on the meta device: rank 0 fills in what a
    checkpoint needs (the adapters, or every weight for full fine-tuning) and writes it as usual."""
    cfg = model.config
    with torch.device("meta"):
        sk = lora.Llama(cfg)
    mods = lora.lora_modules(model)
    for name, m in mods.items():
        parent, _, attr = name.rpartition(".")
        owner = sk.get_submodule(parent) if parent else sk
        setattr(owner, attr, lora.LoRALinear(getattr(owner, attr), m.rank, alpha=m.alpha,
                                             rslora=m.rslora, dtype=m.lora_A.weight.dtype))
    sk.name_or_path = model.name_or_path
    for n, p in sk.named_parameters():
        p.requires_grad_(model.get_parameter(n).requires_grad)
    return sk


def _fill(skeleton, state):
    """Put real tensors into a meta skeleton by name (assign: the meta parameters are replaced)."""
    skeleton.load_state_dict(state, strict=False, assign=True)
    if skeleton.config.tie_word_embeddings and not isinstance(skeleton.lm_head, lora.LoRALinear):
        skeleton.lm_head.weight = skeleton.model.embed_tokens.weight


class FullOptimizerState:
    """An optimizer state dict standing in for the optimizer in save_checkpoint/load_checkpoint."""

    def __init__(self, state=None):
        self.state = state

    def state_dict(self):
        return self.state

    def load_state_dict(self, state):
        self.state = state


def fsdp_save_checkpoint(run_dir, step, model, optimizer, extra=None, tokenizer=None):
    """save_checkpoint for a sharded model, in the same formats (PEFT adapter or HF folder, plus
    the optimizer state keyed by parameter name). Every process gathers (collectives) what the
    checkpoint holds: for LoRA the adapters alone, never the frozen base; rank 0 writes."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if lora.lora_modules(model):
        weights = {n: lora.full(p.detach()).cpu()
                   for n, p in model.named_parameters() if p.requires_grad}
    else:
        weights = get_model_state_dict(model, options=opts)
    opt_state = get_optimizer_state_dict(model, optimizer, options=opts)
    if dist.get_rank() == 0:
        sk = fsdp_skeleton(model)
        _fill(sk, weights)
        lora.save_checkpoint(run_dir, step, sk, FullOptimizerState(opt_state), extra=extra,
                             tokenizer=tokenizer)


def fsdp_load_checkpoint(run_dir, model, optimizer):
    """load_checkpoint for a sharded model: rank 0 reads the checkpoint (the adapters, or every
    weight), which is broadcast and sharded with the optimizer state; returns the state (step, ...)
    on every rank."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    holder, state, weights = FullOptimizerState(), [None], {}
    if dist.get_rank() == 0:
        sk = fsdp_skeleton(model)
        trained = ([n for n, p in sk.named_parameters() if p.requires_grad] if lora.lora_modules(sk)
                   else [n for n, _ in sk.named_parameters()])
        _fill(sk, {n: torch.zeros(sk.get_parameter(n).shape, dtype=sk.get_parameter(n).dtype)
                   for n in trained})
        state[0] = lora.load_checkpoint(run_dir, sk, holder)
        weights = {n: sk.get_parameter(n).detach() for n in trained}
    dist.broadcast_object_list(state, src=0)
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    set_model_state_dict(model, weights, options=opts)
    set_optimizer_state_dict(model, optimizer, holder.state if dist.get_rank() == 0 else {},
                             options=opts)
    return {k: v for k, v in state[0].items() if k != "optimizer"}


# -----------------------------------------------------------------------------
# main: check the flags, load the data and the base model once, run the grid

TRUNK_CACHE_GB = 4  # the most memory the frozen layers' cached outputs may take
CPU_FLOPS = 1e11    # what a 2-core CPU trains at, roughly: the up-front estimate's rate


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m, g, o = lora.training_flags(p, rank="16", save_every=50)
    m.add_argument("--compile", action="store_true", help="torch.compile the model")
    m.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard weights, gradients and optimizer state over the "
                   "processes (FSDP2) instead of replicating them (DDP)")
    m.add_argument("--no_trunk_cache", action="store_true",
                   help="run the frozen layers below every adapter each step instead of once "
                   "(TrunkCache; it needs --layers limited to late layers, e.g. 29.down_proj)")
    g.add_argument("--init_scale", default="1", help="scale of A's init U(+-init_scale/sqrt(d_in))")
    g.add_argument("--lr_ratio_b", default="1", help="LR of B / LR of A (LoRA+ uses 16)")
    g = p.add_argument_group("optimization (comma lists sweep)")
    g.add_argument("--batch_size", default="32", help="sequences per optimizer step")
    g.add_argument("--micro_batch", type=int, default=8,
                   help="sequences per forward (gradient accumulation)")
    g.add_argument("--micro_tokens", type=int, default=0,
                   help="at most this many padded positions per forward (0 = no limit; "
                   "a longer sequence goes alone): bounds activation memory "
                   "where --micro_batch counts rows")
    g.add_argument("--beta2", type=float, default=0.95)
    g.add_argument("--weight_decay", type=float, default=0.0)
    g.add_argument("--grad_clip", type=float, default=0.0, help="0 = no clipping")
    g.add_argument("--cooldown", type=float, default=0.0,
                   help="let the LR fall linearly to 0 over this last fraction of the steps "
                   "(0 = constant, as in the post)")
    g.add_argument("--steps", type=int, default=0,
                   help="stop after this many steps (0 = the whole epoch)")
    g.add_argument("--epochs", type=int, default=1)
    g = p.add_argument_group("data")
    g.add_argument("--data", default="gsm8k",
                   help="gsm8k, synth, facts:K (K random facts to memorise), a GSM8K-style "
                   "folder, a .jsonl file, or a hub dataset")
    g.add_argument("--max_examples", type=int, default=0,
                   help="use the first N training rows (0 = all)")
    g.add_argument("--max_len", type=int, default=512, help="truncate examples to this many tokens")
    g.add_argument("--eval_examples", type=int, default=64)
    g.add_argument("--eval_every", type=int, default=10,
                   help="eval on the held-out rows every N steps (0 = never)")
    o.add_argument("--log_every", type=int, default=1)
    return p.parse_args(argv)


def check_args(a):
    """Every flag checked before the model loads: errors in a second, each naming the fix."""
    lr_flags = [f for f in ("lr", "lr_mult") if getattr(a, f) is not None]
    positive = ["batch_size", "micro_batch", "alpha", "init_scale", "lr_ratio_b", "epochs",
                "log_every"] + lr_flags
    lora.check_flags(a, positive=positive,
                     non_negative=["threads", "micro_tokens", "steps", "max_examples",
                                   "eval_examples", "eval_every", "save_every", "weight_decay",
                                   "grad_clip"],
                     ints=["rank", "batch_size", "seed"])
    if a.max_len < 8:
        raise lora.UserError(f"--max_len {a.max_len} leaves no room for a prompt and an answer: "
                             "use 256 or more")
    if not 0 <= a.cooldown <= 1:
        raise lora.UserError(
            f"--cooldown {a.cooldown}: a fraction of the steps, in [0, 1] (e.g. 0.2)")
    if not 0 <= a.beta2 < 1:
        raise lora.UserError(f"--beta2 {a.beta2}: must be in [0, 1)")


def grid(a, cfg):
    """Resolved per-run args for every combination of the comma lists."""
    split = lambda s, f: [f(x) for x in str(s).split(",")]
    ranks, layers, bss = split(a.rank, int), split(a.layers, str), split(a.batch_size, int)
    inits, ratios = split(a.init_scale, float), split(a.lr_ratio_b, float)
    seeds = split(a.seed, int)
    runs, axes = [], (ranks, layers, bss, inits, ratios, seeds)
    for r, ly, bs, ini, rb, seed in itertools.product(*axes):
        if r == 0 and (ini != inits[0] or rb != ratios[0]):
            continue  # FullFT ignores the LoRA-only options: run it once per layer set
        for lr in lora.resolve_lrs(a.lr, a.lr_mult, r, cfg):
            resolved = {**vars(a), "rank": r, "layers": ly, "batch_size": bs, "init_scale": ini,
                        "lr_ratio_b": rb, "lr": lr, "seed": seed}
            runs.append(argparse.Namespace(**resolved))
    return runs


def main(argv=None):
    a = parse_args(argv)
    check_args(a)
    ddp = "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", 1)) > 1
    if a.fsdp and not ddp:
        raise lora.UserError("--fsdp shards over processes: "
                             "launch with torchrun --nproc_per_node N (N >= 2)")
    if ddp:
        # the device first: NCCL binds each process to it
        if torch.cuda.is_available() and a.device != "cpu":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
            a.device = f"cuda:{os.environ['LOCAL_RANK']}"
        # the others wait in a barrier while rank 0 fetches the model (minutes): NCCL's 10-minute
        # default would end a first run on a slow link
        backend = "nccl" if a.device.startswith("cuda") else "gloo"
        dist.init_process_group(backend, timeout=timedelta(hours=1))
    master = not ddp or dist.get_rank() == 0
    say = print if master else (lambda *x, **k: None)
    data_seed = int(a.seed.split(",")[0])  # every seed of a sweep trains on the same data
    train_rows, eval_rows, desc = load_data(a.data, data_seed, a.max_examples, a.eval_examples)
    if a.max_examples:
        train_rows = train_rows[:a.max_examples]
    if ddp and not master:
        dist.barrier()  # rank 0 loads first (and fetches the default model once)
    ranks = [int(r) for r in a.rank.split(",")]
    # under FSDP only rank 0 reads the weights; the others build the model on the meta device
    base, tok, a.device, a.amp = lora.load_base(a.model, a.device, a.dtype, ranks,
                                                threads=a.threads, weights=master or not a.fsdp)
    if ddp and master:
        dist.barrier()
    n_rows = len(train_rows) + len(eval_rows)
    say(f"model {base.name_or_path}; tokenizing {n_rows} rows ...", flush=True)
    train_ex, truncated, empty = tokenize(train_rows, tok, a.max_len, a.data)
    eval_ex, _, eval_empty = tokenize(eval_rows, tok, a.max_len, a.data)
    if a.data.startswith("facts:"):
        eval_ex = train_ex[:len(eval_ex)]  # the same facts: shared, so a TrunkCache runs them once
    unseen_ex = []
    if a.data.startswith("facts:") and a.eval_examples:
        unseen = unseen_facts(train_rows, a.eval_examples, data_seed)
        unseen_ex = tokenize(unseen, tok, a.max_len, a.data)[0]
    if not train_ex or (a.eval_every and not eval_ex):
        lens = prompt_lengths(train_rows[:200] or eval_rows, tok, a.data)
        which = "training" if not train_ex else "held-out"
        raise lora.UserError(
            f"every {which} example lost its answer when cut to --max_len {a.max_len} "
            f"(prompts run {lens[0]}-{lens[-1]} tokens): raise --max_len")
    desc += (f"; {len(train_ex)} train examples ({truncated} truncated to {a.max_len} tokens, "
             f"{empty} dropped with no answer tokens)")
    dropped = f" ({eval_empty} dropped)" if eval_empty else ""
    say(f"data: {desc}; {len(eval_ex)} held out" + dropped)
    data = argparse.Namespace(train=train_ex, eval=eval_ex, unseen=unseen_ex, desc=desc,
                              sha=lora.data_fingerprint(train_ex))
    world, runs, n_steps = dist.get_world_size() if ddp else 1, grid(a, base.config), 0
    data_tag = ("synth" if "synth" in desc.split(":")[0]
                else Path(a.data).name.replace(".jsonl", "").replace(":", "") or "data")
    for r in runs:
        if r.batch_size % world:
            raise lora.UserError(f"--batch_size {r.batch_size} is not divisible "
                                 f"by the {world} processes")
        if len(train_ex) < r.batch_size:
            raise lora.UserError(
                f"{len(train_ex)} training examples are fewer than one batch of {r.batch_size}: "
                "lower --batch_size, or add data (--max_examples, --eval_examples)")
        extra = [f"bs{r.batch_size}", f"b{r.lr_ratio_b:g}" * (r.lr_ratio_b != 1),
                 f"init{r.init_scale:g}" * (r.init_scale != 1)]
        r.name = lora.run_name("sft", data_tag, r, extra=extra)
        steps, _, _, r.work = plan(r, base.config, train_ex, eval_ex)
        n_steps += steps
        lora.check_run_dir(Path(a.out) / r.name, a.resume)
    # epochs bound the steps (transformers' max_steps would win instead)
    if a.steps and steps < a.steps:
        say(f"--steps {a.steps} is capped by --epochs {a.epochs}: {steps} steps of {a.batch_size} "
            f"over {len(train_ex)} examples; raise --epochs to train longer")
    total = sum(r.work for r in runs)
    if not a.device.startswith("cuda"):
        minutes = total / CPU_FLOPS / 60
        hint = " (the README's CPU quick start: --batch_size 8 --max_len 256 --steps 20, ~3 min)"
        say(f"{len(runs)} run(s), {n_steps} steps, {total:.2e} FLOPs: "
            f"roughly {minutes:.0f} min on a 2-core CPU" + hint * (minutes > 15))
    progress, kept = lora.Progress(total), {}
    trunks = lambda r, model: trunk_cache(r, model, base.config, data,
                                          pad_id=tok.pad_id, ddp=ddp, kept=kept)
    train_one = lambda r, stop: train(r, base, tok, data,
                                      ddp=ddp, grid=progress, trunks=trunks, stop=stop)
    lora.run_sweep(runs, train_one, progress=progress, quiet=not master)
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except lora.UserError as e:
        sys.exit(f"error: {e}")
