"""Every method through the online loop, each at a learning rate chosen on validation, over seeds.

    python -m scripts.refine_base                # out/refine-base/base: a base that can also refine
    python -m scripts.online_compare --jobs=2    # out/online-compare/compare.{json,md}, online.svg

For each method: 3 rounds of scripts.online from the same base at each learning rate of its grid
and each number of iterations a round (seed 1, judged on the validation instructions); the pair
whose last round is most accurate is chosen (ties: the smaller rate, then fewer iterations); then
`seeds` runs at it are judged on the test instructions (seed 1's run is the grid's, evaluated
again). Every method has the same judge calls per round. Each finished round is reused when the
command runs again.
This is an experiment driver: it runs scripts.online, which runs train.py and eval.py.
"""
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from scripts.online import Config as OnlineConfig
from support.settings import configure, run_program

HERE = Path(__file__).resolve().parents[1]  # the repository
ONLINE_ITERS = OnlineConfig.max_iters  # scripts.online's default: its runs keep their names


@dataclass
class Config:
    base: str = "out/refine-base/base"  # every method starts from it (ILF needs it to refine)
    out_dir: str = "out/online-compare"
    methods: str = "cut,sft,sft_all,hindsight,forward,ilf_mle,ilf_dpo,dpo"
    lrs: str = "1e-4,3e-4"        # the grid of every method but the DPO ones
    dpo_lrs: str = "1e-6,1e-5"    # dpo and ilf_dpo: DPO wants far smaller rates
    iters: str = "150"            # the grid of train.py iterations a round, with the rates
    rounds: int = 3
    judge_calls: int = 384        # responses judged per round
    injected: float = 0.0         # > 0: scripts.online's injected flaws instead of the samples
    lam: float = 2.0              # cut's U (scripts.online --lam): scripts.own_flaws chooses it on val
    seeds: int = 3
    jobs: int = 1                 # scripts.online processes at once


def run_name(method, lr, iters, seed):
    name = f"{method}-lr{lr}"
    if iters != ONLINE_ITERS:
        name += f"-it{iters}"
    return f"{name}-s{seed}"


def choose(grid, scores):
    """{method: (lr, iters, score)}: each method's best point of the grid of (method, lr, iters);
    ties go to the grid's order (the smaller rate, then the fewer iterations)."""
    chosen = {}
    for (m, lr, iters), score in zip(grid, scores):
        if m not in chosen or score > chosen[m][2]:
            chosen[m] = (lr, iters, score)
    return chosen


def online(c, method, lr, iters, seed, split):
    """One scripts.online run (resumed if it ran before): its summary."""
    out = Path(c.out_dir) / run_name(method, lr, iters, seed)
    out.mkdir(parents=True, exist_ok=True)
    argv = [f"--base={c.base}", f"--out_dir={out}", f"--method={method}", f"--learning_rate={lr}",
            f"--max_iters={iters}", f"--seed={seed}", f"--split={split}", f"--rounds={c.rounds}",
            f"--judge_calls={c.judge_calls}", f"--injected={c.injected}", f"--lam={c.lam}"]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // c.jobs)))
    with open(out / f"online_{split}.log", "a") as log:
        subprocess.run([sys.executable, "-m", "scripts.online", *argv], cwd=HERE, check=True,
                       stdout=log, stderr=log, env=env)
    return json.loads((out / "online.json").read_text())


def compare(c):
    methods = c.methods.split(",")
    grid = []
    for m in methods:
        rates = c.dpo_lrs if m in ("dpo", "ilf_dpo") else c.lrs
        for lr in rates.split(","):
            grid += [(m, float(lr), int(n)) for n in c.iters.split(",")]
    with ThreadPoolExecutor(c.jobs) as pool:
        val = list(pool.map(lambda g: online(c, *g, 1, "val"), grid))
    chosen = choose(grid, [summary["rounds"][-1]["accuracy"] for summary in val])
    runs = [(m, *chosen[m][:2], s) for m in methods for s in range(1, c.seeds + 1)]
    with ThreadPoolExecutor(c.jobs) as pool:
        test = list(pool.map(lambda r: online(c, *r, "test"), runs))
    rows = []
    for m in methods:
        summaries = [t for run, t in zip(runs, test) if run[0] == m]
        per_round = list(zip(*[[r["accuracy"] for r in s["rounds"]] for s in summaries]))
        rows.append(dict(method=m, lr=chosen[m][0], iters=chosen[m][1], val=chosen[m][2],
                         test=[statistics.mean(a) for a in per_round],
                         test_min=[min(a) for a in per_round], test_max=[max(a) for a in per_round],
                         swap=[statistics.mean(r["swap"] for r in rs)
                               for rs in zip(*[s["rounds"] for s in summaries])],
                         flawed_share=[statistics.mean(r["flawed_share"] for r in rs)
                                       for rs in zip(*[s["rounds"][1:] for s in summaries])]))
    return rows


def markdown(rows):
    lines = ["| method | lr, iterations (val) | test accuracy, rounds 0..R: mean (min-max over "
             "seeds) | swap |", "| --- | --- | --- | --- |"]
    for r in rows:
        acc = " / ".join(f"{m:.3f} ({lo:.2f}-{hi:.2f})"
                         for m, lo, hi in zip(r["test"], r["test_min"], r["test_max"]))
        swap = " / ".join(f"{v:.3f}" for v in r["swap"])
        lines.append(f"| `{r['method']}` | {r['lr']:g}, {r['iters']} ({r['val']:.3f}) | {acc} | "
                     f"{swap} |")
    return "\n".join(lines) + "\n"


def svg(rows, title="test accuracy against online rounds (mean over seeds), each method at its "
                     "validation-chosen learning rate"):
    """Test accuracy (or another score) against rounds, one line per method (the mean over
    seeds)."""
    colors = ["#4c78a8", "#e45756", "#54a24b", "#f58518", "#b279a2", "#9d755d", "#72b7b2",
              "#111111"]
    n = len(rows[0]["test"])
    px = lambda k: 50 + 300 * k / (n - 1)
    py = lambda v: 230 - 200 * v
    parts = [f'<text x="4" y="14">{title}</text>',
             '<line x1="50" x2="50" y1="30" y2="230" stroke="black"/>',
             '<line x1="50" x2="350" y1="230" y2="230" stroke="black"/>']
    parts += [f'<text x="{px(k):.1f}" y="244" text-anchor="middle">{k}</text>' for k in range(n)]
    parts += [f'<text x="44" y="{py(v) + 4:.1f}" text-anchor="end">{v:.1f}</text>'
              for v in (0, .5, 1)]
    for i, r in enumerate(rows):
        pts = " ".join(f"{px(k):.1f},{py(v):.1f}" for k, v in enumerate(r["test"]))
        color = colors[i % len(colors)]
        parts += [f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="2"/>',
                  f'<text x="360" y="{40 + 14 * i}" fill="{color}">{r["method"]}</text>']
    return ('<svg xmlns="http://www.w3.org/2000/svg" width="460" height="255" '
            'font-family="sans-serif" font-size="11"><rect width="100%" height="100%" '
            f'fill="white"/>{"".join(parts)}</svg>\n')


def main(argv):
    c = configure(Config(), argv)
    if not Path(c.base, "config.json").is_file():
        raise FileNotFoundError(f"base {c.base}: no checkpoint; python -m scripts.refine_base "
                                "makes it")
    rows = compare(c)
    root = Path(c.out_dir)
    (root / "compare.json").write_text(json.dumps(dict(config=asdict(c), rows=rows), indent=1))
    (root / "compare.md").write_text(markdown(rows))
    (root / "online.svg").write_text(svg(rows))
    print(markdown(rows))
    return rows


if __name__ == "__main__":
    run_program(main)
