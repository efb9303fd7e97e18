"""compare.py's choices, tables and charts on a made-up grid (the selection rule, by hand), and its reuse of runs."""
import xml.etree.ElementTree as ET

import pytest
import torch

from scripts import compare

KEYS = dict(swap=0.1, missing=0.0, other=0.0, new_format=0.0, ok_new_format=0.0, U_precision=0.5, U_recall=0.5,
            frac_unlikely=0.02, gain_wrong=1.0, gain_other=0.0)


def point(step, accuracy, **kw):
    return dict(KEYS, step=step, accuracy=accuracy, **kw)


def made_up():
    grid = [dict(regime="mixed", method="cut", lr=1e-4, lam=2.0, curve=[point(50, 0.5), point(100, 0.9)]),
            dict(regime="mixed", method="cut", lr=1e-3, lam=1.5, curve=[point(50, 0.9), point(100, 0.7)]),
            dict(regime="mixed", method="sft_all", lr=1e-3, lam=None, curve=[point(50, 0.3), point(100, 0.4)]),
            dict(regime="new", method="cut", lr=1e-4, lam=3.0, curve=[point(50, 0.9, ok_new_format=0.2)]),
            dict(regime="new", method="cut", lr=1e-3, lam=2.0, curve=[point(50, 0.1, ok_new_format=0.6)])]
    return grid


def test_choose_takes_the_best_validation_point_then_fewer_steps():
    chosen = compare.choose(made_up())
    # mixed/cut: 0.9 twice, at step 100 (lr 1e-4) and at step 50 (lr 1e-3): the earlier point wins
    assert chosen["mixed", "cut"] == dict(step=50, lr=1e-3, lam=1.5, val=0.9)
    assert chosen["mixed", "sft_all"] == dict(step=100, lr=1e-3, lam=None, val=0.4)
    # 'new' selects on answers both correct and in the new format, not on accuracy alone
    assert chosen["new", "cut"] == dict(step=50, lr=1e-3, lam=2.0, val=0.6)


def test_tables_and_charts(monkeypatch):
    grid = made_up()
    chosen = compare.choose(grid)
    tests = [dict(point(v["step"], 0.5 + s / 10), regime=r, method=m, seed=s, lr=v["lr"], lam=v["lam"])
             for (r, m), v in chosen.items() for s in (1, 2, 3)]
    base = {r: {"val": point(0, 0.3), "test": point(0, 0.3)} for r in ("mixed", "new")}
    result = {"config": {"lams": "1.5,2,3"}, "grid": grid, "tests": tests, "base": base,
              "chosen": [dict(regime=r, method=m, **v) for (r, m), v in chosen.items()]}
    monkeypatch.setattr(compare, "METHODS", {"mixed": ("cut", "sft_all"), "new": ("cut",)})
    md, rows, curves = compare.report(result)
    cut = next(r for r in rows if (r["regime"], r["method"]) == ("mixed", "cut"))
    assert cut["accuracy"] == pytest.approx(0.7) and cut["spread"] == "± 0.082 (0.600–0.800)" and cut["seeds"] == 3
    assert [r["method"] for r in rows] == ["(base)", "cut", "sft_all", "(base)", "cut"]
    assert "| mixed | cut | 0.001 | 1.5 | 50 | 3 | 0.700 |" in md
    for svg in (compare.svg_bars(rows), compare.svg_curves(curves)):
        assert ET.fromstring(svg).tag.endswith("svg")


def test_a_finished_run_is_reused_only_with_its_own_settings(tmp_path, monkeypatch):
    import train
    args = ["--data=builtin", "--task_size=200", "--dim=32", "--n_layers=1", "--n_heads=2", "--max_len=160",
            "--batch_size=4", "--base_iters=0", "--eval_interval=1000", "--device=cpu"]
    train.main([*args, "--max_iters=2", f"--out_dir={tmp_path}"])
    runner = compare.Runner(compare.Config(out_dir=str(tmp_path / "c")))
    monkeypatch.setattr(runner, "sh", lambda *a: pytest.fail("trained again"))
    assert runner.train_to(tmp_path, args, 2) == tmp_path / "step2"  # done: a copy of the model, no training
    with pytest.raises(ValueError, match="lam 2.0 -> 3.0"):
        runner.train_to(tmp_path, [*args, "--lam=3"], 2)


def test_a_new_run_trains_through_the_runner_and_logs_beside_it(tmp_path):
    """train.py writes only into an empty out_dir or a run: the runner's log goes beside the run, not into it."""
    args = ["--data=builtin", "--task_size=200", "--dim=32", "--n_layers=1", "--n_heads=2", "--max_len=160",
            "--batch_size=4", "--base_iters=0", "--eval_interval=1000", "--device=cpu"]
    runner = compare.Runner(compare.Config(out_dir=str(tmp_path)))
    run_dir = tmp_path / "mixed" / "cut-s1"
    assert runner.train_to(run_dir, args, 2) == run_dir / "step2" and runner.train_to(run_dir, args, 3)
    assert torch.load(run_dir / "train_state.pt", weights_only=True)["iter"] == 3
    assert "train.py" in (tmp_path / "mixed" / "cut-s1.commands.log").read_text()
