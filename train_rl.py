"""
train_rl.py: GRPO-style policy-gradient RL on GSM8K (or the built-in synth problems) with LoRA,
down to rank 1, or full fine-tuning: the post's check that for RL, LoRA matches FullFT at rank 1.

Each step samples --group_size completions for each of --questions_per_step problems from the
current policy (KV cache, temperature 1), rewards each 1 if its final answer is right, else 0,
centres the rewards within each group (advantage = reward - group mean), and maximises the post's
objective, sum over completion tokens of (p_learner / p_sampler) x advantage, with p_sampler the
probabilities recorded while sampling. No KL term; PPO clipping and several updates per batch
are options.

    python train_rl.py --data synth --rank 1 --steps 20 \
        --questions_per_step 4 --group_size 8 --max_new_tokens 96          # CPU
    python train_rl.py --data path/to/gsm8k --rank 1 --steps 5 \
        --questions_per_step 2 --group_size 8                              # CPU
    python train_rl.py --rank 1,8,0 --lr_mult 3,10,30 --compile            # GPU sweep

Learning rate: as in train_sft.py (--lr, or --lr_mult x the post's FullFT LR;
10x for LoRA by default).
"""

import argparse
import math
import random
import re
import sys
import time
from pathlib import Path

import torch

import lora

# -----------------------------------------------------------------------------
# reward: is the completion's final answer GSM8K's answer?

NUMBER = r"-?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\$?\s?\.\d+"


def parse_number(s):
    """'$1,080.00' -> 1080.0, '-3' -> -3.0; None if s holds no number."""
    m = re.search(NUMBER, s.replace("\u2212", "-"))
    if not m:
        return None
    try:
        return float(re.sub(r"[$,\s]", "", m.group(0)))
    except ValueError:
        return None


def extract_answer(text):
    """The completion's final answer as a float, or None. In order: the last '#### N', the last
    \\boxed{N}, the last 'answer is N' / 'answer: N', else the last number anywhere; where N is an
    equation ('8 + 5 = 13') its result counts. The whole completion is searched (tail-only scans
    miss answers), and $, commas, units, a trailing period, a minus sign and decimals such as 18.00
    are handled."""
    text = text.replace("\u2212", "-")
    patterns = (r"####\s*([^\n]*)", r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}",
                r"answer\s*(?:is|:|=)\s*:?\s*([^\n]*)")
    for pattern in patterns:
        hits = re.findall(pattern, text, flags=re.IGNORECASE)
        for hit in reversed(hits):
            # 'answer is 8 + 5 = 13 apples': the result after the last '=', else the first number
            value = parse_number(hit.rsplit("=", 1)[-1])
            if value is None:
                value = parse_number(hit)
            if value is not None:
                return value
    numbers = re.findall(NUMBER, text)
    return parse_number(numbers[-1]) if numbers else None


def gsm8k_reward(completion: str, answer: str) -> float:
    """1.0 if the completion's final answer is the number after GSM8K's last '####', else 0.0."""
    predicted, gold = extract_answer(completion), parse_number(lora.gsm8k_gold(answer))
    return float(predicted is not None and gold is not None and abs(predicted - gold) < 1e-6)


# -----------------------------------------------------------------------------
# the policy-gradient pieces


def group_advantages(rewards, group_size, std=False):
    """Reward minus its group's mean (the post's GRPO-like centring); with std, divided by the
    group's standard deviation + 1e-4 as GRPO does. A group whose rewards are all equal gets 0."""
    r = torch.as_tensor(rewards, dtype=torch.float32).view(-1, group_size)
    adv = r - r.mean(1, keepdim=True)
    if std:
        adv = adv / (r.std(1, keepdim=True) + 1e-4)
    return adv.flatten()


def pg_loss(logp_new, logp_old, adv, clip=0.0):
    """The post's objective as a loss: -sum_t ratio_t x adv over tokens, with
    ratio = p_learner / p_sampler = exp(logp_new - logp_old). With clip > 0, PPO's pessimistic
    clipped version. adv: one number (an episode's tokens), or one per token (many episodes'
    tokens in a row). Returns (loss, ratio)."""
    ratio = torch.exp(logp_new - logp_old)
    obj = ratio * adv
    if clip > 0:
        obj = torch.minimum(obj, ratio.clamp(1 - clip, 1 + clip) * adv)
    return -obj.sum(), ratio.detach()


# -----------------------------------------------------------------------------
# data, prompts, evaluation


def load_problems(spec, seed, n_eval):
    """(train rows, eval rows, description); rows are GSM8K-format {'question', 'answer'}."""
    # synth1: one-step problems only, the easiest start for a small model
    if spec in ("synth", "synth1"):
        k = 1 if spec == "synth1" else 2
        return (lora.synth_problems(20000, seed, k), lora.synth_problems(n_eval, seed + 10_000, k),
                f"{spec} (seed {seed}, up to {k}-step problems)")
    if lora.gsm8k_or_synth(spec) != spec:
        return load_problems("synth", seed, n_eval)
    train, where = lora.load_gsm8k(spec, "train")
    has_test = spec == "gsm8k" or Path(spec).is_dir()
    test, _ = lora.load_gsm8k(spec, "test") if has_test else (train[:n_eval], None)
    return train, test[:n_eval], f"gsm8k: {where} (eval: first {n_eval} of the test split)"


# the user turn ends with one of these (or --instruction TEXT); 'short' keeps a small model's
# completions within a CPU-sized --max_new_tokens, where 'cot' ones are mostly cut off
INSTRUCTIONS = {"cot": lora.GSM8K_INSTRUCTION,
                "short": "Solve the problem in one short sentence, then end with '#### <number>'."}


def prompt_ids(tok, row, instruction=lora.GSM8K_INSTRUCTION):
    msgs = lora.gsm8k_messages(row, with_answer=False, instruction=instruction)
    return tok.render_chat(msgs, add_generation_prompt=True)[0]


@torch.no_grad()
def evaluate(model, tok, rows, max_new_tokens, batch, amp, device,
             instruction=lora.GSM8K_INSTRUCTION, decode=None):
    """Greedy accuracy on rows (the same fixed slice every time)."""
    correct = 0
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        with lora.autocast(device, amp):
            prompts = [prompt_ids(tok, r, instruction) for r in chunk]
            outs, _ = lora.generate(model, prompts, max_new_tokens, temperature=0,
                                    stop_ids=tok.stop_ids, pad_id=tok.pad_id, vocab=tok.vocab_size,
                                    decode=decode)
        correct += sum(gsm8k_reward(tok.decode(o), r["answer"]) for o, r in zip(outs, chunk))
    return correct / len(rows)


# -----------------------------------------------------------------------------
# one run


def train(a, base, tok, train_rows, eval_rows, data_desc, grid=None, stop=None):
    """Train one configuration; returns the final greedy accuracy. grid: the sweep's Progress
    (in steps)."""
    run = lora.Run(a, a.steps, "accuracy", grid, data_sha=lora.data_fingerprint(train_rows))
    if run.done is not None:
        return run.done
    model, opt = lora.prepare_training(base, a.rank, a.lr, layers=a.layers, lm_head=a.lm_head,
                                       alpha=a.alpha, device=a.device, seed=a.seed)
    model.gradient_checkpointing = a.grad_ckpt
    # --compile: the learner per block (one graph for any batch of episodes), the decode step whole
    decode = lora.compile_decode() if a.compile else None
    if a.compile:
        lora.compile_blocks(model)
    run.resume(model, opt)
    run.open("train_rl", model, base, data_desc,
             what=f"{a.steps} steps x {a.questions_per_step} questions x {a.group_size} samples")
    progress = lora.Progress(a.steps - run.start, grid)
    # the greedy eval decodes with a compiled step of its own (its own static cache buffers)
    eval_decode = lora.compile_decode() if a.compile else None
    eval_at = lambda step: eval_and_log(run, model, tok, eval_rows, step=step, decode=eval_decode)
    save = lambda step: lora.save_checkpoint(run.dir, step, model, opt, tokenizer=tok)
    if run.start == 0 and a.eval_every:
        eval_at(0)
    order = random.Random(a.seed).sample(range(len(train_rows)), len(train_rows))
    sampler = None  # --sample_merged: a copy with W + scale B A, refreshed each step
    for step in range(run.start + 1, a.steps + 1):
        # 1. sample: every problem group_size times, with the policy as it is now
        k = (step - 1) * a.questions_per_step
        rows = [train_rows[order[(k + j) % len(order)]] for j in range(a.questions_per_step)]
        prompts = [p for r in rows for p in [prompt_ids(tok, r, a.instruction)] * a.group_size]
        # seeded by step: a resumed run samples the same
        gen = torch.Generator(a.device).manual_seed(a.seed * 1_000_003 + step)
        t0 = time.time()
        model.eval()
        if a.sample_merged and a.rank:
            sampler = lora.merged_copy(model, sampler)
        with lora.autocast(a.device, a.amp):
            comps, old_lp = lora.generate(sampler or model, prompts, a.max_new_tokens,
                                          temperature=a.temperature, top_p=a.top_p,
                                          stop_ids=tok.stop_ids, generator=gen, pad_id=tok.pad_id,
                                          vocab=tok.vocab_size, decode=decode)
        model.train()
        t_sample = time.time() - t0
        # 2. reward, and the advantage: reward minus its group's mean
        answers = [r["answer"] for r in rows for _ in range(a.group_size)]
        rewards = [gsm8k_reward(tok.decode(c), gold) for c, gold in zip(comps, answers)]
        adv = group_advantages(rewards, a.group_size, std=a.adv_std)
        # 3. learn on the episodes that carry signal (a group of equal rewards has zero advantage)
        t1 = time.time()
        loss, ratios, live = learn(run, model, opt, step=step, prompts=prompts, comps=comps,
                                   old_lp=old_lp, adv=adv, vocab=tok.vocab_size)
        times = dict(t0=t0, sample=t_sample, learn=time.time() - t1)
        log_step(run, step, tok, progress=progress, prompts=prompts, comps=comps, rewards=rewards,
                 adv=adv, loss=loss, ratios=ratios, live=live, times=times)
        if a.eval_every and step % a.eval_every == 0 and step != a.steps:
            eval_at(step)
        run.end_step(step, save, stop)
    return run.finish(eval_at(a.steps) if a.eval_every else float("nan"))


def learn(run, model, opt, step, prompts, comps, old_lp, adv, vocab):
    """--updates_per_batch optimizer steps on the episodes with a nonzero advantage, micro-batch
    by micro-batch: the loss is the sum over tokens of ratio x advantage, the mean over the step's
    episodes. Returns (summed loss, the importance ratios, the live episodes' indices)."""
    a = run.a
    params = [p for g in opt.param_groups for p in g["params"]]
    adv_of = adv.tolist()
    # the episodes that carry a gradient, in order of length and grouped so that little of a
    # micro-batch is padding (as SFT groups its examples); the sum over them does not change
    length = lambda i: len(prompts[i]) + len(comps[i])
    live = sorted((i for i in range(len(comps)) if adv_of[i] != 0), key=length)
    spans = lora.micro_batches([length(i) for i in live], a.micro_batch)
    ratios, loss_sum = [], torch.zeros((), device=a.device)
    for _ in range(a.updates_per_batch if live else 0):
        for start, end in spans:
            idx = live[start:end]
            with lora.autocast(a.device, a.amp):
                new_lp = lora.completion_logprobs(model, [prompts[i] for i in idx],
                                                  [comps[i] for i in idx],
                                                  temperature=a.temperature, vocab=vocab)
            new_lp = torch.cat(new_lp)
            # the micro-batch's episodes as one flat row of tokens, built on the host: no waits
            old = torch.tensor([lp for i in idx for lp in old_lp[i]], dtype=torch.float32)
            adv_tok = torch.tensor([adv_of[i] for i in idx for _ in comps[i]])
            loss, ratio = pg_loss(new_lp, lora.to_device(old, a.device),
                                  lora.to_device(adv_tok, a.device), clip=a.clip)
            loss = loss / len(comps)  # mean over the step's episodes, sum over tokens
            loss.backward()
            ratios.append(ratio)
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, a.grad_clip or float("inf"))
        lora.stop_if_diverged(run.dir, step, loss_sum.item(), grad_norm.item(), limit=math.inf,
                              name=a.name, lr=a.lr, log=run.log)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return loss_sum.item(), ratios, live


def eval_and_log(run, model, tok, rows, step, decode=None):
    a = run.a
    print(f"step {step:4d} | greedy eval on {len(rows)} problems ...", end="", flush=True)
    acc = evaluate(model, tok, rows, a.max_new_tokens, batch=a.eval_batch, amp=a.amp,
                   device=a.device, instruction=a.instruction, decode=decode)
    run.write({"type": "eval", "step": step, "accuracy": acc})
    print(f" accuracy {acc:.3f}")
    model.train()
    return acc


def log_step(run, step, tok, progress, prompts, comps, rewards, adv, loss, ratios, live, times):
    """A step's train record and its line."""
    a = run.a
    r_all = torch.cat(ratios) if ratios else torch.ones(1)
    n_gen = sum(map(len, comps))
    updates = a.updates_per_batch if live else 0
    n_learn = sum(len(prompts[i]) + len(comps[i]) for i in live) * updates
    truncated = sum(c[-1] not in tok.stop_ids for c in comps)
    empty = sum(not tok.decode([t for t in c if t not in tok.stop_ids]).strip() for c in comps)
    zero_spread = (adv.view(-1, a.group_size) == 0).all(1).float().mean().item()
    rec = {"type": "train", "step": step, "reward": sum(rewards) / len(rewards),
           "acc": sum(r == 1 for r in rewards) / len(rewards), "zero_spread": zero_spread,
           "episodes": len(comps), "completion_len": n_gen / len(comps), "truncated": truncated,
           "empty": empty,
           "loss": loss, "ratio_min": r_all.min().item(), "ratio_mean": r_all.mean().item(),
           "ratio_max": r_all.max().item(), "sample_tok_s": n_gen / times["sample"],
           "learn_tok_s": n_learn / max(times["learn"], 1e-9),
           "ms": (time.time() - times["t0"]) * 1000, "lr": a.lr}
    # what this run holds at its peak: weights, optimizer, KV cache, activations
    if str(a.device).startswith("cuda"):
        rec["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    run.write(rec)
    progress.add(1)
    print(f"step {step:4d}/{a.steps} | reward {rec['reward']:.3f} | no-spread groups "
          f"{rec['zero_spread']:.2f} | len {rec['completion_len']:.0f} (cut {truncated}) | "
          f"ratio {rec['ratio_min']:.3f}/{rec['ratio_mean']:.3f}/{rec['ratio_max']:.3f} | "
          f"sample {rec['sample_tok_s']:.0f} tok/s | learn {rec['learn_tok_s']:.0f} tok/s | "
          f"{rec['ms'] / 1000:.1f} s | {progress}", flush=True)


# -----------------------------------------------------------------------------
# main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = lora.training_flags(p, rank="1", save_every=10)[0]
    m.add_argument("--compile", action="store_true",
                   help="torch.compile the learner per block and the sampler's decode step "
                   "(a CUDA graph on a GPU)")
    g = p.add_argument_group("RL")
    g.add_argument("--steps", type=int, default=50)
    g.add_argument("--questions_per_step", type=int, default=8)
    g.add_argument("--group_size", type=int, default=16)
    g.add_argument("--max_new_tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top_p", type=float, default=1.0)
    g.add_argument("--adv_std", action="store_true",
                   help="divide advantages by the group's std (GRPO); the post does not")
    g.add_argument("--updates_per_batch", type=int, default=1,
                   help="optimizer steps per batch of samples (>1: off-policy)")
    g.add_argument("--clip", type=float, default=0.0, help="PPO clip epsilon, e.g. 0.2 "
                   "(0 = the post's plain objective)")
    g.add_argument("--micro_batch", type=int, default=8, help="episodes per learner forward")
    g.add_argument("--sample_merged", action=argparse.BooleanOptionalAction, default=None,
                   help="sample from a copy with the adapters merged (W + scale B A, refreshed "
                   "each step): one matmul per layer instead of three, at the cost of a copy of "
                   "the adapted weights; in bf16 the merge rounds, which the logged importance "
                   "ratio shows (default: on CUDA, not on a CPU)")
    g.add_argument("--grad_clip", type=float, default=0.0)
    g = p.add_argument_group("data and eval")
    g.add_argument("--data", default="gsm8k", help="gsm8k, synth, synth1 (one-step problems), "
                   "a GSM8K-style folder or .jsonl")
    g.add_argument("--instruction", default="cot",
                   help="the prompt's answer-format request: cot (step by step, then '#### N'), "
                   "short (one sentence, then '#### N'), or the text itself")
    g.add_argument("--eval_examples", type=int, default=64)
    g.add_argument("--eval_every", type=int, default=10)
    g.add_argument("--eval_batch", type=int, default=32)
    return p.parse_args(argv)


def check_args(a):
    """Every flag checked before the model loads: errors in a second, each naming the fix."""
    lr_flags = [f for f in ("lr", "lr_mult") if getattr(a, f) is not None]
    positive = ["questions_per_step", "max_new_tokens", "temperature", "top_p", "updates_per_batch",
                "micro_batch", "alpha", "eval_batch"] + lr_flags
    lora.check_flags(a, positive=positive,
                     non_negative=["threads", "steps", "clip", "grad_clip", "eval_examples",
                                   "eval_every", "save_every"],
                     ints=["rank", "seed"])
    if a.group_size < 2:
        raise lora.UserError(f"--group_size {a.group_size}: advantages are centred within a group, "
                             "so one sample has none: use 2 or more (the post: 16)")
    if a.top_p > 1:
        raise lora.UserError(f"--top_p {a.top_p}: must be in (0, 1]")
    if "," in a.layers:
        raise lora.UserError(f"--layers {a.layers}: train_rl.py does not sweep layer sets; run one "
                             "set at a time, or join matrices with + (q_proj+v_proj) to train both")


def main(argv=None):
    a = parse_args(argv)
    check_args(a)
    seeds = [int(x) for x in a.seed.split(",")]
    train_rows, eval_rows, desc = load_problems(a.data, seeds[0], a.eval_examples)
    ranks = [int(r) for r in a.rank.split(",")]
    base, tok, a.device, a.amp = lora.load_base(a.model, a.device, a.dtype, ranks=ranks,
                                                threads=a.threads)
    # a GPU's decode reads the weights once a token: one matmul a layer, not three
    if a.sample_merged is None:
        a.sample_merged = a.device.startswith("cuda")
    print(f"model {base.name_or_path}; data: {desc}; {len(train_rows)} training problems")
    tag = desc.split(" ")[0] if desc.startswith("synth") else "gsm8k"
    if a.instruction != "cot":  # runs with another prompt get their own folder
        tag += f"-{a.instruction}" if a.instruction in INSTRUCTIONS else "-custom"
    a.instruction = INSTRUCTIONS.get(a.instruction, a.instruction)
    runs = []
    for r in (int(x) for x in a.rank.split(",")):
        for lr in lora.resolve_lrs(a.lr, a.lr_mult, r, base.config):
            for seed in seeds:
                run = argparse.Namespace(**{**vars(a), "rank": r, "lr": lr, "seed": seed,
                                            "work": a.steps})
                run.name = lora.run_name("rl", tag, run, extra=[f"g{a.group_size}"])
                lora.check_run_dir(Path(a.out) / run.name, a.resume)
                runs.append(run)
    grid = lora.Progress(len(runs) * a.steps)
    train_one = lambda r, stop: train(r, base, tok, train_rows, eval_rows=eval_rows, data_desc=desc,
                                      grid=grid, stop=stop)
    lora.run_sweep(runs, train_one, "final greedy eval accuracy", higher_is_better=True,
                   progress=grid)


if __name__ == "__main__":
    try:
        main()
    except lora.UserError as e:
        sys.exit(f"error: {e}")
