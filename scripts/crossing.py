"""When do judgments beat filtering? CUT against rejection sampling (sft) and DPO over bases of
different strength, through one online round on the model's own mistakes.

    python -m scripts.crossing --jobs=2      # out/crossing/crossing.{json,md}, crossing.svg

Each base is the built-in task's base trained for fewer or more steps (base_steps): the weaker it
is, the more of its own sampled answers the judge flaws. From each base, at each number of judge
calls (sizes: the responses sampled and judged in the round), scripts.online_compare runs one
round of every method, chooses its learning rate on validation and runs `seeds` seeds on test.
The table gives each method's test accuracy gained over its base against the base's flawed share,
with U's precision and recall on the base (how well CUT's token detection finds the judged flaw),
and names where CUT's gain crosses rejection sampling's. Finished runs are reused.
This is an experiment driver: it runs train.py and scripts.online_compare.
"""
import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from scripts import online_compare
from support.settings import configure, run_program

HERE = Path(__file__).resolve().parents[1]  # the repository
COLORS = {"cut": "#e45756", "sft": "#4c78a8", "dpo": "#54a24b"}


@dataclass
class Config:
    out_dir: str = "out/crossing"
    # train.py --base_iters of each base, weakest first: 99% of the samples of the 400-step base are
    # flawed, 45% at 1200, 25% at 2400 (100 and 200 steps: no right answer at all)
    base_steps: str = "400,800,1200,1800,2400"
    sizes: str = "384,48"         # judge calls in the round: plenty, and few acceptable answers
    methods: str = "cut,sft,dpo"
    lrs: str = "1e-4,3e-4"
    dpo_lrs: str = "1e-6,1e-5"
    seeds: int = 3
    jobs: int = 1


def make_base(c, iters):
    """The built-in base after `iters` steps (train.py's own base, one CUT step after it unused)."""
    run = Path(c.out_dir) / f"base{iters}"
    base = run / "base"
    if not (run / "config.json").is_file():  # the CUT step saves once the base has finished
        run.mkdir(parents=True, exist_ok=True)
        with open(Path(c.out_dir) / "train.log", "a") as log:
            subprocess.run([sys.executable, "train.py", f"--out_dir={run}",
                            f"--base_iters={iters}", "--max_iters=1", "--overwrite=True"],
                           cwd=HERE, check=True, stdout=log, stderr=log)
    return base


def sweep(c):
    points = []
    for iters in map(int, c.base_steps.split(",")):
        base = make_base(c, iters)
        for size in map(int, c.sizes.split(",")):
            settings = online_compare.Config(
                base=str(base), out_dir=str(Path(c.out_dir) / f"base{iters}-n{size}"),
                methods=c.methods, lrs=c.lrs, dpo_lrs=c.dpo_lrs, rounds=1, judge_calls=size,
                seeds=c.seeds, jobs=c.jobs)
            rows = online_compare.compare(settings)
            u = json.loads((base / "eval_test.json").read_text())["rows"][-1]  # round 0's
            for row in rows:
                start = row["test"][0]
                points.append(dict(
                    base_iters=iters, size=size, method=row["method"], lr=row["lr"],
                    flawed_share=row["flawed_share"][0], base_accuracy=start,
                    accuracy=row["test"][1], gain=row["test"][1] - start,
                    gain_min=row["test_min"][1] - start, gain_max=row["test_max"][1] - start,
                    swap=row["swap"][1], U_precision=u["U_precision"], U_recall=u["U_recall"],
                    gain_other=u["gain_other"]))
    return points


def crossings(points):
    """Per size: the flawed shares between two bases where CUT's gain minus sft's changes sign."""
    found = []
    for size in sorted({p["size"] for p in points}):
        gain = {(p["method"], p["base_iters"]): p for p in points if p["size"] == size}
        bases = sorted({p["flawed_share"]: p["base_iters"] for p in points
                        if p["size"] == size and p["method"] == "cut"}.items())
        diffs = []
        for share, iters in bases:
            if ("sft", iters) in gain:
                diffs.append((share, gain[("cut", iters)]["gain"] - gain[("sft", iters)]["gain"]))
        for (s0, d0), (s1, d1) in zip(diffs, diffs[1:]):
            if (d0 > 0) != (d1 > 0):
                at = s0 + (s1 - s0) * d0 / (d0 - d1)  # linear between the two bases
                found.append(dict(size=size, flawed_share=at, low=s0, high=s1))
    return found


def markdown(points, found):
    lines = ["| base iters | judge calls | base flawed share | base accuracy | method | lr | "
             "gain (min-max) | swap | U precision | U recall |", "|" + " --- |" * 10]
    for p in sorted(points, key=lambda p: (p["size"], p["base_iters"], p["method"])):
        lines.append(f"| {p['base_iters']} | {p['size']} | {p['flawed_share']:.3f} | "
                     f"{p['base_accuracy']:.3f} | `{p['method']}` | {p['lr']:g} | "
                     f"{p['gain']:+.3f} ({p['gain_min']:+.3f} to {p['gain_max']:+.3f}) | "
                     f"{p['swap']:.3f} | {p['U_precision'] or 0:.3f} | {p['U_recall']:.3f} |")
    lines.append("")
    for f in found:
        lines.append(f"- {f['size']} judge calls: CUT's gain crosses sft's at a flawed share of "
                     f"about {f['flawed_share']:.2f} (between {f['low']:.2f} and {f['high']:.2f})")
    if not found:
        lines.append("- no crossing: one method's gain is above the other's at every base")
    return "\n".join(lines) + "\n"


def svg(points):
    """Accuracy gained against the base's flawed share; a line per method (color) and size (solid:
    the first size, dashed: the others)."""
    px = lambda share: 50 + 300 * share
    py = lambda gain: 130 - 100 * gain  # gains from -1 to +1
    parts = ['<text x="4" y="14">test accuracy gained in one online round against the base\'s '
             'flawed share (mean over seeds)</text>',
             '<line x1="50" x2="50" y1="30" y2="230" stroke="black"/>',
             '<line x1="50" x2="350" y1="130" y2="130" stroke="#999"/>']
    parts += [f'<text x="{px(s):.1f}" y="244" text-anchor="middle">{s:.1f}</text>'
              for s in (0, .5, 1)]
    parts += [f'<text x="44" y="{py(g) + 4:.1f}" text-anchor="end">{g:+.1f}</text>'
              for g in (-1, 0, 1)]
    sizes = sorted({p["size"] for p in points}, reverse=True)
    k = 0
    for size in sizes:
        for method in dict.fromkeys(p["method"] for p in points):
            line = sorted((p["flawed_share"], p["gain"]) for p in points
                          if p["size"] == size and p["method"] == method)
            pts = " ".join(f"{px(s):.1f},{py(g):.1f}" for s, g in line)
            color = COLORS.get(method, "#111111")
            dash = "" if size == sizes[0] else ' stroke-dasharray="5,3"'
            parts += [f'<polyline points="{pts}" fill="none" stroke="{color}" '
                      f'stroke-width="2"{dash}/>',
                      f'<text x="360" y="{40 + 14 * k}" fill="{color}">{method}, {size}</text>']
            k += 1
    return ('<svg xmlns="http://www.w3.org/2000/svg" width="460" height="255" '
            'font-family="sans-serif" font-size="11"><rect width="100%" height="100%" '
            f'fill="white"/>{"".join(parts)}</svg>\n')


def main(argv):
    c = configure(Config(), argv)
    points = sweep(c)
    found = crossings(points)
    root = Path(c.out_dir)
    (root / "crossing.json").write_text(json.dumps(dict(config=asdict(c), points=points,
                                                        crossings=found), indent=1))
    (root / "crossing.md").write_text(markdown(points, found))
    (root / "crossing.svg").write_text(svg(points))
    print(markdown(points, found))
    return points


if __name__ == "__main__":
    run_program(main)
