"""What an experiment is: the settings fixed when a search starts, which `--resume` must not change.

A search's scores compare, and its optimizer's state means something, only under the settings it started with:
the run's checkpoints (by content, so a moved or copied run folder still resumes) and their selection; how a
candidate is scored (extractor, reference statistics, sampler and its options, noise, sample counts, objective);
which candidates exist (space, bound, optimizer and its seed, baselines). `IDENTITY` is the one table of those
settings: their values are recorded in the experiment's manifest when it starts, and `check_identity` refuses
a resume that differs in any of them, before Ray starts, in one line naming every difference. `MAY_CHANGE`
lists the flags a resume may change, with the reason; every tune flag is in one of the two tables.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from lcsc_ray.checkpoints import CheckpointFile, format_steps
from lcsc_ray.errors import LcscError
from lcsc_ray.file_identity import DIGEST_CHARS, content_digest
from lcsc_ray.search.objective import SearchObjective
from lcsc_ray.search.optimizers import resolve_optimizer_name
from search_spaces.spaces import CoefficientSpace

NOT_RECORDED = object()  # an experiment that predates a key: the setting is not compared
RUN_CONFIG_PATHS = ("data", "python_path")  # run.json entries that name places, not what a score means


@dataclass(frozen=True)
class SearchInputs:
    """What the identity of a search is read from: the parsed flags and what they resolved to before Ray."""

    args: argparse.Namespace
    run_dir: Path
    files: Sequence[CheckpointFile]  # the selected checkpoints
    trajectory: str
    run_config: Mapping[str, Any]
    reference_stats: Path
    space: CoefficientSpace
    rounds: Sequence[int]  # the trial's sample counts (`LcscTrial.round_schedule`)
    objective: SearchObjective

    @cached_property
    def search(self) -> dict[str, Any]:
        """`search_settings` of the search about to run: what `run_search` records and checks as well."""
        return search_settings(self.space, optimizer=self.args.optimizer, seed=self.args.seed,
                               scheduler=self.args.scheduler, rounds=self.rounds, objective=self.objective,
                               candidates_per_trial=self.args.candidates_per_trial)


@dataclass(frozen=True)
class Identity:
    """One setting of an experiment's identity: the flag a user changes, the manifest key its value is
    recorded under and how to read that value.

    `implied_by`: manifest keys whose difference already explains this one (a new --window selects other
    checkpoints), so the refusal names the flag the user changed. `legacy`: the value an experiment recorded
    before the key existed, where that is known. `shown_with`: a recorded key (a path) shown before the value
    in the refusal, not compared: the content identifies the run, the path tells the user which one it was.
    `describe`: how the refusal shows a value that is not typed as a flag's (a count, a digest)."""

    flag: str
    key: str
    read: Callable[[SearchInputs], Any]
    implied_by: tuple[str, ...] = ()
    legacy: Any = NOT_RECORDED
    shown_with: str | None = None
    describe: Callable[[Any], str] | None = None


def _flag(dest: str) -> Callable[[SearchInputs], Any]:
    """The parsed value of a flag, as given (or its default)."""
    return lambda inputs: getattr(inputs.args, dest)


def _setting(key: str) -> Callable[[SearchInputs], Any]:
    """A value of `search_settings`, the part of the identity `run_search` records and checks as well."""
    return lambda inputs: inputs.search[key]


def _checkpoints(inputs: SearchInputs) -> str:
    """The selected checkpoints by step and content: what the coefficients of every candidate multiply."""
    pairs = [[f.step, content_digest(f.path)] for f in inputs.files]
    digest = hashlib.sha256(json.dumps(pairs).encode()).hexdigest()[:DIGEST_CHARS]
    return f"{len(pairs)} checkpoints at steps {format_steps([f.step for f in inputs.files])}, content {digest}"


def _run_config(inputs: SearchInputs) -> str:
    """The run.json in use (our run's, --run-json's or detection's), without the entries that name places."""
    kept = {k: v for k, v in inputs.run_config.items() if k not in RUN_CONFIG_PATHS}
    text = json.dumps(kept, sort_keys=True, default=str)
    return f"content {hashlib.sha256(text.encode()).hexdigest()[:DIGEST_CHARS]}"


def _reference_stats(inputs: SearchInputs) -> str:
    return f"content {content_digest(inputs.reference_stats)}"


def _inception_weights(inputs: SearchInputs) -> str | None:
    """The FID weights file by content when one is given (a missing one is reported by the extractor)."""
    given = inputs.args.inception_weights
    path = Path(given).expanduser() if given else None
    return f"content {content_digest(path)}" if path is not None and path.is_file() else given


CHECKPOINT_SELECTION = ("window", "interval", "max_checkpoints", "exclude_steps", "ckpt_select", "ckpt_pattern")
RUN_HINTS = ("model_factory", "model_kwargs", "image_shape", "prediction_type")

IDENTITY: tuple[Identity, ...] = (
    # the run and its checkpoints, by content
    Identity("--ckpt-dir", "checkpoints", _checkpoints, implied_by=CHECKPOINT_SELECTION, shown_with="ckpt_dir"),
    Identity("--ckpt-dir", "num_checkpoints", _setting("num_checkpoints"), shown_with="ckpt_dir",
             implied_by=("checkpoints", *CHECKPOINT_SELECTION), describe=lambda n: f"{n} checkpoints"),
    Identity("--window", "window", _flag("window")),
    Identity("--interval", "interval", _flag("interval")),
    Identity("--max-checkpoints", "max_checkpoints", _flag("max_checkpoints")),
    Identity("--exclude-steps", "exclude_steps", _flag("exclude_steps")),
    Identity("--ckpt-select", "ckpt_select", lambda inputs: inputs.trajectory),
    Identity("--ckpt-pattern", "ckpt_pattern", _flag("ckpt_pattern")),
    Identity("--ckpt-key", "ckpt_key", _flag("ckpt_key")),
    Identity("--run-json", "run_config", _run_config, implied_by=RUN_HINTS, describe=lambda text: f"(run.json {text})"),
    Identity("--model-factory", "model_factory", _flag("model_factory")),
    Identity("--model-kwargs", "model_kwargs", _flag("model_kwargs")),
    Identity("--image-shape", "image_shape", _flag("image_shape")),
    Identity("--prediction-type", "prediction_type", _flag("prediction_type")),
    Identity("--stack-dtype", "stack_dtype", _flag("stack_dtype")),
    # what a score means
    Identity("--extractor", "extractor", _flag("extractor")),
    Identity("--inception-weights", "inception_weights", _inception_weights, shown_with="inception_weights_path"),
    Identity("--ref-stats", "reference_stats", _reference_stats, shown_with="reference_stats_path"),
    Identity("--sampler", "sampler", _flag("sampler")),
    Identity("--nfe", "nfe", _flag("nfe")),
    Identity("--grid-steps", "grid_steps", _flag("grid_steps")),
    Identity("--ts", "ts", _flag("ts")),
    Identity("--sigmas", "sigmas", _flag("sigmas")),
    Identity("--order", "order", _flag("order")),
    Identity("--noise-seed", "noise_seed", _setting("noise_seed")),
    Identity("--fid-samples", "fid_samples", _flag("fid_samples")),
    Identity("--rounds", "rounds", _setting("rounds"), implied_by=("fid_samples", "scheduler")),
    Identity("--fresh-noise-every", "fresh_noise_every", _setting("fresh_noise_every"), legacy=0),
    Identity("--coef-penalty", "coef_penalty", _setting("coef_penalty"), legacy=0),
    # which candidates exist
    Identity("--space", "space", _setting("space")),
    Identity("--bound", "bound", _setting("bound")),
    Identity("--sigma", "sigma", _setting("sigma"), implied_by=("space", "num_checkpoints")),
    Identity("--optimizer", "optimizer", _setting("optimizer")),
    Identity("--seed", "seed", _setting("seed")),
    Identity("--ema", "ema", _flag("ema")),
    Identity("--phema", "phema", _flag("phema")),
    Identity("--scheduler", "scheduler", _setting("scheduler"), legacy="fifo"),
    Identity("--reduction-factor", "reduction_factor", _flag("reduction_factor")),
    Identity("--candidates-per-trial", "candidates_per_trial", _setting("candidates_per_trial"), legacy=1),
)

# Recorded with the identity to show the user which run or file it was; never compared.
SHOWN: dict[str, Callable[[SearchInputs], Any]] = {
    "ckpt_dir": lambda inputs: str(inputs.run_dir),
    "reference_stats_path": lambda inputs: str(inputs.reference_stats),
    "inception_weights_path": _flag("inception_weights"),
}

_FINAL = "the final stage re-scores every finalist and baseline alike after the search"
_RESOURCES = "where and how fast trials run, not what they compute"
MAY_CHANGE: dict[str, str] = {
    "--num-trials": "a larger value grows the budget (the search is rebuilt from its candidate store); a smaller one is ignored with a note",
    "--preset": "its values are the defaults of the other flags, which are compared themselves",
    "--storage": "where the experiment is found",
    "--name": "which experiment to resume",
    "--resume": "says to continue",
    "--out": "where results, plots and the merged checkpoint go",
    "--dry-run": "stops before the search",
    "--final-samples": _FINAL,
    "--heldout-seeds": _FINAL,
    "--eval-extractors": _FINAL,
    "--select-on": _FINAL,
    "--pr-samples": _FINAL,
    "--top-k": _FINAL,
    "--batch-size": "the noise of a sample does not depend on its batch",
    "--strip-key-prefix": "renames checkpoint keys; the weights are identified by content",
    "--trust-pickle": "permission to read pickles, not what they hold",
    "--code-dir": "where the run's code is found",
    "--address": _RESOURCES,
    "--cpus-per-trial": _RESOURCES,
    "--gpus-per-trial": _RESOURCES,
    "--max-concurrent": _RESOURCES,
    "--max-failures": _RESOURCES,
    "--device": _RESOURCES + " (another device may change scores in their last digits)",
    "--stack-via-object-store": _RESOURCES,
    "--stack-file": _RESOURCES,
    "--dashboard-host": "monitoring",
    "--dashboard-port": "monitoring",
    "--no-dashboard": "monitoring",
    "--quiet": "console output",
}


def search_settings(space: CoefficientSpace, *, optimizer: str, seed: int, scheduler: str, rounds: Sequence[int],
                    objective: SearchObjective, candidates_per_trial: int) -> dict[str, Any]:
    """The identity settings `run_search` knows from its own arguments: recorded in every manifest and checked
    on every resume, also where `run_search` is called without the job's full record."""
    return {
        "space": space.name, "num_checkpoints": space.num_checkpoints, "bound": space.bound, "sigma": space.sigma,
        "optimizer": resolve_optimizer_name(optimizer), "seed": seed, "scheduler": scheduler,
        "rounds": list(rounds), "noise_seed": objective.noise_seed, "fresh_noise_every": objective.fresh_noise_every,
        "coef_penalty": objective.coef_penalty, "candidates_per_trial": candidates_per_trial,
    }


def _as_json(record: Mapping[str, Any]) -> dict[str, Any]:
    """`record` as the manifest holds it after a JSON round trip (tuples as lists), so values compare."""
    return json.loads(json.dumps(dict(record), default=str))


def identity_record(inputs: SearchInputs) -> dict[str, Any]:
    """Every identity setting of the search about to run (and the paths shown with them), by manifest key."""
    record = {key: read(inputs) for key, read in SHOWN.items()}
    record.update({entry.key: entry.read(inputs) for entry in IDENTITY})
    return _as_json(record)


def _as_typed(value: Any) -> str:
    """A recorded value as it would be typed on the command line."""
    if value is None:
        return "(default)"
    if isinstance(value, list):
        return ",".join(map(_as_typed, value)) or "''"
    if isinstance(value, dict):
        return shlex.quote(json.dumps(value, separators=(",", ":")))
    return shlex.quote(str(value)) if isinstance(value, str) else str(value)


def _recorded(entry: Identity, record: Mapping[str, Any]) -> Any:
    """The value `record` holds for `entry` (None is a value: the flag was not given), else its legacy value."""
    return record[entry.key] if entry.key in record else entry.legacy


def _shown(entry: Identity, record: Mapping[str, Any]) -> str:
    """How the refusal shows `entry`'s value in `record`: as typed, or a description after the path it was read
    from (a run folder and its checkpoints' content)."""
    value = _recorded(entry, record)
    where = record.get(entry.shown_with) if entry.shown_with else None
    if entry.describe:
        text = entry.describe(value)
    else:
        text = str(value) if entry.shown_with and value is not None else _as_typed(value)
    return f"{where} ({text})" if where else text


def differing_settings(manifest: Mapping[str, Any], record: Mapping[str, Any]) -> list[Identity]:
    """The identity settings in which `record` differs from what the experiment recorded, leaving out keys the
    experiment did not record and differences another one already explains."""
    record = _as_json(record)
    compared = [entry for entry in IDENTITY if entry.key in record and _recorded(entry, manifest) is not NOT_RECORDED]
    differing = {entry.key for entry in compared if _recorded(entry, manifest) != record[entry.key]}
    return [entry for entry in compared if entry.key in differing and not differing & set(entry.implied_by)]


def check_identity(name: str, manifest: Mapping[str, Any], record: Mapping[str, Any]) -> None:
    """Refuse to resume experiment `name` with settings other than those it started with: its scores and the
    optimizer's state would be mixed with scores that do not compare. One line names every difference."""
    differing = differing_settings(manifest, record)
    if differing:
        was = " ".join(f"{entry.flag} {_shown(entry, manifest)}" for entry in differing)
        now = " ".join(f"{entry.flag} {_shown(entry, _as_json(record))}" for entry in differing)
        raise LcscError(f"--resume {name}: this experiment was started with {was}, not {now}; rerun with the "
                        "original values or start a new --name")
