"""Crash-safe output: numbered part files, each committed atomically, plus a progress record.

Layout while running: `<output>.parts/part-00000.parquet`, ... and `<output>.parts/progress.json`
(`{"rows": committed rows, "parts": committed parts, "model": ..., "input": ...}`). A part is written to a
temporary name and renamed, then progress.json is rewritten the same way; a part written without its
progress update is simply rewritten on resume, so no row is ever written twice. When every row is done the
parts are assembled (streamed, one part at a time) into `<output>` and the parts folder is removed. A job that
is one part from the start (`write_output`) is written straight to `<output>` (one atomic rename): no parts
folder, progress record or assembly; interrupted before the rename, it left nothing and starts over.

`result` is stored as an object, never as a JSON string inside JSON: in JSONL a nested JSON object (exactly
what the task endpoint returns for the item); in Parquet a struct column whose type is inferred from the
results, or built from a batch's result columns where the processor gives them (rows.py; the same type as
inference gives) (each part has its own; at assembly the parts' types are unified, so a field only some rows have,
such as the recommender's `fallback`, is one nullable column). Reading it back (`pq.read_table(...).to_pylist()`)
gives the same dicts, lists, strings and numbers, except that a field a row's result lacks reads back as null
(`{k: v for k, v in result.items() if v is not None}` restores the endpoint's object). A failed row's result
is null.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import threading
from pathlib import Path

import orjson

from service.offline.arrow import parquet
from service.offline.rows import COLUMNS, Rows, base_schema, dict_table

__all__ = ["COLUMNS", "BackgroundWriter", "OnePart", "PartWriter"]


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a half-written file is never left beside the output
        raise
    os.replace(tmp, path)


class PartWriter:
    def __init__(self, output: Path, *, job: dict, resume: bool) -> None:
        self.output = output
        self.fmt = "jsonl" if output.suffix.lower() in (".jsonl", ".ndjson") else "parquet"
        if self.fmt == "parquet":
            parquet(f"Parquet output {output}")  # before any file is written: the extra's name if it is missing
        self.parts_dir = output.with_name(output.name + ".parts")
        self.progress_path = self.parts_dir / "progress.json"
        self.job = job
        self.rows, self.parts = 0, 0
        self.done = resume and output.exists() and not self.parts_dir.exists()
        if self.done:  # resuming a run that already finished: nothing to write; report what it holds
            self.rows = self._output_rows()
            return
        if self.parts_dir.exists() and not resume:
            raise FileExistsError(f"{self.parts_dir} holds an unfinished run; pass --resume to continue it "
                                  "or delete the folder to start over")
        if output.exists() and not resume:
            raise FileExistsError(f"output {output} exists; delete it or choose another --output")
        if resume and self.progress_path.is_file():
            state = json.loads(self.progress_path.read_text())
            if state.get("job") != job:
                raise ValueError(f"cannot resume: {self.parts_dir} was written by job {state.get('job')}, "
                                 f"not {job}")
            self.rows, self.parts = int(state["rows"]), int(state["parts"])
        if self.fmt == "parquet":  # import pyarrow (and the pandas it pulls in) now, not inside the timed run
            # NOTE: pyarrow imports in this module are deferred: it is the optional `parquet` extra (checked above).
            import pyarrow as pa

            pa.Table.from_pylist([], schema=base_schema())

    def _output_rows(self) -> int:
        if self.fmt == "jsonl":
            with self.output.open("rb") as handle:
                return sum(1 for line in handle if line.strip())
        import pyarrow.parquet as pq

        return int(pq.ParquetFile(self.output).metadata.num_rows)

    def commit(self, rows: Rows | list[dict]) -> None:
        """Write one part (rows in input order, continuing from self.rows) and record it."""
        if not len(rows):
            return
        self.parts_dir.mkdir(parents=True, exist_ok=True)  # here, not up front: a one-part job never needs it
        part = self.parts_dir / f"part-{self.parts:05d}.{self.fmt}"
        _atomic_write(part, lambda tmp: self._write_rows(tmp, rows))
        self.rows += len(rows)
        self.parts += 1
        state = {"rows": self.rows, "parts": self.parts, "job": self.job}
        _atomic_write(self.progress_path, lambda tmp: tmp.write_text(json.dumps(state)))

    def fits_one_part(self, rows: int | None, *, part_rows: int) -> bool:
        """Whether a job of `rows` rows (None: not known up front) can go straight to the output: nothing of it
        committed yet and no more than one part's rows."""
        return rows is not None and 0 < rows <= part_rows and self.parts == 0 and not self.parts_dir.exists()

    def write_output(self, rows: Rows | list[dict]) -> None:
        """The whole job's rows written as the output itself (atomically), as `commit` + `finish` would give it."""
        _atomic_write(self.output, lambda tmp: self._write_rows(tmp, rows, final=True))
        self.rows += len(rows)
        self.done = True

    def _write_rows(self, path: Path, rows: Rows | list[dict], *, final: bool = False) -> None:
        if self.fmt == "jsonl":
            dicts = rows.dicts() if isinstance(rows, Rows) else rows
            # orjson: one bytes write per part, ~10x json.dumps per row; the same JSON values.
            path.write_bytes(b"".join(orjson.dumps(r, option=orjson.OPT_APPEND_NEWLINE) for r in dicts))
            return
        import pyarrow.parquet as pq

        # Columnar batches go to Arrow as they are; dict rows' struct type is inferred from their results. A part
        # is read once, at assembly: no dictionary pages (half the write time of a recommender part). The output
        # itself keeps them, as the assembly writes it.
        pq.write_table(rows.table() if isinstance(rows, Rows) else dict_table(rows), path, use_dictionary=final)

    def finish(self) -> None:
        """Assemble the committed parts into the output (atomically) and remove the parts folder."""
        parts = [self.parts_dir / f"part-{i:05d}.{self.fmt}" for i in range(self.parts)]
        if self.fmt == "jsonl":
            def write(tmp: Path) -> None:
                with tmp.open("wb") as out:
                    for p in parts:
                        with p.open("rb") as src:
                            shutil.copyfileobj(src, out)
        else:
            def write(tmp: Path) -> None:
                import pyarrow as pa
                import pyarrow.parquet as pq

                unified = pa.unify_schemas([pq.read_schema(p) for p in parts] or [base_schema()],
                                           promote_options="permissive")
                with pq.ParquetWriter(tmp, unified) as out:
                    for p in parts:
                        table = pq.read_table(p)
                        if not table.schema.equals(unified):  # rebuilt by name: missing struct fields become null
                            table = pa.Table.from_pylist(table.to_pylist(), schema=unified)
                        out.write_table(table)
        _atomic_write(self.output, write)
        shutil.rmtree(self.parts_dir, ignore_errors=not parts)  # no part: the folder may never have been made


class BackgroundWriter:
    """`PartWriter.commit` in a thread, so a part is written while the engine computes the next window.

    At most `depth` finished windows wait in the queue (a full queue blocks the engine: memory stays bounded).
    Parts are committed one at a time in the order given, each exactly as `PartWriter.commit` does it, so output
    order and --resume are unchanged; after a failed commit nothing more is written and the error is raised to
    the caller at its next `commit` or at `close`.
    """

    def __init__(self, writer: PartWriter, *, depth: int = 1) -> None:
        self.writer = writer
        self.queue: queue.Queue[Rows | list[dict] | None] = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="part-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (rows := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.writer.commit(rows)
                except BaseException as exc:  # handed to the caller's thread, raised there
                    self.error = exc

    def commit(self, rows: Rows | list[dict]) -> None:
        self._raise()
        self.queue.put(rows)

    def close(self, *, raise_error: bool = True) -> None:
        """Wait until every queued part is committed (or the writer failed)."""
        self.queue.put(None)
        self.thread.join()
        if raise_error:
            self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error


class OnePart:
    """`BackgroundWriter`'s interface for a job that is one part (`PartWriter.fits_one_part`): its rows are written
    straight to the output, in the caller's thread, when they come (no thread to start or wait for)."""

    def __init__(self, writer: PartWriter) -> None:
        self.writer = writer

    def commit(self, rows: Rows | list[dict]) -> None:
        if self.writer.done:  # the input gave more rows than it said it holds: never overwrite what was written
            raise RuntimeError(f"{self.writer.output} is written already; the input holds more rows than it declared")
        self.writer.write_output(rows)

    def close(self, *, raise_error: bool = True) -> None:
        del raise_error  # nothing runs in the background: an error was raised at `commit`
