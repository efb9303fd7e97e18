"""model.sample_next against distributions worked out by hand: temperature, top-k and nucleus
sampling on small vectors, each drawn often enough that a wrong distribution cannot pass."""
import math

import pytest
import torch

from model import sample_next

DRAWS = 200_000
TOLERANCE = 0.01  # a frequency's standard error is at most 0.0011: 9 of them


def frequencies(probs, temperature, top_k=None, top_p=None):
    """How often sample_next draws each token from logits log(probs), in DRAWS rows at once."""
    torch.manual_seed(0)
    logits = torch.tensor(probs).log().expand(DRAWS, len(probs))
    ids = sample_next(logits, temperature, top_k, top_p)
    return (torch.bincount(ids, minlength=len(probs)) / DRAWS).tolist()


@pytest.mark.parametrize("probs, temperature, top_k, top_p, expected", [
    # softmax(log p / T) is p^(1/T), normalized
    ([0.5, 0.3, 0.2], 1.0, None, None, [0.5, 0.3, 0.2]),
    ([0.5, 0.3, 0.2], 0.5, None, None, [25 / 38, 9 / 38, 4 / 38]),
    ([0.5, 0.3, 0.2], 2.0, None, None,
     [p ** 0.5 / (0.5 ** 0.5 + 0.3 ** 0.5 + 0.2 ** 0.5) for p in (0.5, 0.3, 0.2)]),
    # top-k keeps the k likeliest, renormalized
    ([0.4, 0.3, 0.2, 0.1], 1.0, 2, None, [4 / 7, 3 / 7, 0, 0]),
    ([0.4, 0.3, 0.2, 0.1], 1.0, 3, None, [4 / 9, 3 / 9, 2 / 9, 0]),
    # the nucleus is the least prefix with mass >= top_p: token 1 crosses 0.6, so it stays
    ([0.5, 0.3, 0.2], 1.0, None, 0.6, [5 / 8, 3 / 8, 0]),
    ([0.5, 0.3, 0.2], 1.0, None, 0.4, [1, 0, 0]),
    ([0.5, 0.3, 0.2], 1.0, None, 0.9, [0.5, 0.3, 0.2]),
    ([0.2, 0.5, 0.3], 1.0, None, 0.6, [0, 5 / 8, 3 / 8]),  # by probability, not by id
    # temperature first: at T = 0.5 token 0 alone holds 25/38 > 0.6
    ([0.5, 0.3, 0.2], 0.5, None, 0.6, [1, 0, 0]),
    # top-k first, then the nucleus of what it kept: 4/7 >= 0.5 (of all four, 0.4 would not be)
    ([0.4, 0.3, 0.2, 0.1], 1.0, 2, 0.5, [1, 0, 0, 0]),
])
def test_draws_follow_the_distribution_by_hand(probs, temperature, top_k, top_p, expected):
    seen = frequencies(probs, temperature, top_k, top_p)
    assert seen == pytest.approx(expected, abs=TOLERANCE)
    assert [s == 0 for s in seen] == [e == 0 for e in expected]  # a dropped token is never drawn


def test_temperature_zero_is_greedy_and_rows_are_independent():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9], [-5.0, -4.0, -4.5]])
    assert sample_next(logits, 0, None, None).tolist() == [1, 0, 1]
    torch.manual_seed(0)
    rows = torch.stack([torch.tensor([0.0, -math.inf, -math.inf]),
                        torch.tensor([-math.inf, -math.inf, 0.0])]).repeat(1000, 1)
    assert sample_next(rows, 1.0, None, None).tolist() == [0, 2] * 1000
