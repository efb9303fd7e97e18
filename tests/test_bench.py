"""bench.py's memory formula against published parameter counts and a measured step, and its GPU
check rehearsed on the CPU (bench.py gpu --dry), so that the command a lent GPU runs cannot rot."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import train
from scripts import bench
from model import ModelConfig

ROOT = Path(__file__).resolve().parents[1]


def test_parameter_counts_of_the_table_are_the_published_ones():
    # the model cards on the Hugging Face Hub
    published = {"Llama-3.2-1B": 1_235_814_400, "Llama-3.2-3B": 3_212_749_824,
                 "Llama-3.1-8B": 8_030_261_248, "Llama-3.1-70B": 70_553_706_496}
    assert {k: bench.param_counts(bench.llama_config(s))["total"]
            for k, s in bench.LLAMA_SHAPES.items()} == published


def test_predicted_step_memory_is_within_20_percent_of_the_measured_peak():
    """A full fine-tune whose peak is weights, AdamW, autocast's copies, activations and logits in
    similar parts (bench.py memory checks LoRA, grad_ckpt and the chunked logits the same way)."""
    cfg = ModelConfig(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=768,
                      vocab_size=16000)
    predicted = bench.step_memory(cfg, "full", rows=4, seq=256, trained=512)["peak"]
    measured = bench.measure_step(cfg, "full", rows=4, seq=256, trained=512)
    assert 0.8 <= measured / predicted <= 1.2, (measured, predicted)


def test_gpu_check_rehearsed_on_the_cpu(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "scripts.bench", "gpu", "--dry"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    # bench.py's verdicts checked here from the numbers it prints, not from its PASS
    [bf16] = [line for line in lines if line.startswith("CUT step, bf16 on cpu vs fp32 on the CPU")]
    got, ref = map(json.loads, re.findall(r"\[[^]]*\]", bf16))
    assert got == pytest.approx(ref, rel=1e-2) and abs(ref[1] - ref[0]) > 0.01
    assert got[1] - got[0] == pytest.approx(ref[1] - ref[0], rel=0.05)
    runs = {line.split(":")[0]: json.loads(line.split("losses ")[1])
            for line in lines if line.startswith("torchrun")}
    fsdp = runs["torchrun FSDP, 1 processes, float32"]
    assert len(runs) == 1
    # FSDP's losses are train.py's: the same run (bench.py's dry settings) in this process
    one = train.main(["--data=builtin", "--task_size=400", "--base_iters=0", "--max_iters=4",
                      "--eval_interval=4", "--log_interval=1", "--batch_size=4", "--max_len=160",
                      "--device=cpu", "--dtype=float32", "--warmup_iters=1", "--lam=1.0",
                      "--dim=32", "--n_layers=1", "--n_heads=2", f"--out_dir={tmp_path}"])
    log = [json.loads(line)["loss"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert one["iters"] == 4 and fsdp == pytest.approx(log, rel=1e-4)
    assert any(line.startswith("CUT step, tiny-shaped, bf16, 2 x 64 tokens on CPU")
               for line in lines)
