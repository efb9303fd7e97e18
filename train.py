"""Train a LLaMA-family model with CUT (or a baseline) on judgment triples: one CPU, one GPU, or torchrun DDP.

    python train.py                                   # the built-in task: an MLE base model, then CUT (out/)
    python train.py --init_from=DIR --data=FILE --lora_rank=16
    torchrun --nproc_per_node=8 train.py run.json     # a JSON config file, then --key=value flags

data.py turns triples into batches of sequences, model.py gives logits, cut_loss.py the loss; this file is the
loop: AdamW with a cosine schedule, gradient accumulation, autocast, DDP, LoRA, atomic checkpoints and --resume.
"""
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

# before torch loads OpenMP: its spinning threads made small CPU ops up to 20x slower on 2 cores (measured)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from cut_loss import LOSS_MODES, batch_loss, response_logprobs
from data import Tokenizer, collate, configure, encode_triples, load_triples, make_task, split_triples, use_chat
from model import ModelConfig, Transformer, add_lora

# ----------------------------------------------------------------------------- config (--key=value overrides)
out_dir = "out"
init_from = "scratch"   # 'scratch' or a checkpoint directory (Hugging Face, Meta, or this project's out_dir)
data = "builtin"        # a triples file (.json / .jsonl), or 'builtin': the built-in judgment task
loss = "cut"            # cut, sft, sft_all, hindsight, forward
lam = 1.1               # token detection threshold: U = {t : p_n(t) - lam * p_p(t) > 0}
alpha = 1.0             # unlikelihood weight
gamma = 0.0             # dynamic weighting exponent (0: the authors' code)
j_pos = ""              # an explicit positive judgment j+; '' = no judgment (the authors' choice)
chat = "auto"           # prompt format: 'auto' (the chat format for instruct checkpoints), 'yes', 'no'
max_iters = 200
batch_size = 16         # triples per micro-step
gradient_accumulation_steps = 1  # micro-steps per iteration, over all processes together
learning_rate = 3e-4
warmup_iters = 20
min_lr = 3e-5
weight_decay = 0.0
grad_clip = 1.0
lora_rank = 0           # 0 = full fine-tune
lora_alpha = 16.0
lora_targets = "gate_proj,up_proj,down_proj"  # the authors' choice
dtype = "float32"       # 'float32', 'bfloat16' (autocast), 'float16' (autocast + GradScaler)
compile = False
device = "cuda" if torch.cuda.is_available() else "cpu"
seed = 1337
eval_interval = 100
log_interval = 10
max_len = 512           # tokens per sequence; longer prompts are cut from the left
val_frac = 0.05
resume = False
# the built-in task, and the model trained from scratch for it
task_size = 12000
task_flawed = 0.65      # share of flawed responses in the task's fine-tuning data
base_iters = 800        # 'builtin' from scratch: first train an MLE base on the task's responses (out_dir/base)
base_lr = 2e-3
base_flawed = 0.5       # the base's data: the 5- and 6-letter lists flawed, a rule a tiny model learns (random: it fails)
n_layers = 4
n_heads = 4
dim = 128
CONFIG_KEYS = [k for k, v in list(globals().items()) if not k.startswith("_") and isinstance(v, (int, float, str, bool))]
# peak dense bf16 FLOPS per GPU, for MFU (matched against torch.cuda.get_device_name)
PEAK_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12,
              "L4": 121e12, "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12}


def lr_at(it, cfg):
    """Linear warmup, then cosine decay from learning_rate to min_lr at max_iters."""
    if it < cfg["warmup_iters"]:
        return cfg["learning_rate"] * (it + 1) / (cfg["warmup_iters"] + 1)
    ratio = min(1.0, (it - cfg["warmup_iters"]) / max(1, cfg["max_iters"] - cfg["warmup_iters"]))
    return cfg["min_lr"] + 0.5 * (1 + math.cos(math.pi * ratio)) * (cfg["learning_rate"] - cfg["min_lr"])


def micro_batches(encoded, it, cfg, rank, world):
    """The micro-batches this process runs at iteration `it`: a function of (seed, it) alone, so that any number of
    processes sees the same triples per iteration and --resume needs only the iteration number."""
    per_iter = cfg["batch_size"] * cfg["gradient_accumulation_steps"]
    start = it * per_iter
    epoch, chosen = start // len(encoded), []
    while len(chosen) < per_iter:  # walk a fresh permutation for each epoch
        perm = torch.randperm(len(encoded), generator=torch.Generator().manual_seed(cfg["seed"] + epoch)).tolist()
        offset = start + len(chosen) - epoch * len(encoded)
        chosen += perm[offset:offset + per_iter - len(chosen)]
        epoch += 1
    # group similar lengths into the same micro-batch: less padding, same triples per iteration
    chosen.sort(key=lambda i: max(len(p) + len(t) for p, t in encoded[i].rows))
    steps = [chosen[m * cfg["batch_size"]:(m + 1) * cfg["batch_size"]] for m in range(cfg["gradient_accumulation_steps"])]
    return [[encoded[i] for i in step] for step in steps[rank::world]]


def forward_loss(model, encoded, cfg, pad_id, dev, autocast):
    """One batched forward of every sequence of these triples -> (loss, stats, tokens processed)."""
    batch = collate(encoded, pad_id).to(dev)
    logp_pos = None
    with autocast:
        if batch.pos_idx is not None:  # an explicit j+ costs a pass of its own, without gradient
            with torch.no_grad():
                logp_pos = response_logprobs(model(batch.pos_idx, keep=batch.pos_targets != -100), batch.pos_targets)[0]
        logp, mask = response_logprobs(model(batch.idx, keep=batch.targets != -100), batch.targets)
        loss, stats = batch_loss(cfg["loss"], logp, mask, batch.x_rows, batch.j_rows, batch.is_neg,
                                 cfg["lam"], cfg["alpha"], cfg["gamma"], logp_pos)
    return loss, stats, int((batch.idx != pad_id).sum())


def save_checkpoint(raw, tok, state, out):
    """Write into out/.ckpt-new, mark it complete, then move each file into out: a kill at any point leaves either
    the old checkpoint or a complete new one that finish_checkpoint moves in on the next start."""
    tmp = out / ".ckpt-new"
    shutil.rmtree(tmp, ignore_errors=True)
    raw.save_pretrained(tmp)
    tok.save(tmp)
    torch.save(state, tmp / "train_state.pt")
    (tmp / "COMPLETE").touch()
    finish_checkpoint(out)


def finish_checkpoint(out):
    tmp = out / ".ckpt-new"
    if (tmp / "COMPLETE").exists():
        for f in sorted(tmp.iterdir()):
            if f.name != "COMPLETE":
                os.replace(f, out / f.name)
    shutil.rmtree(tmp, ignore_errors=True)


def load_data(cfg, tok, chat, master):
    """(train, val) lists of Encoded triples for the configured loss mode."""
    if cfg["data"] == "builtin":
        triples = make_task(cfg["task_size"], seed=cfg["seed"], flawed_frac=cfg["task_flawed"])
    else:
        triples = load_triples(cfg["data"], verbose=master)
    train_t, val_t = split_triples(triples, cfg["val_frac"], cfg["seed"])
    enc = lambda ts: encode_triples(tok, ts, cfg["loss"], cfg["max_len"], chat, cfg["j_pos"] or None, verbose=master)
    train_e, val_e = enc(train_t), enc(val_t)
    if not train_e:
        raise ValueError(f"{cfg['data']}: no triples left to train on with loss={cfg['loss']}"
                         + (" (sft trains on acceptable triples only, and every triple here is flawed)" if cfg["loss"] == "sft" else ""))
    return train_e, val_e


def train(cfg):
    """Run one training job described by cfg (the config dict); returns the output directory."""
    if cfg["loss"] not in LOSS_MODES:
        raise ValueError(f"unknown loss {cfg['loss']!r}; expected one of {', '.join(LOSS_MODES)}")
    if cfg["dtype"] not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"unknown dtype {cfg['dtype']!r}; expected float32, bfloat16 or float16")
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    master = rank == 0
    dev = f"cuda:{os.environ['LOCAL_RANK']}" if ddp and cfg["device"].startswith("cuda") else cfg["device"]
    try:
        dev_type = torch.device(dev).type
    except RuntimeError:
        raise ValueError(f"unknown device {dev!r}") from None
    if dev_type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {dev!r}, but torch sees no CUDA GPU here")
    if cfg["gradient_accumulation_steps"] % world:
        raise ValueError(f"gradient_accumulation_steps={cfg['gradient_accumulation_steps']} does not divide among "
                         f"{world} processes (it counts micro-steps over all of them)")
    torch.manual_seed(cfg["seed"])
    out = Path(cfg["out_dir"])
    if master:
        out.mkdir(parents=True, exist_ok=True)
        finish_checkpoint(out)
    if ddp:  # the other ranks read the checkpoint only once rank 0 has finished an interrupted save
        dist.barrier()
    scratch = cfg["init_from"] == "scratch"
    tok = Tokenizer.byte_level() if scratch else Tokenizer.from_pretrained(cfg["init_from"])
    chat = use_chat(tok, cfg["chat"])
    train_e, val_e = load_data(cfg, tok, chat, master)

    # the model: from scratch, or a checkpoint; LoRA adapters on a frozen base in the training dtype
    pt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg["dtype"]]
    state = torch.load(out / "train_state.pt", map_location="cpu", weights_only=True) if cfg["resume"] else None
    if scratch and not (state and not cfg["lora_rank"]):
        model = Transformer(ModelConfig(dim=cfg["dim"], n_layers=cfg["n_layers"], n_heads=cfg["n_heads"],
                                        n_kv_heads=cfg["n_heads"], vocab_size=tok.n_vocab, hidden_dim=3 * cfg["dim"],
                                        max_seq_len=cfg["max_len"] + 1)).to(dev)
    else:  # a resumed full fine-tune continues from its own checkpoint; LoRA from its base plus saved adapters
        src = out if state and not cfg["lora_rank"] else cfg["init_from"]
        model = Transformer.from_pretrained(src, dtype=pt if cfg["lora_rank"] else torch.float32, device=dev)
    if cfg["lora_rank"]:
        add_lora(model, cfg["lora_rank"], cfg["lora_alpha"], tuple(cfg["lora_targets"].split(",")))
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # adapters train in fp32 on the low-precision frozen base
    params = [p for p in model.parameters() if p.requires_grad]
    if state and cfg["lora_rank"]:
        with torch.no_grad():
            for p, saved in zip(params, state["trainable"]):
                p.copy_(saved)
    decay = [p for p in params if p.dim() >= 2]  # no weight decay on norms (and biases)
    groups = [{"params": decay, "weight_decay": cfg["weight_decay"]},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=cfg["learning_rate"], betas=(0.9, 0.95), fused=dev_type in ("cuda", "cpu"))
    scaler = torch.amp.GradScaler(dev_type, enabled=cfg["dtype"] == "float16")
    start_iter = 0
    if state:
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
        start_iter = state["iter"]
    raw = model
    if cfg["compile"]:
        model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[torch.device(dev).index] if dev_type == "cuda" else None)
    autocast = torch.autocast(dev_type, dtype=pt) if pt != torch.float32 else nullcontext()
    pad_id = tok.eos_id
    steps_here = cfg["gradient_accumulation_steps"] // world
    flops_per_token = 6 * sum(p.numel() for p in raw.parameters())  # + attention, small at these lengths
    peak = next((v for k, v in PEAK_FLOPS.items() if dev_type == "cuda" and k in torch.cuda.get_device_name(dev)), None)

    def evaluate():
        raw.eval()
        with torch.no_grad():
            losses = [forward_loss(raw, val_e[i:i + cfg["batch_size"]], cfg, pad_id, dev, autocast)[0].item()
                      for i in range(0, min(len(val_e), 20 * cfg["batch_size"]), cfg["batch_size"])]
        raw.train()
        return sum(losses) / max(len(losses), 1)

    log = open(out / "log.jsonl", "a") if master else None
    bar = tqdm(range(start_iter, cfg["max_iters"]), initial=start_iter, total=cfg["max_iters"], disable=not master,
               desc=f"{cfg['loss']} {out}", dynamic_ncols=True)
    warned, t0, tokens = False, time.time(), 0
    for it in bar:
        for g in optimizer.param_groups:
            g["lr"] = lr_at(it, cfg)
        sums = torch.zeros(2, device=dev)  # loss and frac_unlikely, summed over micro-steps
        for m, encoded in enumerate(micro_batches(train_e, it, cfg, rank, world)):
            if ddp:  # synchronise gradients on the last micro-step only
                model.require_backward_grad_sync = m == steps_here - 1
            loss, stats, n = forward_loss(model, encoded, cfg, pad_id, dev, autocast)
            scaler.scale(loss / steps_here).backward()
            sums += torch.stack([loss.detach().float(), torch.as_tensor(stats["frac_unlikely"], device=dev, dtype=torch.float)])
            tokens += n
        if cfg["grad_clip"]:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"])
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if ddp:
            dist.all_reduce(sums)
        loss_val, frac = (sums / cfg["gradient_accumulation_steps"]).tolist()
        last = it == cfg["max_iters"] - 1
        if it % cfg["log_interval"] == 0 or last:
            dt = time.time() - t0
            record = {"iter": it, "loss": round(loss_val, 5), "frac_unlikely": round(frac, 4), "lr": lr_at(it, cfg),
                      "tok_per_s": round(tokens * world / dt)}
            if peak:
                record["mfu"] = round(flops_per_token * tokens * world / dt / (peak * world), 4)
            if (it % cfg["eval_interval"] == 0 or last) and master:
                record["val_loss"] = round(evaluate(), 5)  # after the timing: tokens/s counts training alone
            bar.set_postfix({k: v for k, v in record.items() if k in ("loss", "frac_unlikely", "tok_per_s", "mfu", "val_loss")})
            if master:
                log.write(json.dumps(record) + "\n")
                log.flush()
            t0, tokens = time.time(), 0
        if frac > 0.5 and not warned and master:
            tqdm.write(f"warning: frac_unlikely = {frac:.2f}: token detection flags most flawed tokens; "
                       f"raise lam (now {cfg['lam']}) so that U holds only the tokens the judgment explains")
            warned = True
        if master and (last or (it + 1) % cfg["eval_interval"] == 0):
            save_checkpoint(raw, tok, {"iter": it + 1, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                                       "rng": torch.get_rng_state(), "config": cfg,
                                       "trainable": [p.detach().cpu() for p in params] if cfg["lora_rank"] else []}, out)
    if master:
        log.close()
    return out


def main(argv):
    cfg = configure({k: globals()[k] for k in CONFIG_KEYS}, argv)
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        dist.init_process_group("nccl" if cfg["device"].startswith("cuda") else "gloo")
    try:
        if cfg["data"] == "builtin" and cfg["init_from"] == "scratch" and cfg["base_iters"]:
            # CUT is a fine-tuning method (evidence-notes.md): first an MLE base that learns the task and its mistake
            base = dict(cfg, out_dir=str(Path(cfg["out_dir"]) / "base"), loss="sft_all", max_iters=cfg["base_iters"],
                        learning_rate=cfg["base_lr"], min_lr=cfg["base_lr"] / 10, seed=cfg["seed"] + 1,
                        task_flawed=cfg["base_flawed"])
            # --resume goes on with whichever phase was killed (a finished base resumes to no work)
            has_state = lambda d: cfg["resume"] and (Path(d) / "train_state.pt").exists()
            train(dict(base, resume=has_state(base["out_dir"])))
            cfg = dict(cfg, init_from=base["out_dir"], resume=has_state(cfg["out_dir"]))
        train(cfg)
    finally:
        if ddp:
            dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"train.py: {e}")
