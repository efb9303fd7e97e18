"""U on the model's own flaws: does the built-in base read the judgments of its own mistakes?

    python -m scripts.own_flaws --jobs=2     # out/own-flaws/own_flaws.{json,md}

For each base (train.py's built-in base after base_steps steps), sample its answers at temperature 1
to n instructions of the validation and of the test split, judge them with the task's judge, and
measure U (eval.py's token_detection: U of the base against the judge's wrong tokens) on the flawed
ones, at each lambda of the grid. lambda is chosen on validation (the highest recall at precision
>= 0.7; else the highest precision) and reported on test, with each kind of mistake's share and
recall. The bases of unnamed_steps are trained and judged a second time with judgments that name
the place only (name_letters=False): what naming the letters does to U. Finished parts are reused.
This is an experiment driver: it runs train.py and eval.py's functions.
"""
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

import eval as ev
import train
from scripts import crossing, refine_base
from support.settings import configure, run_program
from support.triple_files import Triple
from tasks import letters

KINDS = ("swap", "missing", "order", "extra", "garbage")


@dataclass
class Config:
    out_dir: str = "out/own-flaws"
    bases_dir: str = "out/crossing"  # the bases, shared with scripts.crossing
    base_steps: str = "600,800,1000,1200,2400"  # 98%, 95%, 73%, 38% and 17% of samples flawed
    unnamed_steps: str = "1200"   # bases also trained and judged with name_letters=False
    n: int = 384                  # instructions sampled per split
    lams: str = "1.1,1.5,2,3,4"
    min_precision: float = 0.7
    seed: int = 1
    jobs: int = 1


def where(c, steps, named):
    return Path(c.out_dir) / f"base{steps}-{'named' if named else 'unnamed'}"


def make_base(c, steps, named):
    """The built-in base after `steps` steps (scripts.crossing's), or one whose judged data name no
    letter: the same recipe from a data file."""
    if named:
        return crossing.make_base(crossing.Config(out_dir=c.bases_dir, jobs=c.jobs), steps)
    run = where(c, steps, named)
    run.mkdir(parents=True, exist_ok=True)
    base = train.base_config(train.Config(out_dir=str(run), base_iters=steps))
    triples = letters.make_task(base.task_size, seed=base.seed, kind="base", name_letters=named)
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // c.jobs)))
    with open(run / "train.log", "a") as log:
        return refine_base.train_base(base, triples, run, "--overwrite=True", stdout=log,
                                      stderr=log, env=env)


def own_flaws(c, model, split, named, run):
    """The base's sampled answers to n instructions of split that the judge flaws (Triples)."""
    out = run / f"samples_{split}.json"
    settings = ev.Config(ckpt=str(model), device="cpu")
    loaded = ev.load(model, settings)
    if not out.is_file():
        tasks = letters.make_task(c.n, seed=c.seed * 1000 + len(split), split=split)
        instructions = [t.instruction for t in tasks]
        torch.manual_seed(c.seed)
        responses = ev.generate_responses(*loaded, instructions, settings, 1.0, 96)
        out.write_text(json.dumps(list(zip(instructions, responses))))
    samples = json.loads(out.read_text())
    verdicts = [letters.check_response(x, y, named) for x, y in samples]
    flawed = [Triple(x, y, v.judgment) for (x, y), v in zip(samples, verdicts) if v.judgment]
    return loaded, settings, flawed, len(samples)


def detect(c, model, named, run):
    """U of one base on its own flaws: lambda chosen on val, the figures on test."""
    val_loaded, settings, val_flawed, _ = own_flaws(c, model, "val", named, run)
    at = {}
    for lam in map(float, c.lams.split(",")):
        at[lam] = ev.token_detection(*val_loaded, val_flawed, replace(settings, lam=lam))
    good = [lam for lam in at if (at[lam]["U_precision"] or 0) >= c.min_precision]
    if good:
        lam = max(good, key=lambda k: at[k]["U_recall"])
    else:
        lam = max(at, key=lambda k: at[k]["U_precision"] or 0)
    loaded, settings, flawed, n = own_flaws(c, model, "test", named, run)
    settings = replace(settings, lam=lam)
    row = dict(named=named, lam=lam, flawed_share=len(flawed) / n, flawed=len(flawed),
               val={str(k): v for k, v in at.items()})
    row.update(ev.token_detection(*loaded, flawed, settings))
    kinds = [letters.check_response(t.instruction, t.response).kind for t in flawed]
    for kind in KINDS:
        mine = [t for t, k in zip(flawed, kinds) if k == kind]
        row[kind] = len(mine) / len(flawed)
        if mine and kind != "garbage":  # garbage has no wrong token to find
            row[f"{kind}_recall"] = ev.token_detection(*loaded, mine, settings)["U_recall"]
    return row


def one_base(c, steps, named):
    model = make_base(c, steps, named)
    run = where(c, steps, named)
    run.mkdir(parents=True, exist_ok=True)
    result = run / "own_flaws.json"
    if not result.is_file():
        row = detect(c, model, named, run)
        result.write_text(json.dumps(dict(base_steps=steps, **row), indent=1))
    return json.loads(result.read_text())


def markdown(rows):
    head = ["base steps", "letters named", "flawed share", "flawed", *KINDS, "lambda (val)",
            "U precision", "U recall", "frac_unlikely", "gain_wrong", "gain_other",
            "recall: swap, missing, order, extra"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        recall = ", ".join(f"{r[k + '_recall']:.2f}" if k + "_recall" in r else "-"
                           for k in KINDS[:4])
        cells = [r["base_steps"], "yes" if r["named"] else "no", f"{r['flawed_share']:.3f}",
                 r["flawed"], *[f"{r[k]:.2f}" for k in KINDS], f"{r['lam']:g}",
                 f"{r['U_precision']:.3f}", f"{r['U_recall']:.3f}", f"{r['frac_unlikely']:.3f}",
                 f"{r['gain_wrong']:+.2f}", f"{r['gain_other']:+.2f}", recall]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def main(argv):
    c = configure(Config(), argv)
    runs = [(int(s), True) for s in c.base_steps.split(",")]
    runs += [(int(s), False) for s in filter(None, c.unnamed_steps.split(","))]
    torch.set_num_threads(max(1, torch.get_num_threads() // c.jobs))
    with ThreadPoolExecutor(c.jobs) as pool:
        rows = list(pool.map(lambda r: one_base(c, *r), runs))
    root = Path(c.out_dir)
    (root / "own_flaws.json").write_text(json.dumps(dict(config=asdict(c), rows=rows), indent=1))
    (root / "own_flaws.md").write_text(markdown(rows))
    print(markdown(rows))
    return rows


if __name__ == "__main__":
    run_program(main)
