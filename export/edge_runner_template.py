"""Edge runner for one modelserve bundle: verify checksums, preprocess inputs, run ONNX Runtime, print JSON.

Shipped as ``run.py`` inside every bundle written by ``modelserve edge-bundle``. It needs only
``onnxruntime`` and ``numpy`` (plus ``tokenizers`` for text models); everything model-specific is read
from ``preprocess.json`` and ``manifest.json`` next to it.

    python run.py --image digit.npy            # cnn: .npy ([H,W], [N,H,W] or [N,1,H,W]) or 8-bit .png
    python run.py --text "hello" --text "hi"   # transformer / transformer-classifier
    python run.py --audio clip.wav             # speech: PCM .wav (any rate, resampled to 16 kHz) or .npy
    python run.py --user-id 3 --user-id 7      # recommender

Exit status: 0 ok, 2 bad input, 3 bundle integrity check failed (a file was changed or is missing).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import struct
import sys
import wave
import zlib
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


class BundleError(RuntimeError):
    """The bundle's files do not match manifest.json."""


def verify(bundle: Path) -> dict:
    """Check every file listed in manifest.json against its SHA-256 and size; return the manifest."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    problems = []
    for rel, entry in manifest["files"].items():
        path = bundle / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
            continue
        data = path.read_bytes()
        if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            problems.append(f"{rel}: checksum mismatch (expected sha256 {entry['sha256'][:16]}..., "
                            f"{entry['bytes']} bytes; found {len(data)} bytes)")
    if problems:
        raise BundleError("bundle integrity check failed: " + "; ".join(problems))
    return manifest


# --- images -------------------------------------------------------------------------------------------

def decode_png(data: bytes) -> np.ndarray:
    """8-bit grayscale / gray+alpha / RGB / RGBA non-interlaced PNG -> float gray [H, W] in [0, 1].

    NOTE: written with the stdlib (zlib) so the runner does not need Pillow on the device.
    """
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG file")
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    if header is None:
        raise ValueError("PNG without IHDR chunk")
    width, height, depth, color, _, _, interlace = header
    channels = {0: 1, 4: 2, 2: 3, 6: 4}.get(color)
    if depth != 8 or channels is None or interlace:
        raise ValueError(f"PNG with bit depth {depth}, colour type {color}, interlace {interlace}: "
                         "expected 8-bit gray, gray+alpha, RGB or RGBA, not interlaced")
    pixels = _unfilter(zlib.decompress(idat), width=width, height=height, bpp=channels)
    image = pixels.reshape(height, width, channels).astype(np.float32) / 255.0
    return image[..., :3].mean(axis=-1) if channels >= 3 else image[..., 0]


def _unfilter(raw: bytes, *, width: int, height: int, bpp: int) -> np.ndarray:
    """Undo the five PNG scanline filters (PNG spec section 9)."""
    stride = width * bpp
    out = np.zeros((height, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.int32)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], np.frombuffer(raw, np.uint8, stride, y * (stride + 1) + 1)
        cur = line.astype(np.int32)
        if kind == 2:
            cur = (cur + prev) & 255
        elif kind in (1, 3, 4):
            cur = cur.copy()
            for x in range(stride):
                a = cur[x - bpp] if x >= bpp else 0
                c = prev[x - bpp] if x >= bpp else 0
                if kind == 1:
                    pred = a
                elif kind == 3:
                    pred = (a + prev[x]) // 2
                else:
                    p = a + prev[x] - c
                    pa, pb, pc = abs(p - a), abs(p - prev[x]), abs(p - c)
                    pred = a if pa <= pb and pa <= pc else (prev[x] if pb <= pc else c)
                cur[x] = (cur[x] + pred) & 255
        out[y] = cur
        prev = cur
    return out


def resize_bilinear(image: np.ndarray, side: int) -> np.ndarray:
    """Bilinear resize of [H, W] to [side, side] (half-pixel centres, like align_corners=False)."""
    h, w = image.shape
    ys = np.clip((np.arange(side) + 0.5) * h / side - 0.5, 0, h - 1)
    xs = np.clip((np.arange(side) + 0.5) * w / side - 0.5, 0, w - 1)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    top = image[y0][:, x0] * (1 - fx) + image[y0][:, x1] * fx
    bottom = image[y1][:, x0] * (1 - fx) + image[y1][:, x1] * fx
    return (top * (1 - fy) + bottom * fy).astype(np.float32)


def load_images(paths: list[str], spec: dict) -> np.ndarray:
    side, batch = spec["side"], []
    for name in paths:
        if name.endswith(".png"):
            arrays = decode_png(Path(name).read_bytes())[None]
        else:
            arrays = np.load(name)
            scale = 255.0 if arrays.dtype == np.uint8 else 1.0
            arrays = arrays.astype(np.float32) / scale
            arrays = arrays.reshape(-1, *arrays.shape[-2:])  # [H,W], [N,H,W], [N,1,H,W] -> [N,H,W]
        for image in arrays:
            if image.shape != (side, side):
                image = resize_bilinear(image, side)
            batch.append(1.0 - image if spec.get("invert") else image)
    return np.stack(batch)[:, None].astype(np.float32)


# --- audio, text, users -------------------------------------------------------------------------------

def load_audio(paths: list[str], spec: dict) -> list[np.ndarray]:
    """Mono float waveforms at the model's rate: .wav (16-bit PCM, any rate) or .npy (already at rate)."""
    clips = []
    for name in paths:
        if not name.endswith(".wav"):
            clips.append(np.load(name).astype(np.float32).reshape(-1))
            continue
        with wave.open(name, "rb") as handle:
            if handle.getsampwidth() != 2:
                raise ValueError(f"{name}: {8 * handle.getsampwidth()}-bit WAV; expected 16-bit PCM")
            rate, channels = handle.getframerate(), handle.getnchannels()
            pcm = np.frombuffer(handle.readframes(handle.getnframes()), "<i2").astype(np.float32) / 32768.0
        clips.append(resample(pcm.reshape(-1, channels).mean(axis=1), rate=rate, target=spec["sample_rate"]))
    return clips


def resample(audio: np.ndarray, *, rate: int, target: int) -> np.ndarray:
    """Linear-interpolation resampling (enough for keyword spotting; no scipy on the device)."""
    if rate == target:
        return audio.astype(np.float32)
    n_out = max(1, round(len(audio) * target / rate))
    return np.interp(np.arange(n_out) * rate / target, np.arange(len(audio)), audio).astype(np.float32)


def tokenize(texts: list[str], spec: dict) -> tuple[np.ndarray, np.ndarray]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(HERE / spec["tokenizer"]))
    encodings = tokenizer.encode_batch(texts)
    ids = np.array([e.ids for e in encodings], dtype=np.int64)
    return ids, np.array([e.attention_mask for e in encodings], dtype=np.int64)


# --- running ------------------------------------------------------------------------------------------

def session(model_file: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(HERE / model_file), options, providers=["CPUExecutionProvider"])


def feeds(args: argparse.Namespace, spec: dict) -> list[dict[str, np.ndarray]]:
    """One feed dict per model call (audio clips of different lengths run one at a time)."""
    kind = spec["kind"]
    if kind == "image" and args.image:
        return [{spec["inputs"][0]: load_images(args.image, spec)}]
    if kind == "text" and (args.text or args.text_file):
        texts = list(args.text or []) + [line for f in args.text_file or [] for line in
                                         Path(f).read_text().splitlines() if line.strip()]
        ids, mask = tokenize(texts, spec)
        return [dict(zip(spec["inputs"], (ids, mask)))]
    if kind == "audio" and args.audio:
        return [{spec["inputs"][0]: clip[None]} for clip in load_audio(args.audio, spec)]
    if kind == "user_id" and args.user_id:
        return [{spec["inputs"][0]: np.array(args.user_id, dtype=np.int64).reshape(-1, 1)}]
    flag = {"image": "--image", "text": "--text/--text-file", "audio": "--audio", "user_id": "--user-id"}[kind]
    raise ValueError(f"this bundle holds a {kind} model: give its inputs with {flag}")


def predictions(outputs: dict[str, np.ndarray], spec: dict, labels: list[str]) -> list[dict]:
    rows = []
    for i in range(len(next(iter(outputs.values())))):
        row: dict = {name: value[i].tolist() for name, value in outputs.items()}
        if labels and spec.get("class_output") in outputs:
            probs = outputs[spec["class_output"]][i]
            best = int(np.argmax(probs))
            row.update(label=labels[best], index=best, probability=float(probs[best]))
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", action="append", help=".npy or 8-bit .png (repeatable)")
    parser.add_argument("--text", action="append", help="a text to encode (repeatable)")
    parser.add_argument("--text-file", action="append", help="a UTF-8 file, one text per line")
    parser.add_argument("--audio", action="append", help=".wav (16-bit PCM) or .npy waveform (repeatable)")
    parser.add_argument("--user-id", action="append", type=int, help="a user id (repeatable)")
    parser.add_argument("--onnx", action="store_true", help="run model.onnx instead of the ORT-format model")
    args = parser.parse_args(argv)
    try:
        manifest = verify(HERE)
    except BundleError as exc:
        print(json.dumps({"error": str(exc)}), file=sys.stderr)
        return 3
    spec = json.loads((HERE / "preprocess.json").read_text())
    labels = (HERE / spec["labels"]).read_text().splitlines() if spec.get("labels") else []
    try:
        batches = feeds(args, spec)
    except (ValueError, OSError) as exc:
        print(json.dumps({"error": f"bad input: {exc}"}), file=sys.stderr)
        return 2
    sess = session(manifest["onnx_file"] if args.onnx else manifest["ort_file"])
    names = [o.name for o in sess.get_outputs()]
    rows = []
    for feed in batches:
        rows += predictions(dict(zip(names, sess.run(None, feed))), spec, labels)
    print(json.dumps({"model": manifest["model"], "variant": manifest["variant"], "predictions": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
