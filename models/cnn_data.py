"""Image data for the cnn family: scikit-learn's digits, MNIST-format idx files, or a labelled folder.

Every loader returns images as FP32 ``[n, 1, 28, 28]`` in ``[0, 1]`` (1.0 = white ink, as in MNIST)
and integer labels ``0..C-1`` with their names.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

SIDE = 28
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# idx type codes -> numpy dtypes (big-endian), from the MNIST file-format description.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass
class ImageData:
    """Images and labels, with an optional predefined test split (MNIST's t10k files)."""

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    source: str
    test_images: np.ndarray | None = None
    test_labels: np.ndarray | None = None


def load(spec: str) -> ImageData:
    """Load ``digits``, ``idx:PATH`` or ``folder:PATH``."""
    kind, _, arg = spec.partition(":")
    if kind == "digits" and not arg:
        return load_digits_28()
    if kind == "idx" and arg:
        return load_idx_dir(Path(arg))
    if kind == "folder" and arg:
        return load_folder(Path(arg))
    raise ValueError(f"--data {spec!r}: expected 'digits', 'idx:PATH' or 'folder:PATH'")


def _resize(images: np.ndarray, side: int) -> np.ndarray:
    tensor = torch.from_numpy(images.astype(np.float32))[:, None]
    return F.interpolate(tensor, size=(side, side), mode="bilinear", align_corners=False).numpy()


def load_digits_28() -> ImageData:
    """scikit-learn's 1,797 8x8 digits, laid out like MNIST: scaled to 20x20 and centred in 28x28."""
    # NOTE: scikit-learn is heavy to import (~1 s) and only this step needs it
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = _resize(digits.images / 16.0, 20)
    images = np.zeros((len(small), 1, SIDE, SIDE), np.float32)
    images[:, :, 4:24, 4:24] = np.clip(small, 0.0, 1.0)
    return ImageData(images, digits.target.astype(np.int64), [str(d) for d in range(10)],
                     "scikit-learn load_digits (8x8, upsampled to 20x20, centred in 28x28)")


def read_idx(path: Path) -> np.ndarray:
    """Read one idx file (``.gz`` or plain) as described at http://yann.lecun.com/exdb/mnist/."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an idx file (expected magic 0x0000<type><ndim>)")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=_IDX_DTYPES[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says shape {dims} but holds {data.size} values")
    return data.reshape(dims)


def _find(root: Path, prefix: str, kind: str) -> Path | None:
    hits = sorted(p for p in root.iterdir() if p.name.startswith(prefix) and kind in p.name)
    return hits[0] if hits else None


def _idx_pair(root: Path, prefix: str) -> tuple[np.ndarray, np.ndarray] | None:
    images, labels = _find(root, prefix, "images"), _find(root, prefix, "labels")
    if images is None or labels is None:
        return None
    x, y = read_idx(images), read_idx(labels)
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(f"{images} / {labels}: expected [n, h, w] images and [n] labels, "
                         f"got {list(x.shape)} and {list(y.shape)}")
    scale = 255.0 if x.dtype == np.uint8 else 1.0
    x = x.astype(np.float32) / scale
    if x.shape[1:] != (SIDE, SIDE):
        x = _resize(x, SIDE)[:, 0]
    return x[:, None].astype(np.float32), y.astype(np.int64)


def load_idx_dir(root: Path) -> ImageData:
    """MNIST-style folder: ``train-images-idx3-ubyte[.gz]`` + ``train-labels-idx1-ubyte[.gz]``,
    and optionally the ``t10k-*`` pair, used as the test split when present."""
    if not root.is_dir():
        raise ValueError(f"idx:{root}: expected a folder holding train-images/train-labels idx files")
    train = _idx_pair(root, "train")
    if train is None:
        raise ValueError(f"idx:{root}: no train-images-*/train-labels-* idx files found")
    test = _idx_pair(root, "t10k")
    classes = int(max(train[1].max(), test[1].max() if test else 0)) + 1
    return ImageData(train[0], train[1], [str(c) for c in range(classes)], f"idx files in {root}",
                     test[0] if test else None, test[1] if test else None)


def load_folder(root: Path) -> ImageData:
    """``<root>/<label>/*.png|jpg``: grayscale, resized to 28x28, 1.0 = white (invert dark-on-light
    scans with ``--invert``)."""
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if len(class_dirs) < 2:
        raise ValueError(f"folder:{root}: expected at least two sub-folders, one per label")
    images, labels = [], []
    for index, folder in enumerate(class_dirs):
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"{folder}: no {'/'.join(IMAGE_SUFFIXES)} images")
        for file in files:
            with Image.open(file) as img:
                gray = img.convert("L").resize((SIDE, SIDE), Image.Resampling.BILINEAR)
            images.append(np.asarray(gray, np.float32) / 255.0)
            labels.append(index)
    return ImageData(np.stack(images)[:, None], np.asarray(labels, np.int64),
                     [p.name for p in class_dirs], f"image folder {root}")


def recut(images: torch.Tensor, *, generator: torch.Generator, share: float,
          levels: tuple[float, float] = (0.2, 0.6), edge: float = 0.1) -> torch.Tensor:
    """A random `share` of the images re-inked as a pen would draw them: the grey levels cut at a random level
    (a low cut thickens, a high cut thins and drops faint strokes) with a soft `edge`, as photographed digits are."""
    n = images.shape[0]
    cut = (levels[0] + torch.rand(n, generator=generator) * (levels[1] - levels[0])).view(-1, 1, 1, 1)
    pick = (torch.rand(n, generator=generator) < share).view(-1, 1, 1, 1)
    return torch.where(pick, ((images - cut) / edge + 0.5).clamp(0.0, 1.0), images)


def augment(images: torch.Tensor, *, generator: torch.Generator, max_shift: float = 2.0,
            max_degrees: float = 10.0, scale_range: float = 0.1, recut_share: float = 0.0,
            rotation_power: float = 1.0) -> torch.Tensor:
    """A random pen cut (`recut`, when `recut_share` > 0), then shift (pixels), rotation (degrees; |angle| =
    max_degrees * u**rotation_power, u uniform in [0, 1], so a power above 1 keeps most angles small) and
    scaling, one affine warp per image.

    NOTE: written with affine_grid/grid_sample because torchvision is not a dependency.
    """
    if recut_share > 0:
        images = recut(images, generator=generator, share=recut_share)
    n = images.shape[0]
    rand = torch.rand(n, 4, generator=generator) * 2 - 1
    angle = rand[:, 0].sign() * rand[:, 0].abs() ** rotation_power * max_degrees * torch.pi / 180
    scale = 1 + rand[:, 1] * scale_range
    shift = rand[:, 2:] * max_shift * 2 / images.shape[-1]
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
