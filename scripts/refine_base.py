"""A base for the built-in task that can also refine, as ILF needs, and how often it refines right.

    python -m scripts.refine_base                 # out/refine-base, then its refinement accuracy
    python -m scripts.online --base=out/refine-base --method=ilf_mle --out_dir=out/online-ilf_mle

A pretrained model can rewrite a response after reading a critique of it; the built-in base, trained
from scratch, learned only the task and to read judgments (make_task's 'base' data). This base is
trained the same way (train.py's base settings, from scratch) on that data plus `refine_share` of
examples that teach refining: the refinement prompt of refine.py (the instruction, a flawed
response, its judgment) answered by the correct list. Its refinements of held-out flawed responses
are then judged by the task's checker.
This is an experiment driver: it runs train.py and scripts.refine as a user would.
"""
import json
import random
import subprocess
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import train
from scripts.refine import refine_prompt
from support.settings import configure, run_program
from support.triple_files import Triple
from tasks import letters

HERE = Path(__file__).resolve().parents[1]  # the repository


@dataclass
class Config:
    out_dir: str = "out/refine-base"
    refine_share: float = 0.2     # of the base data: examples that teach refining
    n_check: int = 300            # held-out flawed responses whose refinements are judged
    seed: int = 1337              # train.py's default, so that the rest of the base is the same
    base_iters: int = 1200        # a stronger base than the quick start's


def flawed_examples(n, seed, split):
    """n judged triples of the task, each response with one mistake of the kinds the base makes
    (letters.any_mistake): ILF asks the refiner to fix the model's own mistakes, mostly letters
    never given, so it learns and is checked on those, not only on 'mixed' data's swaps."""
    rng = random.Random(seed)
    out = []
    for t in letters.make_task(n, seed=seed, kind="mixed", flawed_frac=0.0, split=split):
        answer = sorted_letters(t.instruction)
        wrong = ", ".join(letters.any_mistake(rng, answer))
        response = t.response.replace(", ".join(answer), wrong)
        judgment = letters.check_response(t.instruction, response).judgment
        out.append(Triple(t.instruction, response, judgment))
    return out


def sorted_letters(instruction):
    """The right answer to a task instruction, as a list of letters."""
    return sorted(letters.LETTER_LIST.search(instruction).group().split(", "))


def refine_examples(n, seed, split):
    """n (refinement prompt, correct answer) triples of flawed responses to the task."""
    out = []
    for t in flawed_examples(n, seed, split):
        out.append(Triple(refine_prompt(t), ", ".join(sorted_letters(t.instruction)), None))
    return out


def train_base(base, triples, root, *flags, **run_kwargs):
    """root/base: train.py from scratch at the base settings `base` on these triples (written to
    root/base_data.jsonl), unless it has finished; flags go to train.py, run_kwargs to subprocess."""
    data = root / "base_data.jsonl"
    data.write_text("".join(json.dumps(asdict(t)) + "\n" for t in triples))
    model = root / "base"
    if not (model / "train_state.pt").is_file():
        settings = replace(base, data=str(data), out_dir=str(model), init_from="scratch")
        args = [f"--{k}={v}" for k, v in asdict(settings).items() if k in TRAIN_KEYS]
        subprocess.run([sys.executable, "train.py", *args, *flags], cwd=HERE, check=True,
                       **run_kwargs)
    return model


def main(argv):
    c = configure(Config(), argv)
    root = Path(c.out_dir)
    root.mkdir(parents=True, exist_ok=True)
    base = train.base_config(train.Config(out_dir=str(root), seed=c.seed, base_iters=c.base_iters))
    n_refine = round(base.task_size * c.refine_share)
    triples = letters.make_task(base.task_size, seed=base.seed, kind="base")
    triples += refine_examples(n_refine, seed=base.seed + 7, split="train")
    random.Random(c.seed).shuffle(triples)
    model = train_base(base, triples, root)
    held = root / "check.jsonl"
    flawed = flawed_examples(c.n_check, seed=c.seed + 99, split="test")
    held.write_text("".join(json.dumps(asdict(t)) + "\n" for t in flawed))
    refined = root / "check.refined.json"
    if not refined.is_file():
        subprocess.run([sys.executable, "-m", "scripts.refine", f"--ckpt={model}", f"--data={held}",
                        f"--out_file={refined}", "--max_new_tokens=96"], cwd=HERE, check=True)
    records = json.loads(refined.read_text())
    right = sum(letters.check_response(r["instruction"], r["refinement"]).kind == "ok"
                for r in records)
    result = dict(refinements=len(records), right=right, share_right=right / len(records),
                  refine_examples=n_refine, refine_share=c.refine_share)
    (root / "refine_check.json").write_text(json.dumps(result, indent=1))
    print(f"{model}: {right} of {len(records)} refinements of held-out flawed responses are right "
          f"({right / len(records):.3f})")
    return result


# the settings of train.py's base phase that the command line carries
TRAIN_KEYS = ("data", "out_dir", "init_from", "loss", "max_iters", "learning_rate", "decay_lr",
              "min_lr", "warmup_iters", "seed", "n_layers", "n_heads", "dim", "max_len",
              "batch_size", "val_frac", "eval_interval")


if __name__ == "__main__":
    run_program(main)
