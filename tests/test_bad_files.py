"""Files a user points fastdiff at that are corrupt, empty or incomplete: one `ValueError` naming the file
and the fix (the CLI turns it into one line and exit 2), never a raw numpy/json traceback."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fastdiff.cli import main
from fastdiff.eval.metrics import compute_stats, load_stats, save_stats
from fastdiff.search.autodiffusion import SearchResult


@pytest.fixture()
def stats_file(tmp_path):
    features = np.random.default_rng(0).normal(size=(20, 3))
    return save_stats(tmp_path / "ref.npz", compute_stats(features), extractor="pixels")


@pytest.mark.parametrize("damage", ["garbage", "empty", "pickled object", "no sigma", "bad sidecar"])
def test_unreadable_statistics(stats_file, damage):
    if damage == "garbage":
        stats_file.write_bytes(b"PK\x03\x04 this is not a zip archive")
    elif damage == "empty":
        stats_file.write_bytes(b"")
    elif damage == "pickled object":  # np.load refuses it with an `allow_pickle` message
        np.savez(stats_file.with_name("p.npz"), mu=np.array([{"a": 1}], dtype=object), sigma=np.eye(3), n=20)
        stats_file.with_name("p.npz").replace(stats_file)
    elif damage == "no sigma":
        np.savez(stats_file.with_name("p.npz"), mu=np.zeros(3), n=20)
        stats_file.with_name("p.npz").replace(stats_file)
    else:
        stats_file.with_suffix(".json").write_text("{not json")
    with pytest.raises(ValueError, match=r"ref.npz \(or its sidecar\) is not readable statistics.*fastdiff eval ref"):
        load_stats(stats_file)


def test_unreadable_statistics_on_the_cli(stats_file, tmp_path, capsys):
    stats_file.write_bytes(b"")
    (tmp_path / "imgs").mkdir()
    assert main(["eval", "fid", str(tmp_path / "imgs"), "--ref", str(stats_file)]) == 2
    err = capsys.readouterr().err
    assert "is not readable statistics" in err and err.count("\n") == 1


def _result() -> SearchResult:
    return SearchResult(timesteps=[999, 500, 100], fitness=1.5, history=[2.0, 1.5], evaluations=3, wall_time_s=0.1,
                        config={"seed": 0}, objective="exact")


@pytest.mark.parametrize("content, message", [
    ("", "is not JSON"),
    ('{"format": "fastdiff-schedule", "timesteps": [999, 5', "is not JSON"),
    (b"\xff\xfe\x00binary", "is not JSON"),
])
def test_unreadable_search_results(tmp_path, content, message):
    path = tmp_path / "result.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=message):
        SearchResult.load(path)


def test_incomplete_search_result_and_round_trip(tmp_path):
    path = _result().save(tmp_path / "result.json")
    assert SearchResult.load(path) == _result()
    record = json.loads(path.read_text())
    del record["history"], record["evaluations"]
    path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="incomplete search result \\(no history, evaluations\\)"):
        SearchResult.load(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SearchResult.load(tmp_path / "missing.json")
