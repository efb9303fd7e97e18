"""Benchmarks of this project against Hugging Face transformers, measured in the same run, printed as ratios.

    CUT_SMOLLM2=/path/to/smollm2 python bench.py model [--parts decode,load,fwd_bwd] [--repeats 5] [--threads 1]

Not a test. The CPU may be shared, so ours and theirs alternate (who goes first swaps each round), each figure is
the median of the rounds, and the table also gives the spread of the rounds, (max - min) / median, and the ratio of
the best rounds (closest to an idle machine). One torch thread by default: on 2 cores shared with other jobs, each
multi-threaded op waits for a busy core, which made 2-thread rounds vary up to 10x (see --threads).
transformers is a reference here only; project code never imports it.
A new section is a function taking the parsed arguments, registered in BENCHMARKS at the bottom.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
LOAD_ROUNDS = 3  # each load is a fresh interpreter (seconds of imports), so fewer rounds than the in-process timings
ROWS = []  # table rows, filled by report()


def checkpoint_dir():
    path = os.environ.get("CUT_SMOLLM2")
    if not path or not Path(path, "model.safetensors").exists():
        sys.exit("bench.py: set CUT_SMOLLM2 to the SmolLM2 checkpoint directory (config.json + model.safetensors)")
    return Path(path)


def alternate(ours, theirs, rounds):
    """Call ours() and theirs() rounds times each, interleaved, swapping who goes first each round."""
    a, b = [], []
    for i in range(rounds):
        if i % 2:
            b.append(theirs()), a.append(ours())
        else:
            a.append(ours()), b.append(theirs())
    return a, b


def report(name, a, b, unit, goal=None, higher_is_better=True):
    """One table row from ours (a) and theirs (b); goal = (label, predicate of (median ours, median ratio))."""
    ours, theirs = statistics.median(a), statistics.median(b)
    ratio = ours / theirs
    best = max if higher_is_better else min
    result = "-" if goal is None else ("PASS" if goal[1](ours, ratio) else "FAIL")
    spread = lambda xs: f"{(max(xs) - min(xs)) / statistics.median(xs):.0%}"
    ROWS.append((name, f"{ours:.3g} {unit}", f"{theirs:.3g} {unit}", f"{ratio:.2f}", f"{best(a) / best(b):.2f}",
                 goal[0] if goal else "-", result, f"{spread(a)}/{spread(b)}"))
    print(f"  {name}: ours {[float(f'{x:.3g}') for x in a]}  theirs {[float(f'{x:.3g}') for x in b]}"
          f"  -> median ratio {ratio:.2f} {result}", flush=True)


def print_table():
    head = ("benchmark", "ours", "theirs", "ours/theirs", "best o/t", "goal", "result", "spread o/t")
    widths = [max(len(r[i]) for r in [head] + ROWS) for i in range(len(head))]
    for r in [head, tuple("-" * w for w in widths)] + ROWS:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def load_both(path, dtype):
    from transformers import LlamaForCausalLM
    from transformers.utils import logging
    from model import Transformer
    logging.disable_progress_bar()
    return Transformer.from_pretrained(path, dtype=dtype), LlamaForCausalLM.from_pretrained(path, dtype=dtype)


# ----------------------------------------------------------------------------- model: decode, load, fwd+bwd

def bench_decode(path, args, new_tokens=64):
    from tokenizers import Tokenizer
    prompt = "The three most important ideas in the history of science, explained briefly for a curious child, are"
    idx = torch.tensor([Tokenizer.from_file(str(path / "tokenizer.json")).encode(prompt).ids])
    print(f"decode: greedy, batch 1, {idx.shape[1]}-token prompt, {new_tokens} new tokens, tokens/s including the prefill")
    for dtype in (torch.float32, torch.bfloat16):
        ours_model, hf = load_both(path, dtype)
        ours_model.eval(), hf.eval()
        outs = {}

        def timed(name, generate):
            def run():
                t = time.perf_counter()
                outs[name] = generate()
                return new_tokens / (time.perf_counter() - t)
            return run
        ours = timed("ours", lambda: ours_model.generate(idx, new_tokens, temperature=0))
        theirs = timed("theirs", lambda: hf.generate(idx, attention_mask=torch.ones_like(idx), do_sample=False,
                                                     pad_token_id=2, min_new_tokens=new_tokens, max_new_tokens=new_tokens))
        with torch.no_grad():
            alternate(ours, theirs, 1)  # warm-up
            a, b = alternate(ours, theirs, args.repeats)
        agree = (outs["ours"] == outs["theirs"])[0, idx.shape[1]:].long().cumprod(0).sum().item()
        print(f"  {str(dtype)[6:]}: the first {agree} of {new_tokens} greedy tokens equal transformers'")
        report(f"decode tok/s {str(dtype)[6:]}", a, b, "tok/s", (">= 2x", lambda o, r: r >= 2))
        del ours_model, hf


LOAD_CHILD = r"""
import json, sys, time
import torch
side, dtype, path = sys.argv[1], getattr(torch, sys.argv[2]), sys.argv[3]
torch.set_num_threads(int(sys.argv[4]))
if side == "ours":
    from model import Transformer as Model
else:
    from transformers import LlamaForCausalLM as Model

def status():
    fields = (line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(v.split()[0]) * 1024 for k, v in fields if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}
open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM: the peak counts from after the imports
base = status()["VmRSS"]
t = time.perf_counter()
model = Model.from_pretrained(path, dtype=dtype)
for p in model.parameters():  # read every weight once: a loader that maps the file lazily pays for it here
    p.detach().sum()
load_s = time.perf_counter() - t
weights = sum(p.numel() * p.element_size() for p in model.parameters())  # parameters() counts tied weights once
print(json.dumps(dict(base=base, load_s=load_s, weights=weights, **status())))
"""


def load_in_subprocess(side, dtype, path, threads):
    cmd = [sys.executable, "-c", LOAD_CHILD, side, str(dtype)[6:], str(path), str(threads)]
    r = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"bench.py: loading with {side} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def bench_load(path, args):
    print("load: a fresh interpreter each, from_pretrained + one read of every weight; peak = VmHWM after that, "
          "baseline = VmRSS after importing torch + the loader's module")
    for dtype in (torch.bfloat16, torch.float32):
        name = str(dtype)[6:]
        a, b = alternate(lambda: load_in_subprocess("ours", dtype, path, args.threads),
                         lambda: load_in_subprocess("theirs", dtype, path, args.threads), LOAD_ROUNDS)
        for side, r in (("ours", a[-1]), ("theirs", b[-1])):
            print(f"  {name} {side} MiB: " + ", ".join(f"{k} {v / 2**20:.0f}" for k, v in r.items() if k != "load_s"))
        report(f"load s {name}", [r["load_s"] for r in a], [r["load_s"] for r in b], "s", higher_is_better=False)
        extra = lambda r: (r["VmHWM"] - r["base"]) / r["weights"]
        report(f"(peak-base)/weights {name}", [extra(r) for r in a], [extra(r) for r in b], "x",
               ("ours <= 1.25", lambda o, r: o <= 1.25), higher_is_better=False)


def fwd_bwd(model, idx, hf):
    """One forward + backward step under bf16 autocast; returns tokens / s."""
    t = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(idx[:, :-1], use_cache=False).logits if hf else model(idx[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
    loss.backward()
    for p in model.parameters():
        p.grad = None
    return idx[:, :-1].numel() / (time.perf_counter() - t)


def bench_fwd_bwd(path, args, batch=4, seq=256):
    print(f"fwd+bwd: float32 weights, bf16 autocast, batch {batch} x {seq}, cross entropy on the logits, tokens/s")
    ours_model, hf = load_both(path, torch.float32)
    ours_model.train(), hf.train()
    idx = torch.randint(0, ours_model.cfg.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    ours, theirs = lambda: fwd_bwd(ours_model, idx, False), lambda: fwd_bwd(hf, idx, True)
    alternate(ours, theirs, 2)  # warm-up: oneDNN builds its kernels on the first calls
    a, b = alternate(ours, theirs, args.repeats)
    report(f"fwd+bwd tok/s {batch}x{seq}", a, b, "tok/s", (">= 1.1x", lambda o, r: r >= 1.1))
    if args.profile:
        from torch.profiler import profile
        for name, step in (("ours", ours), ("theirs", theirs)):
            with profile() as prof:
                step()
            print(f"--- profile of one step, {name}\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


MODEL_PARTS = {"decode": bench_decode, "load": bench_load, "fwd_bwd": bench_fwd_bwd}


def bench_model(args):
    path = checkpoint_dir()
    parts = args.parts.split(",")
    unknown = [p for p in parts if p not in MODEL_PARTS]
    if unknown:
        sys.exit(f"bench.py: unknown part(s) {', '.join(unknown)}; choose from {', '.join(MODEL_PARTS)}")
    for part in parts:
        MODEL_PARTS[part](path, args)


# ----------------------------------------------------------------------------- train: a CUT step's cost, tokens/s

def train_step(model, batch, mode, opt, keep=True):
    """One training step of `mode` on a collated batch: forward, loss, backward, AdamW; returns seconds."""
    from cut_loss import batch_loss, response_logprobs
    t = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kept = batch.targets != -100
        logits = model(batch.idx, keep=kept) if keep else model(batch.idx, use_cache=False).logits
        logp, mask = response_logprobs(logits, batch.targets)
        loss, _ = batch_loss(mode, logp, mask, batch.x_rows, batch.j_rows, batch.is_neg, 1.1, 1.0, 0.0)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def bench_cut_vs_sft(args):
    """A CUT step against an SFT step (sft_all: x -> y only) on the same flawed triples, per token processed."""
    from data import Tokenizer, collate, encode_triples, make_task
    from model import ModelConfig, Transformer
    tok, triples = Tokenizer.byte_level(), make_task(64, seed=0, flawed_frac=1.0)
    model = Transformer(ModelConfig(dim=128, n_layers=4, n_heads=4, n_kv_heads=4, vocab_size=tok.n_vocab, hidden_dim=384))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batches = {m: [collate(encode_triples(tok, triples[i:i + 16], m, 512, chat=True, verbose=False), tok.eos_id)
                   for i in range(0, 64, 16)] for m in ("cut", "sft_all")}
    real = {m: sum(int((b.idx != tok.eos_id).sum()) for b in bs) for m, bs in batches.items()}  # the pad is eos_id
    padded = {m: sum(b.idx.numel() for b in bs) for m, bs in batches.items()}
    step = lambda m: lambda: sum(train_step(model, b, m, opt) for b in batches[m])
    alternate(step("cut"), step("sft_all"), 1)  # warm-up
    a, b = alternate(step("cut"), step("sft_all"), args.repeats)
    per_token = [x / y for x, y in zip(a, b)]
    tokens = (real["cut"] / real["sft_all"])
    print(f"cut vs sft: 4 batches of 16 all-flawed built-in triples; tokens cut/sft {tokens:.2f} "
          f"(padded to each batch's longest row: {padded['cut'] / padded['sft_all']:.2f})")
    report("cut/sft step time / tokens", [p / tokens for p in per_token], [1.0] * len(per_token), "x",
           ("<= 1.10", lambda o, r: o <= 1.10), higher_is_better=False)


def bench_train_tokens(args, batch_size=4, max_len=256):
    """Training tokens/s on SmolLM2 and real triples, bf16 autocast: ours (logits only at the response) vs transformers."""
    from transformers import LlamaForCausalLM
    from data import Tokenizer, collate, encode_triples, load_triples
    path = checkpoint_dir()
    data = HERE.parent / "shared/data/cut-online-iter1.json"
    if not data.is_file():
        sys.exit(f"bench.py: {data} is absent")
    tok = Tokenizer.from_pretrained(path)
    enc = encode_triples(tok, load_triples(data, verbose=False)[:64], "sft_all", max_len, chat=True, verbose=False)
    batches = [collate(enc[i:i + batch_size], tok.eos_id) for i in range(0, 8 * batch_size, batch_size)]
    tokens = sum(int((b.idx != tok.eos_id).sum()) for b in batches)
    ours_model, hf = load_both(path, torch.float32)
    ours_model.train(), hf.train()
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-6) for m in (ours_model, hf)]
    ours = lambda: tokens / sum(train_step(ours_model, b, "sft_all", opts[0]) for b in batches)
    theirs = lambda: tokens / sum(train_step(hf, b, "sft_all", opts[1], keep=False) for b in batches)
    print(f"train tokens/s: SmolLM2 full fine-tune step, fp32 weights, bf16 autocast, 8 batches of {batch_size} real "
          f"triples (x -> y, at most {max_len} tokens), the same loss code on both sides")
    alternate(ours, theirs, 1)
    a, b = alternate(ours, theirs, args.repeats)
    report("train tok/s SmolLM2", a, b, "tok/s", (">= 1.1x", lambda o, r: r >= 1.1))


def bench_train(args):
    bench_cut_vs_sft(args)
    bench_train_tokens(args)


# ----------------------------------------------------------------------------- sections: add new ones here

BENCHMARKS = {"model": bench_model, "train": bench_train}

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("section", choices=sorted(BENCHMARKS))
    parser.add_argument("--parts", default=",".join(MODEL_PARTS), help="model: a comma-separated subset of the parts")
    parser.add_argument("--repeats", type=int, default=5, help="rounds of each in-process timing")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, the same for ours and theirs")
    parser.add_argument("--profile", action="store_true", help="model fwd_bwd: also print a torch.profiler table per side")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(HERE))
    start, load_avg = time.perf_counter(), os.getloadavg()[0]
    BENCHMARKS[args.section](args)
    print(f"\n{args.section}: {time.perf_counter() - start:.0f} s, {args.threads} torch threads on {os.cpu_count()} cores, "
          f"1-min load average {load_avg:.1f} at the start and {os.getloadavg()[0]:.1f} at the end")
    if load_avg > os.cpu_count() - args.threads + 0.5:
        # a busy core stalls every parallel region of a multi-threaded op: medians then measure the neighbours
        print("WARNING: other processes were using the cores this run needs; if the spreads are large, "
              "trust 'best o/t' or rerun with --threads 1")
    print_table()
