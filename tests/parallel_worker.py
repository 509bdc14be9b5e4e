"""One rank of the gloo patch-parallel test job (DistriFusion / PCPP), plus the in-process simulator.

Run by tests/test_parallel.py as `python tests/parallel_worker.py RANK STORE_FILE OUT_DIR` for RANK 0-3:
one gloo job of 4 processes that is patch parallel over all 4 ranks and over two pairs of ranks (two
images at once, seeds 0 and 1). Each rank writes OUT_DIR/rank{R}.pt (layer errors, per-step latents and
received bytes per config) and then OUT_DIR/fail{R}.pt from a last call in which, in each pair, rank 1
fails on purpose (pair 0: raises and stays alive; pair 1: is killed).
"""

from __future__ import annotations

import copy
import datetime
import os
import sys
import threading
import time
from collections import defaultdict

import torch

STEPS = 10
FAIL_TIMEOUT_S = 5.0
SD_CONFIGS = {  # all ranks on bands of the whole CFG batch, except "*_split" (halves of the batch, split_cfg)
    "sync": dict(mode="sync", split_cfg=False),
    "sync_p2p": dict(mode="sync", conditioning="partial", warmup_steps=STEPS, split_cfg=False),  # exact; p2p halos
    "async": dict(mode="async", warmup_steps=3, split_cfg=False),
    "async_stale_gn": dict(mode="async", warmup_steps=3, group_norm="stale", split_cfg=False),
    "partial": dict(mode="async", warmup_steps=3, conditioning="partial", split_cfg=False),
    "naive": dict(mode="naive", split_cfg=False),
    "sync_split": dict(mode="sync", split_cfg=True),
}
SD_CONFIGS_4 = ("sync", "async", "partial", "naive", "sync_split")  # the 4-rank job runs fewer (2 CPU cores)
REF_CONFIGS = {"sync": dict(mode="sync", split_cfg=False), "sync_split": dict(mode="sync", split_cfg=True)}


# --- shared recipes (also used in-process by the test) ---

def sd_pipeline():
    from diffusers import DPMSolverMultistepScheduler

    from fastdiff.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    return pipe


def reference_pipeline():
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    from fastdiff.models import train
    from fastdiff.models.pipeline import ReferencePipeline
    from fastdiff.models.unet import build_reference_unet

    scheduler = DPMSolverMultistepScheduler.from_config(DDIMScheduler(**train.SCHEDULER_CONFIG).config)
    pipe = ReferencePipeline(unet=build_reference_unet(), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_trajectory(pipe, seed: int = 0, on_step=None) -> torch.Tensor:
    """Latents after each of STEPS DPM-Solver++ steps, (STEPS, B, 4, h, w)."""
    latents = []

    def callback(p, i, t, kwargs):
        latents.append(kwargs["latents"].clone())
        if on_step is not None:
            on_step(i)
        return kwargs

    common = dict(num_inference_steps=STEPS, output_type="latent", callback_on_step_end=callback)
    if hasattr(pipe, "text_encoder"):
        pipe("a red cube", height=64, width=64, generator=torch.Generator().manual_seed(seed), **common)
    else:
        pipe(class_labels=[3, 7], guidance_scale=3.0,
             generator=[torch.Generator().manual_seed(seed + i) for i in range(2)], **common)
    return torch.stack(latents)


def run_configs(pipe, group, configs: dict, seed: int = 0) -> dict:
    from fastdiff.parallel import PatchParallelConfig, disable_patch_parallel, enable_patch_parallel

    out = {}
    for name, kwargs in configs.items():
        state = enable_patch_parallel(pipe, PatchParallelConfig(**kwargs), group=group)
        try:
            out[name] = {"latents": run_trajectory(pipe, seed), "bytes": state.comm.bytes_by_step(),
                         "pair_bytes": state.split.pair.bytes_by_step() if state.split else None,
                         "patch_ranks": state.world_size, "wrapped": len(state.layers)}
        finally:
            disable_patch_parallel(pipe)
    return out


class ThreadHub:
    """Shared mailbox of the simulator's virtual ranks (threads of one process)."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.barrier = threading.Barrier(world_size, timeout=120)
        self.slots: dict[int, list] = {}
        self.lock = threading.Lock()


def thread_comm(hub: ThreadHub, rank: int):
    """A Communicator whose exchanges complete at once in memory: the stale-activation algorithm with no timing."""
    from fastdiff.parallel.comm import Communicator, Pending

    class ThreadComm(Communicator):
        def __init__(self) -> None:  # no process group
            self.group, self.rank, self.world_size, self.backend = None, rank, hub.world_size, "threads"
            self.step, self._seq = 0, 0
            self.timeout = datetime.timedelta(seconds=120)
            self.received = defaultdict(lambda: defaultdict(int))

        def _post(self, payload):
            key, self._seq = self._seq, self._seq + 1
            with hub.lock:
                hub.slots.setdefault(key, [None] * hub.world_size)[rank] = payload
            hub.barrier.wait()
            return hub.slots[key]

        def all_gather(self, tensor, kind, finish=None):
            got = list(self._post(tensor.contiguous().clone()))
            self._count(kind, (self.world_size - 1) * tensor.numel() * tensor.element_size())
            return Pending.done(finish(got) if finish else got)

        def neighbours(self, to_above, to_below, tag, kind, finish=None):
            got = self._post((to_above.contiguous().clone(), to_below.contiguous().clone()))
            above = got[rank - 1][1] if rank > 0 else None
            below = got[rank + 1][0] if rank < hub.world_size - 1 else None
            for t in (above, below):
                if t is not None:
                    self._count(kind, t.numel() * t.element_size())
            return Pending.done(finish((above, below)) if finish else (above, below))

    return ThreadComm()


def simulate(pipe, world_size: int, configs: dict, seed: int = 0) -> list[dict]:
    """Run `configs` with `world_size` virtual ranks as threads of this process; results per rank."""
    results: list = [None] * world_size
    errors: list = []

    def body(rank: int, hub: ThreadHub, replica) -> None:
        try:
            results[rank] = run_configs(replica, thread_comm(hub, rank), configs, seed)
        except BaseException as err:  # noqa: BLE001 - reported by the caller
            errors.append(err)
            hub.barrier.abort()

    hub = ThreadHub(world_size)
    threads = [threading.Thread(target=body, args=(r, hub, copy.deepcopy(pipe))) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


# --- per-layer exactness in sync mode ---

def check_layers(group) -> dict:
    """Max |patch - original| per layer type and dtype, every layer on a full input split into bands."""
    from diffusers.hooks import HookRegistry
    from diffusers.models.attention_processor import Attention
    from torch import nn

    from fastdiff.parallel import PatchParallelConfig
    from fastdiff.parallel.comm import Communicator
    from fastdiff.parallel.layers import PatchConv2d, PatchGroupNorm, PatchSelfAttention, PatchState

    state = PatchState(PatchParallelConfig(mode="sync"), Communicator(group, timeout_s=60))
    n, r = state.world_size, state.rank
    errors = {}

    def gather(t, dim):
        return torch.cat(state.comm.all_gather(t, "output").wait(), dim=dim)

    def banded(module, hook, x):
        """`module(x)` with the band-aware `hook` registered on it, then the hook removed again."""
        registry = HookRegistry.check_if_exists_or_initialize(module)
        registry.register_hook(hook, "patch")
        try:
            return module(x)
        finally:
            registry.remove_hook("patch", recurse=False)

    for dtype in (torch.float64, torch.float32):
        torch.manual_seed(0)
        x = (torch.randn(2, 8, 16, 12) * 3 + 2).to(dtype)
        h = x.shape[2] // n
        band = x[:, :, r * h:(r + 1) * h]
        layers = {
            "conv3x3": nn.Conv2d(8, 6, 3, padding=1), "conv3x3_stride2": nn.Conv2d(8, 6, 3, stride=2, padding=1),
            "conv5x5": nn.Conv2d(8, 6, 5, padding=2),
        }
        for name, conv in layers.items():
            conv = conv.to(dtype)
            errors[f"{name}/{dtype}"] = (gather(banded(conv, PatchConv2d(state, 0), band), 2)
                                         - conv(x)).abs().max().item()
        conv = layers["conv3x3"].to(dtype)
        first = gather(banded(conv, PatchConv2d(state, 1, "first"), x), 2)
        errors[f"conv_first/{dtype}"] = (first - conv(x)).abs().max().item()
        errors[f"conv_last/{dtype}"] = (banded(conv, PatchConv2d(state, 2, "last"), band) - conv(x)).abs().max().item()
        gn = nn.GroupNorm(4, 8).to(dtype)
        nn.init.normal_(gn.weight), nn.init.normal_(gn.bias)
        errors[f"groupnorm/{dtype}"] = (gather(banded(gn, PatchGroupNorm(state, 3), band), 2)
                                        - gn(x)).abs().max().item()
        attn = Attention(query_dim=8, heads=2, dim_head=4).to(dtype).eval()
        tokens = x.flatten(2).transpose(1, 2)  # (B, H*W, C), row-major
        local = tokens[:, r * h * 12:(r + 1) * h * 12]
        errors[f"self_attention/{dtype}"] = (gather(banded(attn, PatchSelfAttention(state, 4), local), 1)
                                             - attn(tokens)).abs().max().item()
    return errors


# --- the job ---

def fail_scenario(pipe, group, how: str) -> dict:
    """Group rank 1 fails at step 3 ('raise': raises and stays alive; 'kill': exits); rank 0 must error out."""
    import torch.distributed as dist

    from fastdiff.parallel import PatchParallelConfig, enable_patch_parallel

    victim = dist.get_rank(group) == 1
    config = PatchParallelConfig(mode="async", warmup_steps=2, timeout_s=FAIL_TIMEOUT_S, split_cfg=False)
    enable_patch_parallel(pipe, config, group)

    def on_step(i):
        if victim and i == 3:
            if how == "kill":
                os._exit(17)
            raise RuntimeError("injected failure")

    start = time.monotonic()
    try:
        run_trajectory(pipe, 0, on_step)
        return {"error": None, "elapsed": time.monotonic() - start}
    except Exception as err:  # noqa: BLE001 - recorded for the test
        if victim:
            time.sleep(FAIL_TIMEOUT_S + 3)  # stay alive, silent: the others must time out, not hang
        return {"error": type(err).__name__, "message": str(err), "elapsed": time.monotonic() - start}


def main(rank: int, store: str, out_dir: str) -> None:
    """4 ranks: patch groups of 4 (the world) and of 2 (ranks 0-1 with seed 0, ranks 2-3 with seed 1)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=4,
                            timeout=datetime.timedelta(seconds=120))
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    pair, seed = pairs[rank // 2], rank // 2
    sd, ref = sd_pipeline(), reference_pipeline()
    results = {
        "layers": {4: check_layers(None), 2: check_layers(pair)},
        4: {"sd": run_configs(sd, None, {k: SD_CONFIGS[k] for k in SD_CONFIGS_4}),
            "reference": run_configs(ref, None, REF_CONFIGS)},
        2: {"sd": run_configs(sd, pair, SD_CONFIGS, seed), "reference": run_configs(ref, pair, REF_CONFIGS, seed)},
    }
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    torch.save(fail_scenario(sd, pair, "raise" if seed == 0 else "kill"), os.path.join(out_dir, f"fail{rank}.pt"))
    sys.stdout.flush()
    os._exit(0)  # skip process-group teardown: a peer may be gone


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
