"""Long responses with one local flaw: CUT against filtering where a flawed answer is mostly right.

    python -m scripts.long_flaws --jobs=2     # out/long-flaws/long_flaws.{json,md}

The built-in task's lists are short (3 to 6 letters), so a flaw is a good part of its response.
Here a list has 8 to 12 of the letters a to p, and a flawed response holds one mistake: two
neighbouring letters swapped at a random place (the judge names where the order goes wrong). A
filter throws away some twenty right letters with each wrong pair; CUT keeps them. A base is
trained from scratch on such lists (train.py, sft_all, as the built-in base: a quarter of its
prompts hold a judgment and the flawed answer it describes, so that it learns to read judgments).
Then, for each share of flawed responses in fixed data of `size` triples (injected flaws, the
offline setting), each method trains at the learning rate and iterations (lrs, iters) whose sampled
answers to validation lists are most accurate (seed 1), then `seeds` seeds are evaluated on test
lists. U's precision and recall (judged by the base) are measured on each share's flawed
responses. Finished runs are reused.
This is an experiment driver: it runs train.py.
"""
import json
import os
import random
import statistics
import subprocess
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import eval as ev
from data import JUDGMENT_HEADER, Triple
from scripts import online_compare
from support.settings import configure, run_program
from tasks import letters

HERE = Path(__file__).resolve().parents[1]  # the repository
ALPHABET = "abcdefghijklmnop"


@dataclass
class Config:
    out_dir: str = "out/long-flaws"
    base_iters: int = 4000        # the base from scratch (its sampled answers: see the table)
    base_size: int = 12000        # the base's triples
    shares: str = "0.5,0.9"       # flawed shares of the fine-tuning data
    size: int = 384               # fine-tuning triples, as many as an online round's judge calls
    methods: str = "cut,sft,sft_all"
    lrs: str = "3e-5,1e-4,3e-4"   # 3e-5: a filter with few answers left may keep the base best
    iters: str = "25,150"         # the grid of iterations, chosen with the rate on validation
    seeds: int = 3
    n_eval: int = 300             # validation or test lists, answers sampled at temperature 1
    jobs: int = 1                 # train.py processes at once


def make_triples(n, seed, split, flawed_share, judged=False):
    """n triples of long lists of the split (crc32 of the list, as the built-in task's splits);
    a flawed_share of the responses have two neighbouring letters swapped. judged: the judgment
    goes into the prompt (the base's data: it learns what a judged answer looks like)."""
    rng = random.Random(seed)
    triples = []
    while len(triples) < n:
        given = rng.sample(ALPHABET, rng.randint(8, 12))
        if letters.SPLITS[zlib.crc32("".join(given).encode()) % 10] != split:
            continue
        instruction = rng.choice(letters.TASK_INSTRUCTIONS).format(", ".join(given))
        answer = sorted(given)
        if rng.random() < flawed_share:
            k = rng.randrange(len(answer) - 1)
            answer[k], answer[k + 1] = answer[k + 1], answer[k]
        response = rng.choice(letters.TASK_RESPONSES).format(", ".join(answer))
        response += rng.choice(letters.TASK_REMARKS)
        judgment = letters.check_response(instruction, response).judgment
        if judged and judgment:
            instruction += JUDGMENT_HEADER + judgment
            judgment = None
        triples.append(Triple(instruction, response, judgment))
    return triples


def write(triples, path):
    rows = [dict(instruction=t.instruction, response=t.response, judgment=t.judgment)
            for t in triples]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train(c, out, *argv):
    """train.py into out, unless a finished run is there; its output in out.log beside it."""
    if (out / "train_state.pt").is_file():  # saved once, at the end (eval_interval)
        return out
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // c.jobs)))
    with open(f"{out}.log", "a") as log:
        subprocess.run([sys.executable, "train.py", f"--out_dir={out}", "--overwrite=True",
                        "--eval_interval=100000", *argv], cwd=HERE, check=True, stdout=log,
                       stderr=log, env=env)
    return out


def evaluate(c, model_dir, split):
    """The shares of sampled answers to the split's lists that are right, and of each mistake."""
    out = Path(model_dir) / f"long_eval_{split}.json"
    if not out.is_file():
        tasks = make_triples(c.n_eval, 10_000, split, 0.0)
        instructions = [t.instruction for t in tasks]
        settings = ev.Config(ckpt=str(model_dir), device="cpu", batch_size=64)
        model, tok, chat = ev.load(model_dir, settings)
        torch.manual_seed(1337)  # the same samples for the same model
        responses = ev.generate_responses(model, tok, chat, instructions, settings, 1.0, 160)
        kinds = [letters.check_response(i, r).kind for i, r in zip(instructions, responses)]
        result = {k: kinds.count(k) / len(kinds) for k in ("ok", "swap", "order", "missing",
                                                           "extra", "garbage")}
        out.write_text(json.dumps(dict(result, examples=responses[:5]), indent=1))
    return json.loads(out.read_text())


def detection(c, base, flawed):
    """U of the base (lam 2) against the swapped letters of the flawed responses."""
    settings = ev.Config(ckpt=str(base), device="cpu")
    return ev.token_detection(*ev.load(base, settings), flawed, settings)


def main(argv):
    c = configure(Config(), argv)
    root = Path(c.out_dir)
    root.mkdir(parents=True, exist_ok=True)
    base_data = write(make_triples(c.base_size, 0, "train", 0.25, judged=True),
                      root / "base.jsonl")
    base = train(c, root / "base", "--init_from=scratch", f"--data={base_data}",
                 "--loss=sft_all", f"--max_iters={c.base_iters}", "--learning_rate=2e-3",
                 "--decay_lr=True", "--min_lr=2e-4", "--warmup_iters=20", "--seed=1338")
    start = {split: evaluate(c, base, split)["ok"] for split in ("val", "test")}
    methods = c.methods.split(",")
    rows = []
    for share in map(float, c.shares.split(",")):
        triples = {s: make_triples(c.size, s, "train", share) for s in range(1, c.seeds + 1)}
        data = {s: write(ts, root / f"data-{share:g}-s{s}.jsonl") for s, ts in triples.items()}
        u = detection(c, base, [t for t in triples[1] if t.judgment])
        flawed = sum(t.judgment is not None for t in triples[1])

        def run(method, lr, iters, seed, split):
            name = online_compare.run_name(f"{share:g}-{method}", lr, iters, seed)
            out = train(c, root / name, f"--init_from={base}", f"--data={data[seed]}",
                        f"--loss={method}", f"--learning_rate={lr}", f"--max_iters={iters}",
                        f"--seed={seed}")
            return evaluate(c, out, split)
        grid = []
        for m in methods:
            for lr in c.lrs.split(","):
                grid += [(m, float(lr), int(n)) for n in c.iters.split(",")]
        with ThreadPoolExecutor(c.jobs) as pool:
            val = list(pool.map(lambda g: run(*g, 1, "val")["ok"], grid))
        chosen = online_compare.choose(grid, val)
        runs = [(m, *chosen[m][:2], s) for m in methods for s in range(1, c.seeds + 1)]
        with ThreadPoolExecutor(c.jobs) as pool:
            test = list(pool.map(lambda r: run(*r, "test"), runs))
        for m in methods:
            accs = [t["ok"] for r, t in zip(runs, test) if r[0] == m]
            rows.append(dict(share=share, method=m, lr=chosen[m][0], iters=chosen[m][1],
                             val=chosen[m][2],
                             test=statistics.mean(accs), test_min=min(accs), test_max=max(accs),
                             gain=statistics.mean(accs) - start["test"], flawed=flawed,
                             U_precision=u["U_precision"], U_recall=u["U_recall"]))
    lines = [f"base: {c.base_iters} steps, sampled accuracy {start['test']:.3f} on test lists",
             "", "| flawed share | method | lr, iters (val accuracy) | test accuracy (min-max) | "
             "gain | U precision | U recall |", "|" + " --- |" * 7]
    for r in rows:
        lines.append(f"| {r['share']:g} | `{r['method']}` | {r['lr']:g}, {r['iters']} "
                     f"({r['val']:.3f}) | {r['test']:.3f} "
                     f"({r['test_min']:.3f}-{r['test_max']:.3f}) | {r['gain']:+.3f} | "
                     f"{r['U_precision'] or 0:.3f} | {r['U_recall']:.3f} |")
    md = "\n".join(lines) + "\n"
    (root / "long_flaws.json").write_text(json.dumps(dict(config=asdict(c), base=start, rows=rows),
                                                     indent=1))
    (root / "long_flaws.md").write_text(md)
    print(md)
    return rows


if __name__ == "__main__":
    run_program(main)
