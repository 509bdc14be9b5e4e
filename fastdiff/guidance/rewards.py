"""Rewards for SVDD (Li et al. 2024, arXiv 2408.08252): callables images (B, C, H, W) in [0, 1] -> tensor (B,).

A reward is any callable of that shape; higher is better and it need not be differentiable.
`validate_reward` checks what a reward returned before SVDD uses it.
"""

from __future__ import annotations

import io

import torch

__all__ = ["jpeg_compressibility", "ClassifierReward", "validate_reward", "REWARDS"]

REWARDS = ("jpeg_compressibility", "ClassifierReward")  # what a sweep's `svdd = { reward = ... }` may name


def validate_reward(values, batch_size: int, name: str = "reward_fn") -> torch.Tensor:
    """Check a reward's output: a finite float tensor of shape (batch_size,); returns it as float32.

    Raises:
        TypeError: not a tensor.
        ValueError: wrong shape, or NaN / infinite entries.
    """
    if not isinstance(values, torch.Tensor):
        raise TypeError(
            f"{name} returned {type(values).__name__}; it must return a torch.Tensor of shape ({batch_size},)"
            " (one reward per image): wrap the result in torch.as_tensor(...)."
        )
    if tuple(values.shape) != (batch_size,):
        raise ValueError(
            f"{name} returned shape {tuple(values.shape)} for {batch_size} images; it must return shape "
            f"({batch_size},), one scalar per image (e.g. .reshape(-1) or reduce over the other dims)."
        )
    values = values.detach().float()
    if not torch.isfinite(values).all():
        raise ValueError(
            f"{name} returned NaN or infinite values; return finite rewards (clamp log-probabilities, guard divisions)."
        )
    return values


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images (B, 1 or 3, H, W) in [0, 1], got shape {tuple(images.shape)}.")
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def jpeg_compressibility(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """JPEG compressibility (the SVDD / DDPO reward): minus the JPEG file size in kB at `quality` 95.

    Images (B, 1 or 3, H, W) in [0, 1] are quantised to 8 bits and encoded with PIL; returns (B,) float32.
    Not differentiable.

    Example:
        >>> jpeg_compressibility(torch.zeros(2, 3, 64, 64)).shape
        torch.Size([2])
    """
    from PIL import Image

    arr = _to_uint8(images).permute(0, 2, 3, 1).numpy()
    sizes = []
    for a in arr:
        img = Image.fromarray(a[..., 0], mode="L") if a.shape[-1] == 1 else Image.fromarray(a, mode="RGB")
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000.0)
    return -torch.tensor(sizes, dtype=torch.float32)


class ClassifierReward:
    """Class log-probability under the shipped digit classifier: r(x) = log p(target_class | x).

    RGB images are averaged to grey and other sizes resized (bilinear, antialiased) to 32x32, so the
    reward also runs on SD-sized images. The classifier loads lazily on first call unless one is passed.

    Example:
        >>> reward = ClassifierReward(7)
        >>> reward(torch.rand(4, 1, 32, 32)).shape
        torch.Size([4])
    """

    def __init__(self, target_class: int, classifier: torch.nn.Module | None = None, batch_size: int = 512) -> None:
        if not isinstance(target_class, int) or not 0 <= target_class <= 9:
            raise ValueError(f"target_class must be an int digit 0-9, got {target_class!r}.")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1.")
        self.target_class = target_class
        self.classifier = classifier
        self.batch_size = batch_size

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images (B, 1 or 3, H, W) in [0, 1], got shape {tuple(images.shape)}.")
        images = images.detach().float().clamp(0, 1)
        if images.shape[1] == 3:
            images = images.mean(dim=1, keepdim=True)
        if images.shape[-2:] != (32, 32):
            images = torch.nn.functional.interpolate(images, size=(32, 32), mode="bilinear", antialias=True)
        return images

    @torch.no_grad()
    def log_probs(self, images: torch.Tensor) -> torch.Tensor:
        """All class log-probabilities (B, 10)."""
        if self.classifier is None:
            from fastdiff.models import load_digit_classifier

            self.classifier = load_digit_classifier()
        device = next(self.classifier.parameters()).device
        images = self._prepare(images)
        out = [self.classifier.log_prob(chunk.to(device)) for chunk in images.split(self.batch_size)]
        return torch.cat(out).float().cpu()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.log_probs(images)[:, self.target_class]

    def __repr__(self) -> str:
        return f"ClassifierReward(target_class={self.target_class})"
