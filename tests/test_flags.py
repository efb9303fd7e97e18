"""Every train.py flag that no hand-written iteration (test_train_step.py) covers reaches what it
controls: a run with a value other than the default differs where it should, and equals what the
value asks for where that can be written down."""
import pytest
import torch

import model
import train
from model import Transformer
from test_train import TINY, log_of, one_thread, run  # noqa: F401


def test_model_shape_flags_build_that_model(tmp_path):
    out = run(tmp_path, "--dim=16", "--n_layers=2", "--n_heads=4", "--max_len=100",
              "--max_iters=1")
    cfg = Transformer.from_pretrained(out).cfg
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.hidden_dim, cfg.max_seq_len) == (
        16, 2, 4, 48, 101)


def test_log_and_eval_intervals(tmp_path):
    out = run(tmp_path, "--max_iters=5", "--log_interval=2", "--eval_interval=3")
    # logged every 2 and at the end; validated every 3 and at the end
    assert [(r["iter"], "val_loss" in r) for r in log_of(out)] == [
        (0, True), (2, False), (4, True)]


def test_base_phase_flags(tmp_path):
    out = run(tmp_path, "--base_iters=2", "--base_lr=4.2e-3", "--max_iters=1")
    # the base phase: 20 warmup iterations up to base_lr, so base_lr * (it + 1) / 21
    assert [r["lr"] for r in log_of(out / "base")] == pytest.approx([2e-4, 4e-4], rel=1e-12)


def test_task_and_task_size_choose_the_data(tmp_path):
    first_losses = [log_of(run(tmp_path / str(k), *args, "--max_iters=1"))[0]["loss"]
                    for k, args in enumerate([[], ["--task=new"], ["--task_size=100"]])]
    assert len(set(first_losses)) == 3


def test_bfloat16_autocast_is_close_to_float32_not_equal(tmp_path):
    fp32 = log_of(run(tmp_path / "fp32", "--max_iters=1"))[0]["loss"]
    bf16 = log_of(run(tmp_path / "bf16", "--max_iters=1", "--dtype=bfloat16"))[0]["loss"]
    assert bf16 != fp32 and bf16 == pytest.approx(fp32, rel=2e-2)


def test_grad_ckpt_recomputes_blocks_with_the_same_result(tmp_path, monkeypatch):
    calls = []
    checkpoint = model.checkpoint
    monkeypatch.setattr(model, "checkpoint", lambda f, *a, **k: (calls.append(f),
                                                                 checkpoint(f, *a, **k))[1])
    blocks, losses = {}, {}
    for flag in (False, True):
        calls.clear()
        losses[flag] = [r["loss"] for r in log_of(run(tmp_path / str(flag), "--max_iters=2",
                                                      f"--grad_ckpt={flag}"))]
        blocks[flag] = sum(isinstance(f, model.Block) for f in calls)
    assert blocks[False] == 0 and blocks[True] > 0 and losses[True] == losses[False]


def test_compile_compiles_each_block_and_the_lm_head(tmp_path, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda m, **kw: compiled.append(m))
    run(tmp_path, "--compile=True", "--max_iters=1", "--n_layers=2")
    assert [type(m).__name__ for m in compiled] == ["Block", "Block", "LMHead"]
