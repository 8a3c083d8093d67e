"""The scorer spec of a digits demo run as its preset scores it, for the benchmarks that time or search it.

One place for what the search job derives from a preset (checkpoint window, extractor, reference statistics,
sampler and its options), so every benchmark measures the configuration a user's search would run and a
change to the presets reaches all of them. Imported by the scripts in this folder (their own folder is on
`sys.path` when run as `python benchmarks/NAME.py`).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from lcsc_ray.checkpoints import discover_checkpoints, select_checkpoints
from lcsc_ray.reference_stats import ensure_reference_stats
from lcsc_ray.run_folder import load_run
from lcsc_ray.scoring import ScoringSpec
from lcsc_ray.training.demo import ensure_demo_run
from search_spaces import load_preset


def demo_scoring_spec(kind: str, run_dir: str | Path | None = None, *, preset: dict[str, Any] | None = None,
                      window: bool = False, **overrides: Any) -> ScoringSpec:
    """The spec for `run_dir` (default: the `kind` demo run, trained on first use) scored as `preset` says
    (default: the bundled `digits-<kind>`). `window`: only the preset's checkpoint window, as a
    search takes it; otherwise every saved checkpoint. `overrides` replace spec fields (device, threads, batch size)."""
    preset = preset if preset is not None else load_preset(f"digits-{kind}")
    run_dir = Path(run_dir).resolve() if run_dir else ensure_demo_run(kind, quiet=True)
    run = load_run(run_dir)
    files = discover_checkpoints(run.checkpoint_dir)
    if window:
        files = select_checkpoints(files, window=preset.get("window"), interval=preset.get("interval", 1),
                                   max_count=None)
    spec = ScoringSpec(run_dir=str(run_dir), files=tuple(files), extractor=preset["extractor"],
                       reference_stats=str(ensure_reference_stats(run.config["data"], preset["extractor"])),
                       sampler=preset.get("sampler"), sampler_options={"nfe": preset["nfe"]} if "nfe" in preset else {})
    return replace(spec, **overrides)
