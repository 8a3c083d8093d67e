"""The flags of `lcsc-tune-cm` / `lcsc-tune-dm` (launch/tune_*.py), whose defaults come from a preset.

`--preset` is read first and its values become the parser's defaults (`set_defaults`) before the real
parse, so `--help` shows what a run will use and an explicit flag still wins. Every flag has a built-in
default of its own, which a preset that leaves the key out falls back to.
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Callable
from typing import Any

from lcsc_ray.argtypes import float_above, float_at_least, int_at_least
from lcsc_ray.errors import LcscError
from lcsc_ray.run_formats import add_run_flags
from lcsc_ray.sampling import DEFAULT_SAMPLER
from lcsc_ray.stack import STORAGE_DTYPES
from search_spaces import DEFAULT_BOUND, load_preset
from search_spaces.preset import METADATA_KEYS

HELDOUT_SEED_OFFSET = 1_000_003  # held-out noise seed = search noise seed + this (any fixed, distinct value)
COUNT = int_at_least(1)  # trials, candidates, checkpoints, steps, batch sizes, concurrency
SAMPLE_COUNT = int_at_least(2)  # a Fréchet distance needs a covariance: at least 2 samples
SEED = int_at_least(0)  # torch and Nevergrad seeds are non-negative


def _comma_list(convert: Callable[[str], Any], name: str) -> Callable[[str], list]:
    """An argparse `type` for comma-separated values; `name` is what argparse's error calls it."""
    def parse(text: str) -> list:
        return [convert(part) for part in text.split(",") if part.strip()]
    parse.__name__ = name
    return parse


int_list = _comma_list(int, "comma-separated integer")


def rounds_list(text: str) -> list[int]:
    """`--rounds`: increasing sample counts of at least 2, checked while parsing, before anything starts."""
    counts = int_list(text)
    if any(n < 2 for n in counts) or counts != sorted(set(counts)):
        raise argparse.ArgumentTypeError(f"{text!r}: sample counts must increase and be at least 2, e.g. 500,1000,2000")
    return counts
float_list = _comma_list(float, "comma-separated number")
str_list = _comma_list(str.strip, "comma-separated name")


def build_parser(kind: str) -> argparse.ArgumentParser:
    """Every tune flag with its built-in default (the paper's settings where it has one)."""
    model = "consistency model" if kind == "cm" else "diffusion model"
    parser = argparse.ArgumentParser(
        description=f"LCSC: search coefficients that linearly combine the saved checkpoints of one {model} "
        "training run so the merged model scores a lower Fréchet distance; Nevergrad optimizers on Ray Tune. "
        f"With no arguments: trains the embedded digits {kind.upper()} demo run on first use and searches it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = parser.add_argument_group("what to search")
    g.add_argument("--preset", default=f"digits-{kind}", help="bundled preset name or a preset .json file; its "
                   "values are the defaults shown here (pass --preset before --help to see another preset's)")
    g.add_argument("--ckpt-dir", help="training run folder (with run.json and checkpoints/) or a folder of "
                   "checkpoints whose run.json is in it or its parent, or a run folder of diffusers, OpenAI "
                   "consistency models or NVlabs EDM/EDM2/ECT as it was saved (docs/FORMATS.md); "
                   "default: the embedded demo run (trained on first use). "
                   "On a cluster it must be a path every node sees (shared storage), or use --stack-via-object-store")
    g.add_argument("--ckpt-pattern", help="regex matched against whole checkpoint names with one group capturing the "
                   "step; default: the last number in the name")
    g.add_argument("--ckpt-key", help="sub-dict of .pt checkpoints holding the state dict (model, ema, ...)")
    g.add_argument("--window", type=COUNT,
                   help="only checkpoints from the last WINDOW training iterations; default: all")
    g.add_argument("--interval", type=COUNT, default=1, help="keep every INTERVAL-th saved checkpoint")
    g.add_argument("--max-checkpoints", type=COUNT, help="keep at most this many (the newest)")
    g.add_argument("--exclude-steps", type=int_list, default=[], help="training steps to drop from the selected "
                   "checkpoints, comma separated (e.g. a checkpoint with NaN weights)")
    g.add_argument("--strip-key-prefix", help="remove this prefix from every checkpoint key (e.g. 'module.' from "
                   "DDP runs)")
    g.add_argument("--stack-dtype", choices=sorted(STORAGE_DTYPES), default="float32",
                   help="storage dtype of the stack (16-bit ones store differences from the newest checkpoint)")
    shared = g.add_mutually_exclusive_group()
    shared.add_argument("--stack-via-object-store", action="store_true",
                        help="load the stack once in the driver and ship it to workers through Ray's object store")
    shared.add_argument("--stack-file", action="store_true",
                   help="write the stack once as a memory-mapped file next to the experiment (<storage>/<name>.stack/) "
                        "that every trial on a node maps read-only: one copy per node in the page cache, and stacks "
                        "larger than memory merge at disk speed (docs/SCALING.md)")
    g = parser.add_argument_group("how to score")
    g.add_argument("--extractor", default="inception", help="feature extractor: 'inception' (FID) or 'digits' (fd_digits)")
    g.add_argument("--inception-weights", help="path of pt_inception-2015-12-05-6726825d.pth for FID; default: "
                   "torch hub cache, else download")
    g.add_argument("--ref-stats", help="reference statistics .npz (pytorch-fid format); default: computed "
                   "from the run's training data and cached")
    g.add_argument("--sampler", default=DEFAULT_SAMPLER[kind], help="CM: onestep | multistep; DM: dpmsolver++ | ddim | heun")
    g.add_argument("--nfe", type=COUNT, help="network evaluations per sample; default: the sampler's own")
    g.add_argument("--grid-steps", type=COUNT, help="points of the Karras σ grid (CM multistep: 18 unless --nfe "
                   "says otherwise; DM: the solver's steps)")
    g.add_argument("--ts", type=int_list, help="CM multistep grid indices, e.g. 0,10,17 (no network evaluation at "
                   "the last grid point, sigma_min: 2 evaluations, as in OpenAI's sampler)")
    g.add_argument("--sigmas", type=float_list, help="CM multistep noise levels given directly, decreasing, instead "
                   "of --grid-steps/--ts, e.g. 80,0.821 (ECT's two-step default, used for ECT runs without flags)")
    g.add_argument("--order", type=COUNT, help="DM dpmsolver++: solver order 1, 2 or 3; default 3")
    g.add_argument("--fid-samples", type=SAMPLE_COUNT, default=5000,
                   help="samples per search evaluation (fixed search noise)")
    g.add_argument("--final-samples", type=SAMPLE_COUNT, default=50000,
                   help="samples per held-out evaluation of finalists and baselines")
    g.add_argument("--heldout-seeds", type=COUNT, default=5, help="held-out noise seeds every finalist and baseline "
                   "is re-scored on; the table shows means and paired differences to the winner ± standard error, "
                   "and a difference counts only beyond 2 SE (docs/METHOD.md, Held-out re-scoring)")
    g.add_argument("--eval-extractors", type=str_list, default=[], help="extractors the search never sees, comma "
                   "separated (e.g. digits_indep,pixels): the final table adds their Fréchet distance, and k-NN "
                   "precision/recall on the first against the run's training images; with none, precision/recall use "
                   "--extractor")
    g.add_argument("--select-on", choices=("searched", "independent"), default="searched",
                   help="pick the LCSC winner among the finalists on the held-out searched metric, or on the first "
                   "--eval-extractors distance (a metric the search never saw: guards against overfitting it)")
    g.add_argument("--pr-samples", type=int_at_least(4), default=10000,
                   help="real and generated samples (at most) used for "
                   "precision/recall in the final table")
    g.add_argument("--batch-size", type=COUNT, default=500, help="sampling/feature batch size")
    g.add_argument("--noise-seed", type=SEED, default=0, help="seed of the fixed search noise; held-out noise "
                   f"uses this + {HELDOUT_SEED_OFFSET}")
    g = parser.add_argument_group("how to search")
    g.add_argument("--num-trials", type=COUNT, default=2000,
                   help="search budget: evaluated candidates, baselines included")
    g.add_argument("--optimizer", default="lcsc-es",
                   help="'lcsc-es' (the paper's evolutionary search) or any Nevergrad optimizer name")
    g.add_argument("--space", default="affine", help="coefficient space: full | affine | grouped:G")
    g.add_argument("--bound", type=float_above(0), default=DEFAULT_BOUND,
                   help="coefficients are searched in [-bound, bound]")
    g.add_argument("--sigma", type=float_above(0), help="mutation scale of the searched value per coordinate "
                   "(default 1/sqrt(dimension): one mutation moves α by about 1 in Euclidean norm); smaller "
                   "values search closer to the baselines")
    g.add_argument("--ema", type=float_list, default=[0.999, 0.9995, 0.9999],
                   help="EMA decays (per training iteration) used as baselines, comma separated; pick rates whose "
                   "half-life fits inside the checkpoint window")
    g.add_argument("--phema", type=float_list, default=[],
                   help="widths σ_rel of EDM2 power-function (post-hoc) EMAs used as baselines, comma separated "
                   "(e.g. 0.05,0.1; a fraction of the training time); empty string for none")
    g.add_argument("--top-k", type=COUNT, default=5, help="search finalists re-scored on held-out noise")
    g.add_argument("--seed", type=SEED, default=0, help="optimizer seed")
    g.add_argument("--scheduler", choices=("fifo", "asha", "race"), default="fifo",
                   help="fifo: every trial scores all --fid-samples at once; asha: trials grow through --rounds "
                   "and Ray Tune's ASHA stops those clearly worse than others at the same round; race: trials "
                   "grow through --rounds and stop once worse than the best complete trial at the same round by "
                   "more than one paired jackknife standard error (docs/METHOD.md, Multi-fidelity trials)")
    g.add_argument("--rounds", type=rounds_list, default=[],
                   help="with --scheduler asha or race: sample counts after each round of a trial, comma "
                   "separated, e.g. 500,1000,2000; --fid-samples is always the last round, and counts at or above it are left out")
    g.add_argument("--candidates-per-trial", type=COUNT, default=1,
                   help="candidates the optimizer asks together and one Ray Tune trial scores, one after another "
                   "(each is told with its own score; --num-trials still counts candidates). Amortises Tune's "
                   "per-trial cost when a candidate takes a fraction of a second, as on a GPU; needs "
                   "--scheduler fifo (docs/METHOD.md, Batched trials)")
    g.add_argument("--coef-penalty", type=float_at_least(0), default=0.0,
                   help="add this times (Σ|α| − 1) to every searched score: 0 for convex combinations, growing with "
                   "the negative mass of extrapolation (docs/METHOD.md, Overfitting the searched metric)")
    g.add_argument("--fresh-noise-every", type=int_at_least(0), default=0,
                   help="draw new search noise every N trials (a generation of the optimizer); 0: one fixed noise "
                   "draw for the whole search")
    g.add_argument("--reduction-factor", type=float_above(1), default=3.0,
                   help="with --scheduler asha: at each round only the best 1/factor of the trials go on")
    g = parser.add_argument_group("where and on what")
    g.add_argument("--storage", default="lcsc_results", help="Ray Tune storage folder (shared storage on a cluster), or "
                   "a bucket URI such as 's3://bucket/prefix' for a cluster without one (docs/SCALING.md)")
    g.add_argument("--name", help="experiment name; default: lcsc-<kind>-<date-time>, or the newest one with --resume")
    g.add_argument("--out", help="folder for results.json, plots and the merged checkpoint; "
                   "default: <storage>/<name>/final")
    g.add_argument("--resume", action="store_true", help="continue the experiment --name in --storage")
    g.add_argument("--address", help="existing Ray cluster ('auto' or host:port); default: start a local one")
    g.add_argument("--cpus-per-trial", type=float_above(0), default=1,
                   help="Ray CPUs reserved per trial; also the trial's "
                   "torch threads (what --threads is for the single-process commands)")
    g.add_argument("--gpus-per-trial", type=float_at_least(0), default=0,
                   help="GPUs per trial (fractional packs trials onto a GPU)")
    g.add_argument("--max-concurrent", type=COUNT, default=1,
                   help="trials running at once (raise it with more cores or GPUs; on 2 CPU cores a second "
                   "concurrent trial measured no faster, see benchmarks/trial_overhead.py)")
    g.add_argument("--max-failures", type=int_at_least(0), default=2,
                   help="retries of a trial whose process or node died")
    g.add_argument("--device", default="auto", help="torch device for trials: auto (a visible GPU, else the CPU), "
                   "cpu, cuda or cuda:N")
    g.add_argument("--dashboard-host", default="127.0.0.1", help="Ray dashboard bind address (no authentication: "
                   "keep loopback unless you know who can reach it)")
    g.add_argument("--dashboard-port", type=int, default=8265, help="Ray dashboard port")
    g.add_argument("--no-dashboard", action="store_true", help="do not start the Ray dashboard")
    g.add_argument("--quiet", action="store_true", help="less console output")
    g.add_argument("--dry-run", action="store_true", help="stop after the preflight, before Ray starts: print what "
                   "was found and write a sample grid of the newest checkpoint")
    add_run_flags(parser)
    return parser


def preset_defaults(preset: dict[str, Any], parser: argparse.ArgumentParser, kind: str) -> dict[str, Any]:
    """The preset's flag values keyed by dest, after checking it was written for `kind` and names only flags."""
    name = preset["preset"]
    if preset["kind"] != kind:
        raise LcscError(f"--preset {name} is for tune_{preset['kind']}, not tune_{kind}; use a {kind} preset "
                        f"(e.g. digits-{kind})")
    dests = set(vars(parser.parse_args([]))) - {"preset"}  # every flag's dest, through the public API
    values = {key.replace("-", "_"): value for key, value in preset.items() if key not in METADATA_KEYS}
    unknown = sorted(set(values) - dests)
    if unknown:
        close = difflib.get_close_matches(unknown[0], dests, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise LcscError(f"--preset {name}: unknown key(s) {', '.join(unknown)}{hint}; keys are tune flags in dest "
                        f"form (fid_samples for --fid-samples) or one of {', '.join(sorted(METADATA_KEYS))}")
    check_preset_ranges(name, values, parser)
    return values


def check_preset_ranges(name: str, values: dict[str, Any], parser: argparse.ArgumentParser) -> None:
    """Hold a preset's numbers to the ranges the flags' `type` checks: argparse converts only string
    defaults, so a preset's `num_trials: 0` would otherwise pass the parser."""
    for action in parser._actions:
        value = values.get(action.dest)
        if getattr(action.type, "checks_range", False) and isinstance(value, (int, float)):
            try:
                action.type(str(value))
            except argparse.ArgumentTypeError as error:
                raise LcscError(f"--preset {name}: {action.dest} {error}") from None


def parse_args(argv: list[str] | None, kind: str) -> argparse.Namespace:
    """Parse the tune flags of `kind`: `--preset` first, its values as defaults, then everything else."""
    parser = build_parser(kind)
    preparser = argparse.ArgumentParser(add_help=False)
    preparser.add_argument("--preset", default=parser.get_default("preset"))
    preset = load_preset(preparser.parse_known_args(argv)[0].preset)
    values = preset_defaults(preset, parser, kind)
    builtin = ", ".join(f"{key}={parser.get_default(key)}" for key in sorted(values))
    parser.epilog = (f"Preset {preset['preset']} sets the defaults of {len(values)} flags above; a preset that leaves "
                     f"one out gets its built-in default: {builtin}.")
    parser.set_defaults(**values)
    args = parser.parse_args(argv)
    check_heldout_flags(args)
    from lcsc_ray.search.tuner import check_batching  # here: inspect_run imports this module without Ray Tune

    check_batching(args.candidates_per_trial, args.scheduler)
    return args


def check_heldout_flags(args: argparse.Namespace) -> None:
    """The final evaluation's extractors, checked before anything runs (a typo must not cost a whole search);
    the counts' ranges are the parser's."""
    from lcsc_ray.features import EXTRACTORS

    unknown = [name for name in args.eval_extractors if name not in EXTRACTORS]
    if unknown:
        raise LcscError(f"--eval-extractors {unknown[0]!r} is unknown; choose from {', '.join(sorted(EXTRACTORS))}, "
                        "or pass --eval-extractors '' for none")
