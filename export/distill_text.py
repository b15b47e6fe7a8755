"""Distilled sentence encoder: three of MiniLM's six layers with narrower FFNs, trained to reproduce the served encoder.

The student is cut from the teacher's own weights (``export.distill_text_train``: which teacher layers it
copies, which teacher layers it learns to reproduce, FFN pruning, the loss terms and the training loop),
so it begins close to the teacher. Budget: ``export.common.STUDENT_BUDGETS["transformer"]`` (all its targets
must hold, else the student is reported and not published; ``modelserve optimize`` applies the same one):
mean cosine to the teacher and top-10 retrieval overlap on the held-out docstrings (for each held-out text,
the fraction of the teacher's 10 nearest held-out neighbours that the student also ranks in its top 10), and
the teacher's p50 over the student's at batch 32, timed side by side.

Training text (all offline): the training side of the transformer family's own split of standard-library
docstrings (``models.transformer_corpus``), the docstrings of standard-library modules outside that corpus
(``EXTRA_MODULES``), and the docstrings and docs of every installed package (``export.text_corpus``,
cached under ``cache_dir`` because reading a large venv takes minutes). Any text that is, or whose summary
is, one of the corpus's texts is dropped from the extra sources, so held-out texts never leak in.
The word-embedding table (23 M of MiniLM's parameters) is frozen: it is shared with the teacher, and
updating it would cost most of each step for little gain.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import site
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from export import distill_text_train as dt
from export import text_corpus
from export import text_student_int8 as tsi
from export.common import budget_for, load_parent
from export.distill_common import LATENCY_BATCH, StudentResult
from export.heldout import TOP_K, fp32_outputs, load_heldout, retrieval_overlap  # noqa: F401 (callers import it here)
from export.text_student_int8 import budget_verdict, teacher_layers
from models import transformer
from models import transformer_corpus as tc
from models.common import count_parameters, set_seed
from models.transformer_text import export_text_model, load_encoder, minilm_dir

DEFAULT_CACHE = Path("/tmp/modelserve-text-student")
# NOTE: the embedding (what is served and scored) weighs most; the attention KL starts near 2.8 nats against
# ~0.5 for the cosine terms, so its weight is small. Measured (docs/BENCHMARKS.md): these weights, 2.2 epochs,
# held-out cosine 0.903; without the attention term and hidden at 0.1, 1.5 epochs, 0.891.
WEIGHTS = {"embedding": 2.0, "tokens": 1.0, "hidden": 0.3, "attention": 0.1}
SETTINGS: dict[str, dict[str, Any]] = {
    "tiny": {"epochs": 1, "batch_size": 32, "lr": 2e-4, "max_texts": 128, "packages": False, "ffn": None,
             "weights": WEIGHTS},
    "default": {"epochs": 2.2, "batch_size": 32, "lr": 3e-4, "max_texts": 18_000, "packages": True, "ffn": 512,
                "layers": 3, "max_tokens": 128, "weights": WEIGHTS},
}
# NOTE: three layers with FFN 512 rather than two with 1152: the same arithmetic per token (~3.0 M vs 10.6 M
# multiply-adds for the teacher); measured side by side at batch 32 (docs/BENCHMARKS.md) 3.63x vs 3.57x at load 8,
# 3.14x vs 3.46x at load 1; FFN 640 and 768 measured 2.8-3.0x. It reached cosine 0.922 in 8 epochs (48 min).
# NOTE: training texts are cut at ``max_tokens`` (the served encoder reads up to 256): the few long package
# READMEs fill the longest length-sorted batches, whose cost grows with length, and the held-out docstrings
# are far shorter. Evaluation tokenizes as served.
# NOTE: default size (18,000 texts, 2.2 epochs): ~1,800 batches of work (teacher cache + training) at ~2 s
# each fits about an hour on the shared 2-core machine (load average 12); more text helps, given time.
# Standard-library modules (none of them in models.transformer_corpus.CHAPTERS) whose docstrings add
# training text. Listed explicitly: importing some stdlib modules has side effects (antigravity, this).
EXTRA_MODULES = ("argparse", "logging", "logging.handlers", "csv", "configparser", "hashlib", "hmac", "secrets",
                 "io", "itertools", "functools", "operator", "contextlib", "abc", "atexit", "traceback",
                 "warnings", "dataclasses", "inspect", "importlib", "locale", "gettext", "codecs", "struct",
                 "time", "sysconfig", "platform", "optparse", "getopt", "shlex", "cmd", "code", "codeop",
                 "pkgutil", "runpy", "modulefinder", "netrc", "plistlib", "tomllib", "colorsys", "wave",
                 "zipimport", "urllib.robotparser", "email.generator", "email.mime.text", "textwrap",
                 "string.templatelib", "os", "sys", "builtins", "gc", "site", "zoneinfo", "getpass",
                 "ctypes", "venv", "ensurepip", "lib2to3", "distutils", "tkinter", "curses", "sqlite3.dump")
LATENCY_REPEATS = {"tiny": 3, "default": 20}


def text_overrides(options: dict[str, float]) -> dict[str, Any]:
    """The profile settings that ``options`` (``epochs``, ``ffn``, ``minutes``, ``max_texts``, ``lr``, the
    ``neighbours`` loss weight; None or 0 = the profile's) override, checked: a bad value fails before any work starts."""
    known = {"epochs": float, "ffn": int, "minutes": float, "max_texts": int, "lr": float, "neighbours": float}
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"text student options {unknown}: expected some of {sorted(known)}")
    out: dict[str, Any] = {}
    for name, value in options.items():
        if value is None or value == 0:
            continue
        if not (np.isfinite(value) and value > 0):
            raise ValueError(f"text student {name} {value!r}: expected a positive number")
        out[name] = known[name](value)
    return out


def extra_texts(exclude: set[str]) -> list[str]:
    """Entries of EXTRA_MODULES formatted as the corpus formats them; modules that fail to import are skipped."""
    texts: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in EXTRA_MODULES:
            try:
                module = importlib.import_module(name)
            except Exception:  # e.g. distutils (removed in 3.12), tkinter without Tk: fewer texts, not an error
                continue
            for _, entry, doc in tc.module_entries(module):
                summary = tc._first_paragraph(doc)
                text = f"{entry}: {summary}" if entry and summary else summary
                if text and text not in exclude:
                    exclude.add(text)
                    texts.append(text)
    return texts




def package_roots() -> list[Path]:
    """The site-packages folders of the running interpreter."""
    return [Path(p) for p in site.getsitepackages() if Path(p).is_dir()]


def cached_package_texts(cache_dir: Path) -> list[str]:
    """``text_corpus.package_texts`` of this interpreter's packages, cached by prefix and Python version."""
    key = dt.cache_key(sys.prefix, sys.version, [str(p) for p in package_roots()])
    path = Path(cache_dir) / f"package-texts-{key}.json"
    if path.exists():
        return list(json.loads(path.read_text()))
    texts = text_corpus.package_texts(package_roots())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(texts))
    tmp.replace(path)
    return texts


def training_texts(parent, *, settings: dict, cache_dir: Path, seed: int) -> list[str]:
    """The corpus's training side, EXTRA_MODULES texts, then package texts up to ``max_texts`` in all."""
    full = tc.load_corpus()
    corpus = transformer._load_corpus(transformer.HYPER[parent.profile], parent.seed)
    train, _ = tc.grouped_split(corpus, by="owners", folds=transformer.FOLDS, seed=parent.seed)
    texts = [corpus.texts[i] for i in train]
    exclude = set(full.texts) | set(corpus.texts)
    texts += text_corpus.without(extra_texts(set(exclude)), exclude=exclude)
    cap = settings["max_texts"]
    if settings["packages"] and (cap is None or len(texts) < cap):
        seen = set(texts)
        more = [t for t in text_corpus.without(cached_package_texts(cache_dir), exclude=exclude) if t not in seen]
        more = [more[i] for i in np.random.default_rng(seed).permutation(len(more))]
        texts += more[:None if cap is None else cap - len(texts)]
    return texts[:cap] if cap else texts


def training_tokenizer(path: Path, *, settings: dict) -> Tokenizer:
    """The served tokenizer (``path``), cutting texts at ``settings['max_tokens']`` where set."""
    tokenizer = Tokenizer.from_file(str(path))
    if settings.get("max_tokens"):
        tokenizer.enable_truncation(max_length=int(settings["max_tokens"]))
    return tokenizer


@contextlib.contextmanager
def chatter_to(log_path: Path) -> Iterator[None]:
    """Send Python warnings and library logging to ``log_path`` so the progress bar stays readable."""
    handler = logging.FileHandler(log_path)
    root = logging.getLogger()
    root.addHandler(handler)
    logging.captureWarnings(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            yield
    finally:
        logging.captureWarnings(False)
        root.removeHandler(handler)
        handler.close()


def build(*, repo_dir: Path, work_dir: Path, profile: str, layers: int | None = None,
          init_layers: tuple[int, ...] | None = None, options: dict[str, float] | None = None,
          cache_dir: Path = DEFAULT_CACHE) -> StudentResult | None:
    """Distil ``transformer``; None when the teacher has too few layers to drop any (tiny profile: 1).

    ``layers`` defaults to the profile's (else a third of the teacher's); ``init_layers`` names the teacher
    layers to copy (default: ``layers`` spread evenly, see ``distill_text_train.spread``); ``options`` override the profile's settings: ``epochs``
    (may be fractional), ``ffn`` (FFN width) and ``minutes`` (training time budget: the learning-rate schedule
    anneals over whichever of epochs and minutes runs out first). The teacher cache and the package-text cache
    live in ``cache_dir``, the checkpoint and log in ``work_dir``.
    """
    start = time.perf_counter()
    parent = load_parent(repo_dir, "transformer")
    kept, _ = teacher_layers(parent.card)
    settings = {**SETTINGS[profile], **text_overrides(options or {})}
    if "neighbours" in settings:  # a loss weight (distill_text_train's neighbour term)
        settings["weights"] = {**settings["weights"], "neighbours": settings.pop("neighbours")}
    layers = len(init_layers) if init_layers else layers or settings.get("layers") or max(1, kept // 3)
    if layers >= kept:
        return None
    plan = dt.StudentPlan(init_layers=tuple(init_layers or dt.spread(kept, keep=layers)), ffn=settings["ffn"])
    dt.check_plan(plan, total=kept)
    set_seed(parent.seed)
    work_dir, cache_dir = Path(work_dir), Path(cache_dir)
    with chatter_to(work_dir / "distill_text.log"):
        student, texts, losses = _distil(parent, kept=kept, plan=plan, settings=settings, work_dir=work_dir,
                                         cache_dir=cache_dir)
        tokenizer = Tokenizer.from_file(str(parent.model_dir / "tokenizer.json"))
        path, parity = export_text_model(student, tokenizer=tokenizer, path=work_dir / "transformer-student.onnx",
                                         output_name="embedding")
        heldout = load_heldout(parent)
        reference = fp32_outputs(parent, heldout)[0]
        served = tsi.served_comparison(teacher=parent.onnx_path, student=path, heldout=heldout, reference=reference,
                                       work_dir=work_dir, repeats=LATENCY_REPEATS[profile])
    latency = {k: served["latency_ms"][k] for k in ("teacher", "student")}
    row = served["rows"]["student"]
    metrics = {"cosine_to_fp32": row["cosine"], "cosine_to_fp32_min": row["cosine_min"],
               f"top{TOP_K}_retrieval_overlap": row[f"top{TOP_K}_overlap"], "test_examples": float(len(reference))}
    speedup = row["speedup"]
    ok, why = budget_verdict(cosine=metrics["cosine_to_fp32"], overlap=metrics[f"top{TOP_K}_retrieval_overlap"],
                             speedup=speedup)
    details = {"student_layers": layers, "teacher_layers_kept": list(plan.init_layers),
               "hidden_targets": list(plan.hidden_targets(kept)), "ffn": plan.ffn, "teacher_layers": kept,
               "training_texts": len(texts), **settings, **losses, "parity": parity, "latency_batch": LATENCY_BATCH,
               "speedup": speedup, "verdict": why, "served": served,
               "seconds": round(time.perf_counter() - start, 1)}
    return StudentResult(family="transformer", model="transformer", onnx_path=path, metrics=metrics,
                         teacher_metrics={"cosine_to_fp32": 1.0, f"top{TOP_K}_retrieval_overlap": 1.0},
                         parameters=count_parameters(student), teacher_parameters=int(parent.card["parameters"]),
                         within_budget=ok, budget=budget_for("transformer", "student").describe(),
                         latency_ms=latency, details=details)


def _distil(parent, *, kept: int, plan: dt.StudentPlan, settings: dict, work_dir: Path,
            cache_dir: Path) -> tuple[Any, list[str], dict[str, float]]:
    """Collect text, fill the teacher cache, train; one progress bar over cache batches and steps."""
    tokenizer = training_tokenizer(parent.model_dir / "tokenizer.json", settings=settings)
    texts = training_texts(parent, settings=settings, cache_dir=cache_dir, seed=parent.seed)
    targets = plan.hidden_targets(kept)
    batches = dt.length_batches(texts, batch_size=settings["batch_size"])
    teacher = load_encoder(minilm_dir(), layers=kept)
    attention = teacher.bert.config._attn_implementation
    teacher.bert.set_attn_implementation("eager")  # attention probabilities are only returned by eager
    key = dt.cache_key(texts, kept, targets, settings["batch_size"], settings.get("max_tokens"))
    cache = dt.TeacherCache(cache_dir / key, layers=targets)
    todo = len(cache.missing(len(batches)))
    steps = dt.total_steps(settings, len(batches))
    with tqdm(total=todo + steps, desc="text student", unit="batch", mininterval=2.0, smoothing=0.05) as bar:
        def progress(count: int, postfix: str | None = None) -> None:
            if postfix:
                bar.set_postfix_str(postfix, refresh=False)
            bar.update(count)

        bar.set_description(f"teacher cache ({todo} batches), then {settings['epochs']} epochs")
        cache.fill(teacher, tokenizer=tokenizer, texts=texts, batches=batches, progress=progress)
        student = dt.make_student(teacher, plan)  # the teacher is not needed any more: cut it down in place
        bar.set_description(f"distil {len(texts)} texts x {settings['epochs']} epochs")
        losses = dt.train(student, cache=cache, tokenizer=tokenizer, texts=texts, batches=batches,
                          targets=targets, settings=settings, seed=parent.seed,
                          checkpoint=work_dir / "checkpoint.pt", progress=progress)
    student.bert.set_attn_implementation(attention)
    return student, texts, losses
