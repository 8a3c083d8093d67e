"""The lines a stopped or failed search prints, without running one (test_stop_signals.py runs the real job):

- the continue command names the entry point that was used, with absolute paths for path flags and the
  user's other flags as typed; a new search that leaves a checkpoint out has a new --name and no --resume;
- an input error raised in a Ray task is one line naming the file that keeps its trace (colour codes removed);
- the export keeps the dtype most merged checkpoints hold (float32 when there is no majority) and says so.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lcsc_ray import errors, stopping
from lcsc_ray.checkpoints import CheckpointFile
from lcsc_ray.errors import LcscError
from lcsc_ray.export import export_merged, exported_dtype
from lcsc_ray.search.commands import continue_command, new_search_command
from lcsc_ray.stack import CheckpointStack

REPO = Path(__file__).resolve().parents[1]


def test_continue_command_of_the_launch_script_has_absolute_paths_and_the_users_flags(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["launch/tune_cm.py"])  # not a file here: the checkout's script is named
    argv = ["--ckpt-dir", "runs/a", "--storage=out", "--num-trials", "50", "--eval-extractors", ""]
    words = shlex.split(continue_command(argv, "cm", "exp", tmp_path / "out", resume=True))
    assert words[:2] == [stopping.python_command(), str(REPO / "launch" / "tune_cm.py")]
    assert words[2:] == ["--ckpt-dir", str(tmp_path / "runs" / "a"), "--num-trials", "50", "--eval-extractors", "",
                         "--name", "exp", "--storage", str(tmp_path / "out"), "--resume"]
    assert "--resume" not in continue_command(argv, "cm", "exp", tmp_path / "out")


def test_continue_command_names_the_console_script_when_path_finds_it(tmp_path, monkeypatch):
    script = tmp_path / "bin" / "lcsc-tune-cm"
    script.parent.mkdir()
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    monkeypatch.setattr(sys, "argv", [str(script)])
    monkeypatch.setenv("PATH", str(script.parent))
    assert shlex.split(continue_command([], "cm"))[0] == "lcsc-tune-cm"
    monkeypatch.setenv("PATH", str(tmp_path))
    assert shlex.split(continue_command([], "cm"))[0] == str(script)


def test_a_new_search_without_a_step_has_a_new_name_and_no_resume(tmp_path):
    argv = ["--ckpt-dir", "/runs/a", "--exclude-steps", "10", "--name", "exp", "--resume"]
    words = shlex.split(new_search_command(argv, "cm", "exp", tmp_path, 30))
    assert "--resume" not in words
    assert words[words.index("--exclude-steps") + 1] == "10,30" and words.count("--exclude-steps") == 1
    assert words[words.index("--name") + 1] == "exp-without-30"


def test_an_input_error_of_a_ray_task_is_one_line_naming_its_trace_file(tmp_path, capsys):
    from ray.exceptions import RayTaskError

    trace = "\x1b[36mray::lcsc held-out score\x1b[39m ...\nTraceback (most recent call last):\n  boom\n"
    wrapped = RayTaskError("f", trace, LcscError("x.safetensors: bad\nthing")).as_instanceof_cause()
    errors.keep_traces_in(tmp_path)
    try:
        status = errors.report(wrapped)
    finally:
        errors.keep_traces_in(None)
    line = capsys.readouterr().err.strip()
    assert status == errors.INPUT_ERROR_STATUS and "\n" not in line and "\x1b" not in line
    assert line.startswith("error: x.safetensors: bad thing (the Ray task's full trace: ")
    kept = Path(line.rsplit(": ", 1)[1].rstrip(")"))
    text = kept.read_text()
    assert kept.parent == tmp_path and "ray::lcsc held-out score" in text and "boom" in text and "\x1b" not in text


@pytest.mark.parametrize("dtypes, expected", [
    ([torch.float32, torch.float32, torch.float16], "float32"),  # only the newest is float16
    ([torch.float16, torch.float16, torch.float32], "float16"),  # most are float16
    ([torch.float16, torch.bfloat16], "float32"),  # no majority
])
def test_the_export_keeps_the_majority_dtype_and_says_which(tmp_path, dtypes, expected):
    files = []
    for step, dtype in enumerate(dtypes, 1):
        path = tmp_path / f"model_{step:07d}.safetensors"
        save_file({"w": torch.full((4,), float(step)).to(dtype), "n": torch.tensor([step])}, str(path))
        files.append(CheckpointFile(path, step, "safetensors"))
    stack = CheckpointStack.from_files(files)
    target = export_merged(stack, [0.0] * (len(files) - 1) + [1.0], tmp_path / "out.safetensors")
    assert str(load_file(str(target))["w"].dtype) == f"torch.{expected}"
    assert exported_dtype(target) == expected == json.loads(target.with_name("out.safetensors.json").read_text())["dtype"]
