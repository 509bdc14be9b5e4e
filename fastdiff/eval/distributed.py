"""torch.distributed as the harness uses it: start the process group under torchrun, barrier, broadcast, gather.

Every function works unchanged in a single process (no process group): `barrier` does nothing,
`broadcast` and `gather_objects` return their argument (in a list for the gather). Scale-out is
torch.distributed as is: `torchrun --nproc_per_node N` or `accelerate launch` set WORLD_SIZE / RANK;
gloo on CPU, NCCL on GPU.
"""

from __future__ import annotations

import atexit
import os

import torch

__all__ = ["init_distributed", "is_distributed", "barrier", "broadcast", "gather_objects", "local_device",
           "check_device"]


def init_distributed() -> tuple[int, int]:
    """(rank, world_size); starts the default process group when launched by torchrun/accelerate.

    A group started here is destroyed at interpreter exit (torch asks for `destroy_process_group` before
    exit; without it the gloo transport can abort a process whose peer has already gone).
    """
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        atexit.register(_destroy_process_group)
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    """True inside a started process group of more than one process."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    """Wait for every rank (a no-op in one process)."""
    if is_distributed():
        import torch.distributed as dist

        dist.barrier()


def gather_objects(obj) -> list:
    """`obj` of every rank, in rank order (`[obj]` in one process)."""
    if not is_distributed():
        return [obj]
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj):
    """`obj` of rank 0, on every rank."""
    if not is_distributed():
        return obj
    import torch.distributed as dist

    box = [obj]
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
