"""The commands, one function each: the console scripts (`lcsc-tune-cm`, ... in pyproject.toml) and the
launch/*.py wrappers call these, so an installed command and a checkout script behave alike.

Each imports its command lazily: `lcsc-fid-stats --help` need not load Ray.
"""

from __future__ import annotations

import sys

from lcsc_ray.errors import run_cli


def main_tune_cm() -> None:
    """`lcsc-tune-cm`: LCSC search over the checkpoints of a consistency-model run."""
    from lcsc_ray.search.job import run_job

    run_cli(lambda: run_job(sys.argv[1:], kind="cm"))


def main_tune_dm() -> None:
    """`lcsc-tune-dm`: LCSC search over the checkpoints of a diffusion-model run."""
    from lcsc_ray.search.job import run_job

    run_cli(lambda: run_job(sys.argv[1:], kind="dm"))


def main_train_cm() -> None:
    """`lcsc-train-cm`: consistency training that saves the checkpoints LCSC combines."""
    from lcsc_ray.training.cli import main

    run_cli(lambda: main("cm"))


def main_train_dm() -> None:
    """`lcsc-train-dm`: EDM diffusion training that saves the checkpoints LCSC combines."""
    from lcsc_ray.training.cli import main

    run_cli(lambda: main("dm"))


def main_fid_stats() -> None:
    """`lcsc-fid-stats`: reference feature statistics of a dataset."""
    from lcsc_ray.cli.fid_stats import main

    run_cli(main)


def main_merge() -> None:
    """`lcsc-merge`: merge a run's checkpoints with given coefficients and export the result."""
    from lcsc_ray.cli.merge import main

    run_cli(main)
