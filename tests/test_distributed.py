"""The harness's process group under torchrun: a stuck rank fails every rank within the timeout, by name."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from fastdiff import cli
from fastdiff.eval.distributed import DistributedError

WORKER = textwrap.dedent("""
    import sys, time
    from fastdiff.eval.distributed import barrier, init_distributed
    rank, world = init_distributed(float(sys.argv[1]))
    barrier()                  # every rank is up
    if rank == 1:
        time.sleep(120)        # a rank that stops answering (a stopped process, a hung step)
    barrier()
    print("passed the barrier on rank", rank)
""")


@pytest.mark.slow
def test_a_stuck_rank_fails_every_rank_within_the_timeout(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), "3"], env=env, capture_output=True, text=True, timeout=110)
    elapsed = time.perf_counter() - start
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "passed the barrier" not in out, out[-3000:]
    assert "DistributedError: barrier on rank 0 of 2 failed ([Rank 0]: Ranks 1 failed to pass monitoredBarrier" in out
    assert elapsed < 60, elapsed  # 3 s timeout + process start-up, not the sleeping rank's 120 s


def test_cli_reports_a_failed_run_in_one_line(monkeypatch, capsys):
    from fastdiff.commands import sample

    def stuck(args):
        raise DistributedError("barrier on rank 0 of 2 failed (Ranks 1 failed to pass monitoredBarrier in 3000 ms)")

    monkeypatch.setattr(sample, "run", stuck)
    assert cli.main(["sample", "--out", "x"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fastdiff sample: barrier on rank 0 of 2 failed") and err.count("\n") == 1


def test_timeout_must_be_positive(monkeypatch):
    from fastdiff.eval.distributed import init_distributed

    monkeypatch.setenv("WORLD_SIZE", "2")  # checked before any process group starts
    with pytest.raises(ValueError, match="timeout must be > 0"):
        init_distributed(0)


def test_launched_processes_share_the_cores_unless_the_user_chose():
    from fastdiff.eval.distributed import threads_per_process

    assert threads_per_process({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}, 2) == 1
    assert threads_per_process({"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"}, 16) == 4  # 2 machines of 4
    assert threads_per_process({"WORLD_SIZE": "4"}, 2) == 1  # more processes than cores: at least one thread
    assert threads_per_process({"WORLD_SIZE": "2", "OMP_NUM_THREADS": "3"}, 2) is None  # the user's choice
    assert threads_per_process({}, 2) is None  # one process: torch's default
