"""`modelserve predict`: batch offline inference with the task endpoints' pre/post-processing.

Output: one row per input row, in input order, with columns `row` (0-based input row), `id` (the input's
`id` field, file path relative to the input folder, or the row number), `ok`, `error` (why a bad row
failed) and `result` (what `/v1/models/{name}/predict` returns for that item, as an object: a nested JSON
object in JSONL, a struct column in Parquet; see service/offline/writers.py). Parquet, or JSONL when --output
ends in .jsonl. See service/offline/writers.py for how --resume avoids losing or repeating rows.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from tqdm import tqdm

from service.offline.engine import LocalEngine
from service.offline.kinds import check_input, input_kind
from service.offline.readers import open_input
from service.offline.rows import failed_rows
from service.offline.writers import BackgroundWriter, OnePart, PartWriter
from service.settings import ServerSettings


@dataclass
class Summary:
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0

    @property
    def rows_per_s(self) -> float:
        return (self.ok + self.failed) / self.seconds if self.seconds > 0 else 0.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="modelserve predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model name (a folder of the model repository)")
    p.add_argument("--input", required=True, type=Path,
                   help="folder of images/WAVs, .jsonl or .parquet (text, user_id, path or b64; optional id), .npy")
    p.add_argument("--output", required=True, type=Path, help="output .parquet (default) or .jsonl")
    p.add_argument("--model-repository", type=Path, default=_default_repository(),
                   help="model repository directory (default: $MODELSERVE_MODEL_REPOSITORY or model_repository, "
                        "as `modelserve serve`)")
    p.add_argument("--batch-size", type=int, default=32, help="rows per model run (default 32)")
    p.add_argument("--part-rows", type=int, default=2048, help="rows per committed output part (default 2048)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run, skipping committed rows")
    p.add_argument("--engine", choices=["local", "ray"], default="local")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                   help="threads preparing rows (decode, resize, tokenise) for --engine local (default: cores)")
    p.add_argument("--ray-actors", type=int, default=None,
                   help="most actors (one ORT session, one CPU or GPU each) for --engine ray (default: fill the cluster)")
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster to run on, HOST:6379 of the head node (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--k", type=int, default=None, help="labels/items per row (the endpoint's k)")
    p.add_argument("--include-seen", action="store_true", help="recommender: keep items the user has seen")
    p.add_argument("--max-rows", type=int, default=None, help="stop after this many rows (later --resume goes on)")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.part_rows < 1:
        p.error("--batch-size and --part-rows must be positive")
    return args


def _default_repository() -> Path:
    return Path(os.environ.get("MODELSERVE_MODEL_REPOSITORY") or ServerSettings.model_fields["model_repository"].default)


def _model_dir(args: argparse.Namespace) -> Path:
    """The model's folder, or FileNotFoundError saying which repository was searched and what it holds."""
    repo = args.model_repository
    model_dir = repo / args.model
    if model_dir.is_dir():
        return model_dir
    if repo.is_dir():
        models = sorted(p.name for p in repo.iterdir() if p.is_dir() and not p.name.startswith("."))
        there = f"it holds {', '.join(models)}" if models else "it holds no models"
    else:
        there = "that folder does not exist"
    raise FileNotFoundError(f"no model {args.model!r} in model repository {repo.resolve()} ({there}); pass "
                            "--model-repository DIR (or set MODELSERVE_MODEL_REPOSITORY)")


def _engine(args: argparse.Namespace, model_dir: Path, params: dict):
    if args.engine == "ray":
        try:
            # NOTE: Ray is an optional extra, imported only when --engine ray asks for it.
            from service.offline.ray_engine import RayEngine
        except ImportError:
            raise ValueError("--engine ray needs Ray Data: pip install 'modelserve[ray]'") from None
        return RayEngine(model_dir, batch_size=args.batch_size, params=params, actors=args.ray_actors,
                         address=args.ray_address)
    return LocalEngine(model_dir, batch_size=args.batch_size, params=params, workers=args.workers,
                       decode_files=_holds_files(args.input))


def _holds_files(path: Path) -> bool | None:
    """Whether the input's rows are files worth decode processes (images; WAVs are read inline, see
    SpeechProcessor.prepare_inline), known up front; None when it cannot be told."""
    try:
        found = input_kind(path)
    except (OSError, ValueError):  # check_input reports what is wrong with the input
        return None
    return found is not None and found[0] in ("images", "files")


def run(args: argparse.Namespace) -> Summary:
    model_dir = _model_dir(args)
    params = {"k": args.k, "exclude_seen": not args.include_seen}
    job = {"model": args.model, "input": str(args.input.resolve()), "params": params}
    engine = _engine(args, model_dir, params)  # first: a model or engine problem leaves no parts folder behind
    try:
        check_input(args.input, model=args.model, task=engine.task)
        writer = PartWriter(args.output, job=job, resume=args.resume)
    except Exception:
        engine.close()
        raise
    summary = Summary(skipped=writer.rows)
    if writer.done:
        engine.close()
        return summary
    try:
        _predict(args, engine=engine, writer=writer, summary=summary)
    finally:
        engine.close()
    return summary


def _predict(args: argparse.Namespace, *, engine, writer: PartWriter, summary: Summary) -> None:
    """Every window through the engine, each committed in the background while the next one computes (a one-part
    job: written as the output when it is done)."""
    source = open_input(args.input, task=engine.task, start=writer.rows)
    items = itertools.islice(source.items, args.max_rows) if args.max_rows else source.items
    left = source.total - writer.rows if source.total is not None else None
    total = min(left, args.max_rows) if args.max_rows and left is not None else left
    t0 = time.perf_counter()
    # The whole rest of the input in one part is written in this thread, straight to the output: a writer thread
    # would only be waited for.
    one_part = total == left and writer.fits_one_part(left, part_rows=args.part_rows)
    background = OnePart(writer) if one_part else BackgroundWriter(writer)
    try:
        with tqdm(total=total, unit="rows", desc=f"predict {args.model}", dynamic_ncols=True) as bar:
            windows = _blocks(args, engine=engine, start=writer.rows) or \
                iter(lambda: list(itertools.islice(items, args.part_rows)), [])
            for rows in engine.predict_windows(windows):
                background.commit(rows)
                failed = failed_rows(rows)
                summary.ok += len(rows) - failed
                summary.failed += failed
                bar.update(len(rows))
    except BaseException:
        background.close(raise_error=False)  # the parts already queued are still committed
        raise
    background.close()
    summary.seconds = time.perf_counter() - t0
    if not writer.done and (args.max_rows is None or _exhausted(source, done=writer.rows)):
        writer.finish()


def _blocks(args: argparse.Namespace, *, engine, start: int):
    """Windows read as arrays where the engine can take them (LocalEngine.blocks), else None."""
    blocks = getattr(engine, "blocks", None)
    return blocks(args.input, start=start, part_rows=args.part_rows, limit=args.max_rows) if blocks else None


def _exhausted(source, *, done: int) -> bool:
    """True when the input has no row left (after --max-rows: then the output can be assembled now)."""
    return done >= source.total if source.total is not None else next(source.items, None) is None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(stderr=True)
    try:
        summary = run(args)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        console.print(f"modelserve predict: {exc}", style="red", markup=False, soft_wrap=True)
        return 2
    where = args.output if args.output.exists() else args.output.with_name(args.output.name + ".parts")
    console.print(f"rows ok: {summary.ok}, rows failed: {summary.failed}, skipped (already committed): "
                  f"{summary.skipped}, {summary.rows_per_s:.1f} rows/s over {summary.seconds:.1f} s -> {where}", soft_wrap=True)
    return 1 if summary.failed and not summary.ok else 0


if __name__ == "__main__":
    sys.exit(main())

