"""`fastdiff eval fid`: FD and KID of a folder against stats or another folder."""

from __future__ import annotations

import argparse
import json
import sys

from fastdiff.eval.features import EXTRACTORS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="folder of generated images")
    parser.add_argument("--ref", required=True, help="reference stats (.npz from `eval ref`) or a folder")
    parser.add_argument("--extractor", default=None, choices=EXTRACTORS, help="default: the stats' extractor")
    parser.add_argument("--kid-subsets", type=int, default=100)
    parser.add_argument("--kid-subset-size", type=int, default=1000)
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from fastdiff.eval.features import folder_features, get_extractor
    from fastdiff.eval.generate import asked_images
    from fastdiff.eval.metrics import load_stats
    from fastdiff.eval.sweep import folder_meta, reference_stats, score

    name = args.extractor
    if name is None:
        name = load_stats(args.ref).meta.get("extractor", "lenet") if args.ref.endswith(".npz") else "lenet"
    ex = get_extractor(name)
    ref = reference_stats(args.ref, ex)
    feats, size = folder_features(args.folder, ex)
    asked = asked_images(args.folder)
    if asked is not None and len(feats) < asked:
        print(f"warning: {args.folder} holds {len(feats)} images but its generation.json asked for {asked} "
              "(an interrupted run?); scoring the ones there. Re-run the same command to finish it.", file=sys.stderr)
    result = score(feats, ref, folder_meta(ex, size, args.folder), args.kid_subsets, args.kid_subset_size, ex.kid)
    result.update(n=len(feats), n_ref=ref.n, extractor=ex.name, build=ex.build)
    if args.json:
        print(json.dumps(result))
    else:
        kid = "-" if result["kid"] is None else f"{result['kid']:.6f} ± {result['kid_std']:.6f}"
        print(f"FD {result['fd']:.4f}  KID {kid}  (N = {len(feats)} vs {ref.n}, {ex.name}: {ex.build})")
    return 0
