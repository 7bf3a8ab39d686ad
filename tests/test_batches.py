import pytest
import torch

from pipeline.batches import (
    CUTOUT,
    FLIP,
    ORDER,
    SHIFT,
    augment,
    batch_cutout,
    batch_flip_lr,
    batch_translate,
    epoch_rng,
    local_batch,
    rank_batches,
    steps_per_epoch,
    to_input,
)
from pipeline.errors import DataError


def test_rank_shards_are_disjoint_and_rebuild_the_single_process_batch():
    n, batch = 103, 12
    single = [idx for idx, *_ in rank_batches(n, batch, seed=5, epoch=2, rank=0, world=1)]
    assert len(single) == steps_per_epoch(n, batch) == 8
    for world in (2, 3, 4):
        shards = [list(rank_batches(n, batch, 5, 2, rank, world)) for rank in range(world)]
        for step, full in enumerate(single):
            parts = [shards[r][step][0] for r in range(world)]
            assert torch.equal(torch.cat(parts), full)
    seen = torch.cat(single)
    assert len(set(seen.tolist())) == len(seen) == 96  # each sample at most once; ragged tail dropped


def test_flip_decisions_do_not_depend_on_process_count():
    single = torch.cat([f for _, f, *_ in rank_batches(64, 16, 1, 0, 0, 1)])
    pairs = [list(rank_batches(64, 16, 1, 0, r, 2)) for r in range(2)]
    split = torch.cat([torch.cat([pairs[0][s][1], pairs[1][s][1]]) for s in range(4)])
    assert torch.equal(single, split)


def test_same_seed_same_order_and_new_epoch_new_order():
    a = [i for i, *_ in rank_batches(50, 10, 7, 0, 0, 1)]
    b = [i for i, *_ in rank_batches(50, 10, 7, 0, 0, 1)]
    c = [i for i, *_ in rank_batches(50, 10, 7, 1, 0, 1)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


def test_each_training_sample_comes_exactly_once_per_epoch_across_ranks():
    n, batch, world = 96, 12, 3  # n divisible by the batch: nothing dropped
    for epoch in (0, 1):
        got = torch.cat([idx for r in range(world) for idx, *_ in rank_batches(n, batch, 3, epoch, r, world)])
        assert sorted(got.tolist()) == list(range(n))


def test_shifts_are_seeded_bounded_and_independent_of_process_count():
    single = torch.cat([s for _, _, s, _ in rank_batches(60, 12, 4, 1, 0, 1, max_shift=2)])
    again = torch.cat([s for _, _, s, _ in rank_batches(60, 12, 4, 1, 0, 1, max_shift=2)])
    pairs = [list(rank_batches(60, 12, 4, 1, r, 2, max_shift=2)) for r in range(2)]
    split = torch.cat([torch.cat([pairs[0][k][2], pairs[1][k][2]]) for k in range(5)])
    assert torch.equal(single, again) and torch.equal(single, split)
    assert single.shape == (60, 2) and single.abs().max() == 2 and len(single.unique(dim=0)) > 10
    centers = torch.cat([c for *_, c in rank_batches(60, 12, 4, 1, 0, 1, cutout=6)])
    assert centers.shape == (60, 2) and 0 <= centers.min() and centers.max() < 28 and len(centers.unique(dim=0)) > 30
    flips_off = torch.cat([f for _, f, *_ in rank_batches(60, 12, 4, 1, 0, 1)])
    flips_on = torch.cat([f for _, f, *_ in rank_batches(60, 12, 4, 1, 0, 1, max_shift=2, cutout=6)])
    assert torch.equal(flips_off, flips_on)  # turning translation or cutout on keeps the flips


def test_batch_not_divisible_by_world_is_refused():
    with pytest.raises(DataError, match=r"batch_size \(10\) must be divisible by the number of processes \(3\)"):
        next(rank_batches(50, 10, 0, 0, 0, 3))


def test_local_batch_is_the_global_batch_split_evenly():
    assert local_batch(128, 4) == 32
    with pytest.raises(DataError, match=r"train.batch_size \(10\) must be divisible by the number of processes \(4\)"):
        local_batch(10, 4)


def test_batch_flip_lr_flips_only_masked_images():
    x = torch.arange(2 * 2 * 3, dtype=torch.uint8).reshape(2, 2, 3)
    out = batch_flip_lr(x, torch.tensor([True, False]))
    assert torch.equal(out[0], x[0].flip(-1)) and torch.equal(out[1], x[1])


def test_batch_translate_moves_content_and_fills_with_zeros():
    x = torch.arange(1, 17, dtype=torch.uint8).reshape(1, 4, 4)
    down_right = batch_translate(x, torch.tensor([[1, 2]]), max_shift=2)
    assert torch.equal(down_right[0, 1:, 2:], x[0, :3, :2])
    assert down_right[0, 0].sum() == 0 and down_right[0, :, :2].sum() == 0
    up = batch_translate(x, torch.tensor([[-1, 0]]), max_shift=1)
    assert torch.equal(up[0, :3], x[0, 1:]) and up[0, 3].sum() == 0
    assert torch.equal(batch_translate(x, torch.tensor([[0, 0]]), max_shift=3), x)
    assert batch_translate(x, torch.tensor([[2, 2]]), max_shift=0) is x  # off: untouched


def test_augment_keeps_shapes_dtype_and_each_image_in_its_own_slot():
    # image k holds the value k + 1 everywhere, so any pixel moved between images would show
    b = 16
    images = (torch.arange(1, b + 1, dtype=torch.uint8)[:, None, None]).expand(b, 28, 28).contiguous()
    labels = torch.arange(b) % 10
    flip = torch.rand(b, generator=torch.Generator().manual_seed(0)) < 0.5
    shift = torch.randint(-3, 4, (b, 2), generator=torch.Generator().manual_seed(1))
    no_cut = torch.zeros(b, 2, dtype=torch.long)
    out = augment(images, flip, shift, no_cut, hflip=True, max_shift=3, cutout=0)
    assert out.shape == images.shape and out.dtype == torch.uint8
    for k in range(b):
        values = set(out[k].unique().tolist()) - {0}
        assert values == {k + 1}, f"image {k} (label {int(labels[k])}) got pixels of {values}"
        visible = (28 - abs(int(shift[k, 0]))) * (28 - abs(int(shift[k, 1])))
        assert int((out[k] > 0).sum()) == visible
    centers = torch.randint(0, 28, (b, 2), generator=torch.Generator().manual_seed(2))
    cut = augment(images, flip, shift, centers, hflip=True, max_shift=3, cutout=6)
    assert cut.shape == images.shape and all(set(cut[k].unique().tolist()) - {0} <= {k + 1} for k in range(b))
    assert (cut > 0).sum() < (out > 0).sum()  # squares erased, never other images' pixels


def test_batch_cutout_zeroes_a_square_that_may_leave_the_image():
    x = torch.full((2, 6, 6), 9, dtype=torch.uint8)
    out = batch_cutout(x, torch.tensor([[0, 0], [3, 3]]), size=2)
    assert out[0, 0, 0] == 0 and int((out[0] == 0).sum()) == 1  # centre in the corner: a quarter shows
    assert torch.equal((out[1] == 0).nonzero(), torch.tensor([[2, 2], [2, 3], [3, 2], [3, 3]]))
    assert batch_cutout(x, torch.tensor([[3, 3], [3, 3]]), size=0) is x


def test_to_input_scales_to_unit_range_with_a_channel_axis():
    x = to_input(torch.tensor([[[0, 255]]], dtype=torch.uint8))
    assert x.shape == (1, 1, 1, 2) and x.dtype == torch.float32
    assert x.flatten().tolist() == [0.0, 1.0]


def test_rank_batches_move_the_epochs_draws_to_the_requested_device_once():
    batches = list(rank_batches(40, 10, 1, 0, 0, 1, max_shift=2, cutout=4, device="meta"))
    assert len(batches) == 4 and all(t.device.type == "meta" for b in batches for t in b)
    cpu = list(rank_batches(40, 10, 1, 0, 0, 1, max_shift=2, cutout=4))
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
