"""DistriFusion (arXiv 2402.19481) batch splitting: the two halves of a CFG batch on two groups of ranks.

With `split_cfg=True` and an even number of ranks, the ranks form two halves of equal size. The first
half runs the first half of every UNet batch (in diffusers' pipelines, the unconditional branch of
classifier-free guidance), the second half the rest, each half patch parallel over its own ranks. After
each UNet call, rank j of one half and rank j of the other (a "pair") swap their outputs, so every
rank holds the full output again. Nothing here is specific to guidance: any even UNet batch is split;
an odd one is computed whole by both halves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fastdiff.parallel.comm import Communicator

_GROUPS: dict[tuple[int, ...], Any] = {}


@dataclass
class BatchSplit:
    """Which half of the batch this rank computes (`index` 0 or 1) and the communicator of its pair."""

    index: int
    pair: Communicator


def _subgroup(global_ranks: list[int], timeout_s: float) -> Any:
    """A process group over `global_ranks`, created once per rank set (only its members take part)."""
    import datetime

    import torch.distributed as dist

    key = tuple(global_ranks)
    if key not in _GROUPS:
        _GROUPS[key] = dist.new_group(list(key), timeout=datetime.timedelta(seconds=timeout_s),
                                      use_local_synchronization=True)
    return _GROUPS[key]


def split_groups(group: Any, timeout_s: float) -> tuple[Any, BatchSplit]:
    """Split `group` (None: the default group) of 2k ranks into halves: (this half's patch group, BatchSplit).

    Group ranks 0..k-1 form the first half, k..2k-1 the second; group rank j pairs with j + k. Only the
    members of each new group create it (`use_local_synchronization`), so it works under an explicit
    subgroup as well as the default group.
    """
    import torch.distributed as dist

    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
    rank, half = dist.get_rank(group), len(ranks) // 2
    index, j = rank // half, rank % half
    patch = _subgroup(ranks[index * half:(index + 1) * half], timeout_s)
    pair = group if len(ranks) == 2 else _subgroup([ranks[j], ranks[j + half]], timeout_s)
    return patch, BatchSplit(index, Communicator(pair, timeout_s))


def _slice(value: Any, batch: int, index: int) -> Any:
    if isinstance(value, torch.Tensor):
        if value.ndim >= 1 and value.shape[0] == batch:
            half = batch // 2
            return value[index * half:(index + 1) * half]
        return value
    if isinstance(value, dict):
        return {k: _slice(v, batch, index) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_slice(v, batch, index) for v in value)
    return value


def split_inputs(args: tuple, kwargs: dict, batch: int, index: int) -> tuple[tuple, dict]:
    """Every tensor argument whose first dimension is `batch` (also inside dicts/tuples), cut to half `index`."""
    return _slice(args, batch, index), _slice(kwargs, batch, index)


def gather_output(output: Any, split: BatchSplit) -> Any:
    """Swap this half's UNet output with the pair's; return the output with the full batch, in batch order."""
    sample = output[0] if isinstance(output, tuple) else output.sample
    halves = split.pair.all_gather(sample, "output").wait()
    if split.pair.rank != split.index:  # the pair's group order is the reverse of the batch order
        halves = halves[::-1]
    full = torch.cat(halves, dim=0)
    if isinstance(output, tuple):
        return (full, *output[1:])
    output.sample = full
    return output
