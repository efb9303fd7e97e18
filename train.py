"""Train a LLaMA-family model with CUT (or a baseline) on judgment triples: one CPU or GPU, or
torchrun with DDP or FSDP.

    python train.py                               # the built-in task: an MLE base, then CUT (out/)
    python train.py --init_from=DIR --data=FILE --lora_rank=16
    torchrun --nproc_per_node=8 train.py run.json # a JSON config file, then --key=value flags

data.py turns triples into batches, model.py gives log-probs, cut_loss.py the loss; this file is
the loop: AdamW, a warmup then a constant or cosine rate, accumulation, autocast, DDP or FSDP, LoRA,
activation checkpointing, atomic checkpoints, --resume, a clean stop on Ctrl-C or SIGTERM.
"""
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

# before torch loads OpenMP: its spinning threads made small CPU ops up to 20x slower on 2 cores
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch.distributed as dist
import torch.distributed.checkpoint.state_dict as dist_sd
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from cut_loss import batch_loss
from data import (LOSS_MODES, PAIRED, collate, encode_triples, load_checkpoint, split_triples,
                  use_chat)
from model import ModelConfig, Transformer, add_lora, lora_disabled, rope_frequencies
from support.runs import LOCKS, RUN_FILES, base_stamp, finite, open_run, report, save_checkpoint
from support.checkpoint import read_checkpoint
from support.settings import configure, run_program
from support.tokenizer import Tokenizer
from support.triple_files import data_hash, load_triples
from tasks.letters import make_task


@dataclass
class Config:  # every key can be set by --key=value or a JSON config file
    out_dir: str = "out"
    init_from: str = "scratch"    # 'scratch' or a checkpoint: Hugging Face, Meta, an out_dir
    data: str = "builtin"         # a triples file (.json, .jsonl), or 'builtin': the built-in task
    loss: str = "cut"             # cut, sft, sft_all, hindsight, forward, ilf_mle, ilf_dpo, dpo
    lam: float = 2.0              # token detection: U = {t : p_n(t) - lam * p_x(t) > 0} (Eq. 5)
    alpha: float = 1.0            # unlikelihood weight
    gamma: float = 0.0            # dynamic weighting exponent, paper Eq. 6 (0: the authors' code)
    beta: float = 0.1             # dpo, ilf_dpo: the strength of the pull towards the reference
    chat: str = "auto"            # prompt format: 'auto' (chat format if instruct), 'yes', 'no'
    max_iters: int = 200          # the built-in run within 5 min on 2 CPU cores
    batch_size: int = 16          # triples per micro-step, on average (balanced by tokens)
    gradient_accumulation_steps: int = 1  # micro-steps per iteration, over all processes together
    learning_rate: float = 3e-4
    warmup_iters: int = 10
    decay_lr: bool = False        # after warmup: a cosine decay to min_lr, or a constant rate
    min_lr: float = 1e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0        # 0 = off
    lora_rank: int = 0            # 0 = full fine-tune
    lora_alpha: float = 16.0
    lora_targets: str = "gate_proj,up_proj,down_proj"  # the authors' choice
    # 'float32', 'bfloat16' (autocast, fp32 master weights), 'float16' (+ GradScaler)
    dtype: str = "bfloat16" if torch.cuda.is_available() else "float32"
    compile: bool = False
    fsdp: bool = False            # torchrun: shard weights, gradients and AdamW state (FSDP2)
    grad_ckpt: bool = False       # keep each block's input only, recompute the rest in backward
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    seed: int = 1337
    eval_interval: int = 100      # iterations between validation losses and checkpoints
    log_interval: int = 10
    max_len: int = 512            # tokens per sequence; longer prompts are cut from the left
    val_frac: float = 0.05
    resume: bool = False          # go on from out_dir's checkpoint (only max_iters may grow)
    overwrite: bool = False       # start afresh in an out_dir that holds a run, deleting that run
    # the built-in task (data='builtin'), and the model trained from scratch for it
    task: str = "mixed"           # 'mixed' (25% flawed) or 'new' (a new format, all flawed)
    task_size: int = 12000
    base_iters: int = 800         # from scratch: first an MLE base on the base data, out_dir/base
    base_lr: float = 2e-3
    n_layers: int = 2
    n_heads: int = 4
    dim: int = 128


CHOICES = {"loss": LOSS_MODES, "task": ("mixed", "new")}
GRACE_S = 5  # seconds in which a second Ctrl-C or SIGTERM is the first one again
# how long the others wait in a collective while rank 0 saves: past NCCL's 10 minutes at 8B
SAVE_TIMEOUT = timedelta(minutes=60)


def base_config(cfg):
    """The built-in task's base: MLE on every response of the base data, from scratch."""
    return replace(cfg, out_dir=str(Path(cfg.out_dir) / "base"), loss="sft_all",
                   max_iters=cfg.base_iters, learning_rate=cfg.base_lr, decay_lr=True,
                   min_lr=cfg.base_lr / 10, warmup_iters=20, seed=cfg.seed + 1, task="base",
                   lora_rank=0)


def lr_at(it, cfg):
    """Linear warmup, then learning_rate, or with decay_lr a cosine decay to min_lr at max_iters."""
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if not cfg.decay_lr:
        return cfg.learning_rate
    ratio = min(1.0, (it - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters))
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def micro_batches(encoded, it, cfg, rank, world):
    """The micro-batches this process runs at iteration `it`: a function of (seed, it) alone, so
    that any number of processes sees the same triples per iteration and --resume needs only it."""
    per_iter = cfg.batch_size * cfg.gradient_accumulation_steps
    start = it * per_iter
    epoch = start // len(encoded)
    chosen = []
    while len(chosen) < per_iter:  # walk a fresh permutation for each epoch
        generator = torch.Generator().manual_seed(cfg.seed + epoch)
        perm = torch.randperm(len(encoded), generator=generator).tolist()
        offset = start + len(chosen) - epoch * len(encoded)
        chosen += perm[offset:offset + per_iter - len(chosen)]
        epoch += 1
    # balance the micro-steps by padded tokens (rows x longest row): the longest triples first,
    # each into the micro-step it grows least. Counts differ; train_step weighs each by its count
    longest = lambda e: max(len(p) + len(t) for p, t in e.rows)
    steps = [[] for _ in range(cfg.gradient_accumulation_steps)]
    for e in sorted((encoded[i] for i in chosen), key=longest, reverse=True):
        rows = lambda step: sum(len(s.rows) for s in step) + len(e.rows)
        min(steps, key=lambda step: rows(step) * longest((step or [e])[0])).append(e)
    return steps[rank::world]  # the same micro-steps for any number of processes


def forward_loss(model, encoded, cfg, pad_id, dev, autocast, ref=None):
    """One batched forward of every sequence of these triples: (loss, stats, tokens processed).
    ref: DPO's reference model, a function of (idx, positions, targets) like the model."""
    batch = collate(encoded, pad_id).to(dev)
    with autocast:
        logp = model(batch.idx, batch.positions, batch.targets)
        ref_logp = None if ref is None else ref(batch.idx, batch.positions, batch.targets)
        loss, stats = batch_loss(cfg.loss, logp, batch.mask, batch.x_rows, batch.j_rows,
                                 batch.is_neg, cfg.lam, cfg.alpha, cfg.gamma, ref_logp, cfg.beta)
    return loss, stats, batch.n_tokens


def load_data(cfg, tok, chat, master):
    """(train, val) lists of Encoded triples for the configured loss mode."""
    if cfg.data == "builtin":
        triples = make_task(cfg.task_size, seed=cfg.seed, kind=cfg.task)
    else:
        triples = load_triples(cfg.data, verbose=master)
    train_t, val_t = split_triples(triples, cfg.val_frac, cfg.seed)
    enc = lambda ts: encode_triples(tok, ts, cfg.loss, cfg.max_len, chat, verbose=master)
    train_e = enc(train_t)
    if not train_e:
        why = " (sft: only acceptable triples; all here are flawed)" if cfg.loss == "sft" else ""
        raise ValueError(f"{cfg.data}: no triples left to train on with loss={cfg.loss}{why}")
    return train_e, enc(val_t)


def check_settings(cfg, ddp, world):
    """The settings that no single key's rule can judge, checked before anything is read."""
    if cfg.gradient_accumulation_steps % world:
        raise ValueError(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} does not "
                         f"divide among {world} processes (it counts micro-steps over all of them)")
    if cfg.fsdp and (not ddp or cfg.lora_rank or cfg.compile or cfg.dtype == "float16"):
        raise ValueError("fsdp=True shards a full fine-tune over torchrun's processes, in float32 "
                         "or bfloat16, without compile; for LoRA use DDP (the adapters are small)")
    if cfg.lora_rank and cfg.init_from == "scratch":
        raise ValueError("lora_rank > 0 needs a pretrained init_from: adapters on random frozen "
                         "weights learn nothing")
    if cfg.loss in PAIRED and (cfg.init_from == "scratch" or cfg.fsdp):
        raise ValueError(f"loss={cfg.loss} needs an init_from, the reference model, and no fsdp "
                         "(the reference would be a second, unsharded copy; use LoRA or DDP)")
    if cfg.init_from != "scratch" and not Path(cfg.init_from).is_dir():  # before out_dir is made
        raise FileNotFoundError(f"{cfg.init_from}: no such checkpoint directory")
    if cfg.data != "builtin" and not Path(cfg.data).is_file():
        raise FileNotFoundError(f"data {cfg.data}: no such triples file")


def build_model(cfg, state, dev, master):
    """(model, tokenizer): from scratch, or a checkpoint. A resumed full fine-tune goes on from its
    own checkpoint, LoRA from its base (its adapters come back later). FSDP: every process builds
    the model on the meta device and shards it; rank 0 alone reads the weights and sends them."""
    src = cfg.out_dir if state and not cfg.lora_rank else cfg.init_from
    if src == "scratch":
        tok = Tokenizer.byte_level()
        model_cfg = ModelConfig(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                                n_kv_heads=cfg.n_heads, vocab_size=tok.n_vocab,
                                hidden_dim=3 * cfg.dim, max_seq_len=cfg.max_len + 1)
        model = Transformer(model_cfg)  # seeded: the same in every process
    elif master or not cfg.fsdp:
        # LoRA's frozen base in the training dtype; a full fine-tune keeps fp32 master weights
        dtype = getattr(torch, cfg.dtype) if cfg.lora_rank else torch.float32
        model, tok = load_checkpoint(src, dtype=dtype, device="cpu" if cfg.fsdp else dev)
        model_cfg = model.cfg
    else:  # the shapes only: no weights read
        model_cfg = ModelConfig(**read_checkpoint(src)[0])
        tok = Tokenizer.from_pretrained(src)
    if cfg.max_len > model_cfg.max_seq_len:
        raise ValueError(f"max_len {cfg.max_len} exceeds the model's max_seq_len "
                         f"{model_cfg.max_seq_len}")
    if cfg.fsdp:
        full = model.state_dict() if master else {}
        with torch.device("meta"):
            model = Transformer(model_cfg)
        # a shard group per block, the root for the rest; gradients reduced in fp32;
        # cast_forward_inputs=False: RoPE's cos and sin stay fp32, as under autocast
        mp = MixedPrecisionPolicy(param_dtype=getattr(torch, cfg.dtype),
                                  reduce_dtype=torch.float32, cast_forward_inputs=False)
        for block in model.model.layers:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        model.to_empty(device=dev)
        model.inv_freq = rope_frequencies(model_cfg).to(dev)  # a buffer to_empty left unset
        options = dist_sd.StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        dist_sd.set_model_state_dict(model, full, options=options)
    model.grad_ckpt = cfg.grad_ckpt
    return model.to(dev), tok


def trainable_params(model, cfg, state):
    """The parameters AdamW trains: every one, or LoRA's adapters (fp32 on a low-precision base)."""
    if cfg.lora_rank:
        add_lora(model, cfg.lora_rank, cfg.lora_alpha, tuple(cfg.lora_targets.split(",")))
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    params = [p for p in model.parameters() if p.requires_grad]
    if state and cfg.lora_rank:
        with torch.no_grad():
            for p, saved in zip(params, state["trainable"]):
                p.copy_(saved)
    return params


def reference_model(cfg, raw, dev):
    """DPO's reference, the model training started from: with LoRA the model itself with its
    adapters off, else a frozen copy read from init_from. None for the other losses."""
    if cfg.loss not in PAIRED:
        return None
    if cfg.lora_rank:
        def adapters_off(idx, positions, targets):
            with lora_disabled(raw), torch.no_grad():
                return raw(idx, positions, targets)
        return adapters_off
    ref, _ = load_checkpoint(cfg.init_from, dtype=torch.float32, device=dev)
    return ref.eval().requires_grad_(False)  # frozen: its forward records no graph


FULL = dist_sd.StateDictOptions(full_state_dict=True, cpu_offload=True)  # on rank 0's CPU (FSDP)


def build_optimizer(model, params, cfg, state, dev):
    """AdamW (no weight decay on norms and biases) and float16's GradScaler, restored from state."""
    decay = [p for p in params if p.dim() >= 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, 0.95), fused=True)
    scaler = torch.amp.GradScaler(torch.device(dev).type, enabled=cfg.dtype == "float16")
    if state:
        dist_sd.set_optimizer_state_dict(model, optimizer, state["optimizer"], options=FULL)
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
    return optimizer, scaler


def set_up(cfg):
    """Check the settings and out_dir, then build what the loop needs: run.model is what it calls
    (in DDP), run.raw the module itself, for evaluation and checkpoints."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank = dist.get_rank() if ddp else 0
    world = dist.get_world_size() if ddp else 1
    dev = cfg.device
    if ddp and cfg.device.startswith("cuda"):
        dev = f"cuda:{os.environ['LOCAL_RANK']}"
    check_settings(cfg, ddp, world)
    torch.manual_seed(cfg.seed)
    state = open_run(cfg, rank == 0)
    model, tok = build_model(cfg, state, dev, rank == 0)
    chat = use_chat(tok, cfg.chat)  # recorded in the run's tokenizer_config.json: 'auto' follows it
    config = json.loads(tok.files.get("tokenizer_config.json", b"{}"))
    tok.files["tokenizer_config.json"] = json.dumps(dict(config, cut_chat=chat)).encode()
    train_e, val_e = load_data(cfg, tok, chat, rank == 0)
    params = trainable_params(model, cfg, state)
    optimizer, scaler = build_optimizer(model, params, cfg, state, dev)
    raw = model
    if cfg.compile:
        raw.compile_pieces()
    if ddp and not cfg.fsdp:  # gradients as views of DDP's buckets: no second copy of them
        device_ids = [dev] if torch.device(dev).type == "cuda" else None
        model = DDP(model, device_ids=device_ids, gradient_as_bucket_view=True)
    autocast = nullcontext()
    if cfg.dtype != "float32":
        autocast = torch.autocast(torch.device(dev).type, dtype=getattr(torch, cfg.dtype))
    return SimpleNamespace(model=model, raw=raw, ref=reference_model(cfg, raw, dev), tok=tok,
                           params=params, optimizer=optimizer, scaler=scaler, train_e=train_e,
                           val_e=val_e, start_iter=state["iter"] if state else 0,
                           data_sha256=data_hash(cfg.data), dev=dev, rank=rank, world=world,
                           autocast=autocast, base_stamp=base_stamp(cfg))


def train_step(run, it, cfg):
    """One iteration: forward and backward of this process's micro-batches, then one AdamW step.
    Returns (loss, frac_unlikely) of this process's share of the iteration, and tokens processed."""
    for g in run.optimizer.param_groups:
        g["lr"] = lr_at(it, cfg)
    steps = micro_batches(run.train_e, it, cfg, run.rank, run.world)
    # a micro-step weighs by its share of the iteration's triples: the mean over all, however sized
    per_iter = cfg.batch_size * cfg.gradient_accumulation_steps
    sums = torch.zeros(2, device=run.dev)
    tokens = 0
    for m, encoded in enumerate(steps):
        # DDP synchronises gradients on the last micro-step only; FSDP reduce-scatters each one, as
        # torchtitan does: skipping would hold every layer's unsharded gradient (16 GB at 8B)
        if isinstance(run.model, DDP):
            run.model.require_backward_grad_sync = m == len(steps) - 1
        loss, stats, n = forward_loss(run.model, encoded, cfg, run.tok.eos_id, run.dev,
                                      run.autocast, run.ref)
        share = len(encoded) * run.world / per_iter
        run.scaler.scale(loss * share).backward()
        sums += torch.stack([loss.detach().float(), stats["frac_unlikely"]]) * share
        tokens += n
    run.scaler.unscale_(run.optimizer)
    # the gradient norm (unclipped at grad_clip 0): a non-finite one makes the loss NaN, a stop
    norm = torch.nn.utils.clip_grad_norm_(run.params, cfg.grad_clip or math.inf)
    if not run.scaler.is_enabled():  # float16's scaler skips the steps with inf gradients itself
        sums[0] += 0 * (norm.full_tensor() if cfg.fsdp else norm)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    return sums, tokens


def evaluate(run, cfg):
    """The mean loss of up to 20 batches of the validation triples."""
    run.raw.eval()
    losses = []
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):  # no recompile for no_grad
        for i in range(0, min(len(run.val_e), 20 * cfg.batch_size), cfg.batch_size):
            batch = run.val_e[i:i + cfg.batch_size]
            loss = forward_loss(run.raw, batch, cfg, run.tok.eos_id, run.dev, run.autocast,
                                run.ref)[0]
            losses.append(loss.item())
    run.raw.train()
    return sum(losses) / len(losses)


def checkpoint_state(run, cfg, it):
    """(train state, weights) to save after iteration it; every rank takes part (FSDP gathers)."""
    weights = dist_sd.get_model_state_dict(run.raw, options=FULL) if cfg.fsdp else None
    optimizer = dist_sd.get_optimizer_state_dict(run.raw, run.optimizer, options=FULL)
    state = {"iter": it + 1, "optimizer": optimizer, "scaler": run.scaler.state_dict(),
             "rng": torch.get_rng_state(), "config": asdict(cfg), "data_sha256": run.data_sha256,
             "base": run.base_stamp,
             "trainable": [p.detach().cpu() for p in run.params if cfg.lora_rank]}
    return state, weights


def train(cfg):
    """One training job; returns out_dir, iterations, last losses and the signal that stopped it."""
    run = set_up(cfg)
    master = run.rank == 0
    out = Path(cfg.out_dir)
    # Ctrl-C and SIGTERM (preemption) end the iteration, then save and stop; a repeat within GRACE_S
    # is the same stop (torchrun forwards what a scheduler sent every process), a later one kills
    stop = []

    def on_signal(signum, frame):
        if stop and time.time() - stop[0][1] > GRACE_S:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        stop.append((signum, time.time()))
    handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    if master and cfg.overwrite and not run.start_iter:  # the old run goes once the new can start
        for f in [*RUN_FILES, *out.glob("eval_*.json"), *out.glob("model-*.safetensors")]:
            (out / f).unlink(missing_ok=True)
    log = open(out / "log.jsonl", "a" if run.start_iter else "w") if master else None
    bar = tqdm(range(run.start_iter, cfg.max_iters), initial=run.start_iter, total=cfg.max_iters,
               disable=not master, desc=f"{cfg.loss} {out}", dynamic_ncols=True)
    summary = {"out_dir": str(out), "iters": run.start_iter, "stopped_by": None}
    warned = False
    t0 = time.time()
    tokens = 0
    try:
        for it in bar:
            sums, n = train_step(run, it, cfg)
            tokens += n
            flags = torch.cat([sums, torch.tensor([float(bool(stop))], device=run.dev)])
            if run.world > 1:  # every rank stops at the same iteration
                dist.all_reduce(flags)
            loss, frac = (flags[:2] / run.world).tolist()
            finite(loss, it, out)
            stopping = flags[2].item() > 0
            last = it == cfg.max_iters - 1
            summary.update(iters=it + 1, loss=loss, frac_unlikely=frac)
            if it % cfg.log_interval == 0 or last or stopping:
                speed = tokens * run.world / (time.time() - t0)
                record = {"iter": it, "loss": round(loss, 5), "frac_unlikely": round(frac, 4),
                          "lr": lr_at(it, cfg), "tok_per_s": round(speed)}
                evaluating = (it % cfg.eval_interval == 0 or last) and run.val_e
                if evaluating and (master or cfg.fsdp):  # under FSDP every rank takes part
                    record["val_loss"] = round(finite(evaluate(run, cfg), it, out), 5)
                    summary["val_loss"] = record["val_loss"]
                bar.set_postfix({k: v for k, v in record.items() if k not in ("iter", "lr")})
                if master:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                t0 = time.time()
                tokens = 0
            if frac > 0.5 and not warned and master:
                tqdm.write(f"warning: frac_unlikely = {frac:.2f}: token detection flags most "
                           f"flawed tokens; raise lam (now {cfg.lam}) so that U holds only the "
                           "tokens the judgment explains")
                warned = True
            if last or stopping or (it + 1) % cfg.eval_interval == 0:
                state, weights = checkpoint_state(run, cfg, it)
                if master:
                    save_checkpoint(run.raw, run.tok, state, out, weights)
                if run.world > 1:  # no process goes on, or reads it, before the save is whole
                    dist.barrier()
            if stopping:
                summary["stopped_by"] = signal.Signals(stop[0][0] if stop else signal.SIGTERM).name
                break
    finally:
        bar.close()
        for s, h in handlers.items():
            signal.signal(s, h)
        if master:
            log.close()
            LOCKS.pop(out.resolve()).close()
    return summary


def main(argv):
    cfg = configure(Config(), argv, CHOICES)
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:  # LOCAL_RANK picks this process's GPU; RANK (over all nodes) picks rank 0's duties
        gpu = None
        if cfg.device.startswith("cuda"):
            gpu = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(gpu)
        dist.init_process_group("nccl" if gpu else "gloo", device_id=gpu, timeout=SAVE_TIMEOUT)
    if cfg.data == "builtin" and (cfg.loss in PAIRED or cfg.loss == "ilf_mle"):
        raise ValueError(f"loss={cfg.loss} needs refinements or preference pairs, and the built-in "
                         "task's data has none: python -m scripts.online --method=... makes them")
    t0 = time.time()
    try:
        if cfg.data == "builtin" and cfg.init_from == "scratch" and cfg.base_iters:
            # CUT fine-tunes a model that can do the task: an MLE base learns it, and its mistake
            base = base_config(cfg)
            # --resume: the base goes on from its checkpoint, CUT from its own or from the start
            resume = cfg.resume and Path(cfg.out_dir, "train_state.pt").is_file()
            cfg = replace(cfg, init_from=base.out_dir, resume=resume)
            open_run(cfg, master=False)  # a second run, a foreign out_dir: refused before the base
            if ddp:  # every process checks out_dir before rank 0 makes base/ in it
                dist.barrier()
            summary = train(base)
            if not summary["stopped_by"]:
                summary = train(cfg)
        else:
            summary = train(cfg)
    finally:
        if ddp:
            dist.destroy_process_group()
    if int(os.environ.get("RANK", 0)) == 0:
        report(summary, cfg, argv, time.time() - t0)
    if summary["stopped_by"]:
        sys.exit(128 + signal.Signals[summary["stopped_by"]].value)
    return summary


if __name__ == "__main__":
    run_program(main)
