"""Tests of fastdiff.parallel: DistriFusion / PCPP patch parallelism over gloo (2 and 4 CPU processes).

One gloo job of 4 processes (tests/parallel_worker.py; patch groups of 4 and of 2 ranks) runs in the
background while this process computes the single-process references and an in-process simulator of
the stale-activation algorithm (threads as virtual ranks, exchanges completing instantly). References
are diffusers' unwrapped models on the same inputs, the simulator, and the closed-form byte formulas.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastdiff.parallel import PatchParallelConfig

HERE = Path(__file__).parent
_spec = importlib.util.spec_from_file_location("parallel_worker", HERE / "parallel_worker.py")
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

# the tests marked `slow` share one background gloo job: one xdist worker runs them all
SHARED_JOB = pytest.mark.xdist_group("test_parallel_job")

WORLDS = (2, 4)
SIM_CONFIGS = {2: ("async", "async_stale_gn", "partial"), 4: ("async", "partial")}


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """Start the 4-process gloo job (collected later by `results`)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", GLOO_SOCKET_IFNAME="lo")
    out = tmp_path_factory.mktemp("patch_parallel")
    procs = [subprocess.Popen([sys.executable, str(HERE / "parallel_worker.py"), str(rank), str(out / "store"),
                               str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(4)]
    yield procs, out
    for p in procs:
        if p.poll() is None:
            p.kill()


@pytest.fixture(scope="module")
def single(job):
    """Single-process trajectories (seeds 0, 1) and simulator runs (seed 0), computed while the job runs.

    One intra-op thread, as in the ranks: kernels then reduce in the same order, so "exactly" means bitwise.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sd, ref = worker.sd_pipeline(), worker.reference_pipeline()
        out = {("sd", s): worker.run_trajectory(sd, s) for s in (0, 1)}
        out |= {("reference", s): worker.run_trajectory(ref, s) for s in (0, 1)}
        for world in WORLDS:
            out["sim", world] = worker.simulate(sd, world, {k: worker.SD_CONFIGS[k] for k in SIM_CONFIGS[world]})
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def results(job, single):  # `single` first: it computes while the job runs
    procs, out = job
    deadline = time.monotonic() + 300
    for rank, p in enumerate(procs):
        try:
            log, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            pytest.fail(f"rank {rank} hung")
        assert p.returncode == (17 if rank == 3 else 0), f"rank {rank} failed:\n{log[-3000:]}"
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(4)]
    fails = {r: torch.load(out / f"fail{r}.pt") for r in range(3)}
    return ranks, fails


def _groups(results, world: int) -> list[tuple[int, list[dict], list[dict]]]:
    """(seed, per-rank results in group order, per-rank layer errors) of each patch group of `world` ranks."""
    ranks, _ = results
    if world == 4:
        return [(0, [r[4] for r in ranks], [r["layers"][4] for r in ranks])]
    return [(seed, [r[2] for r in ranks[2 * seed:2 * seed + 2]], [r["layers"][2] for r in ranks[2 * seed:2 * seed + 2]])
            for seed in (0, 1)]


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    """max |a - b| <= tol * max(1, max |b|) (fp32 accumulates rounding in proportion to the latent scale)."""
    return bool((a - b).abs().max() <= tol * max(1.0, b.abs().max().item()))


def _drift(traj: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-step relative L2 distance ||x_pp - x_ref|| / ||x_ref||."""
    return (traj - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)


# --- pure checks ---

def test_config_validation():
    assert PatchParallelConfig().mode == "async"
    for bad in (dict(mode="fast"), dict(warmup_steps=-1), dict(mode="async", warmup_steps=0),
                dict(conditioning="half"), dict(partial_fraction=0.0), dict(group_norm="exact"),
                dict(split_cfg="yes"), dict(timeout_s=0)):
        with pytest.raises(ValueError):
            PatchParallelConfig(**bad)
    PatchParallelConfig(mode="sync", warmup_steps=0)


def test_divisibility_error_is_clear():
    from fastdiff.parallel import check_divisible

    check_divisible(32, 4, 1)
    with pytest.raises(ValueError, match="multiple of 4\\*2\\^2 = 16"):
        check_divisible(24, 4, 2)


def test_not_divisible_height_raises_before_communicating():
    from fastdiff.parallel import disable_patch_parallel, enable_patch_parallel

    pipe = worker.sd_pipeline()
    config = PatchParallelConfig(mode="sync", split_cfg=False)
    enable_patch_parallel(pipe, config, group=worker.thread_comm(worker.ThreadHub(4), 0))
    with pytest.raises(ValueError, match="multiple of 8"):  # latent 20 rows, 4 bands, one downsample
        pipe("a red cube", height=40, width=64, num_inference_steps=2, output_type="latent")
    disable_patch_parallel(pipe)


def test_enable_needs_a_process_group():
    import torch.distributed as dist

    from fastdiff.parallel import enable_patch_parallel

    assert not dist.is_initialized(), "an earlier test left a process group in the pytest process"
    pipe = worker.sd_pipeline()
    with pytest.raises(ValueError, match="torchrun --nproc_per_node 2"):
        enable_patch_parallel(pipe, PatchParallelConfig())
    assert not any(hasattr(m, "_diffusers_hook") and m._diffusers_hook.hooks for m in pipe.unet.modules())


def test_disable_restores_bit_identical_output():
    import inspect

    from torch import nn

    from fastdiff.parallel import disable_patch_parallel, enable_patch_parallel, layer_plan

    pipe = worker.sd_pipeline()
    names = {n: type(m) for n, m in pipe.unet.named_modules()}
    keys, signature = list(pipe.unet.state_dict()), inspect.signature(pipe.unet.forward)
    before = worker.run_trajectory(pipe)
    plan = layer_plan(pipe.unet)
    assert {s.kind for s in plan} == {"conv", "attn", "norm"}
    assert sum(s.kind == "conv" for s in plan) == sum(
        isinstance(m, nn.Conv2d) and m.kernel_size[0] > 1 for m in pipe.unet.modules())
    enable_patch_parallel(pipe, PatchParallelConfig(), group=worker.thread_comm(worker.ThreadHub(1), 0))
    with pytest.raises(ValueError, match="already applied"):
        enable_patch_parallel(pipe, PatchParallelConfig(), group=worker.thread_comm(worker.ThreadHub(1), 0))
    worker.run_trajectory(pipe)
    disable_patch_parallel(pipe)
    assert {n: type(m) for n, m in pipe.unet.named_modules()} == names
    assert list(pipe.unet.state_dict()) == keys and inspect.signature(pipe.unet.forward) == signature
    assert torch.equal(worker.run_trajectory(pipe), before)


@pytest.mark.parametrize("factory", ["tiny_sdxl_pipeline", "tiny_controlnet_pipeline"])
def test_sync_simulated_sdxl_and_controlnet_equal_single_process(factory):
    import fastdiff.testing

    pipe = getattr(fastdiff.testing, factory)()
    kwargs = dict(num_inference_steps=4, height=64, width=64, output_type="latent")
    if "controlnet" in factory:
        kwargs["image"] = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))

    def run(p):
        return p("a red cube", generator=torch.Generator().manual_seed(0), **kwargs).images

    ref = run(pipe)
    got: list = [None, None]
    from fastdiff.parallel import disable_patch_parallel, enable_patch_parallel

    def body(rank, hub, replica):
        config = PatchParallelConfig(mode="sync", split_cfg=False)
        enable_patch_parallel(replica, config, group=worker.thread_comm(hub, rank))
        got[rank] = run(replica)
        disable_patch_parallel(replica)

    import copy
    import threading

    hub = worker.ThreadHub(2)
    threads = [threading.Thread(target=body, args=(r, hub, copy.deepcopy(pipe))) for r in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert got[0] is not None and torch.equal(got[0], got[1])
    assert _close(got[0], ref)


def test_pcpp_bytes_at_8_ranks_below_0_3_of_distrifusion():
    from fastdiff.parallel import expected_bytes, layer_plan

    plan = layer_plan(worker.sd_pipeline().unet)
    full = sum(expected_bytes(plan, 32, 32, 8, 2).values())
    partial = sum(expected_bytes(plan, 32, 32, 8, 2, conditioning="partial").values())
    assert partial <= 0.3 * full


# --- the gloo jobs ---

@pytest.mark.slow
@SHARED_JOB
@pytest.mark.parametrize("world", WORLDS)
def test_each_wrapped_layer_equals_original(results, world):
    for _, _, layer_errors in _groups(results, world):
        for errors in layer_errors:
            assert len(errors) == 14
            for name, err in errors.items():
                assert err <= (1e-10 if "float64" in name else 1e-5), (name, err)


@pytest.mark.slow
@SHARED_JOB
@pytest.mark.parametrize("world", WORLDS)
def test_sync_run_equals_single_process_on_every_rank(results, single, world):
    """10 DPM-Solver++ steps; with 2 ranks, two pairs run two images (seeds 0, 1) at once (data x patch)."""
    for seed, ranks, _ in _groups(results, world):
        for model, configs in (("sd", ("sync", "sync_p2p", "sync_split")), ("reference", ("sync", "sync_split"))):
            for config in configs:
                if config not in ranks[0][model]:
                    continue
                trajs = [r[model][config]["latents"] for r in ranks]
                for traj in trajs[1:]:
                    assert torch.equal(traj, trajs[0]), (model, config)  # same latent on every rank, every step
                assert _close(trajs[0], single[model, seed]), (model, config, seed)


@pytest.mark.slow
@SHARED_JOB
@pytest.mark.parametrize("world", WORLDS)
def test_async_equals_simulator_exactly(results, single, world):
    seed, ranks, _ = _groups(results, world)[0]
    sim = single["sim", world]
    for rank, rank_results in enumerate(ranks):
        for config in SIM_CONFIGS[world]:
            got = rank_results["sd"][config]
            assert torch.equal(got["latents"], sim[rank][config]["latents"]), (config, rank)
            assert got["bytes"] == sim[rank][config]["bytes"], (config, rank)


@pytest.mark.slow
@SHARED_JOB
@pytest.mark.parametrize("world", WORLDS)
def test_drift_sync_below_async_below_naive(results, single, world):
    seed, ranks, _ = _groups(results, world)[0]
    drift = {k: _drift(v["latents"], single["sd", seed]) for k, v in ranks[0]["sd"].items()}
    warm = worker.SD_CONFIGS["async"]["warmup_steps"]
    assert drift["sync"].max() <= 1e-5
    assert drift["async"][:warm].max() <= 1e-5  # synchronous warm-up
    for name in ("async", "partial", "async_stale_gn"):
        if name in drift:
            assert (drift[name][warm:] > drift["sync"][warm:]).all()
    assert (drift["async"][warm:] < drift["naive"][warm:]).all()
    assert (drift["partial"][warm:] < drift["naive"][warm:]).all()


@pytest.mark.slow
@SHARED_JOB
@pytest.mark.parametrize("world", WORLDS)
def test_counted_bytes_equal_formulas(results, world):
    from fastdiff.parallel import expected_bytes, layer_plan

    plans = {"sd": layer_plan(worker.sd_pipeline().unet), "reference": layer_plan(worker.reference_pipeline().unet)}
    shapes = {"sd": (32, 2), "reference": (16, 4)}  # latent size, UNet batch (CFG doubles it)
    configs = {"sd": worker.SD_CONFIGS, "reference": worker.REF_CONFIGS}
    for _, ranks, _ in _groups(results, world):
        for rank, rank_results in enumerate(ranks):
            for model, (size, batch) in shapes.items():
                for name, got in rank_results[model].items():
                    config = PatchParallelConfig(**configs[model][name])
                    n, b, r = world, batch, rank
                    if config.split_cfg:  # bands of half the batch over half the ranks; pairs swap outputs
                        n, b, r = world // 2, batch // 2, rank % (world // 2)
                        half_output = b * 4 * size * size * 4  # 4 latent channels, fp32
                        assert got["pair_bytes"] == {s: {"conv": 0, "attn": 0, "norm": 0, "output": half_output}
                                                     for s in range(worker.STEPS)}
                        assert got["patch_ranks"] == n and (got["wrapped"] > 0) == (n > 1)
                        if n == 1:  # one rank per half: no bands, nothing else exchanged
                            assert got["bytes"] == {}
                            continue
                    assert sorted(got["bytes"]) == list(range(worker.STEPS))
                    for step, counted in got["bytes"].items():
                        want = expected_bytes(plans[model], size, size, n, b, rank=r, mode=config.mode,
                                              conditioning=config.conditioning,
                                              partial_fraction=config.partial_fraction,
                                              warmup=step < config.warmup_steps)
                        assert counted == want, (model, name, rank, step)
                        if config.mode != "naive":
                            assert all(counted[k] > 0 for k in ("conv", "attn", "norm", "output"))


@pytest.mark.slow
@SHARED_JOB
@pytest.mark.parametrize("how, rank", [("raise and stay alive", 0), ("killed", 2)])
def test_failing_rank_makes_the_others_fail_fast(results, how, rank):
    fail = results[1][rank]
    assert fail["error"] == "PatchParallelError", fail
    assert "Another rank probably crashed" in fail["message"]
    assert fail["elapsed"] < worker.FAIL_TIMEOUT_S + 30  # no hang: bounded by the configured timeout


# --- composition with other hooks (thread simulator) ---

def _on_ranks(world: int, replicas: list, body) -> list:
    """Run `body(rank, hub, replica)` on `world` virtual ranks (threads); its results in rank order."""
    import threading

    hub, results, errors = worker.ThreadHub(world), [None] * world, []

    def run(rank: int) -> None:
        try:
            results[rank] = body(rank, hub, replicas[rank])
        except BaseException as err:  # noqa: BLE001 - re-raised below
            errors.append(err)
            hub.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    if errors:
        raise errors[0]
    return results


def _unet_calls(unet, config: PatchParallelConfig, calls: list[tuple[int, int, dict]], world: int = 2) -> list:
    """Outputs of `calls` [(step, chunk, unet kwargs)] on `world` virtual ranks, each call pinned to its step/chunk."""
    import copy

    from diffusers import DDIMScheduler

    import fastdiff.compose

    def body(rank, hub, replica):
        scheduler = DDIMScheduler()
        scheduler.set_timesteps(10)
        with fastdiff.compose.apply(replica, config, scheduler=scheduler, group=worker.thread_comm(hub, rank)) as pp:
            clock = pp["patch_parallel"].state.clock
            out = []
            for step, chunk, kwargs in calls:
                with clock.pinned(step, chunk), torch.no_grad():
                    out.append(replica(**kwargs).sample)
            return out

    outs = _on_ranks(world, [copy.deepcopy(unet) for _ in range(world)], body)
    for other in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(other, outs[0]))  # every rank holds the full output
    return outs[0]


def _inputs(unet, batch: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    size, dim = unet.config.sample_size, unet.config.cross_attention_dim
    return dict(sample=torch.randn(batch, 4, size, size, generator=g), timestep=torch.tensor(500 - 10 * seed),
                encoder_hidden_states=torch.randn(batch, 8, dim, generator=g))


def test_async_batch_change_and_chunks_keep_their_own_buffers():
    """A batch size or chunk first seen in an asynchronous step exchanges synchronously; none reads another's data."""
    unet = worker.sd_pipeline().unet
    config = PatchParallelConfig(mode="async", warmup_steps=1, split_cfg=False)
    small = {(s, c): _inputs(unet, 1, 10 * s + c) for s in range(4) for c in (0, 1)}  # SVDD-like row chunks
    large = {s: _inputs(unet, 3, 100 + s) for s in range(1, 4)}  # a larger second call (parallel decoding)
    chunk_calls = {c: [(s, c, small[s, c]) for s in range(4)] for c in (0, 1)}
    large_calls = [(s, 0, large[s]) for s in range(1, 4)]  # first seen at step 1, already asynchronous
    interleaved = [call for s in range(4) for call in (chunk_calls[0][s], chunk_calls[1][s])
                   + ((large_calls[s - 1],) if s else ())]
    got = _unet_calls(unet, config, interleaved)
    alone = {c: _unet_calls(unet, config, chunk_calls[c]) for c in (0, 1)} | {"large": _unet_calls(unet, config,
                                                                                                 large_calls)}
    by_call = dict(zip(((s, c, kw["sample"].shape[0]) for s, c, kw in interleaved), got))
    for c in (0, 1):
        for s in range(4):
            assert torch.equal(by_call[s, c, 1], alone[c][s]), (c, s)  # never another chunk's activations
    for s in range(1, 4):
        assert torch.equal(by_call[s, 0, 3], alone["large"][s - 1]), s  # never the small batch's activations
    with torch.no_grad():
        exact = unet(**large[1]).sample
        stale = unet(**small[2, 0]).sample
    assert _close(by_call[1, 0, 3], exact)  # first seen in an async step: synchronous exchange
    assert not _close(by_call[2, 0, 1], stale, 1e-4)  # the async steps really use stale data


def _counting_hooks(unet) -> dict:
    """A counting diffusers hook (not fastdiff's) on conv_in, a GroupNorm and a self-attention, by module name."""
    from diffusers.hooks import HookRegistry, ModelHook

    from fastdiff.parallel import layer_plan

    class Count(ModelHook):
        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        def pre_forward(self, module, *args, **kwargs):
            self.calls += 1
            return args, kwargs

    plan = layer_plan(unet)
    names = ["conv_in", next(s.name for s in plan if s.kind == "norm"), next(s.name for s in plan if s.kind == "attn")]
    modules = dict(unet.named_modules())
    hooks = {}
    for name in names:
        hooks[name] = Count()
        HookRegistry.check_if_exists_or_initialize(modules[name]).register_hook(hooks[name], "test_count")
    return hooks


def _pp_with_counting_hooks(counting_first: bool) -> None:
    import copy

    from fastdiff.parallel import disable_patch_parallel, enable_patch_parallel

    pipe, steps = worker.sd_pipeline(), 3
    kwargs = dict(num_inference_steps=steps, height=64, width=64, output_type="latent")
    ref = pipe("a red cube", generator=torch.Generator().manual_seed(0), **kwargs).images

    def body(rank, hub, replica):
        hooks = _counting_hooks(replica.unet) if counting_first else None
        state = enable_patch_parallel(replica, PatchParallelConfig(mode="sync", split_cfg=False),
                                      group=worker.thread_comm(hub, rank))
        hooks = hooks or _counting_hooks(replica.unet)
        out = replica("a red cube", generator=torch.Generator().manual_seed(0), **kwargs).images
        bytes_sent = sum(sum(k.values()) for k in state.comm.bytes_by_step().values())
        disable_patch_parallel(replica)
        return out, {name: h.calls for name, h in hooks.items()}, bytes_sent

    results = _on_ranks(2, [copy.deepcopy(pipe) for _ in range(2)], body)
    for out, calls, bytes_sent in results:
        assert calls == dict.fromkeys(calls, steps)  # every hook ran at every UNet call (CFG: one call per step)
        assert bytes_sent > 0 and _close(out, ref)  # and patch parallelism did run, exactly


def test_other_hooks_registered_after_pp_still_run():
    _pp_with_counting_hooks(counting_first=False)


def test_other_hooks_registered_before_pp_still_run():
    _pp_with_counting_hooks(counting_first=True)


@pytest.mark.parametrize("parallel, mode", [(False, "sync"), (True, "async")])
def test_encoder_propagation_composes_with_pp(parallel, mode):
    """EP's hook on conv_in runs under PP's band layer (sync: exact); parallel decoding's larger batch runs async."""
    import copy

    import fastdiff
    from fastdiff.hooks import EncoderPropagationConfig

    pipe = worker.sd_pipeline()
    ep = EncoderPropagationConfig(key_steps=[0, 2], parallel=parallel)
    pp = PatchParallelConfig(mode=mode, warmup_steps=1, split_cfg=False)

    def run(p):
        return p("a red cube", generator=torch.Generator().manual_seed(0), num_inference_steps=4, height=64,
                 width=64, output_type="latent").images

    def body(rank, hub, replica):
        with fastdiff.apply(replica, pp, ep, group=worker.thread_comm(hub, rank)):
            return run(replica)

    outs = _on_ranks(2, [copy.deepcopy(pipe) for _ in range(2)], body)
    assert torch.equal(outs[0], outs[1])
    if mode == "sync":
        with fastdiff.apply(pipe, ep):
            assert _close(outs[0], run(pipe))


def test_ranks_started_from_different_noise_fail_on_every_rank_before_the_first_exchange():
    """A rank-dependent seed gives each rank other latents: every rank refuses, naming the fix; same seeds run."""
    import copy

    from fastdiff.parallel import disable_patch_parallel, enable_patch_parallel

    pipe = worker.reference_pipeline()
    kwargs = dict(class_labels=[3], num_inference_steps=2, output_type="pt")

    def body(seed_of_rank):
        def run(rank, hub, replica):
            config = PatchParallelConfig(mode="sync", split_cfg=False)
            state = enable_patch_parallel(replica, config, group=worker.thread_comm(hub, rank))
            try:
                replica(generator=torch.Generator().manual_seed(seed_of_rank(rank)), **kwargs)
                return None, state.comm.bytes_by_step()
            except ValueError as err:
                return str(err), state.comm.bytes_by_step()
            finally:
                disable_patch_parallel(replica)
        return _on_ranks(2, [copy.deepcopy(pipe) for _ in range(2)], run)

    for rank, (error, sent) in enumerate(body(lambda rank: rank)):
        assert error is not None and f"rank {rank}/2: the latents differ" in error and "same generator seed" in error
        assert "\n" not in error and not sent  # refused before any activation was exchanged
    assert all(error is None for error, _ in body(lambda rank: 7))
