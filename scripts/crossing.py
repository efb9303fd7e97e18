"""When do judgments beat filtering? CUT against rejection sampling (sft) and DPO over bases of
different strength, through one online round on the model's own mistakes, and against injected ones.

    python -m scripts.crossing --jobs=2      # out/crossing/crossing.{json,md}, crossing.svg

Each base is the built-in task's base trained for fewer or more steps (base_steps): the weaker it
is, the more of its own sampled answers the judge flaws. From each base, at each number of judge
calls (sizes: the responses sampled and judged in the round), scripts.online_compare runs one
round of every method, chooses its learning rate on validation and runs `seeds` seeds on test.
The injected setting does the same from one base with the task's fixed responses instead of the
samples, a share of them flawed by the task's own mistakes (the offline setting), so that the two
settings can be told apart. The first table gives each method's test accuracy gained over its base
against the flawed share; the second, for each point, U's precision and recall (judged by the
base) on the round's own flawed responses and their kinds of mistake; the crossings are named
where CUT's gain minus rejection sampling's changes sign beyond the seeds' spread. Finished runs
are reused.
This is an experiment driver: it runs train.py and scripts.online_compare.
"""
import json
import os
import subprocess
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import eval as ev
from scripts import online_compare
from support.settings import configure, run_program
from support.triple_files import load_triples
from tasks import letters

HERE = Path(__file__).resolve().parents[1]  # the repository
COLORS = {"cut": "#e45756", "sft": "#4c78a8", "dpo": "#54a24b", "sft_all": "#f58518"}
DASHES = ("", "5,3", "2,2", "8,3,2,3")  # one per (setting, size): own flaws first


@dataclass
class Config:
    out_dir: str = "out/crossing"
    # train.py --base_iters of each base, weakest first: 95% of the samples of the 800-step base are
    # flawed, 73% at 1000, 38% at 1200, 17% at 2400 (scripts.own_flaws)
    base_steps: str = "800,1000,1200,2400"
    sizes: str = "384,48"         # judge calls in the round: plenty, and few acceptable answers
    methods: str = "cut,sft,dpo"
    lrs: str = "1e-4,3e-4"
    dpo_lrs: str = "1e-6,1e-5"
    lam: float = 2.0              # cut's U: scripts.own_flaws chooses it on validation
    iters: str = "150"            # train.py iterations a round, chosen with the rate on validation
    small_iters: str = "25,150"   # the same for the sizes after the first: few triples overfit
    seeds: int = 3
    jobs: int = 1
    # injected flaws: the round's responses are the task's fixed data, this share flawed (offline),
    # at the first size, from the base of injected_base steps
    injected: str = "0.25,0.5,0.75,0.95,1.0"
    injected_base: int = 1200
    injected_methods: str = "cut,sft,sft_all"  # no dpo: one fixed response per instruction
    injected_iters: str = "25,150"  # few acceptable responses: the filter's 150 iterations overfit


def make_base(c, iters):
    """The built-in base after `iters` steps (train.py's own base, one CUT step after it unused)."""
    run = Path(c.out_dir) / f"base{iters}"
    base = run / "base"
    if not (run / "config.json").is_file():  # the CUT step saves once the base has finished
        run.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // c.jobs)))
        with open(Path(c.out_dir) / f"base{iters}.log", "a") as log:
            subprocess.run([sys.executable, "train.py", f"--out_dir={run}",
                            f"--base_iters={iters}", "--max_iters=1", "--overwrite=True"],
                           cwd=HERE, check=True, stdout=log, stderr=log, env=env)
    return base


def one_point(c, base, name, size, iters, injected=0.0):
    """One round of every method from the base (online_compare: lr and iterations chosen on
    validation, seeds on test): its rows."""
    settings = online_compare.Config(
        base=str(base), out_dir=str(Path(c.out_dir) / name), lrs=c.lrs, iters=iters,
        methods=c.injected_methods if injected else c.methods,
        dpo_lrs=c.dpo_lrs, lam=c.lam, rounds=1, judge_calls=size, injected=injected,
        seeds=c.seeds, jobs=c.jobs)
    return online_compare.compare(settings)


def detection(c, base, rows, name):
    """U of the base (at lam) against the judge's wrong tokens on the round's flawed responses (seed
    1's, the same data for every method but dpo), and those responses' kinds of mistake; U on
    the task's flawed responses, from round 0's evaluation."""
    cut = next(r for r in rows if r["method"] == "cut")
    run = Path(c.out_dir) / name / online_compare.run_name("cut", cut["lr"], cut["iters"], 1)
    data = run / "round1" / "data.jsonl"
    flawed = [t for t in load_triples(data, verbose=False) if t.judgment]
    settings = ev.Config(ckpt=str(base), device="cpu", lam=c.lam)
    model, tok, chat = ev.load(base, settings)
    kinds = Counter(letters.check_response(t.instruction, t.response).kind for t in flawed)
    shares = {k: kinds[k] / len(flawed) for k in ("swap", "missing", "order", "extra", "garbage")}
    u_task = json.loads((run / "round0" / "eval_test.json").read_text())["rows"][-1]
    return dict(ev.token_detection(model, tok, chat, flawed, settings), flawed=len(flawed),
                U_precision_task=u_task["U_precision"], U_recall_task=u_task["U_recall"],
                **shares)


def sweep(c):
    """Points (a method's gain at a base, size and setting) and detections (U at each base)."""
    points = []
    detections = []
    sizes = [int(size) for size in c.sizes.split(",")]
    runs = []  # (setting, base iters, judge calls, the grid of iterations a round, injected share)
    for iters in map(int, filter(None, c.base_steps.split(","))):
        runs.append(("own", iters, sizes[0], c.iters, 0.0))
        runs += [("own", iters, size, c.small_iters, 0.0) for size in sizes[1:]]
    for share in map(float, filter(None, c.injected.split(","))):
        runs.append(("injected", c.injected_base, sizes[0], c.injected_iters, share))
    for setting, iters, size, grid, share in runs:
        base = make_base(c, iters)
        name = f"base{iters}-n{size}" + (f"-injected{share:g}" if share else "")
        rows = one_point(c, base, name, size, grid, share)
        u = detection(c, base, rows, name)
        detections.append(dict(setting=setting, base_iters=iters, size=size,
                               flawed_share=rows[0]["flawed_share"][0], **u))
        for row in rows:
            start = row["test"][0]
            points.append(dict(
                setting=setting, base_iters=iters, size=size, method=row["method"], lr=row["lr"],
                iters=row["iters"],
                flawed_share=row["flawed_share"][0], base_accuracy=start,
                accuracy=row["test"][1], gain=row["test"][1] - start,
                gain_min=row["test_min"][1] - start, gain_max=row["test_max"][1] - start,
                swap=row["swap"][1]))
    return points, detections


def crossings(points):
    """Per setting and size: the flawed shares between two points where CUT's gain minus sft's
    changes sign, each side's difference beyond the seeds' spread (else it is noise)."""
    found = []
    for group in sorted({(p["setting"], p["size"]) for p in points}):
        at = {}  # flawed share (CUT's) -> {method: point}
        for p in points:
            if (p["setting"], p["size"]) == group:
                key = (p["base_iters"], p["flawed_share"] if p["setting"] == "injected" else 0)
                at.setdefault(key, {})[p["method"]] = p
        diffs = []
        for methods in at.values():
            if "cut" in methods and "sft" in methods:
                cut = methods["cut"]
                sft = methods["sft"]
                clear = cut["gain_min"] > sft["gain_max"] or sft["gain_min"] > cut["gain_max"]
                diffs.append((cut["flawed_share"], cut["gain"] - sft["gain"], clear))
        diffs.sort()
        for (s0, d0, clear0), (s1, d1, clear1) in zip(diffs, diffs[1:]):
            if (d0 > 0) != (d1 > 0) and clear0 and clear1:
                share = s0 + (s1 - s0) * d0 / (d0 - d1)  # linear between the two points
                found.append(dict(setting=group[0], size=group[1], flawed_share=share, low=s0,
                                  high=s1))
    return found


def markdown(points, detections, found):
    lines = ["| setting | base iters | judge calls | flawed share | base accuracy | method | "
             "lr, iters | gain (min-max) | swap | other mistakes |", "|" + " --- |" * 10]
    order = lambda p: (p["setting"] != "own", -p["size"], p["base_iters"], p["flawed_share"])
    for p in sorted(points, key=lambda p: (*order(p), p["method"])):
        lines.append(f"| {p['setting']} | {p['base_iters']} | {p['size']} | "
                     f"{p['flawed_share']:.3f} | {p['base_accuracy']:.3f} | `{p['method']}` | "
                     f"{p['lr']:g}, {p['iters']} | {p['gain']:+.3f} ({p['gain_min']:+.3f} to "
                     f"{p['gain_max']:+.3f}) | {p['swap']:.3f} | "
                     f"{1 - p['accuracy'] - p['swap']:.3f} |")
    lines += ["", "| setting | base iters | judge calls | flawed share | flawed | swap | missing | "
              "order | extra | garbage | U precision | U recall | frac_unlikely | gain_wrong | "
              "gain_other | U precision, recall (task's flaws) |", "|" + " --- |" * 16]
    for d in sorted(detections, key=order):
        lines.append(f"| {d['setting']} | {d['base_iters']} | {d['size']} | "
                     f"{d['flawed_share']:.3f} | {d['flawed']} | {d['swap']:.2f} | "
                     f"{d['missing']:.2f} | {d['order']:.2f} | {d['extra']:.2f} | "
                     f"{d['garbage']:.2f} | {d['U_precision'] or 0:.3f} | {d['U_recall']:.3f} | "
                     f"{d['frac_unlikely']:.3f} | {d['gain_wrong']:+.2f} | "
                     f"{d['gain_other']:+.2f} | {d['U_precision_task'] or 0:.3f}, "
                     f"{d['U_recall_task']:.3f} |")
    lines.append("")
    for f in found:
        lines.append(f"- {f['setting']} flaws, {f['size']} judge calls: CUT's gain crosses sft's "
                     f"at a flawed share of about {f['flawed_share']:.2f} (between "
                     f"{f['low']:.2f} and {f['high']:.2f})")
    if not found:
        lines.append("- no crossing: nowhere does the sign of CUT's gain minus sft's change "
                     "between two points where both differences exceed the seeds' spread")
    return "\n".join(lines) + "\n"


def svg(points):
    """Accuracy gained against the flawed share; a line per method (color) and per setting and
    size (dashes)."""
    px = lambda share: 50 + 300 * share
    py = lambda gain: 130 - 100 * gain  # gains from -1 to +1
    parts = ['<text x="4" y="14">test accuracy gained in one round against the flawed share of '
             'its responses (mean over seeds)</text>',
             '<line x1="50" x2="50" y1="30" y2="230" stroke="black"/>',
             '<line x1="50" x2="350" y1="130" y2="130" stroke="#999"/>']
    parts += [f'<text x="{px(s):.1f}" y="244" text-anchor="middle">{s:.1f}</text>'
              for s in (0, .5, 1)]
    parts += [f'<text x="44" y="{py(g) + 4:.1f}" text-anchor="end">{g:+.1f}</text>'
              for g in (-1, 0, 1)]
    groups = sorted({(p["setting"] != "own", -p["size"]) for p in points})
    k = 0
    for dash, (injected, size) in zip(DASHES, groups):
        setting = "injected" if injected else "own"
        for method in dict.fromkeys(p["method"] for p in points):
            line = sorted((p["flawed_share"], p["gain"]) for p in points
                          if (p["setting"], p["size"], p["method"]) == (setting, -size, method))
            if not line:
                continue
            pts = " ".join(f"{px(s):.1f},{py(g):.1f}" for s, g in line)
            color = COLORS.get(method, "#111111")
            y = 40 + 14 * k
            parts += [f'<polyline points="{pts}" fill="none" stroke="{color}" '
                      f'stroke-width="2" stroke-dasharray="{dash}"/>',
                      f'<line x1="360" x2="380" y1="{y - 4}" y2="{y - 4}" stroke="{color}" '
                      f'stroke-width="2" stroke-dasharray="{dash}"/>',
                      f'<text x="385" y="{y}" fill="{color}">{method}, {setting}, {-size}</text>']
            k += 1
    return ('<svg xmlns="http://www.w3.org/2000/svg" width="520" height="255" '
            'font-family="sans-serif" font-size="11"><rect width="100%" height="100%" '
            f'fill="white"/>{"".join(parts)}</svg>\n')


def main(argv):
    c = configure(Config(), argv)
    points, detections = sweep(c)
    found = crossings(points)
    root = Path(c.out_dir)
    (root / "crossing.json").write_text(json.dumps(dict(
        config=asdict(c), points=points, detections=detections, crossings=found), indent=1))
    (root / "crossing.md").write_text(markdown(points, detections, found))
    (root / "crossing.svg").write_text(svg(points))
    print(markdown(points, detections, found))
    return points


if __name__ == "__main__":
    run_program(main)
