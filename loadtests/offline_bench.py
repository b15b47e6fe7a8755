"""Batch throughput: `modelserve predict` rows/s against the in-process ceiling, per model, same batch size.

The ceiling is ONNX Runtime alone on the same batches, collated beforehand (one session, same thread settings):
no file reading, decoding, tokenising, post-processing or output writing. The decode-inclusive ceiling adds the
processor's preparation (decode, lay out, tokenise) of rows already in memory, in one thread, with no framework
around it (no reader, pool, post-processing or writer): where decoding alone costs more than the model, this is
the ceiling that shows the overhead of our own code. `predict` is the full job on generated inputs of each kind
(PNG folder, .npy, JSONL texts, WAV folder, Parquet user ids). Writes a markdown table, JSON and a PNG plot.

    python -m loadtests.offline_bench --model-repository /tmp/tz --rows 2000 --batch-size 32

On a shared machine, `--repeats N` runs predict and the two ceilings of each case alternately N times (the same
minutes, the same load) and reports the medians; `fraction` is then the median of the N per-round fractions.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf
from PIL import Image
from rich.console import Console
from rich.table import Table

from models.speech_synth import synth_word
from service.offline import cli
from service.offline.engine import length_order, load_model
from service.offline.prepare import prepare_rows
from service.offline.readers import open_input

PART_ROWS = cli.parse_args(["--model", "m", "--input", "i", "--output", "o"]).part_rows  # predict's default
_WORDS = ["yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go"]


def make_input(kind: str, *, root: Path, rows: int) -> Path:
    """A benchmark input of `rows` rows of `kind` (png, npy, jsonl, wav, parquet)."""
    if kind == "png":
        # NOTE: scikit-learn is heavy to import (~1 s) and only this step needs it (train extra)
        from sklearn.datasets import load_digits

        images = load_digits().images
        folder = root / "png"
        folder.mkdir()
        for i in range(rows):
            pixels = (images[i % len(images)] / 16 * 255).astype(np.uint8)
            Image.fromarray(pixels).resize((64, 64)).save(folder / f"{i:06d}.png")
        return folder
    if kind == "npy":
        np.save(root / "x.npy", np.random.default_rng(0).random((rows, 28, 28), dtype=np.float32))
        return root / "x.npy"
    if kind == "jsonl":
        docs = [d for d in (getattr(str, n).__doc__ for n in dir(str)) if d] * 8
        path = root / "texts.jsonl"
        path.write_text("".join(json.dumps({"id": i, "text": docs[i % len(docs)]}) + "\n" for i in range(rows)))
        return path
    if kind == "wav":
        return _wav_folder(root / "wav", rows=rows)
    if kind == "parquet":
        pq.write_table(pa.table({"user_id": np.arange(rows) % 250}), root / "users.parquet")
        return root / "users.parquet"
    raise ValueError(f"unknown input kind {kind!r}")


def _wav_folder(folder: Path, *, rows: int) -> Path:
    folder.mkdir()
    clips = []
    for word in _WORDS:
        buf = io.BytesIO()
        sf.write(buf, synth_word(word, voice="en-us", rate=160, pitch=50), 16000, subtype="PCM_16", format="WAV")
        clips.append(buf.getvalue())
    for i in range(rows):
        (folder / f"{i:06d}.wav").write_bytes(clips[i % len(clips)])
    return folder


def ceiling(model_dir: Path, *, src: Path, batch_size: int, part_rows: int = PART_ROWS) -> float:
    """Rows/s of session.run alone over the same batches `predict` runs, prepared and collated beforehand:
    within each output part, text rows sorted by token length as `predict` batches them."""
    model = load_model(model_dir)
    items = [it for it in open_input(src, task=model.processor.task).items if it.error is None]
    prepared = [model.processor.prepare(it.payload, index=it.row) for it in items]
    batches = []
    for part in range(0, len(prepared), part_rows):
        rows = prepared[part:part + part_rows]
        rows = [rows[i] for i in length_order(rows)]
        batches += [model.processor.collate(rows[s:s + batch_size]) for s in range(0, len(rows), batch_size)]
    model.session.run(model.output_names, batches[0])  # warm-up, as predict's first batch pays for it
    t0 = time.perf_counter()
    for feeds in batches:
        model.session.run(model.output_names, feeds)
    return len(items) / (time.perf_counter() - t0)


def decode_ceiling(model_dir: Path, *, src: Path, batch_size: int, part_rows: int = PART_ROWS) -> tuple[float, float]:
    """(rows/s, preparation µs/row) of prepare + collate + session.run on rows read into memory beforehand, one
    batch after another in one thread (text sorted by length within each part, as `predict` does)."""
    model = load_model(model_dir)
    items = [it for it in open_input(src, task=model.processor.task).items if it.error is None]
    model.session.run(model.output_names, model.processor.collate(
        [p for p, _ in prepare_rows(model.processor, items[:batch_size])]))  # warm-up
    prepare_s, t0 = 0.0, time.perf_counter()
    for part in range(0, len(items), part_rows):
        t1 = time.perf_counter()
        rows = [p for p, error in prepare_rows(model.processor, items[part:part + part_rows]) if error is None]
        rows = [rows[i] for i in length_order(rows)]
        prepare_s += time.perf_counter() - t1
        for s in range(0, len(rows), batch_size):
            model.session.run(model.output_names, model.processor.collate(rows[s:s + batch_size]))
    return len(items) / (time.perf_counter() - t0), 1e6 * prepare_s / max(len(items), 1)


def end_to_end(model: str, *, repo: Path, src: Path, out: Path, batch_size: int) -> float:
    args = cli.parse_args(["--model", model, "--input", str(src), "--output", str(out),
                           "--model-repository", str(repo), "--batch-size", str(batch_size)])
    return cli.run(args).rows_per_s


CASES = [("cnn", "png"), ("cnn", "npy"), ("transformer-classifier", "jsonl"), ("transformer", "jsonl"),
         ("speech", "wav"), ("recommender", "parquet")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.offline_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--models", default=None, help="comma-separated subset of " + ",".join(m for m, _ in CASES))
    p.add_argument("--out-dir", type=Path, default=Path("bench_results"))
    p.add_argument("--repeats", type=int, default=1, help="rounds of predict/ceilings per case, medians reported")
    args = p.parse_args(argv)
    wanted = set(args.models.split(",")) if args.models else None
    present = [m for m, _ in CASES if (args.model_repository / m).is_dir() and (not wanted or m in wanted)]
    if not present:
        p.error(f"no model of {sorted({m for m, _ in CASES})} in {args.model_repository}; build a zoo first "
                "(`modelserve build`) or pass --model-repository")
    results = []
    with tempfile.TemporaryDirectory(prefix="batch-bench-") as tmp:
        for model, kind in CASES:
            if (wanted and model not in wanted) or not (args.model_repository / model).is_dir():
                continue
            root = Path(tmp) / f"{model}-{kind}"
            root.mkdir()
            src = make_input(kind, root=root, rows=args.rows)
            rounds = [_round(model, repo=args.model_repository, src=src, out=root / f"out{i}.parquet",
                             batch_size=args.batch_size) for i in range(max(args.repeats, 1))]
            e2e, top, with_decode, decode_us = (statistics.median(r[j] for r in rounds) for j in range(4))
            results.append({"model": model, "input": kind, "rows": args.rows, "batch_size": args.batch_size,
                            "predict_rows_s": round(e2e, 1), "ceiling_rows_s": round(top, 1),
                            "fraction": round(statistics.median(r[0] / r[1] for r in rounds), 3),
                            "prepare_us_per_row": round(decode_us, 1),
                            "decode_ceiling_rows_s": round(with_decode, 1),
                            "fraction_of_decode_ceiling": round(statistics.median(r[0] / r[2] for r in rounds), 3),
                            "rounds": [[round(x, 1) for x in r[:3]] for r in rounds]})
    _report(results, out_dir=args.out_dir)
    return 0


def _round(model: str, *, repo: Path, src: Path, out: Path, batch_size: int) -> tuple[float, float, float, float]:
    """(predict rows/s, ORT ceiling, decode-inclusive ceiling, preparation µs/row), one after another."""
    e2e = end_to_end(model, repo=repo, src=src, out=out, batch_size=batch_size)
    top = ceiling(repo / model, src=src, batch_size=batch_size)
    with_decode, decode_us = decode_ceiling(repo / model, src=src, batch_size=batch_size)
    return e2e, top, with_decode, decode_us


def _report(results: list[dict], *, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    table = Table(title="modelserve predict vs in-process ceiling (rows/s)")
    head = ["model", "input", "rows", "batch_size", "predict_rows_s", "ceiling_rows_s", "fraction",
            "prepare_us_per_row", "decode_ceiling_rows_s", "fraction_of_decode_ceiling"]
    for h in head:
        table.add_column(h)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        table.add_row(*(str(r[h]) for h in head))
        lines.append("| " + " | ".join(str(r[h]) for h in head) + " |")
    Console().print(table)
    (out_dir / "batch_predict.md").write_text("\n".join(lines) + "\n")
    (out_dir / "batch_predict.json").write_text(json.dumps(results, indent=2))
    _plot(results, out_dir / "batch_predict.png")


def _plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['model']}\n({r['input']})" for r in results]
    x = np.arange(len(results))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(results)), 4))
    ax.bar(x - 0.2, [r["ceiling_rows_s"] for r in results], 0.4, label="ORT ceiling (collated batches)")
    ax.bar(x + 0.2, [r["predict_rows_s"] for r in results], 0.4, label="modelserve predict (end to end)")
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("rows/s (log)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
