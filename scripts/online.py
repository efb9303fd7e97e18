"""Online alignment, the paper's second experiment: rounds of sample -> judge -> train -> evaluate.

    python train.py                                   # out/base: the built-in task's base model
    python -m scripts.online                          # 3 rounds of CUT from out/base (out/online)
    python -m scripts.online --method=dpo --rounds=5 --out_dir=out/online-dpo
    python -m scripts.online --judge=file ...         # a person or GPT-4 writes the judgments
    python -m scripts.online --task=ifeval --base=SmolLM2-135M-Instruct \
        --instructions=alpaca.json,shepherd.jsonl --ifeval=input_data.jsonl   # a real model, IFEval

Each round samples a response (at a temperature) to fresh instructions from the current model,
judges each, trains the method under test from the current model on the round's data, evaluates the
result on the held-out instructions, and goes on from it. The task is the built-in one (letters,
judged by its checker, evaluated by eval.py) or IFEval's verifiable instructions (tasks/ifeval.py):
instructions of other files given one to three IFEval-style constraints, judged by the constraint
checkers in words, the model evaluated by IFEval's four scores on its 541 prompts (split 'test')
or on held-out constrained instructions (split 'val'). A judge is a function (instruction,
response) -> judgment, or None for an acceptable response: the built-in task's checker, or a file
judge, which writes the round's {instruction, response} records to ROUND/to_judge.jsonl, stops, and
goes on when ROUND/judged.jsonl holds the same records with a `judgment` field. Every method gets
the same number of judge calls per round: dpo samples two responses to half as many instructions and
keeps the instructions where one was acceptable and one flawed (the judge ranked them), ilf_* have
the current model refine each flawed response. With --injected=SHARE the round's responses are not
sampled but the built-in task's fixed ones, that share flawed: the offline setting, to tell the
model's own mistakes from injected ones. Each finished step is reused when the command runs again.
This is an experiment driver: it runs train.py and eval.py as a user would.
"""
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

import eval as ev
from data import LOSS_MODES
from support.settings import configure, run_program
from support.triple_files import read_text
from tasks import ifeval, letters

HERE = Path(__file__).resolve().parents[1]  # the repository


@dataclass
class Config:
    base: str = "out/base"        # the model of round 0
    out_dir: str = "out/online"
    task: str = "letters"         # 'letters' (the built-in task) or 'ifeval'
    instructions: str = ""        # ifeval: files of instructions to constrain, comma-separated
    ifeval: str = ""              # ifeval: IFEval's input_data.jsonl, the test prompts
    method: str = "cut"           # a train.py loss: cut, sft (rejection sampling), dpo, ilf_mle
    judge: str = "task"           # 'task': the built-in task's checker; 'file': ROUND/judged.jsonl
    rounds: int = 3
    judge_calls: int = 384        # responses judged per round
    temperature: float = 1.0      # sampling the round's responses
    downsample: float = 0.0       # > 0: keep this x as many acceptable as flawed (authors: 0.25)
    injected: float = 0.0         # letters, > 0: not sampled but the task's fixed responses, this
                                  # share flawed by its injected mistakes (offline, for comparison)
    max_iters: int = 150          # train.py iterations per round
    learning_rate: float = 3e-4
    lam: float = 2.0
    split: str = "test"           # the evaluation's instructions: 'val' to choose settings, 'test'
    n_eval: int = 300             # letters: test instructions; ifeval: the val split's size
    max_new_tokens: int = 96      # per sampled or evaluated response
    batch_size: int = 64          # prompts per generation batch
    device: str = "cpu"
    seed: int = 1
    train_args: str = ""          # more train.py flags for every round, e.g. "--lora_rank=16"


CHOICES = {"method": LOSS_MODES, "task": ("letters", "ifeval"), "judge": ("task", "file"),
           "split": ("val", "test")}
HEADLINE = {"letters": ("accuracy", "swap"),
            "ifeval": ("prompt_strict", "instruction_strict", "prompt_loose", "instruction_loose")}


def run(log_dir, *argv):
    """A program of this project in a subprocess, its output appended to log_dir/commands.log."""
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / "commands.log", "a") as log:
        log.write(" ".join(argv) + "\n")
        log.flush()
        done = subprocess.run([sys.executable, *argv], cwd=HERE, stdout=log, stderr=log)
    if done.returncode:  # one line for the user, the program's own message in the log
        raise ValueError(f"{' '.join(argv[:2])} failed (exit {done.returncode}); its output is in "
                         f"{log_dir / 'commands.log'}")


def read_instructions(paths):
    """The distinct instructions of JSON lists of {instruction, input} (Alpaca's layout, the
    authors' online file) and JSON Lines of {question} (Shepherd's), up to 1,000 characters."""
    found = []
    for path in paths.split(","):
        text = read_text(path)
        try:
            if path.endswith(".jsonl"):
                rows = [json.loads(line) for line in text.splitlines() if line.strip()]
                found += [str(row["question"]) for row in rows]
            else:
                found += [f"{r['instruction']}\n\n{r['input']}".strip() for r in json.loads(text)]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a JSON list of {{instruction, input}} nor JSON Lines of "
                             f"{{question}} ({e!r})") from None
    return sorted({i for i in found if 0 < len(i) <= 1000})


def constrained(c, split, n, seed):
    """n instructions of the split (the last 200 of a fixed shuffle are 'val'), each given one to
    three constraints drawn at random: IFEval-format records."""
    pool = read_instructions(c.instructions)
    random.Random(0).shuffle(pool)
    pool = pool[-200:] if split == "val" else pool[:-200]
    rng = random.Random(seed)
    return [ifeval.add_constraints(i, rng, rng.randint(1, 3)) for i in rng.sample(pool, n)]


def letters_judge(instruction, response):
    return letters.check_response(instruction, response).judgment


def fresh_prompts(c, r, n):
    """Round r's n instructions, and the judge of a response to each: (instruction, response) ->
    judgment or None."""
    if c.task == "letters":
        fresh = letters.make_task(n, seed=c.seed * 1000 + r, kind="mixed", split="train")
        return [t.instruction for t in fresh], letters_judge
    records = {rec["prompt"]: rec for rec in constrained(c, "train", n, c.seed * 1000 + r)}

    def judge(prompt, response):
        rec = records[prompt]
        return ifeval.judge(prompt, rec["instruction_id_list"], rec["kwargs"], response)
    return list(records), judge


def file_judge(round_dir, samples):
    """The judgments of ROUND/judged.jsonl, or None after writing ROUND/to_judge.jsonl for a judge.
    The judged file must hold the same records in the same order, each with a judgment (or null)."""
    asked = round_dir / "to_judge.jsonl"
    lines = [json.dumps({"instruction": i, "response": r}, ensure_ascii=False) for i, r in samples]
    asked.write_text("\n".join(lines) + "\n", encoding="utf-8")
    judged = round_dir / "judged.jsonl"
    if not judged.is_file():
        return None
    records = [line for line in read_text(judged).splitlines() if line.strip()]
    if len(records) != len(samples):
        raise ValueError(f"{judged}: {len(records)} records, but {asked} asks for {len(samples)}")
    judgments = []
    for n, (line, (instruction, response)) in enumerate(zip(records, samples), 1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{judged}: line {n}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{judged}: line {n}: expected a JSON object")
        if (rec.get("instruction"), rec.get("response")) != (instruction, response):
            raise ValueError(f"{judged}: line {n}: not the record {asked} asks for (its "
                             "instruction or response differs)")
        if "judgment" not in rec:
            raise ValueError(f"{judged}: line {n}: missing field 'judgment'")
        if not (rec["judgment"] is None or isinstance(rec["judgment"], str)):
            raise ValueError(f"{judged}: line {n}: field 'judgment' must be a string or null")
        judgments.append(rec["judgment"] or None)
    return judgments


def generate(c, model_dir, instructions, temperature):
    """The response of the model in model_dir to each instruction (batched, as eval.py does)."""
    settings = ev.Config(ckpt=str(model_dir), batch_size=c.batch_size, device=c.device)
    model, tok, chat = ev.load(model_dir, settings)
    return ev.generate_responses(model, tok, chat, instructions, settings, temperature,
                                 c.max_new_tokens)


def sample(c, model_dir, instructions, round_dir):
    """Each instruction's response from the model in model_dir, sampled, saved in the round."""
    out = round_dir / "samples.json"
    if not out.is_file():
        torch.manual_seed(c.seed * 1000 + int(round_dir.name.removeprefix("round")))
        responses = generate(c, model_dir, instructions, c.temperature)
        out.write_text(json.dumps(list(zip(instructions, responses)), ensure_ascii=False))
    return [tuple(s) for s in json.loads(out.read_text())]


def round_data(c, samples, judgments, round_dir, model_dir):
    """The round's training file for the method: triples, refined triples or preference pairs."""
    triples = [dict(instruction=i, response=r, judgment=j) for (i, r), j in zip(samples, judgments)]
    rng = random.Random(c.seed)
    if c.downsample > 0:  # the authors' recipe: acceptable triples at downsample x the flawed ones
        flawed = [t for t in triples if t["judgment"] is not None]
        good = [t for t in triples if t["judgment"] is None]
        keep = min(len(good), round(c.downsample * len(flawed)))
        triples = flawed + rng.sample(good, keep)
    if c.method == "dpo":  # the instructions with one acceptable and one flawed response
        pairs = []
        for a, b in zip(triples[0::2], triples[1::2]):
            if (a["judgment"] is None) != (b["judgment"] is None):
                good, bad = (a, b) if a["judgment"] is None else (b, a)
                pairs.append(dict(prompt=a["instruction"], chosen=good["response"],
                                  rejected=bad["response"]))
        triples = pairs
    data = round_dir / "data.jsonl"
    data.write_text("".join(json.dumps(t, ensure_ascii=False) + "\n" for t in triples))
    if c.method.startswith("ilf"):  # the current model refines each flawed response
        refined = round_dir / "refined.json"
        if not refined.is_file():
            run(round_dir, "-m", "scripts.refine", f"--ckpt={model_dir}", f"--data={data}",
                f"--out_file={refined}", "--max_new_tokens=96", "--device=cpu")
        return refined
    return data


def one_round(c, r, model_dir, root):
    """Round r from the model in model_dir: its record, and the directory of its model."""
    round_dir = root / f"round{r}"
    record_file = round_dir / f"record_{c.split}.json"  # a round trains once, evaluates per split
    if record_file.is_file():
        record = json.loads(record_file.read_text())
        return record, Path(record["model"])
    start = time.time()
    round_dir.mkdir(parents=True, exist_ok=True)
    per_prompt = 2 if c.method == "dpo" else 1
    prompts, task_judge = fresh_prompts(c, r, c.judge_calls // per_prompt)
    instructions = [p for p in prompts for _ in range(per_prompt)]
    if c.injected > 0:  # the round's letter lists (make_task's seed), with the task's responses
        fixed = letters.make_task(len(prompts), seed=c.seed * 1000 + r, kind="mixed",
                                  flawed_frac=c.injected, split="train")
        samples = [(t.instruction, t.response) for t in fixed]
    else:
        samples = sample(c, model_dir, instructions, round_dir)
    if c.judge == "file":
        judgments = file_judge(round_dir, samples)
        if judgments is None:
            sys.exit(f"online: judge {round_dir / 'to_judge.jsonl'}: write the same records with a "
                     f"'judgment' field (null when acceptable) to {round_dir / 'judged.jsonl'}, "
                     "then run this command again")
    else:
        judgments = [task_judge(i, resp) for i, resp in samples]
    data = round_data(c, samples, judgments, round_dir, model_dir)
    flawed = sum(j is not None for j in judgments)
    record = dict(round=r, judge_calls=len(samples), flawed_share=flawed / len(samples),
                  trained=has_examples(c.method, data), train_frac_unlikely=None)
    if record["trained"]:
        if not (round_dir / "model" / "train_state.pt").is_file():
            run(round_dir, "train.py", f"--init_from={model_dir}", f"--data={data}",
                f"--out_dir={round_dir / 'model'}", f"--loss={c.method}",
                f"--max_iters={c.max_iters}", f"--learning_rate={c.learning_rate}",
                f"--lam={c.lam}", f"--seed={c.seed}", "--eval_interval=1000", "--overwrite=True",
                f"--device={c.device}",
                *c.train_args.split())
        model_dir = round_dir / "model"
        log = (model_dir / "log.jsonl").read_text().splitlines()
        record["train_frac_unlikely"] = json.loads(log[-1])["frac_unlikely"]
    else:
        print(f"round {r}: nothing for {c.method} to train on; the model stays as it was")
    record.update(evaluate(c, model_dir, round_dir, round_dir), model=str(model_dir),
                  wall_s=round(time.time() - start, 1))
    record_file.write_text(json.dumps(record, indent=1))
    return record, model_dir


def has_examples(method, data):
    """Whether the round's data holds something the method trains on: sft needs an acceptable
    response, dpo a pair, ilf_dpo a refinement."""
    if data.suffix == ".json":  # scripts.refine writes a JSON list
        records = json.loads(read_text(data))
    else:
        records = [json.loads(line) for line in read_text(data).splitlines() if line.strip()]
    if method == "sft":
        return any(rec["judgment"] is None for rec in records)
    if method == "ilf_dpo":
        return any(rec.get("refinement") for rec in records)
    return bool(records)


def evaluate(c, model_dir, log_dir, round_dir):
    """The task evaluation of the model. Letters: accuracy, the judged flaw's rate and U's health,
    by eval.py, saved beside the model. IFEval: its four scores, saved in the round's directory."""
    if c.task == "ifeval":
        return ifeval_scores(c, model_dir, round_dir / f"ifeval_{c.split}.json")
    out = model_dir / f"eval_{c.split}.json"
    if not out.is_file():
        run(log_dir, "eval.py", f"--ckpt={model_dir}", f"--split={c.split}",
            f"--n_eval={c.n_eval}", f"--lam={c.lam}", f"--out_file={out}", f"--device={c.device}")
    row = json.loads(out.read_text())["rows"][-1]
    keys = ("accuracy", "swap", "missing", "other", "U_precision", "U_recall", "frac_unlikely")
    return {k: row[k] for k in keys}


def ifeval_scores(c, model_dir, out):
    """IFEval's four scores of the model's greedy responses: to IFEval's prompts (split 'test') or
    to n_eval held-out constrained instructions ('val'); the responses are saved with them."""
    if not out.is_file():
        if c.split == "test":
            records = ifeval.read_prompts(c.ifeval)
        else:
            records = constrained(c, "val", c.n_eval, seed=0)
        responses = generate(c, model_dir, [rec["prompt"] for rec in records], 0)
        scores = ifeval.score(records, responses)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(dict(scores, responses=responses), indent=1, ensure_ascii=False))
    scores = json.loads(out.read_text())
    return {k: scores[k] for k in HEADLINE["ifeval"]}


def main(argv):
    c = configure(Config(), argv, CHOICES)
    if c.task == "ifeval" and not (c.instructions and c.ifeval):
        raise ValueError("task 'ifeval' needs --instructions=FILES (instructions to constrain) "
                         "and --ifeval=FILE (IFEval's input_data.jsonl)")
    if c.injected > 0 and (c.task != "letters" or c.method == "dpo" or c.injected > 1):
        raise ValueError(f"injected={c.injected}: injected flaws are a share in (0, 1] of the "
                         "letters task's fixed responses, one per instruction (dpo needs two)")
    if not Path(c.base, "config.json").is_file():
        raise FileNotFoundError(f"base {c.base}: no checkpoint; `python train.py` makes out/base")
    root = Path(c.out_dir)
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(asdict(c), indent=1))
    start = time.time()
    records = [dict(round=0, **evaluate(c, Path(c.base), root, root / "round0"))]
    print(f"round 0 (the base): {headline(c, records[0])}", flush=True)
    model_dir = Path(c.base)
    for r in range(1, c.rounds + 1):
        record, model_dir = one_round(c, r, model_dir, root)
        records.append(record)
        print(f"round {r}: {headline(c, record)}, sampled flawed {record['flawed_share']:.3f}, "
              f"training frac_unlikely {record['train_frac_unlikely'] or 0:.3f} "
              f"({record['wall_s']:.0f} s)", flush=True)
    summary = dict(config=asdict(c), rounds=records, wall_s=round(time.time() - start, 1))
    (root / "online.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {root / 'online.json'} ({summary['wall_s']:.0f} s)")
    return summary


def headline(c, record):
    return ", ".join(f"{k} {record[k]:.3f}" for k in HEADLINE[c.task])


if __name__ == "__main__":
    run_program(main)
