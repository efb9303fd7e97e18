"""Run directories: what train.py may write where, and how it resumes. A run is never reused
silently, a resumed run goes on only with its own settings and data, and a checkpoint is written
atomically.
"""
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from support.checkpoint import finish_checkpoint
from support.triple_files import data_hash

# settings that a resumed run may change: they do not alter what the run computes
RESUMABLE = set("out_dir max_iters eval_interval log_interval device compile resume overwrite "
                "grad_ckpt".split())
# a directory with one of these holds a run
RUN_FILES = ("train_state.pt", "log.jsonl", "config.json", "model.safetensors")
# the tokenizer a checkpoint carries: --overwrite=True deletes it with the run
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "chat_template.jinja")


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
    if master:
        finish_checkpoint(out)
    if cfg.resume:
        if not (out / "train_state.pt").is_file():
            raise ValueError(f"{out}: no checkpoint to resume (train_state.pt); "
                             "start without --resume")
        # mmap: one copy a node however many processes load it
        state = torch.load(out / "train_state.pt", map_location="cpu", weights_only=True, mmap=True)
        saved = dict(state["config"], data_sha256=state.get("data_sha256"))
        now = dict(asdict(cfg), data_sha256=data_hash(cfg.data))
        changed = [k for k in now if k not in RESUMABLE and saved.get(k) != now[k]]
        diffs = [f"{k} {saved.get(k)!r} -> {now[k]!r}" for k in changed]
        if diffs:
            raise ValueError(f"{out}: --resume with settings other than the run's "
                             f"({'; '.join(diffs)}); resume with the run's settings, "
                             "or start a new run in another --out_dir")
        if master:  # iterations logged after the checkpoint will run again
            log = out / "log.jsonl"
            lines = log.read_text().splitlines() if log.exists() else []
            kept = [ln for ln in lines if ln.strip() and json.loads(ln)["iter"] < state["iter"]]
            log.write_text("".join(line + "\n" for line in kept))
        return state
    if any((out / f).exists() for f in RUN_FILES):
        if not cfg.overwrite:
            raise ValueError(f"out_dir {out} holds a run already: resume it with --resume=True, "
                             "choose another --out_dir, or pass --overwrite=True to delete it")
        if master:
            evals = [p.name for p in out.glob("eval_*.json")]
            for f in [*RUN_FILES, *evals, *TOKENIZER_FILES]:
                (out / f).unlink(missing_ok=True)
    return None


def report(s, cfg, argv, seconds):
    """What train.py's run left, and the commands to run next."""
    out = s["out_dir"]
    if s["stopped_by"]:
        again = " ".join(a for a in argv if not a.startswith(("--resume", "--overwrite")))
        print(f"train.py: stopped by {s['stopped_by']} after iteration {s['iters']}; the "
              f"checkpoint is in {out}. Resume with: "
              f"python train.py {again} --resume=True".replace("  ", " "))
        return
    losses = ", ".join(f"{k} {s[k]:.4f}" for k in ("loss", "val_loss", "frac_unlikely") if k in s)
    prompt = "Sort these letters: h, d, j, a"
    evaluate = f"python eval.py --ckpt={out}    # against its base: accuracy, mistakes, U"
    if cfg.data != "builtin":
        prompt = "..."
        before = "" if cfg.init_from == "scratch" else f" --before={cfg.init_from}"
        evaluate = f"python eval.py --mode=triples --ckpt={out} --data={cfg.data}{before}"
    print(f"\ntrain.py: {s['iters']} iterations in {seconds / 60:.1f} min. The model is in {out} "
          f"({losses}).\nNext:\n  python sample.py --ckpt={out} --prompt=\"{prompt}\"\n"
          f"  {evaluate}")
