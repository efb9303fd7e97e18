"""The evidence: CUT against its baselines on the built-in task, every method tuned the same way.

    python -m scripts.compare --jobs=2        # out/compare/compare.{json,md}, figures/compare.svg and figures/curves.svg
                                              # (another --out_dir: its figures in it, not in figures/)

One base model (train.py's base phase) is fine-tuned by every method in two regimes (docs/cut.md says why):
  mixed  the base's own answer format, 25% of the responses flawed: the authors' online-iteration mix;
  new    a format that the base never writes, every response flawed: the paper's Shepherd setting.
For each method the learning rate (and lambda for cut) comes from one grid and the number of steps from one
schedule, chosen by the accuracy of sampled answers to the validation instructions (in 'new': correct and in
the new format).
The test instructions, which share no letter list with validation or training, are evaluated once, at the chosen
settings, for every seed. Each run resumes where it stopped: rerun the command after an interruption.
This is an experiment driver: it runs train.py and eval.py as a user would.
"""
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from xml.sax.saxutils import escape

import torch

import train
from support.settings import configure, run_program
from eval import markdown

HERE = Path(__file__).resolve().parents[1]  # the repository
METHODS = {"mixed": ("cut", "sft", "sft_all", "hindsight", "forward"),
           "new": ("cut", "sft_all", "hindsight", "forward")}  # sft: no acceptable response to learn from in 'new'
METRIC = {"mixed": "accuracy", "new": "ok_new_format"}  # what validation maximizes


@dataclass
class Config:
    out_dir: str = "out/compare"
    jobs: int = 1                   # train.py / eval.py processes at once
    lrs: str = "1e-4,3e-4,1e-3"     # the learning-rate grid, for every method
    lams: str = "1.1,1.5,2,3"       # cut's lambda grid
    stages: str = "50,100,200,300,450,600,900,1200"  # the schedule: steps at which validation accuracy is measured
    seeds: int = 3                  # at the chosen settings (seed 1 is the grid's own run)
    n_val: int = 300
    n_test: int = 500
    train_args: str = ""            # more train.py flags for every fine-tuning run, e.g. "--device=cuda"


def floats(text):
    return [float(v) for v in text.split(",")]


class Runner:
    """Runs train.py and eval.py in subprocesses, each logging to a file of the run it belongs to (train.py's
    beside its out_dir, which train.py writes only when it is empty or a run)."""

    def __init__(self, c):
        self.c, self.root = c, Path(c.out_dir).resolve()
        self.env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // c.jobs)))

    def sh(self, log_file, *argv):
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "a") as log:
            log.write(" ".join(argv) + "\n")
            log.flush()
            subprocess.run([sys.executable, *argv], cwd=HERE, check=True, stdout=log, stderr=log, env=self.env)

    def train_to(self, run_dir, args, steps):
        """Train (or go on training) run_dir up to `steps` iterations; a copy of the model at each stage."""
        state = run_dir / "train_state.pt"
        done = torch.load(state, map_location="cpu", weights_only=True)["iter"] if state.is_file() else 0
        if done:  # a finished run is reused only if it was trained with these settings (train.py's resume check)
            train.open_run(configure(train.Config(), [*args, f"--out_dir={run_dir}", "--resume=True"]), master=False)
        if done < steps:
            flag = "--resume=True" if done else "--overwrite=True"
            self.sh(run_dir.with_name(f"{run_dir.name}.commands.log"), "train.py", f"--out_dir={run_dir}", *args,
                    f"--max_iters={steps}", flag)
        snap = run_dir / f"step{steps}"
        if not (snap / "model.safetensors").is_file():
            snap.mkdir(exist_ok=True)
            for f in run_dir.iterdir():
                if f.is_file() and f.suffix in (".json", ".safetensors", ".model", ".jinja") and "eval" not in f.name:
                    shutil.copy(f, snap / f.name)
        return snap

    def evaluate(self, ckpt, regime, split, lam):
        out = ckpt / f"eval_{split}_{regime}_lam{lam:g}.json"
        if not out.is_file():
            n = self.c.n_val if split == "val" else self.c.n_test
            self.sh(ckpt / "commands.log", "eval.py", f"--ckpt={ckpt}", f"--task={regime}", f"--split={split}", f"--n_eval={n}",
                    f"--lam={lam}", f"--out_file={out}")
        return json.loads(out.read_text())["rows"][-1]


def run_name(method, lr, lam, seed):
    return f"{method}-lr{lr:g}" + ("" if lam is None else f"-lam{lam:g}") + f"-s{seed}"


def train_args(base, regime, method, lr, lam, seed, c):
    return ["--data=builtin", f"--task={regime}", f"--init_from={base}", f"--loss={method}", f"--learning_rate={lr}",
            f"--seed={seed}", "--eval_interval=1000", *([] if lam is None else [f"--lam={lam}"]), *c.train_args.split()]


def choose(grid):
    """{(regime, method): its settings}: the best validation point of each method over the grid and the schedule;
    ties go to fewer steps, then to the smaller learning rate and lambda."""
    chosen = {}
    for g in grid:
        for p in g["curve"]:
            key, point = (g["regime"], g["method"]), (p[METRIC[g["regime"]]], -p["step"], -g["lr"], -(g["lam"] or 0))
            if key not in chosen or point > chosen[key][0]:
                chosen[key] = (point, dict(step=p["step"], lr=g["lr"], lam=g["lam"], val=point[0]))
    return {k: v for k, (_, v) in chosen.items()}


def compare(c):
    runner, root = Runner(c), Path(c.out_dir).resolve()
    stages, lrs, lams = [int(s) for s in c.stages.split(",")], floats(c.lrs), floats(c.lams)
    # the base: train.py's own base phase, the one `python train.py` runs first
    base = root / "base"
    if not (base / "train_state.pt").is_file() or torch.load(base / "train_state.pt", weights_only=True)["iter"] < \
            train.Config().base_iters:
        runner.sh(root / "commands.log", "-c", f"import train; train.train(train.base_config(train.Config(out_dir={str(root)!r}, "
                              f"resume={(base / 'train_state.pt').is_file()}, overwrite=True)))")

    # 1. the grid, seed 1, with a validation curve along the schedule
    grid = [dict(regime=r, method=m, lr=lr, lam=lam) for r in METHODS for m in METHODS[r] for lr in lrs
            for lam in (lams if m == "cut" else [None])]

    def run_grid(g):
        run_dir = root / g["regime"] / run_name(g["method"], g["lr"], g["lam"], 1)
        args = train_args(base, g["regime"], g["method"], g["lr"], g["lam"], 1, c)
        g["curve"] = []
        for step in stages:
            snap = runner.train_to(run_dir, args, step)
            g["curve"].append({"step": step, **runner.evaluate(snap, g["regime"], "val", g["lam"] or 1.5)})
        print(f"grid {run_dir.relative_to(root)}: {[round(p[METRIC[g['regime']]], 3) for p in g['curve']]}",
              flush=True)

    with ThreadPoolExecutor(c.jobs) as pool:
        list(pool.map(run_grid, grid))

    # 2. each method's settings: its best validation point over the grid and the schedule
    chosen = choose(grid)
    lam_u = {r: chosen[r, "cut"]["lam"] for r in METHODS}  # U of every method is measured at cut's lambda

    # 3. the test split, once, at the chosen settings, for every seed
    tests = [dict(regime=r, method=m, seed=s, **chosen[r, m]) for r, m in chosen for s in range(1, c.seeds + 1)]

    def run_test(t):
        run_dir = root / t["regime"] / run_name(t["method"], t["lr"], t["lam"], t["seed"])
        snap = runner.train_to(run_dir, train_args(base, t["regime"], t["method"], t["lr"], t["lam"], t["seed"], c),
                               t["step"])
        t.update(runner.evaluate(snap, t["regime"], "test", lam_u[t["regime"]]))

    with ThreadPoolExecutor(c.jobs) as pool:
        list(pool.map(run_test, tests))
    bases = {r: {s: runner.evaluate(base, r, s, lam_u[r]) for s in ("val", "test")} for r in METHODS}
    return {"config": asdict(c), "base": bases, "grid": grid, "tests": tests,
            "chosen": [dict(regime=r, method=m, **v) for (r, m), v in chosen.items()]}


# ----------------------------------------------------------------------------- tables and charts
COLUMNS = ("accuracy", "swap", "missing", "other", "new_format", "ok_new_format", "U_precision", "U_recall",
           "frac_unlikely", "gain_wrong", "gain_other")


def summarize(result):
    """One row per (regime, method) on the test split: each metric's mean over seeds, and accuracy's spread."""
    rows = []
    for regime in METHODS:
        b = result["base"][regime]["test"]
        rows.append(dict(regime=regime, method="(base)", lr=None, lam=None, step=0, seeds=1,
                         **{k: b[k] for k in COLUMNS}, spread="–"))
        for ch in (ch for ch in result["chosen"] if ch["regime"] == regime):
            ts = [t for t in result["tests"] if (t["regime"], t["method"]) == (regime, ch["method"])]
            key = METRIC[regime]
            vals = [t[key] for t in ts]
            mean = {k: statistics.fmean(t[k] for t in ts if t[k] is not None) if any(t[k] is not None for t in ts)
                    else None for k in COLUMNS}
            rows.append(dict(regime=regime, method=ch["method"], lr=f"{ch['lr']:g}",
                             lam=None if ch["lam"] is None else f"{ch['lam']:g}", step=ch["step"],
                             seeds=len(ts), **mean, spread=f"± {statistics.pstdev(vals):.3f} "
                                                          f"({min(vals):.3f}–{max(vals):.3f})"))
    return rows


def report(result):
    rows = summarize(result)
    md = ["## Test split, at each method's validation-chosen settings (mean over seeds)\n",
          markdown(rows, ["regime", "method", "lr", "lam", "step", "seeds", "accuracy", "spread", "swap", "missing",
                       "other", "new_format", "ok_new_format"]),
          "\n## The same runs: token detection at cut's chosen lambda, on held-out flawed responses\n",
          markdown(rows, ["regime", "method", "U_precision", "U_recall", "frac_unlikely", "gain_wrong", "gain_other"]),
          "\n## Validation: cut's lambda sweep (best step and learning rate for each lambda)\n"]
    sweep = []
    for regime in METHODS:
        for lam in sorted({g["lam"] for g in result["grid"] if (g["regime"], g["method"]) == (regime, "cut")}):
            pts = [(p[METRIC[regime]], g["lr"], p) for g in result["grid"] if (g["regime"], g["method"], g["lam"])
                   == (regime, "cut", lam) for p in g["curve"]]
            best = max(pts, key=lambda x: x[0])
            sweep.append(dict(regime=regime, lam=f"{lam:g}", lr=f"{best[1]:g}",
                              **{k: best[2][k] for k in ("step", *COLUMNS)}))
    md.append(markdown(sweep, ["regime", "lam", "lr", "step", "accuracy", "swap", "missing", "new_format",
                            "ok_new_format", "frac_unlikely", "U_precision", "U_recall"]))
    md.append("\n## Validation curves at the chosen learning rate (and lambda): the selection metric per step\n")
    curves = []
    for ch in result["chosen"]:
        g = next(g for g in result["grid"] if (g["regime"], g["method"], g["lr"], g["lam"])
                 == (ch["regime"], ch["method"], ch["lr"], ch["lam"]))
        curves.append(dict(regime=ch["regime"], method=ch["method"],
                           **{f"step {p['step']}": p[METRIC[ch["regime"]]] for p in g["curve"]}))
    md.append(markdown(curves, ["regime", "method", *[k for k in curves[0] if k.startswith("step")]]))
    return "".join(md), rows, curves


def svg_bars(rows):
    """Test accuracy (in 'new': correct and in the new format) and the judged flaws' rate, per method and regime."""
    y = lambda v: f"{250 - 200 * v:.1f}"
    parts, x = ['<text x="4" y="14">test split, mean over seeds: blue = accuracy (new: correct and in the new '
                'format), red = answers with a judged flaw (swap or missing)</text>'
                '<line x1="42" x2="42" y1="50" y2="250" stroke="black"/><text x="38" y="250" text-anchor="end">0'
                '</text><text x="38" y="54" text-anchor="end">1</text>'], 50
    for regime in METHODS:
        parts.append(f'<text x="{x}" y="38">{regime}</text>')
        for r in (r for r in rows if r["regime"] == regime):
            good, flaw = r[METRIC[regime]], r["swap"] + r["missing"]
            parts += [f'<rect x="{x}" y="{y(good)}" width="14" height="{200 * good:.1f}" fill="#4c78a8"/>',
                      f'<rect x="{x + 14}" y="{y(flaw)}" width="14" height="{200 * flaw:.1f}" fill="#e45756"/>',
                      f'<text transform="translate({x + 10},258) rotate(60)">{escape(r["method"])}</text>']
            x += 40
        x += 30
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{max(x, 600)}" height="340" font-family="sans-serif" '
            f'font-size="11"><rect width="100%" height="100%" fill="white"/>{"".join(parts)}</svg>\n')


def svg_curves(curves):
    """Validation curves of every method at its chosen settings, one panel per regime."""
    colors = ["#4c78a8", "#e45756", "#54a24b", "#f58518", "#b279a2"]
    parts = ['<text x="4" y="14">validation selection metric against fine-tuning steps, at each method\'s '
             'chosen learning rate (and lambda)</text>']
    for p, regime in enumerate(METHODS):
        x0 = 50 + p * 330
        parts.append(f'<text x="{x0}" y="36">{regime}: {METRIC[regime]}</text><line x1="{x0}" x2="{x0}" y1="44" '
                     f'y2="244" stroke="black"/><line x1="{x0}" x2="{x0 + 260}" y1="244" y2="244" stroke="black"/>')
        rows = [r for r in curves if r["regime"] == regime]
        steps = [int(k.split()[1]) for k in rows[0] if k.startswith("step")]
        px = lambda s: x0 + 260 * s / max(steps)
        for i, r in enumerate(rows):
            pts = " ".join(f"{px(s):.1f},{244 - 200 * r[f'step {s}']:.1f}" for s in steps)
            parts += [f'<polyline points="{pts}" fill="none" stroke="{colors[i]}" stroke-width="2"/>',
                      f'<text x="{x0 + 265}" y="{60 + 14 * i}" fill="{colors[i]}">{r["method"]}</text>']
        parts += [f'<text x="{px(s):.1f}" y="258" text-anchor="middle">{s}</text>' for s in steps]
    return ('<svg xmlns="http://www.w3.org/2000/svg" width="720" height="270" font-family="sans-serif" '
            f'font-size="11"><rect width="100%" height="100%" fill="white"/>{"".join(parts)}</svg>\n')


def check(c):
    """Each list setting, parsed before any run: one line naming the setting that is wrong."""
    for key, parse in (("lrs", float), ("lams", float), ("stages", int)):
        try:
            values = [parse(v) for v in getattr(c, key).split(",")]
        except ValueError:
            raise ValueError(f"config key {key!r}: expected comma-separated {parse.__name__}s, "
                             f"got {getattr(c, key)!r}") from None
        if not all(0 < v < math.inf for v in values):
            raise ValueError(f"config key {key!r}: expected finite values > 0, got {getattr(c, key)!r}")
    for key in ("jobs", "seeds", "n_val", "n_test"):
        if getattr(c, key) < 1:
            raise ValueError(f"config key {key!r}: expected >= 1, got {getattr(c, key)}")


def main(argv):
    c = configure(Config(), argv)
    check(c)
    result = compare(c)
    md, rows, curves = report(result)
    root = Path(c.out_dir)
    (root / "compare.json").write_text(json.dumps(dict(result, summary=rows), indent=1))
    (root / "compare.md").write_text(md)
    # the repository's figures come from the default run only: another out_dir keeps its own
    figures = HERE / "figures" if c.out_dir == Config.out_dir else root
    figures.mkdir(exist_ok=True)
    (figures / "compare.svg").write_text(svg_bars(rows))
    (figures / "curves.svg").write_text(svg_curves(curves))
    print(md)


if __name__ == "__main__":
    run_program(main)
