"""A small LeNet-style digit classifier: features for a Frechet distance on digits, and a reward for SVDD."""

from __future__ import annotations

import torch
from torch import nn

FEATURE_DIM = 128


class DigitClassifier(nn.Module):
    """LeNet-style CNN on (B, 1, 32, 32) images in [0, 1]; penultimate layer = `features` (B, 128)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 4 * 4, FEATURE_DIM), nn.ReLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, 10)

    @staticmethod
    def _check(images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1:] != (1, 32, 32):
            raise ValueError(f"expected images of shape (B, 1, 32, 32) in [0, 1], got {tuple(images.shape)}.")
        return (images.float() - 0.5) / 0.5

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features (B, 128)."""
        return self.body(self._check(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, 10)."""
        return self.head(self.features(images))

    def log_prob(self, images: torch.Tensor) -> torch.Tensor:
        """Class log-probabilities (B, 10)."""
        return torch.log_softmax(self(images), dim=-1)
