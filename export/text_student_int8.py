"""A wider sentence-encoder student served as INT8 dynamic: shapes, their speed, the served variant's verdict.

Round 4 of the sentence-encoder student (docs/BENCHMARKS.md): rather than a narrow FP32 student that must
learn most of the teacher back, keep more of the teacher (e.g. 4 of its 6 layers at full FFN width, so it
starts close and converges fast) and serve it through the INT8 dynamic quantization the teacher's own INT8
variant uses (``export.quantize.quantize_dynamic_model``, per-channel weights).

    python -m export.text_student_int8 --model-repository ZOO --work-dir WORK \\
        --shapes 4x1536:0,2,4,5 3x1536:0,2,5 --repeats 15

exports each shape UNTRAINED (latency does not depend on the weights; fidelity of the copied layers is
reported too), FP32 and INT8, and times them side by side with the FP32 teacher and the teacher's INT8 at
batch 32 on the held-out texts. Publication rule (``served_verdicts``): a student variant is published only
if it meets every target of ``export.common.STUDENT_BUDGETS`` itself, as served (its own cosine, overlap and
speed-up against the FP32 teacher); the INT8 student is also compared with the teacher's INT8, so that a
reader sees how much of the gap is quantization and how much the smaller network.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from export import distill_text_train as dt
from export import quantize
from export.common import check_budget, load_parent
from export.distill_common import LATENCY_BATCH, side_by_side_latency
from export.heldout import TOP_K, fp32_outputs, load_heldout, retrieval_overlap, run_outputs
from models.common import torch_threads
from models.transformer_text import export_text_model, load_encoder, minilm_dir

SPEED_FLOOR = 3.3  # keep a shape whose INT8 is at least this much faster than the FP32 teacher (3x + margin)
_SHAPE = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*(?::\s*([\d,\s]+))?$")


@dataclass(frozen=True)
class Shape:
    """A student shape: the teacher layers it copies (in order) and its FFN width (None: the teacher's)."""

    init_layers: tuple[int, ...]
    ffn: int | None = None

    def label(self, teacher_ffn: int = 1536) -> str:
        return f"{len(self.init_layers)}x{self.ffn or teacher_ffn}"

    def plan(self) -> dt.StudentPlan:
        return dt.StudentPlan(init_layers=self.init_layers, ffn=self.ffn)


def parse_shape(text: str, *, total: int, teacher_ffn: int = 1536) -> Shape:
    """``LxF`` (``spread`` layers) or ``LxF:i,j,...`` (those teacher layers); F equal to the teacher's means
    unpruned. Checked against a teacher of ``total`` layers."""
    match = _SHAPE.match(text)
    if not match:
        raise ValueError(f"student shape {text!r}: expected LAYERSxFFN or LAYERSxFFN:i,j,... e.g. 4x1536:0,2,4,5")
    count, ffn = int(match.group(1)), int(match.group(2))
    if not 1 <= count < total:
        raise ValueError(f"student shape {text!r}: expected 1..{total - 1} layers (the teacher has {total})")
    if not 1 <= ffn <= teacher_ffn:
        raise ValueError(f"student shape {text!r}: expected an FFN width in 1..{teacher_ffn}")
    layers = dt.spread(total, keep=count)
    if match.group(3):
        layers = tuple(int(i) for i in match.group(3).replace(" ", "").split(",") if i)
    if len(layers) != count or list(layers) != sorted(set(layers)) or not all(0 <= i < total for i in layers):
        raise ValueError(f"student shape {text!r}: expected {count} increasing teacher layers in 0..{total - 1}, "
                         f"got {list(layers)}")
    return Shape(init_layers=layers, ffn=None if ffn == teacher_ffn else ffn)


def teacher_layers(card: dict) -> tuple[int, int]:
    """(kept, total) encoder layers from the card's ``input_spec.encoder_layers`` ("6 of 6")."""
    text = str(card.get("input_spec", {}).get("encoder_layers", ""))
    match = re.fullmatch(r"\s*(\d+) of (\d+)\s*", text)
    if not match:
        raise ValueError(f"transformer model card: input_spec.encoder_layers is {text!r}, expected 'K of N'")
    return int(match.group(1)), int(match.group(2))


def budget_verdict(*, cosine: float, overlap: float, speedup: float) -> tuple[bool, str]:
    """Whether the student meets its budget (export.common.STUDENT_BUDGETS), and a sentence naming any
    target it misses."""
    verdict = check_budget(model="transformer", variant="student", fp32_metrics={"cosine_to_fp32": 1.0},
                           variant_metrics={"cosine_to_fp32": cosine, f"top{TOP_K}_retrieval_overlap": overlap,
                                            f"speedup_b{LATENCY_BATCH}": speedup})
    return verdict.ok, ("within budget" if verdict.ok else "missed: " + ", ".join(verdict.missed))


def fidelity(reference: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """Mean / min cosine of ``got`` to ``reference`` row by row, and top-10 retrieval overlap."""
    a, b = got.astype(np.float64), reference.astype(np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    return {"cosine": float(cos.mean()), "cosine_min": float(cos.min()),
            f"top{TOP_K}_overlap": retrieval_overlap(b, a)}


def int8_dynamic(src: Path, *, work_dir: Path) -> Path:
    """``src`` quantized as the teacher's INT8 variant is (pre-process, dynamic, per-channel, no FP32 fallback)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    pre = quantize.preprocess(src, work_dir / f"{src.stem}-pre.onnx")
    return quantize.quantize_dynamic_model(pre, work_dir / f"{src.stem}-int8.onnx", op_types=quantize.DYNAMIC_OPS,
                                           exclude=[])


def served_verdicts(rows: dict[str, dict[str, float]]) -> dict[str, tuple[bool, str]]:
    """Per student variant (``student``, ``student-int8``): (publish?, why), each judged on its OWN served
    numbers (``cosine``, ``top10_overlap``, ``speedup`` against the FP32 teacher), never another's."""
    out = {}
    for name, row in rows.items():
        ok, why = budget_verdict(cosine=row["cosine"], overlap=row[f"top{TOP_K}_overlap"], speedup=row["speedup"])
        out[name] = (ok, f"{name}: published, " + why if ok else f"{name}: not published, " + why)
    return out


def fast_enough(speedups: dict[str, float], *, floor: float = SPEED_FLOOR) -> list[str]:
    """Shape labels whose INT8 (``<label>-int8``) clears ``floor`` times the FP32 teacher, fastest first."""
    picked = [(s, name.removesuffix("-int8")) for name, s in speedups.items() if name.endswith("-int8")
              and name != "teacher-int8" and s >= floor]
    return [name for _, name in sorted(picked, reverse=True)]


def export_shape(shape: Shape, *, tokenizer: Tokenizer, kept: int, work_dir: Path) -> dict[str, Path]:
    """The untrained student of ``shape`` (copied teacher layers, FFN pruned) as FP32 and INT8 ONNX."""
    student = dt.make_student(load_encoder(minilm_dir(), layers=kept), shape.plan())
    name = f"student-{shape.label()}-{'-'.join(map(str, shape.init_layers))}"
    fp32, _ = export_text_model(student, tokenizer=tokenizer, path=work_dir / f"{name}.onnx", output_name="embedding")
    return {"fp32": fp32, "int8": int8_dynamic(fp32, work_dir=work_dir / "int8")}


def measure_shapes(*, repo_dir: Path, work_dir: Path, shapes: list[str], repeats: int) -> dict[str, Any]:
    """Untrained students of ``shapes`` (FP32 and INT8) against the FP32 teacher and its INT8, side by side at
    batch 32, plus each one's fidelity to the FP32 teacher on the held-out texts."""
    parent = load_parent(repo_dir, "transformer")
    kept, _ = teacher_layers(parent.card)
    tokenizer = Tokenizer.from_file(str(parent.model_dir / "tokenizer.json"))
    heldout = load_heldout(parent)
    reference = fp32_outputs(parent, heldout)[0]
    paths = {"teacher": parent.onnx_path, "teacher-int8": int8_dynamic(parent.onnx_path, work_dir=work_dir / "int8")}
    layers: dict[str, list[int]] = {}
    with torch_threads(1):
        for text in shapes:
            shape = parse_shape(text, total=kept)
            files = export_shape(shape, tokenizer=tokenizer, kept=kept, work_dir=work_dir)
            label = f"{shape.label()}[{','.join(map(str, shape.init_layers))}]"
            paths[label], paths[f"{label}-int8"] = files["fp32"], files["int8"]
            layers[label] = list(shape.init_layers)
    quality = {name: fidelity(reference, run_outputs(path, heldout.feeds)[0]) for name, path in paths.items()}
    latency = side_by_side_latency(paths, heldout.batch(LATENCY_BATCH), repeats=repeats)
    speedups = {name: latency["teacher"] / ms for name, ms in latency.items()}
    return {"latency_ms": latency, "speedup": speedups, "fidelity_untrained": quality, "layers": layers,
            "fast_enough": fast_enough(speedups), "repeats": repeats, "batch": LATENCY_BATCH}


def served_comparison(*, teacher: Path, student: Path, heldout: Any, reference: np.ndarray, work_dir: Path,
                      repeats: int) -> dict[str, Any]:
    """The FP32 student and its INT8 as they would be served, against the FP32 teacher (the targets) and the
    teacher's INT8 (how much is quantization, how much the smaller network): fidelity, side-by-side p50 at
    batch 32 of all four, and each student variant's publication verdict (``served_verdicts``)."""
    paths = {"teacher": teacher, "teacher-int8": int8_dynamic(teacher, work_dir=work_dir / "teacher-int8"),
             "student": student, "student-int8": int8_dynamic(student, work_dir=work_dir / "student-int8")}
    outputs = {name: run_outputs(path, heldout.feeds)[0] for name, path in paths.items() if name != "teacher"}
    vs_teacher = {name: fidelity(reference, got) for name, got in outputs.items()}
    vs_teacher_int8 = {name: fidelity(outputs["teacher-int8"], outputs[name]) for name in ("student", "student-int8")}
    latency = side_by_side_latency(paths, heldout.batch(LATENCY_BATCH), repeats=repeats)
    rows = {name: {**vs_teacher[name], "speedup": latency["teacher"] / latency[name]}
            for name in ("student", "student-int8")}
    verdicts = served_verdicts(rows)
    return {"paths": {k: str(v) for k, v in paths.items()}, "latency_ms": latency, "vs_teacher": vs_teacher,
            "vs_teacher_int8": vs_teacher_int8,
            "speedup_vs_teacher_int8": {n: latency["teacher-int8"] / latency[n] for n in ("student", "student-int8")},
            "rows": rows, "publish": {name: ok for name, (ok, _) in verdicts.items()},
            "why": {name: why for name, (_, why) in verdicts.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.text_student_int8", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--work-dir", type=Path, default=Path("text_student_int8"))
    parser.add_argument("--shapes", nargs="+", default=["4x1536:0,2,4,5", "4x1536:0,1,3,5", "4x1152", "3x1536"])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result = measure_shapes(repo_dir=args.model_repository, work_dir=args.work_dir, shapes=args.shapes,
                            repeats=args.repeats)
    result["seconds"] = round(time.perf_counter() - start, 1)
    (args.work_dir / "shapes.json").write_text(json.dumps(result, indent=2) + "\n")
    for name, ms in result["latency_ms"].items():
        q = result["fidelity_untrained"][name]
        print(f"{name:24s} p50 b{LATENCY_BATCH} {ms:8.1f} ms  {result['speedup'][name]:5.2f}x  "
              f"cos {q['cosine']:.4f}  top-{TOP_K} {q[f'top{TOP_K}_overlap']:.3f}")
    print(f"INT8 >= {SPEED_FLOOR}x the FP32 teacher: {result['fast_enough'] or 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
