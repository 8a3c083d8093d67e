"""LCSC coefficient search over the saved checkpoints of one consistency-model run (= `lcsc-tune-cm`).

    python launch/tune_cm.py            # embedded digits demo: trains it on first use, then searches
    python launch/tune_cm.py --help     # every flag
"""

from lcsc_ray.cli import main_tune_cm

if __name__ == "__main__":
    main_tune_cm()
