"""Progress off a terminal: plain lines, at most one per interval, and always the last one."""

from __future__ import annotations

import io

import pytest

from fastdiff.eval.generate import generate_images
from fastdiff.eval.methods import MethodSpec
from fastdiff.eval.progress import Progress


def test_log_lines_are_rate_limited_and_end_at_the_total():
    stream = io.StringIO()  # not a terminal
    p = Progress(10, "job", unit="step", interval=3600, stream=stream)
    for _ in range(12):
        p.update(1, note="best 1.5")
    p.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("job: 10/10 steps (100%, ") and lines[0].endswith(", best 1.5)")
    stream = io.StringIO()
    p = Progress(4, "job", interval=0, stream=stream)
    for _ in range(4):
        p.update()
    lines = [line.split(" (")[0] for line in stream.getvalue().splitlines()]
    assert lines == [f"job: {k}/4 steps" for k in (1, 2, 3, 4)]
    with pytest.raises(ValueError, match="total must be >= 0"):
        Progress(-1, "job")


def test_generation_progress_moves_per_denoiser_step(tmp_path, capsys, monkeypatch):
    from diffusers import DDIMScheduler

    from fastdiff.eval import progress
    from fastdiff.models.pipeline import ReferencePipeline
    from fastdiff.models.unet import build_reference_unet
    from fastdiff.models.weights import SCHEDULER_CONFIG

    pipe = ReferencePipeline(unet=build_reference_unet(0).eval(), scheduler=DDIMScheduler(**SCHEDULER_CONFIG))
    pipe.set_progress_bar_config(disable=True)
    monkeypatch.setattr(progress.Progress.__init__, "__defaults__", ("step", 0.0, None))  # a line per update
    generate_images(pipe, MethodSpec(name="ddim", steps=3, guidance=1.0), tmp_path, n=4, batch_size=2)
    lines = [line.split(" (")[1] for line in capsys.readouterr().err.splitlines() if line.startswith("ddim")]
    assert lines == [f"rank 0/1): {k}/6 steps" for k in range(1, 7)]  # 2 batches x 3 steps, one line per UNet call
