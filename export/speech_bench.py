"""Speech INT8 with the front end split off, measured: ``python -m export.speech_bench --model-repository ZOO``.

The served speech graph computes log-mel in-graph; INT8 quantizes the network only (export/speech_split.py).
This times, interleaved round by round at batch 1 and 32 (one ORT intra-op thread by default), five ways to
answer a batch of waveforms, each against the FP32 parent graph:

- ``int8``: the INT8 variant ``modelserve optimize`` builds (front end FP32 in the same graph, network INT8);
- ``int8-all``: everything quantized, front end included (why it is not done: its accuracy);
- ``fp32+numpy`` / ``int8+numpy``: NumPy log-mel (service/processing/logmel.py) then the network graph, FP32 or
  INT8 (what an edge bundle made with ``--speech-frontend numpy`` and a features-input model on the server run);
- ``front end (graph)``, ``net-fp32``, ``net-int8``: the parts alone (features computed before timing), to show
  where the time goes.
- ``--previous GRAPH``: another FP32 speech graph timed beside the parent (e.g. the same weights exported with
  an earlier front end, to measure what the export change bought).

Ratios are medians of per-round ratios with 95% bootstrap CIs (export.int8_measure.ratio_ci), plus
``int8+numpy`` against ``fp32+numpy`` (the INT8 gain on the network alone). Accuracy of each on the held-out
split, against the parent's budget. ``--runs`` timing runs reuse one quantization. Writes OUT.md / OUT.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from export import quantize, speech_split
from export.common import check_budget, load_parent, ort_session
from export.gate import GATE_BATCHES
from export.heldout import HeldOut, evaluate, load_heldout
from export.int8_measure import cpu_isa, isa_text, kernel_counts, kernels_text, ratio_ci
from service.processing.logmel import FEATURES, log_mel

Runner = Callable[[np.ndarray], np.ndarray]
PREVIOUS = "fp32 (--previous graph)"


def _graph(path: Path, threads: int) -> Runner:
    session = ort_session(path, threads=threads)
    return lambda wave: session.run(None, {speech_split.WAVEFORM: wave})[0]


def _numpy_front(path: Path, threads: int) -> Runner:
    session = ort_session(path, threads=threads)
    return lambda wave: session.run(None, {FEATURES: log_mel(wave)})[0]


def _features(path: Path, threads: int, waves: dict[int, np.ndarray]) -> Runner:
    """The network graph on features computed before timing (the network's own time)."""
    session = ort_session(path, threads=threads)
    feats = {len(w): log_mel(w) for w in waves.values()}
    return lambda wave: session.run(None, {FEATURES: feats[len(wave)]})[0]


def build(repo: Path, work: Path) -> tuple[HeldOut, dict[str, Any], dict[str, Path]]:
    """Held-out data, per-variant accuracy verdicts and the graphs: parent, INT8 (network only), INT8 (all),
    and the network-only graphs of the parent and of the INT8 variant."""
    parent = load_parent(repo, "speech")
    heldout = load_heldout(parent)
    fp32 = evaluate(parent, parent.onnx_path, heldout)
    result = quantize.quantize(parent, heldout, work_dir=work / "int8", fp32_metrics=fp32)
    pre = quantize.preprocess(parent.onnx_path, work / "all-pre.onnx")
    everything = quantize.quantize_static_model(pre, work / "int8-all.onnx", method=result.method,
                                                calibration=heldout.calibration,
                                                op_types=quantize.static_ops("speech"),
                                                exclude=[])
    paths = {"fp32": parent.onnx_path, "int8": result.path, "int8-all": everything,
             "net-fp32": speech_split.network_graph(parent.onnx_path, work / "net-fp32.onnx"),
             "net-int8": speech_split.network_graph(result.path, work / "net-int8.onnx"),
             "front": speech_split.frontend_graph(parent.onnx_path, work / "front.onnx")}
    metrics = {"fp32": fp32, "int8": result.metrics, "int8-all": evaluate(parent, everything, heldout),
               "fp32+numpy": _numpy_metrics(paths["net-fp32"], heldout),
               "int8+numpy": _numpy_metrics(paths["net-int8"], heldout)}
    verdicts = {k: check_budget(model="speech", variant_metrics=m, fp32_metrics=fp32).as_dict()
                for k, m in metrics.items()}
    about = {"method": result.method, "kept_fp32": result.kept_fp32, "verdicts": verdicts,
             "kernels": {k: kernel_counts(paths[k], heldout.batch(1)) for k in ("fp32", "int8", "int8-all")}}
    return heldout, about, paths


def _numpy_metrics(network: Path, heldout: HeldOut) -> dict[str, float]:
    run = _numpy_front(network, 2)
    pred = np.concatenate([run(f[speech_split.WAVEFORM]) for f in heldout.feeds]).argmax(axis=1)
    return {"accuracy": float((pred == heldout.labels).mean()), "test_examples": float(len(pred))}


def time_once(paths: dict[str, Path], heldout: HeldOut, *, threads: int, repeats: int) -> dict[str, Any]:
    """One interleaved run: per pipeline and batch, ms per round; ratio CIs against fp32 (and numpy pair)."""
    waves = {b: heldout.batch(b)[speech_split.WAVEFORM] for b in GATE_BATCHES}
    extra = {PREVIOUS: _graph(paths[PREVIOUS], threads)} if PREVIOUS in paths else {}
    runners = {"fp32": _graph(paths["fp32"], threads), "int8": _graph(paths["int8"], threads),
               "int8-all": _graph(paths["int8-all"], threads),
               "fp32+numpy": _numpy_front(paths["net-fp32"], threads),
               "int8+numpy": _numpy_front(paths["net-int8"], threads),
               "front end (graph)": _graph(paths["front"], threads),
               "net-fp32": _features(paths["net-fp32"], threads, waves),
               "net-int8": _features(paths["net-int8"], threads, waves), **extra}
    samples: dict[str, dict[int, list[float]]] = {n: {b: [] for b in waves} for n in runners}
    names, load = list(runners), os.getloadavg()[0]
    for index in range(repeats + 2):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            for batch, wave in waves.items():
                start = time.perf_counter()
                runners[name](wave)
                if index >= 2:  # two warm-up rounds
                    samples[name][batch].append((time.perf_counter() - start) * 1e3)
    ratios = {n: {b: ratio_ci(samples["fp32"][b], samples[n][b]).as_dict() for b in waves}
              for n in names if n != "fp32"}
    ratios["net-int8 vs net-fp32"] = {b: ratio_ci(samples["net-fp32"][b], samples["net-int8"][b]).as_dict()
                                      for b in waves}
    ratios["int8+numpy vs fp32+numpy"] = {b: ratio_ci(samples["fp32+numpy"][b], samples["int8+numpy"][b]).as_dict()
                                          for b in waves}
    return {"load_average": [load, os.getloadavg()[0]],
            "p50_ms": {n: {b: float(np.median(v)) for b, v in per.items()} for n, per in samples.items()},
            "ratio_ci": ratios}


def _ci(d: dict[str, float]) -> str:
    return f"{d['median']:.2f} [{d['low']:.2f}, {d['high']:.2f}]"


def markdown(about: dict[str, Any], runs: list[dict[str, Any]], *, isa: str, threads: int, repeats: int) -> str:
    lines = [f"CPU: {isa}", f"ORT intra-op threads {threads}; {repeats} interleaved rounds per run; INT8 calibration "
             f"{about['method']}; kept FP32: {', '.join(about['kept_fp32'])}", "",
             "| pipeline | held-out accuracy | delta vs FP32 | within budget | kernels (b1) |", "|---|---|---|---|---|"]
    for name, v in about["verdicts"].items():
        kernels = kernels_text(about["kernels"][name]) if name in about["kernels"] else "as the graph above, minus the front end"
        lines.append(f"| {name} | {v['value']:.4f} | {v['delta_vs_fp32']:+.4f} | {v['within_budget']} | {kernels} |")
    lines += ["", "| run | load avg start/end | pipeline | p50 b1 / b32 ms | ratio b1 | ratio b32 |", "|---|---|---|---|---|---|"]
    for i, run in enumerate(runs, 1):
        load = "/".join(f"{x:.1f}" for x in run["load_average"])
        f = run["p50_ms"]["fp32"]
        lines.append(f"| {i} | {load} | fp32 (parent) | {f[1]:.3g} / {f[32]:.3g} | 1 | 1 |")
        for name, per in run["ratio_ci"].items():
            p = run["p50_ms"].get(name, {})
            ms = f"{p[1]:.3g} / {p[32]:.3g}" if p else ""
            lines.append(f"| {i} | {load} | {name} | {ms} | {_ci(per[1])} | {_ci(per[32])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.speech_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--threads", type=int, default=1, help="ORT intra-op threads while timing")
    parser.add_argument("--repeats", type=int, default=40, help="interleaved rounds per timing run")
    parser.add_argument("--runs", type=int, default=3, help="timing runs (one quantization)")
    parser.add_argument("--out", type=Path, default=Path("speech_bench"), help="writes OUT.md and OUT.json")
    parser.add_argument("--previous", type=Path, help="an FP32 speech graph to time beside the parent (e.g. one "
                        "exported with an earlier front end); its ratio to the parent is reported too")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.repeats < 2 or args.runs < 1:
        parser.error("--threads and --runs must be at least 1, --repeats at least 2")
    with tempfile.TemporaryDirectory() as tmp:
        heldout, about, paths = build(args.model_repository, Path(tmp))
        if args.previous:
            paths[PREVIOUS] = args.previous
        runs = [time_once(paths, heldout, threads=args.threads, repeats=args.repeats) for _ in range(args.runs)]
    isa = cpu_isa()
    text = markdown(about, runs, isa=isa_text(isa), threads=args.threads, repeats=args.repeats)
    args.out.with_suffix(".md").write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps({"isa": isa, **about, "runs": runs}, indent=2, default=str))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
