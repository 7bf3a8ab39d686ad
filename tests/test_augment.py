"""Training augmentations and test-time augmentation: small pure tensor functions."""

import dataclasses

import torch

from pipeline.dataset import to_input
from pipeline.recipe.augment import augment, batch_cutout, batch_flip_lr, batch_translate
from pipeline.recipe.sampling import Batch
from tests.conftest import default_params


def aug(**changes):
    """The train params of params.yaml with flips on and ``changes`` (translate, cutout) made."""
    return dataclasses.replace(default_params().train, hflip=True, **changes)


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
    out = augment(images, Batch(torch.arange(b), flip, shift, no_cut), aug(translate=3))
    assert out.shape == images.shape and out.dtype == torch.uint8
    for k in range(b):
        values = set(out[k].unique().tolist()) - {0}
        assert values == {k + 1}, f"image {k} (label {int(labels[k])}) got pixels of {values}"
        visible = (28 - abs(int(shift[k, 0]))) * (28 - abs(int(shift[k, 1])))
        assert int((out[k] > 0).sum()) == visible
    centers = torch.randint(0, 28, (b, 2), generator=torch.Generator().manual_seed(2))
    cut = augment(images, Batch(torch.arange(b), flip, shift, centers), aug(translate=3, cutout=6))
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
