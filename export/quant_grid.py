"""Pick the static INT8 layout (QDQ vs QOperator, per-channel, reduce_range, activation symmetry) by
measurement on this CPU, not by default.

Every layout of ``GRID`` is quantized (MinMax calibration, the model's static op types), scored on the
held-out split, and the ones within the accuracy budget (or, when none is, the most accurate) are timed
side by side with FP32 in one interleaved run at batch 1 and 32. The winner has the lowest geometric mean
of its median INT8/FP32 ratios, but it replaces the default layout only when its whole CI lies below the
default's median at every batch size: otherwise reruns would flip between layouts within the noise. Each row
keeps the ratios' bootstrap CI so the choice can be checked.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import numpy as np

from export import quantize
from export.common import ParentModel, check_budget, latency_samples
from export.gate import GATE_BATCHES
from export.heldout import HeldOut, evaluate
from export.int8_measure import RatioCI, ratio_cis

GRID = [quantize.QuantConfig(fmt, per_channel, reduce_range, symmetric)
        for fmt, per_channel, reduce_range, symmetric in itertools.product(
            ("QDQ", "QOperator"), (True, False), (False, True), (False, True))]
GRID_METHOD = "MinMax"


def _build(parent: ParentModel, heldout: HeldOut, *, pre: Path, work_dir: Path, fp32_metrics: dict[str, float],
           reference: list[np.ndarray] | None) -> list[dict[str, Any]]:
    rows = []
    frontend = quantize.fixed_fp32_nodes(pre, family=parent.family)
    for i, config in enumerate(GRID):
        out = work_dir / f"{parent.name}-grid{i}.onnx"
        quantize.quantize_static_model(pre, out, method=GRID_METHOD, calibration=heldout.calibration,
                                       op_types=quantize.static_ops(parent.name), exclude=frontend, config=config)
        metrics = evaluate(parent, out, heldout, reference=reference)
        verdict = check_budget(model=parent.name, variant_metrics=metrics, fp32_metrics=fp32_metrics)
        rows.append({"config": config, "path": out, "verdict": verdict})
    return rows


def _shortlist(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    within = [r for r in rows if r["verdict"].ok]
    if within:
        return within
    best = max(r["verdict"].value for r in rows)
    return [r for r in rows if r["verdict"].value >= best - 1e-9]


def pick(cis: dict[str, dict[int, RatioCI]], *, default: str | None) -> str:
    """Key of the fastest layout (geometric mean of median ratios); ``default`` unless clearly beaten."""
    score = {k: math.exp(sum(math.log(ci.median) for ci in per.values()) / len(per)) for k, per in cis.items()}
    best = min(score, key=score.__getitem__)
    if default is None or default not in cis or best == default:
        return best
    clearly = all(ci.high < cis[default][b].median for b, ci in cis[best].items())
    return best if clearly else default


def choose_config(parent: ParentModel, heldout: HeldOut, *, work_dir: Path, fp32_metrics: dict[str, float],
                  reference: list[np.ndarray] | None = None, repeats: int = 15,
                  threads: int = 1) -> tuple[quantize.QuantConfig, list[dict[str, Any]]]:
    """The measured best layout for ``parent`` and one report row per layout tried."""
    work_dir.mkdir(parents=True, exist_ok=True)
    pre = quantize.preprocess(parent.onnx_path, work_dir / f"{parent.name}-grid-pre.onnx")
    rows = _build(parent, heldout, pre=pre, work_dir=work_dir, fp32_metrics=fp32_metrics, reference=reference)
    timed = {str(i): r["path"] for i, r in enumerate(rows) if r in _shortlist(rows)}
    samples = latency_samples({"fp32": parent.onnx_path, **timed}, feeds={b: heldout.batch(b) for b in GATE_BATCHES},
                              repeats=repeats, warmup=1, threads=threads)
    cis = ratio_cis(samples)
    best = pick(cis, default=str(GRID.index(quantize.DEFAULT_CONFIG)))
    report = [{"config": r["config"].label(), "within_budget": r["verdict"].ok, "value": r["verdict"].value,
               "ratio_ci": {str(b): ci.as_dict() for b, ci in cis.get(str(i), {}).items()},
               "chosen": str(i) == best} for i, r in enumerate(rows)]
    return rows[int(best)]["config"], report
