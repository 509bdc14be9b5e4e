"""Seeded, sharded, resumable generation: 1 vs 2 gloo processes, kill-and-rerun, methods vs diffusers directly."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from fastdiff.eval import generate as G
from fastdiff.eval.methods import MethodSpec, method_from_dict

ROOT = Path(__file__).resolve().parents[1]

# A sweep on the reference architecture with random weights (trained weights are not needed here).
WORKER = textwrap.dedent(
    """
    import sys, time
    from diffusers import DDIMScheduler
    from fastdiff.eval.methods import MethodSpec
    from fastdiff.eval.sweep import SweepConfig, run_sweep
    from fastdiff.models.pipeline import ReferencePipeline
    from fastdiff.models.weights import SCHEDULER_CONFIG
    from fastdiff.models.unet import build_reference_unet


    def sweep(out, slow, reference):
        pipe = ReferencePipeline(unet=build_reference_unet(0).eval(), scheduler=DDIMScheduler(**SCHEDULER_CONFIG))
        pipe.set_progress_bar_config(disable=True)

        def pause(pipe, i, t, kwargs):
            time.sleep(slow)
            return kwargs

        methods = [
            MethodSpec(name="DDIM-3", steps=3),
            MethodSpec(name="DPM-2", scheduler="DPMSolverMultistepScheduler", steps=2),
        ]
        config = SweepConfig(
            methods=methods, n=8, batch_size=2, extractors=["pixels"], reference=reference,
            pipe_kwargs={"callback_on_step_end": pause} if slow else {},
        )
        return run_sweep(config, out, pipe=pipe, progress=False)


    if __name__ == "__main__":
        sweep(sys.argv[1], float(sys.argv[2]), sys.argv[3])
    """
)


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


def _in_process(root: Path, out: Path) -> list[dict]:
    """Run the worker's sweep in this process, single-threaded like each torchrun worker."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("eval_worker", root / "worker.py")
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return worker.sweep(str(out), 0.0, str(root / "ref"))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The worker script, a tiny reference folder, and one uninterrupted single-process sweep."""
    root = tmp_path_factory.mktemp("sweeps")
    (root / "worker.py").write_text(WORKER)
    rng = np.random.default_rng(0)
    (root / "ref").mkdir()
    for i in range(12):
        PIL.Image.fromarray(rng.integers(0, 256, (32, 32), np.uint8)).save(root / "ref" / f"{i:06d}.png")
    _in_process(root, root / "single")
    return root


def _rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]


def _pixels(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(PIL.Image.open(p)) for p in sorted(folder.glob("*.png"))]).astype(int)


# Socket-level failures of the launcher or gloo (not of the code under test); such a launch is retried once.
LAUNCH_ERRORS = ("Connection refused", "Connection reset", "Address already in use", "rendezvous", "Timed out")


def _torchrun(cmd: list[str]) -> None:
    for attempt in (1, 2):
        proc = subprocess.run(cmd, env={**_env(), "GLOO_SOCKET_IFNAME": "lo"}, cwd=ROOT, timeout=300,
                              capture_output=True, text=True)  # fmt: skip
        if proc.returncode == 0:
            return
        if attempt == 2 or not any(e in proc.stderr for e in LAUNCH_ERRORS):
            break
    pytest.fail(f"torchrun exited with {proc.returncode}:\n{proc.stderr[-4000:]}")


QUALITY_KEYS = ("fd_pixels", "kid_pixels", "kid_pixels_std", "n_pixels", "nfe", "unet_calls", "n")


@pytest.mark.slow
@pytest.mark.xdist_group("eval_generate_workdir")  # one worker builds the shared workdir
def test_one_vs_two_gloo_processes_identical(workdir):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(workdir / "worker.py"),
        str(workdir / "double"),
        "0",
        str(workdir / "ref"),
    ]
    _torchrun(cmd)
    for method in ("DDIM-3", "DPM-2"):
        a, b = _pixels(workdir / "single" / "images" / method), _pixels(workdir / "double" / "images" / method)
        assert a.shape == b.shape == (8, 32, 32)
        # fixed chunks per batch: the same batches run in both launches, so the PNGs are bit-identical
        np.testing.assert_array_equal(a, b)
        records = [json.loads((workdir / w / "images" / method / "generation.json").read_text())
                   for w in ("single", "double")]
        assert [r["torch_threads"] for r in records] == [1, 1]  # the condition, recorded with the images
    single, double = _rows(workdir / "single"), _rows(workdir / "double")
    assert [r["world_size"] for r in double] == [2, 2] and [r["world_size"] for r in single] == [1, 1]
    for r1, r2 in zip(single, double):
        # identical PNGs; features gathered in another order may round differently (issue bound: FD to 1e-4)
        assert {k: r2[k] for k in QUALITY_KEYS} == pytest.approx({k: r1[k] for k in QUALITY_KEYS}, rel=1e-6)


@pytest.mark.slow
@pytest.mark.xdist_group("eval_generate_workdir")  # one worker builds the shared workdir
def test_kill_midway_then_rerun_equals_uninterrupted(workdir):
    out = workdir / "killed"
    cmd = [sys.executable, str(workdir / "worker.py"), str(out), "0.15", str(workdir / "ref")]
    proc = subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / "images" / "DDIM-3"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(first.glob("*.png"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(first.glob("*.png"))
    assert 3 <= len(done) < 8 and not (out / "results.jsonl").exists()
    # corrupt one finished image: the rerun must notice and rewrite it
    done[0].write_bytes(done[0].read_bytes()[:20])
    kept = {p.name: p.stat().st_mtime_ns for p in done[1:]}
    _in_process(workdir, out)
    for p_name, mtime in kept.items():  # only the corrupt and the missing files are written again
        assert (first / p_name).stat().st_mtime_ns == mtime
    for method in ("DDIM-3", "DPM-2"):
        np.testing.assert_array_equal(_pixels(out / "images" / method), _pixels(workdir / "single" / "images" / method))
    for r1, r2 in zip(_rows(workdir / "single"), _rows(out)):
        assert {k: r1[k] for k in QUALITY_KEYS} == {k: r2[k] for k in QUALITY_KEYS}


# -- in-process checks on a random-weight reference pipeline ---------------------------------------------
@pytest.fixture(scope="module")
def pipe():
    from diffusers import DDIMScheduler

    from fastdiff.models.pipeline import ReferencePipeline
    from fastdiff.models.unet import build_reference_unet
    from fastdiff.models.weights import SCHEDULER_CONFIG

    p = ReferencePipeline(unet=build_reference_unet(0).eval(), scheduler=DDIMScheduler(**SCHEDULER_CONFIG))
    p.set_progress_bar_config(disable=True)
    return p


def _direct(pipe, scheduler, seeds, **kwargs) -> np.ndarray:
    """The same images through diffusers directly: swap the scheduler by hand, one generator per image."""
    original = pipe.scheduler
    pipe.scheduler = scheduler.from_config(original.config)
    try:
        out = pipe(
            class_labels=[i % 10 for i in seeds],
            generator=[torch.Generator().manual_seed(s) for s in seeds],
            output_type="pil",
            **kwargs,
        )
    finally:
        pipe.scheduler = original
    return np.stack([np.asarray(im) for im in out.images]).astype(int)


def test_generated_images_equal_direct_diffusers_calls(pipe, tmp_path):
    from diffusers import DPMSolverMultistepScheduler

    method = MethodSpec(name="dpm", scheduler="DPMSolverMultistepScheduler", steps=4, guidance=3.0)
    result = G.generate_images(pipe, method, tmp_path / "a", n=3, base_seed=10, batch_size=3, progress=False)
    counts = (result.computed, result.written, result.nfe, result.unet_calls, result.unet_rows_per_image)
    assert counts == (3, 3, 4, 4, 8)  # with CFG the UNet sees 2 rows per image and step
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"  # restored
    assert json.loads((tmp_path / "a" / "generation.json").read_text())["n"] == 3  # `eval fid` checks it
    expected = _direct(pipe, DPMSolverMultistepScheduler, [10, 11, 12], num_inference_steps=4, guidance_scale=3.0)
    np.testing.assert_array_equal(_pixels(tmp_path / "a"), expected)


def test_sample_images_in_memory_equal_the_written_pngs(pipe, tmp_path):
    """Benchmarks score `sample_images` tensors: the same seeds, labels and batches as the PNGs."""
    method = MethodSpec(name="dpm", scheduler="DPMSolverMultistepScheduler", steps=4, guidance=3.0)
    G.generate_images(pipe, method, tmp_path / "a", n=5, base_seed=7, batch_size=2, progress=False)
    samples = G.sample_images(pipe, method, n=5, base_seed=7, batch_size=2)
    assert samples.images.shape == (5, 1, 32, 32) and samples.unet_calls == 3 * 4 and samples.unet_rows == 5 * 4 * 2
    pixels = (samples.images.clamp(0, 1) * 255).round().to(torch.uint8).numpy()[:, 0].astype(int)
    np.testing.assert_array_equal(pixels, _pixels(tmp_path / "a"))
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    with pytest.raises(ValueError, match="n and batch_size"):
        G.sample_images(pipe, method, n=0)


def test_sample_images_latents_and_unconditional(pipe):
    """Latents instead of images, and pipe_kwargs that replace the label i % 10 (null label: unconditional)."""
    from fastdiff.models.unet import decode

    method = MethodSpec(name="ddim", steps=3, guidance=1.0)  # the fixture's own scheduler: no swap needed
    images = G.sample_images(pipe, method, n=3, base_seed=4, batch_size=2).images
    latents = G.sample_images(pipe, method, n=3, base_seed=4, batch_size=2, output_type="latent").images
    assert latents.shape == (3, 4, 16, 16)
    torch.testing.assert_close(decode(latents), images)
    free = G.sample_images(pipe, method, n=2, base_seed=4, batch_size=2, pipe_kwargs={"class_labels": None})
    direct = pipe(generator=[torch.Generator().manual_seed(s) for s in (4, 5)], num_inference_steps=3,
                  guidance_scale=1.0, output_type="pt").images  # class_labels None: the null label
    assert torch.equal(free.images, direct) and not torch.equal(free.images, images[:2])
    with pytest.raises(ValueError, match="output_type"):
        G.sample_images(pipe, method, n=1, output_type="pil")


def test_sample_images_svdd_equals_svdd_sample(pipe):
    """What bench_svdd reads from an SVDD method's `sample_images`: svdd_sample's images, its NFE as denoiser rows
    per image, and its final rewards by re-scoring the images; reward_args may hold objects (a classifier)."""
    from fastdiff.guidance import SVDDConfig, rewards, svdd_sample
    from fastdiff.models.classifier import DigitClassifier

    clf = DigitClassifier().eval().requires_grad_(False)
    reward = rewards.ClassifierReward(7, classifier=clf)
    svdd = {"reward": "ClassifierReward", "reward_args": {"target_class": 7, "classifier": clf},
            "num_candidates": 2, "show_progress": False}
    method = MethodSpec(name="svdd", steps=3, eta=1.0, guidance=1.0, svdd=svdd)
    samples = G.sample_images(pipe, method, n=2, batch_size=2)
    out = svdd_sample(pipe, reward, SVDDConfig(num_candidates=2, show_progress=False), class_labels=[0, 1],
                      generator=[torch.Generator().manual_seed(s) for s in (0, 1)], num_inference_steps=3,
                      eta=1.0, guidance_scale=1.0)
    assert torch.equal(samples.images, out.images)
    assert samples.unet_rows / 2 == out.nfe == 1 + (3 - 1) * 2
    torch.testing.assert_close(reward(samples.images), out.rewards)


def test_explicit_timesteps_and_schedule_file(pipe, tmp_path):
    from diffusers import DPMSolverMultistepScheduler

    ts = [999, 700, 400, 100]
    (tmp_path / "schedule.json").write_text(json.dumps({"timesteps": ts}))
    expected = _direct(pipe, DPMSolverMultistepScheduler, [0, 1], timesteps=ts)
    for key, value in (("timesteps", ts), ("schedule", str(tmp_path / "schedule.json"))):
        method = method_from_dict({"name": key, "scheduler": "DPMSolverMultistepScheduler", key: value})
        assert method.num_steps() == 4
        G.generate_images(pipe, method, tmp_path / key, n=2, base_seed=0, batch_size=2, progress=False)
        np.testing.assert_array_equal(_pixels(tmp_path / key), expected)
    with pytest.raises(ValueError, match="takes no custom timesteps"):
        MethodSpec(name="x", scheduler="DDIMScheduler", timesteps=ts)


def test_image_depends_on_seed_not_batch(pipe, tmp_path):
    method = MethodSpec(name="ddim", steps=3)
    G.generate_images(pipe, method, tmp_path / "b4", n=4, batch_size=4, progress=False)
    G.generate_images(pipe, method, tmp_path / "b1", n=4, batch_size=1, progress=False)
    a, b = _pixels(tmp_path / "b4"), _pixels(tmp_path / "b1")
    # another batch size changes float round-off only: at most one grey level, on a few pixels (0.3% measured
    # with CFG 3.0 on random weights). Process count never changes batches: see the gloo test (bit-identical).
    assert np.abs(a - b).max() <= 1 and (a != b).mean() < 1e-2


def test_folder_of_another_method_is_rejected(pipe, tmp_path):
    G.generate_images(pipe, MethodSpec(name="x", steps=2), tmp_path, n=2, batch_size=2, progress=False)
    with pytest.raises(ValueError, match="another method"):
        G.generate_images(pipe, MethodSpec(name="x", steps=3), tmp_path, n=2, batch_size=2, progress=False)


def test_folder_made_with_other_pipe_kwargs_is_rejected(pipe, tmp_path):
    """pipe_kwargs can replace the label: images made with others must not be mixed in on resume."""
    method = MethodSpec(name="x", steps=2)
    G.generate_images(pipe, method, tmp_path, n=2, batch_size=2, pipe_kwargs={"class_labels": None}, progress=False)
    for other in ({}, {"class_labels": [1, 1]}):
        with pytest.raises(ValueError, match="pipe_kwargs"):
            G.generate_images(pipe, method, tmp_path, n=2, batch_size=2, pipe_kwargs=other, progress=False)
    G.generate_images(pipe, method, tmp_path, n=2, batch_size=2, pipe_kwargs={"class_labels": None}, progress=False)


def test_folder_of_another_model_is_rejected(pipe, tmp_path):
    """Same method, changed weights (e.g. a retrained model): resuming must not reuse the old images."""
    import copy

    method = MethodSpec(name="x", steps=2)
    G.generate_images(pipe, method, tmp_path, n=2, batch_size=2, progress=False)
    G.generate_images(pipe, method, tmp_path, n=2, batch_size=2, progress=False)  # same model: resumes
    other = copy.deepcopy(pipe)
    with torch.no_grad():
        next(other.unet.parameters()).add_(1e-3)
    with pytest.raises(ValueError, match="another model"):
        G.generate_images(other, method, tmp_path, n=2, batch_size=2, progress=False)


def test_method_errors(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="unknown scheduler 'DDIMSchedular'.*DDIMScheduler"):
        MethodSpec(name="x", scheduler="DDIMSchedular", steps=10)
    with pytest.raises(ValueError, match="unknown key"):
        method_from_dict({"name": "x", "steps": 10, "stpes": 3})
    with pytest.raises(ValueError, match="exactly one of"):
        MethodSpec(name="x", steps=10, timesteps=[999, 500])
    with pytest.raises(ValueError, match="decreasing"):
        MethodSpec(name="x", timesteps=[10, 500])
    with pytest.raises(ValueError, match="does not exist"):
        MethodSpec(name="x", schedule=str(tmp_path / "nope.json"))
    with pytest.raises(ValueError, match="torchrun --nproc_per_node 2"):
        MethodSpec(name="x", steps=10, patch_parallel={"mode": "sync"})
    with pytest.raises(ValueError, match="parallel decoding"):
        MethodSpec(name="x", steps=10, encoder_propagation={"key_steps": 2, "parallel": True},
                   block_skip={"skips": [[1, 0]]})



@pytest.mark.parametrize("options, message", [
    ({"steps": True}, "steps must be a positive int, got True"),
    ({"steps": 0}, "steps must be a positive int, got 0"),
    ({"steps": 4, "guidance": "high"}, "guidance must be a number >= 0, got 'high'"),
    ({"steps": 4, "eta": -0.5}, "eta must be a number >= 0"),
    ({"steps": 4, "scheduler": "DDPMScheduler", "eta": 0.5}, "DDPMScheduler.step takes no eta"),
    ({"steps": 4, "scheduler": "DPMSolverMultistepScheduler", "scheduler_kwargs": {"solver_ordr": 2}},
     "no option 'solver_ordr'; did you mean 'solver_order'"),
    ({"steps": 4, "scheduler": "DPMSolverPlusPlusScheduler", "scheduler_kwargs": {"use_karas_sigmas": True}},
     "did you mean 'use_karras_sigmas'"),
])
def test_method_values_checked_when_read(options, message):
    """Values that diffusers would silently ignore or misread (a typo in scheduler_kwargs is dropped by
    `from_config`; `steps = true` is 1 step; DDPM ignores eta) are refused when the method is read."""
    with pytest.raises(ValueError, match=re.escape(message)):
        method_from_dict({"name": "x", **options})


@pytest.mark.parametrize("svdd, message", [
    ({"reward": "ClassifierReward"}, "missing 1 required positional argument: 'target_class'"),
    ({"reward": "ClassifierReward", "reward_args": {"target_class": 12}}, "target_class must be an int digit 0-9"),
    ({"reward": "jpeg_compressibility", "reward_args": {"qualty": 50}}, "unexpected keyword argument 'qualty'"),
    ({"reward": "validate_reward"}, "is not a reward; use jpeg_compressibility, ClassifierReward"),
    ({"reward": "no_such_module:f"}, "cannot import 'no_such_module'"),
    ({"reward": "ClassifierReward", "reward_args": 7}, "reward_args must be a table"),
])
def test_svdd_reward_errors_when_read(svdd, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        method_from_dict({"name": "x", "steps": 4, "svdd": svdd})


def test_svdd_reward_args_and_import_path():
    """`reward_args` construct a reward class or bind a reward function; "module:function" imports one."""
    from fastdiff.guidance.rewards import ClassifierReward, jpeg_compressibility

    def reward(svdd):
        return method_from_dict({"name": "x", "steps": 4, "svdd": svdd})._accelerator_config("svdd")[0]

    r = reward({"reward": "ClassifierReward", "reward_args": {"target_class": 7}})
    assert isinstance(r, ClassifierReward) and r.target_class == 7
    images = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    bound = reward({"reward": "jpeg_compressibility", "reward_args": {"quality": 40}})
    assert torch.equal(bound(images), jpeg_compressibility(images, quality=40))
    assert not torch.equal(bound(images), jpeg_compressibility(images))
    assert reward({"reward": "fastdiff.guidance.rewards:jpeg_compressibility"}) is jpeg_compressibility


def test_sample_cli_steps_zero_is_refused(tmp_path, capsys):
    from fastdiff.cli import main

    assert main(["sample", "-n", "1", "--steps", "0", "--out", str(tmp_path / "s")]) == 2
    assert "steps must be a positive int, got 0" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_n_and_batch_errors(pipe, tmp_path):
    with pytest.raises(ValueError, match="n and batch_size"):
        G.generate_images(pipe, MethodSpec(name="x", steps=2), tmp_path, n=0)
    with pytest.raises(ValueError, match="N = 2"):
        G.sharded_features(tmp_path, 1, "pixels")


def test_composes_with_encoder_propagation(pipe, tmp_path):
    """A method with encoder propagation runs through fastdiff.hooks and leaves the UNet as it found it."""
    plain = MethodSpec(name="plain", steps=4)
    G.generate_images(pipe, plain, tmp_path / "before", n=2, batch_size=2, progress=False)
    fast = MethodSpec(name="ep", steps=4, encoder_propagation={"key_steps": [0, 2]})
    result = G.generate_images(pipe, fast, tmp_path / "ep", n=2, batch_size=2, progress=False)
    assert result.written == 2
    G.generate_images(pipe, plain, tmp_path / "after", n=2, batch_size=2, progress=False)
    np.testing.assert_array_equal(_pixels(tmp_path / "before"), _pixels(tmp_path / "after"))


def test_composes_with_block_skip(pipe, tmp_path):
    """A method with AutoDiffusion layer skips changes the images through fastdiff.hooks and is undone after."""
    plain = MethodSpec(name="plain", steps=4)
    G.generate_images(pipe, plain, tmp_path / "before", n=2, batch_size=2, progress=False)
    skipping = MethodSpec(name="skip", steps=4, block_skip={"skips": [[1, 0], [2, 3]]})
    G.generate_images(pipe, skipping, tmp_path / "skip", n=2, batch_size=2, progress=False)
    G.generate_images(pipe, plain, tmp_path / "after", n=2, batch_size=2, progress=False)
    assert not np.array_equal(_pixels(tmp_path / "before"), _pixels(tmp_path / "skip"))
    np.testing.assert_array_equal(_pixels(tmp_path / "before"), _pixels(tmp_path / "after"))
    with pytest.raises(ValueError, match="bad block_skip options"):
        MethodSpec(name="x", steps=4, block_skip={"skip": [[1, 0]]})
    with pytest.raises(ValueError, match="parallel=False"):
        MethodSpec(name="x", steps=4, block_skip={"skips": [[1, 0]]}, encoder_propagation={"key_steps": 2,
                                                                                          "parallel": True})


def test_composes_with_svdd(pipe, tmp_path):
    """An SVDD method goes through fastdiff.guidance.svdd_sample; the harness counts its extra denoiser rows."""
    svdd = {"reward": "jpeg_compressibility", "num_candidates": 1, "show_progress": False}
    one = MethodSpec(name="svdd1", scheduler="DDPMScheduler", steps=3, guidance=1.0, svdd=svdd)
    first = G.generate_images(pipe, one, tmp_path / "svdd1", n=2, batch_size=2, progress=False)
    many = MethodSpec(
        name="svdd3", scheduler="DDPMScheduler", steps=3, guidance=1.0, svdd={**svdd, "num_candidates": 3}
    )
    result = G.generate_images(pipe, many, tmp_path / "svdd3", n=2, batch_size=2, progress=False)
    assert first.written == result.written == 2
    assert result.unet_rows_per_image > first.unet_rows_per_image  # M = 3 candidates cost more denoiser rows


def test_sample_cli_writes_seeded_images(tmp_path, capsys):
    """`fastdiff sample` on the shipped reference model equals the pipeline called directly."""
    from fastdiff.cli import main
    from fastdiff.models import load_reference_pipeline  # the shipped weights: missing ones fail here
    args = ["sample", "-n", "3", "--steps", "2", "--seed", "5", "--batch-size", "3", "--out", str(tmp_path / "s")]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["written"] == 3
    from diffusers import DDIMScheduler

    ref = load_reference_pipeline()
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = DDIMScheduler.from_config(ref.scheduler.config)
    out = ref(
        class_labels=[0, 1, 2],
        num_inference_steps=2,
        output_type="pil",
        generator=[torch.Generator().manual_seed(s) for s in (5, 6, 7)],
    )  # label i % 10, seed base + i
    np.testing.assert_array_equal(_pixels(tmp_path / "s"), np.stack([np.asarray(im) for im in out.images]))
    assert main(["sample", "--scheduler", "Nope", "--out", str(tmp_path / "x")]) == 2
    assert "unknown scheduler" in capsys.readouterr().err
