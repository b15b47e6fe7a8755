"""The same job on Ray Data: `map_batches` over an actor pool, one ONNX Runtime session per actor.

The driver streams the input in windows (the part size) with the same readers as the local engine, so resume
and the output layout are identical; each window becomes a Ray dataset whose batches run on actors, wherever
the cluster places them (`num_gpus=1` per actor when the cluster has GPUs). Per window, Ray starts the actor
pool again, so use large parts (`--part-rows`) on a cluster.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np

# NOTE: ray is an optional extra (`pip install -e '.[ray]'`); this module is imported only for --engine ray.
import ray

from service.offline.engine import load_model, predict_items
from service.offline.writers import COLUMNS


class _Predictor:
    """Ray actor: loads the model once, then predicts batches of pickled Items."""

    def __init__(self, model_dir: str, params: dict) -> None:
        self.model = load_model(Path(model_dir))
        self.params = params

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        items = [pickle.loads(blob) for blob in batch["item"]]
        rows = predict_items(self.model, items, params=self.params)
        # NOTE: results travel back as JSON text: Ray would otherwise infer one Arrow struct per block (and turn
        # nested lists into numpy arrays); the driver decodes them, so both engines write the same rows.
        for r in rows:
            r["result"] = json.dumps(r["result"]) if r["result"] is not None else None
        return {c: [r[c] for r in rows] for c in COLUMNS}


class RayEngine:
    def __init__(self, model_dir: Path, *, batch_size: int, params: dict, actors: int) -> None:
        if not ray.is_initialized():
            ray.init()  # joins the cluster named by RAY_ADDRESS, or starts a local one
        self.task = load_model(model_dir, threads=1).processor.task
        self.model_dir, self.batch_size, self.params = model_dir, batch_size, params
        gpus = ray.cluster_resources().get("GPU", 0)
        self.num_gpus = 1 if gpus >= 1 else 0
        self.actors = max(1, min(actors, int(gpus))) if self.num_gpus else max(1, actors)

    def predict(self, items: list) -> list[dict]:
        # NOTE: items are pickled into one binary column because Arrow blocks need one type per column and
        # payloads are bytes, str, int, arrays or read errors depending on the input.
        ds = ray.data.from_items([{"item": pickle.dumps(it)} for it in items])
        out = ds.map_batches(_Predictor, batch_size=self.batch_size, batch_format="numpy",
                             fn_constructor_kwargs={"model_dir": str(self.model_dir), "params": self.params},
                             concurrency=self.actors, num_gpus=self.num_gpus)
        rows = [{k: _plain(v) for k, v in r.items()} for r in out.take_all()]
        for r in rows:
            r["result"] = json.loads(str(r["result"])) if r["result"] is not None else None
        rows.sort(key=lambda r: int(r["row"]))  # type: ignore[call-overload]
        return rows

    def close(self) -> None:
        pass


def _plain(value: object) -> object:
    """Arrow/numpy scalars back to Python values, so both engines write identical rows."""
    if isinstance(value, np.generic):
        return value.item()
    return value
