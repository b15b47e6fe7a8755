"""Shared pieces of every model family: seeding, ONNX export, parity checks and publication.

The publication layout is Triton's model repository (see models/CONTRACT.md):
``<repo>/<name>/config.pbtxt``, ``<repo>/<name>/1/model.onnx``, ``labels.txt``, ``metrics.json``,
``MODEL_CARD.md`` and any extra assets.
"""

from __future__ import annotations

import argparse
import logging
import random
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from service.modelrepo.sessions import create_session

PROFILES = ("tiny", "default")
FAMILIES = ("cnn", "transformer", "speech", "recommender")
OPSET = 18


class ParityError(RuntimeError):
    """PyTorch and ONNX Runtime disagree beyond the tolerance."""


@dataclass
class FamilyResult:
    """What one family's ``build`` produced (one row of the build summary)."""

    family: str
    models: list[str]
    metrics: dict[str, float]
    parameters: int
    build_seconds: float
    parity_max_abs_diff: float


def check_profile(profile: str) -> str:
    """Return ``profile`` or raise a ValueError naming the valid ones."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}: expected one of {', '.join(PROFILES)}")
    return profile


def family_parser(family: str, description: str | None) -> argparse.ArgumentParser:
    """The flags every family's training script shares; each family adds its own on the returned parser."""
    parser = argparse.ArgumentParser(prog=f"python -m models.{family}", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=PROFILES, default="default")
    parser.add_argument("--epochs", type=int, help="override the profile's epochs")
    parser.add_argument("--batch-size", type=int, help="override the profile's batch size")
    parser.add_argument("--lr", type=float, help="override the profile's (peak) learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-repository", "--output", dest="repo", type=Path, default=Path("model_repository"))
    return parser


def hyper_overrides(args: argparse.Namespace, *extra: str) -> dict[str, Any]:
    """The hyper-parameters given on the command line (epochs, batch size, lr and `extra`), to `replace` a profile's."""
    names = ("epochs", "batch_size", "lr", *extra)
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def optimizer_step(loss: torch.Tensor, *, opt: torch.optim.Optimizer, sched: Any, bar: Any, **postfix: Any) -> None:
    """One training step: zero the gradients, backpropagate, step optimiser and schedule, show the loss."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    bar.set_postfix(loss=f"{loss.item():.3f}", **postfix, refresh=False)
    bar.update()


def recalibrate_batchnorm(model: torch.nn.Module, inputs: torch.Tensor, *, forward: Any, chunk: int = 256) -> None:
    """Recompute every BatchNorm's statistics as exact averages over `inputs` (run through `forward`).

    NOTE: the running averages kept during training lag the weights (and saw augmented inputs); with few steps
    (the tiny profile) they are far off, and accuracy sat at chance without this pass.
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average
    model.train()
    with torch.no_grad():
        for start in range(0, len(inputs), chunk):
            forward(inputs[start:start + chunk])
    for bn in norms:
        bn.momentum = 0.1
    model.eval()


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch so a build is repeatable."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def count_parameters(model: torch.nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def export_onnx(
    model: torch.nn.Module,
    example_inputs: tuple,
    path: Path,
    *,
    input_names: list[str],
    output_names: list[str],
    dynamic_shapes: Any,
) -> Path:
    """Export ``model`` with the dynamo exporter to a single, checked ONNX file at ``path``.

    ``dynamic_shapes`` follows ``torch.export`` (e.g. ``{"x": {0: torch.export.Dim("batch")}}``).
    NOTE: torch.export specialises any dimension whose example size is 0 or 1, so example
    inputs must use a batch of at least 2 for the batch axis to stay dynamic.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    # NOTE: the exporter logs a warning per missing torchvision op and a FutureWarning from pytree;
    # neither concerns our models, and they bury the training progress output.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message="# The axis name", category=UserWarning)
        torch.onnx.export(
            model,
            example_inputs,
            str(path),
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            input_names=input_names,
            output_names=output_names,
            opset_version=OPSET,
            external_data=False,
            verbose=False,
        )
    # NOTE: load with external data and save again so that the result is one self-contained file
    # whatever the exporter decided; the server copies exactly one file per version.
    proto = onnx.load(str(path), load_external_data=True)
    _drop_exporter_metadata(proto.graph)
    for function in proto.functions:
        del function.metadata_props[:]
        _drop_node_metadata(function.node)
    for stale in path.parent.glob(path.name + ".data"):
        stale.unlink()
    onnx.save(proto, str(path), save_as_external_data=False)
    onnx.checker.check_model(str(path), full_check=True)
    _check_io_names(proto, path=path, input_names=input_names, output_names=output_names)
    return path


def _drop_exporter_metadata(graph: Any) -> None:
    """Remove the dynamo exporter's debugging metadata from ``graph``, its nodes and their subgraphs.

    The exporter records, per node, the FX node, module path and a stack trace holding the absolute path of the
    checkout that built it, and per graph and per input the ExportedProgram's signature. None of it is read when
    serving, but it made the same model built from two checkouts differ byte for byte (and told anyone holding the
    file where it was built), so a kept family and a rebuilt one could not be compared.
    """
    del graph.metadata_props[:]
    for described in (*graph.input, *graph.output, *graph.value_info, *graph.initializer):
        del described.metadata_props[:]
    _drop_node_metadata(graph.node)


def _drop_node_metadata(nodes: Any) -> None:
    for node in nodes:
        del node.metadata_props[:]
        for attribute in node.attribute:
            for subgraph in (*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs):
                _drop_exporter_metadata(subgraph)


def _check_io_names(proto: Any, *, path: Path, input_names: list[str], output_names: list[str]) -> None:
    got_in = [i.name for i in proto.graph.input]
    got_out = [o.name for o in proto.graph.output]
    if got_in != list(input_names) or got_out != list(output_names):
        raise RuntimeError(
            f"{path}: exported graph has inputs {got_in} and outputs {got_out}, "
            f"expected inputs {list(input_names)} and outputs {list(output_names)}"
        )


def ort_session(onnx_path: Path) -> Any:
    """A CPU ONNX Runtime session on ``onnx_path`` (the provider the server uses by default)."""
    return create_session(onnx_path)


def _torch_outputs(model: torch.nn.Module, case: tuple[np.ndarray, ...]) -> list[np.ndarray]:
    with torch.no_grad():
        out = model(*(torch.from_numpy(np.ascontiguousarray(a)) for a in case))
    if isinstance(out, torch.Tensor):
        out = (out,)
    return [o.detach().cpu().numpy() for o in out]


def parity_check(
    model: torch.nn.Module,
    onnx_path: Path,
    cases: list[tuple[np.ndarray, ...]],
    *,
    atol: float,
    rtol: float,
) -> dict:
    """Run PyTorch and ONNX Runtime (CPU) on every case and compare each output elementwise.

    An element passes when ``|onnx - torch| <= atol + rtol * |torch|`` (numpy.allclose's rule).
    Raises ParityError on the first mismatch, naming the case, the output and the differences.
    """
    if not cases:
        raise ValueError("parity_check needs at least one case")
    model.eval()
    session = ort_session(onnx_path)
    in_names = [i.name for i in session.get_inputs()]
    out_names = [o.name for o in session.get_outputs()]
    max_abs = 0.0
    shapes: list[list[list[int]]] = []
    for index, case in enumerate(cases):
        if len(case) != len(in_names):
            raise ValueError(f"parity case {index}: {len(case)} arrays given, the graph takes {in_names}")
        expected = _torch_outputs(model, case)
        got = session.run(None, dict(zip(in_names, case)))
        shapes.append([list(a.shape) for a in case])
        where = f"case {index} (input shapes {shapes[-1]})"
        for name, ref, out in zip(out_names, expected, got):
            max_abs = max(max_abs, _compare(where=where, name=name, ref=ref, out=out, atol=atol, rtol=rtol))
    return {"cases": shapes, "max_abs_diff": max_abs, "atol": atol, "rtol": rtol}


def _compare(*, where: str, name: str, ref: np.ndarray, out: np.ndarray, atol: float, rtol: float) -> float:
    if ref.shape != out.shape:
        raise ParityError(f"{where}, output {name!r}: torch shape {list(ref.shape)}, onnx {list(out.shape)}")
    if ref.size == 0:
        return 0.0
    if not np.issubdtype(ref.dtype, np.floating):
        # Integer outputs (class or item ids) must match exactly: a tolerance would let ids drift.
        if ref.dtype != out.dtype or not np.array_equal(ref, out):
            raise ParityError(f"{where}, output {name!r}: integer outputs differ "
                              f"(torch {ref.dtype}, onnx {out.dtype}, {int(np.sum(ref != out))} elements)")
        return 0.0
    ref64, out64 = ref.astype(np.float64), out.astype(np.float64)
    diff = np.abs(out64 - ref64)
    worst = float(diff.max())
    excess = diff - (atol + rtol * np.abs(ref64))
    if not np.all(excess <= 0) or not np.all(np.isfinite(out64)):
        raise ParityError(
            f"{where}, output {name!r}: max abs diff {worst:.3g} "
            f"exceeds tolerance atol={atol:g} + rtol={rtol:g}*|ref| "
            f"({int(np.sum(~(excess <= 0)))} of {diff.size} elements off)"
        )
    return worst


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` intra-op threads, then restore the previous setting."""
    if count < 1:
        raise ValueError(f"threads must be >= 1, got {count}")
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
