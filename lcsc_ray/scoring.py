"""Score one coefficient vector: merge → sample from fixed noise → features → Fréchet distance.

`CandidateScorer` holds everything an evaluation needs resident (the checkpoint stack, one model the merge
writes into, the sampler, the feature extractor and the reference with its √Σ_ref), built once per worker
process and reused for every candidate. It knows nothing about Ray, so the same object serves the Ray Tune
trial, the held-out re-scoring and the plain-loop baseline of `benchmarks/trial_overhead.py`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from lcsc_ray.checkpoints import CheckpointFile
from lcsc_ray.evaluator import EvalResult, Evaluator
from lcsc_ray.features import build_extractor
from lcsc_ray.noise import FixedNoise
from lcsc_ray.reference_stats import load_reference_stats
from lcsc_ray.run_folder import load_run
from lcsc_ray.sampling import build_sampler, generate_batches
from lcsc_ray.stack import STORAGE_DTYPES, CheckpointStack, resolve_device
from lcsc_ray.training.preview import write_sample_grid


@dataclass(frozen=True)
class ScoringSpec:
    """Everything a worker needs to rebuild the scorer: plain values and absolute paths only, so it pickles
    into Ray's object store and means the same on every node (paths must be on storage every node sees)."""

    run_dir: str
    files: tuple[CheckpointFile, ...]
    reference_stats: str
    extractor: str
    ckpt_key: str | None = None
    stack_dtype: str = "float32"
    sampler: str | None = None
    sampler_options: dict[str, Any] = field(default_factory=dict)
    inception_weights: str | None = None
    batch_size: int = 500
    device: str = "auto"
    threads: int | None = None


class CandidateScorer:
    """Resident merge → sample → score pipeline for one training run (see module docstring)."""

    def __init__(self, spec: ScoringSpec, stack_payload: dict | None = None) -> None:
        if spec.threads:
            torch.set_num_threads(spec.threads)
        self.spec = spec
        self.device = resolve_device(spec.device)
        run = load_run(spec.run_dir)
        if stack_payload is not None:
            self.stack = CheckpointStack.from_payload(stack_payload, device=self.device)
        else:
            self.stack = CheckpointStack.from_files(
                list(spec.files),
                ckpt_key=spec.ckpt_key,
                device=self.device,
                storage_dtype=STORAGE_DTYPES[spec.stack_dtype],
            )
        self.net = run.build_network().to(self.device).eval().requires_grad_(False)
        self.sampler = build_sampler(run, spec.sampler, **spec.sampler_options)
        extractor = build_extractor(spec.extractor, device=self.device, inception_weights=spec.inception_weights)
        reference = load_reference_stats(spec.reference_stats, extractor=extractor.name, dim=extractor.dim)
        self.evaluator = Evaluator(extractor, reference, device=self.device)
        self.metric_name = extractor.metric_name
        self.run = run
        self.image_shape = run.image_shape

    def score(self, alpha: Sequence[float] | np.ndarray, *, seed: int, num_samples: int) -> EvalResult:
        """Merge α into the resident model, sample `num_samples` images from `seed`'s fixed noise, return
        the distance with the seconds spent per stage (merge, sample, features, statistics, distance)."""
        start = time.perf_counter()
        self.stack.merge_into(self.net, np.asarray(alpha, dtype=np.float64))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        merge_seconds = time.perf_counter() - start
        noise = FixedNoise(seed, self.image_shape)
        batches = generate_batches(self.sampler, self.net, noise, num_samples, self.spec.batch_size)
        result = self.evaluator.evaluate(batches)
        result.timings["merge"] = merge_seconds
        return result

    def write_samples(self, alpha: Sequence[float] | np.ndarray, path: Path, *, seed: int, count: int = 100) -> Path:
        """A PNG grid of `count` samples of the model merged with α, drawn with the search's sampler."""
        self.stack.merge_into(self.net, np.asarray(alpha, dtype=np.float64))
        return write_sample_grid(self.run, self.net, path, count=count, seed=seed, sampler=self.sampler)


_SCORERS: dict[str, CandidateScorer] = {}


def cached_scorer(spec: ScoringSpec, stack_payload: dict | None = None) -> CandidateScorer:
    """The process-wide scorer for `spec`: Ray reuses trial actors and task workers, so a worker builds
    the stack, model, extractor and √Σ_ref once and every later candidate only merges and samples."""
    key = repr(spec)  # a frozen dataclass of plain values: its repr names every field
    if key not in _SCORERS:
        _SCORERS.clear()  # one run per worker: free the previous stack before building another
        _SCORERS[key] = CandidateScorer(spec, stack_payload)
    return _SCORERS[key]
