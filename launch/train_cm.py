"""Train the cm run whose raw checkpoint trajectory LCSC combines (= `lcsc-train-cm`); `--help` lists every flag.

With no arguments: the embedded digits demo (a few minutes on a 2-core CPU, >= 100 checkpoints).
"""

from lcsc_ray.cli import main_train_cm

if __name__ == "__main__":
    main_train_cm()
