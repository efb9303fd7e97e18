"""train.py end to end on tiny configs: DDP == one process, resume == uninterrupted, LoRA merging, atomic checkpoints,
compile, early errors on bad input, configure(), and the built-in task's two phases."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from data import Tokenizer, configure, prompt_ids
from model import ModelConfig, Transformer, add_lora

ROOT = Path(__file__).resolve().parents[1]
# lam=1.0 puts tokens into U even on a random model, so the unlikelihood term is exercised; warmup 1: real steps
TINY = ["--data=builtin", "--task_size=200", "--dim=32", "--n_layers=1", "--n_heads=2", "--max_len=160",
        "--batch_size=4", "--base_iters=0", "--eval_interval=1000", "--log_interval=1", "--val_frac=0.1",
        "--device=cpu", "--dtype=float32", "--warmup_iters=1", "--lam=1.0"]
LORA = ["--lora_rank=4", "--lora_alpha=8.0"]
VOCAB = Tokenizer.byte_level().n_vocab
SUBPROCESS_ENV = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
SUBPROCESS_ENV.pop("RANK", None)


class Crash(Exception):
    """A simulated kill."""


def run(out_dir, *argv):
    train.main([*TINY, f"--out_dir={out_dir}", *argv])
    return Path(out_dir)


def log_of(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "log.jsonl").read_text().splitlines()]


def weights(out_dir):
    return Transformer.from_pretrained(out_dir).state_dict()


def train_state(out_dir):
    return torch.load(Path(out_dir) / "train_state.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: a second thread only waits for the first (10x slower on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny random checkpoint to fine-tune from, in this project's layout."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("base")
    Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=VOCAB, hidden_dim=96,
                            max_seq_len=161)).save_pretrained(path)
    Tokenizer.byte_level().save(path)
    return path


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """6 iterations, uninterrupted, checkpoints every 3."""
    return run(tmp_path_factory.mktemp("straight"), "--max_iters=6", "--eval_interval=3")


@pytest.fixture(scope="module")
def lora_straight(tmp_path_factory, base_dir):
    return run(tmp_path_factory.mktemp("lora"), f"--init_from={base_dir}", *LORA, "--max_iters=6", "--eval_interval=3")


# ----------------------------------------------------------------------------- DDP
def test_ddp_two_processes_equal_one(tmp_path):
    args = [*TINY, "--max_iters=4", "--gradient_accumulation_steps=2"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "train.py", *args, f"--out_dir={tmp_path / 'ddp'}"],
                          cwd=ROOT, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train.main([*args, f"--out_dir={tmp_path / 'one'}"])
    ddp, one = log_of(tmp_path / "ddp"), log_of(tmp_path / "one")
    assert [r["iter"] for r in ddp] == [0, 1, 2, 3]  # rank 0 alone writes the log
    assert any(r["frac_unlikely"] > 0 for r in one)  # the unlikelihood term was in play
    torch.testing.assert_close([r["loss"] for r in ddp], [r["loss"] for r in one], rtol=1e-5, atol=2e-5)
    torch.testing.assert_close([r["frac_unlikely"] for r in ddp], [r["frac_unlikely"] for r in one])
    a, b = weights(tmp_path / "ddp"), weights(tmp_path / "one")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    torch.manual_seed(1337)  # train.py's init (seed, then the model): the weights moved far more than they differ
    init = Transformer(Transformer.from_pretrained(tmp_path / "one").cfg).state_dict()
    assert all((a[k] - init[k]).abs().max() > 1e-4 for k in a)


def test_accumulation_must_divide_among_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")  # a 2-process job as train() sees it; the check runs before any collective
    monkeypatch.setattr(train.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(train.dist, "get_world_size", lambda: 2)
    cfg = configure({k: getattr(train, k) for k in train.CONFIG_KEYS}, [*TINY, f"--out_dir={tmp_path}",
                                                                       "--gradient_accumulation_steps=3"])
    with pytest.raises(ValueError, match="gradient_accumulation_steps=3 does not divide among 2 processes"):
        train.train(cfg)
    assert not (tmp_path / "log.jsonl").exists()


# ----------------------------------------------------------------------------- resume
def killed_after_first_checkpoint(monkeypatch, out_dir, *argv):
    """Run until the first checkpoint is written, then stop as a kill would."""
    save = train.save_checkpoint

    def save_then_die(*a):
        save(*a)
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(out_dir, *argv)
    monkeypatch.setattr(train, "save_checkpoint", save)


def untimed(log):
    return [{k: v for k, v in r.items() if k != "tok_per_s"} for r in log]  # iter, loss, frac_unlikely, lr, val_loss


def test_resume_equals_uninterrupted(straight, tmp_path, monkeypatch):
    argv = ["--max_iters=6", "--eval_interval=3"]  # the schedule of the whole run, stopped after iteration 3
    killed_after_first_checkpoint(monkeypatch, tmp_path, *argv)
    assert [r["iter"] for r in log_of(tmp_path)] == [0, 1, 2] and train_state(tmp_path)["iter"] == 3
    run(tmp_path, *argv, "--resume=True")
    assert untimed(log_of(tmp_path)) == untimed(log_of(straight))
    a, b = weights(tmp_path), weights(straight)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lora_resume_equals_uninterrupted(lora_straight, base_dir, tmp_path, monkeypatch):
    argv = [f"--init_from={base_dir}", *LORA, "--max_iters=6", "--eval_interval=3"]
    killed_after_first_checkpoint(monkeypatch, tmp_path, *argv)
    assert [r["iter"] for r in log_of(tmp_path)] == [0, 1, 2] and train_state(tmp_path)["iter"] == 3
    run(tmp_path, *argv, "--resume=True")
    assert untimed(log_of(tmp_path)) == untimed(log_of(lora_straight))
    adapters, straight_adapters = train_state(tmp_path)["trainable"], train_state(lora_straight)["trainable"]
    assert all(torch.equal(a, b) for a, b in zip(adapters, straight_adapters))


def test_builtin_resume_in_base_phase(tmp_path, monkeypatch):
    """Killed halfway through the MLE base: --resume finishes the base, then runs CUT, as if never interrupted."""
    argv = ["--base_iters=4", "--max_iters=2", "--eval_interval=2"]
    straight = run(tmp_path / "straight", *argv)
    killed_after_first_checkpoint(monkeypatch, tmp_path / "resumed", *argv)
    assert train_state(tmp_path / "resumed" / "base")["iter"] == 2
    resumed = run(tmp_path / "resumed", *argv, "--resume=True")
    for d in ("base", "."):
        assert untimed(log_of(resumed / d)) == untimed(log_of(straight / d))
    a, b = weights(resumed), weights(straight)
    assert all(torch.equal(a[k], b[k]) for k in a)
    run(tmp_path / "resumed", *argv, "--resume=True")  # both phases done: nothing runs again
    assert len(log_of(resumed / "base")) == 4 and len(log_of(resumed)) == 2


# ----------------------------------------------------------------------------- LoRA
def test_lora_trains_adapters_and_merges_them(lora_straight, base_dir):
    base, merged, state = weights(base_dir), weights(lora_straight), train_state(lora_straight)
    # the adapters in the order train.py saves them: a fresh LoRA model's trainable parameters
    fresh = add_lora(Transformer.from_pretrained(base_dir), 4, 8.0, tuple(train.lora_targets.split(",")))
    names = [n for n, p in fresh.named_parameters() if p.requires_grad]
    assert len(names) == len(state["trainable"]) == 6  # A and B of gate, up, down in the one layer
    assert len(state["optimizer"]["state"]) == 6  # the optimizer holds nothing else
    adapters = dict(zip(names, state["trainable"]))
    targets = {n.removesuffix(".lora_A") for n in names if n.endswith(".lora_A")}
    assert set(merged) == set(base)
    for k in base:
        module = k.removesuffix(".weight")
        if module in targets:
            A, B = adapters[module + ".lora_A"], adapters[module + ".lora_B"]
            assert B.abs().max() > 0  # B starts at zero: it trained
            assert not torch.equal(merged[k], base[k])
            torch.testing.assert_close(merged[k], base[k] + (8.0 / 4) * B @ A, rtol=0, atol=1e-6)
        else:
            assert torch.equal(merged[k], base[k]), k


def test_llama2_tokenizer_lora_cut_then_sample_and_eval(tmp_path, family_dir, capsys):
    """A tiny Llama-2-shaped checkpoint carrying the real Llama 2 tokenizer and an [INST] chat template: CUT with LoRA,
    then sample.py and eval.py --mode=triples on what train.py wrote."""
    transformers = pytest.importorskip("transformers")
    import eval as ev
    import sample
    torch.manual_seed(0)
    base = tmp_path / "base"
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
        vocab_size=32000, max_position_embeddings=256)).save_pretrained(base)
    shutil.copy(family_dir / "llama-2.tokenizer.model", base / "tokenizer.model")
    template = "{% for m in messages %}{{ bos_token + '[INST] ' + m['content'] + ' [/INST]' }}{% endfor %}"
    (base / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    data = tmp_path / "triples.jsonl"
    records = [{"instruction": f"Add {a} and 7.", "response": f"{a} + 7 = {a + 7 + a % 2}",
                "judgment": "The sum is one too high." if a % 2 else None} for a in range(12)]
    data.write_text("\n".join(map(json.dumps, records)))
    out = tmp_path / "out"
    train.main([f"--init_from={base}", f"--data={data}", *LORA, "--max_iters=3", "--batch_size=4", "--max_len=64",
                "--eval_interval=3", "--log_interval=1", "--val_frac=0.25", "--warmup_iters=1", "--lam=1.0",
                "--device=cpu", "--dtype=float32", f"--out_dir={out}"])
    log = log_of(out)
    assert len(log) == 3 and all(r["loss"] == r["loss"] for r in log) and "val_loss" in log[-1]
    tok = Tokenizer.from_pretrained(out)
    assert (tok.chat, tok.instruct, tok.n_vocab, tok.bos_id) == ("llama2", True, 32000, 1)
    assert (out / "tokenizer.model").read_bytes() == (family_dir / "llama-2.tokenizer.model").read_bytes()
    capsys.readouterr()
    sample.main([f"--ckpt={out}", "--prompt=Add 2 and 7.", "--max_new_tokens=6", "--temperature=0", "--device=cpu",
                 "--dtype=float32"])
    x = torch.tensor([prompt_ids(tok, "Add 2 and 7.", chat=True)])
    assert x[0, :5].tolist() == [1, 518, 25580, 29962, 3462]  # <s> ▁[ INST ] ▁Add
    new = Transformer.from_pretrained(out).generate(x, 6, temperature=0, stop_ids=tok.stop_ids)[0, x.shape[1]:]
    assert capsys.readouterr().out == tok.decode(t for t in new.tolist() if t not in tok.stop_ids) + "\n"
    result = ev.main(["--mode=triples", f"--data={data}", f"--ckpt={out}", f"--before={base}", "--val_frac=0.5",
                      f"--out_file={tmp_path / 'r.json'}", "--device=cpu"])
    assert result["held_out"] == 6 and [r["ckpt"] for r in result["rows"]] == [str(base), str(out)]
    assert all(r["tokens_in_U"] + r["tokens_out_U"] > 0 for r in result["rows"])


# ----------------------------------------------------------------------------- compile
def test_compile_smoke(tmp_path):  # ~40 s with a cold inductor cache, ~2 s warm
    if not torch._dynamo.is_dynamo_supported() or not any(map(shutil.which, ("g++", "c++", "clang++"))):
        pytest.skip("torch.compile (inductor on CPU) needs dynamo support and a C++ compiler")
    out = run(tmp_path, "--compile=True", "--max_iters=2")
    assert [r["iter"] for r in log_of(out)] == [0, 1] and all(r["loss"] > 0 for r in log_of(out))
    assert not any(".orig_mod" in k for k in weights(out))  # the raw model was saved, not the compiled wrapper


# ----------------------------------------------------------------------------- atomic checkpoints
def crashing_run(out_dir, monkeypatch, when_saving):
    """4 iterations with checkpoints after 2 and 4; when_saving(n) arms the failure for the n-th save.
    Returns the weights each save was given."""
    saved, save = [], train.save_checkpoint

    def recording_save(raw, tok, state, out):
        saved.append({k: v.detach().clone() for k, v in raw.state_dict().items()})
        when_saving(len(saved))
        save(raw, tok, state, out)

    monkeypatch.setattr(train, "save_checkpoint", recording_save)
    with pytest.raises(Crash):
        run(out_dir, "--max_iters=4", "--eval_interval=2")
    monkeypatch.setattr(train, "save_checkpoint", save)
    assert len(saved) == 2
    return saved


def assert_checkpoint(out_dir, expected, it):
    assert train_state(out_dir)["iter"] == it
    got = weights(out_dir)
    assert all(torch.equal(got[k], expected[k]) for k in got)
    assert Tokenizer.from_pretrained(out_dir).n_vocab == VOCAB


def test_crash_while_writing_keeps_old_checkpoint(tmp_path, monkeypatch):
    torch_save, armed = torch.save, []

    def failing_save(obj, f, *a, **k):
        if armed:
            Path(f).write_bytes(b"partial")
            raise Crash
        torch_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", failing_save)
    saved = crashing_run(tmp_path, monkeypatch, lambda n: armed.append(1) if n == 2 else None)
    monkeypatch.setattr(torch, "save", torch_save)
    assert (tmp_path / ".ckpt-new").is_dir() and not (tmp_path / ".ckpt-new" / "COMPLETE").exists()
    assert_checkpoint(tmp_path, saved[0], 2)  # the old checkpoint, intact
    assert [r["iter"] for r in log_of(tmp_path)] == [0, 1, 2, 3]
    run(tmp_path, "--max_iters=4", "--eval_interval=2", "--resume=True")  # the next start discards the partial save
    assert not (tmp_path / ".ckpt-new").exists()
    assert [r["iter"] for r in log_of(tmp_path)][4:] == [2, 3]  # it went on from the old checkpoint
    assert train_state(tmp_path)["iter"] == 4


def test_crash_while_moving_rolls_forward(tmp_path, monkeypatch):
    replace, armed = os.replace, []

    def failing_replace(src, dst):
        if armed and Path(src).name == "model.safetensors":  # config.json already moved, the rest not
            raise Crash
        replace(src, dst)

    monkeypatch.setattr(train.os, "replace", failing_replace)
    saved = crashing_run(tmp_path, monkeypatch, lambda n: armed.append(1) if n == 2 else None)
    monkeypatch.setattr(train.os, "replace", replace)
    assert (tmp_path / ".ckpt-new" / "COMPLETE").exists() and train_state(tmp_path)["iter"] == 2
    run(tmp_path, "--max_iters=4", "--eval_interval=2", "--resume=True")  # finishes the save, then has nothing to do
    assert not (tmp_path / ".ckpt-new").exists()
    assert_checkpoint(tmp_path, saved[1], 4)
    assert [r["iter"] for r in log_of(tmp_path)] == [0, 1, 2, 3]  # no iteration ran again


# ----------------------------------------------------------------------------- bad input
def test_missing_data_file_exits_with_one_message(tmp_path):
    proc = subprocess.run([sys.executable, "train.py", *TINY, "--data=/nonexistent/triples.jsonl",
                           f"--out_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env=SUBPROCESS_ENV)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "train.py: /nonexistent/triples.jsonl: no such triples file"
    assert not (tmp_path / "log.jsonl").exists()


@pytest.mark.parametrize("argv, error, message", [
    (["--device=tpu"], ValueError, "unknown device 'tpu'"),
    (["--dtype=float8"], ValueError, "unknown dtype 'float8'"),
    (["--loss=dpo"], ValueError, "unknown loss 'dpo'"),
    (["--chat=maybe"], ValueError, "config key 'chat': expected 'auto', 'yes' or 'no', got 'maybe'"),
    (["--max_iter=3"], ValueError, "unknown config key 'max_iter'.*known keys: .*max_iters"),
    (["--max_iters=3.5"], ValueError, "config key 'max_iters'.*expected int, got 3.5"),
    (["--compile=1"], ValueError, "config key 'compile'.*expected bool"),
    (["--resume=True"], FileNotFoundError, "train_state.pt"),
])
def test_bad_config_fails_before_training(tmp_path, argv, error, message):
    with pytest.raises(error, match=message):
        run(tmp_path, "--max_iters=2", *argv)
    assert not (tmp_path / "log.jsonl").exists()


def test_data_without_usable_triples(tmp_path):
    flawed = tmp_path / "flawed.jsonl"
    flawed.write_text("".join(json.dumps({"instruction": f"q{i}", "response": "a", "judgment": "Wrong."}) + "\n"
                              for i in range(20)))
    message = f"{re.escape(str(flawed))}: no triples left to train on with loss=sft .*every triple here is flawed"
    with pytest.raises(ValueError, match=message):
        run(tmp_path, f"--data={flawed}", "--loss=sft", "--max_iters=2")
    errors = tmp_path / "errors.json"
    errors.write_text(json.dumps([{"instruction": "q", "output": "a", "judgment": "$ERROR$"}] * 3))
    with pytest.raises(ValueError, match=f"{re.escape(str(errors))}: no usable triples in 3 records"):
        run(tmp_path, f"--data={errors}", "--max_iters=2")
    assert not (tmp_path / "log.jsonl").exists()


# ----------------------------------------------------------------------------- configure
DEFAULTS = {"out_dir": "out", "lam": 1.1, "max_iters": 300, "compile": False, "j_pos": ""}


def test_configure_file_then_flags(tmp_path):
    file = tmp_path / "run.json"
    file.write_text(json.dumps({"lam": 2, "max_iters": 10, "out_dir": "a"}))
    cfg = configure(DEFAULTS, [str(file), "--max_iters=20", "--j_pos=Good answer."])
    assert cfg == {"out_dir": "a", "lam": 2.0, "max_iters": 20, "compile": False, "j_pos": "Good answer."}
    assert type(cfg["lam"]) is float and DEFAULTS["max_iters"] == 300  # int taken for float; defaults untouched
    assert configure(DEFAULTS, ["--max_iters=5", str(file)])["max_iters"] == 10  # later wins
    assert configure(DEFAULTS, ["--lam=1", "--lam=-0.5e-1"])["lam"] == -0.05


@pytest.mark.parametrize("flag, value", [("True", True), ("true", True), ("False", False), ("false", False)])
def test_configure_bools(flag, value):
    assert configure(DEFAULTS, [f"--compile={flag}"])["compile"] is value


@pytest.mark.parametrize("text", ["123", "1e3", "True", "None", "[1, 2]", "'quoted'", "", "gate_proj,up_proj"])
def test_configure_str_takes_text_verbatim(text):
    assert configure(DEFAULTS, [f"--out_dir={text}"])["out_dir"] == text


@pytest.mark.parametrize("argv, message", [
    (["--max_iters=1.5"], "'max_iters'.*expected int, got 1.5"),
    (["--max_iters=True"], "'max_iters'.*expected int, got True"),
    (["--max_iters=ten"], "'max_iters'.*expected int, got 'ten'"),
    (["--lam=yes"], "'lam'.*expected float"),
    (["--compile=1"], "'compile'.*expected bool, got 1"),
    (["--compile=yes"], "'compile'.*expected bool"),
    (["--nope=1"], r"unknown config key 'nope' \(from --nope=1\); known keys: out_dir, lam, max_iters, compile, j_pos"),
    (["--lam"], "argument '--lam': expected --key=value"),
    (["missing.json"], "config file missing.json"),
])
def test_configure_errors(argv, message):
    with pytest.raises(ValueError, match=message):
        configure(DEFAULTS, argv)


def test_configure_file_errors(tmp_path):
    bad = tmp_path / "bad.json"
    for text, message in [('{"max_iters": "10"}', "'max_iters' \\(from .*bad.json\\): expected int, got '10'"),
                          ('{"nope": 1}', "unknown config key 'nope' \\(from .*bad.json\\); known keys"),
                          ('{"lam": ', "config file .*bad.json")]:
        bad.write_text(text)
        with pytest.raises(ValueError, match=message):
            configure(DEFAULTS, [str(bad)])


# ----------------------------------------------------------------------------- the built-in default
def test_builtin_base_then_aligned(tmp_path):
    train.main([*TINY, f"--out_dir={tmp_path}", "--base_iters=2", "--max_iters=2"])
    for d in (tmp_path / "base", tmp_path):
        assert {"config.json", "model.safetensors", "tokenizer.json", "log.jsonl"} <= {f.name for f in d.iterdir()}
        assert [r["iter"] for r in log_of(d)] == [0, 1] and all(r["loss"] > 0 for r in log_of(d))
    assert train_state(tmp_path / "base")["config"]["loss"] == "sft_all"
    assert train_state(tmp_path)["config"]["loss"] == "cut"
    base, aligned = weights(tmp_path / "base"), weights(tmp_path)
    assert not torch.equal(base["lm_head.weight"], aligned["lm_head.weight"])  # CUT went on from the base
    model, tok = Transformer.from_pretrained(tmp_path), Tokenizer.from_pretrained(tmp_path)
    x = torch.tensor([prompt_ids(tok, "Sort these letters alphabetically: c, a, b", chat=tok.instruct)])
    out = model.generate(x, 8, temperature=0, stop_ids=tok.stop_ids)
    assert out.shape[1] > x.shape[1] and out.max() < VOCAB


def test_explicit_positive_judgment_takes_its_own_pass():
    """--j_pos: U compares p_n with p(y | x, j+) from a pass of its own, without gradient, not with p_x."""
    from contextlib import nullcontext

    from cut_loss import batch_loss, response_logprobs
    from data import collate, encode_triples, make_task
    torch.manual_seed(0)
    tok = Tokenizer.byte_level()
    model = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=2, hidden_dim=64, vocab_size=tok.n_vocab))
    enc = encode_triples(tok, make_task(6, seed=0, flawed_frac=0.5), "cut", 160, chat=True, j_pos="Fine.", verbose=False)
    cfg = dict(loss="cut", lam=1.0, alpha=1.0, gamma=0.0)
    loss, _, _ = train.forward_loss(model, enc, cfg, tok.eos_id, "cpu", nullcontext())
    b = collate(enc, tok.eos_id)
    with torch.no_grad():
        logp_pos = response_logprobs(model(b.pos_idx), b.pos_targets)[0]
    logp, mask = response_logprobs(model(b.idx), b.targets)
    want, _ = batch_loss("cut", logp, mask, b.x_rows, b.j_rows, b.is_neg, 1.0, 1.0, 0.0, logp_pos)
    without, _ = batch_loss("cut", logp, mask, b.x_rows, b.j_rows, b.is_neg, 1.0, 1.0, 0.0)
    assert torch.allclose(loss, want, atol=1e-6) and not torch.allclose(want, without)
