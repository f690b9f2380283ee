"""Real data and small models for the demo, recipes and benchmarks: scikit-learn's digits.

The 1,797 8x8 handwritten digits ship inside scikit-learn, so nothing is
downloaded. Splits and training are seeded and deterministic on one machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DigitsCNN", "DigitsMLP", "Split", "accuracy", "load_digits_split", "train"]


@dataclass
class Split:
    """Train / validation / test tensors: images ``(n, 1, 8, 8)`` in [0, 1] and labels."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor

    def batches(self, size: int = 128) -> list[tuple[Tensor, Tensor]]:
        """The training set as ``(images, labels)`` batches, in order."""
        return list(zip(self.x_train.split(size), self.y_train.split(size), strict=True))


def load_digits_split(seed: int = 0, val: int = 240, test: int = 360) -> Split:
    """scikit-learn's digits, shuffled with ``seed`` and split into train/val/test."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the digits data needs scikit-learn: pip install scikit-learn") from err
    data = load_digits()
    x = torch.from_numpy(data.images).float().unsqueeze(1) / 16.0
    y = torch.from_numpy(data.target).long()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    n_train = len(x) - val - test
    return Split(
        x[:n_train],
        y[:n_train],
        x[n_train : n_train + val],
        y[n_train : n_train + val],
        x[n_train + val :],
        y[n_train + val :],
    )


class DigitsMLP(nn.Module):
    """64 -> 256 -> 256 -> 10 with ReLU."""

    def __init__(self, hidden: int = 256):
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.flatten(x, 1)
        return self.out(F.relu(self.fc2(F.relu(self.fc1(x)))))


class DigitsCNN(nn.Module):
    """Convolutions 32 -> 64 -> 128 (3x3, ReLU, max-pooling) and two linear layers."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1)
        self.fc1 = nn.Linear(128 * 2 * 2, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


def train(
    model: nn.Module, split: Split, epochs: int = 30, lr: float = 2e-3, seed: int = 0
) -> nn.Module:
    """Train with Adam and cross-entropy on the training split; returns the model in eval mode."""
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(split.x_train), generator=generator)
        for idx in order.split(64):
            optimizer.zero_grad()
            F.cross_entropy(model(split.x_train[idx]), split.y_train[idx]).backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Fraction of ``x`` that ``model`` (in eval mode) classifies as ``y``."""
    flag = model.training
    model.eval()
    try:
        return float((model(x).argmax(1) == y).float().mean())
    finally:
        model.train(flag)
