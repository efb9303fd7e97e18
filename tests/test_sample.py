"""sample.py against model.generate run by hand: greedy and seeded sampling, prompt sources,
streaming, bad input."""
import io
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import sample
from data import prompt_ids
from support.tokenizer import Tokenizer
from model import ModelConfig, Transformer

PROMPT = "Name a colour."


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random byte-level model saved as train.py would: weights, config and tokenizer files in one
    directory."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96,
                                    vocab_size=260)).eval()
    tok = Tokenizer.byte_level()
    # a sharper distribution than the init's, so that greedy decoding is not a near-tie
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    path = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(path)
    tok.save(path)
    return path, model, tok


def reference(model, tok, n, **kw):
    # chat='auto': the byte-level tokenizer ships ChatML
    x = torch.tensor([prompt_ids(tok, PROMPT, chat=True)])
    out = model.generate(x, n, stop_ids=tok.stop_ids, **kw)[0, x.shape[1]:].tolist()
    return tok.decode(t for t in out if t not in tok.stop_ids)


def run(capsys, *argv):
    sample.main(["--device=cpu", "--dtype=float32", *argv])
    return capsys.readouterr()


def test_greedy_matches_generate(tiny, capsys):
    path, model, tok = tiny
    expected = reference(model, tok, 24, temperature=0)
    assert len(expected) > 4
    out = run(capsys, f"--ckpt={path}", f"--prompt={PROMPT}", "--temperature=0",
              "--max_new_tokens=24")
    assert out.out == expected + "\n"
    assert "tokens/s" in out.err


def test_seeded_sampling_matches_generate(tiny, capsys):
    path, model, tok = tiny
    torch.manual_seed(7)
    expected = reference(model, tok, 16, temperature=1.5, top_k=40, top_p=0.9)
    args = [f"--ckpt={path}", f"--prompt={PROMPT}", "--temperature=1.5", "--top_k=40",
            "--top_p=0.9", "--max_new_tokens=16"]
    assert run(capsys, *args, "--seed=7").out == expected + "\n"
    assert run(capsys, *args, "--seed=8").out != expected + "\n"


def test_prompt_from_file_and_stdin(tiny, capsys, tmp_path, monkeypatch):
    path, model, tok = tiny
    expected = reference(model, tok, 12, temperature=0) + "\n"
    (tmp_path / "p.txt").write_text(PROMPT + "\n")
    # the file's last newline is not the prompt's
    assert sample.read_prompt(f"FILE:{tmp_path / 'p.txt'}") == PROMPT
    assert run(capsys, f"--ckpt={path}", f"--prompt=FILE:{tmp_path / 'p.txt'}", "--temperature=0",
               "--max_new_tokens=12").out == expected
    monkeypatch.setattr("sys.stdin", io.StringIO(PROMPT + "\n"))
    assert run(capsys, f"--ckpt={path}", "--prompt=-", "--temperature=0",
               "--max_new_tokens=12").out == expected


def test_num_samples_from_config_file(tiny, capsys, tmp_path):
    path, model, tok = tiny
    (tmp_path / "run.json").write_text(f'{{"ckpt": "{path}", "prompt": "{PROMPT}", '
                                       f'"temperature": 0, "num_samples": 2}}')
    out = run(capsys, str(tmp_path / "run.json"), "--max_new_tokens=8").out
    one = reference(model, tok, 8, temperature=0) + "\n"
    assert out == one + "---------------\n" + one


def test_stream_holds_back_split_characters(monkeypatch):
    """The bytes of 'é' arrive one token at a time: no replacement character is ever printed, the
    stop id is not."""
    tok = Tokenizer.byte_level()
    ids = [104, 0xC3, 0xA9, 33, tok.eos_id]

    def generate(x, *args):
        for i in ids:
            args[-1](torch.tensor([i]))

    writes = []
    monkeypatch.setattr("sys.stdout",
                        types.SimpleNamespace(write=writes.append, flush=lambda: None))
    sample.stream(types.SimpleNamespace(generate=generate), tok, None,
                  sample.Config(max_new_tokens=5, temperature=0))
    assert "".join(writes) == "hé!\n" and not any("\ufffd" in w for w in writes)
    assert [w for w in writes if w] == ["h", "é", "!", "\n"]


@pytest.mark.parametrize("argv, message", [
    (["--nucleus=0.9"], "unknown config key 'nucleus'"),
    (["--temperature=hot"], "'temperature'"),
    (["--temperature=-1"], "config key 'temperature': expected >= 0, got -1.0"),
    (["--top_k=-1"], "config key 'top_k': expected >= 0, got -1"),
    (["--top_p=-1"], r"config key 'top_p': expected in \(0, 1\], got -1.0"),
    (["--top_p=0"], r"config key 'top_p': expected in \(0, 1\]"),
    (["--num_samples=0"], "config key 'num_samples': expected > 0"),
    (["--chat=maybe"], "config key 'chat': expected auto | yes | no"),
    (["--dtype=float8"], "config key 'dtype'"),
    (["--device=bogus"], (r"config key \'device\': expected cpu, or cuda or cuda:N on a GPU torch "
                          r"sees \(\d+ here\), got 'bogus'")),
    (["--ckpt=/nonexistent/ckpt"], "/nonexistent/ckpt: no such checkpoint directory"),
    (["--prompt=FILE:/nonexistent/p.txt"], "prompt file /nonexistent/p.txt"),
    (["--max_new_tokens=0"], "no room to generate"),
])
def test_bad_input_is_one_clear_error(tiny, capsys, argv, message):
    with pytest.raises((ValueError, OSError), match=message):
        run(capsys, f"--ckpt={tiny[0]}", "--prompt=hi", *argv)


def test_bad_files_are_named(tiny, tmp_path, capsys):
    (tmp_path / "p.txt").write_bytes(b"caf\xe9")
    with pytest.raises(ValueError, match="p.txt: not UTF-8 text"):
        run(capsys, f"--ckpt={tiny[0]}", f"--prompt=FILE:{tmp_path / 'p.txt'}")
    Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=100,
                            hidden_dim=64)).save_pretrained(tmp_path)
    Tokenizer.byte_level().save(tmp_path)
    with pytest.raises(ValueError,
                       match="the tokenizer has 260 tokens, the model's vocab_size is only 100"):
        run(capsys, f"--ckpt={tmp_path}", "--prompt=hi")


def test_program_exits_2_with_one_line(tiny):
    proc = subprocess.run([sys.executable, "sample.py", f"--ckpt={tiny[0]}", "--prompt=hi",
                           "--temperature=-1"], cwd=Path(sample.__file__).parent,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "sample.py: config key 'temperature': expected >= 0, got -1.0"


def test_smollm2_chat_knows_paris(smollm2_dir, capsys):
    out = run(capsys, f"--ckpt={smollm2_dir}", "--prompt=What is the capital of France?",
              "--temperature=0", "--max_new_tokens=20")
    assert "Paris" in out.out
