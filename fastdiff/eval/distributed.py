"""torch.distributed as the harness uses it: start the process group under torchrun, barrier, broadcast, gather.

Every function works unchanged in a single process (no process group): `barrier` does nothing,
`broadcast` and `gather_objects` return their argument (in a list for the gather). Scale-out is
torch.distributed as is: `torchrun --nproc_per_node N` or `accelerate launch` set WORLD_SIZE / RANK;
gloo on CPU, NCCL on GPU.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from collections.abc import Mapping
from datetime import timedelta

import torch

__all__ = [
    "DistributedError",
    "DEFAULT_TIMEOUT_S",
    "init_distributed",
    "is_distributed",
    "barrier",
    "broadcast",
    "gather_objects",
    "local_device",
    "check_device",
]


DEFAULT_TIMEOUT_S = 300.0


class DistributedError(RuntimeError):
    """A collective of the harness failed: a rank did not answer within the timeout, or its peer is gone."""


_timeout = timedelta(seconds=DEFAULT_TIMEOUT_S)  # the timeout of the group started here


def init_distributed(timeout_s: float | None = None) -> tuple[int, int]:
    """(rank, world_size); starts the default process group when launched by torchrun/accelerate.

    `timeout_s` (default 300 s) bounds every collective: a rank that stops responding makes the others
    fail with `DistributedError` naming it, instead of gloo's 30-minute wait. A group started here is
    destroyed at interpreter exit (without it the gloo transport can abort a process whose peer is gone).
    """
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"the process-group timeout must be > 0 seconds, got {timeout_s}.")
        global _timeout
        _timeout = timedelta(seconds=timeout_s or DEFAULT_TIMEOUT_S)
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        threads = threads_per_process(os.environ, os.cpu_count() or 1)
        if backend == "gloo" and threads is not None:
            torch.set_num_threads(threads)  # recorded as torch_threads in each folder's generation.json
        dist.init_process_group(backend, timeout=_timeout)
        atexit.register(_destroy_process_group)
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def threads_per_process(env: Mapping[str, str], cpu_count: int) -> int | None:
    """Intra-op threads for each of the processes a launcher started on this machine, so that together they use
    the cores once (None: keep torch's choice, because the user set OMP_NUM_THREADS or runs one process)."""
    local = int(env.get("LOCAL_WORLD_SIZE", env.get("WORLD_SIZE", "1")))
    if "OMP_NUM_THREADS" in env or local <= 1:
        return None
    return max(1, cpu_count // local)


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    """True inside a started process group of more than one process."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@contextlib.contextmanager
def _bounded(name: str):
    """A failed collective as one `DistributedError` naming this rank (gloo's monitored barrier names the late one)."""
    import torch.distributed as dist

    try:
        yield
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0][:300]
        raise DistributedError(
            f"{name} on rank {dist.get_rank()} of {dist.get_world_size()} failed ({first}); timeout "
            f"{_timeout.total_seconds():g} s: a rank is stuck, stopped or gone (raise --dist-timeout if it is slow)."
        ) from None


def barrier() -> None:
    """Wait for every rank (a no-op in one process); on gloo rank 0 names the ranks that never arrived."""
    if not is_distributed():
        return
    import torch.distributed as dist

    with _bounded("barrier"):
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=_timeout, wait_all_ranks=True)
        else:
            dist.barrier()


def gather_objects(obj) -> list:
    """`obj` of every rank, in rank order (`[obj]` in one process)."""
    if not is_distributed():
        return [obj]
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    with _bounded("all_gather_object"):
        dist.all_gather_object(out, obj)
    return out


def broadcast(obj):
    """`obj` of rank 0, on every rank."""
    if not is_distributed():
        return obj
    import torch.distributed as dist

    box = [obj]
    with _bounded("broadcast_object_list"):
        dist.broadcast_object_list(box, src=0)
    return box[0]


def check_device(device: str) -> None:
    """Refuse a CUDA device on a machine without CUDA, before any work."""
    if not isinstance(device, str) or not device.startswith(("cuda", "cpu")):
        raise ValueError(f"device {device!r}: use cpu, cuda or cuda:<index>.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available on this machine; use cpu.")
    index = device.partition(":")[2]
    if device.startswith("cuda") and index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
        raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s).")


def local_device(device: str | None = None) -> str:
    """`device` for this rank: "cuda" becomes cuda:<rank mod GPUs>; None means cuda when available, else cpu."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    check_device(device)
    if device == "cuda":
        rank, _ = init_distributed()
        return f"cuda:{rank % torch.cuda.device_count()}"
    return device
