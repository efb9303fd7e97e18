"""sample.py against model.generate run by hand: greedy and seeded sampling, prompt sources, streaming, bad input."""
import io
import types

import pytest
import torch

import sample
from data import Tokenizer, prompt_ids
from model import ModelConfig, Transformer

PROMPT = "Name a colour."


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random byte-level model saved as train.py would: weights, config and tokenizer files in one directory."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, vocab_size=260)).eval()
    tok = Tokenizer.byte_level()
    with torch.no_grad():  # a sharper distribution than the init's, so that greedy decoding is not a near-tie
        model.lm_head.weight.mul_(20)
    path = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(path)
    tok.save(path)
    return path, model, tok


def reference(model, tok, n, **kw):
    x = torch.tensor([prompt_ids(tok, PROMPT, chat=True)])  # chat='auto': the byte-level tokenizer ships ChatML
    out = model.generate(x, n, stop_ids=tok.stop_ids, **kw)[0, x.shape[1]:].tolist()
    return tok.decode(t for t in out if t not in tok.stop_ids)


def run(capsys, *argv):
    sample.main(["--device=cpu", "--dtype=float32", *argv])
    return capsys.readouterr()


def test_greedy_matches_generate(tiny, capsys):
    path, model, tok = tiny
    expected = reference(model, tok, 24, temperature=0)
    assert len(expected) > 4
    out = run(capsys, f"--ckpt={path}", f"--prompt={PROMPT}", "--temperature=0", "--max_new_tokens=24")
    assert out.out == expected + "\n"
    assert "tokens/s" in out.err


def test_seeded_sampling_matches_generate(tiny, capsys):
    path, model, tok = tiny
    torch.manual_seed(7)
    expected = reference(model, tok, 16, temperature=1.5, top_k=40, top_p=0.9)
    args = [f"--ckpt={path}", f"--prompt={PROMPT}", "--temperature=1.5", "--top_k=40", "--top_p=0.9",
            "--max_new_tokens=16"]
    assert run(capsys, *args, "--seed=7").out == expected + "\n"
    assert run(capsys, *args, "--seed=8").out != expected + "\n"


def test_prompt_from_file_and_stdin(tiny, capsys, tmp_path, monkeypatch):
    path, model, tok = tiny
    expected = reference(model, tok, 12, temperature=0) + "\n"
    (tmp_path / "p.txt").write_text(PROMPT + "\n")
    assert sample.read_prompt(f"FILE:{tmp_path / 'p.txt'}") == PROMPT  # the file's last newline is not the prompt's
    assert run(capsys, f"--ckpt={path}", f"--prompt=FILE:{tmp_path / 'p.txt'}", "--temperature=0",
               "--max_new_tokens=12").out == expected
    monkeypatch.setattr("sys.stdin", io.StringIO(PROMPT + "\n"))
    assert run(capsys, f"--ckpt={path}", "--prompt=-", "--temperature=0", "--max_new_tokens=12").out == expected


def test_num_samples_from_config_file(tiny, capsys, tmp_path):
    path, model, tok = tiny
    (tmp_path / "run.json").write_text(f'{{"ckpt": "{path}", "prompt": "{PROMPT}", "temperature": 0, "num_samples": 2}}')
    out = run(capsys, str(tmp_path / "run.json"), "--max_new_tokens=8").out
    one = reference(model, tok, 8, temperature=0) + "\n"
    assert out == one + "---------------\n" + one


def test_stream_holds_back_split_characters(monkeypatch):
    """The bytes of 'é' arrive one token at a time: no replacement character is ever printed, the stop id is not."""
    tok = Tokenizer.byte_level()
    ids = [104, 0xC3, 0xA9, 33, tok.eos_id]

    def generate(x, *args):
        for i in ids:
            args[-1](torch.tensor([i]))

    writes = []
    monkeypatch.setattr("sys.stdout", types.SimpleNamespace(write=writes.append, flush=lambda: None))
    sample.stream(types.SimpleNamespace(generate=generate), tok, None, dict(max_new_tokens=5, temperature=0,
                                                                            top_k=0, top_p=1.0))
    assert "".join(writes) == "hé!\n" and not any("\ufffd" in w for w in writes)
    assert [w for w in writes if w] == ["h", "é", "!", "\n"]


@pytest.mark.parametrize("argv, message", [
    (["--nucleus=0.9"], "unknown config key 'nucleus'"),
    (["--temperature=hot"], "'temperature'"),
    (["--chat=maybe"], "'chat'"),
    (["--dtype=float8"], "'dtype'"),
    (["--ckpt=/nonexistent/ckpt"], "ckpt /nonexistent/ckpt: no such directory"),
    (["--prompt=FILE:/nonexistent/p.txt"], "prompt file /nonexistent/p.txt"),
    (["--max_new_tokens=0"], "no room to generate"),
])
def test_bad_input_is_one_line(tiny, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        run(capsys, f"--ckpt={tiny[0]}", "--prompt=hi", *argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1 and err.startswith("sample.py: ")


def test_smollm2_chat_knows_paris(smollm2_dir, capsys):
    out = run(capsys, f"--ckpt={smollm2_dir}", "--prompt=What is the capital of France?", "--temperature=0",
              "--max_new_tokens=20")
    assert "Paris" in out.out
