"""Run directories: train.py writes only into a new or empty one or its own run's, never reuses
a run silently, and resumes it only with the run's settings and data; checkpoints are atomic.
"""
import fcntl
import json
import math
import os
import shlex
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from support.checkpoint import finish_checkpoint
from support.triple_files import data_hash

# settings a resumed run may change (data and init_from: their contents are compared, not paths)
RESUMABLE = set("out_dir max_iters eval_interval log_interval device compile resume overwrite "
                "grad_ckpt data init_from".split())
# the files of a run that --overwrite=True replaces (eval_*.json too: they measured the old model)
RUN_FILES = ("train_state.pt", "config.json", "model.safetensors", "model.safetensors.index.json",
             "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "chat_template.jinja")
LOCKS = {}  # out_dir -> its .lock, open, for as long as this process trains into it


def save_checkpoint(raw, tok, state, out, weights=None):
    """Write out/.ckpt-new, mark it complete, move each file into out: a kill at any point leaves
    the old checkpoint or a complete new one, which the next finish_checkpoint(out) moves in."""
    tmp = out / ".ckpt-new"
    shutil.rmtree(tmp, ignore_errors=True)
    raw.save_pretrained(tmp, weights)
    tok.save(tmp)
    torch.save(state, tmp / "train_state.pt")
    (tmp / "COMPLETE").touch()
    finish_checkpoint(out)


def open_run(cfg, master):
    """Check out_dir before anything is trained: a run is never reused silently, and --resume goes
    on only with the run's own settings and data. The saved train state, or None for a new run."""
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {out}: a file, not a directory")
    if cfg.init_from != "scratch" and out.resolve() == Path(cfg.init_from).resolve():
        raise ValueError(f"out_dir and init_from are both {out}: training would overwrite the "
                         "checkpoint it starts from; choose another --out_dir")
    finish_checkpoint(out)  # by every process (each file moves once): all read the finished one
    if not (out / "train_state.pt").is_file():
        if cfg.resume:
            raise ValueError(f"out_dir {out}: no checkpoint to resume (train_state.pt); "
                             "start without --resume")
        # free to use if it holds no more than a run leaves before its first save, and runs (base/)
        others = [p.name for p in out.glob("*") if p.name not in ("log.jsonl", ".ckpt-new", ".lock")
                  and not (p / "train_state.pt").is_file()]
        if others:
            raise ValueError(f"out_dir {out} holds {', '.join(sorted(others)[:3])}, not a train.py "
                             "run: choose another --out_dir")
    if master and out.resolve() not in LOCKS:  # held until train() ends; the OS frees it on a kill
        lock(out)
        finish_checkpoint(out)  # the rest is checked holding the lock: no run changes out meanwhile
    if not cfg.resume and (out / "train_state.pt").is_file() and not cfg.overwrite:
        raise ValueError(f"out_dir {out} holds a run already: resume it with --resume=True, "
                         "choose another --out_dir, or pass --overwrite=True to delete it")
    if not cfg.resume:  # a new run (--resume without train_state.pt was refused above)
        return None
    # mmap: one copy a node however many processes load it
    state = torch.load(out / "train_state.pt", map_location="cpu", weights_only=True, mmap=True)
    saved = dict(state["config"], data_sha256=state.get("data_sha256"), base=state.get("base"))
    now = dict(asdict(cfg), data_sha256=data_hash(cfg.data), base=base_stamp(cfg))
    diffs = [f"{k} {saved.get(k)!r} -> {now[k]!r}" for k in now
             if k not in RESUMABLE and saved.get(k) != now[k]]
    if diffs:
        raise ValueError(f"{out}: --resume with settings other than the run's "
                         f"({'; '.join(diffs)}); resume with the run's settings, "
                         "or start a new run in another --out_dir")
    if master:  # iterations logged after the checkpoint will run again
        log = out / "log.jsonl"
        # a kill while a line was written leaves it without its newline: its iteration runs again
        lines = log.read_text().split("\n")[:-1] if log.exists() else []
        kept = [ln for ln in lines if ln.strip() and json.loads(ln)["iter"] < state["iter"]]
        log.write_text("".join(line + "\n" for line in kept))
    return state


def lock(out):
    """Hold out/.lock (in LOCKS) or stop: one run at a time in a directory, scripts.online's too."""
    out.mkdir(parents=True, exist_ok=True)
    held = open(out / ".lock", "a")
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ValueError(f"out_dir {out}: another run holds it (its .lock); wait for that run "
                         "to end, or choose another --out_dir") from None
    LOCKS[out.resolve()] = held


def base_stamp(cfg):
    """init_from's weights by size and time (LoRA's base, DPO's reference), wherever they lie."""
    if cfg.init_from == "scratch":
        return None
    weights = [f.stat() for f in Path(cfg.init_from).glob("*.*")
               if f.suffix in (".safetensors", ".pth")]
    modified = time.ctime(max((w.st_mtime for w in weights), default=0))
    return f"{sum(w.st_size for w in weights)} bytes of weights, modified {modified}"


def finite(value, it, out):
    """value, if finite; else the one line that stops a diverged run, before iteration it saves."""
    if math.isfinite(value):
        return value
    raise FloatingPointError(f"iteration {it}: a loss or gradient norm of {value}, not saved (the "
                             f"last checkpoint, if any, is in {out}): lower --learning_rate")


def report(s, cfg, argv, seconds):
    """What train.py's run left, and the commands to run next, quoted for the shell."""
    out = shlex.quote(s["out_dir"])
    if s["stopped_by"]:
        again = [a for a in argv if not a.startswith(("--resume", "--overwrite"))]
        launch = f"torchrun --nproc_per_node={os.environ['WORLD_SIZE']}" if cfg.fsdp else "python"
        print(f"train.py: stopped by {s['stopped_by']} after iteration {s['iters']}; the "
              f"checkpoint is in {out}. Resume with: "
              f"{launch} {shlex.join(['train.py', *again, '--resume=True'])}")
        return
    losses = ", ".join(f"{k} {s[k]:.4f}" for k in ("loss", "val_loss", "frac_unlikely") if k in s)
    prompt = "Sort these letters: h, d, j, a"
    evaluate = f"python eval.py --ckpt={out}    # against its base: accuracy, mistakes, U"
    if cfg.data != "builtin":
        prompt = "..."
        evaluate = f"python eval.py --mode=triples --ckpt={out} --data={shlex.quote(cfg.data)}"
        evaluate += "" if cfg.init_from == "scratch" else f" --before={shlex.quote(cfg.init_from)}"
    print(f"\ntrain.py: {s['iters']} iterations in {seconds / 60:.1f} min. The model is in {out} "
          f"({losses or 'nothing to train: raise --max_iters above the checkpoint iteration'})."
          f"\nNext:\n  python sample.py --ckpt={out} --prompt=\"{prompt}\"\n  {evaluate}")
