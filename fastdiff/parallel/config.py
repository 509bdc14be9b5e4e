"""DistriFusion (Li et al. 2024, arXiv 2402.19481) / PCPP (arXiv 2412.02962) patch-parallel settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class PatchParallelConfig:
    """Patch parallelism (DistriFusion, arXiv 2402.19481; PCPP, arXiv 2412.02962): how bands talk to each other.

    The latent is split into row bands, one per rank of the process group. Every wrapped layer (Conv2d with
    kernel > 1, self-attention, GroupNorm) needs something from the other bands: halo rows, keys/values,
    group statistics. This config says how fresh that information is and how much of it is exchanged.

    Args:
        mode: "sync": every step exchanges fresh activations (equals the single-device model up to float
            rounding). "async": DistriFusion; after `warmup_steps` synchronous steps, each layer uses the
            other bands' activations from the previous UNet call, gathered in the background while the
            rest of the UNet computes. "naive": a baseline with no exchange at all (each band runs the
            plain UNet with zero padding, local attention and local GroupNorm; seams appear); only the
            output bands are gathered.
        warmup_steps: number of denoising steps per pipeline call (fastdiff's step clock) computed synchronously
            before "async" starts (>= 1 in async mode: the first asynchronous step needs last step's activations).
        conditioning: "full": self-attention sees the keys/values of the whole image (DistriFusion).
            "partial": PCPP; after warm-up, self-attention sees the local band plus the nearest
            `partial_fraction` of the tokens of the band above and of the band below, and halo rows and
            boundary tokens travel only to the two neighbours (point-to-point).
        partial_fraction: fraction of a neighbour band's tokens attended to with conditioning="partial"
            (PCPP's portion, 0.3).
        group_norm: how GroupNorm statistics are formed in asynchronous steps. "corrected": DistriFusion's
            corrected asynchronous GN (stale global moments plus the fresh-minus-stale change of the local
            band). "stale": other bands' statistics from the previous step, local band fresh. "sync": a
            blocking exchange of fresh statistics every step, even in async mode.
        split_cfg: DistriFusion's batch split. With an even number of ranks, the first half of the ranks
            computes the first half of each UNet batch (the unconditional branch of classifier-free
            guidance) and the second half the rest, each half patch parallel over its own ranks; the
            two halves swap outputs after every UNet call. Exact (no staleness), and half the patches
            per image: on 2 ranks there are no bands at all. Ignored for an odd number of ranks or
            an odd UNet batch (both halves then compute the whole batch).
        timeout_s: seconds any rank waits for a collective before raising `PatchParallelError` (a rank
            that crashed or is stuck then fails the others instead of hanging them).
    """

    mode: Literal["sync", "async", "naive"] = "async"
    warmup_steps: int = 4
    conditioning: Literal["full", "partial"] = "full"
    partial_fraction: float = 0.3
    group_norm: Literal["corrected", "stale", "sync"] = "corrected"
    split_cfg: bool = True
    timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.mode not in ("sync", "async", "naive"):
            raise ValueError(f"mode must be 'sync', 'async' or 'naive', got {self.mode!r}.")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {self.warmup_steps!r}.")
        if self.mode == "async" and self.warmup_steps < 1:
            raise ValueError("mode='async' needs warmup_steps >= 1: the first step fills the buffers the next reads.")
        if self.conditioning not in ("full", "partial"):
            raise ValueError(f"conditioning must be 'full' or 'partial', got {self.conditioning!r}.")
        if not 0.0 < self.partial_fraction <= 1.0:
            raise ValueError(f"partial_fraction must be in (0, 1], got {self.partial_fraction!r}.")
        if self.group_norm not in ("corrected", "stale", "sync"):
            raise ValueError(f"group_norm must be 'corrected', 'stale' or 'sync', got {self.group_norm!r}.")
        if not isinstance(self.split_cfg, bool):
            raise ValueError(f"split_cfg must be True or False, got {self.split_cfg!r}.")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {self.timeout_s!r}.")
