"""Identity and whitening initialisations of the convolutions."""

import torch
from torch import nn

from pipeline.dataset import to_input
from pipeline.model import ModelConfig, build_model
from pipeline.recipe.init import dirac_init, first_conv, patch_whitening, whiten_init


def test_dirac_init_makes_each_convolution_pass_its_kept_channels_through():
    model = build_model(ModelConfig(name="bn_cnn"))
    assert dirac_init(model) > 0
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d) and m.in_channels == m.out_channels)
    x = torch.randn(2, conv.in_channels, 9, 9)
    y = nn.functional.conv2d(x, conv.weight, padding=conv.padding)
    assert torch.allclose(y, x, atol=1e-6)


def test_patch_whitening_decorrelates_the_patches_it_was_computed_on():
    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(9, 9, generator=gen, dtype=torch.float64)
    patches = torch.randn(20_000, 9, generator=gen, dtype=torch.float64) @ mix  # correlated
    filters = patch_whitening(patches, eps=0.0)
    assert filters.shape == (18, 1, 3, 3)
    out = patches @ filters[:9].reshape(9, 9).T
    assert torch.allclose(out.T @ out / len(out), torch.eye(9, dtype=torch.float64), atol=1e-6)
    assert torch.equal(filters[9:], -filters[:9])


def test_whiten_init_sets_the_first_convolution_from_the_images_and_keeps_the_largest_directions():
    images = torch.randint(0, 256, (200, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    model = build_model(ModelConfig())  # its first convolution: 16 filters of 3x3, fewer than the 18 of a whitening
    before = first_conv(model).weight.detach().clone()
    whiten_init(model, images)
    conv = first_conv(model)
    assert not torch.equal(conv.weight, before)
    x = (to_input(images) - model.mean) / model.std
    responses = nn.functional.conv2d(x.double(), conv.weight.double()).transpose(0, 1).reshape(16, -1)
    second_moments = (responses**2).mean(dim=1)  # the whitening is of the uncentred patches, as airbench does
    assert torch.allclose(second_moments, torch.ones(16, dtype=torch.float64), rtol=0.01)  # unit, all 16
    assert torch.equal(conv.weight[8:], -conv.weight[:8])  # the 8 leading directions and their negatives
