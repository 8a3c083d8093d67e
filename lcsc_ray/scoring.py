"""Score one coefficient vector: merge → sample from fixed noise → features → Fréchet distance.

`CandidateScorer` holds everything an evaluation needs resident (the checkpoint stack, one model the merge
writes into, the sampler, the feature extractor and the reference with its √Σ_ref), built once per worker
process and reused for every candidate. It knows nothing about Ray, so the same object serves the Ray Tune
trial, the held-out re-scoring and the plain-loop baseline of `benchmarks/trial_overhead.py`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from lcsc_ray.baseline_checkpoints import ExtraBaseline
from lcsc_ray.checkpoints import CheckpointFile, load_state_dict
from lcsc_ray.devices import resolve_device
from lcsc_ray.errors import LcscError
from lcsc_ray.evaluator import EvalResult, Evaluator, RunningScore
from lcsc_ray.features import build_extractor
from lcsc_ray.file_identity import FileStamp, check_unchanged
from lcsc_ray.host_memory import retain_freed_memory
from lcsc_ray.images import write_sample_grid
from lcsc_ray.noise import FixedNoise
from lcsc_ray.reference_stats import load_reference_stats
from lcsc_ray.run_folder import RunInfo, add_python_path, load_run, run_from_config
from lcsc_ray.run_formats import build_network
from lcsc_ray.sampling import Sampler, build_sampler, generate_batches
from lcsc_ray.shipped_files import SHIPPED_KEY, local_path, local_run_config
from lcsc_ray.stack import STORAGE_DTYPES, CheckpointStack
from lcsc_ray.stack_file import open_stack_file


@dataclass(frozen=True)
class ScoringSpec:
    """Everything a worker needs to rebuild the scorer: plain values and absolute paths only, so it pickles
    into Ray's object store and means the same on every node (paths must be on storage every node sees)."""

    run_dir: str
    files: tuple[CheckpointFile, ...]
    reference_stats: str
    extractor: str
    ckpt_key: str | None = None
    strip_key_prefix: str | None = None
    stack_dtype: str = "float32"
    sampler: str | None = None
    sampler_options: dict[str, Any] = field(default_factory=dict)
    inception_weights: str | None = None
    batch_size: int = 500
    device: str = "auto"
    threads: int | None = None
    run_config: dict | None = None  # a detected or --run-json run.json; None: run_dir/run.json
    trust_pickle: bool = False  # the user's --trust-pickle: pickled network snapshots may be unpickled
    stack_file: str | None = None  # a stack file folder (lcsc_ray/stack_file.py) to map instead of the files
    file_stamps: tuple[FileStamp, ...] = ()  # the checkpoints as the search started: a changed one is refused


def load_stack(spec: ScoringSpec, device: str | torch.device = "cpu") -> CheckpointStack:
    """The checkpoint stack `spec` describes (its files, key and `stack_dtype`) on `device`: the one way to
    build it, so the copy a driver puts in the object store holds the same dtype a worker would load. With a
    stack file, the file is mapped instead (one copy per node, in the page cache)."""
    if spec.stack_file is not None:
        return open_stack_file(spec.stack_file, device)
    check_unchanged(spec.file_stamps)  # never merge a checkpoint replaced or truncated since the search started
    add_python_path((spec.run_config or {}).get("python_path", []))  # pickled snapshots import the user's classes
    return CheckpointStack.from_files(list(spec.files), ckpt_key=spec.ckpt_key, strip_prefix=spec.strip_key_prefix,
                                      device=device, storage_dtype=STORAGE_DTYPES[spec.stack_dtype],
                                      trust_pickle=spec.trust_pickle)


def spec_run(spec: ScoringSpec) -> RunInfo:
    """The run `spec` searches: its carried run.json (foreign runs), else run_dir/run.json."""
    if spec.run_config is not None:
        return run_from_config(spec.run_dir, spec.run_config, f"the run.json of {spec.run_dir}")
    return load_run(spec.run_dir)


def build_pipeline(spec: ScoringSpec, run: RunInfo, device: torch.device) -> tuple[nn.Module, Sampler, Evaluator]:
    """Everything of the scorer but the stack: the run's network (eval mode, no grad), the sampler, and the
    evaluator with the reference statistics checked against the extractor. The preflight builds the same."""
    net = build_network(run, spec.trust_pickle).to(device).eval().requires_grad_(False)
    sampler = build_sampler(run, spec.sampler, **spec.sampler_options)
    extractor = build_extractor(spec.extractor, device=device, inception_weights=spec.inception_weights)
    reference = load_reference_stats(spec.reference_stats, extractor=extractor.name, dim=extractor.dim)
    return net, sampler, Evaluator(extractor, reference, device=device)


class CandidateScorer:
    """Resident merge → sample → score pipeline for one training run (see module docstring)."""

    def __init__(self, spec: ScoringSpec, stack_payload: dict | None = None) -> None:
        if stack_payload is not None and stack_payload["storage_dtype"] != spec.stack_dtype:
            raise LcscError(f"the shared checkpoint stack holds {stack_payload['storage_dtype']} but --stack-dtype "
                            f"is {spec.stack_dtype}; build it with `load_stack(spec)`")
        if spec.threads:
            torch.set_num_threads(spec.threads)
        # Files the driver shipped in the payload (no shared file system): this node's copies replace its paths.
        self.shipped: dict[str, bytes] = (stack_payload or {}).get(SHIPPED_KEY) or {}
        if self.shipped:
            spec = replace(spec, reference_stats=local_path(self.shipped, spec.reference_stats),
                           inception_weights=local_path(self.shipped, spec.inception_weights),
                           run_config=local_run_config(self.shipped, spec.run_config))
        self.spec = spec
        self.device = resolve_device(spec.device)
        run = spec_run(spec)
        if stack_payload is not None:
            self.stack = CheckpointStack.from_payload(stack_payload, device=self.device)
        else:
            self.stack = load_stack(spec, self.device)
        self.net, self.sampler, self.evaluator = build_pipeline(spec, run, self.device)
        self.metric_name = self.evaluator.extractor.metric_name
        self.run = run
        self.image_shape = run.image_shape
        retain_freed_memory()  # after the stack's build, whose temporaries are freed for good

    def score(self, alpha: Sequence[float] | np.ndarray, *, seed: int, num_samples: int) -> EvalResult:
        """Merge α into the resident model, sample `num_samples` images from `seed`'s fixed noise, return
        the distance with the seconds spent per stage (merge, sample, features, statistics, distance)."""
        merge_seconds = self._merge(alpha)
        noise = FixedNoise(seed, self.image_shape)
        batches = generate_batches(self.sampler, self.net, noise, num_samples, self.spec.batch_size)
        result = self.evaluator.evaluate(batches)
        result.timings["merge"] = merge_seconds
        return result

    def score_rounds(self, alpha: Sequence[float] | np.ndarray, *, seed: int, rounds: Sequence[int],
                     blocks: int = 1) -> Iterator[EvalResult]:
        """`score` in rounds: merge α once, then for each round count n_r generate only the new samples
        n_(r-1)..n_r-1 of `seed`'s fixed noise, add them to the running statistics and yield the distance at
        n_r (the round's seconds per stage; the merge counted in the first), extrapolated to infinitely many
        samples too when `blocks` > 1 (`RunningScore`). The last round's score equals
        `score(alpha, num_samples=rounds[-1])`."""
        merge_seconds = self._merge(alpha)
        noise = FixedNoise(seed, self.image_shape)
        running = RunningScore(self.evaluator, blocks=blocks)
        batch_size = self.spec.batch_size
        for count in rounds:
            done = running.num_samples
            batches = (self.sampler.sample(self.net, noise, start, min(batch_size, count - start))
                       for start in range(done, count, batch_size))
            result = running.add(batches)
            result.timings["merge"], merge_seconds = merge_seconds, 0.0
            yield result

    def _merge(self, alpha: Sequence[float] | np.ndarray) -> float:
        """Write Σ αᵢ θᵢ into the resident model; the seconds it took."""
        start = time.perf_counter()
        self.stack.merge_into(self.net, np.asarray(alpha, dtype=np.float64))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    def write_samples(self, alpha: Sequence[float] | np.ndarray, path: Path, *, seed: int, count: int = 100) -> Path:
        """A PNG grid of `count` samples of the model merged with α, drawn with the search's sampler."""
        self.stack.merge_into(self.net, np.asarray(alpha, dtype=np.float64))
        return write_sample_grid(self.run, self.net, path, count=count, seed=seed, sampler=self.sampler)

    def load_candidate(self, source: np.ndarray | ExtraBaseline) -> None:
        """Put a candidate's weights into the resident model: merge coefficients α, or load a baseline
        checkpoint file the run provides (lcsc_ray/baseline_checkpoints.py; not a combination of the stack)."""
        if isinstance(source, ExtraBaseline):
            file = replace(source.file, path=Path(local_path(self.shipped, source.file.path)))
            state = load_state_dict(file, source.ckpt_key, trust_pickle=self.spec.trust_pickle)
            with torch.no_grad():  # copies into the stack-bound tensors; the next merge overwrites them again
                self.net.load_state_dict(state)
        else:
            self._merge(source)

    def sample_batches(self, *, seed: int, num_samples: int) -> Iterator[torch.Tensor]:
        """Samples 0..num_samples-1 of `seed`'s fixed noise from the resident model, in batches."""
        noise = FixedNoise(seed, self.image_shape)
        return generate_batches(self.sampler, self.net, noise, num_samples, self.spec.batch_size)


_SCORERS: dict[str, CandidateScorer] = {}


def cached_scorer(spec: ScoringSpec, stack_payload: dict | None = None) -> CandidateScorer:
    """The process-wide scorer for `spec`: Ray reuses trial actors and task workers, so a worker builds
    the stack, model, extractor and √Σ_ref once and every later candidate only merges and samples."""
    key = repr(spec)  # a frozen dataclass of plain values: its repr names every field
    if key not in _SCORERS:
        _SCORERS.clear()  # one run per worker: free the previous stack before building another
        _SCORERS[key] = CandidateScorer(spec, stack_payload)
    return _SCORERS[key]
