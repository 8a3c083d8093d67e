"""LCSC coefficient search over the saved checkpoints of one diffusion-model training run.

    python launch/tune_dm.py            # embedded digits demo: trains it on first use, then searches
    python launch/tune_dm.py --help     # every flag
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lcsc_ray.errors import run_cli  # noqa: E402
from lcsc_ray.search.job import run_job  # noqa: E402

if __name__ == "__main__":
    run_cli(lambda: run_job(sys.argv[1:], kind="dm"))
