"""Evaluate checkpoints; every mode prints a table and writes JSON to out_file (default CKPT/eval_MODE.json).

python eval.py (mode 'task'): out/ on held-out instructions of the built-in task: greedy accuracy, the share of each
  kind of mistake ('swap' is the systematic one), and CUT's U (at lam) on held-out flawed responses against the truly
  wrong tokens W: precision |U & W| / |U|, recall |U & W| / |W|.
--mode=triples --data=FILE --before=DIR: on train.py's held-out split, under before and ckpt, the NLL of acceptable
  responses and, on flawed ones, the mean log p(y_t|x) of the tokens in U (judged by before) and of the others.
--mode=alpaca: AlpacaEval's model_outputs.json ({instruction, output, generator}) for its 805 instructions.
--mode=online: one round of the paper's online loop (sample and judge, train, measure; the next round from out-on1):
  python eval.py --mode=online --out_file=on1.json && python train.py --init_from=out --data=on1.json \\
    --out_dir=out-on1 && python eval.py --ckpt=out-on1
--mode=compare: train.py's base phase once, then each loss mode (cut once per lam) fine-tunes it with one budget, per
  seed, on all-flawed and on mixed data, each evaluated as 'task': COMPARE_DIR/compare.json, .md, .svg. It resumes.
"""
import bisect
import itertools
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from xml.sax.saxutils import escape

# before torch loads OpenMP: its spinning threads made small CPU ops up to 20x slower on 2 cores (measured)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from tqdm import tqdm

from cut_loss import LOSS_MODES, cut_loss, response_logprobs
from data import (Tokenizer, check_response, collate, configure, encode_triples, load_triples, make_task, prompt_ids,
                  split_triples, use_chat)
from model import Transformer

# ----------------------------------------------------------------------------- config (--key=value overrides)
mode = "task"           # task, triples, alpaca, online, compare
ckpt = "out"            # train.py's out_dir, or a Hugging Face / Meta directory
before = ""             # 'triples': the checkpoint before fine-tuning, which judges U ('' = none: ckpt judges)
data = ""               # 'triples': a triples file
out_file = ""           # '' = CKPT/eval_MODE.json (compare: COMPARE_DIR/compare.json)
chat = "auto"           # prompt format, as in train.py: 'auto' (chat format for instruct checkpoints), 'yes', 'no'
lam = 1.1               # U = {t : p_n(t) - lam * p_x(t) > 0}; compare: cut at this lam runs on every seed
n_eval = 500            # 'task': held-out instructions, and as many held-out flawed triples for U
eval_seed = 10_000      # far from the seeds training draws its task data from
n_online = 1000         # 'online': new instructions to answer
online_seed = 20_000
n_alpaca = 0            # the first n AlpacaEval instructions, 0 = all 805
alpaca_file = str(Path(__file__).resolve().parent.parent / "shared/data/alpaca-eval-davinci003.json")
generator = ""          # the model's name in AlpacaEval's outputs; '' = the checkpoint's directory name
temperature = 0.0       # 'alpaca' (0: greedy; 'task' is always greedy)
online_temperature = 1.0  # 'online': sampled, so that the samples show mistakes to judge
max_new_tokens = 0      # 0: 60 on the built-in task, 512 for 'alpaca'
val_frac = 0.05         # 'triples': train.py's split, so that the held-out part is the one training did not see
seed = 1337
batch_size = 32         # prompts or triples per forward; lower it for long texts and large vocabularies
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "float32"
compare_dir = "out/compare"
n_seeds = 3             # compare: fine-tuning seeds 1..n_seeds
lams = (1.1, 1.5, 2.0, 3.0)  # compare: the lambda sweep of cut (other than lam: the first seed only)
base_iters = 800        # compare: train.py's base phase, MLE on every response of the base's data
base_lr = 2e-3
base_flawed = 0.5       # compare: the base's share of flawed responses (train.py's base_flawed)
ft_iters = 200          # compare: the fine-tuning budget, the same for every method
ft_lr = 3e-4
jobs = 1                # compare: train.py processes at once
train_args = ""         # compare: more train.py flags for every run, e.g. "--device=cuda --task_size=4000"
CONFIG_KEYS = [k for k, v in list(globals().items()) if k[0].islower() and isinstance(v, (int, float, str, tuple))]
CHOICES = {"mode": ("task", "triples", "alpaca", "online", "compare"), "chat": ("auto", "yes", "no"),
           "dtype": ("float32", "bfloat16", "float16")}  # checked before any checkpoint is read
REGIMES = {"all_flawed": 1.0, "mixed": 0.65}


# ----------------------------------------------------------------------------- shared helpers
def load(path, c):
    """(model, tokenizer, chat) of a checkpoint directory."""
    if not Path(path).is_dir():
        raise FileNotFoundError(f"ckpt {path}: no such directory")
    tok = Tokenizer.from_pretrained(path)
    model = Transformer.from_pretrained(path, dtype=getattr(torch, c["dtype"]), device=c["device"]).eval()
    return model, tok, use_chat(tok, c["chat"])


def generate_responses(model, tok, chat, instructions, c, temperature, max_new):
    """The response to each instruction; prompts of equal token length share a batch, so none needs padding."""
    prompts, out, bs = [prompt_ids(tok, i, chat=chat) for i in instructions], [""] * len(instructions), c["batch_size"]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    groups = [list(g) for _, g in itertools.groupby(order, key=lambda i: len(prompts[i]))]
    for rows in tqdm([g[k:k + bs] for g in groups for k in range(0, len(g), bs)], desc="generate", dynamic_ncols=True):
        x = torch.tensor([prompts[i] for i in rows], device=c["device"])
        new = model.generate(x, max_new, temperature, stop_ids=tok.stop_ids)[:, x.shape[1]:].tolist()
        for i, ids in zip(rows, new):
            out[i] = tok.decode(ids[:next((j for j, t in enumerate(ids) if t in tok.stop_ids), len(ids))])
    return out


@torch.no_grad()
def score(model, tok, chat, triples, c, lam):
    """Per triple: (log p(y_t|x) of the response tokens and EOS, CUT's U on them), None if it does not fit the model."""
    enc = [encode_triples(tok, [t], "cut", model.cfg.max_seq_len, chat, verbose=False) for t in triples]
    kept = sorted((i for i, e in enumerate(enc) if e), key=lambda i: max(len(p) + len(y) for p, y in enc[i][0].rows))
    out = [None] * len(triples)
    for k in tqdm(range(0, len(kept), c["batch_size"]), desc="score", dynamic_ncols=True):
        rows = kept[k:k + c["batch_size"]]
        b = collate([enc[i][0] for i in rows], tok.eos_id).to(c["device"])
        logp, mask = response_logprobs(model(b.idx, keep=b.targets != -100), b.targets)
        _, stats = cut_loss(logp[b.x_rows], logp[b.j_rows], b.is_neg, mask[b.x_rows], lam)
        for i, lp, m, u in zip(rows, logp[b.x_rows].cpu(), mask[b.x_rows].cpu(), stats["U"].cpu()):
            out[i] = (lp[:int(m.sum())], u[:int(m.sum())])
    return out


def token_positions(tok, response, offsets):
    """Char offsets in a response -> the indices of the response tokens holding them (len(response): the EOS)."""
    ids = tok.encode(response)
    ends = [len(tok.decode(ids[:i + 1])) for i in range(len(ids))]
    return [bisect.bisect_right(ends, o) for o in offsets]


def u_scores(U, wrong):
    """U (a bool tensor per response) against the wrong token positions W (a list per response), pooled."""
    hit = n_u = n_w = n = 0
    for u, w in zip(U, wrong):
        flagged = set(u.nonzero().flatten().tolist())
        hit, n_u, n_w, n = hit + len(flagged & set(w)), n_u + len(flagged), n_w + len(set(w)), n + len(u)
    ratio = lambda a, b: a / b if b else None
    return {"U_precision": ratio(hit, n_u), "U_recall": ratio(hit, n_w), "frac_unlikely": ratio(n_u, n)}


def markdown(rows, columns):
    cell = lambda v: "–" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)
    return "\n".join(["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
                     + ["| " + " | ".join(cell(r[k]) for k in columns) + " |" for r in rows]) + "\n"


# ----------------------------------------------------------------------------- modes
def task_eval(model, tok, chat, c):
    instructions = [t.instruction for t in make_task(c["n_eval"], seed=c["eval_seed"])]
    responses = generate_responses(model, tok, chat, instructions, c, 0, c["max_new_tokens"] or 60)
    kinds = [check_response(i, r).kind for i, r in zip(instructions, responses)]
    flawed = make_task(c["n_eval"], seed=c["eval_seed"] + 1, flawed_frac=1.0)
    pairs = [(s[1], token_positions(tok, t.response, check_response(t.instruction, t.response).wrong))
             for t, s in zip(flawed, score(model, tok, chat, flawed, c, c["lam"])) if s]
    share = lambda kind: kinds.count(kind) / len(kinds)
    examples = [{"instruction": i, "response": r, "kind": k} for i, r, k in zip(instructions, responses, kinds)]
    return {"accuracy": share("ok"), "swap_rate": share("swap"), "kinds": {k: share(k) for k in sorted(set(kinds))},
            "lam": c["lam"], **u_scores(*zip(*pairs)), "n": len(kinds), "examples": examples[:5]}


def triples_eval(c):
    if not c["data"]:
        raise ValueError("mode 'triples' needs --data=FILE, a triples file")
    _, held = split_triples(load_triples(c["data"]), c["val_frac"], c["seed"])
    if not held:
        raise ValueError(f"{c['data']}: no held-out triples at val_frac={c['val_frac']}")
    mean = lambda xs: torch.cat(xs).mean().item() if sum(map(len, xs)) else None
    U, rows = None, []
    for path in [p for p in (c["before"], c["ckpt"]) if p]:
        scored = score(*load(path, c), held, c, c["lam"])
        U = U or [s and s[1] for s in scored]  # judged by the first checkpoint: before, if given
        neg = [(s[0], u) for s, u, t in zip(scored, U, held) if s and u is not None and t.judgment]
        if any(len(lp) != len(u) for lp, u in neg):
            raise ValueError(f"{path} and {c['before']} tokenize the responses differently: U cannot carry over")
        in_u, out_u = [lp[u] for lp, u in neg], [lp[~u] for lp, u in neg]
        ok = [-s[0] for s, t in zip(scored, held) if s and not t.judgment]
        rows.append({"ckpt": path, "nll_acceptable": mean(ok), "logp_in_U": mean(in_u), "logp_out_U": mean(out_u),
                     "tokens_in_U": sum(map(len, in_u)), "tokens_out_U": sum(map(len, out_u)),
                     "skipped_too_long": scored.count(None)})
    return {"data": c["data"], "held_out": len(held), "lam": c["lam"], "U_from": c["before"] or c["ckpt"], "rows": rows}


def alpaca(c):
    path = Path(c["alpaca_file"])
    if not path.is_file():
        raise FileNotFoundError(f"alpaca_file {path}: no such file")
    records = json.loads(path.read_text(encoding="utf-8"))[:c["n_alpaca"] or None]
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not isinstance(r.get("instruction"), str):
            raise ValueError(f"{path}: record {i}: no string field 'instruction'")
    instructions, name = [r["instruction"] for r in records], c["generator"] or Path(c["ckpt"]).resolve().name
    outputs = generate_responses(*load(c["ckpt"], c), instructions, c, c["temperature"], c["max_new_tokens"] or 512)
    return [{"instruction": i, "output": o, "generator": name} for i, o in zip(instructions, outputs)]


def online(c):
    instructions = [t.instruction for t in make_task(c["n_online"], seed=c["online_seed"])]
    torch.manual_seed(c["seed"])
    responses = generate_responses(*load(c["ckpt"], c), instructions, c, c["online_temperature"],
                                   c["max_new_tokens"] or 60)
    records = [{"instruction": i, "response": r, "judgment": check_response(i, r).judgment}
               for i, r in zip(instructions, responses)]
    print(f"accuracy of the samples: {sum(not r['judgment'] for r in records) / len(records):.3f}")
    return records


# ----------------------------------------------------------------------------- compare: the evidence run
def compare_plan(c):
    """The runs: the base first (train.py's base phase: MLE on every response), then the fine-tunes of it."""
    root, common = Path(c["compare_dir"]).resolve(), ["--data=builtin", *c["train_args"].split()]
    plan = [dict(out_dir=root / "base", regime="base", method="sft_all", lam=None, seed=1338, iters=c["base_iters"],
                 args=[*common, "--loss=sft_all", "--base_iters=0", f"--max_iters={c['base_iters']}", "--seed=1338",
                       f"--learning_rate={c['base_lr']}", f"--min_lr={c['base_lr'] / 10}",
                       f"--task_flawed={c['base_flawed']}"])]
    # sft trains on acceptable responses only: nothing to learn from in all-flawed data
    for regime, method in [(r, m) for r in REGIMES for m in LOSS_MODES if not (m == "sft" and REGIMES[r] == 1.0)]:
        # every seed for cut at lam and for the baselines; the rest of the lambda sweep on the first seed
        for lam, s in [(lam, s) for lam in (c["lams"] if method == "cut" else (None,))
                       for s in range(1, (c["n_seeds"] if lam in (None, c["lam"]) else 1) + 1)]:
            args = [*common, f"--init_from={root / 'base'}", f"--loss={method}", f"--task_flawed={REGIMES[regime]}",
                    f"--seed={s}", f"--max_iters={c['ft_iters']}", f"--learning_rate={c['ft_lr']}",
                    f"--min_lr={c['ft_lr'] / 10}", *([] if lam is None else [f"--lam={lam}"])]
            plan.append(dict(out_dir=root / regime / f"{method}{'' if lam is None else f'-lam{lam:g}'}-s{s}",
                             regime=regime, method=method, lam=lam, seed=s, iters=c["ft_iters"], args=args))
    return plan


def summarize(runs):
    """One row per (regime, method, lam): accuracy over seeds (mean, std, min, max), the other metrics' means."""
    groups, rows = {}, []
    for r in runs:
        groups.setdefault((r["regime"], r["method"], r["lam"]), []).append(r)
    for (regime, method, lam), rs in groups.items():
        acc = [r["accuracy"] for r in rs]
        mean = lambda k: statistics.fmean(v) if (v := [r[k] for r in rs if r[k] is not None]) else None
        rows.append({"regime": regime, "method": method, "lam": lam, "seeds": len(rs), "acc_min": min(acc),
                     "acc_mean": statistics.fmean(acc), "acc_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                     "acc_max": max(acc),
                     **{k: mean(k) for k in ("swap_rate", "final_frac_unlikely", "U_precision", "U_recall")}})
    return rows


def compare_table(rows):
    return markdown([dict(r, lam="–" if r["lam"] is None else f"{r['lam']:g}", accuracy=f"{r['acc_mean']:.3f} ± "
                          f"{r['acc_std']:.3f} ({r['acc_min']:.3f}–{r['acc_max']:.3f})") for r in rows],
                    "regime method lam seeds accuracy swap_rate final_frac_unlikely U_precision U_recall".split())


def svg_chart(rows):
    """Mean greedy accuracy per method and regime, min-max whiskers: a bar chart written by hand (200 px = 1.0)."""
    y = lambda v: f"{240 - 200 * v:.1f}"  # the y of accuracy v
    parts, x = ['<text x="4" y="16">greedy accuracy: mean over seeds, min-max</text><text x="38" y="240" text-anchor='
                '"end">0</text><text x="38" y="40" text-anchor="end">1</text><line x1="42" x2="42" y1="40" y2="240" '
                'stroke="black"/>'], 50
    for regime in dict.fromkeys(r["regime"] for r in rows):
        parts.append(f'<text x="{x}" y="32">{escape(regime)}</text>')
        for r in (r for r in rows if r["regime"] == regime):
            mid, a, label = x + 11, r["acc_mean"], escape(r["method"] + (f" λ={r['lam']:g}" if r["lam"] else ""))
            parts += [f'<rect x="{x}" y="{y(a)}" width="22" height="{200 * a:.1f}" fill="#4c78a8"/>',
                      f'<line x1="{mid}" x2="{mid}" y1="{y(r["acc_max"])}" y2="{y(r["acc_min"])}" stroke="black"/>',
                      f'<text transform="translate({mid - 3},246) rotate(60)">{label}</text>']
            x += 30
        x += 30
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{max(x, 320)}" height="350" font-family="sans-serif" '
            f'font-size="10">{"".join(parts)}</svg>\n')


def compare(c):
    plan = compare_plan(c)
    # jobs > 1: that many train.py processes at once, sharing the cores, each logging to its out_dir/train.log
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // c["jobs"])))

    def train_run(k):
        run, out = plan[k], plan[k]["out_dir"]
        state = out / "train_state.pt"  # written with each checkpoint: an interrupted run resumes from the last
        if state.is_file() and torch.load(state, map_location="cpu", weights_only=True)["iter"] >= run["iters"]:
            return
        print(f"[{k + 1}/{len(plan)}] training {out}", flush=True)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "train.log", "a") if c["jobs"] > 1 else nullcontext() as log:
            subprocess.run([sys.executable, "train.py", f"--out_dir={out}", *run["args"],
                            *(["--resume=True"] if state.is_file() else [])], cwd=Path(__file__).parent, check=True,
                           stdout=log, stderr=log, env=env)

    train_run(0)  # the base, which every other run fine-tunes
    with ThreadPoolExecutor(c["jobs"]) as pool:
        list(pool.map(train_run, range(1, len(plan))))
    runs = []
    for run in plan:
        out = run["out_dir"]
        result = task_eval(*load(out, c), dict(c, lam=c["lam"] if run["lam"] is None else run["lam"]))
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
        runs.append({**result, **{k: v for k, v in run.items() if k != "args"}, "out_dir": str(out),
                     "final_frac_unlikely": log[-1]["frac_unlikely"]})
    return {"config": c, "summary": summarize(runs), "runs": runs}


def run(c):
    for key, ok, want in [(k, c[k] in v, " | ".join(v)) for k, v in CHOICES.items()] + [
            ("n_eval", c["n_eval"] > 0, "> 0"), ("jobs", c["jobs"] > 0, "> 0"), ("n_online", c["n_online"] > 0, "> 0"), ("lams", c["lams"], "a lam")]:
        if not ok:
            raise ValueError(f"config key {key!r}: expected {want}, got {c[key]!r}")
    m = c["mode"]
    out_file = Path(c["out_file"] or (Path(c["compare_dir"], "compare.json") if m == "compare"
                                      else Path(c["ckpt"], f"eval_{m}.json")))
    result = {"task": lambda c: task_eval(*load(c["ckpt"], c), c), "triples": triples_eval, "alpaca": alpaca,
              "online": online, "compare": compare}[m](c)
    if m == "task":
        print(markdown([{**result, **result["kinds"]}], ("accuracy", "swap_rate", "U_precision", "U_recall",
                                                         "frac_unlikely", *result["kinds"])))
    if m == "triples":
        print(markdown(result["rows"], [k for k in result["rows"][0] if k != "skipped_too_long"]))
    out_file.parent.mkdir(parents=True, exist_ok=True)
    if m == "compare":
        print(compare_table(result["summary"]))
        out_file.with_suffix(".md").write_text(compare_table(result["summary"]), encoding="utf-8")
        out_file.with_suffix(".svg").write_text(svg_chart(result["summary"]), encoding="utf-8")
    out_file.write_text(json.dumps(result, indent=1, default=str, ensure_ascii=False), encoding="utf-8")
    print(f"wrote {out_file}")
    return result


def main(argv):
    try:
        return run(configure({k: globals()[k] for k in CONFIG_KEYS}, argv))
    except (ValueError, FileNotFoundError, subprocess.CalledProcessError) as e:
        print(f"eval.py: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
