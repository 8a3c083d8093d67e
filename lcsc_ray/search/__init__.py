"""The search layer: `lcsc-es` and optimizer building (`optimizers`), the Nevergrad searcher with compact
trial configs (`searcher`), the Ray Tune driver (`tuner.run_search`), the trial and the final report."""
