"""pyarrow for `modelserve predict`'s Parquet input and output: an optional extra (`parquet`), not a server
dependency (170 MB of the image); JSONL, folders and .npy need none of it."""

from __future__ import annotations

from typing import Any


def parquet(what: str) -> Any:
    """`pyarrow.parquet`, or ValueError naming the extra (`modelserve predict` prints it as one line)."""
    try:
        # NOTE: imported on demand: pyarrow is the optional `parquet` extra.
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{what} needs pyarrow: pip install 'modelserve[parquet]' (or use .jsonl)") from None
    return pq
