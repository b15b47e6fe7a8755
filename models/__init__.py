"""Model families: training scripts, ONNX export and publication into a model repository (see CONTRACT.md)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_home() -> Path:
    """Where modelserve keeps what is slow to make and safe to reuse: $XDG_CACHE_HOME/modelserve (~/.cache)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "modelserve"
