"""Train the dm run whose raw checkpoint trajectory LCSC combines; `--help` lists every flag.

With no arguments: the embedded digits demo (a few minutes on a 2-core CPU, >= 100 checkpoints).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lcsc_ray.errors import run_cli  # noqa: E402
from lcsc_ray.training.cli import main  # noqa: E402

if __name__ == "__main__":
    run_cli(lambda: main("dm"))
