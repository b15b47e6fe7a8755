"""One clean terminal for long commands (``modelserve build`` / ``optimize``): a rich progress display on
the real terminal, everything else (library logging, warnings, tqdm bars, prints, ONNX Runtime's C++
logger) into a log file.

``quiet_to_log(path)`` yields a rich ``Console`` bound to the terminal's stderr while file descriptors 1
and 2 point at ``path``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.text import Text


@contextlib.contextmanager
def quiet_to_log(path: Path) -> Iterator[Console]:
    """Send fds 1/2, Python logging and warnings to ``path``; yield a Console on the original stderr.

    NOTE: redirecting at the file-descriptor level (dup2), not with contextlib.redirect_stdout: ONNX
    Runtime's quantizer sessions and PyTorch's C++ code write to fd 2 directly, and tqdm bars of the
    family modules hold a reference to the sys.stderr object they found at import time.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    terminal = os.fdopen(os.dup(saved[2]), "w", buffering=1)
    log_file = open(path, "a", buffering=1)
    root = logging.getLogger()
    handler = logging.StreamHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    try:
        for fd in (1, 2):
            os.dup2(log_file.fileno(), fd)
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            yield Console(file=terminal, stderr=True)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        logging.captureWarnings(False)
        root.removeHandler(handler)
        root.setLevel(old_level)
        log_file.close()
        terminal.close()


class EtaColumn(ProgressColumn):
    """Time left from the task's ``eta`` field, a callable (re-evaluated at every refresh).

    NOTE: rich's TimeRemainingColumn assumes every unit of work takes as long as the ones done so
    far, which is what made a 20-minute run say 3 minutes; the callable knows the steps' weights."""

    def render(self, task: Task) -> Text:
        eta = task.fields.get("eta")
        if task.finished or eta is None:
            return Text("")
        return Text(f"ETA {format_seconds(eta())}", style="cyan")


def progress(console: Console) -> Progress:
    """The progress display both commands share: what, bar, current step, elapsed, ETA."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[step]}"),
                    TimeElapsedColumn(), EtaColumn(), console=console, transient=False,
                    redirect_stdout=False, redirect_stderr=False)


def format_seconds(seconds: float) -> str:
    whole = max(0, round(seconds))
    return f"{whole // 60}:{whole % 60:02d}"


class WeightedEta:
    """ETA from expected per-step durations, rescaled by how fast the finished steps actually went.

    ``expected`` maps step -> expected seconds (measured on 2 cores and recorded in the code). After
    each finished step the remaining expectation is multiplied by (actual / expected) of the finished
    ones, so a machine twice as busy as the reference doubles the ETA after the first step.
    """

    def __init__(self, expected: dict[str, float]) -> None:
        self.expected = dict(expected)
        self.done: dict[str, float] = {}

    def finish(self, step: str, seconds: float) -> None:
        self.done[step] = seconds

    @property
    def scale(self) -> float:
        expected_done = sum(self.expected[s] for s in self.done)
        return sum(self.done.values()) / expected_done if expected_done > 0 else 1.0

    def remaining(self, *, current: str | None = None, current_elapsed: float = 0.0) -> float:
        left = sum(v for s, v in self.expected.items() if s not in self.done) * self.scale
        if current is not None and current not in self.done:
            left -= min(current_elapsed, self.expected[current] * self.scale)
        return max(left, 0.0)

    def total(self) -> float:
        return sum(self.expected.values())
