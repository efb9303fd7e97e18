"""Evaluate checkpoints; each mode prints a table and writes JSON to out_file (CKPT/eval_MODE.json).

python eval.py (mode 'task'): out/ against its base (out/base, or --before) on the built-in task's
  test instructions: the shares of sampled answers that are right, swapped, missing a letter,
  otherwise wrong, or in the new format; on held-out flawed responses, U (at lam) against the truly
  wrong tokens W (precision, recall), and log p_n - log p_x.
--mode=triples --data=FILE --before=DIR: on the run's held-out split, NLL, and log p_x of the tokens
  in U (judged by before) and of the others.
--mode=alpaca --alpaca_file=FILE: AlpacaEval's model_outputs.json for its judge.
"""
import bisect
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

# before torch loads OpenMP: its spinning threads made small CPU ops up to 20x slower on 2 cores
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from tqdm import tqdm

from cut_loss import cut_loss
from data import collate, encode_triples, load_checkpoint, prompt_ids, split_triples, use_chat
from model import left_pad
from support.settings import configure, run_program
from support.triple_files import data_hash, load_triples, read_text
from tasks import letters


@dataclass
class Config:  # every key can be set by --key=value or a JSON config file
    mode: str = "task"            # task, triples, alpaca
    ckpt: str = "out"             # train.py's out_dir, or a Hugging Face / Meta directory
    before: str = ""              # the checkpoint before training ('': CKPT/base if any); judges U
    data: str = ""                # 'triples': a triples file
    out_file: str = ""            # '': CKPT/eval_MODE.json
    chat: str = "auto"            # prompt format, as in train.py: 'auto', 'yes', 'no'
    lam: float = 2.0              # U = {t : p_n(t) - lam * p_x(t) > 0}
    task: str = "mixed"           # 'task': the kind of held-out flawed responses (train.py's task)
    split: str = "test"           # 'task': the instructions, from the task's 'val' or 'test' split
    n_eval: int = 500             # 'task': instructions, and as many flawed responses for U
    eval_seed: int = 10_000
    alpaca_file: str = ""         # 'alpaca': AlpacaEval's instructions, [{instruction}, ...]
    n_alpaca: int = 0             # the first n AlpacaEval instructions, 0 = all
    generator: str = ""           # the model's name in AlpacaEval's outputs ('': the directory's)
    temperature: float = 1.0      # 'task' samples answers (0: greedy); 'alpaca' is greedy
    max_new_tokens: int = 0       # 0: 96 on the built-in task, 512 for 'alpaca'
    seed: int = 1337              # 'triples': the split if ckpt is no train.py run (else the run's)
    val_frac: float = 0.05
    batch_size: int = 32          # prompts or triples per forward; lower it for long texts
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    dtype: str = "bfloat16" if torch.cuda.is_available() else "float32"  # logits in fp32 anyway


def load(path, c):
    """(model, tokenizer, chat) of a checkpoint directory."""
    model, tok = load_checkpoint(path, dtype=getattr(torch, c.dtype), device=c.device)
    return model.eval(), tok, use_chat(tok, c.chat)


def generate_responses(model, tok, chat, instructions, c, temperature, max_new):
    """The response to each instruction, batch_size prompts at a time, left-padded; prompts are
    sorted by length first so that a batch holds little padding."""
    prompts = [prompt_ids(tok, i, chat=chat) for i in instructions]
    room = [i for i, p in enumerate(prompts) if len(p) < model.cfg.max_seq_len]
    if len(room) < len(prompts):
        print(f"warning: {len(prompts) - len(room)} prompts leave no room to generate in "
              f"max_seq_len {model.cfg.max_seq_len}: their responses are empty", file=sys.stderr)
    order = sorted(room, key=lambda i: len(prompts[i]))
    out = [""] * len(instructions)
    for k in tqdm(range(0, len(order), c.batch_size), desc="generate", dynamic_ncols=True):
        rows = order[k:k + c.batch_size]
        x, pad = left_pad([prompts[i] for i in rows], c.device)
        new = model.generate(x, max_new, temperature, stop_ids=tok.stop_ids, pad=pad)
        for i, ids in zip(rows, new[:, x.shape[1]:].tolist()):
            end = next((j for j, t in enumerate(ids) if t in tok.stop_ids), len(ids))
            out[i] = tok.decode(ids[:end])
    return out


@torch.no_grad()
def score(model, tok, chat, triples, c, max_len):
    """Per triple: (log p_x, log p_n, U) of its response tokens and EOS; None if it does not fit."""
    enc = [encode_triples(tok, [t], "cut", max_len, chat, verbose=False) for t in triples]
    length = lambda i: max(len(p) + len(y) for p, y in enc[i][0].rows)
    kept = sorted((i for i, e in enumerate(enc) if e), key=length)
    out = [None] * len(triples)
    for k in tqdm(range(0, len(kept), c.batch_size), desc="score", dynamic_ncols=True):
        rows = kept[k:k + c.batch_size]
        b = collate([enc[i][0] for i in rows], tok.eos_id).to(c.device)
        logp = model(b.idx, b.positions, b.targets)
        logp_x = logp[b.x_rows].cpu()
        logp_j = logp[b.j_rows].cpu()
        _, stats = cut_loss(logp_x, logp_j, b.is_neg.cpu(), b.mask[b.x_rows].cpu(), c.lam)
        lengths = b.mask[b.x_rows].sum(1).int().tolist()
        for r, (i, n) in enumerate(zip(rows, lengths)):
            out[i] = (logp_x[r, :n], logp_j[r, :n], stats["U"][r, :n])
    return out


def token_positions(tok, response, offsets):
    """Char offsets in a response -> the indices of the tokens holding them (len(response): EOS)."""
    ids = tok.encode(response)
    ends = [len(tok.decode(ids[:i + 1])) for i in range(len(ids))]
    return [bisect.bisect_right(ends, o) for o in offsets]


def markdown(rows, columns):
    def cell(v):
        if v is None:
            return "–"
        return f"{v:.3f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(k)) for k in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def task_eval(model, tok, chat, c):
    """The built-in task: sampled answers to the split's instructions, U on held-out flawed ones."""
    tasks = letters.make_task(c.n_eval, seed=c.eval_seed, split=c.split)
    instructions = [t.instruction for t in tasks]
    torch.manual_seed(c.seed)  # the same samples for the same model
    max_new = c.max_new_tokens or 96
    responses = generate_responses(model, tok, chat, instructions, c, c.temperature, max_new)
    result = letters.tally(instructions, responses)
    flawed = letters.make_task(c.n_eval, seed=c.eval_seed + 1, kind=c.task, flawed_frac=1.0,
                               split=c.split)
    result.update(token_detection(model, tok, chat, flawed, c), lam=c.lam, n=len(instructions))
    result["examples"] = [
        {"instruction": i, "response": r, "kind": letters.check_response(i, r).kind}
        for i, r in zip(instructions[:5], responses)]
    return result


def token_detection(model, tok, chat, flawed, c):
    """U against the truly wrong tokens W of flawed responses (precision, recall), and log p_n -
    log p_x on W and on the other tokens: does the judgment explain W alone?"""
    in_u, wrong, gain = [], [], []  # per response: U, the truly wrong tokens W, log p_n - log p_x
    for t, s in zip(flawed, score(model, tok, chat, flawed, c, model.cfg.max_seq_len)):
        if s is None:
            continue
        logp_x, logp_n, U = s
        w = torch.zeros_like(U)
        offsets = letters.check_response(t.instruction, t.response).wrong
        w[token_positions(tok, t.response, offsets)] = True
        in_u.append(U)
        wrong.append(w)
        gain.append(logp_n - logp_x)
    U = torch.cat(in_u)
    W = torch.cat(wrong)
    gain = torch.cat(gain)
    hit = int((U & W).sum())
    n_u = int(U.sum())
    return {"U_precision": hit / n_u if n_u else None, "U_recall": hit / int(W.sum()),
            "frac_unlikely": n_u / len(U), "gain_wrong": gain[W].mean().item(),
            "gain_other": gain[~W].mean().item()}


def task_mode(c):
    """The checkpoint, and its base (--before, or CKPT/base from the default run), side by side."""
    before = c.before
    if not before and Path(c.ckpt, "base", "config.json").is_file():
        before = str(Path(c.ckpt, "base"))
    rows = []
    for name, path in [("base", before), ("ckpt", c.ckpt)]:
        if path:
            rows.append({"model": name, "path": path, **task_eval(*load(path, c), c)})
    return {"split": c.split, "task": c.task, "rows": rows}


def triples_eval(c):
    """NLL, and log p_x of the tokens in U and outside U, on the run's held-out split of a file."""
    if not c.data:
        raise ValueError("mode 'triples' needs --data=FILE, a triples file")
    saved = Path(c.ckpt, "train_state.pt")  # the run's own split, when ckpt is a train.py run
    state = torch.load(saved, map_location="cpu", weights_only=True) if saved.is_file() else None
    run = state["config"] if state else {"seed": c.seed, "val_frac": c.val_frac, "max_len": None}
    if state and state.get("data_sha256") != data_hash(c.data):
        print(f"warning: {c.data} is not the file {c.ckpt} was trained on: its split is not that "
              "run's held-out part", file=sys.stderr)
    _, held = split_triples(load_triples(c.data), run["val_frac"], run["seed"])
    if not held:
        raise ValueError(f"{c.data}: no held-out triples at val_frac={run['val_frac']}")
    U = None
    rows = []
    for path in [p for p in (c.before, c.ckpt) if p]:
        model, tok, chat = load(path, c)
        scored = score(model, tok, chat, held, c, run["max_len"] or model.cfg.max_seq_len)
        if U is None:  # judged by the first checkpoint: before, if given
            U = [s and s[2] for s in scored]
        in_u, out_u, nll, nll_ok = [], [], [], []  # token log-probs; nll_ok: acceptable responses
        for s, u, t in zip(scored, U, held):
            if s is None:
                continue
            nll.append(-s[0])
            if not t.judgment:
                nll_ok.append(-s[0])
            elif u is not None:
                if len(s[0]) != len(u):
                    raise ValueError(f"{path} and {c.before} tokenize the responses differently: "
                                     "U cannot carry over")
                in_u.append(s[0][u])
                out_u.append(s[0][~u])
        mean = lambda xs: torch.cat(xs).mean().item() if sum(map(len, xs)) else None
        rows.append({"ckpt": path, "nll": mean(nll), "nll_acceptable": mean(nll_ok),
                     "logp_in_U": mean(in_u), "logp_out_U": mean(out_u),
                     "tokens_in_U": sum(map(len, in_u)), "tokens_out_U": sum(map(len, out_u)),
                     "skipped_too_long": scored.count(None)})
    return {"data": c.data, "held_out": len(held), "seed": run["seed"], "val_frac": run["val_frac"],
            "lam": c.lam, "U_from": c.before or c.ckpt, "rows": rows}


def alpaca(c):
    if not c.alpaca_file:
        raise ValueError("mode 'alpaca' needs --alpaca_file=FILE, AlpacaEval's instructions: "
                         "tatsu-lab/alpaca_eval's results/text_davinci_003/model_outputs.json")
    try:
        records = json.loads(read_text(c.alpaca_file, "alpaca_file"))
        instructions = [str(r["instruction"]) for r in records][:c.n_alpaca or None]
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{c.alpaca_file}: not a JSON list of records with an 'instruction' "
                         f"({e!r})") from None
    name = c.generator or Path(c.ckpt).resolve().name
    outputs = generate_responses(*load(c.ckpt, c), instructions, c, 0, c.max_new_tokens or 512)
    return [{"instruction": i, "output": o, "generator": name}
            for i, o in zip(instructions, outputs)]


MODES = {"task": task_mode, "triples": triples_eval, "alpaca": alpaca}
CHOICES = {"mode": tuple(MODES), "task": ("mixed", "new"), "split": ("val", "test")}
TABLES = {"task": "model accuracy swap missing other new_format U_precision U_recall frac_unlikely "
                  "gain_wrong gain_other",
          "triples": "ckpt nll nll_acceptable logp_in_U logp_out_U tokens_in_U tokens_out_U"}


def main(argv):
    c = configure(Config(), argv, CHOICES)
    out_file = Path(c.out_file or Path(c.ckpt, f"eval_{c.mode}.json"))
    if out_file.resolve() in [Path(p).resolve() for p in (c.data, c.alpaca_file) if p]:
        raise ValueError(f"out_file {out_file} is a file this command reads: choose another")
    parent = next(p for p in out_file.absolute().parents if p.exists())  # the rest made later
    if out_file.is_dir() or not parent.is_dir() or not os.access(parent, os.W_OK):  # now, not after
        raise ValueError(f"out_file {out_file}: a directory, or not in one that can be written")
    result = MODES[c.mode](c)
    if c.mode in TABLES:
        print(markdown(result["rows"], TABLES[c.mode].split()))
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(result, indent=1, ensure_ascii=False), encoding="utf-8")
    print(f"wrote {out_file}")
    return result


if __name__ == "__main__":
    run_program(main)
