"""Session-wide test setup: a private cache folder (nothing under ~/.cache is touched, and it is removed at the
end), no Ray token files, and tiny real training runs that the search tests share."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Set before any lcsc_ray import reads it; Ray workers inherit the environment of the test process.
_SESSION_CACHE = Path(tempfile.mkdtemp(prefix="lcsc-test-cache-"))
os.environ["LCSC_RAY_CACHE"] = str(_SESSION_CACHE)
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Remove the session's cache folder (reference statistics, extractors: a few MB per test session)."""
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


TINY_MODEL = {"channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attention": False, "dropout": 0.0}


def train_tiny_run(run_dir: Path, kind: str = "cm", *, steps: int = 60, save_every: int = 5) -> Path:
    """A real (tiny) training run on the digits: run.json + raw/EMA safetensors every `save_every` steps."""
    from lcsc_ray.training.loop import make_config, train

    config = make_config(kind, data="digits", steps=steps, save_every=save_every, batch_size=64, lr=1e-3, seed=0,
                         model_kwargs=TINY_MODEL, ema_decay=0.99, warmup=10)
    train(run_dir, config, quiet=True)
    return run_dir


@pytest.fixture(scope="session")
def tiny_cm_run(tmp_path_factory) -> Path:
    """12 raw checkpoints of a tiny consistency model (60 CT steps, saved every 5)."""
    return train_tiny_run(tmp_path_factory.mktemp("runs") / "tiny-cm", "cm")


@pytest.fixture(scope="session")
def tiny_dm_run(tmp_path_factory) -> Path:
    """12 raw checkpoints of a tiny EDM diffusion model."""
    return train_tiny_run(tmp_path_factory.mktemp("runs") / "tiny-dm", "dm")
