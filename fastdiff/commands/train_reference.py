"""`fastdiff train-reference`: train the built-in MNIST reference model and its classifier (resumable)."""

from __future__ import annotations

import argparse
from pathlib import Path

from fastdiff.models.weights import SCHEDULER_CONFIG, WEIGHTS_DIR


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=8000, help="optimizer steps (default 8000)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", type=Path, default=Path("runs/reference/checkpoint.pt"),
                   help="resumable checkpoint; training continues from it if present")
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"],
                   default=SCHEDULER_CONFIG["prediction_type"], help="regression target (default v_prediction)")
    p.add_argument("--init-from", type=Path, default=None,
                   help="warm start: the weights of another run's checkpoint (used only when --checkpoint is new)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop (resumably) after this many minutes")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path, default=Path("runs/reference/weights"),
                       help="weights folder to write (default runs/reference/weights; load it with "
                            "load_reference_pipeline(weights_dir=...))")
    where.add_argument("--replace-shipped", action="store_true",
                       help=f"write the package's own weights ({WEIGHTS_DIR}) instead")
    p.add_argument("--classifier-epochs", type=int, default=15)


def run(args: argparse.Namespace) -> int:
    from fastdiff.models.train import train_reference

    if args.replace_shipped:
        args.out = WEIGHTS_DIR
    elif args.out.resolve() == WEIGHTS_DIR.resolve():
        raise ValueError(f"{args.out} holds the shipped weights: pass --replace-shipped to overwrite them.")

    record = train_reference(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                             checkpoint=args.checkpoint, prediction_type=args.prediction_type,
                             init_from=args.init_from, max_minutes=args.max_minutes, out_dir=args.out,
                             classifier_epochs=args.classifier_epochs)
    if record is None:
        print(f"stopped before step {args.steps}; run the same command again to resume.")
        return 0
    print(f"wrote {args.out} (classifier held-out accuracy {record['classifier']['heldout_accuracy']:.4f})")
    return 0
