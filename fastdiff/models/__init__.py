"""The built-in reference model (class-conditional MNIST digits) and its digit classifier, shipped as safetensors."""

from __future__ import annotations

import json
from pathlib import Path

from fastdiff.lazy import lazy_exports
from fastdiff.models.weights import CLASSIFIER_FILE, RECORD_FILE, SCHEDULER_FILE, UNET_FILE, WEIGHTS_DIR

__all__ = ["load_reference_pipeline", "load_digit_classifier", "reference_record", "WEIGHTS_DIR", "ReferencePipeline",
           "DigitClassifier"]

__getattr__ = lazy_exports(__name__, {"ReferencePipeline": "fastdiff.models.pipeline",
                                      "DigitClassifier": "fastdiff.models.classifier"})


def _weights(name: str, weights_dir: Path | None) -> Path:
    path = Path(weights_dir or WEIGHTS_DIR) / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `fastdiff train-reference` to produce the shipped weights.")
    return path


def load_reference_pipeline(weights_dir: str | Path | None = None, device: str = "cpu"):
    """The reference `ReferencePipeline` (EMA UNet + its shipped DDPM scheduler, x0 clipped), loaded offline."""
    import diffusers
    from safetensors.torch import load_file

    from fastdiff.models.pipeline import ReferencePipeline
    from fastdiff.models.unet import build_reference_unet

    unet = build_reference_unet()
    unet.load_state_dict(load_file(str(_weights(UNET_FILE, weights_dir))))
    config = json.loads(_weights(SCHEDULER_FILE, weights_dir).read_text())
    scheduler = getattr(diffusers, config.pop("_class_name")).from_config(config)
    pipe = ReferencePipeline(unet=unet.eval(), scheduler=scheduler)
    return pipe.to(device)


def load_digit_classifier(weights_dir: str | Path | None = None, device: str = "cpu"):
    """The shipped `DigitClassifier` in eval mode: `.features(images)` (N, 128), `.log_prob(images)` (N, 10)."""
    from safetensors.torch import load_file

    from fastdiff.models.classifier import DigitClassifier

    model = DigitClassifier()
    model.load_state_dict(load_file(str(_weights(CLASSIFIER_FILE, weights_dir))))
    return model.eval().requires_grad_(False).to(device)


def reference_record(weights_dir: str | Path | None = None) -> dict:
    """The JSON record of how the shipped weights were made."""
    return json.loads(_weights(RECORD_FILE, weights_dir).read_text())
