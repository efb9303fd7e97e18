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
model's own mistakes from injected ones. Each finished step is reused when the command runs again,
with the run's own settings only (docs/usage.md: the loop's run directory). This is an
experiment driver: it runs train.py and eval.py as a user would.
"""
import json
import os
import random
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

import eval as ev
import train
from data import LOSS_MODES
from support.checkpoint import read_checkpoint
from support.runs import LOCKS, base_stamp, lock
from support.settings import configure, run_program
from support.triple_files import FAILED_JUDGE, data_hash, read_text
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
    overwrite: bool = False       # start afresh in an out_dir that holds a run, deleting that run


CHOICES = {"method": LOSS_MODES, "task": ("letters", "ifeval"), "judge": ("task", "file"),
           "split": ("val", "test")}
HEADLINE = {"letters": ("accuracy", "swap"),
            "ifeval": ("prompt_strict", "instruction_strict", "prompt_loose", "instruction_loose")}
# train.py's settings the loop sets from its own (--method, --max_iters, ...): not in train_args
LOOP_FLAGS = ("init_from", "data", "out_dir", "loss", "max_iters", "learning_rate", "lam", "seed",
              "eval_interval", "device", "resume", "overwrite")
# settings a command may change in a run's out_dir; the base and the files are compared by contents
RERUNNABLE = {"out_dir", "device", "batch_size", "rounds", "split", "overwrite", "base",
              "instructions", "ifeval"}
VAL_SIZE = 200  # ifeval: the instructions held out for --split=val


def run(log_dir, *argv):
    """A program of this project in a subprocess, its output appended to log_dir/commands.log."""
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / "commands.log", "a", encoding="utf-8") as log:
        log.write(shlex.join(["python", *argv]) + "\n")
        log.flush()
        done = subprocess.run([sys.executable, *argv], cwd=HERE, stdout=log, stderr=log)
    if done.returncode:  # one line for the user, the program's own message in the log
        raise ValueError(f"{' '.join(argv[:2])} failed (exit {done.returncode}); its output is in "
                         f"{log_dir / 'commands.log'}")


def run_to(out, log_dir, *argv):
    """run() a program writing --out_file: out appears only once the program has finished."""
    partial = out.with_name(out.name + ".partial")
    run(log_dir, *argv, f"--out_file={partial}")
    os.replace(partial, out)


def write_atomic(path, text):
    """path holds text in UTF-8, whole: a kill while writing leaves the old file or none."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def json_lines(path):
    """(where, record) of each line of a JSON Lines file; U+2028 inside a string splits no line."""
    for n, line in enumerate(read_text(path).split("\n"), 1):
        if line.strip():
            try:
                yield f"{path}: line {n}", json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {n}: not valid JSON ({e.msg})") from None


def instruction_text(rec, where, fields):
    """An instruction record's text: its fields joined by a blank line (a null or absent 'input'
    adds nothing)."""
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    for name in fields:
        if name not in rec and name != "input":
            raise ValueError(f"{where}: missing field '{name}'")
        if not (isinstance(rec.get(name), str) or (name == "input" and rec.get(name) is None)):
            raise ValueError(f"{where}: field '{name}' must be a string"
                             f"{' or null' if name == 'input' else ''}")
    return "\n\n".join(rec.get(name) or "" for name in fields).strip()


def read_instructions(paths):
    """The distinct instructions of JSON lists of {instruction, input} (Alpaca's layout, the
    authors' online file) and JSON Lines of {question} (Shepherd's), up to 1,000 characters."""
    found = []
    for path in paths.split(","):
        if path.endswith(".jsonl"):
            found += [instruction_text(rec, at, ("question",)) for at, rec in json_lines(path)]
            continue
        try:
            records = json.loads(read_text(path, "instructions file"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list of {{instruction, input}} (or JSON "
                             "Lines of {question}, named .jsonl)")
        found += [instruction_text(rec, f"{path}: record {n}", ("instruction", "input"))
                  for n, rec in enumerate(records)]
    return sorted({i for i in found if 0 < len(i) <= 1000})


def constrained(c, split, n, seed):
    """n instructions of the split (the last VAL_SIZE of a fixed shuffle are 'val'), each given one
    to three constraints drawn at random: IFEval-format records."""
    pool = read_instructions(c.instructions)
    random.Random(0).shuffle(pool)
    pool = pool[-VAL_SIZE:] if split == "val" else pool[:-VAL_SIZE]
    rng = random.Random(seed)
    return [ifeval.add_constraints(i, rng, rng.randint(1, 3)) for i in rng.sample(pool, n)]


def letters_judge(instruction, response):
    return letters.check_response(instruction, response).judgment


def per_prompt(c):
    """Responses sampled per instruction: dpo judges two, to pair them."""
    return 2 if c.method == "dpo" else 1


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
    """The judgments of ROUND/judged.jsonl, or None after writing ROUND/to_judge.jsonl for a judge
    (once: judgments written into it stay). The judged file must hold the same records in the same
    order, each with a judgment: null or "" when acceptable, $ERROR$ for a failed judge call."""
    asked = round_dir / "to_judge.jsonl"
    text = "".join(json.dumps({"instruction": i, "response": r}, ensure_ascii=False) + "\n"
                   for i, r in samples)
    judged = round_dir / "judged.jsonl"
    if not judged.is_file():
        if asked.is_file() and read_text(asked) != text:
            raise ValueError(f"{asked} was changed, and {judged} is missing: write the records "
                             f"with their judgments to {judged}")
        write_atomic(asked, text)
        return None
    records = list(json_lines(judged))
    if len(records) != len(samples):
        raise ValueError(f"{judged}: {len(records)} records, but {asked} asks for {len(samples)}")
    judgments = []
    for (where, rec), (instruction, response) in zip(records, samples):
        if not isinstance(rec, dict):
            raise ValueError(f"{where}: expected a JSON object")
        if (rec.get("instruction"), rec.get("response")) != (instruction, response):
            raise ValueError(f"{where}: not the record {asked} asks for (its instruction or "
                             "response differs)")
        if "judgment" not in rec:
            raise ValueError(f"{where}: missing field 'judgment'")
        judgment = rec["judgment"]
        if not (judgment is None or isinstance(judgment, str)):
            raise ValueError(f"{where}: field 'judgment' must be a string or null")
        if judgment and not judgment.strip():  # as in triples files: a blank is no verdict
            raise ValueError(f"{where}: field 'judgment' holds only spaces (null: acceptable, "
                             f"{FAILED_JUDGE}: a failed judge call)")
        judgments.append(judgment or None)
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
        write_atomic(out, json.dumps(list(zip(instructions, responses)), ensure_ascii=False))
    return [tuple(s) for s in json.loads(read_text(out))]


def training_records(c, samples, judgments):
    """The method's records of the round: triples, or for dpo the pairs of an instruction's two
    responses that the judge split into an acceptable and a flawed one. A failed judge call
    ($ERROR$) gives none: no triple, no pair."""
    triples = [dict(instruction=i, response=r, judgment=j) for (i, r), j in zip(samples, judgments)]
    if c.method == "dpo":  # an instruction's two samples lie side by side
        pairs = []
        for a, b in zip(triples[0::2], triples[1::2]):
            verdicts = (a["judgment"], b["judgment"])
            if FAILED_JUDGE not in verdicts and verdicts.count(None) == 1:
                good, bad = (a, b) if a["judgment"] is None else (b, a)
                pairs.append(dict(prompt=a["instruction"], chosen=good["response"],
                                  rejected=bad["response"]))
        return pairs
    triples = [t for t in triples if t["judgment"] != FAILED_JUDGE]
    if c.downsample > 0:  # the authors' recipe: acceptable triples at downsample x the flawed ones
        flawed = [t for t in triples if t["judgment"] is not None]
        good = [t for t in triples if t["judgment"] is None]
        keep = min(len(good), round(c.downsample * len(flawed)))
        triples = flawed + random.Random(c.seed).sample(good, keep)
    return triples


def round_data(c, samples, judgments, round_dir, model_dir):
    """The round's training file for the method: triples, refined triples or preference pairs."""
    records = training_records(c, samples, judgments)
    data = round_dir / "data.jsonl"
    write_atomic(data, "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in records))
    if c.method.startswith("ilf"):  # the current model refines each flawed response
        refined = round_dir / "refined.json"
        if not refined.is_file():
            run_to(refined, round_dir, "-m", "scripts.refine", f"--ckpt={model_dir}",
                   f"--data={data}", "--max_new_tokens=96", f"--device={c.device}")
        return refined
    return data


def one_round(c, r, model_dir, root):
    """Round r from the model in model_dir: its record, and the directory of its model."""
    round_dir = root / f"round{r}"
    record_file = round_dir / f"record_{c.split}.json"  # a round trains once, evaluates per split
    if record_file.is_file():
        record = json.loads(read_text(record_file))
        return record, round_dir / "model" if record["trained"] else model_dir
    start = time.time()
    round_dir.mkdir(parents=True, exist_ok=True)
    prompts, task_judge = fresh_prompts(c, r, c.judge_calls // per_prompt(c))
    instructions = [p for p in prompts for _ in range(per_prompt(c))]
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
    judged = [j for j in judgments if j != FAILED_JUDGE]
    record = dict(round=r, judge_calls=len(samples), failed_calls=len(samples) - len(judged),
                  flawed_share=sum(j is not None for j in judged) / max(len(judged), 1),
                  trained=has_examples(c.method, data), train_frac_unlikely=None)
    if record["trained"]:
        trained = round_dir / "model"
        # a run stopped early (a preemption) goes on: train.py exits 0 once it has finished
        resume = ["--resume=True"] if (trained / "train_state.pt").is_file() else []
        run(round_dir, "train.py", f"--init_from={model_dir}", f"--data={data}",
            f"--out_dir={trained}", *train_flags(c), *resume)
        model_dir = trained
        log = (model_dir / "log.jsonl").read_text().splitlines()
        record["train_frac_unlikely"] = json.loads(log[-1])["frac_unlikely"]
    else:
        print(f"round {r}: nothing for {c.method} to train on; the model stays as it was")
    # the model's path in out_dir, which may move; the base's in full
    place = model_dir.relative_to(root) if model_dir.is_relative_to(root) else model_dir.resolve()
    record.update(evaluate(c, model_dir, round_dir), model=str(place),
                  wall_s=round(time.time() - start, 1))
    write_atomic(record_file, json.dumps(record, indent=1))
    return record, model_dir


def train_flags(c):
    """train.py's flags for every round: the loop's own settings, then train_args."""
    return [f"--loss={c.method}", f"--max_iters={c.max_iters}", f"--lam={c.lam}",
            f"--learning_rate={c.learning_rate}", f"--seed={c.seed}", "--eval_interval=1000",
            f"--device={c.device}", *shlex.split(c.train_args)]


def has_examples(method, data):
    """Whether the round's data holds something the method trains on: sft needs an acceptable
    response, dpo a pair, ilf_dpo a refinement."""
    if data.suffix == ".json":  # scripts.refine writes a JSON list
        records = json.loads(read_text(data))
    else:
        records = [rec for _, rec in json_lines(data)]
    if method == "sft":
        return any(rec["judgment"] is None for rec in records)
    if method == "ilf_dpo":
        return any(rec.get("refinement") for rec in records)
    return bool(records)


def evaluate(c, model_dir, round_dir):
    """The task evaluation of the model, saved in the round's directory. Letters: accuracy, the
    judged flaw's rate and U's health, by eval.py. IFEval: its four scores."""
    if c.task == "ifeval":
        return ifeval_scores(c, model_dir, round_dir / f"ifeval_{c.split}.json")
    out = round_dir / f"eval_{c.split}.json"
    if not out.is_file():
        run_to(out, round_dir, "eval.py", f"--ckpt={model_dir}", f"--split={c.split}",
               f"--n_eval={c.n_eval}", f"--lam={c.lam}", f"--device={c.device}")
    row = json.loads(read_text(out))["rows"][-1]
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
        write_atomic(out, json.dumps(dict(scores, responses=responses), indent=1,
                                     ensure_ascii=False))
    scores = json.loads(read_text(out))
    return {k: scores[k] for k in HEADLINE["ifeval"]}


def check_settings(c):
    """The settings no single key's rule judges, train_args included, before any file is read."""
    if c.task == "ifeval" and not (c.instructions and c.ifeval):
        raise ValueError("task 'ifeval' needs --instructions=FILES (instructions to constrain) "
                         "and --ifeval=FILE (IFEval's input_data.jsonl)")
    if c.injected > 0 and (c.task != "letters" or c.method == "dpo" or c.injected > 1):
        raise ValueError(f"injected={c.injected}: injected flaws are a share in (0, 1] of the "
                         "letters task's fixed responses, one per instruction (dpo needs two)")
    if c.rounds < 0 or c.judge_calls < per_prompt(c) or c.injected < 0:
        raise ValueError(f"rounds={c.rounds}, judge_calls={c.judge_calls}, injected={c.injected}: "
                         f"expected rounds >= 0, judge_calls >= {per_prompt(c)} (a {c.method} "
                         "round judges that many responses per instruction) and injected >= 0")
    if c.downsample < 0 or (c.downsample > 0 and c.method == "dpo"):
        raise ValueError(f"downsample={c.downsample}: expected >= 0, and 0 for dpo (a pair holds "
                         "one acceptable and one flawed response already)")
    for flag in shlex.split(c.train_args):
        if not flag.startswith("--") or flag[2:].partition("=")[0] in LOOP_FLAGS:
            raise ValueError(f"train_args: {flag!r}: expected train.py's --key=value flags but "
                             f"{', '.join(LOOP_FLAGS)}, which the loop sets itself (from its "
                             "--method, --max_iters, --learning_rate, --lam, --seed, --device)")
    try:  # a misspelled flag or a bad value now, not after round 1's sampling
        configure(train.Config(), train_flags(c), train.CHOICES)
    except ValueError as e:
        raise ValueError(f"train_args: {e}") from None


def read_inputs(c):
    """Check every file the rounds will read, before any generation: the base (and train.py's
    max_len against it), the instructions (enough of them) and IFEval's prompts. Their stamps, by
    contents, for the run's config.json."""
    if not Path(c.base).is_dir():
        raise FileNotFoundError(f"base {c.base}: no checkpoint; `python train.py` makes out/base")
    max_len = configure(train.Config(), train_flags(c)).max_len
    base_len = read_checkpoint(c.base)[0]["max_seq_len"]
    if max_len > base_len:  # train.py would refuse it after round 1's sampling
        raise ValueError(f"train_args: max_len {max_len} exceeds the base's max_seq_len "
                         f"{base_len}: pass a smaller --max_len")
    stamps = dict(base=base_stamp(SimpleNamespace(init_from=c.base)))
    if c.task == "ifeval":
        pool = read_instructions(c.instructions)
        needed = VAL_SIZE + c.judge_calls // per_prompt(c)
        if len(pool) < needed or (c.split == "val" and c.n_eval > VAL_SIZE):
            raise ValueError(f"instructions {c.instructions}: {len(pool)} distinct ones of up to "
                             f"1,000 characters; the rounds need {needed}, {VAL_SIZE} held out "
                             f"(--split=val evaluates up to {VAL_SIZE}, n_eval is {c.n_eval})")
        ifeval.read_prompts(c.ifeval)
        stamps.update(instructions=[data_hash(p) for p in c.instructions.split(",")],
                      ifeval=data_hash(c.ifeval))
    return stamps


def saved_settings(root):
    """The settings of the loop's run in root, {} if none; None if root holds something else: a
    model or a train.py run."""
    if root.exists() and not root.is_dir():
        return None
    if any((root / f).exists() for f in ("train_state.pt", "params.json", "log.jsonl")):
        return None
    if not (root / "config.json").is_file():
        return {}
    try:
        saved = json.loads(read_text(root / "config.json"))
    except ValueError:
        return None
    return saved if isinstance(saved, dict) and "judge_calls" in saved else None


def start_run(c, root, inputs):
    """Under root's lock: go on with root's run only with its settings, or with --overwrite delete
    it first; then record the settings."""
    saved = saved_settings(root)
    now = dict(asdict(c), inputs=inputs)
    # a key the run's config.json lacks (written before the key was recorded) is taken as now
    diffs = [f"{k} {saved[k]!r} -> {now[k]!r}" for k in now
             if k not in RERUNNABLE and saved.get(k, now[k]) != now[k]]
    if c.overwrite:  # the inputs are checked and the lock held: the old run can go
        for path in [*root.glob("round[0-9]*"), root / "online.json", root / "commands.log"]:
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    elif diffs:
        raise ValueError(f"out_dir {root} holds a run with other settings ({'; '.join(diffs)}): "
                         "rerun with its settings, choose another --out_dir, or pass "
                         "--overwrite=True to delete it")
    write_atomic(root / "config.json", json.dumps(now, indent=1))


def main(argv):
    c = configure(Config(), argv, CHOICES)
    check_settings(c)
    inputs = read_inputs(c)
    root = Path(c.out_dir)
    if saved_settings(root) is None:
        raise ValueError(f"out_dir {root}: a file, a model or a train.py run, not a scripts.online "
                         "run; nothing in it was touched: choose another --out_dir")
    lock(root)  # held to the end: a second command into root stops here
    try:
        start_run(c, root, inputs)
        check_judged(c, root)
        return run_rounds(c, root)
    finally:
        LOCKS.pop(root.resolve()).close()


def check_judged(c, root):
    """The judged files of the rounds to come, read now: a bad record stops before any generation
    (round 0's evaluation, say)."""
    for judged in sorted(root.glob("round[0-9]*/judged.jsonl")):
        samples = judged.parent / "samples.json"
        if samples.is_file() and not (judged.parent / f"record_{c.split}.json").is_file():
            file_judge(judged.parent, [tuple(s) for s in json.loads(read_text(samples))])


def run_rounds(c, root):
    """Round 0 (the base, evaluated) and each round in turn; online.json sums them up."""
    start = time.time()
    records = [dict(round=0, **evaluate(c, Path(c.base), root / "round0"))]
    print(f"round 0 (the base): {headline(c, records[0])}", flush=True)
    model_dir = Path(c.base)
    for r in range(1, c.rounds + 1):
        record, model_dir = one_round(c, r, model_dir, root)
        records.append(record)
        print(f"round {r}: {headline(c, record)}, sampled flawed {record['flawed_share']:.3f}, "
              f"training frac_unlikely {record['train_frac_unlikely'] or 0:.3f} "
              f"({record['wall_s']:.0f} s)", flush=True)
    summary = dict(config=asdict(c), rounds=records, wall_s=round(time.time() - start, 1))
    write_atomic(root / "online.json", json.dumps(summary, indent=1))
    print(f"wrote {root / 'online.json'} ({summary['wall_s']:.0f} s)")
    return summary


def headline(c, record):
    return ", ".join(f"{k} {record[k]:.3f}" for k in HEADLINE[c.task])


if __name__ == "__main__":
    run_program(main)
