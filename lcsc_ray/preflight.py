"""Check every input of a search in the driver, before Ray starts and before any experiment folder exists.

A mismatch between the network and the checkpoints, a damaged file or a wrong image shape would otherwise
surface inside every Ray trial, each penalised or retried, and burn the budget; worse, a few flipped or zeroed
bytes inside a tensor give finite weights that nothing downstream notices, and the export would carry them.
The preflight costs about one forward pass of a tiny batch plus reading every checkpoint once:

1. at least two checkpoints are selected, and no two of them are the same file (a symbolic or hard link
   would count one checkpoint as two steps: refused, naming both, rather than silently dropped, since the
   steps decide the EMA baselines); a dangling link is named as one;
2. every selected checkpoint's header is readable (safetensors header whose data ends exactly at the end of
   the file, the zip directory of a `.pt`, the first byte of a pickle): a truncated copy is named in
   milliseconds, before the network is built;
3. the network builds from run.json, and the newest checkpoint loads into it strictly (key sets, shapes,
   floating vs integer tensors), with a hint when every key differs by a prefix such as `module.`;
4. the sampler draws a tiny batch from the newest checkpoint: the images are finite, have the run's image
   shape, and the extractor turns them into finite features of the reference statistics' dimension;
5. every checkpoint is read in full (a small thread pool; one file at a time for pickles): each record of a
   zip-format `.pt` against its CRC-32, the tensors unpickled with `weights_only=True` (a legacy non-zip
   `.pt`, which has no CRC, is read fully the same way), every floating tensor finite, and every tensor's
   name, shape and floating/integer kind equal to the newest's. Safetensors carry no checksum: damage
   there is found only when it makes a value NaN/Inf. NVlabs snapshot pickles (`--trust-pickle`) are
   unpickled one by one here too: they have no checksum and no header, so unpickling is the only check
   there is, and the stack build does the same once per worker anyway (about that time again, once);
6. sample counts below the extractor's feature dimension are warned about (the Fréchet distance's
   covariance is then singular), and so are FID Inception weights whose content does not match their name.
Each failure is an `LcscError` naming the file or field and the fix. Runs of other code bases get their
format's checks on the way: pickled snapshots without --trust-pickle, an unimportable network class (the
code base is not on the Python path), a diffusers config that does not build. With `preview`, a grid of
samples of the newest checkpoint is written there (`--dry-run`). `check_trial_budget` and
`check_detection_flags` are the flag checks the job makes before it (they need no file).
"""

from __future__ import annotations

import json
import os
import time
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from lcsc_ray.checkpoints import CheckpointFile, LoadedCheckpoint, exclude_hint, layout_difference, load_checkpoint
from lcsc_ray.errors import LcscError
from lcsc_ray.images import write_sample_grid
from lcsc_ray.noise import FixedNoise
from lcsc_ray.run_folder import RUN_JSON, RunInfo
from lcsc_ray.scoring import ScoringSpec, build_pipeline
from lcsc_ray.stack import available_host_bytes

PREFLIGHT_SAMPLES = 2
PREFLIGHT_SEED = 12345  # any seed: the samples are only checked, never scored
_PICKLE_PROTOCOL_MARK = 0x80  # first byte of a pickle (torch.save's format before zip archives)
# Threads reading checkpoints at once: reads, CRC-32 and the NaN scan release the GIL, so a few overlap disk
# (or network-disk) latency with checking; more only adds memory (a safetensors file is held while checked).
VERIFY_THREADS = 4
VERIFY_THREAD_PREFIX = "preflight"  # the names of the threads reading checkpoints
# Flags that only describe a run we detect (lcsc_ray/run_formats); a run.json says all of it itself.
DETECTION_FLAGS = ("--model-factory", "--model-kwargs", "--image-shape", "--prediction-type")


@dataclass(frozen=True)
class PreflightReport:
    """What the preflight checked, for the lines the driver prints (warnings first, then the summary)."""

    num_checkpoints: int
    num_params: int
    sample_shape: tuple[int, ...]
    feature_dim: int
    seconds: float
    checkpoint_seconds: float = 0.0
    warnings: tuple[str, ...] = ()

    def summary(self) -> str:
        return (f"preflight: {self.num_checkpoints} checkpoints read in full (stored checksums, NaN/Inf, shapes "
                f"against the newest) in {self.checkpoint_seconds:.2f} s, network of {self.num_params:,} parameters "
                f"loads the newest strictly, samples {list(self.sample_shape)} -> {self.feature_dim} features: ok in "
                f"{self.seconds:.2f} s")


def check_trial_budget(num_trials: int, baselines: Sequence[str]) -> None:
    """Raise unless `--num-trials` leaves at least one searched candidate after the baselines, which are
    evaluated first: a budget they use up ends in a search that found nothing, reported as a failure."""
    if num_trials > len(baselines):
        return
    raise LcscError(f"--num-trials {num_trials} leaves no search candidate after the {len(baselines)} baselines "
                    f"evaluated first ({', '.join(baselines)}); pass --num-trials {len(baselines) + 1} or more "
                    "(a search needs hundreds to beat them)")


def check_detection_flags(given: Mapping[str, object], run_json: str | None) -> None:
    """Raise when a flag that only describes a detected run (`DETECTION_FLAGS`, given as flag -> value, None or
    empty when absent) comes with a run that has a run.json (`run_json`: its path), where it would be
    ignored without a word: the network, image shape and prediction type come from that file."""
    if run_json is None:
        return
    used = [flag for flag in DETECTION_FLAGS if given.get(flag) not in (None, {}, ())]
    if used:
        raise LcscError(f"{used[0]} applies only to runs without a run.json (detected from their files), and "
                        f"{run_json} describes this one: edit 'model', 'image_shape' or the scheduler there instead, "
                        f"and drop {' and '.join(used)}")


def sample_count_warnings(counts: Mapping[str, int], dim: int, extractor: str) -> list[str]:
    """A warning per sample count (flag -> count) below the feature dimension: the sample covariance then has
    rank below `dim`, so the Fréchet distance is biased and noisy (ranking candidates still works, the
    number is not comparable with published ones). Counts below 2 are the parser's to refuse."""
    return [f"warning: {flag} {count} is below the {dim} dimensions of the {extractor} features, so their sample "
            f"covariance is singular and the Fréchet distance biased; use at least {dim} samples for a distance "
            "comparable with others" for flag, count in counts.items() if count < dim]


def check_distinct_files(files: Sequence[CheckpointFile]) -> None:
    """Raise on a dangling link, or on two selected checkpoints that are one file (a symbolic or hard link):
    the merge would count that checkpoint twice, at two steps."""
    seen: dict[tuple[int, int], CheckpointFile] = {}
    for file in files:
        try:
            stat = file.path.stat()
        except FileNotFoundError:
            target = os.readlink(file.path) if file.path.is_symlink() else None
            what = f"a symbolic link to {target}, which does not exist" if target else "gone since it was listed"
            raise LcscError(f"{file.path}: {what}; restore it, or {exclude_hint(file)}") from None
        except OSError as error:
            raise LcscError(f"{file.path}: cannot be read ({error}); {exclude_hint(file)}") from None
        other = seen.setdefault((stat.st_dev, stat.st_ino), file)
        if other is not file:
            link = file if file.path.is_symlink() or not other.path.is_symlink() else other
            raise LcscError(f"{file.path} (step {file.step}) and {other.path} (step {other.step}) are the same file "
                            f"(a link), so one checkpoint would count twice; remove the link, or {exclude_hint(link)}")


def safetensors_size_problem(path: Path) -> str | None:
    """Why the size of a safetensors file does not match its header (8-byte header length + JSON header + the
    largest data end offset), or None: a copy cut short, or bytes appended, is named before any tensor is read."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little") if size >= 8 else 0
        if size < 8 or length > size - 8:
            return f"{size:,} bytes, too short for its header"
        try:
            header = json.loads(handle.read(length))
            end = max((int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"),
                      default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return "its JSON header does not parse"
    expected = 8 + length + end
    if size == expected:
        return None
    return f"{size:,} bytes where its header describes {expected:,}: " + ("cut short" if size < expected else
                                                                          "bytes after the last tensor")


def check_header(file: CheckpointFile) -> None:
    """Raise unless the checkpoint's directory of tensors can be read (no tensor data is loaded)."""
    fix = f"re-save it, or {exclude_hint(file)}"
    if file.format == "pickle":
        with open(file.path, "rb") as handle:
            first = handle.read(1)
        if not first or first[0] != _PICKLE_PROTOCOL_MARK:
            raise LcscError(f"{file.path}: not a pickle (empty or truncated); {fix}")
        return
    if file.format == "safetensors":
        try:
            problem = safetensors_size_problem(file.path)
            if problem is None:
                with safe_open(str(file.path), framework="pt", device="cpu") as handle:
                    handle.keys()
        except (SafetensorError, OSError, ValueError) as error:
            problem = str(error)
        if problem is not None:
            raise LcscError(f"{file.path}: unreadable or truncated safetensors file ({problem}); {fix}") from None
        return
    try:
        with zipfile.ZipFile(file.path) as archive:
            archive.namelist()
    except zipfile.BadZipFile:
        with open(file.path, "rb") as handle:
            first = handle.read(1)
        if first and first[0] == _PICKLE_PROTOCOL_MARK:
            return  # torch's pre-zip format has no directory to check; it is fully read when loaded
        raise LcscError(f"{file.path}: unreadable or truncated checkpoint (not a torch zip archive); {fix}") from None
    except OSError as error:
        raise LcscError(f"{file.path}: cannot be read ({error}); {fix}") from None


def check_zip_records(file: CheckpointFile) -> bool:
    """Read every record of a zip-format `.pt` against the CRC-32 its directory stores (torch.load itself does
    not compare them, so zeroed or flipped bytes inside tensor data load as plausible weights). Returns False
    for torch's legacy non-zip format, which has no checksum (`check_header` already refused anything else)."""
    try:
        archive = zipfile.ZipFile(file.path)
    except zipfile.BadZipFile:
        return False
    except OSError as error:
        raise LcscError(f"{file.path}: cannot be read ({error}); {exclude_hint(file)}") from None
    try:
        with archive:
            bad = archive.testzip()
    except (EOFError, OSError, zlib.error, NotImplementedError) as error:
        raise LcscError(f"{file.path}: unreadable or truncated checkpoint ({type(error).__name__}: {error}); "
                        f"re-save it, or {exclude_hint(file)}") from None
    if bad is not None:
        raise LcscError(f"{file.path}: record {bad!r} fails its CRC-32 check, so its bytes changed after they were "
                        f"written (a damaged copy or disk); copy or re-save it, or {exclude_hint(file)}")
    return True


def verify_checkpoint(file: CheckpointFile, spec: ScoringSpec,
                      newest: tuple[CheckpointFile, LoadedCheckpoint] | None = None) -> LoadedCheckpoint:
    """Read one checkpoint in full as the merge will (`load_checkpoint`: safe unpickling, every floating tensor
    finite), after its zip CRCs; with `newest`, also its layout against the newest checkpoint's."""
    is_zip = file.format == "torch" and check_zip_records(file)
    loaded = load_checkpoint(file, spec.ckpt_key, spec.strip_key_prefix, spec.trust_pickle, mmap=is_zip)
    if newest is not None:
        difference = layout_difference(newest[1].state_dict, loaded.state_dict)
        if difference is not None:
            raise LcscError(f"{file.path}: {difference} compared with the newest checkpoint {newest[0].path.name}, "
                            f"and all checkpoints must come from one architecture; {exclude_hint(file)}, or narrow "
                            "the selection (--window, --ckpt-pattern)")
    return loaded


def _verify_and_drop(file: CheckpointFile, spec: ScoringSpec,
                     newest: tuple[CheckpointFile, LoadedCheckpoint]) -> None:
    """`verify_checkpoint` without its result, so a pending future holds no tensors (only the newest's stay)."""
    verify_checkpoint(file, spec, newest)


def verify_threads(files: Sequence[CheckpointFile]) -> int:
    """How many checkpoints to check at once: pickles one by one (unpickling holds the GIL, and the code it runs
    may not be thread-safe), else `VERIFY_THREADS` bounded by the cores and by the memory a copy of the largest
    file needs per thread."""
    if not files or any(f.format == "pickle" for f in files):
        return 1
    largest = max(f.path.stat().st_size for f in files)
    available = available_host_bytes()
    by_memory = VERIFY_THREADS if available is None else available // (2 * max(largest, 1))
    return max(1, min(VERIFY_THREADS, os.cpu_count() or 1, len(files), by_memory))


def verify_all(files: Sequence[CheckpointFile], spec: ScoringSpec,
               newest: tuple[CheckpointFile, LoadedCheckpoint]) -> None:
    """`verify_checkpoint` for every file of `files` in a small thread pool; raises the error of the first file
    in step order that fails (the same line whatever the threads' timing), without reading the queued files.
    Files being read when one fails are finished first: no thread may still map a checkpoint once this returns,
    since a file rewritten or cut under a mapping kills the whole process (SIGBUS)."""
    pool = ThreadPoolExecutor(verify_threads(files), thread_name_prefix=VERIFY_THREAD_PREFIX)
    try:
        futures: list[Future] = [pool.submit(_verify_and_drop, file, spec, newest) for file in files]
        for future in futures:
            future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _common_prefix_hint(keys: Sequence[str], expected: set[str]) -> str | None:
    """The prefix (up to and including its first '.') that every checkpoint key carries and whose removal
    gives exactly the network's keys, e.g. 'module.' for a DDP-wrapped model."""
    first = keys[0].split(".", 1)[0] + "." if keys else ""
    if first and all(key.startswith(first) for key in keys) and {key[len(first):] for key in keys} == expected:
        return first
    return None


def check_strict_load(net: nn.Module, loaded: LoadedCheckpoint, file: CheckpointFile, run_json: str) -> None:
    """Raise unless `loaded` has exactly the network's keys, shapes and floating/integer kinds."""
    model = net.state_dict()
    difference = layout_difference(model, loaded.state_dict)
    if difference is None:
        return
    prefix = _common_prefix_hint(list(loaded.state_dict), set(model))
    if prefix is not None:
        raise LcscError(f"{file.path}: every key starts with {prefix!r} (a wrapped model, e.g. DDP), which the "
                        f"network from {run_json} lacks; pass --strip-key-prefix {prefix}")
    raise LcscError(f"{file.path}: {difference} compared with the network that {run_json} builds, so it is not the "
                    "network that was trained: fix 'model' (factory and kwargs) there, or --ckpt-key for a .pt "
                    "holding several state dicts")


def _check_samples(images: torch.Tensor, run: RunInfo, sampler_name: str, run_json: str) -> None:
    expected = (PREFLIGHT_SAMPLES, *run.image_shape)
    if tuple(images.shape) != expected:
        raise LcscError(f"the {sampler_name} sampler made images of shape {list(images.shape)} from the newest "
                        f"checkpoint, expected {list(expected)} from 'image_shape' in {run_json}; fix it there")
    if not bool(torch.isfinite(images).all()):
        raise LcscError(f"the newest checkpoint gives NaN/Inf images with the {sampler_name} sampler; check the "
                        f"sampler flags and 'precond' in {run_json}")


def preflight(spec: ScoringSpec, run: RunInfo, *, device: str | torch.device = "cpu",
              preview: Path | None = None, sample_counts: Mapping[str, int] | None = None) -> PreflightReport:
    """Run every check of the module docstring for the search `spec` describes; raise `LcscError` on the first
    failure. The checkpoints in `spec.files` must be sorted by step (as the selection returns them).
    `sample_counts` (flag -> samples per evaluation) are compared with the extractor's feature dimension."""
    started = time.perf_counter()
    files = list(spec.files)
    if len(files) < 2:
        found = f"only step {files[0].step}" if files else "none"
        raise LcscError(f"LCSC combines at least 2 checkpoints, the selection holds {found}; widen --window, "
                        "--interval or --max-checkpoints, or drop --exclude-steps")
    check_distinct_files(files)
    for file in files:
        check_header(file)
    run_json = str(run.run_dir / RUN_JSON) if spec.run_config is None else "the run.json of this search"
    device = torch.device(device)
    net, sampler, evaluator = build_pipeline(spec, run, device)
    read_started = time.perf_counter()
    newest = (files[-1], verify_checkpoint(files[-1], spec))
    read_seconds = time.perf_counter() - read_started
    check_strict_load(net, newest[1], files[-1], run_json)
    net.load_state_dict(newest[1].state_dict, strict=True)
    try:
        images = sampler.sample(net, FixedNoise(PREFLIGHT_SEED, run.image_shape), 0, PREFLIGHT_SAMPLES)
    except Exception as error:  # noqa: BLE001 - the user's network code runs here: any exception is an input problem
        first = str(error).splitlines()[0] if str(error) else ""
        code = run.config.get("python_path") or []
        cause = (f"the code base on the Python path ({', '.join(code)}) may not be the one, or the version, that "
                 f"wrote {files[-1].path.name}; " if code else "")
        raise LcscError(f"the {sampler.name} sampler failed on the newest checkpoint ({type(error).__name__}: "
                        f"{first}); {cause}check 'image_shape' and 'model' in {run_json} and the sampler "
                        "flags") from None
    _check_samples(images, run, sampler.name, run_json)
    extractor = evaluator.extractor
    try:
        features = extractor(images.to(extractor.device))
    except (RuntimeError, ValueError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise LcscError(f"the {extractor.name} extractor cannot take the run's images ({first}); check 'image_shape' "
                        f"in {run_json} and --extractor") from None
    if tuple(features.shape) != (PREFLIGHT_SAMPLES, evaluator.reference.dim) or not bool(torch.isfinite(features).all()):
        raise LcscError(f"the {extractor.name} extractor gave features {list(features.shape)} (finite: "
                        f"{bool(torch.isfinite(features).all())}) for the newest checkpoint's samples, the reference "
                        f"statistics {spec.reference_stats} have dimension {evaluator.reference.dim}; check --extractor "
                        "and --ref-stats")
    read_started = time.perf_counter()
    verify_all(files[:-1], spec, newest)  # the long part last: every quick check above has answered first
    read_seconds += time.perf_counter() - read_started
    warnings = sample_count_warnings(sample_counts or {}, evaluator.reference.dim, extractor.name)
    if getattr(extractor, "warning", None):
        warnings.append(extractor.warning)
    if preview is not None:
        write_sample_grid(run, net, preview, count=16, seed=PREFLIGHT_SEED, sampler=sampler)
    num_params = sum(t.numel() for t in newest[1].state_dict.values() if t.is_floating_point())
    return PreflightReport(len(files), num_params, tuple(images.shape), int(features.shape[1]),
                           time.perf_counter() - started, read_seconds, tuple(warnings))
