"""cut_loss.py against the paper's formulas (arXiv 2312.14591), written out by hand: math.log and
math.exp, token by token."""
import math

import pytest
import torch

from cut_loss import MIN_1M_P, batch_loss, cut_loss, mle_loss

L = math.log


def t(rows):
    return torch.tensor(rows, dtype=torch.float64, requires_grad=True)


def ref_row_mle(logps):
    return -sum(logps) / len(logps) if logps else 0.0


def ref_cut(lx, lj, neg, n, lam, alpha, gamma):
    """The formulas literally: per triple L1 + L2 (or the acceptable L2), averaged over triples;
    n = tokens per row."""
    total = 0.0
    for b in range(len(lx)):
        x, j, N = lx[b][:n[b]], lj[b][:n[b]], n[b]
        if not neg[b]:
            total += ref_row_mle(x)
            continue
        l1 = 0.0
        for k in range(N):
            p_x, p_n = math.exp(x[k]), math.exp(j[k])
            p_p = p_x  # j+ is the absence of a judgment
            if p_n - lam * p_p > 0:
                l1 += alpha * p_n ** gamma * L(max(1 - p_x, MIN_1M_P))
            else:
                l1 += x[k]
        total += (-l1 / N if N else 0.0) + ref_row_mle(j)
    return total / len(lx)


# Row 0 flawed, U empty (p_n = p_x < lam * p_x). Row 1 flawed, U = {0, 2}: .6 > 1.1*.2,
# .5 < 1.1*.5, .7 > 1.1*.3. Row 2 acceptable, one padded position (logp_j there is garbage).
# Row 3: no response tokens at all.
LX = [[L(.5), L(.4), L(.9)], [L(.2), L(.5), L(.3)], [L(.7), L(.8), -3.0], [-1.0, -2.0, -3.0]]
LJ = [[L(.5), L(.4), L(.9)], [L(.6), L(.5), L(.7)], [9.0, 9.0, 9.0], [-1.0, -2.0, -3.0]]
NEG = [True, True, False, True]
MASK = [[1, 1, 1], [1, 1, 1], [1, 1, 0], [0, 0, 0]]
N_ROW = [3, 3, 2, 0]


def run(lam=1.1, alpha=1.0, gamma=0.0):
    lx, lj = t(LX), t(LJ)
    loss, stats = cut_loss(lx, lj, torch.tensor(NEG), torch.tensor(MASK, dtype=torch.float64),
                           lam, alpha, gamma)
    return loss, stats, lx, lj


def test_hand_values_gamma0():
    loss, stats, _, _ = run()
    # U empty: L1 is MLE on x -> y
    row0 = -(L(.5) + L(.4) + L(.9)) / 3 - (L(.5) + L(.4) + L(.9)) / 3
    row1 = -(L(1 - .2) + L(.5) + L(1 - .3)) / 3 - (L(.6) + L(.5) + L(.7)) / 3
    row2 = -(L(.7) + L(.8)) / 2
    assert loss.item() == pytest.approx((row0 + row1 + row2 + 0.0) / 4, rel=1e-12)
    # 2 of the 6 flawed-response tokens
    assert float(stats['frac_unlikely']) == pytest.approx(2 / 6)
    assert loss.item() == pytest.approx(ref_cut(LX, LJ, NEG, N_ROW, 1.1, 1.0, 0.0), rel=1e-12)


def test_hand_values_gamma2_alpha():
    loss, _, _, _ = run(alpha=0.5, gamma=2.0)
    row0 = -(L(.5) + L(.4) + L(.9)) * 2 / 3
    row1 = (-(0.5 * .6 ** 2 * L(.8) + L(.5) + 0.5 * .7 ** 2 * L(.7)) / 3
            - (L(.6) + L(.5) + L(.7)) / 3)
    row2 = -(L(.7) + L(.8)) / 2
    assert loss.item() == pytest.approx((row0 + row1 + row2) / 4, rel=1e-12)
    assert loss.item() == pytest.approx(ref_cut(LX, LJ, NEG, N_ROW, 1.1, 0.5, 2.0), rel=1e-12)


def test_lambda_large_is_plain_mle():
    loss, stats, _, _ = run(lam=10.0)
    row1 = -(L(.2) + L(.5) + L(.3)) / 3 - (L(.6) + L(.5) + L(.7)) / 3
    row0 = -(L(.5) + L(.4) + L(.9)) * 2 / 3
    assert loss.item() == pytest.approx((row0 + row1 - (L(.7) + L(.8)) / 2) / 4, rel=1e-12)
    assert float(stats['frac_unlikely']) == 0.0


@pytest.mark.parametrize("gamma", [0.0, 2.0])
def test_gradients_treat_U_and_weight_as_constants(gamma):
    alpha, B = 0.5, 4
    loss, _, lx, lj = run(alpha=alpha, gamma=gamma)
    g_x, g_j = torch.autograd.grad(loss, (lx, lj))
    # d/dlogp_j: -1/(B N) on every masked token of a flawed row (the weight p_n^gamma adds
    # nothing); 0 elsewhere.
    want_j = [[-1 / (B * 3)] * 3, [-1 / (B * 3)] * 3, [0.0] * 3, [0.0] * 3]
    # d/dlogp_x: -1/(B N) outside U; in U, d[-w log(1 - e^l)/(B N)]/dl = w p / ((1 - p) B N) with
    # w constant.
    w = [alpha * .6 ** gamma, alpha * .7 ** gamma]
    want_x = [[-1 / (B * 3)] * 3,
              [w[0] * .2 / (.8 * B * 3), -1 / (B * 3), w[1] * .3 / (.7 * B * 3)],
              [-1 / (B * 2), -1 / (B * 2), 0.0], [0.0] * 3]
    torch.testing.assert_close(g_j, torch.tensor(want_j, dtype=torch.float64), rtol=1e-12,
                               atol=1e-15)
    torch.testing.assert_close(g_x, torch.tensor(want_x, dtype=torch.float64), rtol=1e-12,
                               atol=1e-15)


def test_px_to_one_stays_finite():
    # at lam = 1, p_n = 1 puts a token with p_x = 1 - 1e-12 in U: log(1 - p_x) meets its floor
    lx, lj = t([[-1e-12, L(.5)]]), t([[0.0, L(.5)]])
    loss, stats = cut_loss(lx, lj, torch.tensor([True]), torch.ones(1, 2, dtype=torch.float64),
                           1.0, 1.0, 0.0)
    assert float(stats['frac_unlikely']) == 0.5
    assert loss.item() == pytest.approx(-(L(MIN_1M_P) + L(.5)) / 2 - (0.0 + L(.5)) / 2, rel=1e-12)
    loss.backward()
    assert torch.isfinite(lx.grad).all() and torch.isfinite(lj.grad).all()


def test_no_flawed_rows_and_no_tokens():
    lx = t([[L(.5), L(.25)], [L(.125), 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    loss, stats = cut_loss(lx, lx, torch.tensor([False, False]), mask)
    assert loss.item() == pytest.approx((-(L(.5) + L(.25)) / 2 - L(.125)) / 2, rel=1e-12)
    assert float(stats['frac_unlikely']) == 0.0
    for neg in ([True, True], [False, True]):
        lx, lj = t([[-1.0, -2.0], [0.0, -5.0]]), t([[0.0, 0.0], [0.0, 0.0]])
        loss, stats = cut_loss(lx, lj, torch.tensor(neg), torch.zeros(2, 2, dtype=torch.float64))
        loss.backward()
        assert loss.item() == 0.0 and float(stats['frac_unlikely']) == 0.0
        assert torch.isfinite(lx.grad).all() and torch.isfinite(lj.grad).all()


def test_random_against_loop():
    g = torch.Generator().manual_seed(0)
    B, N = 6, 5
    lx = torch.log(torch.rand(B, N, generator=g, dtype=torch.float64) * 0.98 + 0.01)
    lj = torch.log(torch.rand(B, N, generator=g, dtype=torch.float64) * 0.98 + 0.01)
    n, neg = [5, 3, 0, 4, 1, 5], [True, False, True, True, False, True]
    mask = (torch.arange(N)[None] < torch.tensor(n)[:, None]).double()
    loss, _ = cut_loss(lx, lj, torch.tensor(neg), mask, 1.2, 0.25, 0.5)
    assert loss.item() == pytest.approx(ref_cut(lx.tolist(), lj.tolist(), neg, n, 1.2, 0.25, 0.5),
                                        rel=1e-12)


def test_mle_loss():
    logp = torch.tensor([[L(.5), L(.2), 7.0], [L(.1), 7.0, 7.0], [7.0, 7.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert mle_loss(logp, mask).item() == pytest.approx((-(L(.5) + L(.2)) / 2 - L(.1) + 0.0) / 3,
                                                        rel=1e-6)
    assert mle_loss(torch.zeros(0, 3), torch.zeros(0, 3)).item() == 0.0


def test_batch_loss_modes():
    g = torch.Generator().manual_seed(2)
    logp = torch.log(torch.rand(5, 4, generator=g, dtype=torch.float64) * 0.98 + 0.01)
    n = [4, 2, 3, 4, 2]
    mask = (torch.arange(4)[None] < torch.tensor(n)[:, None]).double()
    rows = logp.tolist()
    x_rows, j_rows, neg = torch.tensor([0, 1, 2]), torch.tensor([3, 4, 2]), [True, True, False]
    loss, stats = batch_loss('cut', logp, mask, x_rows, j_rows, torch.tensor(neg), 1.1, 1.0, 0.0)
    want = ref_cut([rows[0], rows[1], rows[2]], [rows[3], rows[4], rows[2]], neg, n[:3],
                   1.1, 1.0, 0.0)
    assert loss.item() == pytest.approx(want, rel=1e-12) and 'frac_unlikely' in stats
    # forward: -log p(y|x)/N - log p(j|x,y)/Q per triple, here triples (row 0, row 3) and
    # (row 1, row 4)
    loss, stats = batch_loss('forward', logp, mask, x_rows[:2], j_rows[:2], torch.tensor(neg[:2]),
                             1.1, 1.0, 0.0)
    want = sum(ref_row_mle(rows[x][:n[x]]) + ref_row_mle(rows[j][:n[j]])
               for x, j in [(0, 3), (1, 4)]) / 2
    assert loss.item() == pytest.approx(want, rel=1e-12) and stats['frac_unlikely'] == 0.0
    for mode in ('sft', 'sft_all', 'hindsight'):
        loss, stats = batch_loss(mode, logp, mask, x_rows, j_rows, torch.tensor(neg),
                                 1.1, 1.0, 0.0)
        assert loss.item() == pytest.approx(sum(ref_row_mle(r[:k]) for r, k in zip(rows, n)) / 5,
                                            rel=1e-12)
        assert stats['frac_unlikely'] == 0.0
    with pytest.raises(ValueError, match="'kto'.*cut, sft, sft_all, hindsight, forward, ilf_mle"):
        batch_loss('kto', logp, mask, x_rows, j_rows, torch.tensor(neg), 1.1, 1.0, 0.0)


def test_end_to_end_cut_finds_the_planted_error_token():
    """A tiny model trained with CUT on a handful of triples: the loss falls, and once the model
    reads judgments the planted wrong token of a flawed response is in U while the tokens the
    judgment does not explain are not."""
    from data import collate, encode_triples
    from support.tokenizer import Tokenizer
    from support.triple_files import Triple
    from model import ModelConfig, Transformer

    torch.manual_seed(0)
    tok = Tokenizer.byte_level()
    words = ["apple", "grape", "lemon", "mango", "peach", "melon", "olive", "guava"]
    triples = [Triple(f"Spell the fruit {w}.", w, None) for w in words]
    triples += [Triple(f"Spell the fruit {w}.", w[:2] + "z" + w[3:], "The third letter is wrong.")
                for w in words]
    batch = collate(encode_triples(tok, triples, "cut", 64, chat=True, verbose=False), tok.eos_id)
    model = Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, hidden_dim=192,
                                    vocab_size=tok.n_vocab))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        logp = model(batch.idx, batch.positions, batch.targets)
        # lam 2: on near-deterministic toy data lam 1.1 lets U take uncertain tokens too
        # (evidence-notes.md, 2)
        loss, stats = batch_loss('cut', logp, batch.mask, batch.x_rows, batch.j_rows, batch.is_neg,
                                 2.0, 1.0, 0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    U = stats['U'][batch.is_neg]  # flawed rows: tokens of "apz..." and the EOS
    assert U[:, 2].all()  # the planted 'z', explained by the judgment, in every flawed response
    # the tokens the judgment does not explain stay out
    assert not U[:, :2].any() and not U[:, 3:].any()
