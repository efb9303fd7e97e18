"""ILF's refinements (Scheurer et al. 2023, arXiv 2303.16755): a better response to each flawed
triple of a file, written by a checkpoint from the instruction, the response and its judgment.

    python -m scripts.refine --data=triples.json --ckpt=DIR --out_file=refined.json
    python train.py --init_from=DIR --data=refined.json --loss=ilf_mle     # or --loss=ilf_dpo

The output is a triples file again: every triple of --data, each flawed one with its `refinement`
(greedy, up to max_new_tokens). The prompt is refine_prompt's, in the checkpoint's chat format
or the Alpaca template (--chat, as in eval.py).
"""
import json
from dataclasses import dataclass
from pathlib import Path

import eval as ev
from data import JUDGMENT_HEADER
from support.settings import configure, run_program
from support.triple_files import load_triples

# ILF's refiner reads the instruction, a flawed response and its judgment, and writes a better one
REFINE = "{instruction}\n\n### Response to improve:\n{response}" + JUDGMENT_HEADER + "{judgment}"


@dataclass
class Config:
    data: str = ""                # a triples file
    ckpt: str = "out"             # the refiner: an out_dir, a Hugging Face or Meta directory
    out_file: str = ""            # '': DATA's name with .refined.json
    chat: str = "auto"
    max_new_tokens: int = 512
    batch_size: int = 32
    device: str = ev.Config.device
    dtype: str = "float32"


def refine_prompt(t):
    """The instruction that asks ILF's refiner for a better response than t's flawed one."""
    return REFINE.format(instruction=t.instruction, response=t.response, judgment=t.judgment)


def refine(c):
    """The triples of c.data, each flawed one with the refinement c.ckpt writes for it."""
    triples = load_triples(c.data)
    flawed = [t for t in triples if t.judgment is not None]
    settings = ev.Config(ckpt=c.ckpt, chat=c.chat, batch_size=c.batch_size, device=c.device,
                         dtype=c.dtype)
    model, tok, chat = ev.load(c.ckpt, settings)
    prompts = [refine_prompt(t) for t in flawed]
    better = ev.generate_responses(model, tok, chat, prompts, settings, 0, c.max_new_tokens)
    refined = dict(zip(flawed, better))
    return [dict(vars(t), refinement=refined.get(t, t.refinement)) for t in triples]


def main(argv):
    c = configure(Config(), argv)
    if not c.data:
        raise ValueError("--data=FILE: the triples file whose flawed responses to refine")
    out = Path(c.out_file or Path(c.data).with_suffix(".refined.json"))
    if out.resolve() == Path(c.data).resolve():
        raise ValueError(f"out_file {out} is the input file: choose another")
    records = refine(c)
    out.write_text(json.dumps(records, indent=1, ensure_ascii=False), encoding="utf-8")
    print(f"wrote {out}: {sum(r['refinement'] is not None for r in records)} refinements")
    return records


if __name__ == "__main__":
    run_program(main)
