"""The seed tutorial's training loop, faithfully: the reference the benchmark and the profiler compare against.

torchvision ``FashionMNIST`` with PIL images, ``ToTensor`` + ``Normalize``,
``DataLoader(batch_size=32, shuffle=True, num_workers=2)``, its CNN (flatten fixed), Adam 1e-3.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from pipeline.params import TestTimeAugmentation
from pipeline.recipe.augment import logits_of


def sync() -> None:
    """Wait for the GPU, so that a clock read after it counts the work queued before it."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def accuracy_on(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, tta: TestTimeAugmentation = "none"
) -> float:
    """Accuracy of ``model`` on float inputs ``images`` (N, 1, 28, 28) on its device, as evaluate scores it
    under test-time augmentation ``tta``."""
    model.eval()
    with torch.no_grad():
        correct = sum(
            int((logits_of(model, images[i : i + 1000], tta).argmax(1) == labels[i : i + 1000]).sum())
            for i in range(0, len(labels), 1000)
        )
    model.train()
    return correct / len(labels)


class Net(nn.Module):
    """The seed tutorial's CNN, as it wrote it, with the flatten fixed (its 32 * 5 * 5 crashed on 28x28 input)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3)
        self.conv2 = nn.Conv2d(16, 16, 3)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv3 = nn.Conv2d(16, 32, 5)
        self.conv4 = nn.Conv2d(32, 32, 5)
        self.fc1 = nn.Linear(32 * 2 * 2, 256)
        self.fc2 = nn.Linear(256, 128)
        self.fc3 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv2(F.relu(self.conv1(x)))))
        x = self.pool(F.relu(self.conv4(F.relu(self.conv3(x)))))
        x = x.view(-1, 32 * 2 * 2)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def seed_step(net: nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor, labels: torch.Tensor) -> None:
    """The tutorial's training step: cross-entropy, backward, Adam. (The baseline keeps its own step on purpose.)"""
    optimizer.zero_grad()
    nn.functional.cross_entropy(net(inputs), labels).backward()
    optimizer.step()


@contextlib.contextmanager
def seed_datasets(data: Path) -> Iterator[tuple]:
    """The tutorial's datasets: torchvision ``FashionMNIST`` train and test sets, PIL images through
    ``ToTensor`` + ``Normalize``, read from the verified IDX files in ``data`` (linked, not copied)."""
    from torchvision import datasets, transforms

    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "FashionMNIST" / "raw"  # torchvision's layout
        raw.mkdir(parents=True)
        for f in data.iterdir():
            (raw / f.name).symlink_to(f.resolve())
        tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
        yield (datasets.FashionMNIST(tmp, train=True, download=False, transform=tf),
               datasets.FashionMNIST(tmp, train=False, download=False, transform=tf))  # fmt: skip


def run_tutorial_loop(data: Path, train_samples: int, epochs: int, test_samples: int, time_only: int = 0) -> dict:
    """The tutorial's loop over the first ``train_samples`` images (0 = all) for ``epochs``.

    ``time_only`` > 0: a throughput run that times ``time_only`` samples after a 20-batch warm-up.
    Otherwise the test accuracy is measured after every epoch (not timed).
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with seed_datasets(data) as (trainset, testset):
        n = len(trainset) if not train_samples else min(len(trainset), train_samples)
        if time_only:
            n = min(len(trainset), time_only + 20 * 32)
        loader = DataLoader(Subset(trainset, range(n)), batch_size=32, shuffle=True, num_workers=2)
        test_n = min(len(testset), test_samples) if test_samples else len(testset)
        test_x = torch.stack([testset[i][0] for i in range(test_n)]).to(device)
        test_y = torch.tensor([testset[i][1] for i in range(test_n)], device=device)
        torch.manual_seed(0)
        net = Net().to(device)
        optimizer = torch.optim.Adam(net.parameters(), lr=0.001)
        seen, train_s, curve = 0, 0.0, []
        for _ in range(1 if time_only else epochs):
            sync()
            t0 = time.perf_counter()  # includes starting the DataLoader's workers, as the tutorial does
            for i, (inputs, labels) in enumerate(loader):
                if time_only and i == 20:  # warm-up over: time from here
                    sync()
                    t0, seen = time.perf_counter(), 0
                seed_step(net, optimizer, inputs.to(device), labels.to(device))
                seen += len(labels)
            sync()
            train_s += time.perf_counter() - t0
            if not time_only:
                curve.append({"train_s": round(train_s, 2), "test_accuracy": accuracy_on(net, test_x, test_y)})
    out: dict[str, Any] = {"samples": seen, "train_s": round(train_s, 2), "samples_per_s": round(seen / train_s, 1)}
    if not time_only:
        out["samples_per_s"] = round(epochs * n / train_s, 1)
        out["curve"] = curve
    return out
