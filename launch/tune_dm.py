"""LCSC coefficient search over the saved checkpoints of one diffusion-model run (= `lcsc-tune-dm`).

    python launch/tune_dm.py            # embedded digits demo: trains it on first use, then searches
    python launch/tune_dm.py --help     # every flag
"""

from lcsc_ray.cli import main_tune_dm

if __name__ == "__main__":
    main_tune_dm()
