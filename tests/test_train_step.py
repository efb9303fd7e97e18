"""train.py's iterations against iterations written out by hand: log-probs from an explicit
log-softmax of the logits, the CUT loss by the paper's formula and DPO's by its own, accumulation,
clipping, weight decay and torch.optim.AdamW at learning rates worked out by hand. Each setting
here has a value other than its default (chat: 'no', as 'auto' picks the chat format of this
tokenizer), so a flag that never reaches its use fails too."""
import json
import math

import pytest
import torch

import train
from conftest import cut_by_hand, cut_micro_steps_by_hand, token_logps
from data import encode_triples, split_triples
from model import Transformer
from support.tokenizer import Tokenizer
from support.triple_files import Triple, load_triples
from test_train import base_dir, log_of, one_thread, run, train_state, weights  # noqa: F401

CUT = dict(loss="cut", chat="no", learning_rate=1e-2, min_lr=1e-3, warmup_iters=1, max_iters=3,
           decay_lr=True, weight_decay=0.5, grad_clip=0.05, batch_size=2,
           gradient_accumulation_steps=2, lam=1.0, alpha=1.5, gamma=0.5, seed=7)
RATES = [5e-3, 1e-2, 5.5e-3]  # warmup: 1e-2 * 1/2, then the cosine from 1e-2 halfway to 1e-3
COMMON = dict(val_frac=0.0, max_len=160, device="cpu", dtype="float32", log_interval=1,
              eval_interval=1000)
WORDS = ["cab", "dbca", "ba", "edcba", "fa", "gfe", "zyx", "qp"]
# every other response is left unsorted and judged so; the rest are sorted, acceptable
TRIPLES = [Triple(f"Sort {w}.", " ".join(w), "Not sorted.") if i % 2 == 0 else
           Triple(f"Sort {w}.", " ".join(sorted(w)), None) for i, w in enumerate(WORDS)]


def flags(settings):
    return [f"--{k}={v}" for k, v in settings.items()]


def clip_by_hand(params, max_norm):
    norm = torch.cat([p.grad.flatten() for p in params]).norm()
    assert norm > max_norm  # the clip is in play
    for p in params:
        p.grad *= max_norm / (norm + 1e-6)


def hand_optimizer(model, settings):
    """AdamW with train.py's betas, weight decay on matrices only (not on norms)."""
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.dim() >= 2],
               "weight_decay": settings["weight_decay"]},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, betas=(0.9, 0.95))


def write_triples(path, triples):
    path.write_text("\n".join(json.dumps(dict(instruction=t.instruction, response=t.response,
                                              judgment=t.judgment)) for t in triples))
    return path


def test_cut_iterations_equal_the_hand_written_ones(tmp_path, base_dir):
    data = write_triples(tmp_path / "triples.jsonl", TRIPLES)
    out = tmp_path / "out"
    train.main([f"--init_from={base_dir}", f"--data={data}", f"--out_dir={out}",
                *flags(CUT), *flags(COMMON)])
    model, tok = Transformer.from_pretrained(base_dir), Tokenizer.from_pretrained(base_dir)
    encoded = encode_triples(tok, TRIPLES, "cut", COMMON["max_len"], chat=False, verbose=False)
    cfg = train.Config(**CUT, **COMMON)
    optimizer = hand_optimizer(model, CUT)
    expected = []
    for it, lr in enumerate(RATES):
        steps = cut_micro_steps_by_hand(model, encoded, it, cfg)
        assert len(steps) == 2
        for loss, _ in steps:
            loss.backward()
        clip_by_hand(list(model.parameters()), CUT["grad_clip"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad()
        expected.append((sum(loss.item() for loss, _ in steps), sum(f for _, f in steps)))
    log = log_of(out)
    assert [r["lr"] for r in log] == pytest.approx(RATES, rel=1e-12)
    assert [r["loss"] for r in log] == pytest.approx([e[0] for e in expected], abs=2e-5)
    assert [r["frac_unlikely"] for r in log] == pytest.approx([e[1] for e in expected], abs=2e-4)
    assert 0 < log[0]["frac_unlikely"] < 1  # both sides of U are in play
    ours = weights(out)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(ours[name], value, rtol=0, atol=2e-6, msg=name)


def write_pairs(path):
    """Preference pairs: a sorted list preferred to its reverse."""
    path.write_text("\n".join(json.dumps(dict(prompt=f"Sort {w}.", chosen=" ".join(sorted(w)),
                                              rejected=" ".join(sorted(w, reverse=True))))
                              for w in WORDS))
    return path


def dpo_by_hand(policy, reference, pairs, beta):
    """-log sigmoid(beta ((log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)))), the mean
    over the pairs; rows[0] is the preferred response, rows[1] the other."""
    terms = []
    for pair in pairs:
        w, l = (token_logps(policy, *r).sum() - token_logps(reference, *r).sum() for r in pair.rows)
        terms.append(-torch.nn.functional.logsigmoid(beta * (w - l)))
    return sum(terms) / len(terms)


DPO = dict(loss="dpo", learning_rate=5e-2, warmup_iters=0, beta=0.3, lora_rank=2,
           lora_alpha=6.0, lora_targets="q_proj,v_proj", batch_size=2,
           gradient_accumulation_steps=2, seed=3)


def test_lora_dpo_starts_at_ln2_falls_and_equals_the_hand_loss(tmp_path, base_dir):
    """The reference is the base with the adapters off: after one step, iteration 1's loss is
    DPO's on the merged policy against the base loaded alone (the policy as its own reference
    would keep it at ln 2)."""
    data = write_pairs(tmp_path / "pairs.jsonl")
    args = [f"--init_from={base_dir}", f"--data={data}", *flags(DPO), *flags(COMMON)]
    train.main([*args, f"--out_dir={tmp_path / 'one'}", "--max_iters=1"])
    train.main([*args, f"--out_dir={tmp_path / 'six'}", "--max_iters=6"])
    log = [r["loss"] for r in log_of(tmp_path / "six")]
    assert log[0] == pytest.approx(math.log(2), abs=1e-5) and log[-1] < log[0] - 0.01
    policy, reference = (Transformer.from_pretrained(d) for d in (tmp_path / "one", base_dir))
    tok = Tokenizer.from_pretrained(base_dir)
    pairs = encode_triples(tok, load_triples(data, verbose=False), "dpo", COMMON["max_len"],
                           chat=tok.instruct, verbose=False)  # chat 'auto'
    cfg = train.Config(**DPO, **COMMON)
    with torch.no_grad():
        steps = train.micro_batches(pairs, 1, cfg, 0, 1)
        # each micro-step's mean weighs by its pairs: the mean over the iteration's pairs
        by_hand = sum(dpo_by_hand(policy, reference, s, DPO["beta"]) * len(s) for s in steps)
        by_hand = by_hand / sum(map(len, steps))
    assert abs(by_hand.item() - math.log(2)) > 1e-3
    assert log[1] == pytest.approx(by_hand.item(), abs=2e-5)
    # the adapters sit on q_proj and v_proj alone: an A and a B each, the rest is the base
    assert len(train_state(tmp_path / "one")["trainable"]) == 4
    base, merged = weights(base_dir), weights(tmp_path / "one")
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed == {"model.layers.0.self_attn.q_proj.weight",
                       "model.layers.0.self_attn.v_proj.weight"}


def test_val_loss_is_cut_on_the_held_out_triples_by_hand(tmp_path, base_dir):
    """evaluate: the mean over batch_size slices of the held-out triples of CUT's loss, with the
    weights after the iteration it is logged at."""
    data = write_triples(tmp_path / "triples.jsonl", TRIPLES)
    settings = dict(CUT, max_iters=1, batch_size=1)
    out = tmp_path / "out"
    train.main([f"--init_from={base_dir}", f"--data={data}", f"--out_dir={out}",
                *flags(settings), *flags(dict(COMMON, val_frac=0.25))])
    held_out = split_triples(TRIPLES, 0.25, settings["seed"])[1]
    tok = Tokenizer.from_pretrained(base_dir)
    encoded = encode_triples(tok, held_out, "cut", COMMON["max_len"], chat=False, verbose=False)
    trained = Transformer.from_pretrained(out)
    with torch.no_grad():
        losses = [cut_by_hand(trained, t, CUT["lam"], CUT["alpha"], CUT["gamma"])[0].item()
                  for t in encoded]
    assert len(losses) == 2 and losses[0] != losses[1]
    assert log_of(out)[0]["val_loss"] == pytest.approx(sum(losses) / 2, abs=2e-5)


def test_resume_restores_the_global_rng(tmp_path, monkeypatch):
    """Each iteration starts with the RNG state of the uninterrupted run, seen through lr_at,
    which every iteration calls first."""
    states = {}
    lr_at = train.lr_at

    def recording_lr_at(it, cfg):
        states.setdefault((cfg.out_dir, it), torch.get_rng_state())
        return lr_at(it, cfg)

    monkeypatch.setattr(train, "lr_at", recording_lr_at)
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    run(straight, "--max_iters=4", "--eval_interval=2")
    run(resumed, "--max_iters=2", "--eval_interval=2")
    torch.manual_seed(0)  # what this process did before plays no part
    run(resumed, "--max_iters=4", "--eval_interval=2", "--resume=True")
    assert all(torch.equal(states[straight, it], states[resumed, it]) for it in range(4))
