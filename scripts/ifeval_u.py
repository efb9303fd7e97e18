"""What CUT's token detection does with IFEval judgments: U against the tokens that break a
constraint, on a round of scripts/online.py --task=ifeval.

    python -m scripts.ifeval_u --run=out/ifeval/cut-s1 --round=1

The model that sampled the round (the run's base for round 1) scores the round's flawed responses
with and without their judgments. U = {t : p_n(t) - lam * p_x(t) > 0} (paper Eq. 5) is compared,
on the responses where some broken constraint has them, with the tokens a checker can point at:
the commas of a no-comma instruction, the capital letters of an all-lowercase one, the lowercase
letters of an all-capitals one, the words of a forbidden-words one. Most IFEval judgments name an
absence instead (too few words, no title, no postscript): no token of the response is the flaw,
and U can only fall on tokens that are not.
"""
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

import eval as ev
from scripts import online
from support.settings import configure, run_program
from support.triple_files import Triple
from tasks import ifeval


@dataclass
class Config:
    run: str = "out/ifeval/cut-s1"   # an online.py --task=ifeval out_dir
    round: int = 1
    lam: float = 2.0
    batch_size: int = 8
    device: str = "cpu"


def flaw_offsets(instruction_id, kwargs, response):
    """The character offsets of the response that break the instruction; None if the flaw is an
    absence or a count (no character is wrong by itself)."""
    if instruction_id == "punctuation:no_comma":
        return [i for i, ch in enumerate(response) if ch == ","]
    if instruction_id == "change_case:english_lowercase":
        return [i for i, ch in enumerate(response) if ch.isupper()]
    if instruction_id == "change_case:english_capital":
        return [i for i, ch in enumerate(response) if ch.islower()]
    if instruction_id == "keywords:forbidden_words":
        offsets = []
        for word in kwargs["forbidden_words"]:
            for m in re.finditer(r"\b" + re.escape(word) + r"\b", response, flags=re.IGNORECASE):
                offsets += range(m.start(), m.end())
        return offsets
    return None


def measure(c):
    run = Path(c.run)
    saved = json.loads((run / "config.json").read_text(encoding="utf-8"))
    settings = online.Config(**{k: v for k, v in saved.items() if k != "inputs"})
    if settings.method not in ("cut", "sft"):
        raise ValueError(f"{run}: a {settings.method} run; U is measured on cut's or sft's triples")
    records = online.constrained(settings, "train", settings.judge_calls,
                                 settings.seed * 1000 + c.round)
    by_prompt = {r["prompt"]: r for r in records}

    def broken_of(d):
        """The (instruction id, kwargs) of the constraints a judged response breaks."""
        rec = by_prompt[d["instruction"]]
        pairs = zip(rec["instruction_id_list"], rec["kwargs"])
        return [(i, k) for i, k in pairs if ifeval.check(i, k, rec["prompt"], d["response"])]
    data = [rec for _, rec in online.json_lines(run / f"round{c.round}" / "data.jsonl")]
    flawed = [d for d in data if d["judgment"] is not None]
    if c.round == 1:
        sampler = settings.base
    else:
        record = run / f"round{c.round - 1}" / f"record_{settings.split}.json"
        sampler = str(run / json.loads(record.read_text(encoding="utf-8"))["model"])  # in run
    cfg = ev.Config(ckpt=sampler, lam=c.lam, batch_size=c.batch_size, device=c.device)
    model, tok, chat = ev.load(sampler, cfg)
    triples = [Triple(d["instruction"], d["response"], d["judgment"]) for d in flawed]
    scored = ev.score(model, tok, chat, triples, cfg, model.cfg.max_seq_len)
    located = 0
    n_u = 0
    n_tokens = 0
    in_u = []
    wrong = []
    gain = []
    broken = [broken_of(d) for d in flawed]  # checked once per response
    for d, s, pairs in zip(flawed, scored, broken):
        if s is None:
            continue
        logp_x, logp_n, U = s
        n_u += int(U.sum())
        n_tokens += len(U)
        offsets = set()
        for i, k in pairs:
            offsets.update(flaw_offsets(i, k, d["response"]) or ())
        if not offsets:
            continue  # no broken constraint has a token to point at
        located += 1
        w = torch.zeros_like(U)
        w[ev.token_positions(tok, d["response"], sorted(offsets))] = True
        in_u.append(U)
        wrong.append(w)
        gain.append(logp_n - logp_x)
    result = {"run": c.run, "round": c.round, "lam": c.lam, "flawed": len(flawed),
              "scored": sum(s is not None for s in scored), "located": located,
              "frac_unlikely": n_u / max(n_tokens, 1)}
    if located:
        U = torch.cat(in_u)
        W = torch.cat(wrong)
        g = torch.cat(gain)
        hit = int((U & W).sum())
        result.update(U_precision=hit / max(int(U.sum()), 1), U_recall=hit / max(int(W.sum()), 1),
                      frac_unlikely_located=float(U.float().mean()),
                      gain_wrong=g[W].mean().item(), gain_other=g[~W].mean().item())
    counts = {}
    for pairs in broken:
        for i, _ in pairs:
            counts[i] = counts.get(i, 0) + 1
    result["broken"] = dict(sorted(counts.items(), key=lambda kv: -kv[1]))
    out = run / f"round{c.round}" / f"u_lam{c.lam}.json"
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "broken"}))
    return result


def main(argv):
    return measure(configure(Config(), argv))


if __name__ == "__main__":
    run_program(main)
