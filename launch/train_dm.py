"""Train the dm run whose raw checkpoint trajectory LCSC combines (= `lcsc-train-dm`); `--help` lists every flag.

With no arguments: the embedded digits demo (a few minutes on a 2-core CPU, >= 100 checkpoints).
"""

from lcsc_ray.cli import main_train_dm

if __name__ == "__main__":
    main_train_dm()
