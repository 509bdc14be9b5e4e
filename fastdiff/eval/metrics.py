"""Frechet distance (Heusel et al. 2017, FID) and kernel distance (Binkowski et al. 2018, KID) on feature arrays.

Pure numpy/scipy. `frechet_distance` is the closed form of the 2-Wasserstein distance between two Gaussians
(Dowson & Landau 1982): |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2). `kernel_distance` is the unbiased
MMD^2 estimate with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3 over random subsets, drawn in the
same order as clean-fid's `kernel_distance` so that both agree for the same seed.

Statistics are stored as `.npz` (mu, sigma, n, optionally the features for KID) with a JSON sidecar
(extractor, build, resize mode, image size, n, source, fastdiff version). Comparing two statistics whose
sidecars disagree on extractor, resize mode or image size is an error, never a silent fix.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "FeatureStats",
    "frechet_distance",
    "kernel_distance",
    "compute_stats",
    "save_stats",
    "load_stats",
    "check_compatible",
]

# sidecar keys whose disagreement makes two statistics incomparable
COMPATIBILITY_KEYS = ("extractor", "build", "resize", "image_size")


@dataclass
class FeatureStats:
    """Mean `mu` (d,), covariance `sigma` (d, d) and count `n` of a feature set; `features` kept for KID.

    `meta` is the JSON sidecar: extractor, build, resize, image_size, n, source, fastdiff_version.
    """

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    features: np.ndarray | None = None
    meta: dict = field(default_factory=dict)


def _as_features(features, name: str = "features") -> np.ndarray:
    feats = np.asarray(features, dtype=np.float64)
    if feats.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (N, d), got shape {feats.shape}.")
    if feats.shape[0] < 2:
        raise ValueError(f"{name}: need at least N = 2 samples for a covariance, got N = {feats.shape[0]}.")
    if not np.isfinite(feats).all():
        raise ValueError(f"{name} contain NaN or inf values.")
    return feats


def compute_stats(features, meta: dict | None = None, keep_features: bool = True) -> FeatureStats:
    """Mean and unbiased covariance (numpy `np.cov`, as clean-fid) of features (N, d), N >= 2."""
    feats = _as_features(features)
    meta = dict(meta or {})
    meta["n"] = int(feats.shape[0])
    return FeatureStats(
        mu=feats.mean(axis=0),
        sigma=np.atleast_2d(np.cov(feats, rowvar=False)),
        n=int(feats.shape[0]),
        features=feats if keep_features else None,
        meta=meta,
    )


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (negative round-off clipped)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (Dowson & Landau 1982; the FID formula).

    tr((S1 S2)^1/2) is computed as the sum of square roots of the eigenvalues of the symmetric PSD matrix
    S1^1/2 S2 S1^1/2 (same spectrum as S1 S2), which stays real and stable when the covariances are
    rank-deficient (N <= d) instead of needing clean-fid's 1e-6 diagonal jitter.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"feature dimensions differ: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape};"
            " compute both statistics with the same feature extractor."
        )
    root1 = _psd_sqrt(sigma1)
    inner = root1 @ sigma2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def kernel_distance(
    feats1, feats2, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018): unbiased MMD^2, cubic kernel, over random subsets.

    Each of `num_subsets` rounds draws m = min(N1, N2, subset_size) rows without replacement from feats2
    then from feats1 with `np.random.RandomState(seed)` (clean-fid's order, so `np.random.seed(seed)` before
    `cleanfid.fid.kernel_distance` gives the same subsets). Returns (mean, std) over the subsets; the std is
    the spread of the subset estimates, not a seed-to-seed error bar.
    """
    x_all, y_all = _as_features(feats2, "feats2"), _as_features(feats1, "feats1")
    if x_all.shape[1] != y_all.shape[1]:
        raise ValueError(f"feature dimensions differ: {y_all.shape[1]} vs {x_all.shape[1]}.")
    if num_subsets < 1 or subset_size < 2:
        raise ValueError("num_subsets must be >= 1 and subset_size >= 2.")
    d = x_all.shape[1]
    m = min(x_all.shape[0], y_all.shape[0], subset_size)
    rng = np.random.RandomState(seed)
    estimates = np.empty(num_subsets)
    for i in range(num_subsets):
        x = x_all[rng.choice(x_all.shape[0], m, replace=False)]
        y = y_all[rng.choice(y_all.shape[0], m, replace=False)]
        k_xx = (x @ x.T / d + 1) ** 3
        k_yy = (y @ y.T / d + 1) ** 3
        k_xy = (x @ y.T / d + 1) ** 3
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        estimates[i] = within - 2 * k_xy.sum() / (m * m)
    return float(estimates.mean()), float(estimates.std())


def check_compatible(meta1: dict, meta2: dict) -> None:
    """Raise ValueError when two stats sidecars differ in extractor, build, resize mode or image size."""
    problems = []
    for key in COMPATIBILITY_KEYS:
        a, b = meta1.get(key), meta2.get(key)
        if a is not None and b is not None and _norm(a) != _norm(b):
            problems.append(f"{key}: {a!r} vs {b!r}")
    if problems:
        raise ValueError(
            "the two statistics are not comparable (" + "; ".join(problems) + "): recompute the reference "
            "statistics with the same feature extractor, resize mode and image size as the samples."
        )


def _norm(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def save_stats(path: str | Path, stats: FeatureStats, **meta) -> Path:
    """Write `stats` to `path` (.npz: mu, sigma, n[, features]) and its JSON sidecar next to it.

    Extra keyword arguments (extractor, build, resize, image_size, source) are merged into the sidecar.
    """
    from fastdiff import __version__

    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_suffix(".npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    sidecar = {**stats.meta, **meta, "n": int(stats.n), "fastdiff_version": __version__}
    arrays = {"mu": stats.mu, "sigma": stats.sigma, "n": np.array(stats.n)}
    if stats.features is not None:
        arrays["features"] = stats.features
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    _sidecar(path).write_text(json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
    stats.meta = sidecar
    return path


def load_stats(path: str | Path) -> FeatureStats:
    """Read statistics written by `save_stats` (the sidecar is required: it says what the numbers are)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: create it with `fastdiff eval ref`.")
    sidecar = _sidecar(path)
    if not sidecar.exists():
        raise FileNotFoundError(
            f"{sidecar} is missing: statistics need their JSON sidecar (extractor, resize, image size);"
            " recreate them with `fastdiff eval ref`."
        )
    try:
        meta = json.loads(sidecar.read_text())
        with np.load(path) as data:
            features = data["features"] if "features" in data.files else None
            stats = FeatureStats(mu=data["mu"], sigma=data["sigma"], n=int(data["n"]), features=features, meta=meta)
    except (ValueError, OSError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path} (or its sidecar) is not readable statistics ({err.__class__.__name__}); "
                         "recreate them with `fastdiff eval ref`.") from None
    if stats.n != meta.get("n", stats.n):
        raise ValueError(f"{path}: n = {stats.n} but its sidecar says n = {meta['n']}; recreate the statistics.")
    return stats
