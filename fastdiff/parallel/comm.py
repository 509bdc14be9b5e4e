"""DistriFusion (arXiv 2402.19481) / PCPP (arXiv 2412.02962) communication: gathers, neighbour exchange, byte counts.

Everything goes through `torch.distributed` on a caller-given process group (NCCL on GPUs, gloo on CPU).
Every exchange is started asynchronously and returns a `Pending`; a synchronous step waits on it at
once, an asynchronous step waits on it one UNet call later, so the transfer overlaps with compute.
Received bytes are counted per step and layer kind; `expected_bytes` gives the same numbers in closed
form from a layer plan (see `layers.layer_plan`).
"""

from __future__ import annotations

import datetime
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

Kind = Literal["conv", "attn", "norm", "output", "check"]  # "check": input checks, not counted
KINDS: tuple[str, ...] = ("conv", "attn", "norm", "output")


class PatchParallelError(RuntimeError):
    """A collective of patch parallelism failed or timed out (usually: another rank crashed or stopped)."""


class Pending:
    """An exchange in flight: `wait()` blocks until it is complete and returns `finish(received)`."""

    def __init__(self, comm: Communicator | None, works: Sequence[Any], received: Any, what: str,
                 finish: Callable[[Any], Any] | None = None) -> None:
        self._comm, self._works, self._received, self._what = comm, list(works), received, what
        self._finish = finish
        self._result: Any = None
        self._done = False

    @classmethod
    def done(cls, result: Any) -> Pending:
        """An already complete exchange holding `result` (used to keep a synchronous step's data for the next step)."""
        pending = cls(None, [], None, "")
        pending._result, pending._done = result, True
        return pending

    def wait(self) -> Any:
        if not self._done:
            for work in self._works:
                self._comm._wait(work, self._what)
            self._works = []
            self._result = self._finish(self._received) if self._finish else self._received
            self._done = True
        return self._result


class Communicator:
    """Collectives of one patch group, with a timeout and per-step received-byte counts.

    Args:
        group: the `torch.distributed` process group whose ranks share one image (None: the default group).
            The caller initialises it (e.g. under torchrun); this class never does.
        timeout_s: host-side wait limit (gloo). On NCCL a host wait would serialise the GPU streams, so
            there the process group's own timeout (its watchdog) applies instead.
    """

    def __init__(self, group: Any = None, timeout_s: float = 300.0) -> None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(
                "patch parallelism needs an initialised torch.distributed process group: launch one process per "
                "rank, e.g. `torchrun --nproc_per_node 2 your_script.py`, and call "
                "torch.distributed.init_process_group() before fastdiff.apply(pipe, PatchParallelConfig(...))."
            )
        self._dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.backend = str(dist.get_backend(group))
        self._host_timeout = self.backend != "nccl"
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.step = 0
        self.received: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def _global(self, group_rank: int) -> int:
        return group_rank if self.group is None else self._dist.get_global_rank(self.group, group_rank)

    def _count(self, kind: str, nbytes: int) -> None:
        if kind in KINDS:
            self.received[self.step][kind] += int(nbytes)

    def _wait(self, work: Any, what: str) -> None:
        try:
            ok = work.wait(self.timeout) if self._host_timeout else work.wait()
        except Exception as err:  # gloo raises on a closed connection or on timeout
            raise PatchParallelError(
                f"patch parallel rank {self.rank}/{self.world_size}: {what} at UNet step {self.step} failed: "
                f"{(str(err).splitlines() or [type(err).__name__])[0].rstrip('.!')}. Another rank probably crashed, "
                f"was killed or stopped calling the UNet (timeout {self.timeout.total_seconds():g} s)."
            ) from err
        if ok is False:
            raise PatchParallelError(
                f"patch parallel rank {self.rank}/{self.world_size}: {what} at UNet step {self.step} timed out "
                f"after {self.timeout.total_seconds():g} s."
            )

    def all_gather(self, tensor: torch.Tensor, kind: Kind, finish: Callable[[Any], Any] | None = None) -> Pending:
        """Start gathering `tensor` from every rank of the group; `wait()` gives the list in rank order."""
        tensor = tensor.contiguous()
        received = [torch.empty_like(tensor) for _ in range(self.world_size)]
        work = self._dist.all_gather(received, tensor, group=self.group, async_op=True)
        self._count(kind, (self.world_size - 1) * tensor.numel() * tensor.element_size())
        return Pending(self, [work], received, f"all_gather of {kind}", finish)

    def neighbours(self, to_above: torch.Tensor, to_below: torch.Tensor, tag: int, kind: Kind,
                   finish: Callable[[Any], Any] | None = None) -> Pending:
        """Send `to_above` to rank-1 and `to_below` to rank+1; `wait()` gives (from_above, from_below).

        `from_above` is the upper neighbour's `to_below` (None on rank 0), `from_below` the lower
        neighbour's `to_above` (None on the last rank). `tag` must identify the layer (same on every rank).
        """
        dist, rank = self._dist, self.rank
        to_above, to_below = to_above.contiguous(), to_below.contiguous()
        ops: list[tuple[Callable, torch.Tensor, int, int]] = []
        from_above = from_below = None
        if rank > 0:
            from_above = torch.empty_like(to_below)
            ops += [(dist.isend, to_above, rank - 1, 2 * tag), (dist.irecv, from_above, rank - 1, 2 * tag + 1)]
            self._count(kind, from_above.numel() * from_above.element_size())
        if rank < self.world_size - 1:
            from_below = torch.empty_like(to_above)
            ops += [(dist.isend, to_below, rank + 1, 2 * tag + 1), (dist.irecv, from_below, rank + 1, 2 * tag)]
            self._count(kind, from_below.numel() * from_below.element_size())
        if self.backend == "nccl":  # NCCL needs the pairs grouped, or ordered sends deadlock
            p2p = [dist.P2POp(op, t, self._global(peer), self.group, tag) for op, t, peer, tag in ops]
            works = dist.batch_isend_irecv(p2p) if p2p else []
        else:  # gloo: plain isend/irecv (its batch_isend_irecv is not reliable)
            works = [op(t, self._global(peer), group=self.group, tag=tag) for op, t, peer, tag in ops]
        return Pending(self, works, (from_above, from_below), f"neighbour exchange of {kind}", finish)

    def check_same(self, tensor: torch.Tensor, what: str, fix: str) -> None:
        """Raise ValueError on every rank unless `tensor` is the same on every rank of the group.

        Compares a fingerprint (sum and sum of squares in float64, to 1e-6 relative) rather than the tensor:
        one 16-byte gather per check.
        """
        x = tensor.detach().double()
        prints = self.all_gather(torch.stack([x.sum(), x.square().sum()]), "check").wait()
        for r, other in enumerate(prints):
            if not torch.allclose(other, prints[0], rtol=1e-6, atol=1e-9):
                raise ValueError(
                    f"patch parallel rank {self.rank}/{self.world_size}: {what} differ between the ranks of a patch "
                    f"group (rank {r} vs rank 0): {fix}"
                )

    def bytes_by_step(self) -> dict[int, dict[str, int]]:
        """Received bytes {step: {kind: bytes}} since the last reset (kinds: conv, attn, norm, output)."""
        return {step: {k: kinds.get(k, 0) for k in KINDS} for step, kinds in sorted(self.received.items())}

    def reset_counts(self) -> None:
        self.received.clear()


def expected_bytes(plan: Sequence[Any], height: int, width: int, world_size: int, batch_size: int = 1, *,
                   rank: int | None = None, mode: Literal["sync", "async", "naive"] = "async",
                   conditioning: Literal["full", "partial"] = "full", partial_fraction: float = 0.3,
                   warmup: bool = False, element_size: int = 4, stat_element_size: int = 4) -> dict[str, int]:
    """Closed-form received bytes of one rank in one UNet call (DistriFusion / PCPP), by layer kind.

    With N ranks, batch B, element size e, a layer at downsampling level l sees band rows h = H/2^l/N and
    width w = W/2^l. Received per rank:
      conv (kernel > 1, not the first): full: (N-1)*2*B*C_in*pad*w*e (all-gather of top+bottom rows);
          partial: n_nb*B*C_in*pad*w*e from the n_nb (1 or 2) neighbours.
      last conv also gathers the output bands: (N-1)*B*C_out*h*w*e.
      self-attention: full (or partial during warm-up): (N-1)*B*h*w*(C_k+C_v)*e;
          partial after warm-up: n_nb*B*floor(f*h*w)*(C_k+C_v)*e (PCPP's nearest tokens of each neighbour).
      GroupNorm: (N-1)*2*B*G*e_stat (mean and variance of each group).
    `plan` is `layers.layer_plan(unet)`; `rank` defaults to an interior rank (two neighbours when N > 2);
    `warmup` selects a warm-up step (full attention even with conditioning="partial").
    """
    n = world_size
    rank = min(1, n - 1) if rank is None else rank
    n_nb = int(rank > 0) + int(rank < n - 1)
    naive = mode == "naive"
    partial_attn = conditioning == "partial" and not warmup
    out = dict.fromkeys(KINDS, 0)
    for spec in plan:
        h, w = height // 2**spec.level // n, width // 2**spec.level
        if spec.kind == "conv":
            if spec.role != "first" and not naive:
                rows = batch_size * spec.in_channels * spec.pad * w * element_size
                out["conv"] += n_nb * rows if conditioning == "partial" else (n - 1) * 2 * rows
            if spec.role == "last":
                out["output"] += (n - 1) * batch_size * spec.out_channels * h * w * element_size
        elif spec.kind == "attn" and not naive:
            if partial_attn:
                tokens = max(1, int(partial_fraction * (h * w)))
                out["attn"] += n_nb * batch_size * tokens * spec.kv_channels * element_size
            else:
                out["attn"] += (n - 1) * batch_size * h * w * spec.kv_channels * element_size
        elif spec.kind == "norm" and not naive:
            out["norm"] += (n - 1) * 2 * batch_size * spec.groups * stat_element_size
    return out
