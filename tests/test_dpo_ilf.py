"""DPO and ILF against hand-computed values and independent formulas: the loss, the pairs and
refinements the triple builder makes of them, the LoRA reference (adapters off == the base loaded
alone), and train.py's dpo, ilf_mle and ilf_dpo runs, alone, resumed and under torchrun."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import eval as ev
import train
from scripts import refine
from cut_loss import batch_loss, dpo_loss, mle_loss
from data import encode_triples, prompt_ids
from model import ModelConfig, Transformer, add_lora, lora_disabled
from support.tokenizer import Tokenizer
from support.triple_files import Triple, load_triples

ROOT = Path(__file__).resolve().parents[1]
TOK = Tokenizer.byte_level()
TINY = ["--task_size=200", "--dim=32", "--n_layers=1", "--n_heads=2", "--max_len=160",
        "--batch_size=4", "--eval_interval=1000", "--log_interval=1", "--val_frac=0.1",
        "--device=cpu", "--dtype=float32", "--warmup_iters=1"]


def test_dpo_loss_by_hand_and_against_the_paper_formula():
    # margin = 0.5 * ((-3 - -4) - (-5 - -4)) = 1: loss = log(1 + e^-1)
    loss, stats = dpo_loss(torch.tensor([-3.0]), torch.tensor([-5.0]), torch.tensor([-4.0]),
                           torch.tensor([-4.0]), beta=0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)
    assert stats["reward_accuracy"].item() == 1.0
    g = torch.Generator().manual_seed(0)
    w, l, rw, rl = (torch.randn(6, generator=g, dtype=torch.float64) * 5 for _ in range(4))
    w.requires_grad_(True)
    beta = 0.2
    loss, _ = dpo_loss(w, l, rw, rl, beta)
    # the paper's Eq. 7 written as the policy's and the reference's log-ratio of y_w to y_l
    want = -torch.log(torch.sigmoid(beta * ((w - l) - (rw - rl)))).mean()
    torch.testing.assert_close(loss, want)
    loss.backward()
    # d/dw of -log sigmoid(m) / B is -beta * sigmoid(-m) / B
    margin = beta * ((w - l) - (rw - rl))
    torch.testing.assert_close(w.grad, -beta * torch.sigmoid(-margin.detach()) / 6)


def test_batch_loss_dpo_sums_each_response_and_ilf_mle_is_mle():
    g = torch.Generator().manual_seed(1)
    logp = -torch.rand(4, 5, generator=g, dtype=torch.float64) * 3
    ref = -torch.rand(4, 5, generator=g, dtype=torch.float64) * 3
    lengths = [5, 2, 3, 4]
    mask = (torch.arange(5)[None] < torch.tensor(lengths)[:, None]).double()
    x_rows, j_rows = torch.tensor([0, 2]), torch.tensor([1, 3])
    neg = torch.tensor([False, False])
    loss, _ = batch_loss("dpo", logp, mask, x_rows, j_rows, neg, 2.0, 1.0, 0.0, ref, beta=0.3)
    total = [sum(row[:n].tolist()) for row, n in zip(logp, lengths)]
    total_ref = [sum(row[:n].tolist()) for row, n in zip(ref, lengths)]
    want = 0.0
    for w, l in ((0, 1), (2, 3)):
        m = 0.3 * ((total[w] - total_ref[w]) - (total[l] - total_ref[l]))
        want += math.log(1 + math.exp(-m)) / 2
    assert loss.item() == pytest.approx(want, rel=1e-10)
    ilf_dpo, _ = batch_loss("ilf_dpo", logp, mask, x_rows, j_rows, neg, 2.0, 1.0, 0.0, ref, 0.3)
    assert ilf_dpo.item() == loss.item()
    ilf_mle, _ = batch_loss("ilf_mle", logp, mask, x_rows, j_rows, neg, 2.0, 1.0, 0.0)
    assert ilf_mle.item() == mle_loss(logp, mask).item()


def test_rows_of_refinements_and_pairs():
    flawed = Triple("Sort: b, a", "b, a", "Wrong order.", "a, b")
    no_refinement = Triple("Sort: c, a", "c, a", "Wrong order.")
    acceptable = Triple("Sort: d, a", "a, d", None)
    x = prompt_ids(TOK, "Sort: b, a")
    eos = [TOK.eos_id]
    (mle,) = encode_triples(TOK, [flawed, no_refinement], "ilf_mle", 160, verbose=False)
    assert mle.rows == [(x, TOK.encode("a, b") + eos)]
    enc = encode_triples(TOK, [flawed, no_refinement, acceptable], "ilf_dpo", 160, verbose=False)
    assert len(enc) == 1 and enc[0].rows == [(x, TOK.encode("a, b") + eos), (x, TOK.encode("b, a") + eos)]
    assert len(encode_triples(TOK, [acceptable], "ilf_mle", 160, verbose=False)) == 1
    pair = Triple("Sort: b, a", "b, a", None, "a, b")  # a preference pair, as load_triples reads it
    assert encode_triples(TOK, [pair], "dpo", 160, verbose=False)[0].rows == enc[0].rows
    with pytest.raises(ValueError, match="a preference pair .* trains with --loss=dpo only"):
        encode_triples(TOK, [pair], "cut", 160, verbose=False)
    assert refine.refine_prompt(flawed) == ("Sort: b, a\n\n### Response to improve:\nb, a\n\n### Judgment:\n"
                                     "Wrong order.")


def test_pair_and_refinement_files(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "p", "chosen": "good", "rejected": "bad"}) + "\n")
    assert load_triples(pairs, verbose=False) == [Triple("p", "bad", None, "good")]
    refined = tmp_path / "refined.json"
    refined.write_text(json.dumps([{"instruction": "i", "response": "r", "judgment": "j",
                                    "refinement": "better"}]))
    assert load_triples(refined, verbose=False) == [Triple("i", "r", "j", "better")]
    for record, message in [({"prompt": "p", "chosen": "c"}, "record 0: missing field 'rejected'"),
                            ({"prompt": "p", "chosen": 3, "rejected": "r"},
                             "record 0: field 'chosen' must be a string, got int"),
                            ({"instruction": "i", "response": "r", "judgment": "j", "refinement": 1},
                             "record 0: field 'refinement' must be a string or null, got int")]:
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps([record]))
        with pytest.raises(ValueError, match=f"^{bad}: {message}$"):
            load_triples(bad)


def test_lora_reference_is_the_base_loaded_alone(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, hidden_dim=64,
                      qkv_bias=True)
    Transformer(cfg).save_pretrained(tmp_path)
    model = add_lora(Transformer.from_pretrained(tmp_path), 4, 8.0, ("q_proj", "v_proj", "up_proj"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    x = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(1))
    base = Transformer.from_pretrained(tmp_path)(x)
    assert not torch.allclose(model(x), base, atol=1e-3)
    with lora_disabled(model):
        torch.testing.assert_close(model(x), base, rtol=0, atol=1e-6)
    assert not torch.allclose(model(x), base, atol=1e-3)  # the adapters are back


@pytest.fixture(scope="module")
def base_and_pairs(tmp_path_factory):
    """The built-in base, briefly trained, and preference pairs it can learn from: a correct and a
    swapped answer to the same letters."""
    root = tmp_path_factory.mktemp("dpo")
    train.main([*TINY, "--data=builtin", f"--out_dir={root / 'run'}", "--base_iters=30",
                "--max_iters=1"])
    triples = [t for t in ev.letters.make_task(120, seed=3, kind="mixed", flawed_frac=1.0)]
    pairs = root / "pairs.jsonl"
    with pairs.open("w") as f:
        for t in triples:
            letters = ev.letters._letter_list(t.instruction)[0]
            f.write(json.dumps({"prompt": t.instruction, "chosen": ", ".join(sorted(letters)),
                                "rejected": t.response}) + "\n")
    refined = root / "refined.jsonl"
    with refined.open("w") as f:
        for t in triples:
            letters = ev.letters._letter_list(t.instruction)[0]
            f.write(json.dumps({"instruction": t.instruction, "response": t.response,
                                "judgment": t.judgment,
                                "refinement": ", ".join(sorted(letters))}) + "\n")
    return root / "run" / "base", pairs, refined


@pytest.mark.parametrize("loss, data", [("dpo", "pairs"), ("ilf_dpo", "refined"),
                                        ("ilf_mle", "refined")])
def test_train_dpo_and_ilf_learn_and_resume(tmp_path, base_and_pairs, loss, data):
    base, pairs, refined = base_and_pairs
    file = pairs if data == "pairs" else refined
    args = [*TINY, f"--init_from={base}", f"--data={file}", f"--loss={loss}", "--learning_rate=1e-3"]
    straight = train.main([*args, f"--out_dir={tmp_path / 'a'}", "--max_iters=6"])
    train.main([*args, f"--out_dir={tmp_path / 'b'}", "--max_iters=3"])
    resumed = train.main([*args, f"--out_dir={tmp_path / 'b'}", "--max_iters=6", "--resume=True"])
    assert resumed["loss"] == pytest.approx(straight["loss"], rel=1e-5)
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    if loss != "ilf_mle":  # DPO starts at log 2: the policy is its reference
        assert log[0]["loss"] == pytest.approx(math.log(2), rel=1e-5)
    assert log[-1]["loss"] < log[0]["loss"]


def test_dpo_needs_a_reference_and_no_fsdp(tmp_path, base_and_pairs):
    _, pairs, _ = base_and_pairs
    with pytest.raises(ValueError, match="loss=dpo needs an init_from, the reference model"):
        train.main([*TINY, f"--data={pairs}", "--loss=dpo", f"--out_dir={tmp_path}"])
    with pytest.raises(ValueError, match="preference pair .* trains with --loss=dpo only"):
        train.main([*TINY, f"--data={pairs}", "--loss=cut", f"--out_dir={tmp_path}",
                    f"--init_from={base_and_pairs[0]}"])


# ilf_dpo: dpo's loss and reference on ilf_mle's data, both checked here
@pytest.mark.parametrize("loss, data, lora", [("dpo", "pairs", True), ("ilf_mle", "refined", False)])
def test_under_torchrun_equals_one_process(tmp_path, base_and_pairs, loss, data, lora):
    base, pairs, refined = base_and_pairs
    file = pairs if data == "pairs" else refined
    args = [*TINY, f"--init_from={base}", f"--data={file}", f"--loss={loss}", "--max_iters=3",
            "--gradient_accumulation_steps=2", *(["--lora_rank=4", "--lora_alpha=8.0"] if lora else [])]
    env = dict(train.os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", "train.py", *args, f"--out_dir={tmp_path / 'ddp'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = train.main([*args, f"--out_dir={tmp_path / 'one'}"])
    ddp = json.loads((tmp_path / "ddp" / "log.jsonl").read_text().splitlines()[-1])
    assert ddp["loss"] == pytest.approx(one["loss"], rel=1e-4, abs=1e-5)


def test_refine_writes_a_triples_file_with_refinements(tmp_path, base_and_pairs):
    base, _, refined = base_and_pairs
    out = tmp_path / "r.json"
    refine.main([f"--ckpt={base}", f"--data={refined}", f"--out_file={out}", "--max_new_tokens=12",
                 "--device=cpu"])
    with pytest.raises(ValueError, match="is the input file"):
        refine.main([f"--ckpt={base}", f"--data={refined}", f"--out_file={refined}"])
    back = load_triples(out, verbose=False)
    before = load_triples(refined, verbose=False)
    assert [(t.instruction, t.response, t.judgment) for t in back] == \
        [(t.instruction, t.response, t.judgment) for t in before]
    model, tok, chat = ev.load(base, ev.Config(device="cpu"))
    c = ev.Config(device="cpu", batch_size=32)
    want = ev.generate_responses(model, tok, chat, [refine.refine_prompt(t) for t in before], c, 0, 12)
    assert [t.refinement for t in back] == want  # the base's greedy refinements
