"""Initialisations that replace a model's random start: identity (Dirac) convolutions and a whitening first layer.

Both are airbench's: an identity init gives every convolution a residual path at the start, and a first layer
whose filters whiten the images' patches (the eigenvectors of their covariance, scaled to unit variance) starts
the network on decorrelated inputs. Neither draws random numbers, so turning one on leaves every other draw as is.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.dataset import to_input

WHITEN_SAMPLES = 5000  # images whose patches estimate the covariance
WHITEN_EPS = 5e-4  # added to the eigenvalues: the flattest directions are not blown up


@torch.no_grad()
def dirac_init(model: nn.Module) -> int:
    """Set each convolution with an odd square kernel to the identity on the channels it keeps (its first
    ``min(in, out)`` outputs copy the same inputs); returns how many it set."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups == 1]
    convs = [m for m in convs if m.kernel_size[0] == m.kernel_size[1] and m.kernel_size[0] % 2 == 1]
    for conv in convs:
        keep = min(conv.in_channels, conv.out_channels)
        nn.init.dirac_(conv.weight[:keep, :keep])
        conv.weight[:keep, keep:] = 0
        if conv.bias is not None:
            conv.bias[:keep] = 0
    return len(convs)


def first_conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


def patch_whitening(patches: torch.Tensor, eps: float = WHITEN_EPS) -> torch.Tensor:
    """Filters (2d, 1, k, k) that whiten ``patches`` (N, k * k): the covariance's eigenvectors, largest first,
    each divided by the square root of its eigenvalue, and their negatives after them (d = k * k)."""
    cov = patches.T @ patches / len(patches)
    values, vectors = torch.linalg.eigh(cov)  # ascending
    k = int(patches.shape[1] ** 0.5)
    filters = (vectors.T.flip(0) / (values.flip(0)[:, None] + eps).sqrt()).reshape(-1, 1, k, k)
    return torch.cat([filters, -filters])


@torch.no_grad()
def whiten_init(model: nn.Module, images: torch.Tensor) -> None:
    """Start ``model``'s first convolution (one input channel, square kernel) as :func:`patch_whitening` of the
    patches of ``images`` (N, H, W) uint8, standardised as the model standardises its input. With fewer output
    channels than whitening filters, the leading ones (largest variance) and their negatives are kept."""
    conv = first_conv(model)
    k = conv.kernel_size[0]
    x = to_input(images[:WHITEN_SAMPLES].cpu())
    x = (x - getattr(model, "mean", 0.0)) / getattr(model, "std", 1.0)
    patches = x.unfold(2, k, 1).unfold(3, k, 1).reshape(-1, k * k).double()  # (N * H' * W', k * k)
    filters = patch_whitening(patches).float()
    d, out = len(filters) // 2, conv.out_channels
    take = min(d, out // 2)
    chosen = torch.cat([filters[:take], filters[d : d + take]]) if out < 2 * d else filters
    conv.weight[: len(chosen)] = chosen.to(conv.weight.dtype)
    if conv.bias is not None:
        conv.bias[: len(chosen)] = 0
