"""The IFEval comparison's table and figure, from runs of scripts/online.py --task=ifeval.

    python -m scripts.ifeval_report --runs=out/ifeval    # reads out/ifeval/METHOD-sSEED/

Per method and round: IFEval's four scores (mean over the seeds that finished the round, and their
range), the share of the round's sampled responses the judge flawed, training's frac_unlikely and
the round's wall time.
Writes RUNS/report.md and RUNS/ifeval.svg (prompt-level strict accuracy against rounds).
"""
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from scripts.online import HEADLINE
from scripts.online_compare import svg
from support.settings import configure, run_program


@dataclass
class Config:
    runs: str = "out/ifeval"


def read_runs(root):
    """{method: [the rounds of each seed's run]}: every finished round of every run."""
    found = {}
    for run in sorted(Path(root).glob("*-s*")):
        method = run.name.rsplit("-s", 1)[0]
        base = run / "round0" / "ifeval_test.json"
        if not base.is_file():
            continue
        scores = json.loads(base.read_text())
        rounds = [{k: scores[k] for k in HEADLINE["ifeval"]}]
        r = 1
        while (run / f"round{r}" / "record_test.json").is_file():
            rounds.append(json.loads((run / f"round{r}" / "record_test.json").read_text()))
            r += 1
        found.setdefault(method, []).append(rounds)
    return found


def summarize(runs):
    """Rows per (method, round), each over the seeds that have finished that round."""
    rows = []
    for method, seeds in runs.items():
        for r in range(max(len(rounds) for rounds in seeds)):
            records = [rounds[r] for rounds in seeds if len(rounds) > r]
            row = {"method": method, "round": r, "seeds": len(records)}
            for k in HEADLINE["ifeval"]:
                values = [rec[k] for rec in records]
                row[k] = (statistics.mean(values), min(values), max(values))
            for k in ("flawed_share", "train_frac_unlikely", "wall_s"):
                values = [rec[k] for rec in records if rec.get(k) is not None]
                row[k] = statistics.mean(values) if values else None
            rows.append(row)
    return rows


def markdown(rows):
    lines = ["| method | round | seeds | prompt strict | instruction strict | prompt loose | "
             "instruction loose | sampled flawed | train frac_unlikely | wall (s) |",
             "|" + " --- |" * 10]
    for row in rows:
        cells = [f"`{row['method']}`", str(row["round"]), str(row["seeds"])]
        for k in HEADLINE["ifeval"]:
            mean, low, high = row[k]
            cells.append(f"{mean:.3f} ({low:.3f}-{high:.3f})")
        for k, fmt in (("flawed_share", ".3f"), ("train_frac_unlikely", ".3f"), ("wall_s", ".0f")):
            cells.append("–" if row[k] is None else format(row[k], fmt))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def figure(rows):
    lines = {}
    for row in rows:
        lines.setdefault(row["method"], []).append(row["prompt_strict"][0])
    curves = [{"method": m, "test": points} for m, points in lines.items() if len(points) > 1]
    if not curves:
        return None
    title = "IFEval prompt-level strict accuracy against online rounds (mean over seeds)"
    return svg(curves, title)


def main(argv):
    c = configure(Config(), argv)
    rows = summarize(read_runs(c.runs))
    if not rows:
        raise FileNotFoundError(f"{c.runs}: no run of scripts.online --task=ifeval with a base "
                                "evaluation (METHOD-sSEED/round0/ifeval_test.json)")
    table = markdown(rows)
    Path(c.runs, "report.md").write_text(table)
    picture = figure(rows)
    if picture:
        Path(c.runs, "ifeval.svg").write_text(picture)
    print(table)
    return rows


if __name__ == "__main__":
    run_program(main)
