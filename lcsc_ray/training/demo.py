"""The embedded demo runs: CT and EDM training on scikit-learn's bundled 8x8 digits, sized to finish in a few
minutes on a small CPU while saving >= 100 raw checkpoints for LCSC to combine.

The defaults live here (the CLIs in launch/ and the search's `ensure_demo_run` share them); the run folder
is `cache_dir()/runs/digits-<kind>-<version>` (DEMO_VERSION), reused by later searches (the version changes
with the recipe, so a cached run of an older recipe is never mistaken for the current demo).

Recipe (docs/TRAINING.md has the measured FD-vs-step curves behind it): a 3-level U-Net with scale-and-shift
noise conditioning (0.38M parameters), Adam after a 200-step warm-up (lr 1e-3 for CT, 3e-4 for EDM),
batch 128, 3,000 steps with a checkpoint every 30; the CM adds dropout 0.2. The CT curriculum doubles N from
10 to 320 over the first 60% of training and then holds it, so the last 1,200 steps (40 checkpoints) train
one fixed objective: the window the digits presets search.
"""

from __future__ import annotations

from pathlib import Path

from lcsc_ray.errors import LcscError
from lcsc_ray.paths import cache_dir
from lcsc_ray.run_folder import DONE_JSON
from lcsc_ray.training.loop import make_config, train

DEMO_VERSION = {"cm": "v3", "dm": "v2"}  # v3: the CM with dropout 0.2 (v2 had none)
DEMO_MODEL = {"channels": 16, "channel_mult": [1, 2, 2], "num_blocks": 2, "attention": False, "dropout": 0.0,
              "emb_mode": "scale_shift"}
DEMO_SETTINGS = {"data": "digits", "steps": 3000, "save_every": 30, "batch_size": 128, "lr": 3e-4, "seed": 0,
                 "ema_decay": 0.999, "warmup": 200, "model_kwargs": DEMO_MODEL}
DEMO_CURRICULUM = {"s1": 320, "curriculum_end": 0.6}  # CT only: N held at 320 for the last 40% of training
# CT learns faster at 1e-3 (EMA fd_digits 96 vs 144 at step 2,100, measured); the DM is good at 3e-4.
# CT with dropout 0.2 (the same masks for target and prediction, lcsc_ray/training/ct.py): training seeds 0, 1, 2
# end with a held-out training-EMA fd_digits of 60, 57, 52; without dropout 50, 95, 95 (docs/RESULTS.md).
DEFAULTS: dict[str, dict] = {"cm": {**DEMO_SETTINGS, "lr": 1e-3, "loss_settings": DEMO_CURRICULUM,
                                    "model_kwargs": {**DEMO_MODEL, "dropout": 0.2}},
                             "dm": {**DEMO_SETTINGS, "loss_settings": {}}}


def default_run_dir(kind: str) -> Path:
    """cache_dir()/runs/digits-<kind>-<version>: where the demo run lives and where the search looks for it."""
    if kind not in DEFAULTS:
        raise LcscError(f"run kind {kind!r} unknown; use one of {sorted(DEFAULTS)}")
    return cache_dir() / "runs" / f"digits-{kind}-{DEMO_VERSION[kind]}"


def demo_config(kind: str) -> dict:
    """run.json content of the default demo run of `kind`."""
    default_run_dir(kind)
    return make_config(kind, **DEFAULTS[kind])


# Minutes of CPU time a demo run's training took on a 2-core machine (docs/TRAINING.md): 461 s CM, 298 s DM.
FIRST_USE_MINUTES = {"cm": 8, "dm": 5}


def ensure_demo_run(kind: str, *, quiet: bool = False) -> Path:
    """Return the demo run folder, training it with the defaults first unless it is complete (done.json);
    an interrupted run resumes from its newest checkpoint."""
    run_dir = default_run_dir(kind)
    if not (run_dir / DONE_JSON).is_file():
        if not quiet:
            print(f"training the digits demo run ({kind}) on first use into {run_dir}: about "
                  f"{FIRST_USE_MINUTES[kind]} min on 2 CPU cores, once (later runs reuse it; an interrupted "
                  "training resumes)", flush=True)
        train(run_dir, demo_config(kind), quiet=quiet)
    return run_dir
