"""``modelserve build``: train, evaluate, export and publish model families into a model repository.

    modelserve build [--profile tiny|default] [--families cnn,transformer,speech,recommender]
                     [--model-repository DIR] [--seed N]
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
import traceback
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from models.common import FAMILIES, PROFILES, FamilyResult

SUMMARY_FILE = "build_summary.json"


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


def _build_all(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    repo_dir: Path = args.model_repository
    repo_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results: list[FamilyResult] = []
    failures: dict[str, str] = {}
    for family in args.families:
        console.rule(f"[bold]{family}[/bold] ({args.profile})")
        try:
            results.append(build_family(family, profile=args.profile, repo_dir=repo_dir, seed=args.seed))
        except Exception as exc:  # one family failing must not hide the others' results
            console.print(traceback.format_exc())
            failures[family] = f"{type(exc).__name__}: {exc}"
    total = time.perf_counter() - start
    summary = {"profile": args.profile, "seed": args.seed, "total_seconds": round(total, 2),
               "families": [asdict(r) for r in results], "failures": failures}
    (repo_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    Console(width=max(Console().width, 140)).print(summary_table(results, failures, profile=args.profile))
    console.print(f"total {total:.1f} s; summary written to {repo_dir / SUMMARY_FILE}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
