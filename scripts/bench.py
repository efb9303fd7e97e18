"""Benchmarks of this project against Hugging Face transformers, measured in the same run, \
printed as ratios.

Run from the repository root:
    CUT_SMOLLM2=/path/to/smollm2 python -m scripts.bench model [--parts decode,load,fwd_bwd]
        [--repeats 5] [--threads 1]
    CUT_SMOLLM2=/path/to/smollm2 python -m scripts.bench train --data=train-alpaca-sample-iter1.json
    CUT_SMOLLM2=/path/to/smollm2 python -m scripts.bench generate --data=TRIPLES --threads=2
    python -m scripts.bench memory            python -m scripts.bench gpu [--dry]
    python -m scripts.bench compile --data=TRIPLES

Not a test. The CPU may be shared, so ours and theirs alternate (who goes first swaps each round),
each figure is the median of the rounds, and the table also gives the spread of the rounds,
(max - min) / median, and the ratio of the best rounds (closest to an idle machine). One torch
thread by default: on 2 cores shared with other jobs, each multi-threaded op waits for a busy core,
which made 2-thread rounds vary up to 10x (see --threads).
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

HERE = Path(__file__).resolve().parents[1]  # the repository
# each load is a fresh interpreter (seconds of imports), so fewer rounds than the in-process timings
LOAD_ROUNDS = 3
ROWS = []  # table rows, filled by report()


def checkpoint_dir():
    path = os.environ.get("CUT_SMOLLM2")
    if not path or not Path(path, "model.safetensors").exists():
        sys.exit("bench.py: set CUT_SMOLLM2 to the SmolLM2 checkpoint directory "
                 "(config.json + model.safetensors)")
    return Path(path)


def alternate(ours, theirs, rounds):
    """Call ours() and theirs() rounds times each, interleaved, swapping who goes first each
    round."""
    a, b = [], []
    for i in range(rounds):
        if i % 2:
            b.append(theirs()), a.append(ours())
        else:
            a.append(ours()), b.append(theirs())
    return a, b


def report(name, a, b, unit, goal=None, higher_is_better=True):
    """One table row from ours (a) and theirs (b); goal = (label, predicate of (median ours, median
    ratio))."""
    ours, theirs = statistics.median(a), statistics.median(b)
    ratio = ours / theirs
    best = max if higher_is_better else min
    result = "-" if goal is None else ("PASS" if goal[1](ours, ratio) else "FAIL")
    spread = lambda xs: f"{(max(xs) - min(xs)) / statistics.median(xs):.0%}"
    ROWS.append((name, f"{ours:.3g} {unit}", f"{theirs:.3g} {unit}", f"{ratio:.2f}",
                 f"{best(a) / best(b):.2f}", goal[0] if goal else "-", result,
                 f"{spread(a)}/{spread(b)}"))
    print(f"  {name}: ours {[float(f'{x:.3g}') for x in a]}"
          f"  theirs {[float(f'{x:.3g}') for x in b]}"
          f"  -> median ratio {ratio:.2f} {result}", flush=True)


def print_table():
    head = ("benchmark", "ours", "theirs", "ours/theirs", "best o/t", "goal", "result",
            "spread o/t")
    widths = [max(len(r[i]) for r in [head] + ROWS) for i in range(len(head))]
    for r in [head, tuple("-" * w for w in widths)] + ROWS:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def load_both(path, dtype):
    from transformers import LlamaForCausalLM
    from transformers.utils import logging
    from model import Transformer
    logging.disable_progress_bar()
    return (Transformer.from_pretrained(path, dtype=dtype),
            LlamaForCausalLM.from_pretrained(path, dtype=dtype))


# --------------------------------------------------------------------- model: decode, load, fwd+bwd

def bench_decode(path, args, new_tokens=64):
    from tokenizers import Tokenizer
    prompt = ("The three most important ideas in the history of science, explained briefly for a "
              "curious child, are")
    idx = torch.tensor([Tokenizer.from_file(str(path / "tokenizer.json")).encode(prompt).ids])
    print(f"decode: greedy, batch 1, {idx.shape[1]}-token prompt, {new_tokens} new tokens, "
          "tokens/s including the prefill")
    for dtype in (torch.float32, torch.bfloat16):
        # one dtype's pair of models at a time: they are freed when decode_one returns
        decode_one(path, args, idx, dtype, new_tokens)


def decode_one(path, args, idx, dtype, new_tokens):
    """Greedy decoding of idx by ours and transformers' in dtype: one table row."""
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
    theirs = timed("theirs", lambda: hf.generate(idx, attention_mask=torch.ones_like(idx),
                                                 do_sample=False, pad_token_id=2,
                                                 min_new_tokens=new_tokens,
                                                 max_new_tokens=new_tokens))
    with torch.no_grad():
        alternate(ours, theirs, 1)  # warm-up
        a, b = alternate(ours, theirs, args.repeats)
    agree = (outs["ours"] == outs["theirs"])[0, idx.shape[1]:].long().cumprod(0).sum().item()
    print(f"  {str(dtype)[6:]}: the first {agree} of {new_tokens} greedy tokens equal "
          "transformers'")
    report(f"decode tok/s {str(dtype)[6:]}", a, b, "tok/s", (">= 2x", lambda o, r: r >= 2))


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
    return {k: int(v.split()[0]) * 1024 for k, v in fields
            if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}
open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM: the peak counts from after the imports
base = status()["VmRSS"]
t = time.perf_counter()
model = Model.from_pretrained(path, dtype=dtype)
# read every weight once: a loader that maps the file lazily pays for it here
for p in model.parameters():
    p.detach().sum()
load_s = time.perf_counter() - t
# parameters() counts tied weights once
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps(dict(base=base, load_s=load_s, weights=weights, **status())))
"""


def load_in_subprocess(side, dtype, path, threads):
    cmd = [sys.executable, "-c", LOAD_CHILD, side, str(dtype)[6:], str(path), str(threads)]
    r = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"bench.py: loading with {side} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def bench_load(path, args):
    print("load: a fresh interpreter each, from_pretrained + one read of every weight; "
          "peak = VmHWM after that, baseline = VmRSS after importing torch + the loader's module")
    for dtype in (torch.bfloat16, torch.float32):
        name = str(dtype)[6:]
        a, b = alternate(lambda: load_in_subprocess("ours", dtype, path, args.threads),
                         lambda: load_in_subprocess("theirs", dtype, path, args.threads),
                         LOAD_ROUNDS)
        for side, r in (("ours", a[-1]), ("theirs", b[-1])):
            print(f"  {name} {side} MiB: " + ", ".join(f"{k} {v / 2**20:.0f}"
                                                       for k, v in r.items() if k != "load_s"))
        report(f"load s {name}", [r["load_s"] for r in a], [r["load_s"] for r in b], "s",
               higher_is_better=False)
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
    print(f"fwd+bwd: float32 weights, bf16 autocast, batch {batch} x {seq}, "
          "cross entropy on the logits, tokens/s")
    ours_model, hf = load_both(path, torch.float32)
    ours_model.train(), hf.train()
    idx = torch.randint(0, ours_model.cfg.vocab_size, (batch, seq + 1),
                        generator=torch.Generator().manual_seed(0))
    ours, theirs = lambda: fwd_bwd(ours_model, idx, False), lambda: fwd_bwd(hf, idx, True)
    alternate(ours, theirs, 2)  # warm-up: oneDNN builds its kernels on the first calls
    a, b = alternate(ours, theirs, args.repeats)
    report(f"fwd+bwd tok/s {batch}x{seq}", a, b, "tok/s", (">= 1.1x", lambda o, r: r >= 1.1))
    if args.profile:
        from torch.profiler import profile
        for name, step in (("ours", ours), ("theirs", theirs)):
            with profile() as prof:
                step()
            print(f"--- profile of one step, {name}\n"
                  + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


MODEL_PARTS = {"decode": bench_decode, "load": bench_load, "fwd_bwd": bench_fwd_bwd}


def bench_model(args):
    path = checkpoint_dir()
    parts = args.parts.split(",")
    unknown = [p for p in parts if p not in MODEL_PARTS]
    if unknown:
        sys.exit(f"bench.py: unknown part(s) {', '.join(unknown)}; "
                 f"choose from {', '.join(MODEL_PARTS)}")
    for part in parts:
        MODEL_PARTS[part](path, args)


# --------------------------------------------------------------- train: a CUT step's cost, tokens/s

def token_logprobs(model, batch, hf):
    """log p(target) (R, N) at the trained positions of a collated batch: ours computes them
    LOGIT_CHUNK positions at a time; transformers' model gives the (B, T, V) logits, and only the
    trained positions go through the log-softmax, in float32."""
    if not hf:
        return model(batch.idx, batch.positions, batch.targets)
    logits = model(batch.idx, use_cache=False).logits
    rows = torch.arange(len(batch.idx))[:, None]
    logp = logits[rows, batch.positions].float().log_softmax(-1)
    logp = logp.gather(2, batch.targets.clamp(min=0)[..., None])[..., 0]
    return logp * batch.mask


def train_step(model, batch, mode, opt, hf=False):
    """One training step of `mode` on a collated batch: forward, loss, backward, AdamW; returns
    seconds. hf: model is transformers' (the peer)."""
    from cut_loss import batch_loss
    t = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp = token_logprobs(model, batch, hf)
        loss, _ = batch_loss(mode, logp, batch.mask, batch.x_rows, batch.j_rows, batch.is_neg,
                             1.1, 1.0, 0.0)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def bench_cut_vs_sft(args):
    """A CUT step against an SFT step (sft_all: x -> y only) on the same flawed triples, per token
    processed."""
    from data import collate, encode_triples
    from support.tokenizer import Tokenizer
    from tasks.letters import make_task
    from model import ModelConfig, Transformer
    tok, triples = Tokenizer.byte_level(), make_task(64, seed=0, flawed_frac=1.0)
    model = Transformer(ModelConfig(dim=128, n_layers=4, n_heads=4, n_kv_heads=4,
                                    vocab_size=tok.n_vocab, hidden_dim=384))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batches = {m: [collate(encode_triples(tok, triples[i:i + 16], m, 512, chat=True,
                                          verbose=False), tok.eos_id)
                   for i in range(0, 64, 16)] for m in ("cut", "sft_all")}
    # the pad is eos_id
    real = {m: sum(b.n_tokens for b in bs) for m, bs in batches.items()}
    padded = {m: sum(b.idx.numel() for b in bs) for m, bs in batches.items()}
    step = lambda m: lambda: sum(train_step(model, b, m, opt) for b in batches[m])
    alternate(step("cut"), step("sft_all"), 1)  # warm-up
    a, b = alternate(step("cut"), step("sft_all"), args.repeats)
    per_token = [x / y for x, y in zip(a, b)]
    tokens = (real["cut"] / real["sft_all"])
    print(f"cut vs sft: 4 batches of 16 all-flawed built-in triples; tokens cut/sft {tokens:.2f} "
          f"(padded to each batch's longest row: {padded['cut'] / padded['sft_all']:.2f})")
    report("cut/sft step time / tokens", [p / tokens for p in per_token], [1.0] * len(per_token),
           "x", ("<= 1.10", lambda o, r: o <= 1.10), higher_is_better=False)


def bench_train_tokens(args, batch_size=4, max_len=256):
    """Training tokens/s on SmolLM2 and real triples, bf16 autocast: ours (logits only at the
    response) vs transformers."""
    from data import collate, encode_triples
    from support.tokenizer import Tokenizer
    from support.triple_files import load_triples
    path = checkpoint_dir()
    data = Path(args.data)
    if not data.is_file():
        sys.exit("bench.py: train needs --data=FILE, the CUT authors' triples "
                 "(wwxu21/CUT, train-alpaca-sample-iter1.json)")
    tok = Tokenizer.from_pretrained(path)
    enc = encode_triples(tok, load_triples(data, verbose=False)[:64], "sft_all", max_len, chat=True,
                         verbose=False)
    batches = [collate(enc[i:i + batch_size], tok.eos_id)
               for i in range(0, 8 * batch_size, batch_size)]
    tokens = sum(b.n_tokens for b in batches)
    ours_model, hf = load_both(path, torch.float32)
    ours_model.train(), hf.train()
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-6) for m in (ours_model, hf)]
    ours = lambda: tokens / sum(train_step(ours_model, b, "sft_all", opts[0]) for b in batches)
    theirs = lambda: tokens / sum(train_step(hf, b, "sft_all", opts[1], hf=True) for b in batches)
    print(f"train tokens/s: SmolLM2 full fine-tune step, fp32 weights, bf16 autocast, "
          f"8 batches of {batch_size} real triples (x -> y, at most {max_len} tokens), "
          f"the same loss code on both sides")
    alternate(ours, theirs, 1)
    a, b = alternate(ours, theirs, args.repeats)
    report("train tok/s SmolLM2", a, b, "tok/s", (">= 1.1x", lambda o, r: r >= 1.1))


def bench_train(args):
    bench_cut_vs_sft(args)
    bench_train_tokens(args)


# ------------------------------------------------------------- memory: per-GPU memory of a CUT step

LLAMA_SHAPES = {  # the Hugging Face configs (head_dim 128, vocabulary 128256)
    "Llama-3.2-1B": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, hidden_dim=8192,
                         tie_embeddings=True),
    "Llama-3.2-3B": dict(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, hidden_dim=8192,
                         tie_embeddings=True),
    "Llama-3.1-8B": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336),
    "Llama-3.1-70B": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, hidden_dim=28672),
}
SMOLLM2_135M = dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536,
                    vocab_size=49152, tie_embeddings=True)
# per GPU: 4 CUT triples = 8 rows of 1024 tokens, half of them y
TABLE_BATCH = dict(rows=8, seq=1024, trained=4096)
TABLE_MODES = {"LoRA + DDP": dict(mode="lora", ddp=True),
               "full + DDP": dict(mode="full", ddp=True),
               "full + FSDP": dict(mode="fsdp"),
               "full + FSDP + grad_ckpt": dict(mode="fsdp", grad_ckpt=True)}
LORA_RANK = 16  # on train.py's default targets: gate_proj, up_proj, down_proj


def llama_config(shape, **overrides):
    from model import ModelConfig
    return ModelConfig(**{"vocab_size": 128256, **shape, **overrides})


def param_counts(cfg):
    """Parameters of the model (tied weights once), its linear layers' weights, one block, the
    lm_head, LoRA's."""
    from model import Transformer, add_lora
    with torch.device("meta"):
        m = Transformer(cfg)
        total = sum(p.numel() for p in m.parameters())
        linear = sum(mod.weight.numel() for mod in m.modules() if isinstance(mod, torch.nn.Linear))
        block = sum(p.numel() for p in m.model.layers[0].parameters())
        add_lora(m, LORA_RANK, 2.0 * LORA_RANK)
        lora = sum(p.numel() for p in m.parameters() if p.requires_grad)
    return dict(total=total, linear=linear, block=block, head=cfg.vocab_size * cfg.dim, lora=lora)


def step_memory(cfg, mode, rows, seq, trained, gpus=1, ddp=False, grad_ckpt=False, chunk=None):
    """Predicted peak bytes of one CUT step (forward, backward, AdamW) on one process, from the
    parameter counts and the dtypes train.py uses with dtype=bfloat16. mode: 'full' (fp32 weights,
    bf16 autocast), 'lora' (bf16 base, fp32 adapters), 'fsdp' (fp32 shards over gpus, bf16 compute,
    fp32 reduction). The peak comes at the start of backward (activations, logits, the lm_head's
    gradient) or at its end (all gradients): persistent + the larger."""
    from model import LOGIT_CHUNK
    n = param_counts(cfg)
    P, d, q, kv, h = (n["total"], cfg.dim, cfg.n_heads * cfg.head_dim,
                      cfg.n_kv_heads * cfg.head_dim, cfg.hidden_dim)
    # rotated q, k; v; the output (o_proj's input); lse
    tokens, attn = rows * seq, 4 * q + 4 * kv + 4 * cfg.n_heads
    per_layer = {
        # fp32 residual, norm inputs and outputs; bf16 copies of linear inputs
        "full": 26 * d + attn + 8 * h,
        # bf16 residual, the norms' fp32 copies, one bf16 input per linear
        "fsdp": 16 * d + attn + 8 * h,
        # frozen linears save no input
        "lora": 10 * d + attn + 8 * h + 6 * LORA_RANK,
    }[mode]
    if grad_ckpt:  # each block's input, plus one block recomputed at a time
        acts = cfg.n_layers * tokens * (4 if mode == "full" else 2) * d + tokens * per_layer
    else:
        acts = cfg.n_layers * tokens * per_layer
    # chunk 0: the (n, V) logits in one block
    block = trained if chunk == 0 else min(trained, chunk or LOGIT_CHUNK)
    logits = 12 * cfg.vocab_size * block  # fp32 log-softmax, its gradient in and out
    # the lm_head runs in fp32: a bf16 weight gets an fp32 copy (LoRA, FSDP); fp32 needs none
    if mode == "full":  # other: autocast's bf16 copies of the other linear weights, for backward
        m = dict(weights=4 * P, grads=4 * P, adamw=8 * P, other=2 * n["linear"] + 2 * n["head"])
        end = 4 * n["head"]  # the embedding's dense gradient, before it is added
    elif mode == "lora":
        m = dict(weights=2 * P + 4 * n["lora"], grads=4 * n["lora"], adamw=8 * n["lora"],
                 other=2 * n["lora"] + 4 * n["head"])
        end = 0
    else:
        # other: the root (embeddings, lm_head) and two blocks gathered in bf16; a block's and the
        # head's gradients
        root = P - cfg.n_layers * n["block"]
        # block: 2 x 2 gathered, 2 + 4 grads
        m = dict(weights=4 * P / gpus, grads=4 * P / gpus, adamw=8 * P / gpus,
                 other=2 * root + 10 * n["block"] + 6 * n["head"])
        # the root's gradients in bf16 and fp32 for the reduce-scatter, its parameters
        end = 8 * root
    m["activations"] = acts + logits
    # DDP's buckets keep the grads
    held = m["weights"] + m["adamw"] + (m["grads"] if ddp or mode == "fsdp" else 0)
    m["peak"] = held + max(m["other"] + m["activations"],
                           end + (0 if ddp or mode == "fsdp" else m["grads"]))
    return m


MEMORY_CHILD = r"""
import json, sys
import torch
from cut_loss import batch_loss
from model import ModelConfig, Transformer, add_lora
import model
a = json.loads(sys.argv[1])
torch.manual_seed(0)
cfg = ModelConfig(**a["cfg"], max_seq_len=a["seq"])
idx = torch.randint(0, cfg.vocab_size, (a["rows"], a["seq"]))
n = a["trained"] // a["rows"]  # each row's last n positions are trained
positions = torch.arange(a["seq"] - n, a["seq"]).expand(a["rows"], n)
targets = idx.roll(-1, 1)[:, -n:]
mask = torch.ones(a["rows"], n)
rows = torch.arange(a["rows"])
def rss(key):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status")
                if line.startswith(key + ":"))
def step(m, opt):
    with torch.autocast("cpu", dtype=torch.bfloat16):  # train.py with dtype=bfloat16
        logp = m(idx, positions, targets)  # as train.forward_loss
        loss, _ = batch_loss("cut", logp, mask, rows[0::2], rows[1::2], rows[0::2] >= 0,
                             1.5, 1.0, 0.0)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
warm = Transformer(ModelConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=128,
                               vocab_size=cfg.vocab_size))
# oneDNN's kernels and autograd's threads: not the step's memory
step(warm, torch.optim.AdamW(warm.parameters()))
del warm
base = rss("VmRSS")
if a["chunk"] == 0:  # the whole (n, V) logits in one block
    model.LOGIT_CHUNK = 2**62
elif a["chunk"]:
    model.LOGIT_CHUNK = a["chunk"]
m = Transformer(cfg)
if a["mode"] == "lora":  # train.py's LoRA: a bf16 base, fp32 adapters
    m = add_lora(m.to(torch.bfloat16), a["lora_rank"], 2.0 * a["lora_rank"])
    for p in m.parameters():
        if p.requires_grad:
            p.data = p.data.float()
m.grad_ckpt = a["grad_ckpt"]
opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5, fused=True)
step(m, opt)  # the first step creates AdamW's state; the second is the steady state
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
step(m, opt)
print(json.dumps(dict(peak=rss("VmHWM") - base)))
"""


def measure_step(cfg, mode, rows, seq, trained, grad_ckpt=False, chunk=None):
    """Peak RSS above a warmed-up baseline over a steady-state CUT step in a fresh interpreter,
    bytes. Allocations over 64 KiB are mmapped, so memory freed is returned at once and the peak is
    the live tensors'. chunk: as in step_memory (None: model.LOGIT_CHUNK; 0: model.LOGIT_CHUNK set
    past every n, so the whole (n, V) logits are one block; else model.LOGIT_CHUNK = chunk)."""
    from dataclasses import asdict
    arg = dict(cfg={k: v for k, v in asdict(cfg).items() if k not in ("head_dim", "max_seq_len")},
               mode=mode, rows=rows, seq=seq, trained=trained, grad_ckpt=grad_ckpt, chunk=chunk,
               lora_rank=LORA_RANK)
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    r = subprocess.run([sys.executable, "-c", MEMORY_CHILD, json.dumps(arg)], cwd=HERE,
                       capture_output=True, text=True, env=env)
    if r.returncode:
        sys.exit(f"bench.py: the memory measurement failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])["peak"]


def print_memory_table():
    b = TABLE_BATCH
    print(f"Per-GPU memory of a CUT step in GB (1e9 bytes), predicted by step_memory: train.py "
          f"with --dtype=bfloat16, AdamW, 8 GPUs,\n"
          f"{b['rows']} sequences x {b['seq']} tokens per GPU ({b['trained']} of them response "
          f"tokens: --batch_size={b['rows'] // 2} CUT triples, --max_len={b['seq']}), "
          f"gradient_accumulation_steps=1, LoRA rank {LORA_RANK} on gate/up/down_proj.\n"
          f"'other': autocast's bf16 copies of the weights and the lm_head's gradient "
          f"(full + DDP), or FSDP's gathered root and blocks and their unsharded gradients; "
          f"with a bf16 lm_head (LoRA, FSDP), its fp32 copy: the logits are fp32.\n"
          f"peak: weights + AdamW (+ gradients, which DDP's buckets and FSDP's shards hold) + the "
          f"larger of other + activations and the end of backward.\n")
    head = ("model", "params", "setup", "weights", "grads", "AdamW", "other", "activations",
            "peak / GPU")
    lines = []
    for name, shape in LLAMA_SHAPES.items():
        cfg = llama_config(shape)
        for setup, kw in TABLE_MODES.items():
            m = step_memory(cfg, **kw, **b, gpus=8)
            lines.append((name, f"{param_counts(cfg)['total'] / 1e9:.2f}B", setup,
                          *(f"{m[k] / 1e9:.1f}"
                            for k in ("weights", "grads", "adamw", "other", "activations")),
                          f"{m['peak'] / 1e9:.1f}" + ("" if m["peak"] <= 80e9 else " (> 80 GB)")))
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for line in lines:
        print("| " + " | ".join(line) + " |")


def bench_memory(args):
    print_memory_table()
    if args.no_measure:
        return
    from model import ModelConfig
    smol, vocab_128k = (ModelConfig(**SMOLLM2_135M),
                        llama_config(dict(dim=256, n_layers=2, n_heads=4, n_kv_heads=2,
                                          hidden_dim=768)))
    short, long = dict(rows=4, seq=128, trained=256), dict(rows=4, seq=512, trained=1024)
    cases = {"SmolLM2-135M full": (smol, dict(mode="full", **short)),
             "SmolLM2-135M LoRA": (smol, dict(mode="lora", **short)),
             "SmolLM2-135M full + grad_ckpt": (smol, dict(mode="full", grad_ckpt=True, **short)),
             # the chunked log-softmax on a Llama 3 vocabulary: the (n, V) logits in one block,
             # or 256 rows of them at a time
             "128k vocab, 1024 trained, logits at once":
                 (vocab_128k, dict(mode="full", chunk=0, **long)),
             "128k vocab, 1024 trained, 256 at a time":
                 (vocab_128k, dict(mode="full", chunk=256, **long))}
    print("\nchecked on this CPU: one process, bf16 autocast, the peak RSS of a second step "
          "above a warmed-up baseline; MB = 1e6 bytes")
    print("| case | tokens (trained) | predicted MB | measured MB | measured / predicted |\n"
          "|---|---|---|---|---|")
    measured = {}
    for name, (cfg, kw) in cases.items():
        predicted, measured[name] = step_memory(cfg, **kw)["peak"], measure_step(cfg, **kw)
        ratio = measured[name] / predicted
        print(f"| {name} | {kw['rows']} x {kw['seq']} ({kw['trained']}) | {predicted / 1e6:.0f} | "
              f"{measured[name] / 1e6:.0f} | {ratio:.2f}{'' if 0.8 <= ratio <= 1.2 else ' FAIL'} |",
              flush=True)
    before, after = (measured[f"128k vocab, 1024 trained, {k}"]
                     for k in ("logits at once", "256 at a time"))
    print(f"the chunked log-softmax lowered this step's measured peak by "
          f"{(before - after) / 1e6:.0f} MB ({(before - after) / before:.0%})")


# ------------------------------------------------------------------ gpu: the checks a GPU run needs

def cut_losses(model, encoded, pad_id, dev, dtype):
    """train.py's CUT loss on `encoded`, before and after one AdamW step, on a copy of model on
    dev."""
    import copy
    from contextlib import nullcontext
    import train
    m = copy.deepcopy(model).to(dev)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    autocast = (torch.autocast(torch.device(dev).type, dtype=dtype) if dtype != torch.float32
                else nullcontext())
    losses = []
    for _ in range(2):
        loss, _, _ = train.forward_loss(m, encoded, train.Config(loss="cut", lam=1.5), pad_id, dev,
                                        autocast)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def check_bf16_step(dev, dry):
    """A CUT step in bf16 on dev against the same step in fp32 on the CPU (a Llama-shaped model,
    GQA, Llama 3 RoPE)."""
    from data import encode_triples
    from support.tokenizer import Tokenizer
    from tasks.letters import make_task
    from model import ModelConfig, Transformer
    tok = Tokenizer.byte_level()
    torch.manual_seed(0)
    dims = dict(dim=64, n_layers=2, n_heads=4) if dry else dict(dim=512, n_layers=8, n_heads=8)
    model = Transformer(ModelConfig(**dims, n_kv_heads=2, hidden_dim=3 * dims["dim"],
                                    vocab_size=tok.n_vocab, rope_theta=500000.0,
                                    rope_scaling=dict(factor=8.0, low_freq_factor=1.0,
                                                      high_freq_factor=4.0,
                                                      original_max_position_embeddings=64)))
    encoded = encode_triples(tok, make_task(16, seed=0, flawed_frac=0.5), "cut", 256, chat=True,
                             verbose=False)
    ref = cut_losses(model, encoded, tok.eos_id, "cpu", torch.float32)
    got = cut_losses(model, encoded, tok.eos_id, dev, torch.bfloat16)
    # the losses within 1%, and what the step changed (its gradients, through AdamW) within 5%
    ok = all(abs(g - r) <= 1e-2 * abs(r) for g, r in zip(got, ref))
    ok &= abs((got[1] - got[0]) - (ref[1] - ref[0])) <= 0.05 * abs(ref[1] - ref[0])
    print(f"CUT step, bf16 on {dev} vs fp32 on the CPU: losses before/after one AdamW step "
          f"{got} vs {ref} (tolerance: 1% relative, the change 5%) {'PASS' if ok else 'FAIL'}",
          flush=True)
    return ok


def check_torchrun(dev, dry, nproc):
    """train.py with torchrun over nproc processes, DDP then FSDP, on the built-in task from
    scratch: both finish, FSDP's losses follow DDP's, and FSDP's checkpoint loads."""
    import tempfile
    from model import Transformer
    dtype = "float32" if dry else "bfloat16"
    args = ["--data=builtin", "--task_size=400", "--base_iters=0", "--max_iters=4",
            "--eval_interval=4", "--log_interval=1", "--batch_size=4",
            f"--gradient_accumulation_steps={nproc}", "--max_len=160", f"--device={dev}",
            f"--dtype={dtype}", "--warmup_iters=1", "--lam=1.0"]
    args += ["--dim=32", "--n_layers=1", "--n_heads=2"] if dry else []
    losses = {}
    with tempfile.TemporaryDirectory() as tmp:
        # dry: one process, where DDP is train.py alone (its test compares FSDP with that)
        for name, extra in [("DDP", []), ("FSDP", ["--fsdp=True"])][dry:]:
            out = Path(tmp) / name
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={nproc}", "train.py", *args, *extra, f"--out_dir={out}"]
            t = time.perf_counter()
            r = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True,
                               env=dict(os.environ, OMP_NUM_THREADS="1"))
            if r.returncode:
                print(f"torchrun {name} failed:\n{r.stderr[-3000:]}")
                return False
            losses[name] = [json.loads(line)["loss"]
                            for line in (out / "log.jsonl").read_text().splitlines()]
            print(f"torchrun {name}, {nproc} processes, {dtype}: {time.perf_counter() - t:.0f} s, "
                  f"losses {losses[name]}", flush=True)
        # the gathered checkpoint, in Hugging Face's layout
        Transformer.from_pretrained(Path(tmp) / "FSDP")
    # FSDP computes with bf16 parameters where DDP has fp32 weights under bf16 autocast
    tol = 1e-4 if dry else 2e-2
    ok = len(losses["FSDP"]) == 4 and (dry or all(
        abs(f - d) <= tol * abs(d) for f, d in zip(losses["FSDP"], losses["DDP"])))
    if not dry:
        print(f"FSDP losses within {tol:g} (relative) of DDP's: {'PASS' if ok else 'FAIL'}",
              flush=True)
    return ok


# peak dense bf16 FLOPS per GPU, for MFU (matched against torch.cuda.get_device_name)
PEAK_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12,
              "A10G": 70e12, "L4": 121e12, "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12}


def measure_mfu(dev, dry, steps=10):
    """Tokens/s and MFU of a bf16 + torch.compile CUT step (train.py's full fine-tune: fp32 weights,
    bf16 autocast, fused AdamW) of a Llama-3.2-1B-shaped model, at the most rows of 1024 tokens that
    step_memory says fit."""
    from cut_loss import batch_loss
    from model import Transformer
    cfg = llama_config(LLAMA_SHAPES["Llama-3.2-1B"],
                       **(dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128,
                               vocab_size=512) if dry else {}))
    seq = 64 if dry else 1024
    free = 0 if dry else torch.cuda.mem_get_info(dev)[1]
    rows = 2 if dry else max(
        [r for r in (2, 4, 8, 16, 32)
         if step_memory(cfg, "full", r, seq, r * seq // 2)["peak"] < 0.85 * free] or [1])
    torch.manual_seed(0)
    model = Transformer(cfg).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    if not dry:
        model.compile_pieces()
    while True:
        idx = torch.randint(0, cfg.vocab_size, (rows, seq), device=dev)
        # the second half of each row is the response
        positions = torch.arange(seq // 2, seq, device=dev).expand(rows, seq // 2)
        targets = idx.roll(-1, 1)[:, seq // 2:]
        mask = torch.ones_like(targets, dtype=torch.float)
        r = torch.arange(rows, device=dev)

        def step():
            with torch.autocast(torch.device(dev).type, dtype=torch.bfloat16):
                logp = model(idx, positions, targets)
                loss, _ = batch_loss("cut", logp, mask, r[0::2], r[1::2], r[0::2] >= 0,
                                     1.5, 1.0, 0.0)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        try:
            for _ in range(3):  # compile and warm up
                step()
            break
        except torch.OutOfMemoryError:
            if rows == 1:
                raise
            rows //= 2
            opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            print(f"out of memory: {rows} rows", flush=True)
    sync = torch.cuda.synchronize if torch.device(dev).type == "cuda" else lambda: None
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    dt = (time.perf_counter() - t) / steps
    blocks = sum(p.numel() for p in model.model.layers.parameters())
    # 6 flops per weight and token (forward + backward), the lm_head at the trained half only,
    # causal attention
    flops = (6 * blocks * rows * seq + 6 * cfg.dim * cfg.vocab_size * rows * seq // 2
             + 6 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq * rows * seq)
    name = "CPU" if dry else torch.cuda.get_device_name(dev)
    peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None) if not dry else None
    mfu = (f"MFU {flops / dt / peak:.1%} of {peak / 1e12:.0f} TFLOPS" if peak
           else "MFU n/a (no peak FLOPS known)")
    print(f"CUT step, {'tiny' if dry else 'Llama-3.2-1B'}-shaped, "
          f"bf16{'' if dry else ' + torch.compile'}, {rows} x {seq} tokens on {name}: "
          f"{dt * 1e3:.0f} ms, {rows * seq / dt:.0f} tokens/s, {mfu}"
          + ("" if dry else f", peak memory {torch.cuda.max_memory_allocated(dev) / 1e9:.1f} GB"),
          flush=True)


def count_compiles(argv):
    """train.main(argv + --compile=True) in this process: (graph breaks, recompiles), from dynamo's
    own logs (TORCH_LOGS=graph_breaks,recompiles)."""
    import logging
    import train
    found = {"graph breaks": 0, "recompiles": 0}

    class Count(logging.Handler):  # records of the loggers "torch._dynamo.<module>.__<name>"
        def emit(self, record):
            message = record.getMessage()
            found["graph breaks"] += record.name.endswith("__graph_breaks") and message.startswith(
                "Graph break")
            found["recompiles"] += record.name.endswith("__recompiles") and message.startswith(
                "Recompiling function")
    torch._logging.set_logs(graph_breaks=True, recompiles=True)
    count = Count()
    logging.getLogger("torch._dynamo").addHandler(count)  # it does not propagate to "torch"
    try:
        train.main([*argv, "--compile=True"])
    finally:
        torch._logging.set_logs()
        logging.getLogger("torch._dynamo").removeHandler(count)
    return found["graph breaks"], found["recompiles"]


def check_compile(dev, data, iters=24):
    """A compiled training run over variable-length triples, a small model from scratch: no graph
    break, and at most 2 recompiles (a block and the lm_head, once each, when shapes change)."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        breaks, recompiles = count_compiles([
            f"--data={data}", "--base_iters=0", f"--max_iters={iters}", "--eval_interval=12",
            "--batch_size=2", "--max_len=512", "--dim=64", "--n_layers=2", "--n_heads=2",
            f"--device={dev}", "--lam=1.5", "--log_interval=1", f"--out_dir={tmp}"])
        ok = breaks == 0 and recompiles <= 2
        ok &= len(Path(tmp, "log.jsonl").read_text().splitlines()) == iters
    print(f"compile, {iters} iterations of {data} on {dev}: {breaks} graph breaks, {recompiles} "
          f"recompiles (goal: 0 and <= 2) {'PASS' if ok else 'FAIL'}", flush=True)
    return ok


def bench_compile(args):
    if not Path(args.data).is_file():
        sys.exit("bench.py: compile needs --data=FILE, triples of varied lengths (the CUT "
                 "authors' online iteration 1)")
    if not check_compile("cuda" if torch.cuda.is_available() else "cpu", args.data):
        sys.exit("bench.py compile: FAIL")


def check_syncs(dev):
    """train.py's training step on CUDA under torch.cuda's sync debug mode: every operation that
    makes the host wait for the GPU warns; the goal is none."""
    import tempfile
    import warnings
    import train
    from support.runs import LOCKS
    from support.settings import configure
    with tempfile.TemporaryDirectory() as tmp:
        cfg = configure(train.Config(), ["--task_size=400", "--dim=64", "--n_layers=2",
                                         "--n_heads=2", "--gradient_accumulation_steps=2",
                                         f"--device={dev}", f"--out_dir={tmp}"], train.CHOICES)
        run = train.set_up(cfg)
        train.train_step(run, 0, cfg)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            train.train_step(run, 1, cfg)
            torch.cuda.set_sync_debug_mode("default")
        LOCKS.pop(Path(tmp).resolve()).close()
    syncs = [str(w.message)[:120] for w in caught if "synchroniz" in str(w.message)]
    print(f"syncs in a training step (2 micro-steps, CUT): {len(syncs)} (goal: 0) "
          f"{'PASS' if not syncs else 'FAIL'} {syncs[:3]}", flush=True)
    return not syncs


def measure_generate(dev, dry, batch=32, new_tokens=128):
    """Generation tokens/s of a Llama-3.2-1B-shaped model in bf16: batch 32, 128 new tokens."""
    from model import Transformer
    cfg = llama_config(LLAMA_SHAPES["Llama-3.2-1B"],
                       **(dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128,
                               vocab_size=512) if dry else {}))
    model = Transformer(cfg).to(dev, torch.bfloat16).eval()
    idx = torch.randint(0, cfg.vocab_size, (batch, 64), device=dev)
    sync = torch.cuda.synchronize if torch.device(dev).type == "cuda" else lambda: None
    model.generate(idx, 8, temperature=1.0)  # warm up
    sync()
    t = time.perf_counter()
    out = model.generate(idx, new_tokens, temperature=1.0)
    sync()
    dt = time.perf_counter() - t
    made = out.shape[1] - idx.shape[1]
    print(f"generate, {'tiny' if dry else 'Llama-3.2-1B'}-shaped, bf16, batch {batch}: "
          f"{batch * made / dt:.0f} tokens/s ({made} tokens a row in {dt:.1f} s)", flush=True)


def bench_gpu(args):
    """One command for a lent GPU (under 10 minutes): bf16 parity with the CPU, torchrun with DDP
    and FSDP, compile without recompiles, no syncs in a step, MFU, generation tokens/s. --dry
    rehearses it on the CPU with tiny shapes, no compile, no sync check."""
    if not args.dry and not torch.cuda.is_available():
        sys.exit("bench.py gpu: no CUDA GPU here; --dry rehearses the same checks on the CPU")
    dev = "cpu" if args.dry else "cuda:0"
    print(f"gpu checks on {'the CPU (dry run)' if args.dry else torch.cuda.get_device_name(0)}",
          flush=True)
    ok = check_bf16_step(dev, args.dry)
    ok &= check_torchrun(dev, args.dry, 1 if args.dry else torch.cuda.device_count())
    if not args.dry:
        ok &= check_compile(dev, "builtin")
        ok &= check_syncs(dev)
    measure_mfu(dev, args.dry)
    measure_generate(dev, args.dry)
    if not ok:
        sys.exit("bench.py gpu: FAIL")


# --------------------------------------------------------------------- generate: decode and batches

def copy_bandwidth(mb=512, rounds=5):
    """The machine's memory bandwidth in bytes/s: a copy of mb MB reads and writes it (STREAM's copy
    counts both); the best of a few rounds."""
    src = torch.ones(mb * 2**20 // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best


def varied_prompts(path, args, n):
    """n varied instructions of a triples file (--data), as ids in the plain Alpaca template."""
    from data import prompt_ids
    from support.tokenizer import Tokenizer
    from support.triple_files import load_triples
    if not args.data:
        sys.exit("bench.py generate: --data=FILE, "
                 "a triples file whose instructions to generate for")
    tok = Tokenizer.from_pretrained(path)
    instructions = list(dict.fromkeys(t.instruction for t in load_triples(args.data, False)))[:n]
    return tok, instructions, [prompt_ids(tok, i) for i in instructions]


def hf_generate(hf, prompts, new_tokens, stop_ids, batch_size):
    """transformers' greedy generate, left-padded batches sorted by length: the new ids per
    prompt."""
    from model import left_pad
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out = [None] * len(prompts)
    for k in range(0, len(order), batch_size):
        rows = order[k:k + batch_size]
        x, pad = left_pad([prompts[i] for i in rows])
        mask = (torch.arange(x.shape[1]) >= pad[:, None]).long()
        new = hf.generate(x, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                          eos_token_id=stop_ids, pad_token_id=stop_ids[0])[:, x.shape[1]:]
        for i, ids in zip(rows, new.tolist()):
            out[i] = ids
    return out


def until_stop(ids, stop_ids):
    return next((ids[:j] for j, t in enumerate(ids) if t in stop_ids), ids)


def bench_generate(args, batch=32, new_tokens=64):
    """Decode at batch 1 as a share of the bandwidth limit; a batch's prefill and generation against
    transformers; eval.py --mode=alpaca as a whole program against transformers' generate alone."""
    from model import left_pad
    path = checkpoint_dir()
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + written, best of 5 copies of 512 MB)")
    tok, instructions, prompts = varied_prompts(path, args, 3 * batch)
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype)[6:]
        ours_model, hf = load_both(path, dtype)
        ours_model.eval(), hf.eval()
        weights = sum(p.numel() * p.element_size() for p in ours_model.parameters())
        ceiling = bandwidth / weights  # a decode step reads every weight once
        x = torch.tensor([prompts[0]])
        timing = lambda f: (lambda: new_tokens / timed_s(f))
        ours = timing(lambda: ours_model.generate(x, new_tokens, temperature=0))
        theirs = timing(lambda: hf.generate(x, do_sample=False, max_new_tokens=new_tokens,
                                            min_new_tokens=new_tokens, pad_token_id=0))
        with torch.no_grad():
            alternate(ours, theirs, 1)
            a, b = alternate(ours, theirs, args.repeats)
        print(f"  {name}: {weights / 1e6:.0f} MB of weights, ceiling {ceiling:.1f} tok/s; ours "
              f"{statistics.median(a) / ceiling:.0%} of it, "
              f"theirs {statistics.median(b) / ceiling:.0%}")
        report(f"decode b1 tok/s {name}", a, b, "tok/s",
               (">= 50% of the ceiling", lambda o, r, c=ceiling: o >= 0.5 * c))
        if dtype != torch.float32:
            continue
        rows = prompts[:batch]
        xb, pad = left_pad(rows)
        mask = (torch.arange(xb.shape[1]) >= pad[:, None]).long()
        ours = lambda: timed_s(lambda: ours_model.generate(xb, 1, temperature=0, pad=pad))
        theirs = lambda: timed_s(lambda: hf.generate(xb, attention_mask=mask, do_sample=False,
                                                     max_new_tokens=1, pad_token_id=0))
        with torch.no_grad():
            a, b = alternate(ours, theirs, args.repeats)
        report(f"prefill s, {batch} prompts of {min(map(len, rows))}-{max(map(len, rows))}", a, b,
               "s", ("<= 1.0x", lambda o, r: r <= 1.0), higher_is_better=False)
        produced = {}

        def throughput(side, generate):
            seconds = timed_s(lambda: produced.__setitem__(side, generate()))
            return sum(len(until_stop(ids, tok.stop_ids)) for ids in produced[side]) / seconds
        ours = lambda: throughput("ours", lambda: ours_model.generate(
            xb, new_tokens, temperature=0, stop_ids=tok.stop_ids,
            pad=pad)[:, xb.shape[1]:].tolist())
        theirs = lambda: throughput(
            "theirs", lambda: hf_generate(hf, rows, new_tokens, tok.stop_ids, batch))
        with torch.no_grad():
            a, b = alternate(ours, theirs, args.repeats)
        report(f"generate new tok/s, batch {batch}", a, b, "tok/s",
               (">= 1.5x", lambda o, r: r >= 1.5))
        with torch.no_grad():
            theirs_s = timed_s(lambda: produced.__setitem__(
                "alpaca", hf_generate(hf, prompts, new_tokens, tok.stop_ids, batch)))
        alpaca_vs_transformers(path, args, tok, instructions, produced["alpaca"], theirs_s, batch,
                               new_tokens)


def timed_s(f):
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def alpaca_vs_transformers(path, args, tok, instructions, theirs_ids, theirs_s, batch, new_tokens):
    """eval.py --mode=alpaca, the whole program (model load included), against transformers'
    generate alone on the same instructions; the share of answers equal on their first 100 chars."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp, "instructions.json")
        file.write_text(json.dumps([{"instruction": i} for i in instructions]))
        out = Path(tmp, "outputs.json")
        cmd = [sys.executable, "eval.py", "--mode=alpaca", f"--ckpt={path}",
               f"--alpaca_file={file}", f"--out_file={out}", "--chat=no", f"--batch_size={batch}",
               f"--max_new_tokens={new_tokens}", "--device=cpu"]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        t = time.perf_counter()
        r = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, env=env)
        ours_s = time.perf_counter() - t
        if r.returncode:
            sys.exit(f"bench.py: eval.py failed:\n{r.stderr[-2000:]}")
        ours = [o["output"] for o in json.loads(out.read_text())]
    theirs = [tok.decode(until_stop(ids, tok.stop_ids)) for ids in theirs_ids]
    agree = sum(o[:100] == t[:100] for o, t in zip(ours, theirs)) / len(ours)
    print(f"  eval.py --mode=alpaca, {len(ours)} instructions, batch {batch}, {new_tokens} new "
          f"tokens, fp32: {ours_s:.1f} s as a whole program; transformers' generate alone "
          f"{theirs_s:.1f} s; {agree:.0%} of the answers equal on their first 100 characters")
    report("alpaca whole program s", [ours_s], [theirs_s], "s", ("<= 1.0x", lambda o, r: r <= 1.0),
           higher_is_better=False)
    report("answers equal (100 chars)", [agree], [1.0], "", (">= 90%", lambda o, r: o >= 0.9))


# ---------------------------------------------------------------------- sections: add new ones here

BENCHMARKS = {"model": bench_model, "train": bench_train, "memory": bench_memory, "gpu": bench_gpu,
              "generate": bench_generate, "compile": bench_compile}

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("section", choices=sorted(BENCHMARKS))
    parser.add_argument("--parts", default=",".join(MODEL_PARTS),
                        help="model: a comma-separated subset of the parts")
    parser.add_argument("--repeats", type=int, default=5, help="rounds of each in-process timing")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads, the same for ours and theirs")
    parser.add_argument("--profile", action="store_true",
                        help="model fwd_bwd: also print a torch.profiler table per side")
    parser.add_argument("--no_measure", action="store_true",
                        help="memory: the table only, no CPU measurement")
    parser.add_argument("--dry", action="store_true",
                        help="gpu: rehearse on the CPU, tiny shapes, no compile")
    parser.add_argument("--data", default="",
                        help="train, generate, compile: a triples file (the CUT authors' "
                        "online iteration 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(HERE))  # the project's modules, also when run as scripts/bench.py
    start, load_avg = time.perf_counter(), os.getloadavg()[0]
    BENCHMARKS[args.section](args)
    print(f"\n{args.section}: {time.perf_counter() - start:.0f} s, "
          f"{args.threads} torch threads on {os.cpu_count()} cores, "
          f"1-min load average {load_avg:.1f} at the start and {os.getloadavg()[0]:.1f} at the end")
    if ROWS and load_avg > os.cpu_count() - args.threads + 0.5:
        # a busy core stalls every parallel region of a multi-threaded op: medians then measure the
        # neighbours
        print("WARNING: other processes were using the cores this run needs; "
              "if the spreads are large, trust 'best o/t' or rerun with --threads 1")
    if ROWS:
        print_table()
