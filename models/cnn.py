"""cnn family: a small residual CNN for 28x28 grayscale image classification (handwritten digits).

Trains on scikit-learn's bundled digits by default (``--data digits``), or on MNIST-format idx files
(``--data idx:PATH``) or a labelled image folder (``--data folder:PATH``); evaluates on a held-out
stratified split; exports ONNX (softmax inside the graph); publishes model ``cnn``.

    python -m models.cnn --profile default --model-repository model_repository
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from models import cnn_data
from models.common import (
    FamilyResult,
    check_profile,
    count_parameters,
    export_onnx,
    family_parser,
    hyper_overrides,
    optimizer_step,
    parity_check,
    set_seed,
)
from models.common import recalibrate_batchnorm as common_recalibrate
from service.modelrepo.publish import publish

NAME = "cnn"


@dataclass(frozen=True)
class Hyper:
    width: int
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 5e-4
    test_fraction: float = 0.2
    max_train: int | None = None
    # Training-time augmentation (cnn_data.augment); held-out digits are evaluated as they are. Round 5: with
    # uniform +-10 deg a photo tilted -15 deg scored 0.939 and thin pens 0.869; rotations to +-20 deg (most of
    # them small: power 2) and half the digits re-cut as a pen draws them give 0.992 and 0.958, held-out 0.997
    # unchanged (docs/RELIABILITY.md "Answers, round 5"; uniform +-20 deg alone lost a point on plain photos).
    max_degrees: float = 20.0
    rotation_power: float = 2.0
    scale_range: float = 0.1
    max_shift: float = 2.0
    recut_share: float = 0.5

    def augmentation(self) -> dict[str, float]:
        return {"max_degrees": self.max_degrees, "rotation_power": self.rotation_power,
                "scale_range": self.scale_range, "max_shift": self.max_shift, "recut_share": self.recut_share}


HYPER = {
    # NOTE: the tiny profile (tests only) keeps the pre-round-5 augmentation (uniform +-10 deg, no re-cut): with the
    # wider one its 3 epochs on 512 digits fell from 0.38 to 0.32 held-out, and the parity tests that compare the
    # upload path with the training layout through it flipped labels (CI, round 5).
    "tiny": Hyper(width=4, epochs=3, batch_size=64, lr=1e-2, max_train=512, max_degrees=10.0, rotation_power=1.0,
                  recut_share=0.0),
    "default": Hyper(width=16, epochs=20, batch_size=64, lr=4e-3),
}


class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(y)))


def _down(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU())


class ResNetSmall(nn.Module):
    """28x28 -> (w, 28x28) -> (2w, 14x14) -> (4w, 7x7) -> global average -> classes."""

    def __init__(self, *, width: int, num_classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            ResidualBlock(width),
            _down(width, 2 * width), ResidualBlock(2 * width),
            _down(2 * width, 4 * width), ResidualBlock(4 * width),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.1), nn.Linear(4 * width, num_classes),
        )

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        return self.body(image)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.body(image), dim=-1)


def split(data: cnn_data.ImageData, *, hyper: Hyper, seed: int) -> tuple[np.ndarray, ...]:
    """Train/test arrays: the data's own test split if it has one, else a stratified hold-out."""
    # NOTE: scikit-learn is heavy to import (~1 s) and only this step needs it
    from sklearn.model_selection import train_test_split

    if data.test_images is not None and data.test_labels is not None:
        x_tr, y_tr, x_te, y_te = data.images, data.labels, data.test_images, data.test_labels
    else:
        x_tr, x_te, y_tr, y_te = train_test_split(data.images, data.labels, test_size=hyper.test_fraction,
                                                  stratify=data.labels, random_state=seed)
    if hyper.max_train is not None:
        x_tr, y_tr = x_tr[: hyper.max_train], y_tr[: hyper.max_train]
    return x_tr, y_tr, x_te, y_te


def train(model: ResNetSmall, x: np.ndarray, y: np.ndarray, *, hyper: Hyper, seed: int) -> None:
    images, labels = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(seed)
    steps = hyper.epochs * ((len(images) + hyper.batch_size - 1) // hyper.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=hyper.lr, weight_decay=hyper.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=hyper.lr, total_steps=steps)
    model.train()
    with tqdm(total=steps, desc="cnn train", unit="step", leave=False, mininterval=1.0) as bar:
        for _ in range(hyper.epochs):
            order = torch.randperm(len(images), generator=gen)
            for start in range(0, len(images), hyper.batch_size):
                idx = order[start:start + hyper.batch_size]
                batch = cnn_data.augment(images[idx], generator=gen, **hyper.augmentation())
                loss = F.cross_entropy(model.logits(batch), labels[idx], label_smoothing=0.05)
                optimizer_step(loss, opt=opt, sched=sched, bar=bar)
    recalibrate_batchnorm(model, images)


def recalibrate_batchnorm(model: ResNetSmall, images: torch.Tensor) -> None:
    """Recompute BatchNorm statistics over clean training inputs (see models.common.recalibrate_batchnorm)."""
    common_recalibrate(model, images, forward=model.logits)


def evaluate(model: ResNetSmall, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Held-out accuracy and macro-F1 (from the served graph's probabilities)."""
    # NOTE: scikit-learn is heavy to import (~1 s) and only this step needs it
    from sklearn.metrics import f1_score

    with torch.no_grad():
        pred = torch.cat([model(torch.from_numpy(x[i:i + 512])) for i in range(0, len(x), 512)]).argmax(1)
    pred_np = pred.numpy()
    return {"accuracy": float((pred_np == y).mean()), "macro_f1": float(f1_score(y, pred_np, average="macro")),
            "test_examples": float(len(y))}


def config_pbtxt(num_classes: int) -> str:
    return f"""name: "{NAME}"
platform: "onnxruntime_onnx"
max_batch_size: 64
input [ {{ name: "image" data_type: TYPE_FP32 dims: [ 1, 28, 28 ] }} ]
output [ {{ name: "probabilities" data_type: TYPE_FP32 dims: [ {num_classes} ] label_filename: "labels.txt" }} ]
dynamic_batching {{ preferred_batch_size: [ 16, 32 ] max_queue_delay_microseconds: 500 }}
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
"""


def _augmentation_text(aug: dict | None) -> str:
    if aug is None:  # cards written before round 5 did not record it
        return "random shifts (+-2 px), rotations (+-10 deg) and scaling (+-10%)"
    small = ", most small" if aug["rotation_power"] > 1 else ""
    recut = (f", and {aug['recut_share']:.0%} of the digits re-cut at a random ink level (thicker or thinner strokes, "
             "as pens photograph)") if aug["recut_share"] > 0 else ""
    return (f"random shifts (+-{aug['max_shift']:g} px), rotations (+-{aug['max_degrees']:g} deg{small}), "
            f"scaling (+-{aug['scale_range']:.0%}){recut}")


def card_markdown(card: dict) -> str:
    m, p = card["metrics"], card["parity"]
    return f"""# cnn: handwritten digit classifier (small residual CNN)

- **Task**: {card["task"]}; labels in `labels.txt` ({", ".join(card["labels"])}).
- **Data**: {card["data"]}. **Split**: {card["split"]}.
- **Input** `image`: FP32 `[batch, 1, 28, 28]`, grayscale scaled to [0, 1] by dividing 8-bit pixels by 255;
  1.0 is the ink (white digit on black, as in MNIST), digit roughly centred in a 20x20 box.
- **Output** `probabilities`: FP32 `[batch, {len(card["labels"])}]`, softmax computed inside the graph.
- **Model**: residual CNN, {card["parameters"]:,} parameters; trained {card["training"]["epochs"]} epochs with
  {_augmentation_text(card["training"].get("augmentation"))}; held-out digits are scored as they are.

| held-out metric | value |
|---|---|
| accuracy | {m["accuracy"]:.4f} |
| macro_f1 | {m["macro_f1"]:.4f} |
| test_examples | {int(m["test_examples"])} |

ONNX Runtime vs PyTorch parity: max abs diff {p["max_abs_diff"]:.2e} (atol {p["atol"]:g}) over batches
{[c[0][0] for c in p["cases"]]}. Profile `{card["profile"]}`, seed {card["seed"]},
built in {card["build_seconds"]:.1f} s.

Limitations: 8x8 source digits upsampled to 28x28 are blurrier than real scans; expect lower accuracy
on photographed or dark-on-light digits unless they are preprocessed the same way.
"""


def build(*, profile: str, repo_dir: Path, seed: int = 0, work_dir: Path | None = None,
          data: str = "digits", hyper: Hyper | None = None, invert: bool = False) -> FamilyResult:
    """Train, evaluate, export, parity-check and publish the ``cnn`` model."""
    start = time.perf_counter()
    hyper = hyper or HYPER[check_profile(profile)]
    set_seed(seed)
    dataset = cnn_data.load(data)
    if invert:
        dataset = replace(dataset, images=1.0 - dataset.images,
                          test_images=None if dataset.test_images is None else 1.0 - dataset.test_images)
    x_tr, y_tr, x_te, y_te = split(dataset, hyper=hyper, seed=seed)
    model = ResNetSmall(width=hyper.width, num_classes=len(dataset.class_names))
    train(model, x_tr, y_tr, hyper=hyper, seed=seed)
    metrics = evaluate(model, x_te, y_te)
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        onnx_path = export_onnx(model, (torch.from_numpy(x_te[:2]),), Path(tmp) / "model.onnx",
                                input_names=["image"], output_names=["probabilities"],
                                dynamic_shapes={"image": {0: torch.export.Dim("batch", min=1, max=4096)}})
        parity = parity_check(model, onnx_path, [(x_te[:n],) for n in (1, 3, 17)], atol=1e-4, rtol=1e-3)
        card: dict[str, Any] = {
            "family": NAME, "task": "image classification", "data": dataset.source,
            "split": ("predefined test files" if dataset.test_images is not None
                      else f"stratified {hyper.test_fraction:.0%} hold-out (seed {seed})")
            + f"; {len(y_tr)} train / {len(y_te)} test",
            "parameters": count_parameters(model), "metrics": metrics, "parity": parity,
            "input_spec": {"name": "image", "shape": [-1, 1, 28, 28], "dtype": "FP32",
                           "scaling": "pixel / 255 in [0, 1], 1.0 = ink", "inverted_on_load": invert},
            "labels": dataset.class_names, "training": {"epochs": hyper.epochs, "width": hyper.width,
                                                            "augmentation": hyper.augmentation()},
            "build_seconds": round(time.perf_counter() - start, 2), "profile": profile, "seed": seed,
        }
        publish(repo_dir=repo_dir, name=NAME, onnx_path=onnx_path, config_pbtxt=config_pbtxt(len(dataset.class_names)), card=card,
            card_md=card_markdown(card), labels=dataset.class_names)
    return FamilyResult(NAME, [NAME], {"accuracy": metrics["accuracy"]}, card["parameters"],
                        round(time.perf_counter() - start, 2), parity["max_abs_diff"])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = family_parser("cnn", __doc__)
    parser.add_argument("--data", default="digits", help="digits | idx:PATH | folder:PATH (default: digits)")
    parser.add_argument("--invert", action="store_true", help="invert images (for dark ink on light paper)")
    parser.add_argument("--width", type=int, help="override the profile's base channel width")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    hyper = replace(HYPER[args.profile], **hyper_overrides(args, "width"))
    result = build(profile=args.profile, repo_dir=args.repo, seed=args.seed, data=args.data, hyper=hyper,
                   invert=args.invert)
    print(f"cnn: held-out accuracy {result.metrics['accuracy']:.4f}, {result.parameters:,} parameters, "
          f"parity {result.parity_max_abs_diff:.2e}, {result.build_seconds:.1f} s -> {args.repo / NAME}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
