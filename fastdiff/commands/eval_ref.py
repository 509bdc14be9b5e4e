"""`fastdiff eval ref`: stats (mu, sigma, n, features) + sidecar of a folder or of the held-out digits."""

from __future__ import annotations

import argparse

from fastdiff.eval.features import EXTRACTORS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("folder", nargs="?", help="folder of images")
    source.add_argument("--heldout", action="store_true", help="the reference model's 1,000 held-out digits")
    parser.add_argument("--extractor", default="lenet", choices=EXTRACTORS)
    parser.add_argument("--out", required=True, help="stats file (.npz; a .json sidecar is written beside it)")
    parser.add_argument("--no-features", action="store_true", help="omit the features (no KID against it)")


def run(args: argparse.Namespace) -> int:
    from fastdiff.eval.features import get_extractor
    from fastdiff.eval.metrics import save_stats
    from fastdiff.eval.sweep import reference_stats

    stats = reference_stats("heldout" if args.heldout else args.folder, get_extractor(args.extractor))
    if args.no_features:
        stats.features = None
    path = save_stats(args.out, stats)
    print(f"wrote {path} (+ {path.with_suffix('.json').name}): n = {stats.n}, {stats.meta['extractor']}")
    return 0
