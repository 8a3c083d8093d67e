"""lcsc-ray: Linear Combination of Saved Checkpoints, searched with Nevergrad on Ray Tune.

Data flow (one module per arrow): checkpoints -> stack -> merge -> sample -> features ->
statistics -> Fréchet distance -> score -> searcher.
"""

__version__ = "0.1.0"
