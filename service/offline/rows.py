"""A window's output rows, kept as the model batches' result columns where the processor gives them.

A batch whose processor has `postprocess_columns` (the recommender) stays columnar from the model's outputs to
the Parquet part: no dict per row, no type inference over dicts. Rows are materialised as dicts only where
something asks for them (JSONL output, the row-by-row API); both give the values `postprocess` gives.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

# NOTE: pyarrow imports below are deferred: it is the optional `parquet` extra (JSONL output needs none of it).

COLUMNS = ("row", "id", "ok", "error", "result")


class Columnar(Protocol):
    """A batch's results as columns (e.g. processing.recommender.UserColumns)."""

    def __len__(self) -> int: ...

    def rows(self) -> list[dict]: ...

    def arrow(self) -> Any: ...


@dataclass
class ColumnSegment:
    """Consecutive input rows: their items, each row's error (None where it ran) and the results of the rows that
    ran, in order, as columns."""

    items: list
    errors: list[str | None]
    results: Columnar

    def __len__(self) -> int:
        return len(self.items)

    @property
    def failed(self) -> int:
        return sum(error is not None for error in self.errors)

    def dicts(self) -> list[dict]:
        results = iter(self.results.rows())
        return [{"row": it.row, "id": it.id, "ok": error is None, "error": error,
                 "result": next(results) if error is None else None} for it, error in zip(self.items, self.errors)]

    def table(self) -> Any:
        import pyarrow as pa

        ok = [error is None for error in self.errors]
        results = self.results.arrow()
        if not all(ok):  # each row's position among the results, null for a failed row: `take` gives it null
            results = results.take(pa.array(_positions(ok), pa.int64()))
        return base_table([it.row for it in self.items], [it.id for it in self.items], ok, self.errors) \
            .append_column("result", results)


def _positions(ok: list[bool]) -> list[int | None]:
    out: list[int | None] = []
    n = 0
    for good in ok:
        out.append(n if good else None)
        n += good
    return out


class Segment(Protocol):
    """Consecutive output rows kept as columns (ColumnSegment, columnar.UserSegment)."""

    def __len__(self) -> int: ...

    @property
    def failed(self) -> int: ...

    def dicts(self) -> list[dict]: ...

    def table(self) -> Any: ...


class Rows:
    """Output rows of one window in input order: segments of plain row dicts or of columnar batches."""

    def __init__(self, segments: Sequence[list[dict] | Segment]) -> None:
        self.segments = list(segments)

    def __len__(self) -> int:
        return sum(len(s) for s in self.segments)

    def __iter__(self) -> Iterator[dict]:
        return iter(self.dicts())

    def dicts(self) -> list[dict]:
        return [row for s in self.segments for row in (s if isinstance(s, list) else s.dicts())]

    @property
    def failed(self) -> int:
        return sum(sum(not r["ok"] for r in s) if isinstance(s, list) else s.failed for s in self.segments)

    def table(self) -> Any:
        """One Arrow table (COLUMNS; `result` a struct column) of every row, segments' result types unified."""
        import pyarrow as pa

        tables = [dict_table(s) if isinstance(s, list) else s.table() for s in _joined(self.segments)]
        return pa.concat_tables(tables, promote_options="permissive")


def _joined(segments: list[list[dict] | Segment]) -> list[list[dict] | Segment]:
    """Runs of consecutive ColumnSegments whose results can be joined (a `concat` of one type) as one segment
    each: one Arrow table per window instead of one per model batch (the same rows and values)."""
    runs: list[list] = []
    for seg in segments:
        last = runs[-1][-1] if runs else None
        if isinstance(seg, ColumnSegment) and isinstance(last, ColumnSegment) \
                and type(seg.results) is type(last.results) and hasattr(seg.results, "concat"):
            runs[-1].append(seg)
        else:
            runs.append([seg])
    out: list[list[dict] | Segment] = []
    for run in runs:
        joined = type(run[0].results).concat([s.results for s in run]) if len(run) > 1 else None
        if joined is None:  # one segment, or results that cannot share columns (e.g. another k)
            out += run
            continue
        out.append(ColumnSegment([it for s in run for it in s.items], [e for s in run for e in s.errors], joined))
    return out


def failed_rows(rows: Rows | list[dict]) -> int:
    return rows.failed if isinstance(rows, Rows) else sum(not r["ok"] for r in rows)


def base_schema() -> Any:
    """Every column but `result`, whose struct type depends on the model (inferred from the results)."""
    import pyarrow as pa

    return pa.schema([("row", pa.int64()), ("id", pa.string()), ("ok", pa.bool_()), ("error", pa.string())])


def base_table(rows: list[int], ids: list[str], ok: list[bool], errors: list[str | None]) -> Any:
    import pyarrow as pa

    return pa.Table.from_arrays([pa.array(rows, pa.int64()), pa.array(ids, pa.string()), pa.array(ok, pa.bool_()),
                                 pa.array(errors, pa.string())], schema=base_schema())


def dict_table(rows: list[dict]) -> Any:
    """Row dicts as a table; the result struct type is inferred from these rows' results (rows that all failed
    give type null)."""
    import pyarrow as pa

    base = base_table([r["row"] for r in rows], [r["id"] for r in rows], [r["ok"] for r in rows],
                      [r["error"] for r in rows])
    return base.append_column("result", pa.array([r["result"] for r in rows]))
