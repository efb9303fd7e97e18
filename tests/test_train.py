"""train.py end to end on tiny configs: DDP == one process, resume == uninterrupted, LoRA merging, atomic checkpoints,
compile, the built-in task's two phases, and a user's mistakes: each refused up front with one clear line, or no run
lost (a second run, init_from == out_dir, a changed --resume, Ctrl-C and SIGTERM)."""
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import support.checkpoint
import train
from conftest import cut_micro_steps_by_hand, wait_until
from data import encode_triples, prompt_ids, split_triples
from support.settings import configure
from support.tokenizer import Tokenizer
from support.triple_files import load_triples
from tasks.letters import make_task
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
    cfg = configure(train.Config(), [*TINY, f"--out_dir={tmp_path}", "--gradient_accumulation_steps=3"])
    with pytest.raises(ValueError, match="gradient_accumulation_steps=3 does not divide among 2 processes"):
        train.train(cfg)
    assert not (tmp_path / "log.jsonl").exists()


def torchrun(out_dir, *argv):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "train.py", *argv, f"--out_dir={out_dir}"],
                          cwd=ROOT, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Path(out_dir)


def test_fsdp_equals_one_process_resumes_and_saves_for_transformers(tmp_path):
    """FSDP over 2 processes, stopped after 2 iterations and resumed to 4 (with grad_ckpt, which computes the same):
    the losses and weights of one process without FSDP, within float32 rounding (the gradients are summed in another
    order), the optimizer state carried over, and a checkpoint that transformers loads with the same logits."""
    args = [*TINY, "--gradient_accumulation_steps=2", "--eval_interval=2"]
    fsdp = torchrun(tmp_path / "fsdp", *args, "--fsdp=True", "--max_iters=2")
    n_params = len(list(Transformer.from_pretrained(fsdp).parameters()))
    assert train_state(fsdp)["iter"] == 2 and len(train_state(fsdp)["optimizer"]["state"]) == n_params
    torchrun(fsdp, *args, "--fsdp=True", "--max_iters=4", "--resume=True", "--grad_ckpt=True")
    one = Path(train.main([*args, "--max_iters=4", f"--out_dir={tmp_path / 'one'}"])["out_dir"])
    assert [r["iter"] for r in log_of(fsdp)] == [0, 1, 2, 3] and train_state(fsdp)["config"]["grad_ckpt"]
    torch.testing.assert_close([r["loss"] for r in log_of(fsdp)], [r["loss"] for r in log_of(one)], rtol=1e-5,
                               atol=2e-5)
    a, b = weights(fsdp), weights(one)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    transformers = pytest.importorskip("transformers")
    x = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = transformers.LlamaForCausalLM.from_pretrained(fsdp).eval()(x).logits
    torch.testing.assert_close(Transformer.from_pretrained(fsdp)(x).detach(), theirs, rtol=1e-4, atol=1e-5)


def test_fsdp_refuses_what_it_does_not_support(tmp_path, monkeypatch, base_dir):
    message = ("fsdp=True shards a full fine-tune over torchrun's processes, in float32 or bfloat16, without compile; "
               "for LoRA use DDP")
    with pytest.raises(ValueError, match=message):  # one process: nothing to shard over
        run(tmp_path, "--fsdp=True")
    monkeypatch.setenv("RANK", "0")  # a 2-process job as train() sees it; the checks run before any collective
    monkeypatch.setattr(train.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(train.dist, "get_world_size", lambda: 2)
    for extra in ([f"--init_from={base_dir}", *LORA], ["--compile=True"], ["--dtype=float16"]):
        argv = [*TINY, f"--out_dir={tmp_path}", "--fsdp=True", "--gradient_accumulation_steps=2", *extra]
        with pytest.raises(ValueError, match=message):
            train.train(configure(train.Config(), argv))
    assert not any(tmp_path.iterdir())


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
    run(tmp_path, *argv, "--resume=True", "--grad_ckpt=True")  # recomputing the blocks changes no bit
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
    fresh = add_lora(Transformer.from_pretrained(base_dir), 4, 8.0, tuple(train.Config().lora_targets.split(",")))
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
    assert len(log) == 3 and "val_loss" in log[-1]
    # iteration 0 trains the base itself (LoRA's B starts at 0): its loss is CUT's by hand
    model, tok = Transformer.from_pretrained(base), Tokenizer.from_pretrained(base)
    triples = split_triples(load_triples(data, verbose=False), 0.25, train.Config.seed)[0]
    encoded = encode_triples(tok, triples, "cut", 64, chat=True, verbose=False)
    cfg = train.Config(batch_size=4, lam=1.0)
    with torch.no_grad():
        [(by_hand, _)] = cut_micro_steps_by_hand(model, encoded, 0, cfg)
    assert log[0]["loss"] == pytest.approx(by_hand.item(), abs=2e-5)
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
    result = ev.main(["--mode=triples", f"--data={data}", f"--ckpt={out}", f"--before={base}",
                      f"--out_file={tmp_path / 'r.json'}", "--device=cpu"])
    assert result["held_out"] == 3 and [r["ckpt"] for r in result["rows"]] == [str(base), str(out)]
    assert all(r["tokens_in_U"] + r["tokens_out_U"] > 0 for r in result["rows"])


# ----------------------------------------------------------------------------- compile
def test_compile_breaks_no_graph_and_never_recompiles(tmp_path):  # ~60 s cold, ~5 s warm
    """--compile=True over 5 iterations of varying lengths: no graph break, and a block and the
    lm_head compiled once each, for any shape (no recompile); the same losses as eager."""
    from scripts.bench import count_compiles
    if not torch._dynamo.is_dynamo_supported() or not any(map(shutil.which, ("g++", "c++", "clang++"))):
        pytest.skip("torch.compile (inductor on CPU) needs dynamo support and a C++ compiler")
    argv = [*TINY, "--n_layers=2", "--max_iters=5"]
    assert count_compiles([*argv, f"--out_dir={tmp_path / 'compiled'}"]) == (0, 0)
    eager = run(tmp_path / "eager", "--n_layers=2", "--max_iters=5")
    compiled_losses = [r["loss"] for r in log_of(tmp_path / "compiled")]
    torch.testing.assert_close(compiled_losses, [r["loss"] for r in log_of(eager)], rtol=1e-4, atol=1e-5)
    # the raw model was saved, not the compiled wrapper, with the eager run's weights
    compiled, plain = weights(tmp_path / "compiled"), weights(eager)
    assert compiled.keys() == plain.keys()
    for k in plain:
        torch.testing.assert_close(compiled[k], plain[k], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- atomic checkpoints
def crashing_run(out_dir, monkeypatch, when_saving):
    """4 iterations with checkpoints after 2 and 4; when_saving(n) arms the failure for the n-th save.
    Returns the weights each save was given."""
    saved, save = [], train.save_checkpoint

    def recording_save(raw, tok, state, out, weights=None):
        saved.append({k: v.detach().clone() for k, v in raw.state_dict().items()})
        when_saving(len(saved))
        save(raw, tok, state, out, weights)

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
    log_before = log_of(tmp_path)
    run(tmp_path, "--max_iters=4", "--eval_interval=2", "--resume=True")  # the next save discards the partial one
    assert not (tmp_path / ".ckpt-new").exists()
    # it went on from the old checkpoint: iterations 2 and 3 ran again, and the log holds them once
    assert untimed(log_of(tmp_path)) == untimed(log_before) and train_state(tmp_path)["iter"] == 4


def test_crash_while_moving_rolls_forward(tmp_path, monkeypatch):
    replace, armed = os.replace, []

    def failing_replace(src, dst):
        if armed and Path(src).name == "model.safetensors":  # config.json already moved, the rest not
            raise Crash
        replace(src, dst)

    monkeypatch.setattr(support.checkpoint.os, "replace", failing_replace)
    saved = crashing_run(tmp_path, monkeypatch, lambda n: armed.append(1) if n == 2 else None)
    monkeypatch.setattr(support.checkpoint.os, "replace", replace)
    assert (tmp_path / ".ckpt-new" / "COMPLETE").exists() and train_state(tmp_path)["iter"] == 2
    run(tmp_path, "--max_iters=4", "--eval_interval=2", "--resume=True")  # finishes the save, then has nothing to do
    assert not (tmp_path / ".ckpt-new").exists()
    assert_checkpoint(tmp_path, saved[1], 4)
    assert [r["iter"] for r in log_of(tmp_path)] == [0, 1, 2, 3]  # no iteration ran again


# ----------------------------------------------------------------------------- a user's mistakes
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")


@pytest.mark.parametrize("argv, message", [
    (["--device=tpu"], r"config key \'device\': expected cpu, or cuda or cuda:N on a GPU torch sees \(\d+ here\), got 'tpu'"),
    (["--device=mps"], r"config key \'device\': expected cpu, or cuda or cuda:N on a GPU torch sees \(\d+ here\), got 'mps'"),
    (["--device=meta"], r"config key \'device\': expected cpu, or cuda or cuda:N on a GPU torch sees \(\d+ here\), got 'meta'"),
    pytest.param(["--device=cuda"], r"config key 'device': .* GPU torch sees \(0 here\), got 'cuda'", marks=NO_GPU),
    (["--dtype=float8"], "config key 'dtype': expected float32 | bfloat16 | float16, got 'float8'"),
    (["--loss=kto"], "config key 'loss': expected cut | sft | sft_all | hindsight | forward | ilf_mle | ilf_dpo | dpo, "
                     "got 'kto'"),
    (["--loss=kto", "--base_iters=2"], "config key 'loss'"),  # refused before the base phase trains
    (["--loss=dpo", "--base_iters=2"], "loss=dpo needs refinements or preference pairs"),  # the same
    (["--chat=maybe"], "config key 'chat': expected auto | yes | no, got 'maybe'"),
    (["--task=hard"], "config key 'task': expected mixed | new, got 'hard'"),
    (["--max_iter=3"], "unknown config key 'max_iter'.*known keys: .*max_iters"),
    (["--max_iters=3.5"], "config key 'max_iters'.*expected int, got 3.5"),
    (["--compile=1"], "config key 'compile'.*expected bool"),
    (["--max_iters=0"], "config key 'max_iters': expected > 0, got 0"),
    (["--max_iters=-2"], "config key 'max_iters': expected > 0, got -2"),
    (["--gradient_accumulation_steps=0"], "config key 'gradient_accumulation_steps': expected > 0, got 0"),
    (["--grad_clip=-1"], r"config key 'grad_clip': expected >= 0, got -1.0"),
    (["--log_interval=0"], "config key 'log_interval': expected > 0"),
    (["--eval_interval=0"], "config key 'eval_interval': expected > 0"),
    (["--batch_size=0"], "config key 'batch_size': expected > 0"),
    (["--dim=0"], "config key 'dim': expected > 0"),
    (["--lam=0"], r"config key 'lam': expected >= 1"),
    (["--lam=-1.5"], r"config key 'lam': expected >= 1"),
    (["--val_frac=1"], r"config key 'val_frac': expected in \[0, 1\)"),
    (["--out_dir="], "config key 'out_dir': expected a directory"),
    (["--lora_rank=-2"], "config key 'lora_rank': expected >= 0"),
    (["--lora_targets=gate_proj,foo"], "config key 'lora_targets': expected names from q_proj,"),
    (["--lora_targets=foo"], "config key 'lora_targets'"),
    (["--lora_rank=4"], "lora_rank > 0 needs a pretrained init_from"),
    (["--resume=True"], "no checkpoint to resume"),
    (["--init_from=/nonexistent/model"], "/nonexistent/model: no such checkpoint directory"),
    (["--data=/nonexistent/triples.jsonl"], "data /nonexistent/triples.jsonl: no such triples file"),
])
def test_bad_settings_fail_before_anything_is_written(tmp_path, argv, message):
    out = tmp_path / "out"
    with pytest.raises((ValueError, OSError), match=message):
        run(out, "--max_iters=2", *argv)
    assert not out.exists() or not any(out.iterdir())


def test_bad_files_fail_with_one_line_naming_them(tmp_path, base_dir):
    cases = {"list.json": ("[1, 2]", "config file .*list.json: expected a JSON object of settings, got list"),
             "latin1.jsonl": (b'{"instruction": "caf\xe9", "response": "a", "judgment": null}\n',
                              r"latin1.jsonl: not UTF-8 text \(invalid continuation byte at byte 20\)"),
             "wrapped.json": ('{"data": [\n{"instruction": "q", "response": "a", "judgment": null}\n]}',
                              r"wrapped.json: one JSON object; expected a list of records, or JSONL")}
    for name, (content, message) in cases.items():
        f = tmp_path / name
        f.write_bytes(content) if isinstance(content, bytes) else f.write_text(content)
        argv = [str(f)] if name == "list.json" else [f"--data={f}"]
        with pytest.raises(ValueError, match=message):
            run(tmp_path / "out", "--max_iters=2", *argv)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match="out_dir .*a_file: a file, not a directory"):
        run(tmp_path / "a_file", "--max_iters=2")
    with pytest.raises(ValueError, match="out_dir and init_from are both .*: training would overwrite"):
        run(base_dir, f"--init_from={base_dir}", "--max_iters=2")
    with pytest.raises(ValueError, match="max_len 400 exceeds the model's max_seq_len 161"):
        run(tmp_path / "out", f"--init_from={base_dir}", "--max_len=400", "--max_iters=2")
    small = tmp_path / "small"  # a tokenizer with more tokens than the model's embedding has rows
    Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=200, hidden_dim=96)).save_pretrained(
        small)
    Tokenizer.byte_level().save(small)
    with pytest.raises(ValueError, match=f"{small}: the tokenizer has {VOCAB} tokens, the model's vocab_size is only 200"):
        run(tmp_path / "out", f"--init_from={small}", "--max_iters=2")
    (small / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not a valid JSON file"):
        run(tmp_path / "out", f"--init_from={small}", "--max_iters=2")
    assert [p.name for p in (tmp_path / "out").iterdir()] == [".lock"]  # the refused run's lock alone: reusable


def test_bom_file_and_failed_judge_calls_in_every_format(tmp_path):
    f = tmp_path / "bom.jsonl"
    records = [{"instruction": f"Sort: c, a{i}", "response": "a, c", "judgment": "$ERROR$" if i < 3 else None}
               for i in range(12)]
    f.write_text("\ufeff" + "\n".join(map(json.dumps, records)), encoding="utf-8")
    out = run(tmp_path / "out", f"--data={f}", "--max_iters=1")
    assert train_state(out)["iter"] == 1


def test_program_exits_2_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "train.py", *TINY, "--data=/nonexistent/triples.jsonl",
                           f"--out_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env=SUBPROCESS_ENV)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "train.py: data /nonexistent/triples.jsonl: no such triples file"


def test_full_disk_during_a_save_is_one_clear_error(tmp_path, monkeypatch):
    def full(*a):
        raise OSError(28, "No space left on device", str(tmp_path / ".ckpt-new" / "model.safetensors"))
    monkeypatch.setattr(support.checkpoint, "write_safetensors", full)
    with pytest.raises(OSError, match="No space left on device: .*model.safetensors"):
        run(tmp_path, "--max_iters=2")


def test_data_without_usable_triples(tmp_path):
    flawed = tmp_path / "flawed.jsonl"
    flawed.write_text("".join(json.dumps({"instruction": f"q{i}", "response": "a", "judgment": "Wrong."}) + "\n"
                              for i in range(20)))
    message = f"{re.escape(str(flawed))}: no triples left to train on with loss=sft .*all here are flawed"
    with pytest.raises(ValueError, match=message):
        run(tmp_path / "out", f"--data={flawed}", "--loss=sft", "--max_iters=2")
    errors = tmp_path / "errors.json"
    errors.write_text(json.dumps([{"instruction": "q", "output": "a", "judgment": "$ERROR$"}] * 3))
    with pytest.raises(ValueError, match=f"{re.escape(str(errors))}: no usable triples in 3 records"):
        run(tmp_path / "out", f"--data={errors}", "--max_iters=2")
    assert [p.name for p in (tmp_path / "out").iterdir()] == [".lock"]  # the refused run's lock alone: reusable


def test_no_validation_split_logs_no_val_loss(tmp_path):
    out = run(tmp_path, "--val_frac=0", "--max_iters=2", "--eval_interval=1")
    assert all("val_loss" not in r for r in log_of(out)) and len(log_of(out)) == 2


# ----------------------------------------------------------------------------- no run lost
def test_a_second_run_never_overwrites_the_first(tmp_path):
    first = run(tmp_path, "--max_iters=3")
    before = (log_of(first), weights(first))
    (first / "eval_task.json").write_text("{}")
    with pytest.raises(ValueError, match="holds a run already: resume it with --resume=True, choose another "
                                         "--out_dir, or pass --overwrite=True to delete it"):
        run(tmp_path, "--max_iters=2", "--loss=sft_all")
    assert log_of(first) == before[0] and all(torch.equal(weights(first)[k], v) for k, v in before[1].items())
    run(tmp_path, "--max_iters=2", "--loss=sft_all", "--overwrite=True")
    assert [r["iter"] for r in log_of(tmp_path)] == [0, 1] and train_state(tmp_path)["config"]["loss"] == "sft_all"
    assert not (first / "eval_task.json").exists()  # nothing of the first run is left beside the new model


def test_a_second_builtin_run_is_refused_before_its_base_phase(tmp_path):
    run(tmp_path, "--base_iters=2", "--max_iters=2")
    base_log = log_of(tmp_path / "base")
    with pytest.raises(ValueError, match="holds a run already"):
        run(tmp_path, "--base_iters=3", "--max_iters=2")
    assert log_of(tmp_path / "base") == base_log


@pytest.mark.parametrize("argv, difference", [
    (["--lam=2"], "lam 1.0 -> 2.0"),
    (["--loss=sft_all"], "loss 'cut' -> 'sft_all'"),
    (["--dim=64"], "dim 32 -> 64"),
    (["--seed=3"], "seed 1337 -> 3"),
    (["--batch_size=8", "--task_size=300"], "batch_size 4 -> 8; task_size 200 -> 300"),
])
def test_resume_refuses_other_settings(straight, argv, difference):
    state = (log_of(straight), train_state(straight)["iter"])
    with pytest.raises(ValueError, match=re.escape(difference) + r".*resume with the run's settings"):
        run(straight, "--max_iters=6", "--eval_interval=3", *argv, "--resume=True")
    assert (log_of(straight), train_state(straight)["iter"]) == state


def test_resume_refuses_other_data_or_lora_settings(tmp_path, base_dir):
    data = tmp_path / "t.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"Sort: c, a{i}", "response": "a, c", "judgment": None})
                              for i in range(12)))
    out = run(tmp_path / "out", f"--data={data}", f"--init_from={base_dir}", *LORA, "--max_iters=2")
    data.write_text(data.read_text() + "\n" + json.dumps({"instruction": "x", "response": "y", "judgment": None}))
    for argv, difference in [([], "data_sha256"), (["--lora_rank=8"], "lora_rank 4 -> 8"),
                             (["--lora_targets=q_proj"], "lora_targets 'gate_proj,up_proj,down_proj' -> 'q_proj'"),
                             ([f"--init_from={tmp_path}"], "base '")]:
        with pytest.raises(ValueError, match=re.escape(difference)):
            run(out, f"--data={data}", f"--init_from={base_dir}", *LORA, "--max_iters=4", *argv, "--resume=True")


def test_resume_may_extend_max_iters(straight, tmp_path):
    shutil.copytree(straight, tmp_path / "longer")
    longer = run(tmp_path / "longer", "--max_iters=8", "--eval_interval=3", "--resume=True")
    assert [r["iter"] for r in log_of(longer)] == list(range(8)) and train_state(longer)["iter"] == 8


@pytest.mark.parametrize("sig", [signal.SIGTERM])  # SIGINT: test_gpu_ready's repeated signals
def test_a_signal_saves_and_the_run_resumes_exactly(tmp_path, sig):
    argv = [*TINY, "--max_iters=300", "--eval_interval=1000", "--log_interval=1"]
    out = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, "train.py", *argv, f"--out_dir={out}"], cwd=ROOT, env=SUBPROCESS_ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: (out / "log.jsonl").exists() and len(log_of(out)) >= 3,
               [proc], what="3 logged iterations")
    proc.send_signal(sig)
    stdout, _ = proc.communicate(timeout=60)
    stopped_at = train_state(out)["iter"]
    assert proc.returncode == 128 + sig and 3 <= stopped_at < 300
    assert (f"stopped by {sig.name} after iteration {stopped_at}; the checkpoint is in {out}. Resume with: "
            f"python train.py {' '.join(argv)} --out_dir={out} --resume=True") in stdout
    assert [r["iter"] for r in log_of(out)] == list(range(stopped_at))
    train.main([*argv, f"--out_dir={out}", "--resume=True"])
    straight = train.main([*argv, f"--out_dir={tmp_path / 'straight'}"])["out_dir"]
    assert untimed(log_of(out)) == untimed(log_of(straight))
    a, b = weights(out), weights(straight)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- the built-in default
def test_builtin_base_then_aligned(tmp_path):
    train.main([*TINY, f"--out_dir={tmp_path}", "--base_iters=2", "--max_iters=2"])
    for d in (tmp_path / "base", tmp_path):
        assert {"config.json", "model.safetensors", "tokenizer.json", "log.jsonl"} <= {f.name for f in d.iterdir()}
        assert [r["iter"] for r in log_of(d)] == [0, 1]
    assert train_state(tmp_path / "base")["config"]["loss"] == "sft_all"
    assert train_state(tmp_path)["config"]["loss"] == "cut"
    # from scratch, the init's near-uniform logits: the first loss is about ln(vocab)
    assert log_of(tmp_path / "base")[0]["loss"] == pytest.approx(math.log(VOCAB), abs=0.05)
    # CUT went on from the base: its first loss is CUT's by hand on the base's weights
    base, tok = Transformer.from_pretrained(tmp_path / "base"), Tokenizer.from_pretrained(tmp_path)
    cfg = configure(train.Config(), TINY)
    task = make_task(cfg.task_size, seed=cfg.seed, kind=cfg.task)
    triples = split_triples(task, cfg.val_frac, cfg.seed)[0]
    encoded = encode_triples(tok, triples, "cut", cfg.max_len, chat=tok.instruct, verbose=False)
    with torch.no_grad():
        [(by_hand, _)] = cut_micro_steps_by_hand(base, encoded, 0, cfg)
    assert log_of(tmp_path)[0]["loss"] == pytest.approx(by_hand.item(), abs=2e-5)
    # greedy decoding with the KV cache == an argmax of a full forward pass per token
    model = Transformer.from_pretrained(tmp_path)
    x = prompt_ids(tok, "Sort these letters alphabetically: c, a, b", chat=tok.instruct)
    out = model.generate(torch.tensor([x]), 8, temperature=0, stop_ids=tok.stop_ids)
    ids = list(x)
    with torch.no_grad():
        for _ in range(8):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
            if ids[-1] in tok.stop_ids:
                break
    assert out[0].tolist() == ids
