"""Issue 21, case by case: no program deletes or writes what is not its own, no broken model is saved, every rank
resumes from the same checkpoint, a LoRA run resumes on its own base alone, and the unclear messages name what
fixes them."""
import json
import os
import shutil
import struct
import subprocess
import sys

import pytest
import torch

import eval as ev
import sample
import train
from conftest import wait_until
from model import ModelConfig, Transformer
from scripts import compare
from support.checkpoint import finish_checkpoint
from support.runs import report
from support.settings import configure
from support.tokenizer import Tokenizer
from test_train import (LORA, ROOT, SUBPROCESS_ENV, TINY, VOCAB, base_dir, log_of, one_thread, run, train_state,  # noqa: F401
                        weights)

USER_FILES = {"config.json": '{"user": 1}', "model.safetensors": "user weights", "eval_mine.json": "{}",
              "tokenizer.json": "user tokenizer"}


def user_dir(path, files=USER_FILES):
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def untouched(path, files=USER_FILES):
    return sorted(f.name for f in path.iterdir()) == sorted(files) and all(
        (path / n).read_text() == t for n, t in files.items())


def records(path, n, judgment=None):
    path.write_text("\n".join(json.dumps({"instruction": f"Sort: c, a{i}", "response": "a, c", "judgment": judgment})
                              for i in range(n)))
    return path


# ----------------------------------------------------------------------------- 1-3: only our own directories
@pytest.mark.parametrize("argv", [["--base_iters=2"], []])  # the built-in run's two phases, and one phase
def test_1_resume_into_a_directory_without_a_run_is_refused(tmp_path, argv):
    d = user_dir(tmp_path / "hf")
    with pytest.raises(ValueError, match=f"out_dir {d}.*: no checkpoint to resume|out_dir {d} holds"):
        run(d, "--max_iters=2", "--resume=True", *argv)
    assert untouched(d)
    with pytest.raises(ValueError, match="no checkpoint to resume"):  # a mistyped or empty out_dir
        run(tmp_path / "typo", "--max_iters=2", "--resume=True", *argv)
    assert not (tmp_path / "typo").exists()


def test_2_overwrite_removes_the_old_run_only_once_the_new_one_can_start(tmp_path, base_dir):
    old = run(tmp_path / "run", "--max_iters=2")
    before = (log_of(old), weights(old))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "q", "response": 3, "judgment": null}\n')
    with pytest.raises(ValueError, match="field 'response' must be a string"):
        run(old, f"--data={bad}", "--overwrite=True", "--max_iters=2")
    with pytest.raises(ValueError, match="max_len 400 exceeds"):
        run(old, f"--init_from={base_dir}", "--max_len=400", "--overwrite=True", "--max_iters=2")
    assert log_of(old) == before[0] and all(torch.equal(weights(old)[k], v) for k, v in before[1].items())
    # a sharded model left beside the run: gone with it, so that no reader loads the stale shards
    (old / "model.safetensors.index.json").write_text('{"weight_map": {"x": "model-00001-of-00001.safetensors"}}')
    (old / "model-00001-of-00001.safetensors").write_text("stale")
    (old / "eval_task.json").write_text("{}")
    run(old, "--overwrite=True", "--max_iters=1", "--loss=sft_all")
    assert {"model.safetensors.index.json", "model-00001-of-00001.safetensors", "eval_task.json"}.isdisjoint(
        f.name for f in old.iterdir())
    assert train_state(old)["config"]["loss"] == "sft_all" and len(log_of(old)) == 1


@pytest.mark.parametrize("files", [USER_FILES, {"tokenizer.json": "user tokenizer"}])
@pytest.mark.parametrize("overwrite", [[], ["--overwrite=True"]])
def test_2_3_a_directory_that_holds_no_run_is_never_written(tmp_path, files, overwrite):
    d = user_dir(tmp_path / "d", files)
    with pytest.raises(ValueError, match=f"out_dir {d} holds .*, not a train.py run"):
        run(d, "--max_iters=1", *overwrite)
    assert untouched(d, files)


def test_a_run_killed_before_its_first_checkpoint_may_start_again(tmp_path):
    (tmp_path / "log.jsonl").write_text('{"iter": 0, "loss": 1.0}\n{"iter": 1, "lo')  # and nothing else
    run(tmp_path, "--max_iters=2")
    assert [r["iter"] for r in log_of(tmp_path)] == [0, 1]


# ----------------------------------------------------------------------------- 4-5: outputs checked first
def test_4_eval_never_writes_over_its_input_and_checks_out_file_first(tmp_path, monkeypatch):
    model_dir = tmp_path / "m"
    Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=VOCAB)).save_pretrained(model_dir)
    Tokenizer.byte_level().save(model_dir)
    data = records(tmp_path / "model_outputs.json", 4)
    text = data.read_text()
    for mode in ("task", "triples", "alpaca"):
        monkeypatch.setitem(ev.MODES, mode, lambda c: pytest.fail("evaluated"))
    for argv, what in [(["--mode=triples", f"--data={data}"], "data"),
                       (["--mode=alpaca", f"--alpaca_file={tmp_path}/./model_outputs.json"], "alpaca_file")]:
        with pytest.raises(ValueError, match=f"out_file {data} is a file this command reads"):
            ev.main([f"--ckpt={model_dir}", *argv, f"--out_file={data}", "--device=cpu"])
    assert data.read_text() == text
    proc = subprocess.run([sys.executable, "eval.py", f"--ckpt={model_dir}", f"--out_file={data}/r.json",
                           "--device=cpu"], cwd=ROOT, capture_output=True, text=True, timeout=60, env=SUBPROCESS_ENV)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"eval.py: out_file {data}/r.json: a directory, or not in one that can be written")  # before evaluating


def test_5_compare_writes_the_repositorys_figures_only_from_its_default_out_dir(tmp_path, monkeypatch):
    figures = {f: (ROOT / "figures" / f).read_bytes() for f in ("compare.svg", "curves.svg")}
    rows = [{"regime": "mixed", "method": "cut", "accuracy": 0.5, "swap": 0.0, "missing": 0.0}]
    monkeypatch.setattr(compare, "compare", lambda c: {})
    monkeypatch.setattr(compare, "report", lambda result: ("md", rows, []))
    monkeypatch.setattr(compare, "svg_curves", lambda curves: "<svg/>")
    compare.main([f"--out_dir={tmp_path}"])
    assert (tmp_path / "compare.svg").is_file() and (tmp_path / "curves.svg").read_text() == "<svg/>"
    assert all((ROOT / "figures" / f).read_bytes() == b for f, b in figures.items())


@pytest.mark.parametrize("argv, message", [(["--lrs=1e-4,abc"], "config key 'lrs': expected comma-separated floats"),
                                           (["--stages=0,50"], "config key 'stages': expected finite values > 0"),
                                           (["--lams=nan"], "config key 'lams': expected finite values > 0"),
                                           (["--jobs=0"], "config key 'jobs': expected >= 1")])
def test_12_compare_answers_bad_settings_with_one_line(argv, message):
    proc = subprocess.run([sys.executable, "-m", "scripts.compare", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env=SUBPROCESS_ENV)
    assert proc.returncode == 2 and proc.stderr.startswith(f"compare.py: {message}")
    assert len(proc.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- 6: nothing non-finite
def test_6_a_diverging_run_stops_keeps_its_last_good_checkpoint_and_exits_non_zero(tmp_path, monkeypatch):
    proc = subprocess.run([sys.executable, "train.py", *TINY, "--max_iters=5", "--learning_rate=1e10", "--grad_clip=0",
                           "--warmup_iters=0", f"--out_dir={tmp_path / 'p'}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=SUBPROCESS_ENV)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(
        "train.py: iteration 0: a loss or gradient norm of nan, not saved (the last checkpoint, if any, is in")
    assert not (tmp_path / "p" / "train_state.pt").exists()
    out = tmp_path / "out"
    lr_at = train.lr_at  # good steps, then steps that diverge
    monkeypatch.setattr(train, "lr_at", lambda it, cfg: 1e10 if it >= 3 else lr_at(it, cfg))
    with pytest.raises(FloatingPointError, match=f"iteration 3: .*the last checkpoint, if any, is in {out}"):
        run(out, "--max_iters=8", "--eval_interval=1", "--grad_clip=0")
    assert train_state(out)["iter"] == 3 and all(torch.isfinite(v).all() for v in weights(out).values())
    assert [r["iter"] for r in log_of(out)] == [0, 1, 2] and "NaN" not in (out / "log.jsonl").read_text()
    monkeypatch.setattr(train, "lr_at", lambda it, cfg: 1e10 if it >= 4 else lr_at(it, cfg))  # stopped unlogged
    with pytest.raises(FloatingPointError, match=r"iteration 5: a loss or gradient norm of nan, not saved"):
        run(out, "--max_iters=20", "--eval_interval=1", "--log_interval=100", "--grad_clip=0", "--resume=True")
    assert all(torch.isfinite(v).all() for v in weights(out).values()) and "NaN" not in (out / "log.jsonl").read_text()


@pytest.mark.parametrize("argv, message", [(["--learning_rate=1e999"], "config key 'learning_rate': expected > 0, got inf"),
                                           (["--lam=1e999"], "config key 'lam': expected >= 1 .*, got inf")])
def test_6_non_finite_settings_are_refused(tmp_path, argv, message):
    with pytest.raises(ValueError, match=message):
        run(tmp_path / "out", *argv)
    for text in ('{"learning_rate": Infinity}', '{"alpha": NaN}'):
        (tmp_path / "c.json").write_text(text)
        with pytest.raises(ValueError, match=r"config key '(learning_rate|alpha)': expected >=? 0, got (inf|nan)"):
            configure(train.Config(), [str(tmp_path / "c.json")])
    assert not (tmp_path / "out").exists()


def test_6_a_checkpoint_with_non_finite_weights_is_refused_on_load(tmp_path):
    Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=VOCAB)).save_pretrained(tmp_path)
    Tokenizer.byte_level().save(tmp_path)
    file = tmp_path / "model.safetensors"
    blob = bytearray(file.read_bytes())
    n = struct.unpack("<Q", blob[:8])[0]
    begin = 8 + n + json.loads(blob[8:8 + n])["model.layers.0.mlp.up_proj.weight"]["data_offsets"][0]
    blob[begin:begin + 4] = struct.pack("<f", float("nan"))
    file.write_bytes(blob)
    with pytest.raises(ValueError, match=r"model.safetensors: tensor 'model.layers.0.mlp.up_proj.weight' holds NaN"):
        sample.main([f"--ckpt={tmp_path}", "--prompt=hi", "--device=cpu"])


# ----------------------------------------------------------------------------- 7: every rank the same checkpoint
# the race, provoked without a sleep: rank 0 moves no file of the interrupted save that open_run
# finishes until rank 1 has moved them all (or 60 s have passed: then rank 1 read it unfinished)
RANK_0_MOVES_AFTER_RANK_1 = """
import os, sys, time
if os.environ.get("RANK") == "0":
    move = os.replace
    def move_after_rank_1(src, dst):
        if sys._getframe(2).f_code.co_name == "open_run":  # not the run's own saves
            deadline = time.monotonic() + 60
            while os.path.exists(os.path.dirname(src)) and time.monotonic() < deadline:
                time.sleep(0.01)
        return move(src, dst)
    os.replace = move_after_rank_1
"""


def test_7_every_rank_resumes_from_the_finished_checkpoint(tmp_path):
    """A save killed while moving its files (config.json moved, the rest not), rank 0 the last to
    move: under DDP every rank goes on from the new checkpoint, as one process does (else the
    ranks train at different iterations)."""
    args = [*TINY, "--gradient_accumulation_steps=2", "--eval_interval=2"]
    at2 = run(tmp_path / "at2", "--gradient_accumulation_steps=2", "--eval_interval=2", "--max_iters=2")
    shutil.copytree(at2, tmp_path / "at4")
    run(tmp_path / "at4", "--gradient_accumulation_steps=2", "--eval_interval=2", "--max_iters=4", "--resume=True")
    d = tmp_path / "d"
    shutil.copytree(at2, d)
    shutil.copytree(tmp_path / "at4", d / ".ckpt-new", ignore=shutil.ignore_patterns("log.jsonl", ".lock"))
    (d / ".ckpt-new" / "COMPLETE").touch()
    os.replace(d / ".ckpt-new" / "config.json", d / "config.json")
    shutil.copy(tmp_path / "at4" / "log.jsonl", d / "log.jsonl")
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(RANK_0_MOVES_AFTER_RANK_1)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "train.py", *args, "--max_iters=6", "--resume=True", f"--out_dir={d}"], cwd=ROOT,
                          env=dict(SUBPROCESS_ENV, PYTHONPATH=str(hook)), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    straight = run(tmp_path / "straight", "--gradient_accumulation_steps=2", "--eval_interval=2", "--max_iters=6")
    assert [r["iter"] for r in log_of(d)] == list(range(6))
    torch.testing.assert_close([r["loss"] for r in log_of(d)], [r["loss"] for r in log_of(straight)], rtol=1e-5,
                               atol=2e-5)
    a, b = weights(d), weights(straight)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- 8: one run at a time in an out_dir
def test_8_a_second_run_into_a_busy_out_dir_is_refused_and_a_killed_run_leaves_it_usable(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "train.py", *TINY, "--max_iters=100000", "--eval_interval=5", f"--out_dir={out}"]
    errs = [open(tmp_path / f"err{i}", "w+") for i in range(2)]  # files, not pipes: a full pipe would block
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL, stderr=err) for err in errs]
    wait_until(lambda: any(p.poll() is not None for p in procs), what="the refusal of either run")
    loser = next(i for i, p in enumerate(procs) if p.poll() is not None)
    winner = procs[1 - loser]
    assert procs[loser].returncode == 2 and (tmp_path / f"err{loser}").read_text().strip() == (
        f"train.py: out_dir {out}: another run holds it (its .lock); wait for that run to end, or choose another "
        "--out_dir")
    wait_until(lambda: (out / "train_state.pt").exists()
               and (out / "log.jsonl").read_text().count("\n") >= 8, [winner],
               what="a checkpoint and 8 logged iterations")
    winner.kill()  # SIGKILL: no handler runs, the lock goes with the process
    winner.wait()
    finish_checkpoint(out)  # a kill while a save moved its files: what any program does first
    at = train_state(out)["iter"]
    run(out, "--eval_interval=5", "--resume=True", f"--max_iters={at + 2}")
    assert [r["iter"] for r in log_of(out)] == list(range(at + 2))  # one run's lines, in order
    run(out, "--max_iters=2", "--overwrite=True")  # and a new run may replace it
    assert [r["iter"] for r in log_of(out)] == [0, 1]


# ----------------------------------------------------------------------------- 9: a LoRA run's base
def test_9_a_lora_run_resumes_only_on_the_base_it_was_trained_on(tmp_path, base_dir):
    base = shutil.copytree(base_dir, tmp_path / "base")
    out = run(tmp_path / "out", f"--init_from={base}", *LORA, "--max_iters=2")
    run(out, f"--init_from={base}", *LORA, "--max_iters=3", "--resume=True")  # the same base: it goes on
    weights = (base / "model.safetensors").stat()
    os.utime(base / "model.safetensors", ns=(weights.st_atime_ns, weights.st_mtime_ns + 10**9))  # rewritten
    with pytest.raises(ValueError, match=r"base '\d+ bytes of weights, modified .*' -> '.*resume with the run's"):
        run(out, f"--init_from={base}", *LORA, "--max_iters=4", "--resume=True")
    assert train_state(out)["iter"] == 3


# ----------------------------------------------------------------------------- 10: a run's prompt format
def test_10_eval_scores_a_run_in_the_prompt_format_it_was_trained_in(tmp_path):
    data = records(tmp_path / "t.jsonl", 40, judgment="The order is wrong.")
    out = run(tmp_path / "out", f"--data={data}", "--max_iters=2", "--chat=no", "--val_frac=0.25")
    assert not Tokenizer.from_pretrained(out).instruct  # ChatML tokens and template, the Alpaca format recorded
    rows = {chat: ev.main(["--mode=triples", f"--ckpt={out}", f"--data={data}", *chat, f"--out_file={tmp_path}/r.json",
                           "--device=cpu"])["rows"] for chat in [(), ("--chat=no",), ("--chat=yes",)]}
    assert rows[()] == rows[("--chat=no",)] and rows[()][0]["nll"] != rows[("--chat=yes",)][0]["nll"]


# ----------------------------------------------------------------------------- 11: a blank judgment, a partial tokenizer
def test_11_a_judgment_of_only_spaces_is_refused(tmp_path):
    for records_text, where in [('{"instruction": "q", "response": "a", "judgment": "  \\n "}', "line 1"),
                                ('[{"instruction": "q", "output": "a", "judgment": " "}]', "record 0")]:
        f = tmp_path / "t.json"
        f.write_text(records_text)
        with pytest.raises(ValueError, match=f"{f}: {where}: field 'judgment' holds only spaces"):
            run(tmp_path / "out", f"--data={f}", "--max_iters=1")


def test_11_a_tokenizer_json_without_its_config_is_named(tmp_path, capsys):
    Tokenizer.byte_level().save(tmp_path)
    assert Tokenizer.from_pretrained(tmp_path).instruct and "warning" not in capsys.readouterr().out
    (tmp_path / "tokenizer_config.json").unlink()
    assert not Tokenizer.from_pretrained(tmp_path).instruct  # the Alpaca template, said aloud
    assert capsys.readouterr().out.startswith(f"warning: {tmp_path / 'tokenizer.json'}: no tokenizer_config.json")


# ----------------------------------------------------------------------------- 12: messages that say what to do
def test_12_the_built_in_run_resumes_by_another_path_and_after_a_move(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run("a", "--base_iters=2", "--max_iters=2")
    run(tmp_path / "a", "--base_iters=2", "--max_iters=3", "--resume=True")  # absolute, where it ran relative
    shutil.move(tmp_path / "a", tmp_path / "b")
    run(tmp_path / "b", "--base_iters=2", "--max_iters=4", "--resume=True")
    assert [r["iter"] for r in log_of(tmp_path / "b")] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="base_iters 2 -> 3"):  # the base's own settings are still checked
        run(tmp_path / "b", "--base_iters=3", "--max_iters=5", "--resume=True")


def test_12_printed_commands_resume_under_torchrun_and_are_shell_quoted(monkeypatch, capsys):
    cfg = configure(train.Config(), ["--fsdp=True", "--out_dir=my runs/a"])
    monkeypatch.setenv("WORLD_SIZE", "8")
    report({"out_dir": "my runs/a", "iters": 5, "stopped_by": "SIGTERM"}, cfg, ["--out_dir=my runs/a", "--fsdp=True"], 1)
    assert capsys.readouterr().out.strip().endswith(
        "Resume with: torchrun --nproc_per_node=8 train.py '--out_dir=my runs/a' --fsdp=True --resume=True")
    cfg = configure(train.Config(), ["--data=my data.json", "--out_dir=my runs/a"])
    report({"out_dir": "my runs/a", "iters": 5, "stopped_by": None, "loss": 1.0}, cfg, [], 1)
    assert "python eval.py --mode=triples --ckpt='my runs/a' --data='my data.json'" in capsys.readouterr().out


def test_12_a_truncated_last_log_line_a_normalized_data_path_and_max_iters_below_the_checkpoint(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    data = records(tmp_path / "d" / "t.jsonl", 12)
    out = run(tmp_path / "out", f"--data={data}", "--max_iters=3", "--eval_interval=2")
    with open(out / "log.jsonl", "a") as log:
        log.write('{"iter": 3, "lo')  # a kill while writing a line
    run(out, f"--data={tmp_path}/d/./t.jsonl", "--max_iters=4", "--eval_interval=2", "--resume=True")
    assert [r["iter"] for r in log_of(out)] == [0, 1, 2, 3]
    capsys.readouterr()
    train.main([*TINY, f"--out_dir={out}", f"--data={data}", "--max_iters=2", "--eval_interval=2", "--resume=True"])
    assert "nothing to train: raise --max_iters above the checkpoint iteration" in capsys.readouterr().out
    assert train_state(out)["iter"] == 4 and len(log_of(out)) == 4
