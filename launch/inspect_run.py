"""Detect a training run's format and convention, list its checkpoints and write a sample grid of the newest
one (= `lcsc-inspect-run`).

    python launch/inspect_run.py RUN_DIR [--ckpt-select unet_ema] [--trust-pickle] [--code-dir DIR]
"""

from lcsc_ray.cli.inspect_run import console_main

if __name__ == "__main__":
    console_main()
