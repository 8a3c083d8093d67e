"""One flag vocabulary: every `--flag` the code names exists in a command, and presets are parser defaults."""

from __future__ import annotations

import ast
import importlib
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from lcsc_ray.errors import LcscError
from lcsc_ray.search.flags import parse_args

REPO = Path(__file__).resolve().parents[1]
LAUNCH_SCRIPTS = sorted((REPO / "launch").glob("*.py"))
SOURCE_DIRS = ("lcsc_ray", "search_spaces", "launch")
FLAG = re.compile(r"(?<![\w-])--([a-z][a-z0-9]*(?:-[a-z0-9]+)*)")
OPTION_LINE = re.compile(r"^ {2}(?:-\w, )?--([a-z][a-z0-9-]*)", re.MULTILINE)  # where --help defines a flag
# Flags of other tools that our text names on purpose.
FOREIGN_FLAGS = {"--save-stats": "python -m pytorch_fid --save-stats"}


@pytest.fixture(scope="module")
def cli_flags() -> dict[str, set[str]]:
    """flag -> the launch scripts whose `--help` lists it (each script run as a user would run it)."""
    found: dict[str, set[str]] = {}
    # all at once: each is mostly the import of torch and Ray on one core, so together they use every core
    procs = {script: subprocess.Popen([sys.executable, str(script), "--help"], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, cwd=REPO) for script in LAUNCH_SCRIPTS}
    for script, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0 and stdout.startswith("usage:"), stderr
        for flag in OPTION_LINE.findall(stdout):
            found.setdefault(f"--{flag}", set()).add(script.name)
    return found


def _flags_in_strings(path: Path) -> set[str]:
    """`--flag` tokens inside the string literals (f-string parts, docstrings, messages) of one module."""
    flags = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            flags.update(f"--{flag}" for flag in FLAG.findall(node.value))
    return flags


def test_every_flag_the_code_names_exists(cli_flags):
    named = {path.relative_to(REPO): _flags_in_strings(path)
             for folder in SOURCE_DIRS for path in sorted((REPO / folder).rglob("*.py"))}
    assert any(named.values())
    missing = {f"{path}: {flag}" for path, flags in named.items() for flag in flags
               if flag not in cli_flags and flag not in FOREIGN_FLAGS}
    assert not missing, f"flags named in the source that no command has: {sorted(missing)}"


def test_shared_meanings_use_one_name(cli_flags):
    """Where results go is --out, the device is --device, torch threads are --threads in every command that has
    them; the sampler's grid size is --grid-steps, so --steps only ever counts training updates."""
    assert cli_flags["--out"] == {path.name for path in LAUNCH_SCRIPTS}
    assert "--output" not in cli_flags
    assert cli_flags["--device"] == {path.name for path in LAUNCH_SCRIPTS}
    assert cli_flags["--steps"] == {"train_cm.py", "train_dm.py"}
    assert cli_flags["--grid-steps"] == {"tune_cm.py", "tune_dm.py", "inspect_run.py"}
    assert cli_flags["--threads"] == {"train_cm.py", "train_dm.py", "fid_stats.py", "merge_checkpoints.py"}
    assert cli_flags["--cpus-per-trial"] == {"tune_cm.py", "tune_dm.py"}


def test_console_scripts_are_the_launch_scripts():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    targets = set()
    for name, target in scripts.items():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), name
        targets.add(function)
    for script in LAUNCH_SCRIPTS:  # each launch script calls one console-script function and nothing else
        calls = {node.func.id for node in ast.walk(ast.parse(script.read_text())) if isinstance(node, ast.Call)}
        assert len(calls) == 1 and calls <= targets, script.name


def _preset(tmp_path: Path, **values) -> str:
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"preset": "mine", "kind": "cm", **values}))
    return str(path)


def test_preset_values_are_the_defaults_help_shows(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--preset", "cifar10-cm", "--help"], "cm")
    shown = " ".join(capsys.readouterr().out.split())
    assert "samples per search evaluation (fixed search noise) (default: 5000)" in shown
    assert "(default: [0, 10, 17])" in shown and "Preset cifar10-cm sets the defaults" in shown
    args = parse_args(["--preset", "cifar10-cm", "--fid-samples", "7"], "cm")
    assert (args.fid_samples, args.final_samples, args.grid_steps, args.window) == (7, 50000, 18, 40000)


def test_preset_keys_with_argparse_defaults_are_honoured_and_missing_keys_fall_back(tmp_path):
    preset = _preset(tmp_path, batch_size=7, seed=3, device="cpu", ema="0.9,0.99", exclude_steps=[5])
    args = parse_args(["--preset", preset], "cm")
    assert (args.batch_size, args.seed, args.device, args.ema, args.exclude_steps) == (7, 3, "cpu", [0.9, 0.99], [5])
    builtin = parse_args(["--preset", _preset(tmp_path)], "cm")  # no ema, num_trials, ...: the built-in defaults
    assert (builtin.ema, builtin.phema, builtin.num_trials, builtin.sampler) == ([0.999, 0.9995, 0.9999], [], 2000,
                                                                                  "onestep")
    assert parse_args(["--preset", preset, "--seed", "9", "--exclude-steps", "10,20"], "cm").exclude_steps == [10, 20]


@pytest.mark.parametrize("values,kind,message", [
    ({"fid_sample": 3}, "cm", r"unknown key\(s\) fid_sample \(did you mean fid_samples\?\)"),
    ({}, "dm", "--preset mine is for tune_cm, not tune_dm"),
])
def test_preset_errors_are_one_line(tmp_path, values, kind, message):
    with pytest.raises(LcscError, match=message) as error:
        parse_args(["--preset", _preset(tmp_path, **values)], kind)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("argv,message", [
    (["--num-trials", "0"], "argument --num-trials: must be >= 1, got 0"),
    (["--num-trials", "-5"], "argument --num-trials: must be >= 1, got -5"),
    (["--num-trials", "many"], "argument --num-trials: must be an integer >= 1, got 'many'"),
    (["--fid-samples", "1"], "argument --fid-samples: must be >= 2, got 1"),
    (["--final-samples", "0"], "argument --final-samples: must be >= 2, got 0"),
    (["--heldout-seeds", "0"], "argument --heldout-seeds: must be >= 1, got 0"),
    (["--pr-samples", "3"], "argument --pr-samples: must be >= 4, got 3"),
    (["--noise-seed", "-1"], "argument --noise-seed: must be >= 0, got -1"),
    (["--seed", "-1"], "argument --seed: must be >= 0, got -1"),
    (["--bound", "0"], "argument --bound: must be > 0, got 0"),
    (["--bound", "nan"], "argument --bound: must be > 0, got nan"),
    (["--bound", "inf"], "argument --bound: must be > 0, got inf"),
    (["--sigma", "-0.1"], "argument --sigma: must be > 0, got -0.1"),
    (["--max-concurrent", "0"], "argument --max-concurrent: must be >= 1, got 0"),
    (["--candidates-per-trial", "0"], "argument --candidates-per-trial: must be >= 1, got 0"),
    (["--top-k", "0"], "argument --top-k: must be >= 1, got 0"),
    (["--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (["--window", "0"], "argument --window: must be >= 1, got 0"),
    (["--interval", "0"], "argument --interval: must be >= 1, got 0"),
    (["--max-checkpoints", "0"], "argument --max-checkpoints: must be >= 1, got 0"),
    (["--nfe", "0"], "argument --nfe: must be >= 1, got 0"),
    (["--coef-penalty", "-1"], "argument --coef-penalty: must be >= 0, got -1"),
    (["--fresh-noise-every", "-1"], "argument --fresh-noise-every: must be >= 0, got -1"),
    (["--reduction-factor", "1"], "argument --reduction-factor: must be > 1, got 1"),
    (["--cpus-per-trial", "0"], "argument --cpus-per-trial: must be > 0, got 0"),
    (["--gpus-per-trial", "-1"], "argument --gpus-per-trial: must be >= 0, got -1"),
    (["--max-failures", "-1"], "argument --max-failures: must be >= 0, got -1"),
])
def test_flag_ranges_are_checked_by_the_parser(argv, message, capsys):
    """Out-of-range numbers end in argparse's one line and exit 2 while parsing, before any run is loaded."""
    with pytest.raises(SystemExit) as stopped:
        parse_args(argv, "cm")
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f"error: {message}")


@pytest.mark.parametrize("argv", [["--num-trials", "1", "--fid-samples", "2", "--seed", "0", "--noise-seed", "0",
                                   "--bound", "0.5", "--coef-penalty", "0", "--fresh-noise-every", "0",
                                   "--max-failures", "0", "--gpus-per-trial", "0"]])
def test_flag_ranges_accept_their_limits(argv):
    args = parse_args(argv, "cm")
    assert (args.num_trials, args.fid_samples, args.seed, args.bound) == (1, 2, 0, 0.5)


def test_a_preset_number_out_of_range_is_refused_in_one_line(tmp_path):
    with pytest.raises(LcscError, match=r"^--preset mine: num_trials must be >= 1, got 0$"):
        parse_args(["--preset", _preset(tmp_path, num_trials=0)], "cm")


@pytest.mark.parametrize("flag", ["--ckpt-dir", "--out", "--ref-stats"])
def test_input_uris_are_refused_in_one_line_before_anything_runs(flag, tmp_path):
    """Only --storage may be a URI (tests/test_cloud_storage.py); any other would become a local folder named
    `s3:` and the search would run there silently."""
    from lcsc_ray.errors import LcscError
    from lcsc_ray.search.job import run_job

    argv = ["--storage", str(tmp_path), flag, "s3://bucket/prefix?endpoint_override=127.0.0.1:9000"]
    with pytest.raises(LcscError, match=f"{flag} s3://bucket/prefix.*only --storage may be a URI"):
        run_job(argv, kind="cm")
    assert not (Path.cwd() / "s3:").exists() and list(tmp_path.iterdir()) == []


def test_file_uris_are_the_paths_they_name(tmp_path):
    """`file:///path` (Ray Tune's and pyarrow's name for this machine's file system) is that path on every path
    flag; a file URI that names no absolute path is one line naming the flag."""
    from lcsc_ray.errors import LcscError
    from lcsc_ray.search.job import check_uris

    folder = tmp_path / "a b"
    args = parse_args(["--storage", f"file://{tmp_path}/a%20b", "--ckpt-dir", f"file://localhost{folder}",
                       "--out", str(folder)], "cm")
    check_uris(args)
    assert (args.storage, args.ckpt_dir, args.out) == (str(folder), str(folder), str(folder))
    for bad in ("file://relative/x", "file:///x?endpoint_override=y"):
        with pytest.raises(LcscError, match=f"^--storage {re.escape(bad)}: a file URI names an absolute path"):
            check_uris(parse_args(["--storage", bad], "cm"))
