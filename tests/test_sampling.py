"""Seeded sampling: epoch streams, global batches and rank shards."""

import pytest
import torch

from pipeline.errors import DataError
from pipeline.recipe.sampling import (
    CUTOUT,
    FLIP,
    ORDER,
    SHIFT,
    epoch_rng,
    local_batch,
    rank_batches,
    steps_per_epoch,
)


def test_rank_shards_are_disjoint_and_rebuild_the_single_process_batch():
    n, batch = 103, 12
    single = [b.indices for b in rank_batches(n, batch_size=batch, seed=5, epoch=2)]
    assert len(single) == steps_per_epoch(n, batch) == 8
    for world in (2, 3, 4):
        shards = [
            list(rank_batches(n, batch_size=batch, seed=5, epoch=2, rank=rank, world=world)) for rank in range(world)
        ]
        for step, full in enumerate(single):
            parts = [shards[r][step].indices for r in range(world)]
            assert torch.equal(torch.cat(parts), full)
    seen = torch.cat(single)
    assert len(set(seen.tolist())) == len(seen) == 96  # each sample at most once; ragged tail dropped


def test_flip_decisions_do_not_depend_on_process_count():
    single = torch.cat([b.flip for b in rank_batches(64, batch_size=16, seed=1, epoch=0, rank=0, world=1)])
    pairs = [list(rank_batches(64, batch_size=16, seed=1, epoch=0, rank=r, world=2)) for r in range(2)]
    split = torch.cat([torch.cat([pairs[0][s].flip, pairs[1][s].flip]) for s in range(4)])
    assert torch.equal(single, split)


def test_same_seed_same_order_and_new_epoch_new_order():
    a = [b.indices for b in rank_batches(50, batch_size=10, seed=7, epoch=0, rank=0, world=1)]
    b = [b.indices for b in rank_batches(50, batch_size=10, seed=7, epoch=0, rank=0, world=1)]
    c = [b.indices for b in rank_batches(50, batch_size=10, seed=7, epoch=1, rank=0, world=1)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


def test_each_training_sample_comes_exactly_once_per_epoch_across_ranks():
    n, batch, world = 96, 12, 3  # n divisible by the batch: nothing dropped
    for epoch in (0, 1):
        got = torch.cat(
            [
                b.indices
                for r in range(world)
                for b in rank_batches(n, batch_size=batch, seed=3, epoch=epoch, rank=r, world=world)
            ]
        )
        assert sorted(got.tolist()) == list(range(n))


def test_shifts_are_seeded_bounded_and_independent_of_process_count():
    single = torch.cat(
        [b.shift for b in rank_batches(60, batch_size=12, seed=4, epoch=1, rank=0, world=1, max_shift=2)]
    )
    again = torch.cat([b.shift for b in rank_batches(60, batch_size=12, seed=4, epoch=1, rank=0, world=1, max_shift=2)])
    pairs = [list(rank_batches(60, batch_size=12, seed=4, epoch=1, rank=r, world=2, max_shift=2)) for r in range(2)]
    split = torch.cat([torch.cat([pairs[0][k].shift, pairs[1][k].shift]) for k in range(5)])
    assert torch.equal(single, again) and torch.equal(single, split)
    assert single.shape == (60, 2) and single.abs().max() == 2 and len(single.unique(dim=0)) > 10
    centers = torch.cat([b.cutout for b in rank_batches(60, batch_size=12, seed=4, epoch=1, rank=0, world=1, cutout=6)])
    assert centers.shape == (60, 2) and 0 <= centers.min() and centers.max() < 28 and len(centers.unique(dim=0)) > 30
    flips_off = torch.cat([b.flip for b in rank_batches(60, batch_size=12, seed=4, epoch=1, rank=0, world=1)])
    flips_on = torch.cat(
        [b.flip for b in rank_batches(60, batch_size=12, seed=4, epoch=1, rank=0, world=1, max_shift=2, cutout=6)]
    )
    assert torch.equal(flips_off, flips_on)  # turning translation or cutout on keeps the flips


def test_batch_not_divisible_by_world_is_refused():
    with pytest.raises(DataError, match=r"batch_size \(10\) must be divisible by the number of processes \(3\)"):
        next(rank_batches(50, batch_size=10, seed=0, epoch=0, rank=0, world=3))


def test_local_batch_is_the_global_batch_split_evenly():
    assert local_batch(128, 4) == 32
    with pytest.raises(DataError, match=r"train.batch_size \(10\) must be divisible by the number of processes \(4\)"):
        local_batch(10, 4)


def test_rank_batches_move_the_epochs_draws_to_the_requested_device_once():
    batches = list(
        rank_batches(40, batch_size=10, seed=1, epoch=0, rank=0, world=1, max_shift=2, cutout=4, device="meta")
    )
    assert len(batches) == 4 and all(t.device.type == "meta" for b in batches for t in b)
    cpu = list(rank_batches(40, batch_size=10, seed=1, epoch=0, rank=0, world=1, max_shift=2, cutout=4))
    assert all(t.device.type == "cpu" for b in cpu for t in b)


def test_no_two_seeds_epochs_or_streams_share_a_random_sequence():
    def draws(seed: int, epoch: int, stream: str) -> tuple[float, ...]:
        return tuple(torch.rand(4, generator=epoch_rng(seed, epoch, stream)).tolist())

    seen = {
        draws(s, e, k) for s in (0, 1, 42, 7919, 7961) for e in (0, 1, 100_003) for k in (ORDER, FLIP, SHIFT, CUTOUT)
    }
    assert len(seen) == 5 * 3 * 4
    assert draws(0, 0, FLIP) != draws(7919, 0, ORDER)  # a linear mix of seed and stream made these equal
    assert draws(3, 5, SHIFT) == draws(3, 5, SHIFT)  # and each is reproducible


def test_alternating_flips_flip_each_image_the_other_way_every_other_epoch_on_any_process_count():
    def flips(epoch: int, world: int) -> torch.Tensor:  # per sample index, over all ranks
        out = torch.zeros(60, dtype=torch.bool)
        for rank in range(world):
            for b in rank_batches(60, batch_size=12, seed=3, epoch=epoch, rank=rank, world=world, alternate_flip=True):
                out[b.indices] = b.flip
        return out

    first, second, third = flips(0, 1), flips(1, 1), flips(2, 1)
    assert 10 < int(first.sum()) < 50  # at random in the first epoch
    assert torch.equal(second, ~first) and torch.equal(third, first)
    assert torch.equal(flips(1, 2), second) and torch.equal(flips(1, 3), second)
    plain = torch.cat([b.flip for b in rank_batches(60, batch_size=12, seed=3, epoch=0)])
    assert not torch.equal(plain, torch.cat([b.flip for b in rank_batches(60, batch_size=12, seed=3, epoch=0,
                                                                            alternate_flip=True)]))  # fmt: skip
