"""The same job on Ray Data: one dataset for the whole job, `map_batches` over one actor pool, one ONNX Runtime
session per actor.

The driver reads the input in windows (the part size) with the same readers as the local engine, so resume and
the output layout are identical. Each window goes into the object store as one Arrow block per actor (whole
model batches; native columns, see ray_blocks.py); the blocks form ONE dataset whose blocks each make one call
on a fixed-size actor pool sized to the cluster (`num_gpus=1` per actor when it has GPUs), which runs the block
in `--batch-size` model runs on the local engine's path (prepared a block at a time, text by length); results stream back in input order (`preserve_order`) to be committed part by
part. The pool is started once per job, not once per part. Throughput figures: docs/BENCHMARKS.md.
"""

from __future__ import annotations

import logging
import os
import socket
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import orjson

# NOTE: ray is an optional extra (`pip install -e '.[ray]'`); this module is imported only for --engine ray.
import ray
from ray.exceptions import AuthenticationError

from service.offline.engine import load_model, predict_window
from service.offline.ray_blocks import from_columns, to_block
from service.offline.writers import COLUMNS


class _Predictor:
    """Ray actor: loads the model once, then predicts whole blocks (many model batches per call) on the local
    engine's path: the block prepared at once (images laid out a batch-wide array op at a time), text batched
    by token length, every row written back at its own position."""

    def __init__(self, model_dir: str, params: dict, batch_size: int) -> None:
        self.model = load_model(Path(model_dir), threads=1)  # one CPU per actor: the pool is the parallelism
        self.params, self.batch_size = params, batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        rows = predict_window(self.model, from_columns(batch), params=self.params, batch_size=self.batch_size)
        # NOTE: results travel back as JSON text: Ray would otherwise infer one Arrow struct per block (and turn
        # nested lists into numpy arrays); the driver decodes them, so both engines write the same rows.
        for r in rows:
            r["result"] = orjson.dumps(r["result"]) if r["result"] is not None else None
        return {c: [r[c] for r in rows] for c in COLUMNS}


def connect(address: str | None) -> None:
    """Join the cluster at `address` (else RAY_ADDRESS, else start a local Ray); failures become one line that
    names the fix (ValueError, which `modelserve predict` prints without a traceback)."""
    if ray.is_initialized():
        return
    where = address or os.environ.get("RAY_ADDRESS") or "a local Ray"
    _check_reachable(address or os.environ.get("RAY_ADDRESS"))
    try:
        _check_token(address or os.environ.get("RAY_ADDRESS"))
        # NOTE: with no address, start a local Ray of our own ("local"): a bare ray.init() would join whatever
        # cluster /tmp/ray/ray_current_cluster names, even a dead one left by an earlier `ray start`.
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or "local", logging_level=logging.WARNING,
                 log_to_driver=False)
    except AuthenticationError:
        raise ValueError(f"the Ray cluster at {where} requires token authentication: set RAY_AUTH_MODE=token "
                         "and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the cluster's token") from None
    except ConnectionError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"cannot reach a Ray cluster at {where} ({first}); pass the head node's GCS address "
                         "as --ray-address HOST:PORT (see `ray status --address HOST:PORT`)") from None


def _check_reachable(address: str | None) -> None:
    """Fail in seconds on a GCS address nobody listens on: ray.init retries such an address for ~20 s, then
    raises from deep inside its worker start-up."""
    if not address or address == "auto" or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            pass
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot reach the Ray cluster at {address} ({exc}); pass the head node's GCS address "
                         "as --ray-address HOST:PORT (`ray start --head` prints it; default port 6379)") from None


def _check_token(address: str | None) -> None:
    """Raise AuthenticationError at once when the cluster wants a token we lack: ray.init itself retries for
    ~20 s, logging a warning a second, and then raises a ConnectionError that does not say why."""
    if not address or address == "auto" or "://" in address:
        return
    # NOTE: GcsClient is what `ray status` uses to reach a cluster; Ray has no public probe that fails fast.
    ray._raylet.GcsClient(address=address)  # type: ignore[attr-defined]


def block_rows(window: int, *, batch_size: int, actors: int) -> int:
    """Rows per block (one actor call): the window shared among the actors, in whole model batches."""
    share = -(-window // max(actors, 1))
    return max(batch_size, -(-share // batch_size) * batch_size)


def _pool_size(requested: int | None, *, gpus: float, cpus: float) -> int:
    """Actors for the job: one per GPU when the cluster has GPUs, else one per CPU; `requested` caps it."""
    fits = int(gpus) if gpus >= 1 else max(1, int(cpus))
    return max(1, min(requested, fits)) if requested else fits


class RayEngine:
    def __init__(self, model_dir: Path, *, batch_size: int, params: dict, actors: int | None,
                 address: str | None = None) -> None:
        connect(address)
        self.task = load_model(model_dir, threads=1).processor.task
        self.model_dir, self.batch_size, self.params = model_dir, batch_size, params
        resources = ray.cluster_resources()
        self.num_gpus = 1 if resources.get("GPU", 0) >= 1 else 0
        self.actors = _pool_size(actors, gpus=resources.get("GPU", 0), cpus=resources.get("CPU", 1))
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # parts are committed in input order
        context.enable_progress_bars = False  # the job's own tqdm bar counts rows
        # Ray Data logs its execution plan and a line per dataset at INFO; the job's summary line says enough.
        logging.getLogger("ray.data").setLevel(logging.ERROR)

    def predict(self, items: list) -> list[dict]:
        return next(self.predict_windows([items]), [])

    def predict_windows(self, windows: Iterable[list]) -> Iterator[list[dict]]:
        """Rows for each window, in order, from one dataset (one actor pool) over all windows."""
        sizes, blocks = [], []
        for window in windows:
            # Windows split into blocks of `chunk` rows: one block is one actor call, big enough to amortize
            # Ray Data's per-call cost over many model batches, small enough that a part feeds every actor.
            chunk = block_rows(len(window), batch_size=self.batch_size, actors=self.actors)
            blocks += [ray.put(to_block(window[i:i + chunk])) for i in range(0, len(window), chunk)]
            sizes.append(len(window))
        if not blocks:
            return
        rows = self._rows(ray.data.from_arrow_refs(blocks))  # type: ignore[arg-type]
        for size in sizes:
            yield [next(rows) for _ in range(size)]

    def _rows(self, ds: ray.data.Dataset) -> Iterator[dict]:
        # batch_size=None: each block is one batch; the actor runs it in model batches of --batch-size.
        out = ds.map_batches(_Predictor, batch_size=None, batch_format="numpy",
                             fn_constructor_kwargs={"model_dir": str(self.model_dir), "params": self.params,
                                                    "batch_size": self.batch_size},
                             compute=ray.data.ActorPoolStrategy(size=self.actors),
                             num_cpus=1, num_gpus=self.num_gpus)
        expected = None
        with warnings.catch_warnings():
            # NOTE: only Ray's own DeprecationWarnings (its internals calling its deprecated APIs) are hidden.
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray(\.|$)")
            for batch in out.iter_batches(batch_size=None, batch_format="pyarrow"):
                for row in batch.select(list(COLUMNS)).to_pylist():  # type: ignore[union-attr]
                    if expected is not None and row["row"] != expected:
                        raise RuntimeError(f"Ray returned row {row['row']} where row {expected} was due")
                    expected = row["row"] + 1
                    row["result"] = orjson.loads(row["result"]) if row["result"] is not None else None
                    yield row

    def close(self) -> None:
        pass

