"""train.lr_at against learning rates worked out by hand, and train.micro_batches by its properties:
each epoch visits every triple once, iterations differ, epochs reshuffle, the processes split an
iteration's micro-steps, and an iteration depends on (seed, it) alone, so a resume repeats it."""
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

import train
from data import Encoded


def schedule(**overrides):
    settings = dict(learning_rate=1e-3, min_lr=1e-4, warmup_iters=4, max_iters=16, decay_lr=True)
    return SimpleNamespace(**{**settings, **overrides})


@pytest.mark.parametrize("it, lr", [
    (0, 2e-4), (1, 4e-4), (2, 6e-4), (3, 8e-4),  # warmup: lr * (it + 1) / (warmup + 1)
    # the cosine over 12 iterations: min_lr + (1 + cos(pi * k / 12)) / 2 * (lr - min_lr)
    (4, 1e-3), (8, 7.75e-4), (10, 5.5e-4), (12, 3.25e-4), (16, 1e-4), (30, 1e-4)])
def test_warmup_then_cosine_by_hand(it, lr):
    assert train.lr_at(it, schedule()) == pytest.approx(lr, rel=1e-12)


def test_constant_after_warmup_without_decay():
    lrs = [train.lr_at(it, schedule(decay_lr=False)) for it in range(20)]
    assert lrs == pytest.approx([2e-4, 4e-4, 6e-4, 8e-4] + [1e-3] * 16, rel=1e-12)


def triples(n):
    """n distinct triples of varied lengths; triple i's prompt is [i], so a batch names its own."""
    return [Encoded([([i], [7] * (1 + i * 5 % 11))], is_neg=i % 2 == 1) for i in range(n)]


def names(micro_batch):
    return [e.rows[0][0][0] for e in micro_batch]


def iteration(encoded, it, cfg, world=1):
    """The triples of iteration it, over all the processes, in the order they are returned."""
    steps = [m for rank in range(world) for m in train.micro_batches(encoded, it, cfg, rank, world)]
    return [i for m in steps for i in names(m)]


def loader(seed=5):
    return SimpleNamespace(batch_size=3, gradient_accumulation_steps=4, seed=seed)


def test_each_epoch_visits_every_triple_once_and_epochs_reshuffle():
    encoded = triples(24)  # 2 iterations of 12 per epoch
    epochs = [iteration(encoded, 2 * e, loader()) + iteration(encoded, 2 * e + 1, loader())
              for e in range(3)]
    assert all(sorted(epoch) == list(range(24)) for epoch in epochs)
    firsts = [set(iteration(encoded, it, loader())) for it in (0, 2, 4)]
    assert firsts[0] != firsts[1] and firsts[1] != firsts[2]


def test_an_epoch_that_ends_inside_an_iteration_goes_on_with_the_next():
    encoded = triples(18)  # 3 iterations of 12 are 2 epochs
    counts = Counter(i for it in range(3) for i in iteration(encoded, it, loader()))
    assert counts == Counter({i: 2 for i in range(18)})


def test_iterations_differ_and_depend_on_seed_and_iteration_alone():
    encoded = triples(60)
    batches = [iteration(encoded, it, loader()) for it in range(5)]
    assert len({frozenset(b) for b in batches}) == 5
    torch.manual_seed(123)  # the global RNG, which a resume restores, plays no part
    assert iteration(encoded, 3, loader()) == batches[3]
    assert set(iteration(encoded, 3, loader(seed=6))) != set(batches[3])


@pytest.mark.parametrize("world", [1, 2, 4])
def test_the_processes_split_an_iterations_micro_steps(world):
    encoded = triples(30)
    cfg = loader()
    for it in range(4):
        alone = iteration(encoded, it, cfg)
        per_rank = [train.micro_batches(encoded, it, cfg, rank, world) for rank in range(world)]
        assert all(len(steps) == cfg.gradient_accumulation_steps // world for steps in per_rank)
        # the same micro-steps as one process: balanced by tokens, batch_size triples on average
        assert sorted(map(names, sum(per_rank, []))) == sorted(map(names, train.micro_batches(
            encoded, it, cfg, 0, 1)))
        assert sorted(iteration(encoded, it, cfg, world)) == sorted(alone)
        assert len(alone) == cfg.batch_size * cfg.gradient_accumulation_steps

