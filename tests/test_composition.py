"""Composition matrix: every pair of accelerators and the full stacks, exact against a reference or refused up front.

References (none of them written for the stack under test): the same stack applied in another order or all at
once; parallel decoding against sequential decoding; SVDD with M = 1 against the plain pipeline call; chunked
SVDD (`max_batch`) against unchunked; a fresh setup against a scheduler swapped after applying; an
encoder-propagation run whose every step is a key step against no encoder propagation; and (below, under
torchrun) patch parallelism on 2 gloo ranks against the same stack in one process.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler

import fastdiff
from fastdiff.guidance import SVDDConfig, svdd_sample
from fastdiff.hooks import BlockSkipConfig, EncoderPropagationConfig
from fastdiff.parallel import PatchParallelConfig
from fastdiff.schedulers import DPMSolverPlusPlusScheduler

HERE = Path(__file__).parent
_spec = importlib.util.spec_from_file_location("composition_cases", HERE / "composition_cases.py")
cases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cases)

pytestmark = pytest.mark.filterwarnings("ignore:There are modules", "ignore:SVDD")
KINDS = ("reference", "tiny_sd")
GUIDANCE = (1.0, 3.0)


@pytest.fixture(scope="module")
def pipes():
    return {kind: cases.pipeline(kind) for kind in KINDS}


@pytest.fixture(scope="module")
def pipes64():
    """float64 copies: chunked and whole batches then agree far below 1e-5 unless the maths differs (in fp32 the
    same chunking with no accelerator at all already differs by up to 7e-6 on the reference model at guidance 3)."""
    return {kind: cases.pipeline(kind).to(dtype=torch.float64) for kind in KINDS}


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    assert a.shape == b.shape
    diff = (a - b).abs().max().item()
    assert diff <= tol, f"max |diff| {diff:.3g} > {tol}"


def _fastdiff_hooks(unet) -> list[str]:
    return [name for m in unet.modules() if hasattr(m, "_diffusers_hook")
            for name in m._diffusers_hook._hook_order if name.startswith("fastdiff")]


class _Calls:
    """Counts UNet computations: a plain torch pre-hook on conv_in (the first layer every UNet call runs)."""

    def __init__(self, unet) -> None:
        self.n = 0
        self.handle = unet.conv_in.register_forward_pre_hook(self._count)

    def _count(self, module, args) -> None:
        self.n += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


# --- pairs of hooks: the stacking order is fastdiff's, not the user's ------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("guidance", GUIDANCE)
@pytest.mark.parametrize("dpm", [(), ("dpm",)])
@pytest.mark.parametrize("ep", ["ep", "ep_shallow", "ep_deep"])
def test_hooks_do_not_depend_on_the_order_applied(pipes, kind, guidance, dpm, ep):
    pipe = pipes[kind]
    one = cases.run(pipe, kind, guidance, (*dpm, ep, "block_skip"))
    other = cases.run(pipe, kind, guidance, (*dpm, "block_skip", ep))
    assert torch.equal(one, other)
    plain = cases.run(pipe, kind, guidance, dpm)
    assert not torch.equal(one, plain)  # both accelerators really acted
    assert not torch.equal(one, cases.run(pipe, kind, guidance, (*dpm, ep)))
    assert _fastdiff_hooks(pipe.unet) == []


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("guidance", GUIDANCE)
def test_exact_references(pipes, kind, guidance):
    pipe = pipes[kind]
    for dpm in ((), ("dpm",)):
        # parallel decoding computes the same decoders as sequential decoding, batched
        _close(cases.run(pipe, kind, guidance, (*dpm, "ep_parallel")), cases.run(pipe, kind, guidance, (*dpm, "ep")))
        # every step a key step: encoder propagation changes nothing, whatever it is stacked with
        for other in ((), ("block_skip",)):
            plain = cases.run(pipe, kind, guidance, (*dpm, *other))
            for ep in ("ep_all_keys", "ep_shallow_all_keys", "ep_deep_all_keys"):
                assert torch.equal(cases.run(pipe, kind, guidance, (*dpm, *other, ep)), plain)


# --- SVDD on top of every hook ------------------------------------------------------------------------------


HOOK_SETS = [(), ("ep",), ("ep_parallel",), ("block_skip",), ("ep", "block_skip"), ("ep_shallow", "block_skip"),
             ("ep_deep", "block_skip")]
# the whole matrix on the reference model; tiny SD (a real StableDiffusionPipeline, VAE-decoded rewards) at w = 3
SVDD_CASES = [("reference", w, hooks) for w in GUIDANCE for hooks in HOOK_SETS]
SVDD_CASES += [("tiny_sd", 3.0, hooks) for hooks in (("ep",), ("block_skip",))]
SVDD_IDS = [f"{kind}-w{w:g}-{'+'.join(hooks) or 'none'}" for kind, w, hooks in SVDD_CASES]


@pytest.mark.parametrize("kind, guidance, hooks", SVDD_CASES, ids=SVDD_IDS)
def test_svdd_with_one_candidate_is_the_pipeline(pipes, pipes64, kind, guidance, hooks):
    for dpm in ((), ("dpm",)):
        plain = cases.run(pipes[kind], kind, guidance, (*dpm, *hooks, "sde"))
        _close(cases.run(pipes[kind], kind, guidance, (*dpm, *hooks, "svdd1")), plain, 1e-6)
        plain = cases.run(pipes64[kind], kind, guidance, (*dpm, *hooks, "sde"))
        _close(cases.run(pipes64[kind], kind, guidance, (*dpm, *hooks, "svdd1_chunked")), plain)


@pytest.mark.parametrize("kind, guidance, hooks", SVDD_CASES, ids=SVDD_IDS)
def test_svdd_chunking_equals_unchunked(pipes64, kind, guidance, hooks):
    """max_batch cuts every UNet call into chunks of rows; each chunk keeps its own caches and steps."""
    pipe = pipes64[kind]
    variant = "svdd3_mc" if any(h.startswith("ep") for h in hooks) else "svdd3"
    for dpm in ((), ("dpm",)):
        whole = cases.run(pipe, kind, guidance, (*dpm, *hooks, variant))
        _close(cases.run(pipe, kind, guidance, (*dpm, *hooks, f"{variant}_chunked")), whole)
        assert not torch.equal(whole, cases.run(pipe, kind, guidance, (*dpm, *hooks, "svdd1")))  # M = 3 steered


# --- refusals: a ValueError naming the fix, before the first UNet call --------------------------------------


def test_refusals_come_before_any_unet_call(pipes):
    pipe = pipes["reference"]
    kwargs = cases.call_kwargs("reference", 3.0)
    with _Calls(pipe.unet) as calls:
        with pytest.raises(ValueError, match="parallel=False"):
            fastdiff.apply(pipe, cases.HOOKS["ep_parallel"], cases.HOOKS["block_skip"])
        with pytest.raises(ValueError, match="recomputed layers read the current latent"):
            EncoderPropagationConfig(key_steps=[0, 1, 3], parallel=True, recompute_shallow=1)
        assert _fastdiff_hooks(pipe.unet) == []
        with fastdiff.apply(pipe, cases.HOOKS["block_skip"]):
            with pytest.raises(ValueError, match="parallel=False"):
                fastdiff.apply(pipe, cases.HOOKS["ep_parallel"])
            with pytest.raises(ValueError, match="already applied"):
                fastdiff.apply(pipe, BlockSkipConfig(skips=[(0, 0)]))
        with pytest.raises(ValueError, match="accelerator configs"):
            fastdiff.apply(pipe, SVDDConfig())
        with pytest.raises(ValueError, match="torchrun --nproc_per_node"):
            fastdiff.apply(pipe, PatchParallelConfig(mode="sync"))
        assert _fastdiff_hooks(pipe.unet) == []
        with fastdiff.apply(pipe, cases.HOOKS["ep"]):
            with pytest.raises(ValueError, match="variant='mc'"):
                svdd_sample(pipe, cases._brightness, SVDDConfig(num_candidates=3, show_progress=False),
                            num_inference_steps=4, **kwargs)
            with pytest.raises(ValueError, match="out of range for 2 steps"):
                pipe(num_inference_steps=2, **kwargs)
        with fastdiff.apply(pipe, BlockSkipConfig(skips=[(5, 0)])):
            with pytest.raises(ValueError, match=r"skip steps \[5\] are out of range for 3 steps"):
                pipe(num_inference_steps=3, **kwargs)
        assert calls.n == 0
    assert _fastdiff_hooks(pipe.unet) == []


# --- nothing remembers the scheduler; interrupted calls; removal ------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_scheduler_swapped_after_applying(pipes, kind):
    pipe = pipes[kind]
    original = pipe.scheduler
    kwargs = {**cases.call_kwargs(kind, 3.0), "timesteps": cases.TIMESTEPS, "output_type": "pt"}
    hooks = (cases.HOOKS["ep"], cases.HOOKS["block_skip"])
    try:
        pipe.scheduler = DPMSolverPlusPlusScheduler.from_config(original.config)
        with fastdiff.apply(pipe, *hooks):
            fresh = pipe(**kwargs).images
        pipe.scheduler = DDIMScheduler.from_config(original.config)
        with fastdiff.apply(pipe, *hooks):
            pipe(num_inference_steps=9, **cases.call_kwargs(kind, 3.0))
            pipe.scheduler = DPMSolverPlusPlusScheduler.from_config(original.config)
            for _ in range(2):
                kwargs["generator"] = cases.call_kwargs(kind, 3.0)["generator"]
                assert torch.equal(pipe(**kwargs).images, fresh)
    finally:
        pipe.scheduler = original


@pytest.mark.parametrize("kind", KINDS)
def test_an_interrupted_call_leaks_nothing_into_the_next(pipes, kind):
    pipe = pipes[kind]

    def stop(p, i, t, kw):
        if i == 2:
            raise KeyboardInterrupt
        return kw

    members = ("dpm", "ep_parallel")
    fresh = cases.run(pipe, kind, 3.0, members)
    original = pipe.scheduler
    steps = cases.set_scheduler(pipe, members, original.config)
    try:
        with fastdiff.apply(pipe, cases.HOOKS["ep_parallel"]):
            with pytest.raises(KeyboardInterrupt):
                pipe(**cases.call_kwargs(kind, 3.0), **steps, callback_on_step_end=stop)
            again = pipe(**cases.call_kwargs(kind, 3.0), **steps, output_type="pt").images
    finally:
        pipe.scheduler = original
    assert torch.equal(again, fresh)


def test_remove_restores_the_pipeline_bit_identically(pipes):
    pipe = pipes["tiny_sd"]
    plain = cases.run(pipe, "tiny_sd", 3.0, ("dpm",))
    handle = fastdiff.apply(pipe, EncoderPropagationConfig(key_steps=2), cases.HOOKS["block_skip"])
    assert sorted(fastdiff.compose.attachments(pipe)) == ["block_skip", "encoder_propagation"]
    fastdiff.remove(pipe, "block_skip")
    assert sorted(fastdiff.compose.attachments(pipe)) == ["encoder_propagation"]
    handle.remove()
    assert _fastdiff_hooks(pipe.unet) == [] and fastdiff.compose.attachments(pipe) == {}
    assert torch.equal(cases.run(pipe, "tiny_sd", 3.0, ("dpm",)), plain)


# --- patch parallelism on 2 gloo ranks against one process ---------------------------------------------------


LAUNCH_ERRORS = ("Connection refused", "Connection reset", "Address already in use", "rendezvous", "Timed out")


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "GLOO_SOCKET_IFNAME": "lo",
            "PYTHONWARNINGS": "ignore"}


def _torchrun(*args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "composition_worker.py"), *args]
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, *args: str) -> None:
    """Wait for a torchrun launch; retry once on a socket-level launch error; fail with its stderr otherwise."""
    _, err = proc.communicate(timeout=900)
    if proc.returncode != 0 and any(e in err for e in LAUNCH_ERRORS):
        _, err = (proc := _torchrun(*args)).communicate(timeout=900)
    assert proc.returncode == 0, f"torchrun exited with {proc.returncode}:\n{err[-4000:]}"


@pytest.fixture(scope="module")
def pp_matrix(tmp_path_factory):
    out = tmp_path_factory.mktemp("composition_pp")
    _finish(_torchrun(str(out), "matrix"), str(out), "matrix")
    return [torch.load(out / f"rank{r}.pt") for r in range(2)], torch.load(out / "single.pt")


@pytest.mark.slow
def test_patch_parallel_stacks_equal_one_process(pp_matrix):
    """PP sync, split_cfg off and on, applied before or after the hooks: the images of the stack in one process."""
    ranks, single = pp_matrix
    worst, count = 0.0, 0
    for key, images in ranks[0].items():
        kind, guidance, members, split_cfg, pp_first, mode = key
        assert torch.equal(images, ranks[1][key]), key  # every rank holds the same images
        assert torch.isfinite(images).all(), key
        if mode == "sync":
            diff = (images - single[kind, guidance, members]).abs().max().item()
            assert diff <= 1e-5, (key, diff)
            worst, count = max(worst, diff), count + 1
    assert count >= 50  # the plan really ran both orders, both split_cfg settings, every stack


@pytest.mark.slow
def test_five_way_sweep_row_under_torchrun_equals_one_process_without_pp(tmp_path):
    import json

    import numpy as np
    import PIL.Image

    (tmp_path / "schedule.json").write_text(json.dumps({"timesteps": cases.TIMESTEPS}))
    proc = _torchrun(str(tmp_path / "pp"), "sweep")
    single = subprocess.run([sys.executable, str(HERE / "composition_worker.py"), str(tmp_path / "one"), "sweep"],
                            env=_env(), capture_output=True, text=True, timeout=900)
    assert single.returncode == 0, single.stderr[-4000:]
    _finish(proc, str(tmp_path / "pp"), "sweep")
    files = sorted(p.name for p in (tmp_path / "one" / "images").glob("*.png"))
    assert len(files) == 4 and files == sorted(p.name for p in (tmp_path / "pp" / "images").glob("*.png"))
    for name in files:
        a = np.asarray(PIL.Image.open(tmp_path / "one" / "images" / name))
        b = np.asarray(PIL.Image.open(tmp_path / "pp" / "images" / name))
        assert np.array_equal(a, b), name


def test_controlnet_pipeline_stack_follows_a_scheduler_swap():
    """ControlNet calls are not UNet calls: with EP (ControlNet at key steps only) + block skipping, applied before
    the scheduler swap, two calls equal a fresh setup, and the ControlNet ran at the key steps only."""
    from fastdiff.testing import tiny_controlnet_pipeline

    pipe = tiny_controlnet_pipeline()
    pipe.set_progress_bar_config(disable=True)
    control = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    original = pipe.scheduler
    runs = []
    pipe.controlnet.controlnet_cond_embedding.register_forward_hook(lambda *_: runs.append(1))

    def call():
        return pipe("a red cube", image=control, timesteps=cases.TIMESTEPS, height=64, width=64,
                    generator=torch.Generator().manual_seed(0), output_type="pt").images

    hooks = (cases.HOOKS["ep"], cases.HOOKS["block_skip"])
    pipe.scheduler = DPMSolverPlusPlusScheduler.from_config(original.config)
    with fastdiff.apply(pipe, *hooks):
        fresh = call()
    assert len(runs) == 3  # key steps 0, 1, 3 of 6
    pipe.scheduler = original
    with fastdiff.apply(pipe, *hooks):
        pipe("a red cube", image=control, num_inference_steps=9, height=64, width=64)
        pipe.scheduler = DPMSolverPlusPlusScheduler.from_config(original.config)
        runs.clear()
        assert torch.equal(call(), fresh) and torch.equal(call(), fresh)
    assert len(runs) == 6
