"""An experiment's identity (lcsc_ray/search/identity.py): every setting in the table refuses a resume that
changes it, in one line naming it with the old and new values; every tune flag is either identity or may
change on resume; manifests that predate a setting still resume. Pure functions on manifest and flags: no Ray
(the end-to-end resume through the CLI is in test_resume_faults.py)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from lcsc_ray.checkpoints import CheckpointFile
from lcsc_ray.errors import LcscError
from lcsc_ray.search.flags import build_parser, parse_args
from lcsc_ray.search.identity import IDENTITY, MAY_CHANGE, SearchInputs, check_identity, identity_record
from lcsc_ray.search.objective import SearchObjective
from lcsc_ray.search.trial import LcscTrial
from search_spaces.spaces import build_space

REPO = Path(__file__).resolve().parents[1]

RUN_CONFIG = {"kind": "cm", "model": {"factory": "a:b", "kwargs": {}}, "data": "digits"}
# flag -> (the flags of the experiment, the flags of the resume, what else differs at the resume)
CHANGES: dict[str, tuple[list[str], list[str], dict]] = {
    "--ckpt-dir": ([], [], {"checkpoint_bytes": b"retrained"}),
    "--window": ([], ["--window", "600"], {}),
    "--interval": ([], ["--interval", "2"], {}),
    "--max-checkpoints": ([], ["--max-checkpoints", "5"], {}),
    "--exclude-steps": ([], ["--exclude-steps", "10"], {}),
    "--ckpt-select": ([], [], {"trajectory": "ema"}),
    "--ckpt-pattern": ([], ["--ckpt-pattern", r"model_(\d+)"], {}),
    "--ckpt-key": ([], ["--ckpt-key", "ema"], {}),
    "--run-json": ([], [], {"run_config": {**RUN_CONFIG, "model": {"factory": "a:c", "kwargs": {}}}}),
    "--model-factory": ([], ["--model-factory", "pkg.nets:unet"], {}),
    "--model-kwargs": ([], ["--model-kwargs", '{"width": 64}'], {}),
    "--image-shape": ([], ["--image-shape", "3,8,8"], {}),
    "--prediction-type": ([], ["--prediction-type", "v_prediction"], {}),
    "--stack-dtype": ([], ["--stack-dtype", "bfloat16"], {}),
    "--extractor": ([], ["--extractor", "pixels"], {}),
    "--inception-weights": (["--inception-weights", "weights-a.pth"], ["--inception-weights", "weights-b.pth"], {}),
    "--ref-stats": ([], [], {"ref_bytes": b"other statistics"}),
    "--sampler": ([], ["--sampler", "multistep"], {}),
    "--nfe": ([], ["--nfe", "2"], {}),
    "--grid-steps": ([], ["--grid-steps", "10"], {}),
    "--ts": ([], ["--ts", "0,5"], {}),
    "--sigmas": ([], ["--sigmas", "80,0.8"], {}),
    "--order": ([], ["--order", "2"], {}),
    "--noise-seed": ([], ["--noise-seed", "3"], {}),
    "--fid-samples": ([], ["--fid-samples", "3000"], {}),
    "--rounds": ([], ["--rounds", "250"], {}),
    "--fresh-noise-every": ([], ["--fresh-noise-every", "8"], {}),
    "--coef-penalty": ([], ["--coef-penalty", "0.5"], {}),
    "--space": ([], ["--space", "full"], {}),
    "--bound": ([], ["--bound", "2"], {}),
    "--sigma": ([], ["--sigma", "0.5"], {}),
    "--optimizer": ([], ["--optimizer", "lcsc-es"], {}),
    "--seed": ([], ["--seed", "1"], {}),
    "--ema": ([], ["--ema", "0.9"], {}),
    "--phema": ([], ["--phema", ""], {}),
    "--scheduler": ([], ["--scheduler", "fifo"], {}),
    "--reduction-factor": ([], ["--reduction-factor", "2"], {}),
    "--candidates-per-trial": (["--scheduler", "fifo"], ["--scheduler", "fifo", "--candidates-per-trial", "2"], {}),
}


def _record(folder: Path, argv: list[str], *, checkpoint_bytes: bytes = b"weights", ref_bytes: bytes = b"stats",
            trajectory: str = "raw", run_config: dict = RUN_CONFIG, steps: range = range(10, 110, 10)) -> dict:
    """The identity a job would record for `argv` on a run of fake checkpoint files in `folder`."""
    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    files = []
    for step in steps:
        path = folder / "checkpoints" / f"model_{step:07d}.safetensors"
        path.write_bytes(checkpoint_bytes + str(step).encode())
        files.append(CheckpointFile(path, step, "safetensors"))
    (folder / "ref.npz").write_bytes(ref_bytes)
    for name in ("weights-a.pth", "weights-b.pth"):
        (folder / name).write_bytes(name.encode())
    args = parse_args([arg.replace("weights-", f"{folder}/weights-") for arg in argv], "cm")
    space = build_space(args.space, len(files), bound=args.bound, sigma=args.sigma)
    objective = SearchObjective(args.noise_seed, args.fresh_noise_every, args.coef_penalty)
    return identity_record(SearchInputs(
        args=args, run_dir=folder, files=files, trajectory=trajectory, run_config=run_config,
        reference_stats=folder / "ref.npz", space=space, objective=objective,
        rounds=LcscTrial.round_schedule(args.rounds, args.fid_samples, args.scheduler)))


def _refusal(manifest: dict, record: dict) -> str:
    with pytest.raises(LcscError) as error:
        check_identity("lcsc-cm-x", manifest, record)
    return str(error.value)


def _named(message: str) -> list[str]:
    """The flags a refusal names as the experiment's (the part before ', not ')."""
    started = message.split("this experiment was started with ", 1)[1].split(", not ", 1)[0]
    return re.findall(r"(?<!\S)--[a-z][a-z-]*", started)


def test_every_tune_flag_is_identity_or_may_change():
    identity = {entry.flag for entry in IDENTITY}
    assert not identity & set(MAY_CHANGE)
    assert len({entry.key for entry in IDENTITY}) == len(IDENTITY)
    for kind in ("cm", "dm"):
        flags = {option for action in build_parser(kind)._actions for option in action.option_strings
                 if option.startswith("--") and option != "--help"}
        assert flags == identity | set(MAY_CHANGE), kind
    assert set(CHANGES) == identity, "every identity flag needs a case here"


@pytest.mark.parametrize("flag", sorted(CHANGES))
def test_resume_with_a_changed_identity_setting_is_refused_naming_it(flag, tmp_path):
    before, after, inputs = CHANGES[flag]
    manifest = _record(tmp_path / "started", before)
    assert json.loads(json.dumps(manifest)) == manifest, "the record is what the manifest holds"
    check_identity("lcsc-cm-x", manifest, _record(tmp_path / "same", before))  # another folder, same content
    message = _refusal(manifest, _record(tmp_path / "resumed", after, **inputs))
    assert "\n" not in message
    assert message.startswith("--resume lcsc-cm-x: this experiment was started with ")
    assert message.endswith("; rerun with the original values or start a new --name")
    assert _named(message) == [flag], message
    assert message.count(f"{flag} ") == 2, message


def test_every_difference_is_named_with_old_and_new_values(tmp_path):
    manifest = _record(tmp_path / "a", [])
    message = _refusal(manifest, _record(tmp_path / "b", ["--sampler", "multistep", "--noise-seed", "3"]))
    assert ("this experiment was started with --sampler onestep --noise-seed 0, not --sampler multistep "
            "--noise-seed 3;") in message


def test_a_changed_selection_names_the_flag_not_the_checkpoints_it_selects(tmp_path):
    manifest = _record(tmp_path / "a", [])
    message = _refusal(manifest, _record(tmp_path / "b", ["--window", "50"], steps=range(60, 110, 10)))
    assert _named(message) == ["--window"], message


def test_retrained_checkpoints_are_named_with_the_run_folder_and_their_content(tmp_path):
    manifest = _record(tmp_path / "a", [])
    message = _refusal(manifest, _record(tmp_path / "a", [], checkpoint_bytes=b"retrained"))
    assert re.search(rf"started with --ckpt-dir {re.escape(str(tmp_path / 'a'))} \(10 checkpoints at steps "
                     r"10, 20, 30, 40, \.\.\., 80, 90, 100, content [0-9a-f]{16}\), not", message), message


def test_a_moved_run_folder_resumes(tmp_path):
    manifest = _record(tmp_path / "a", [])
    shutil.move(tmp_path / "a", tmp_path / "b")
    check_identity("lcsc-cm-x", manifest, _record(tmp_path / "b", []))


def test_a_manifest_that_predates_a_setting_resumes_and_is_held_to_what_it_recorded(tmp_path):
    """Keys an older experiment did not record are not compared; those it did still are, and the few whose
    absence has a known meaning (an experiment from before --scheduler ran fifo) are held to it."""
    record = _record(tmp_path, ["--scheduler", "fifo"])
    old = {key: record[key] for key in ("space", "num_checkpoints", "bound", "sigma", "optimizer", "seed", "rounds")}
    old.update(num_trials=400, metric="score", warm_start=["newest"])
    check_identity("old", old, _record(tmp_path, ["--scheduler", "fifo", "--sampler", "multistep"]))
    assert _named(_refusal(old, _record(tmp_path, ["--scheduler", "fifo", "--space", "full"]))) == ["--space"]
    assert _named(_refusal(old, _record(tmp_path, ["--scheduler", "asha", "--rounds", "250"]))) == ["--scheduler"]
    message = _refusal(old, _record(tmp_path, ["--scheduler", "fifo"], steps=range(10, 60, 10)))
    assert f"started with --ckpt-dir 10 checkpoints, not --ckpt-dir {tmp_path} (5 checkpoints);" in message


def test_the_docs_list_every_flag_as_fixed_or_may_change():
    section = (REPO / "docs" / "MONITORING.md").read_text().split("## Stop and resume", 1)[1].split("\n## ", 1)[0]
    fixed, may_change = section.split("  - fixed:", 1)[1].split("  - may change:", 1)
    may_change = may_change.split("\n  - An experiment", 1)[0]
    assert set(re.findall(r"`(--[a-z-]+)`", fixed)) == {entry.flag for entry in IDENTITY}
    assert set(re.findall(r"`(--[a-z-]+)`", may_change)) == set(MAY_CHANGE) - {"--resume"}
