"""Where lcsc-ray keeps what it can rebuild: the embedded demo's training runs, the digits feature
extractor and reference statistics. `LCSC_RAY_CACHE` overrides the default `~/.cache/lcsc-ray`."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache root (created on demand by the writers, not here)."""
    return Path(os.environ.get("LCSC_RAY_CACHE", Path.home() / ".cache" / "lcsc-ray")).expanduser().resolve()
