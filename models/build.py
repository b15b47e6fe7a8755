"""``modelserve build``: train, evaluate, export and publish model families into a model repository.

    modelserve build [--profile tiny|default] [--families cnn,transformer,speech,recommender]
                     [--model-repository DIR] [--seed N] [--force]

Families already published with the same profile and seed are kept (an interrupted build resumes);
training output goes to <repository>/build.log, the terminal shows one progress display.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from models.common import FAMILIES, PROFILES, FamilyResult
from models.runlog import WeightedEta, format_seconds, progress, quiet_to_log
from models.zoo import (
    DERIVED_MODELS,
    EXPECTED_SECONDS,
    FAMILY_MODELS,
    REEXPORTED,
    SHARED_MACHINE_FACTOR,
    family_complete,
)
from service.modelrepo.layout import CARD_FILENAME, CONFIG_FILENAME

SUMMARY_FILE = "build_summary.json"
LOG_FILE = "build.log"


def family_module_path(family: str) -> Path:
    """Where ``models.<family>`` lives; families are written separately and may be missing."""
    return Path(__file__).resolve().parent / f"{family}.py"


def available_families() -> list[str]:
    return [f for f in FAMILIES if family_module_path(f).is_file()]


def parse_families(text: str) -> list[str]:
    families = [f.strip() for f in text.split(",") if f.strip()]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families:
        raise argparse.ArgumentTypeError(
            f"unknown families {unknown or text!r}: expected a comma-separated subset of {','.join(FAMILIES)}")
    return list(dict.fromkeys(families))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="modelserve build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=PROFILES, default="default",
                        help="tiny: seconds, for tests; default: the real zoo (default)")
    parser.add_argument("--families", type=parse_families, default=list(FAMILIES),
                        help=f"comma-separated subset of {','.join(FAMILIES)} (default: all)")
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"),
                        help="output repository folder (default: model_repository)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true",
                        help="rebuild every family (default: keep families already built with this profile and seed)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads for training (default: 1; see the note in main)")
    return parser.parse_args(argv)


def build_family(family: str, *, profile: str, repo_dir: Path, seed: int) -> FamilyResult:
    """Import ``models.<family>`` lazily (heavy imports, separately written) and build it."""
    if not family_module_path(family).is_file():
        raise FileNotFoundError(f"family {family!r}: module {family_module_path(family)} does not exist")
    module = importlib.import_module(f"models.{family}")
    result = module.build(profile=profile, repo_dir=repo_dir, seed=seed)
    if not isinstance(result, FamilyResult):
        raise TypeError(f"models.{family}.build returned {type(result).__name__}, expected FamilyResult")
    return result


def _format_metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


def summary_table(results: list[FamilyResult], failures: dict[str, str], *, profile: str) -> Table:
    table = Table(title=f"modelserve build ({profile} profile)")
    for column in ("family", "models", "held-out metrics", "params", "parity max |diff|", "seconds"):
        table.add_column(column, justify="right" if column in {"params", "seconds"} else "left")
    for r in results:
        table.add_row(r.family, ", ".join(r.models), _format_metrics(r.metrics), f"{r.parameters:,}",
                      f"{r.parity_max_abs_diff:.2e}", f"{r.build_seconds:.1f}")
    for family, error in failures.items():
        table.add_row(family, "-", f"[red]FAILED: {error}[/red]", "-", "-", "-")
    return table


def main(argv: list[str] | None = None) -> int:
    """Build the requested families; returns 0 when every one of them was built and published."""
    import torch

    args = parse_args(argv)
    if args.threads < 1:
        raise SystemExit(f"--threads {args.threads}: expected a positive number of threads")
    threads_before = torch.get_num_threads()
    # NOTE: the zoo's models are small, so per-op overhead dominates and a second thread buys little;
    # on a busy 2-core machine OpenMP barriers made 2 threads 4-5x slower than 1 (cnn + recommender
    # default build: 205 s with 2 threads, 44 s with 1, same load). Raise it on a dedicated machine.
    torch.set_num_threads(args.threads)
    try:
        return _build_all(args)
    finally:
        torch.set_num_threads(threads_before)


def _kept_result(family: str, *, repo_dir: Path, previous: dict[str, dict]) -> FamilyResult:
    """The summary row of a family kept from an earlier run (its old row, else read from its cards)."""
    if family in previous:
        return FamilyResult(**previous[family])
    cards = [json.loads((repo_dir / name / CARD_FILENAME).read_text()) for name in FAMILY_MODELS[family]]
    metrics = {k: v for c in cards for k, v in c.get("metrics", {}).items() if isinstance(v, float)}
    return FamilyResult(family=family, models=list(FAMILY_MODELS[family]), metrics=metrics,
                        parameters=max(int(c.get("parameters", 0)) for c in cards),
                        build_seconds=sum(float(c.get("build_seconds", 0.0)) for c in cards),
                        parity_max_abs_diff=max(float(c.get("parity", {}).get("max_abs_diff", 0.0)) for c in cards))


def _previous_rows(repo_dir: Path) -> dict[str, dict]:
    try:
        summary = json.loads((repo_dir / SUMMARY_FILE).read_text())
        return {row["family"]: row for row in summary.get("families", [])}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _write_summary(repo_dir: Path, summary: dict) -> None:
    tmp = repo_dir / f".{SUMMARY_FILE}.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(repo_dir / SUMMARY_FILE)


def plan(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(families to build, families kept because they are already complete)."""
    if args.force:
        return list(args.families), []
    kept = [f for f in args.families
            if family_complete(args.model_repository, f, profile=args.profile, seed=args.seed)]
    return [f for f in args.families if f not in kept], kept


def _announce(console: Console, *, todo: list[str], kept: list[str], profile: str, log_path: Path) -> None:
    if kept:
        console.print(f"kept (already built, profile {profile}): {', '.join(kept)}")
    if not todo:
        console.print("every family is built; nothing to do (--force rebuilds)")
        return
    expected = sum(EXPECTED_SECONDS[profile][f] for f in todo)
    console.print(f"building {', '.join(todo)} ({profile} profile): about {format_seconds(expected)} on an "
                  f"idle 2-core machine, up to {format_seconds(expected * SHARED_MACHINE_FACTOR)} on a busy one. "
                  f"Training output: {log_path}")


def _build_all(args: argparse.Namespace) -> int:
    repo_dir: Path = args.model_repository
    repo_dir.mkdir(parents=True, exist_ok=True)
    log_path = repo_dir / LOG_FILE
    todo, kept = plan(args)
    previous = _previous_rows(repo_dir)
    results = [_kept_result(f, repo_dir=repo_dir, previous=previous) for f in kept]
    failures: dict[str, str] = {}
    start = time.perf_counter()
    summary = {"profile": args.profile, "seed": args.seed, "kept": kept}
    with quiet_to_log(log_path) as console:
        _announce(console, todo=todo, kept=kept, profile=args.profile, log_path=log_path)
        _derive_missing(kept, repo_dir=repo_dir, console=console)
        try:
            _run_families(todo, args=args, console=console, results=results, failures=failures,
                          on_done=lambda: _write_summary(repo_dir, {**summary, **_rows(results, failures)}))
        except KeyboardInterrupt:
            built = [r.family for r in results]
            console.print(f"[yellow]interrupted[/yellow]: kept {', '.join(built) or 'nothing'}; "
                          "run the same command again to build only the rest")
            return 130
    total = time.perf_counter() - start
    results.sort(key=lambda r: args.families.index(r.family))
    _write_summary(repo_dir, {**summary, "total_seconds": round(total, 2), **_rows(results, failures)})
    Console(width=max(Console().width, 140)).print(summary_table(results, failures, profile=args.profile))
    Console(stderr=True).print(f"total {total:.1f} s; summary written to {repo_dir / SUMMARY_FILE}; "
                               f"training output in {log_path}")
    return 1 if failures else 0


def _derive_missing(kept: list[str], *, repo_dir: Path, console: Console) -> None:
    """Publish the derived models (DERIVED_MODELS) a kept family lacks, from its published model, after
    re-exporting a kept graph that predates the family's current export (REEXPORTED)."""
    for family in kept:
        if family in REEXPORTED:
            redone = importlib.import_module(f"models.{REEXPORTED[family]}").refresh(repo_dir=repo_dir)
            if redone:
                console.print(f"re-exported kept {family} without training: {', '.join(redone)}")
        missing = [n for n in DERIVED_MODELS.get(family, ()) if not (repo_dir / n / CONFIG_FILENAME).is_file()]
        if missing:
            module = importlib.import_module(f"models.{family}")
            module.derive(repo_dir=repo_dir)
            console.print(f"derived from kept {family}: {', '.join(missing)}")


def _rows(results: list[FamilyResult], failures: dict[str, str]) -> dict:
    return {"families": [asdict(r) for r in results], "failures": failures}


def _run_families(todo: list[str], *, args: argparse.Namespace, console: Console, results: list[FamilyResult],
                  failures: dict[str, str], on_done: Callable[[], None]) -> None:
    """Build each family in turn under one progress display (family, elapsed, ETA refined as it goes)."""
    eta = WeightedEta({f: EXPECTED_SECONDS[args.profile][f] for f in todo})
    current: dict[str, Any] = {"family": None, "since": time.perf_counter()}

    def left() -> float:
        return eta.remaining(current=current["family"], current_elapsed=time.perf_counter() - current["since"])

    with progress(console) as bar:
        task = bar.add_task(f"build ({args.profile})", total=eta.total(), step="", eta=left)
        for family in todo:
            current.update(family=family, since=time.perf_counter())
            bar.update(task, step=family)
            logging.getLogger("modelserve.build").info("building %s (%s profile)", family, args.profile)
            try:
                results.append(build_family(family, profile=args.profile, repo_dir=args.model_repository,
                                            seed=args.seed))
            except Exception as exc:  # one family failing must not hide the others' results
                logging.getLogger("modelserve.build").error("%s failed:\n%s", family, traceback.format_exc())
                failures[family] = f"{type(exc).__name__}: {exc}"
            seconds = time.perf_counter() - current["since"]
            eta.finish(family, seconds)
            bar.advance(task, EXPECTED_SECONDS[args.profile][family])
            outcome = "[red]FAILED[/red] (see the log)" if family in failures else "built"
            console.print(f"{family}: {outcome} in {seconds:.1f} s (expected "
                          f"{EXPECTED_SECONDS[args.profile][family]:.0f} s on an idle machine)")
            on_done()
        current["family"] = None


if __name__ == "__main__":
    raise SystemExit(main())
