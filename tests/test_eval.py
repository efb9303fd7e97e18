"""eval.py on tiny random models: every mode against hand-computed references (forward passes, counts, formats)."""
import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import eval as ev
from data import prompt_ids, split_triples
from support.settings import configure
from support.tokenizer import Tokenizer
from tasks.letters import check_response, make_task
from model import ModelConfig, Transformer



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
    return configure(ev.Config(), ["--device=cpu", *argv])


def run(*argv):
    return ev.main(["--device=cpu", *argv])


def test_task_mode_end_to_end_against_the_base(tiny, tmp_path, capsys):
    """A run directory with its base in CKPT/base (the default run's layout): one table, the base then the model."""
    path, _, _ = tiny
    shutil.copytree(path, tmp_path / "run")
    tiny_model(1, tmp_path / "run" / "base")
    result = run(f"--ckpt={tmp_path / 'run'}", "--n_eval=6", "--max_new_tokens=10", f"--out_file={tmp_path / 'r.json'}")
    assert json.loads((tmp_path / "r.json").read_text()) == result
    assert [r["model"] for r in result["rows"]] == ["base", "ckpt"] and result["rows"][0]["path"].endswith("base")
    # each row is task_eval of its own model (checked by hand above and below), not of the other
    c = cfg("--n_eval=6", "--max_new_tokens=10")
    alone = [ev.task_eval(*ev.load(d, c), c) for d in (tmp_path / "run" / "base", tmp_path / "run")]
    assert [{k: r[k] for k in alone[0]} for r in result["rows"]] == alone
    assert alone[0]["n"] == 6 and alone[0]["examples"] != alone[1]["examples"]
    table = capsys.readouterr().out
    assert "| model | accuracy | swap | missing |" in table and "| base |" in table and "| ckpt |" in table


def test_accuracy_and_mistake_shares(tiny, monkeypatch):
    """Answers made by hand: correct (in the new format every other time), the systematic swap, a letter missing,
    garbage: a quarter each, and an eighth correct and in the new format."""
    def fake(model, tok, chat, instructions, c, temperature, max_new):
        assert temperature == 1.0  # the model's rates: sampled
        out = []
        for k, ins in enumerate(instructions):
            letters = sorted(re.findall(r"\b[a-z]\b", ins))
            right = ", ".join(letters) if k % 8 else f"Here you go:\n{', '.join(letters)}\nAll done."
            swapped = ", ".join([letters[0], letters[2], letters[1], *letters[3:]])
            out.append([right, swapped, ", ".join(letters[1:]), "no idea"][k % 4])
        return out

    monkeypatch.setattr(ev, "generate_responses", fake)
    path, model, tok = tiny
    result = ev.task_eval(model, tok, True, cfg("--n_eval=16"))
    assert (result["accuracy"], result["swap"], result["missing"], result["other"]) == (0.25, 0.25, 0.25, 0.25)
    assert result["new_format"] == result["ok_new_format"] == 0.125


def test_u_against_wrong_tokens_through_the_pipeline(tiny, monkeypatch):
    """With U = every response token (EOS included), precision = |W| / tokens and recall = 1: the wrong chars'
    positions all land inside the responses, one token per char (byte-level), the EOS at len(response)."""
    def every_token(logp_x, logp_j, is_neg, mask, lam):
        return None, {"U": (mask > 0) & is_neg[:, None]}

    monkeypatch.setattr(ev, "cut_loss", every_token)
    monkeypatch.setattr(ev, "generate_responses", lambda m, t, ch, ins, *a: ["a, b"] * len(ins))
    path, model, tok = tiny
    c = cfg("--n_eval=10")
    flawed = make_task(10, seed=c.eval_seed + 1, flawed_frac=1.0, split="test")
    wrong = [set(check_response(t.instruction, t.response).wrong) for t in flawed]
    tokens = sum(len(t.response) + 1 for t in flawed)
    result = ev.task_eval(model, tok, True, c)
    assert result["U_precision"] == pytest.approx(sum(map(len, wrong)) / tokens) and result["U_recall"] == 1.0
    assert result["frac_unlikely"] == 1.0
    # log p_n - log p_x, by forward passes of their own, on the wrong tokens and on the others
    gain = [response_logp(model, tok, t.instruction, t.response, t.judgment)
            - response_logp(model, tok, t.instruction, t.response) for t in flawed]
    on_wrong = torch.cat([g[sorted(w)] for g, w in zip(gain, wrong)])
    others = torch.cat([g[[i for i in range(len(g)) if i not in w]] for g, w in zip(gain, wrong)])
    assert result["gain_wrong"] == pytest.approx(on_wrong.mean().item(), abs=1e-5)
    assert result["gain_other"] == pytest.approx(others.mean().item(), abs=1e-5)


def test_token_positions():
    tok = Tokenizer.byte_level()
    assert ev.token_positions(tok, "a, c, b", [3, 6, 7]) == [3, 6, 7]  # bytes: offsets are positions; 7 = EOS


@pytest.mark.parametrize("file", ["llama3_tokenizer_file", "small_llama3_file"])
def test_token_positions_multi_char_tokens(file, request):
    tok = Tokenizer.from_pretrained(request.getfixturevalue(file))
    response = "The sorted letters are a, b, d, c."
    ids = tok.encode(response)
    assert len(ids) < len(response) / 2  # tokens of several characters
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
    (tmp_path / "t.json").write_text(json.dumps([dataclasses.asdict(t) for t in triples]))
    _, held = split_triples(triples, 0.5, 1337)
    assert {t.judgment is None for t in held} == {True, False}
    result = run("--mode=triples", f"--data={tmp_path / 't.json'}", f"--ckpt={path}", f"--before={tmp_path / 'before'}",
                 "--val_frac=0.5", "--lam=1.1", f"--out_file={tmp_path / 'r.json'}")
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


# ----------------------------------------------------------------------------- a user's mistakes
def test_triples_mode_takes_the_split_from_the_run(tiny, tmp_path):
    """After train.py --seed=7 --val_frac=0.25, the held-out triples are that run's, whatever eval.py's defaults."""
    import train
    triples = make_task(16, seed=6, flawed_frac=0.5)
    data = tmp_path / "t.json"
    data.write_text(json.dumps([dataclasses.asdict(t) for t in triples]))
    out = tmp_path / "run"
    train.main([f"--init_from={tiny[0]}", f"--data={data}", "--seed=7", "--val_frac=0.25", "--max_iters=1",
                "--batch_size=4", "--max_len=200", "--device=cpu", f"--out_dir={out}"])
    result = run("--mode=triples", f"--data={data}", f"--ckpt={out}", f"--out_file={tmp_path / 'r.json'}")
    assert (result["seed"], result["val_frac"], result["held_out"]) == (7, 0.25, 4)
    assert result["held_out"] == len(split_triples(triples, 0.25, 7)[1])


def test_prompts_that_do_not_fit_are_reported(tmp_path, capsys):
    torch.manual_seed(0)
    tok = Tokenizer.byte_level()
    Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=2, hidden_dim=64, max_seq_len=40,
                            vocab_size=tok.n_vocab)).save_pretrained(tmp_path)
    tok.save(tmp_path)
    result = run(f"--ckpt={tmp_path}", "--n_eval=4", f"--out_file={tmp_path / 'r.json'}")
    assert "warning: 4 prompts leave no room to generate in max_seq_len 40" in capsys.readouterr().err
    assert result["rows"][0]["other"] == 1.0


def test_an_interrupted_save_is_finished_by_the_reader(tiny, tmp_path):
    """A save killed while moving its files: the complete new checkpoint in .ckpt-new is what eval.py reads."""
    path, model, tok = tiny
    run_dir = tmp_path / "run"
    tiny_model(1, run_dir)  # the old checkpoint
    shutil.copytree(path, run_dir / ".ckpt-new")  # the new one, complete, with its config.json already moved
    (run_dir / ".ckpt-new" / "COMPLETE").touch()
    shutil.move(run_dir / ".ckpt-new" / "config.json", run_dir / "config.json")
    loaded, _, _ = ev.load(run_dir, cfg())
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert not (run_dir / ".ckpt-new").exists()


@pytest.mark.parametrize("argv, message", [
    (["--device=bogus"], r"config key \'device\': expected cpu, or cuda or cuda:N on a GPU torch sees \(\d+ here\), got 'bogus'"),
    (["--mode=online"], "config key 'mode': expected task | triples | alpaca"),
    (["--split=train"], "config key 'split': expected val | test"),
    (["--n_eval=0"], "config key 'n_eval': expected > 0"),
    (["--mode=triples"], "mode 'triples' needs --data=FILE"),
    (["--mode=alpaca"], "mode 'alpaca' needs --alpaca_file=FILE, AlpacaEval's instructions: tatsu-lab/alpaca_eval's"),
    (["--mode=alpaca", "--alpaca_file=/nonexistent.json"], "alpaca_file /nonexistent.json: no such file"),
    (["--ckpt=/nonexistent"], "/nonexistent: no such checkpoint directory"),
])
def test_bad_settings_fail_with_one_line(tiny, argv, message):
    with pytest.raises((ValueError, OSError), match=message):
        run(f"--ckpt={tiny[0]}", *argv)


def test_out_file_that_is_a_directory_fails_before_evaluating(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(ev, "task_mode", lambda c: pytest.fail("evaluated"))
    with pytest.raises(ValueError, match=f"out_file {tmp_path}: a directory"):
        run(f"--ckpt={tiny[0]}", f"--out_file={tmp_path}")


def test_program_exits_2_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "eval.py", "--device=cpu", f"--ckpt={tmp_path / 'none'}"],
                          cwd=Path(ev.__file__).parent, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip() == f"eval.py: {tmp_path / 'none'}: no such checkpoint directory"
