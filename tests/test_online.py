"""scripts/online.py: the file judge's round trip (written, read back, mismatched records refused)
and one round of each kind of method end to end on a tiny base, resumed without redoing a step;
the crossing's drivers (injected flaws, U on a round's own flaws, long lists with one local
flaw)."""
import json
import re
import shutil
import zlib
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

import train
from conftest import token_logps
from data import encode_triples
from scripts import online
from support.runs import LOCKS, lock
from support.triple_files import Triple
from tasks import letters

TINY = ["--task_size=200", "--dim=32", "--n_layers=1", "--n_heads=2", "--max_len=160",
        "--batch_size=4", "--eval_interval=1000", "--val_frac=0.1", "--device=cpu"]
TRAIN_ARGS = "--batch_size=4 --val_frac=0.1 --max_len=160"  # train.py flags the loop leaves open


def snapshot(folder):
    """Every file under folder with its size and time: what a run may not have changed."""
    return {f: (f.stat().st_size, f.stat().st_mtime_ns) for f in Path(folder).rglob("*")}


def test_file_judge_round_trip(tmp_path):
    samples = [("Sort these letters: b, a", "a, b"), ("Sort these letters: c, a", "c, a")]
    assert online.file_judge(tmp_path, samples) is None
    asked = [json.loads(line) for line in (tmp_path / "to_judge.jsonl").read_text().splitlines()]
    assert asked == [{"instruction": i, "response": r} for i, r in samples]
    judged = tmp_path / "judged.jsonl"
    records = [dict(a, judgment=j) for a, j in zip(asked, [None, "The order is wrong."])]
    judged.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert online.file_judge(tmp_path, samples) == [None, "The order is wrong."]
    swapped = [records[0], dict(records[1], response="a, c")]
    for bad, message in [(records[:1], "1 records, but .* asks for 2"),
                         (swapped, "line 2: not the record .* asks for"),
                         ([records[0], asked[1]], "line 2: missing field 'judgment'"),
                         ([records[0], dict(records[1], judgment=3)],
                          "line 2: field 'judgment' must be a string or null"),
                         ([records[0], dict(records[1], judgment="   ")],
                          "line 2: field 'judgment' holds only spaces")]:
        judged.write_text("".join(json.dumps(r) + "\n" for r in bad))
        with pytest.raises(ValueError, match=f"^{judged}: {message}"):
            online.file_judge(tmp_path, samples)
    failed = [dict(records[0], judgment=""), dict(records[1], judgment="$ERROR$")]
    judged.write_text("".join(json.dumps(r) + "\n" for r in failed))
    assert online.file_judge(tmp_path, samples) == [None, "$ERROR$"]  # "": acceptable


def test_file_judge_keeps_judgments_written_into_the_file_it_asks_with(tmp_path):
    samples = [("Sort these letters: b, a", "a,\u2028b"), ("Sort these letters: c, a", "c, a")]
    assert online.file_judge(tmp_path, samples) is None
    asked = tmp_path / "to_judge.jsonl"
    records = [json.loads(line) for line in asked.read_text(encoding="utf-8").split("\n")[:-1]]
    assert [(r["instruction"], r["response"]) for r in records] == samples  # U+2028: one line
    edited = "".join(json.dumps(dict(r, judgment="Wrong.")) + "\n" for r in records)
    asked.write_text(edited)
    with pytest.raises(ValueError, match=f"^{asked} was changed, and .*judged.jsonl is missing"):
        online.file_judge(tmp_path, samples)
    assert asked.read_text() == edited
    (tmp_path / "judged.jsonl").write_text(edited)
    assert online.file_judge(tmp_path, samples) == ["Wrong.", "Wrong."]


def test_a_failed_judge_call_gives_no_triple_nor_pair_in_any_method():
    samples = [(f"Sort these letters: {k}", f"response {n}") for k in "abcd" for n in (1, 2)]
    judgments = [None, "Wrong.", "$ERROR$", None, "$ERROR$", "Wrong.", "Wrong.", None]
    kept = [(i, r, j) for (i, r), j in zip(samples, judgments) if j != "$ERROR$"]
    for method in ("cut", "sft", "ilf_mle"):
        records = online.training_records(online.Config(method=method), samples, judgments)
        assert [(t["instruction"], t["response"], t["judgment"]) for t in records] == kept
    pairs = online.training_records(online.Config(method="dpo"), samples, judgments)
    assert pairs == [{"prompt": "Sort these letters: a", "chosen": "response 1",
                      "rejected": "response 2"},
                     {"prompt": "Sort these letters: d", "chosen": "response 2",
                      "rejected": "response 1"}]
    down = online.training_records(online.Config(downsample=0.5), samples, judgments)
    assert sorted(t["judgment"] or "" for t in down) == ["", "", "Wrong.", "Wrong.", "Wrong."]


def test_write_atomic_leaves_the_old_file_when_killed_before_the_move(tmp_path, monkeypatch):
    target = tmp_path / "record_test.json"
    online.write_atomic(target, "old ✓")
    assert target.read_bytes() == "old ✓".encode("utf-8")
    monkeypatch.setattr(online.os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        online.write_atomic(target, "new")
    assert target.read_text(encoding="utf-8") == "old ✓"


def test_instruction_files_are_read_as_written_or_refused_naming_the_record(tmp_path):
    alpaca = tmp_path / "a.json"
    alpaca.write_text(json.dumps([{"instruction": "Name a river.", "input": None},
                                  {"instruction": "Add them.", "input": "2 and 3"},
                                  {"instruction": "Say hi."}]))
    shepherd = tmp_path / "s.jsonl"
    shepherd.write_text(json.dumps({"question": "Why\u2028so?"}) + "\n")
    assert online.read_instructions(f"{alpaca},{shepherd}") == \
        ["Add them.\n\n2 and 3", "Name a river.", "Say hi.", "Why\u2028so?"]
    for path, text, message in [
            (alpaca, '[{"instruction": "x", "input": 3}]', "record 0: field 'input' must be a "
                                                           "string or null"),
            (alpaca, '[{"input": "x"}]', "record 0: missing field 'instruction'"),
            (alpaca, '{"instruction": "x"}', "expected a JSON list"),
            (shepherd, '{"question": "q"}\n{"question": 7}\n', "line 2: field 'question' must "
                                                                "be a string"),
            (shepherd, '{"question": "q"}\n["q"]\n', "line 2: expected a JSON object")]:
        good = path.read_text()
        path.write_text(text)
        with pytest.raises(ValueError, match=f"^{path}: {re.escape(message)}"):
            online.read_instructions(f"{alpaca},{shepherd}")
        path.write_text(good)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("online")
    train.main([*TINY, "--data=builtin", f"--out_dir={root / 'run'}", "--base_iters=300",
                "--max_iters=1"])
    return root / "run" / "base"


@pytest.mark.parametrize("method", ["cut", "dpo"])
def test_one_round_end_to_end_and_resumed(tmp_path, base, method):
    before = snapshot(base.parent)
    args = [f"--base={base}", f"--out_dir={tmp_path}", f"--method={method}", "--rounds=1",
            "--judge_calls=16", "--max_iters=2", "--n_eval=20", "--lam=3",
            f"--train_args={TRAIN_ARGS}"]
    summary = online.main(args)
    record = summary["rounds"][1]
    samples = json.loads((tmp_path / "round1" / "samples.json").read_text())
    judgments = [letters.check_response(i, r).judgment for i, r in samples]
    assert record["judge_calls"] == 16 == len(samples)
    assert record["flawed_share"] == sum(j is not None for j in judgments) / 16
    data = [json.loads(line) for line in (tmp_path / "round1" / "data.jsonl").read_text().splitlines()]
    if method == "cut":
        assert [(d["instruction"], d["response"], d["judgment"]) for d in data] == \
            [(i, r, j) for (i, r), j in zip(samples, judgments)]
    else:  # two samples per instruction: a pair where the judge accepted one and flawed the other
        pairs = []
        for k in range(0, 16, 2):
            (i, a), (_, b) = samples[k], samples[k + 1]
            if (judgments[k] is None) != (judgments[k + 1] is None):
                good, bad = (a, b) if judgments[k] is None else (b, a)
                pairs.append({"prompt": i, "chosen": good, "rejected": bad})
        assert data == pairs
    assert record["trained"] == bool(data)
    # the model's place in out_dir (nothing to train on: the model stays the base)
    assert record["model"] == ("round1/model" if data else str(base.resolve()))
    for r in (0, 1):  # each round evaluated in out_dir with the run's own n_eval and lam
        rows = json.loads((tmp_path / f"round{r}" / "eval_test.json").read_text())["rows"]
        assert rows[-1]["n"] == 20 and rows[-1]["lam"] == 3
        assert summary["rounds"][r]["accuracy"] == rows[-1]["accuracy"]
    assert snapshot(base.parent) == before  # nothing written outside out_dir
    rounds = [snapshot(tmp_path / "round0"), snapshot(tmp_path / "round1")]
    assert online.main(args)["rounds"] == summary["rounds"]  # finished steps are reused
    assert [snapshot(tmp_path / "round0"), snapshot(tmp_path / "round1")] == rounds
    run_files = snapshot(tmp_path)
    with pytest.raises(ValueError, match=r"other settings \(method '%s' -> 'sft'; "
                       r"n_eval 20 -> 30\): .* --overwrite=True" % method):
        online.main([*args, "--method=sft", "--n_eval=30"])
    assert snapshot(tmp_path) == run_files  # refused before anything was written


def test_a_file_judged_run_preempted_moved_and_started_afresh(tmp_path, base, monkeypatch):
    args = [f"--base={base}", "--method=sft", "--judge=file", "--rounds=1", "--judge_calls=8",
            "--max_iters=2", "--n_eval=10", f"--train_args={TRAIN_ARGS}"]
    first = tmp_path / "first"
    with pytest.raises(SystemExit, match="judged.jsonl"):
        online.main([*args, f"--out_dir={first}"])
    asked = (first / "round1" / "to_judge.jsonl").read_text().splitlines()
    verdicts = ["$ERROR$", None, "$ERROR$", None, None, "Wrong.", "Wrong.", "Wrong."]
    judged = [dict(json.loads(line), judgment=v) for line, v in zip(asked, verdicts)]
    judged_file = first / "round1" / "judged.jsonl"
    unjudged = [*judged[:7], json.loads(asked[7])]
    judged_file.write_text("".join(json.dumps(r) + "\n" for r in unjudged))
    (first / "round0" / "eval_test.json").unlink()
    with pytest.raises(ValueError, match=f"{judged_file}: line 8: missing field 'judgment'"):
        online.main([*args, f"--out_dir={first}"])
    assert not (first / "round0" / "eval_test.json").exists()  # refused before evaluating
    judged_file.write_text("".join(json.dumps(r) + "\n" for r in judged))
    real_run = online.run

    def preempted(log_dir, *argv):  # SIGTERM: train.py saves after iteration 1 of 2 and stops
        if argv[0] == "train.py":
            real_run(log_dir, *argv, "--max_iters=1")
            raise ValueError("train.py failed (exit 143)")
        real_run(log_dir, *argv)
    monkeypatch.setattr(online, "run", preempted)
    with pytest.raises(ValueError, match="exit 143"):
        online.main([*args, f"--out_dir={first}"])
    monkeypatch.undo()
    log = first / "round1" / "model" / "log.jsonl"
    assert [json.loads(line)["iter"] for line in log.read_text().splitlines()] == [0]
    record = online.main([*args, f"--out_dir={first}"])["rounds"][1]
    assert [json.loads(line)["iter"] for line in log.read_text().splitlines()] == [0, 1]
    # failed calls are neither trained on nor flaws
    assert (record["failed_calls"], record["flawed_share"]) == (2, 3 / 6)
    data = (first / "round1" / "data.jsonl").read_text().splitlines()
    kept = [v for v in verdicts if v != "$ERROR$"]
    assert [json.loads(line)["judgment"] for line in data] == kept
    moved = tmp_path / "moved"
    shutil.move(first, moved)
    with pytest.raises(SystemExit, match="judged.jsonl"):  # round 2 sampled from the moved model
        online.main([*args, f"--out_dir={moved}", "--rounds=2"])
    assert (moved / "round2" / "samples.json").is_file()
    with pytest.raises(ValueError, match=r"other settings \(lam 2.0 -> 4.0\)"):
        online.main([*args, f"--out_dir={moved}", "--lam=4", "--rounds=0"])
    online.main([*args, f"--out_dir={moved}", "--lam=4", "--rounds=0", "--overwrite=True"])
    assert sorted(p.name for p in moved.iterdir()) == [".lock", "config.json", "online.json",
                                                       "round0"]
    assert json.loads((moved / "round0" / "eval_test.json").read_text())["rows"][0]["lam"] == 4


def test_refused_up_front_and_nothing_written(tmp_path, base):
    run_dir = base.parent  # train.py's run: its train_state.pt, config.json and base/
    before = snapshot(run_dir)
    common = [f"--base={base}", "--rounds=1", "--judge_calls=8", f"--train_args={TRAIN_ARGS}"]
    for out in (run_dir, base):
        with pytest.raises(ValueError, match=f"out_dir {out}: a file, a model or a train.py run"):
            online.main([*common, f"--out_dir={out}"])
    assert snapshot(run_dir) == before
    many, few, prompts, empty = (tmp_path / name for name in ("a.json", "b.json", "if.jsonl",
                                                              "empty.jsonl"))
    many.write_text(json.dumps([{"instruction": f"Describe {i}."} for i in range(208)]))
    few.write_text(json.dumps([{"instruction": f"Describe {i}."} for i in range(207)]))
    prompts.write_text(json.dumps({"prompt": "p", "instruction_id_list": [], "kwargs": []}))
    empty.write_text("")
    ifeval = ["--task=ifeval", f"--instructions={many}", f"--ifeval={prompts}"]
    out = tmp_path / "out"
    for extra, message in [
            (["--train_args=--max_iters=5"], "train_args: '--max_iters=5': expected train.py's "
                                             "--key=value flags but init_from, data"),
            (["--train_args=run.json"], "train_args: 'run.json': expected"),
            (["--train_args=--lora_rnak=4"], "train_args: unknown config key 'lora_rnak'"),
            (["--train_args=--batch_size=0"], "train_args: config key 'batch_size': expected > 0"),
            (["--train_args=--max_len=200"], "train_args: max_len 200 exceeds the base's "
                                             "max_seq_len 161"),
            (["--method=dpo", "--downsample=0.25"], "downsample=0.25: expected >= 0, and 0 for "
                                                    "dpo"),
            (["--method=dpo", "--judge_calls=1"], "judge_calls >= 2"),
            ([*ifeval, f"--instructions={few}"], f"instructions {few}: 207 distinct ones"),
            ([*ifeval, "--split=val", "--n_eval=201"], "n_eval is 201"),
            ([*ifeval, f"--ifeval={empty}"], f"{empty}: no records")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            online.main([*common, f"--out_dir={out}", *extra])
    assert not out.exists()
    lock(out)  # a second command into an out_dir that a run holds
    try:
        with pytest.raises(ValueError, match=f"out_dir {out}: another run holds it"):
            online.main([*common, f"--out_dir={out}"])
    finally:
        LOCKS.pop(out.resolve()).close()
    assert [p.name for p in out.iterdir()] == [".lock"]


def test_a_run_recorded_before_its_inputs_were_goes_on_with_its_settings(tmp_path):
    c = online.Config(out_dir=str(tmp_path))
    older = {k: v for k, v in asdict(c).items() if k != "overwrite"}  # before both were recorded
    (tmp_path / "config.json").write_text(json.dumps(older))
    online.start_run(c, tmp_path, {"base": "stamp"})
    assert json.loads((tmp_path / "config.json").read_text())["inputs"] == {"base": "stamp"}
    (tmp_path / "config.json").write_text(json.dumps(older))
    with pytest.raises(ValueError, match=r"other settings \(method 'cut' -> 'sft'\)"):
        online.start_run(replace(c, method="sft"), tmp_path, {"base": "stamp"})


def test_refinement_runs_on_the_runs_device(tmp_path, monkeypatch):
    argvs = []

    def fake_run(log_dir, *argv):
        argvs.append(argv)
        Path(argv[-1].removeprefix("--out_file=")).write_text("[]")
    monkeypatch.setattr(online, "run", fake_run)
    c = online.Config(method="ilf_mle", device="cuda:3")
    online.round_data(c, [("Sort these letters: b, a", "b, a")], ["Wrong."], tmp_path, tmp_path)
    assert argvs[0][:2] == ("-m", "scripts.refine") and "--device=cuda:3" in argvs[0]


def test_injected_flaws_replace_the_samples_with_the_tasks_fixed_responses(tmp_path, base):
    args = [f"--base={base}", f"--out_dir={tmp_path}", "--method=sft", "--rounds=1",
            "--judge_calls=16", "--max_iters=2", "--n_eval=20", "--injected=0.5",
            f"--train_args={TRAIN_ARGS}"]
    record = online.main(args)["rounds"][1]
    fixed = letters.make_task(16, seed=1001, kind="mixed", flawed_frac=0.5, split="train")
    lines = (tmp_path / "round1" / "data.jsonl").read_text().splitlines()
    data = [json.loads(line) for line in lines]
    assert [(d["instruction"], d["response"], d["judgment"]) for d in data] == \
        [(t.instruction, t.response, t.judgment) for t in fixed]
    assert not (tmp_path / "round1" / "samples.json").exists()  # nothing was sampled
    assert record["flawed_share"] == sum(t.judgment is not None for t in fixed) / 16
    assert 0 < record["flawed_share"] < 1
    for bad in ("--method=dpo", "--injected=1.5"):
        with pytest.raises(ValueError, match="injected flaws are a share in"):
            online.main([*args, bad])


def test_refine_base_teaches_refining_every_kind_with_correct_answers():
    from scripts.refine import refine_prompt
    from scripts import refine_base
    flawed = refine_base.flawed_examples(200, seed=5, split="train")
    examples = refine_base.refine_examples(200, seed=5, split="train")
    assert [e.instruction for e in examples] == [refine_prompt(t) for t in flawed]
    for t, e in zip(flawed, examples):
        assert e.judgment is None and letters.check_response(t.instruction, e.response).kind == "ok"
    # the refiner reads the kinds of mistake the model makes, a letter never given most of all
    kinds = Counter(letters.check_response(t.instruction, t.response).kind for t in flawed)
    assert set(kinds) == {"extra", "missing", "swap", "order"}
    assert kinds["extra"] > 100
    assert all(t.judgment == letters.check_response(t.instruction, t.response).judgment
               for t in flawed)


def test_online_compare_chooses_each_method_rate_on_validation(monkeypatch, tmp_path):
    from scripts import online_compare
    # made-up last-round validation accuracies; test accuracies that tell seeds apart
    val = {("cut", 1e-4, 150): 0.5, ("cut", 3e-4, 150): 0.6, ("dpo", 1e-6, 150): 0.4,
           ("dpo", 1e-5, 150): 0.4, ("cut", 1e-4, 20): 0.7, ("cut", 3e-4, 20): 0.7,
           ("dpo", 1e-6, 20): 0.3, ("dpo", 1e-5, 20): 0.3}
    calls = []

    def fake(c, method, lr, iters, seed, split):
        calls.append((method, lr, iters, seed, split))
        acc = val[(method, lr, iters)] if split == "val" else 0.1 * seed
        return {"rounds": [{"accuracy": 0.3, "swap": 0.0},
                           {"accuracy": acc, "swap": 0.1, "flawed_share": 0.5}]}
    monkeypatch.setattr(online_compare, "online", fake)
    c = online_compare.Config(out_dir=str(tmp_path), methods="cut,dpo", seeds=3, iters="20,150")
    rows = online_compare.compare(c)
    # ties: the smaller rate, then the fewer iterations
    assert [(r["method"], r["lr"], r["iters"]) for r in rows] == [("cut", 1e-4, 20),
                                                                  ("dpo", 1e-6, 150)]
    assert rows[0]["flawed_share"] == [0.5]
    assert rows[0]["test"] == pytest.approx([0.3, 0.2])
    assert rows[0]["test_max"] == pytest.approx([0.3, 0.3])
    assert sorted(k for k in calls if k[4] == "test") == \
        [("cut", 1e-4, 20, s, "test") for s in (1, 2, 3)] + \
        [("dpo", 1e-6, 150, s, "test") for s in (1, 2, 3)]
    row = "| `cut` | 0.0001, 20 (0.700) | 0.300 (0.30-0.30) / 0.200 (0.10-0.30) | 0.000 / 0.100 |"
    assert row in online_compare.markdown(rows)
    assert online_compare.svg(rows).count("<polyline") == 2


def test_online_compare_names_a_run_by_its_iterations_unless_the_default(monkeypatch, tmp_path):
    from scripts import online_compare
    argvs = []

    def fake_run(argv, **kwargs):
        argvs.append(argv)
        out = next(a for a in argv if a.startswith("--out_dir=")).removeprefix("--out_dir=")
        Path(out, "online.json").write_text("{}")
    monkeypatch.setattr(online_compare.subprocess, "run", fake_run)
    c = online_compare.Config(out_dir=str(tmp_path), injected=0.5)
    online_compare.online(c, "cut", 1e-4, 150, 2, "val")
    online_compare.online(c, "cut", 1e-4, 20, 2, "val")
    assert (tmp_path / "cut-lr0.0001-s2").is_dir() and (tmp_path / "cut-lr0.0001-it20-s2").is_dir()
    assert "--max_iters=20" in argvs[1] and "--injected=0.5" in argvs[1]
    assert "--lam=2.0" in argvs[1]  # cut's lambda reaches every run


def test_downsample_keeps_acceptable_triples_at_a_share_of_the_flawed(tmp_path):
    samples = [(f"Sort these letters: b, a{i}", "x") for i in range(12)]
    judgments = [None] * 8 + ["Wrong."] * 4
    c = online.Config(downsample=0.5, method="cut")
    data = online.round_data(c, samples, judgments, tmp_path, tmp_path)
    kept = [json.loads(line) for line in data.read_text().splitlines()]
    assert sum(t["judgment"] is not None for t in kept) == 4  # every flawed triple
    assert sum(t["judgment"] is None for t in kept) == 2      # 0.5 x 4 acceptable ones, at random
    all_kept = online.round_data(online.Config(method="cut"), samples, judgments, tmp_path, tmp_path)
    assert len(all_kept.read_text().splitlines()) == 12


def test_a_failed_step_is_one_line_naming_its_log(tmp_path):
    with pytest.raises(ValueError, match=r"^train.py --loss=kto failed \(exit 2\); its output is in .*commands.log$"):
        online.run(tmp_path, "train.py", "--loss=kto")
    assert "config key 'loss'" in (tmp_path / "commands.log").read_text()


def test_ifeval_round_end_to_end_as_the_gpu_command_runs_it(tmp_path):
    """The README's GPU command (task ifeval, LoRA, IFEval's scores each round) on a tiny random
    model on CPU: the round's judgments are the IFEval checkers', its scores those of ifeval.score
    on the saved responses, and a second call reuses every step."""
    from model import ModelConfig, Transformer
    from support.tokenizer import Tokenizer
    from scripts import ifeval_report, ifeval_u
    from tasks import ifeval
    torch.manual_seed(0)
    tok = Tokenizer.byte_level()
    base = tmp_path / "base"
    Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=2, hidden_dim=64,
                            max_seq_len=512, vocab_size=tok.n_vocab)).save_pretrained(base)
    tok.save(base)
    alpaca = [{"instruction": f"Describe the number {i}.", "input": ""} for i in range(230)]
    shepherd = [{"question": "What is 2 + 2?"}, {"question": "x" * 1001}]  # too long: left out
    (tmp_path / "a.json").write_text(json.dumps(alpaca))
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(q) + "\n" for q in shepherd))
    tests = [{"key": 1, "prompt": "Say hi. Do not use any commas.",
              "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
             {"key": 2, "prompt": "Say hi in lowercase.",
              "instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}]}]
    (tmp_path / "if.jsonl").write_text("".join(json.dumps(t) + "\n" for t in tests))
    args = [f"--base={base}", f"--out_dir={tmp_path / 'cut-s1'}", "--task=ifeval",
            f"--instructions={tmp_path / 'a.json'},{tmp_path / 's.jsonl'}",
            f"--ifeval={tmp_path / 'if.jsonl'}", "--rounds=1", "--judge_calls=8",
            "--max_new_tokens=12", "--temperature=0.7", "--max_iters=2", "--device=cpu",
            "--train_args=--lora_rank=4 --batch_size=4 --max_len=256 --val_frac=0.25"]
    summary = online.main(args)
    assert len(online.read_instructions(f"{tmp_path / 'a.json'},{tmp_path / 's.jsonl'}")) == 231
    round1 = tmp_path / "cut-s1" / "round1"
    data = [json.loads(line) for line in (round1 / "data.jsonl").read_text().splitlines()]
    records = {r["prompt"]: r for r in online.constrained(
        online.configure(online.Config(), args), "train", 8, 1000 + 1)}
    assert [d["instruction"] for d in data] == list(records)
    for d in data:
        rec = records[d["instruction"]]
        assert d["judgment"] == ifeval.judge(d["instruction"], rec["instruction_id_list"],
                                             rec["kwargs"], d["response"])
    saved = json.loads((round1 / "ifeval_test.json").read_text())
    expected = ifeval.score(ifeval.read_prompts(tmp_path / "if.jsonl"), saved["responses"])
    for r in (0, 1):
        record = summary["rounds"][r]
        scores = json.loads((tmp_path / "cut-s1" / f"round{r}" / "ifeval_test.json").read_text())
        assert {k: record[k] for k in online.HEADLINE["ifeval"]} == \
            {k: scores[k] for k in online.HEADLINE["ifeval"]}
    assert {k: summary["rounds"][1][k] for k in online.HEADLINE["ifeval"]} == \
        {k: expected[k] for k in online.HEADLINE["ifeval"]}
    assert (round1 / "model" / "train_state.pt").is_file()
    stamp = (round1 / "ifeval_test.json").stat().st_mtime
    assert online.main(args)["rounds"] == summary["rounds"]
    assert (round1 / "ifeval_test.json").stat().st_mtime == stamp
    u = ifeval_u.measure(ifeval_u.Config(run=str(tmp_path / "cut-s1"), round=1, batch_size=4))
    flawed = [d for d in data if d["judgment"]]
    assert u["flawed"] == len(flawed) and u["scored"] == len(flawed)
    # U by hand on the base, the round's sampler: p_n(t) - lam p_x(t) > 0, lam 2
    model = Transformer.from_pretrained(base)
    triples = [Triple(d["instruction"], d["response"], d["judgment"]) for d in flawed]
    with torch.no_grad():
        in_u = [token_logps(model, *e.rows[1]).exp() - 2 * token_logps(model, *e.rows[0]).exp() > 0
                for e in encode_triples(tok, triples, "cut", 512, chat=True, verbose=False)]
    assert u["frac_unlikely"] == pytest.approx(float(torch.cat(in_u).float().mean()), abs=1e-6)
    broken = Counter()  # per constraint, the flawed responses that break it
    for d in flawed:
        rec = records[d["instruction"]]
        broken.update(i for i, k in zip(rec["instruction_id_list"], rec["kwargs"])
                      if ifeval.check(i, k, rec["prompt"], d["response"]))
    assert u["broken"] == dict(broken) and sum(broken.values()) >= len(flawed)
    rows = ifeval_report.main([f"--runs={tmp_path}"])
    assert [(r["method"], r["round"], r["seeds"]) for r in rows] == [("cut", 0, 1), ("cut", 1, 1)]
    for row, record in zip(rows, summary["rounds"]):
        assert row["prompt_strict"] == (record["prompt_strict"],) * 3
    assert (tmp_path / "report.md").is_file() and (tmp_path / "ifeval.svg").is_file()
    with pytest.raises(ValueError, match="task 'ifeval' needs --instructions"):
        online.main([f"--base={base}", "--task=ifeval", f"--out_dir={tmp_path / 'x'}"])


def test_ifeval_u_points_at_the_characters_that_break_a_constraint():
    from scripts.ifeval_u import flaw_offsets
    assert flaw_offsets("punctuation:no_comma", {}, "a, b, c") == [1, 4]
    assert flaw_offsets("change_case:english_lowercase", {}, "aBc D") == [1, 4]
    assert flaw_offsets("change_case:english_capital", {}, "ABc") == [2]
    assert flaw_offsets("keywords:forbidden_words", {"forbidden_words": ["cat"]},
                        "A Cat, a cathedral.") == [2, 3, 4]  # whole words only
    assert flaw_offsets("length_constraints:number_words", {"num_words": 5,
                                                            "relation": "at least"}, "a b") is None


def test_crossing_names_where_cuts_gain_crosses_rejection_samplings(monkeypatch, tmp_path):
    from scripts import crossing, online_compare
    share = {100: 0.9, 400: 0.5, 1200: 0.1}  # the weaker the base, the more of its answers flawed
    gains = {"cut": {100: 0.30, 400: 0.10, 1200: 0.00, 0.5: 0.02, 1.0: -0.02},
             "sft": {100: 0.10, 400: 0.20, 1200: 0.05, 0.5: 0.00, 1.0: 0.00}}

    def fake_base(c, iters):
        return tmp_path / f"base{iters}"

    def fake_compare(settings):
        point = settings.injected or int(Path(settings.base).name.removeprefix("base"))
        flawed = settings.injected or share[point]
        assert settings.methods == ("cut,sft,sft_all" if settings.injected else "cut,sft,dpo")
        first = settings.judge_calls == 48 and not settings.injected
        assert settings.iters == ("150" if first else "25,150")
        return [dict(method=m, lr=1e-4, iters=150, test=[0.5, 0.5 + g[point]],
                     test_min=[0.5, 0.5 + g[point]], test_max=[0.5, 0.55 + g[point]],
                     swap=[0.1, 0.0], flawed_share=[flawed]) for m, g in gains.items()]

    def fake_detection(c, base, rows, name):
        kinds = dict(swap=1.0, missing=0.0, order=0.0, extra=0.0, garbage=0.0)
        return dict(U_precision=0.25, U_recall=0.5, frac_unlikely=0.01, gain_wrong=-0.1,
                    gain_other=-0.2, flawed=10, U_precision_task=0.5, U_recall_task=0.8, **kinds)
    monkeypatch.setattr(crossing, "make_base", fake_base)
    monkeypatch.setattr(online_compare, "compare", fake_compare)
    monkeypatch.setattr(crossing, "detection", fake_detection)
    points = crossing.main([f"--out_dir={tmp_path}", "--base_steps=100,400,1200",
                            "--sizes=48,12", "--injected=0.5,1.0", "--injected_base=400"])
    assert len(points) == 16  # 3 bases x 2 sizes + 2 injected shares (at the first size), x 2
    points = [p for p in points if p["size"] == 48]
    cut100 = next(p for p in points if p["method"] == "cut" and p["base_iters"] == 100)
    assert cut100["gain"] == pytest.approx(0.30) and cut100["gain_max"] == pytest.approx(0.35)
    assert cut100["flawed_share"] == 0.9 and cut100["setting"] == "own"
    injected = [p for p in points if p["setting"] == "injected"]
    assert {(p["base_iters"], p["flawed_share"]) for p in injected} == {(400, 0.5), (400, 1.0)}
    # own: cut - sft is -0.05 at 0.1, -0.10 at 0.5, +0.20 at 0.9, each beyond the seeds' spread:
    # one crossing, between 0.5 and 0.9. Injected: +0.02 then -0.02, within the spread: none.
    result = json.loads((tmp_path / "crossing.json").read_text())
    assert result["crossings"][0] == dict(setting="own", size=12, low=0.5, high=0.9,
                                          flawed_share=pytest.approx(0.5 + 0.4 * 0.10 / 0.30))
    assert result["crossings"][1:] == [dict(result["crossings"][0], size=48)]
    assert len(result["detections"]) == 8
    assert result["detections"][0]["U_recall_task"] == 0.8
    assert result["detections"][0]["U_recall"] == 0.5
    md = (tmp_path / "crossing.md").read_text()
    assert "own flaws, 48 judge calls: CUT's gain crosses sft's at a flawed share of about 0.63" \
        in md
    # cut and sft, for each of own at 48, own at 12, injected at 48
    assert (tmp_path / "crossing.svg").read_text().count("<polyline") == 6


def test_crossing_measures_u_on_the_rounds_own_flawed_responses(tmp_path, base):
    from scripts import crossing
    import eval as ev
    pairs = [("Sort these letters: c, a, b, d, e", "a, c, b, d, e"),  # a swap
             ("Sort these letters: c, a, b", "a, b, c, z"),          # an extra letter
             ("Sort these letters: c, a, b", "a, b, c")]             # acceptable: left out
    triples = [letters.Triple(i, r, letters.check_response(i, r).judgment) for i, r in pairs]
    data = tmp_path / "base1-n3" / "cut-lr0.0003-s1" / "round1" / "data.jsonl"
    data.parent.mkdir(parents=True)
    round0 = {"rows": [{"U_precision": 0.5, "U_recall": 0.8}]}  # the base's, on the task's flaws
    (data.parent.parent / "round0").mkdir()
    (data.parent.parent / "round0" / "eval_test.json").write_text(json.dumps(round0))
    records = [dict(instruction=t.instruction, response=t.response, judgment=t.judgment)
               for t in triples]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    rows = [dict(method="sft", lr=1e-4, iters=150), dict(method="cut", lr=3e-4, iters=150)]
    found = crossing.detection(crossing.Config(out_dir=str(tmp_path)), base, rows, "base1-n3")
    assert found["flawed"] == 2 and found["swap"] == 0.5 and found["extra"] == 0.5
    settings = ev.Config(ckpt=str(base), device="cpu")
    expected = ev.token_detection(*ev.load(base, settings), triples[:2], settings)
    assert {k: found[k] for k in expected} == expected
    assert (found["U_precision_task"], found["U_recall_task"]) == (0.5, 0.8)


def test_long_flaws_swap_two_neighbours_in_long_lists_and_compare_end_to_end(tmp_path):
    from scripts import long_flaws
    triples = long_flaws.make_triples(200, 1, "val", 0.5)
    for t in triples:
        given, _, _ = letters._letter_list(t.instruction)
        got, _, _ = letters._letter_list(t.response)
        assert 8 <= len(given) <= 12 and len(set(given)) == len(given)
        assert letters.SPLITS[zlib.crc32("".join(given).encode()) % 10] == "val"
        bad = [k for k, (a, b) in enumerate(zip(got, sorted(given))) if a != b]
        assert (t.judgment is None) == (bad == [])
        assert bad == [] or (len(bad) == 2 and bad[1] == bad[0] + 1)  # one neighbouring swap
    assert 80 < sum(t.judgment is not None for t in triples) < 120
    judged = long_flaws.make_triples(40, 1, "train", 0.5, judged=True)
    assert all(t.judgment is None for t in judged)
    assert any("\n\n### Judgment:\nThe" in t.instruction for t in judged)
    rows = long_flaws.main([f"--out_dir={tmp_path}", "--base_iters=2", "--base_size=40",
                            "--shares=0.5", "--size=16", "--iters=1", "--seeds=2",
                            "--n_eval=4", "--methods=cut,sft", "--lrs=1e-4"])
    assert [(r["method"], r["share"]) for r in rows] == [("cut", 0.5), ("sft", 0.5)]
    for r in rows:
        runs = [tmp_path / f"0.5-{r['method']}-lr{r['lr']:g}-it1-s{s}" for s in (1, 2)]
        accs = [json.loads((run / "long_eval_test.json").read_text())["ok"] for run in runs]
        assert r["test"] == pytest.approx(sum(accs) / 2)
    assert "| 0.5 | `cut` |" in (tmp_path / "long_flaws.md").read_text()


def test_own_flaws_chooses_lambda_on_validation_and_reports_test(monkeypatch, tmp_path, base):
    from scripts import own_flaws
    import eval as ev
    monkeypatch.setattr(own_flaws, "make_base", lambda c, steps, named: base)
    rows = own_flaws.main([f"--out_dir={tmp_path}", "--base_steps=7", "--unnamed_steps=",
                           "--n=24", "--lams=1.1,3"])
    row = rows[0]
    settings = ev.Config(ckpt=str(base), device="cpu")
    loaded = ev.load(base, settings)

    def flawed(split):  # the samples the driver saved, judged again by hand
        samples = json.loads((tmp_path / "base7-named" / f"samples_{split}.json").read_text())
        assert len(samples) == 24
        judged = [(x, y, letters.check_response(x, y).judgment) for x, y in samples]
        return [letters.Triple(x, y, j) for x, y, j in judged if j]
    val = {lam: ev.token_detection(*loaded, flawed("val"), replace(settings, lam=lam)) for lam in (1.1, 3)}
    good = [lam for lam in val if (val[lam]["U_precision"] or 0) >= 0.7]
    if good:  # the highest recall at precision >= 0.7, else the highest precision
        lam = max(good, key=lambda k: val[k]["U_recall"])
    else:
        lam = max(val, key=lambda k: val[k]["U_precision"] or 0)
    assert row["lam"] == lam
    test = ev.token_detection(*loaded, flawed("test"), replace(settings, lam=lam))
    assert {k: row[k] for k in test} == test and row["flawed"] == len(flawed("test"))
    assert sum(row[k] for k in own_flaws.KINDS) == pytest.approx(1)
    assert "| 7 | yes |" in (tmp_path / "own_flaws.md").read_text()
