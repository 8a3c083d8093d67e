"""Merge the saved checkpoints of one run with given coefficients and export the result (= `lcsc-merge`).

    python launch/merge_checkpoints.py runs/cm/checkpoints --profile ema_0.999 --out merged.safetensors
"""

from lcsc_ray.cli import main_merge

if __name__ == "__main__":
    main_merge()
