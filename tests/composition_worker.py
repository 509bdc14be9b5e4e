"""torchrun worker of tests/test_composition.py: the composition matrix with patch parallelism on 2 gloo ranks.

    torchrun --standalone --nproc_per_node 2 tests/composition_worker.py OUT matrix   # stacks with PP, per rank
    torchrun --standalone --nproc_per_node 2 tests/composition_worker.py OUT sweep    # a five-way harness row

`matrix` writes OUT/rank{r}.pt: {(kind, guidance, members, split_cfg, pp_first, mode): images}; rank 0 also
writes OUT/single.pt with the same stacks without PP, computed in this one process after the PP runs.
`sweep` writes the row's PNGs under OUT/images through fastdiff.eval.generate.generate_images.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from fastdiff.parallel import PatchParallelConfig

HERE = Path(__file__).parent
_spec = importlib.util.spec_from_file_location("composition_cases", HERE / "composition_cases.py")
cases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cases)

FIVE_WAY = [("dpm", "ep", "block_skip", "svdd1"), ("dpm", "ep_parallel", "svdd1")]
REFERENCE_STACKS = [("dpm",), ("ep",), ("ep_parallel",), ("ep_shallow",), ("ep_deep",), ("block_skip",), ("svdd1",),
                    ("svdd3",), ("svdd3_chunked",), ("dpm", "ep_parallel", "svdd3_mc"), *FIVE_WAY]
TINY_SD_STACKS = [("ep",), FIVE_WAY[1]]


def plan() -> list[tuple]:
    """(kind, guidance, members, split_cfg, pp_first, mode) of every PP run.

    Reference model at w = 3: every stack, split_cfg off and on, PP applied before and after the hooks, then
    async; at w = 1 (no CFG batch to split, but an even batch still is) PP applied last. Tiny SD at w = 3:
    encoder propagation alone and the five-way stack, both split_cfg settings, sync and async.
    """
    runs = []
    for kind, guidance, stacks, orders in (("reference", 3.0, REFERENCE_STACKS, (False, True)),
                                           ("reference", 1.0, REFERENCE_STACKS, (False,)),
                                           ("tiny_sd", 3.0, TINY_SD_STACKS, (False,))):
        for members in stacks:
            for split_cfg in (False, True):
                runs += [(kind, guidance, members, split_cfg, pp_first, "sync") for pp_first in orders]
                if guidance == 3.0:
                    runs.append((kind, guidance, members, split_cfg, False, "async"))
    return runs


def matrix(out: Path) -> None:
    torch.set_num_threads(1)
    rank = dist.get_rank()
    pipes = {kind: cases.pipeline(kind) for kind in ("reference", "tiny_sd")}
    results = {}
    for kind, guidance, members, split_cfg, pp_first, mode in plan():
        pp = PatchParallelConfig(mode=mode, warmup_steps=2, split_cfg=split_cfg, timeout_s=120)
        images = cases.run(pipes[kind], kind, guidance, members, pp=pp, pp_first=pp_first)
        results[kind, guidance, members, split_cfg, pp_first, mode] = images
    torch.save(results, out / f"rank{rank}.pt")
    if rank == 0:
        stacks = {(k, g, m) for k, g, m, *_ in plan()}
        torch.save({s: cases.run(pipes[s[0]], *s) for s in sorted(stacks)}, out / "single.pt")


def sweep(out: Path) -> None:
    """DPM-Solver++ + a schedule file + parallel encoder propagation + PP (sync) + SVDD, as one harness row."""
    from fastdiff.eval.generate import generate_images
    from fastdiff.eval.methods import MethodSpec

    torch.set_num_threads(1)
    schedule = out.parent / "schedule.json"  # written by the test before the launch
    row = dict(name="five-way", scheduler="DPMSolverPlusPlusScheduler",
               scheduler_kwargs={"algorithm_type": "sde-dpmsolver++"}, schedule=str(schedule), guidance=3.0,
               encoder_propagation={"key_steps": [0, 1, 3], "parallel": True},
               svdd={"reward": "jpeg_compressibility", "num_candidates": 1})
    if "WORLD_SIZE" in os.environ:  # under torchrun
        row["patch_parallel"] = {"mode": "sync", "split_cfg": False}
    pipe = cases.pipeline("reference")
    generate_images(pipe, MethodSpec(**row), out / "images", n=4, batch_size=2, progress=False)


if __name__ == "__main__":
    target, what = Path(sys.argv[1]), sys.argv[2]
    if what == "matrix":
        dist.init_process_group("gloo")
        matrix(target)
        dist.barrier()
        dist.destroy_process_group()
    else:
        sweep(target)
