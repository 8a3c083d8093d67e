"""The embedded demo runs: CT and EDM training on scikit-learn's bundled 8x8 digits, sized to finish in a few
minutes on a small CPU while saving >= 100 raw checkpoints for LCSC to combine.

The defaults live here (the CLIs in launch/ and the search's `ensure_demo_run` share them); the run folder
is `cache_dir()/runs/digits-<kind>`, reused by later searches.
"""

from __future__ import annotations

from pathlib import Path

from lcsc_ray.errors import LcscError
from lcsc_ray.paths import cache_dir
from lcsc_ray.run_folder import DONE_JSON, KINDS
from lcsc_ray.training.loop import make_config, train

DEMO_MODEL = {"channels": 16, "channel_mult": [1, 2], "num_blocks": 1, "attention": False, "dropout": 0.0}
DEMO_SETTINGS = {"data": "digits", "steps": 3000, "save_every": 30, "batch_size": 64, "lr": 1e-3, "seed": 0,
                 "ema_decay": 0.999, "warmup": 100, "model_kwargs": DEMO_MODEL}
# Both kinds train with the same settings on the demo data.
DEFAULTS: dict[str, dict] = {kind: DEMO_SETTINGS for kind in KINDS}


def default_run_dir(kind: str) -> Path:
    """cache_dir()/runs/digits-<kind>: where the demo run lives and where the search looks for it."""
    if kind not in DEFAULTS:
        raise LcscError(f"run kind {kind!r} unknown; use one of {sorted(DEFAULTS)}")
    return cache_dir() / "runs" / f"digits-{kind}"


def demo_config(kind: str) -> dict:
    """run.json content of the default demo run of `kind`."""
    default_run_dir(kind)
    return make_config(kind, **DEFAULTS[kind])


def ensure_demo_run(kind: str, *, quiet: bool = False) -> Path:
    """Return the demo run folder, training it with the defaults first unless it is complete (done.json);
    an interrupted run resumes from its newest checkpoint."""
    run_dir = default_run_dir(kind)
    if not (run_dir / DONE_JSON).is_file():
        train(run_dir, demo_config(kind), quiet=quiet)
    return run_dir
