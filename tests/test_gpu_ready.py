"""What a run on GPUs needs, checked on the CPU: ranks balanced by padded tokens, no device sync in
a training step, one per generated token, a stop that survives a signal sent to every process of a
torchrun job, the built-in run's second stage reading its base only once it is saved, and LoRA
merged into a checkpoint of the base's dtype."""
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import train
from data import encode_triples
from model import ModelConfig, Transformer, left_pad
from support.checkpoint import read_safetensors
from support.runs import LOCKS
from support.settings import configure
from support.tokenizer import Tokenizer
from support.triple_files import load_triples
from test_train import ROOT, SUBPROCESS_ENV, TINY, log_of, train_state

# aten calls that make the host wait for a GPU: reading a value (item, int, bool) or an output
# whose size depends on values (nonzero, a boolean mask)
SYNCING = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::is_nonzero",
           "aten::equal", "aten::_unique2", "aten::unique_consecutive", "aten::repeat_interleave"}


class CountSyncs(TorchDispatchMode):
    """The syncing calls made inside the block, by name: on the CPU they cost nothing, on CUDA
    each one stalls the host until the GPU catches up."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        indices = args[1] if name.startswith("aten::index") and len(args) > 1 else []
        masked = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or [])
        if name in SYNCING or masked:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def padded_tokens(micro_batches):
    """What a rank computes: each micro-batch's rows times its longest row."""
    total = 0
    for step in micro_batches:
        rows = [row for e in step for row in e.rows]
        total += len(rows) * (max(len(p) + len(t) for p, t in rows) - 1)
    return total


def test_eight_ranks_get_equal_padded_tokens_on_a_real_file(llama3_tokenizer_file, shared_data):
    """On the CUT authors' file (Llama 3's tokenizer), the slowest of 8 ranks computes at most 10%
    more padded tokens than the average rank; any number of ranks runs the same micro-steps."""
    tok = Tokenizer.from_pretrained(llama3_tokenizer_file.parent)
    triples = load_triples(shared_data / "cut-online-iter1.json", verbose=False)
    encoded = encode_triples(tok, triples, "cut", 512, verbose=False)
    for batch_size, accumulation in ((16, 8), (4, 16)):
        cfg = train.Config(batch_size=batch_size, gradient_accumulation_steps=accumulation)
        slowest = average = 0
        for it in range(20):
            ranks = [train.micro_batches(encoded, it, cfg, rank, 8) for rank in range(8)]
            per_rank = [padded_tokens(steps) for steps in ranks]
            slowest += max(per_rank)
            average += sum(per_rank) / 8
            alone = train.micro_batches(encoded, it, cfg, 0, 1)
            same = lambda steps: sorted(tuple(map(id, step)) for step in steps)
            assert same(sum(ranks, [])) == same(alone)
        assert slowest / average <= 1.1, (batch_size, accumulation, slowest / average)


@pytest.fixture
def tiny_run(tmp_path):
    """set_up(cfg) of a tiny built-in run with 2 micro-steps an iteration; its lock released after."""
    def make(*argv):
        cfg = configure(train.Config(), [*TINY, f"--out_dir={tmp_path}", "--max_iters=4",
                                         "--gradient_accumulation_steps=2", *argv], train.CHOICES)
        return train.set_up(cfg), cfg
    yield make
    LOCKS.pop(tmp_path.resolve()).close()


@pytest.mark.parametrize("loss", ["cut", "sft_all"])
def test_a_training_step_never_waits_for_the_device(tiny_run, loss):
    run, cfg = tiny_run(f"--loss={loss}")
    with CountSyncs() as counter:
        for it in range(2):  # the first creates AdamW's state
            train.train_step(run, it, cfg)
    assert counter.calls == []


def test_generation_waits_for_the_device_once_a_token():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=40,
                                    hidden_dim=64))
    idx, pad = left_pad([[1, 2, 3, 4], [5, 6]])
    with CountSyncs() as counter:
        out = model.generate(idx, 12, temperature=0.8, top_k=20, top_p=0.9, stop_ids=[0], pad=pad)
    new_tokens = out.shape[1] - idx.shape[1]
    assert new_tokens >= 1 and len(counter.calls) <= new_tokens + 1  # + 1: pad.any() at the start


def descendants(pid):
    """The processes started by pid, and theirs: torchrun's workers."""
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            children += [int(child), *descendants(int(child))]
    return children


def wait_for(condition, proc, seconds=120):
    deadline = time.monotonic() + seconds
    while not condition():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"not within {seconds} s"
        time.sleep(0.05)


def test_builtin_torchrun_job_signalled_everywhere_saves_where_it_stopped(tmp_path):
    """The built-in run under torchrun, its base shorter than eval_interval (its one save is its
    last act: the CUT stage must wait for it). Then a scheduler signals every process and torchrun
    forwards its copy: each worker sees SIGTERM twice, finishes its iteration and saves all the
    same, and --resume goes on from there (one process: the same micro-steps as two)."""
    out = tmp_path / "run"
    argv = [*TINY, "--base_iters=3", "--gradient_accumulation_steps=2", f"--out_dir={out}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "train.py", *argv, "--max_iters=300"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=SUBPROCESS_ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (out / "log.jsonl").exists() and len(log_of(out)) >= 3, proc)
    for pid in [proc.pid, *descendants(proc.pid)]:
        os.kill(pid, signal.SIGTERM)
    proc.communicate(timeout=60)
    assert train_state(out / "base")["iter"] == 3
    stopped_at = train_state(out)["iter"]
    assert 3 <= stopped_at < 300
    assert [r["iter"] for r in log_of(out)] == list(range(stopped_at))
    train.main([*argv, f"--max_iters={stopped_at + 2}", "--resume=True"])
    assert [r["iter"] for r in log_of(out)] == list(range(stopped_at + 2))


TWICE_AT_ITERATION_3 = r"""
import os, signal, sys
import train
train.GRACE_S = float(sys.argv[1])
step = train.train_step
def signalled_twice(run, it, cfg):
    for _ in range(2 if it == 3 else 0):  # the loop lets Python handle each before the next
        os.kill(os.getpid(), signal.Signals[sys.argv[2]])
    return step(run, it, cfg)
train.train_step = signalled_twice
train.main(sys.argv[3:])
"""


@pytest.mark.parametrize("grace_s, sig", [(5, signal.SIGINT), (0, signal.SIGTERM)])
def test_a_repeated_signal_within_the_grace_period_is_the_same_stop(tmp_path, grace_s, sig):
    """A signal twice during iteration 3: within the grace period the run still saves after it
    (exit 128 + the signal); past it (grace 0 s) the second signal kills at once, unsaved."""
    out = tmp_path / "run"
    argv = [*TINY, "--max_iters=300", f"--out_dir={out}"]
    proc = subprocess.run([sys.executable, "-c", TWICE_AT_ITERATION_3, str(grace_s), sig.name,
                           *argv], cwd=ROOT, env=SUBPROCESS_ENV, capture_output=True, text=True,
                          timeout=120)
    if grace_s == 0:
        assert proc.returncode == -sig and not (out / "train_state.pt").exists()
        return
    assert proc.returncode == 128 + sig, proc.stderr[-2000:]
    assert train_state(out)["iter"] == 4 and [r["iter"] for r in log_of(out)] == [0, 1, 2, 3]


def test_lora_on_a_bf16_base_saves_every_tensor_in_bf16(tmp_path):
    """The merged weights are W + scale * B @ A in fp32, then rounded to the base's dtype once."""
    torch.manual_seed(0)
    base = tmp_path / "base"
    tok = Tokenizer.byte_level()
    Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=tok.n_vocab,
                            hidden_dim=96, max_seq_len=161)).bfloat16().save_pretrained(base)
    tok.save(base)
    out = tmp_path / "lora"
    train.main([*TINY, f"--init_from={base}", f"--out_dir={out}", "--lora_rank=4",
                "--lora_alpha=8.0", "--dtype=bfloat16", "--max_iters=2", "--learning_rate=1e-2"])
    saved = read_safetensors(out / "model.safetensors")
    before = read_safetensors(base / "model.safetensors")
    assert saved.keys() == before.keys()
    data = (out / "model.safetensors").read_bytes()
    header = json.loads(data[8:8 + struct.unpack("<Q", data[:8])[0]])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    adapters = iter(train_state(out)["trainable"])  # lora_A, lora_B of gate, up, down in order
    for name in ("gate_proj", "up_proj", "down_proj"):
        key = f"model.layers.0.mlp.{name}.weight"
        a, b = next(adapters), next(adapters)
        want = (before[key][1](torch.float32, "cpu") + 2.0 * b.float() @ a.float()).bfloat16()
        got = saved[key][1](torch.bfloat16, "cpu")
        assert torch.equal(got, want)
        assert not torch.equal(got, before[key][1](torch.bfloat16, "cpu"))  # the adapters trained
