"""Presets: the paper's settings and the embedded demo as JSON files in `search_spaces/presets/`.

A preset is plain data so a user with the paper's checkpoints runs `--preset cifar10-cm` instead of
retyping the paper's settings. Besides the `METADATA_KEYS` (`preset` is its name: `name` is the --name
flag; `kind` is cm or dm and must match the script), its keys are the tune flags in dest form (`window`,
`interval`, `sampler`, `grid_steps`, `ts`, `nfe`, `extractor`, `fid_samples`, `final_samples`, `top_k`,
`num_trials`, `optimizer`, `space`, `bound`, `ema`, `phema`, ...). They become the flags' defaults, so a
flag given explicitly wins and a key left out keeps the flag's built-in default (`lcsc-tune-cm --help`).
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

from lcsc_ray.errors import LcscError

PRESET_DIR = Path(__file__).resolve().parent / "presets"
REQUIRED_KEYS = ("preset", "kind")
# Keys that describe the preset rather than set a flag.
METADATA_KEYS = frozenset({"preset", "kind", "description", "data", "notes", "checkpoint_saved_every",
                           "expected_checkpoints"})


def available_presets() -> list[str]:
    """Names of the bundled presets (file stems in `search_spaces/presets/`)."""
    return sorted(path.stem for path in PRESET_DIR.glob("*.json"))


def load_preset(name_or_path: str | Path) -> dict[str, Any]:
    """Load a bundled preset by name (`digits-cm`) or any preset file by path (`my.json`)."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if not (text.endswith(".json") or path.is_file()):
        path = PRESET_DIR / f"{text}.json"
        if not path.is_file():
            names = available_presets()
            close = difflib.get_close_matches(text, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise LcscError(f"unknown --preset {text!r}{hint}; bundled presets: {', '.join(names)}, or a .json path")
    if not path.is_file():
        raise LcscError(f"--preset file {path} does not exist; give a bundled name ({', '.join(available_presets())})")
    try:
        preset = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise LcscError(f"--preset file {path} is not valid JSON ({error}); fix or replace it") from None
    missing = [key for key in REQUIRED_KEYS if not isinstance(preset, dict) or key not in preset]
    if missing:
        raise LcscError(f"--preset file {path} lacks {', '.join(missing)}; see search_spaces/presets/ for the format")
    return preset
