"""Sweeps and the `fastdiff eval` commands: TOML validation, outputs, and FD/KID against clean-fid end to end."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from fastdiff.cli import main
from fastdiff.eval import compute_stats, run_sweep
from fastdiff.eval.features import folder_features
from fastdiff.eval.methods import MethodSpec, method_from_dict
from fastdiff.eval.report import pareto_front
from fastdiff.eval.sweep import SweepConfig, load_sweep

ROOT = Path(__file__).resolve().parents[1]


def _write_pngs(folder: Path, n: int, seed: int, size: int = 32, shift: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        arr = np.clip(rng.normal(128 + shift, 40, (size, size)), 0, 255).astype(np.uint8)
        PIL.Image.fromarray(arr).save(folder / f"{i:06d}.png")
    return folder


def test_reference_sweep_file_loads():
    config = load_sweep(ROOT / "eval" / "sweeps" / "reference.toml")
    names = [m.name for m in config.methods]
    required = {"DDPM-1000", *(f"DDIM-{k}" for k in (10, 20, 50, 100))}
    required |= {f"DPMSolverMultistep-{k}" for k in (5, 10, 20)}
    assert names[0] == "DDPM-1000" and required <= set(names) and len(set(names)) == len(names)
    assert config.model == "reference" and config.reference == "heldout"
    assert any(m.encoder_propagation for m in config.methods)  # accelerator rows join the sweep as they land
    assert {1000, 100, 50, 20, 10, 5} <= {m.num_steps() for m in config.methods}
    searched = [m for m in config.methods if m.schedule is not None]  # AutoDiffusion rows: committed schedule files
    assert searched and all(len(m.sampling_timesteps()) == m.num_steps() for m in searched)


BAD_SWEEPS = [
    ('[[methods]]\nname = "a"\nscheduler = "DDIMSchedular"\nsteps = 5\n', "unknown scheduler"),
    ('[[methods]]\nname = "a"\nsteps = 5\nguidence = 2.0\n', "unknown key"),
    ('[[methods]]\nname = "a"\nsteps = 5\n[[methods]]\nname = "a"\nsteps = 6\n', "unique"),
    ('[eval]\nn = 1\n[[methods]]\nname = "a"\nsteps = 5\n', "n must be an int >= 2"),
    ('[eval]\nextractors = ["vgg"]\n[[methods]]\nname = "a"\nsteps = 5\n', "unknown"),
    ('[evaluation]\nn = 4\n[[methods]]\nname = "a"\nsteps = 5\n', "unknown top-level"),
    ('[model]\nname = "some/model"\n[[methods]]\nname = "a"\nsteps = 5\n', "heldout"),
    ("title = 'x'\n", "at least one"),
    ('[model]\ndevice = "cuda:7"\n[[methods]]\nname = "a"\nsteps = 5\n', "CUDA is not available|cuda:7"),
    ('[[methods]]\nname = "a"\nsteps = true\n', "steps must be a positive int"),
    ('[[methods]]\nname = "a"\nsteps = 5\nguidance = "high"\n', "guidance must be a number"),
]


@pytest.mark.parametrize("text,message", BAD_SWEEPS)
def test_bad_sweep_files_are_rejected(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_sweep(path)


def test_cli_sweep_reports_errors(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text(BAD_SWEEPS[0][0])
    assert main(["eval", "sweep", str(path)]) == 2
    assert "unknown scheduler" in capsys.readouterr().err


@pytest.fixture(scope="module")
def pipe():
    from diffusers import DDIMScheduler

    from fastdiff.models.pipeline import ReferencePipeline
    from fastdiff.models.unet import build_reference_unet
    from fastdiff.models.weights import SCHEDULER_CONFIG

    p = ReferencePipeline(unet=build_reference_unet(0).eval(), scheduler=DDIMScheduler(**SCHEDULER_CONFIG))
    p.set_progress_bar_config(disable=True)
    return p


@pytest.mark.parametrize("method, message", [
    ({"scheduler": "DPMSolverMultistepScheduler", "timesteps": [1500, 500]}, "timesteps must lie in [0, 999]"),
    ({"scheduler": "DPMSolverPlusPlusScheduler", "steps": 4, "scheduler_kwargs": {"solver_order": 5}},
     "solver_order must be 1, 2 or 3"),
    ({"steps": 4, "encoder_propagation": {"key_steps": [0, 7]}}, "key steps [7] are out of range for 4 steps"),
    ({"steps": 4, "block_skip": {"skips": [[1, 99]]}}, "layer ids [99] are out of range"),
])
def test_model_dependent_errors_come_before_reference_stats(pipe, tmp_path, method, message):
    """Rows are checked against the model before reference statistics or images; the failed run leaves the
    output folder usable: the fixed sweep then runs into it."""
    ref = _write_pngs(tmp_path / "ref", 4, seed=0)
    good = MethodSpec(name="DDIM-2", steps=2)
    bad = SweepConfig(methods=[good, method_from_dict({"name": "bad", **method})], n=2, batch_size=2,
                      extractors=["pixels"], reference=str(ref), kid_subsets=2)
    with pytest.raises(ValueError, match=re.escape(message)):
        run_sweep(bad, tmp_path / "out", pipe=pipe, progress=False)
    assert not (tmp_path / "out").exists()
    fixed = SweepConfig(methods=[MethodSpec(name="bad", steps=2)], n=2, batch_size=2, extractors=["pixels"],
                        reference=str(ref), kid_subsets=2)
    assert run_sweep(fixed, tmp_path / "out", pipe=pipe, progress=False)[0]["n"] == 2


def test_a_run_that_failed_before_any_image_does_not_poison_its_folder(pipe, tmp_path):
    from fastdiff.eval.generate import generate_images

    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "generation.json").write_text(json.dumps({"method": {"name": "old"}, "n": 4}))  # a failed run's
    generate_images(pipe, MethodSpec(name="new", steps=2), folder, n=2, batch_size=2, progress=False)
    assert json.loads((folder / "generation.json").read_text())["method"]["name"] == "new"
    with pytest.raises(ValueError, match="another method"):  # with images there, the record protects them
        generate_images(pipe, MethodSpec(name="other", steps=2), folder, n=2, batch_size=2, progress=False)


def test_sweep_outputs_and_scores_equal_cleanfid(pipe, tmp_path):
    from cleanfid.fid import frechet_distance as cleanfid_fd
    from cleanfid.fid import kernel_distance as cleanfid_kid

    ref = _write_pngs(tmp_path / "ref", 20, seed=0)
    config = SweepConfig(
        methods=[MethodSpec(name="DDIM-2", steps=2, guidance=1.0),
                 MethodSpec(name="DPM/3", scheduler="DPMSolverMultistepScheduler", steps=3)],
        n=6, batch_size=3, extractors=["pixels"], reference=str(ref), kid_subsets=5,
    )  # fmt: skip
    seen = []  # on_row: each row as soon as it is written, while results.jsonl holds exactly the rows so far

    def on_row(row):
        seen.append((row["method"], len((tmp_path / "out" / "results.jsonl").read_text().splitlines())))

    rows = run_sweep(config, tmp_path / "out", pipe=pipe, progress=False, on_row=on_row)
    assert seen == [("DDIM-2", 1), ("DPM/3", 2)]
    out = tmp_path / "out"
    assert [json.loads(line)["method"] for line in (out / "results.jsonl").read_text().splitlines()] == [
        "DDIM-2",
        "DPM/3",
    ]
    assert "| DDIM-2 | 2 | 2 | 2 |" in (out / "results.md").read_text()
    with PIL.Image.open(out / "pareto.png") as im:
        assert im.size[0] > 300
    ref_feats, _ = folder_features(ref, "pixels")
    r = compute_stats(ref_feats)
    for row in rows:
        assert row["n"] == row["n_pixels"] == 6 and row["s_per_image"] > 0 and row["unet_calls"] == row["nfe"]
        feats, size = folder_features(row["images"], "pixels")
        assert size == (1, 32, 32) and len(feats) == 6
        g = compute_stats(feats)
        assert row["fd_pixels"] == pytest.approx(cleanfid_fd(g.mu, g.sigma, r.mu, r.sigma), rel=1e-6)
        np.random.seed(0)
        assert row["kid_pixels"] == pytest.approx(cleanfid_kid(feats, ref_feats, num_subsets=5), rel=1e-6)
    # a second run reuses every image and gives the same scores
    again = run_sweep(config, tmp_path / "out", pipe=pipe, progress=False)
    assert [a["fd_pixels"] for a in again] == [r["fd_pixels"] for r in rows]


def test_cli_ref_and_fid_equal_cleanfid_compute_fid(tmp_path, capsys):
    """`fastdiff eval ref` + `eval fid` on pixel features equal clean-fid's compute_fid with the same features."""
    from cleanfid import fid

    a, b = _write_pngs(tmp_path / "a", 40, seed=1), _write_pngs(tmp_path / "b", 50, seed=2, shift=10)
    stats = tmp_path / "b_stats.npz"
    assert main(["eval", "ref", str(b), "--extractor", "pixels", "--out", str(stats)]) == 0
    assert json.loads(stats.with_suffix(".json").read_text())["image_size"] == [1, 32, 32]
    capsys.readouterr()
    assert main(["eval", "fid", str(a), "--ref", str(stats), "--json"]) == 0
    ours = json.loads(capsys.readouterr().out)

    def first_channel_pixels(x: torch.Tensor) -> torch.Tensor:  # clean-fid gives RGB floats in [0, 255]
        return x[:, :1].reshape(len(x), -1) / 255

    ref = fid.compute_fid(
        str(a), str(b), mode="clean", custom_feat_extractor=first_channel_pixels,
        custom_fn_resize=lambda img: img.astype(np.float32), device=torch.device("cpu"), num_workers=0,
        batch_size=16, verbose=False, use_dataparallel=False,
    )  # fmt: skip
    assert ours["fd"] == pytest.approx(ref, rel=1e-6) and ours["n"] == 40 and ours["n_ref"] == 50
    # folder vs folder gives the same FD as folder vs its stats
    assert main(["eval", "fid", str(a), "--ref", str(b), "--extractor", "pixels", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fd"] == pytest.approx(ours["fd"], rel=1e-12)


def test_cli_fid_errors(tmp_path, capsys):
    small = _write_pngs(tmp_path / "small", 5, seed=3, size=16)
    stats = tmp_path / "small.npz"
    assert main(["eval", "ref", str(small), "--extractor", "pixels", "--out", str(stats)]) == 0
    big = _write_pngs(tmp_path / "big", 5, seed=4)
    (tmp_path / "empty").mkdir()
    capsys.readouterr()
    assert main(["eval", "fid", str(big), "--ref", str(stats)]) == 2
    assert "image_size" in capsys.readouterr().err
    assert main(["eval", "fid", str(tmp_path / "empty"), "--ref", str(stats)]) == 2
    assert "holds no images" in capsys.readouterr().err
    one = _write_pngs(tmp_path / "one", 1, seed=5, size=16)
    assert main(["eval", "fid", str(one), "--ref", str(stats)]) == 2
    assert "N = 2" in capsys.readouterr().err

    for name, payload in (("corrupt", b"\x89PNG\r\n\x1a\n truncated"), ("text", b"not an image")):
        bad = _write_pngs(tmp_path / name, 3, seed=6, size=16)
        (bad / "000001.png").write_bytes(payload)
        for argv in (["fid", str(bad), "--ref", str(stats)], ["ref", str(bad), "--out", str(tmp_path / "x.npz")]):
            assert main(["eval", *argv]) == 2
            err = capsys.readouterr().err
            assert "000001.png is not a readable image" in err and err.count("\n") == 1
    assert not (tmp_path / "x.npz").exists()


def test_cli_fid_warns_on_an_interrupted_folder(tmp_path, capsys):
    """A folder whose generation.json asked for more images than it holds is scored with a warning."""
    folder = _write_pngs(tmp_path / "gen", 6, seed=7, size=16)
    stats = tmp_path / "s.npz"
    assert main(["eval", "ref", str(folder), "--extractor", "pixels", "--out", str(stats)]) == 0
    (folder / "generation.json").write_text(json.dumps({"method": {"name": "m"}, "n": 8}))
    capsys.readouterr()
    assert main(["eval", "fid", str(folder), "--ref", str(stats), "--json"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["n"] == 6 and "holds 6 images but its generation.json asked for 8" in out.err
    (folder / "generation.json").write_text(json.dumps({"method": {"name": "m"}, "n": 6}))
    assert main(["eval", "fid", str(folder), "--ref", str(stats), "--json"]) == 0
    assert capsys.readouterr().err == ""


def test_pareto_front():
    points = [(1.0, 5.0), (2.0, 3.0), (3.0, 4.0), (0.5, 9.0), (4.0, 1.0)]
    assert pareto_front(points) == [3, 0, 1, 4]


def test_kid_only_for_unit_scale_features():
    """KID is not reported for lenet features (their scale dominates the cubic kernel); FD always is."""
    from fastdiff.eval.features import get_extractor
    from fastdiff.eval.sweep import score

    assert get_extractor("lenet").kid is False and get_extractor("pixels").kid is True
    rng = np.random.default_rng(0)
    ref = compute_stats(rng.normal(size=(30, 4)))
    feats = rng.normal(size=(20, 4))
    with_kid, without = score(feats, ref, {}, 5, 10), score(feats, ref, {}, 5, 10, kid=False)
    assert with_kid["kid"] is not None and without["kid"] is None and without["fd"] == with_kid["fd"]
