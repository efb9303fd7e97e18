"""eval.py on tiny random models: every mode against hand-computed references (forward passes, counts, formats)."""
import json
import re
import subprocess
import xml.etree.ElementTree as ET

import pytest
import torch
import torch.nn.functional as F

import eval as ev
from data import Tokenizer, check_response, configure, load_triples, make_task, prompt_ids, split_triples
from model import ModelConfig, Transformer

DEFAULTS = {k: getattr(ev, k) for k in ev.CONFIG_KEYS}


def tiny_model(seed, path):
    torch.manual_seed(seed)
    tok = Tokenizer.byte_level()
    model = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=2, hidden_dim=64, max_seq_len=512,
                                    vocab_size=tok.n_vocab)).eval()
    with torch.no_grad():  # sharper than the init's distribution, so that greedy decoding is not a near-tie
        model.lm_head.weight.mul_(20)
    model.save_pretrained(path)
    tok.save(path)
    return model, tok


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    return (path, *tiny_model(0, path))


def cfg(*argv):
    return configure(DEFAULTS, ["--device=cpu", *argv])


def run(*argv):
    return ev.main(["--device=cpu", *argv])


def test_task_mode_end_to_end(tiny, tmp_path):
    path, _, _ = tiny
    result = run(f"--ckpt={path}", "--n_eval=6", "--max_new_tokens=10", f"--out_file={tmp_path / 'r.json'}")
    assert json.loads((tmp_path / "r.json").read_text()) == result and result["n"] == 6
    assert 0 <= result["accuracy"] <= 1 and 0 <= result["swap_rate"] <= 1 and sum(result["kinds"].values()) == 1
    assert 0 <= result["U_recall"] <= 1 and 0 <= result["frac_unlikely"] <= 1
    assert result["U_precision"] is None or 0 <= result["U_precision"] <= 1


def test_accuracy_and_mistake_shares(tiny, monkeypatch):
    """Responses made by hand: correct, the systematic swap, a letter missing, garbage -> a quarter each."""
    def fake(model, tok, chat, instructions, c, temperature, max_new):
        assert temperature == 0
        out = []
        for k, ins in enumerate(instructions):
            letters = sorted(re.findall(r"\b[a-z]\b", ins))
            swapped = letters[:-2] + letters[:-3:-1]
            out.append([", ".join(letters), ", ".join(swapped), ", ".join(letters[1:]), "no idea"][k % 4])
        return out

    monkeypatch.setattr(ev, "generate_responses", fake)
    path, model, tok = tiny
    result = ev.task_eval(model, tok, True, cfg("--n_eval=8"))
    assert result["accuracy"] == 0.25 and result["swap_rate"] == 0.25
    assert result["kinds"] == {"garbage": 0.25, "missing": 0.25, "ok": 0.25, "swap": 0.25}


def test_u_scores_by_hand():
    U = [torch.tensor([True, True, False, False]), torch.tensor([False, False, False])]
    assert ev.u_scores(U, [[1, 3], [2]]) == {"U_precision": 0.5, "U_recall": 1 / 3, "frac_unlikely": 2 / 7}
    assert ev.u_scores([torch.zeros(3, dtype=torch.bool)], [[0]]) == {"U_precision": None, "U_recall": 0.0,
                                                                        "frac_unlikely": 0.0}


def test_u_against_wrong_tokens_through_the_pipeline(tiny, monkeypatch):
    """With U = every response token (EOS included), precision = |W| / tokens and recall = 1: the wrong chars'
    positions all land inside the responses, one token per char (byte-level), the EOS at len(response)."""
    def every_token(logp_x, logp_j, is_neg, mask, lam):
        return None, {"U": (mask > 0) & is_neg[:, None]}

    monkeypatch.setattr(ev, "cut_loss", every_token)
    monkeypatch.setattr(ev, "generate_responses", lambda m, t, ch, ins, *a: ["a, b"] * len(ins))
    path, model, tok = tiny
    flawed = make_task(10, seed=ev.eval_seed + 1, flawed_frac=1.0)
    wrong = sum(len(set(check_response(t.instruction, t.response).wrong)) for t in flawed)
    tokens = sum(len(t.response) + 1 for t in flawed)
    result = ev.task_eval(model, tok, True, cfg("--n_eval=10"))
    assert result["U_precision"] == pytest.approx(wrong / tokens) and result["U_recall"] == 1.0
    assert result["frac_unlikely"] == 1.0


def test_token_positions():
    tok = Tokenizer.byte_level()
    assert ev.token_positions(tok, "a, c, b", [3, 6, 7]) == [3, 6, 7]  # bytes: offsets are positions; 7 = EOS


def test_token_positions_multi_char_tokens(llama3_tokenizer_file):
    tok = Tokenizer.from_pretrained(llama3_tokenizer_file)
    response = "The sorted letters are a, b, d, c."
    ids = tok.encode(response)
    for offset in range(len(response)):
        i = ev.token_positions(tok, response, [offset])[0]
        start = len(tok.decode(ids[:i]))
        assert start <= offset < start + len(tok.decode(ids[i:i + 1]))
    assert ev.token_positions(tok, response, [len(response)]) == [len(ids)]


def test_batched_generation_matches_one_by_one(tiny):
    path, model, tok = tiny
    instructions = ["Sort: a, b", "Sort: c, d", "Sort these: q, r, s", "Hi", "Sort: e, f"]
    got = ev.generate_responses(model, tok, True, instructions, cfg("--batch_size=2"), 0, 12)
    for ins, response in zip(instructions, got):
        ids = model.generate(torch.tensor([prompt_ids(tok, ins, chat=True)]), 12, 0, stop_ids=tok.stop_ids)[0].tolist()
        new = ids[len(prompt_ids(tok, ins, chat=True)):]
        assert response == tok.decode(t for t in new[:next((j for j, t in enumerate(new) if t in tok.stop_ids),
                                                           len(new))])


def response_logp(model, tok, instruction, response, judgment=None):
    """log p(y_t | prompt) of the response tokens and EOS, by one forward pass."""
    prompt = prompt_ids(tok, instruction, judgment, chat=True)
    ids = prompt + tok.encode(response) + [tok.eos_id]
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([ids[:-1]]))[0].float(), -1)
    return logp[len(prompt) - 1:].gather(1, torch.tensor(ids[len(prompt):])[:, None])[:, 0]


def test_triples_mode_before_after(tiny, tmp_path):
    path, after, tok = tiny
    before, _ = tiny_model(1, tmp_path / "before")
    triples = make_task(8, seed=6, flawed_frac=0.5)
    (tmp_path / "t.json").write_text(json.dumps([vars(t) for t in triples]))
    _, held = split_triples(triples, 0.5, 1337)
    assert {t.judgment is None for t in held} == {True, False}
    result = run("--mode=triples", f"--data={tmp_path / 't.json'}", f"--ckpt={path}", f"--before={tmp_path / 'before'}",
                 "--val_frac=0.5", f"--out_file={tmp_path / 'r.json'}")
    U = {id(t): (response_logp(before, tok, t.instruction, t.response, t.judgment).exp()
                 - 1.1 * response_logp(before, tok, t.instruction, t.response).exp() > 0) for t in held if t.judgment}
    assert result["held_out"] == len(held)
    assert [r["ckpt"] for r in result["rows"]] == [str(tmp_path / "before"), str(path)]
    for model, row in zip((before, after), result["rows"]):
        ok = torch.cat([response_logp(model, tok, t.instruction, t.response) for t in held if t.judgment is None])
        assert row["nll_acceptable"] == pytest.approx(-ok.mean().item(), rel=1e-4)
        neg = [(response_logp(model, tok, t.instruction, t.response), U[id(t)]) for t in held if t.judgment]
        in_u, out_u = torch.cat([lp[u] for lp, u in neg]), torch.cat([lp[~u] for lp, u in neg])
        assert row["tokens_in_U"] == len(in_u) > 0 and row["tokens_out_U"] == len(out_u) > 0
        assert row["logp_out_U"] == pytest.approx(out_u.mean().item(), rel=1e-4)
        assert row["logp_in_U"] == pytest.approx(in_u.mean().item(), rel=1e-4)


def test_alpaca_output_format(tiny, tmp_path):
    path, model, tok = tiny
    records = [{"dataset": "x", "instruction": f"Say {w}.", "output": "ref", "generator": "text_davinci_003"}
               for w in ("hi", "yes", "no")]
    (tmp_path / "a.json").write_text(json.dumps(records))
    out = run("--mode=alpaca", f"--ckpt={path}", f"--alpaca_file={tmp_path / 'a.json'}", "--n_alpaca=2",
              "--max_new_tokens=8", f"--out_file={tmp_path / 'o.json'}")
    assert json.loads((tmp_path / "o.json").read_text()) == out and len(out) == 2
    assert all(set(o) == {"instruction", "output", "generator"} and o["generator"] == path.name for o in out)
    assert [o["instruction"] for o in out] == ["Say hi.", "Say yes."]
    assert out[0]["output"] == ev.generate_responses(model, tok, True, ["Say hi."], cfg(), 0, 8)[0]
    out = run("--mode=alpaca", f"--ckpt={path}", f"--alpaca_file={tmp_path / 'a.json'}", "--generator=tiny-cut",
              "--max_new_tokens=2", f"--out_file={tmp_path / 'o.json'}")
    assert len(out) == 3 and {o["generator"] for o in out} == {"tiny-cut"}


def test_alpaca_real_file(tiny, tmp_path, shared_data):
    out = run("--mode=alpaca", f"--ckpt={tiny[0]}", f"--alpaca_file={shared_data / 'alpaca-eval-davinci003.json'}",
              "--n_alpaca=1", "--max_new_tokens=2", f"--out_file={tmp_path / 'o.json'}")
    first = json.loads((shared_data / "alpaca-eval-davinci003.json").read_text())[0]
    assert len(out) == 1 and out[0]["instruction"] == first["instruction"]


def test_online_writes_judged_triples(tiny, tmp_path, monkeypatch, capsys):
    seen = []

    def fake(model, tok, chat, instructions, c, temperature, max_new):
        seen.append(temperature)
        return [["a, b, c", "a, c, b", "nothing"][k % 3] for k in range(len(instructions))]

    real = ev.generate_responses
    monkeypatch.setattr(ev, "generate_responses", fake)
    run("--mode=online", f"--ckpt={tiny[0]}", "--n_online=6", f"--out_file={tmp_path / 'o.json'}")
    triples = load_triples(tmp_path / "o.json", verbose=False)
    instructions = [t.instruction for t in make_task(6, seed=ev.online_seed)]
    assert [t.instruction for t in triples] == instructions and seen == [1.0]
    assert [t.judgment for t in triples] == [check_response(i, r).judgment for i, r in
                                             zip(instructions, ["a, b, c", "a, c, b", "nothing"] * 2)]
    monkeypatch.setattr(ev, "generate_responses", real)  # and for real, at another temperature
    run("--mode=online", f"--ckpt={tiny[0]}", "--n_online=3", "--online_temperature=0.5", "--max_new_tokens=6",
        f"--out_file={tmp_path / 'o.json'}")
    assert "accuracy of the samples: 0.000" in capsys.readouterr().out
    assert [t.judgment for t in load_triples(tmp_path / "o.json", verbose=False)] == [
        check_response(r["instruction"], r["response"]).judgment for r in json.loads((tmp_path / "o.json").read_text())]


def test_compare_plan():
    plan = ev.compare_plan(cfg("--n_seeds=2", "--lams=1.1,2", "--compare_dir=/x"))
    base, runs = plan[0], plan[1:]
    assert base["method"] == "sft_all" and "--base_iters=0" in base["args"]
    assert f"--max_iters={ev.base_iters}" in base["args"] and "--seed=1338" in base["args"]
    # mixed: cut at lam 1.1 (2 seeds) + lam 2 (seed 1) + 4 baselines x 2 seeds; all_flawed: the same without sft
    assert len(runs) == 11 + 9 and len({str(r["out_dir"]) for r in plan}) == len(plan)
    assert {r["seed"] for r in runs if r["lam"] == 2} == {1} and {r["seed"] for r in runs if r["lam"] == 1.1} == {1, 2}
    assert not any(r["method"] == "sft" and r["regime"] == "all_flawed" for r in runs)
    assert sorted({r["lam"] for r in runs if r["method"] == "cut"}) == [1.1, 2]
    for r in runs:  # the same base and budget for every method
        assert "--init_from=/x/base" in r["args"] and f"--max_iters={ev.ft_iters}" in r["args"]
        assert f"--task_flawed={ev.REGIMES[r['regime']]}" in r["args"] and f"--seed={r['seed']}" in r["args"]


def fake_runs():
    rows = []
    for regime, method, lam, accs in (("mixed", "cut", 1.5, (0.2, 0.4, 0.9)), ("mixed", "sft", None, (0.5,)),
                                      ("all_flawed", "cut", 1.5, (0.1, 0.3))):
        rows += [dict(regime=regime, method=method, lam=lam, accuracy=a, swap_rate=0.1, final_frac_unlikely=None,
                      U_precision=0.5, U_recall=1.0) for a in accs]
    return rows


def test_summary_table_and_svg():
    rows = ev.summarize(fake_runs())
    assert [(r["regime"], r["method"], r["seeds"]) for r in rows] == [("mixed", "cut", 3), ("mixed", "sft", 1),
                                                                      ("all_flawed", "cut", 2)]
    assert rows[0]["acc_mean"] == pytest.approx(0.5) and (rows[0]["acc_min"], rows[0]["acc_max"]) == (0.2, 0.9)
    assert rows[0]["acc_std"] == pytest.approx(0.3605551) and rows[1]["acc_std"] == 0.0
    table = ev.compare_table(rows).splitlines()
    assert len(table) == 5 and "| 0.500 ± 0.361 (0.200–0.900) |" in table[2] and "| 1.5 |" in table[2]
    assert table[3].startswith("| mixed | sft | – | 1 |")
    svg = ET.fromstring(ev.svg_chart(rows))
    rects = svg.findall("{http://www.w3.org/2000/svg}rect")
    assert [float(r.get("height")) for r in rects] == [100.0, 100.0, 40.0]  # mean accuracy * 200 px


def test_compare_resumes(tiny, tmp_path, monkeypatch):
    """train.py replaced by a stand-in that writes a finished run: every run is trained once, evaluated, summarised."""
    calls, resumed = [], []

    def fake_train(cmd, cwd, check, stdout, stderr, env):
        out = next(a.split("=", 1)[1] for a in cmd if a.startswith("--out_dir="))
        calls.append(out)
        resumed.append("--resume=True" in cmd)
        tiny_model(0, out)
        torch.save({"iter": ev.ft_iters if "--base_iters=0" not in cmd else ev.base_iters},
                   f"{out}/train_state.pt")
        open(f"{out}/log.jsonl", "w").write('{"iter": 0, "frac_unlikely": 0.25}\n')

    monkeypatch.setattr(subprocess, "run", fake_train)
    argv = ["--mode=compare", f"--compare_dir={tmp_path}", "--n_seeds=1", "--lams=1.5,", "--n_eval=2",
            "--max_new_tokens=3", "--jobs=2"]
    result = run(*argv)
    assert len(calls) == 1 + 4 + 5 and len(result["runs"]) == 10 and calls[0] == str(tmp_path / "base") and len(result["summary"]) == 10
    assert {r["final_frac_unlikely"] for r in result["runs"]} == {0.25}
    assert json.loads((tmp_path / "compare.json").read_text())["summary"] == result["summary"]
    assert (tmp_path / "compare.md").read_text().count("\n") == 12
    ET.fromstring((tmp_path / "compare.svg").read_text())
    torch.save({"iter": 1}, tmp_path / "mixed" / "sft-s1" / "train_state.pt")  # as if killed after a checkpoint
    run(*argv)
    assert len(calls) == 11 and calls[-1] == str(tmp_path / "mixed" / "sft-s1") and resumed == [False] * 10 + [True]


@pytest.mark.parametrize("argv, message", [
    (["--mode=bogus"], "'mode'"),
    (["--ckpt=/nonexistent/ckpt"], "ckpt /nonexistent/ckpt: no such directory"),
    (["--mode=triples"], "needs --data=FILE"),
    (["--chat=maybe"], "'chat'"),
    (["--lams=1.5"], "'lams'"),
    (["--temperature=hot"], "'temperature'"),
    (["--n_eval=0"], "'n_eval'"),
    (["--mode=alpaca", "--alpaca_file=/nonexistent.json"], "/nonexistent.json: no such file"),
])
def test_bad_input_is_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        run(*argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1 and err.startswith("eval.py: ")
