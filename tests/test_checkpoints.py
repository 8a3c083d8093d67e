"""Discovery, selection, safe loading and every input error of lcsc_ray/checkpoints.py, on real files."""

from __future__ import annotations

import argparse
import collections

import pytest
import torch
from safetensors.torch import save_file

from checkpoint_runs import write_run
from lcsc_ray.checkpoints import CheckpointFile, discover_checkpoints, load_state_dict, select_checkpoints
from lcsc_ray.errors import LcscError


@pytest.mark.parametrize("layout", ["safetensors", "pt", "folder"])
def test_discover_parses_steps_in_every_layout(tmp_path, layout):
    states = write_run(tmp_path, [500, 40000, 1000], layout=layout)
    files = discover_checkpoints(tmp_path)
    assert [f.step for f in files] == [500, 1000, 40000]
    assert all(f.path.is_file() for f in files)
    if layout == "folder":
        assert files[0].folder == tmp_path / "checkpoint-500" and files[0].path.name == "model.safetensors"
    loaded = load_state_dict(files[-1])
    assert loaded.keys() == states[40000].keys()
    assert all(torch.equal(loaded[k], states[40000][k]) for k in loaded)


def test_discover_openai_names_and_user_pattern(tmp_path):
    state = {"w": torch.ones(2)}
    for step in (10000, 20000):
        torch.save(state, tmp_path / f"model{step:06d}.pt")
        torch.save(state, tmp_path / f"ema_0.9999_{step:06d}.pt")
    (tmp_path / "progress.csv").write_text("x")
    with pytest.raises(LcscError, match=r"step 10000 appears twice .*--ckpt-pattern"):
        discover_checkpoints(tmp_path)
    files = discover_checkpoints(tmp_path, pattern=r"ema_0\.9999_(?P<step>\d+)\.pt")
    assert [(f.path.name, f.step) for f in files] == [("ema_0.9999_010000.pt", 10000), ("ema_0.9999_020000.pt", 20000)]
    with pytest.raises(LcscError, match="no group for the step"):
        discover_checkpoints(tmp_path, pattern=r"model\d+\.pt")
    with pytest.raises(LcscError, match="not a valid regular expression"):
        discover_checkpoints(tmp_path, pattern=r"model(\d+")
    with pytest.raises(LcscError, match="no checkpoints matching --ckpt-pattern"):
        discover_checkpoints(tmp_path, pattern=r"opt(\d+)\.pt")


def test_discover_missing_and_empty_folders(tmp_path):
    with pytest.raises(LcscError, match="checkpoint folder not found"):
        discover_checkpoints(tmp_path / "nope")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "run.json").write_text("{}")
    with pytest.raises(LcscError, match=r"no checkpoints .*a checkpoints/ sub-folder exists"):
        discover_checkpoints(tmp_path)


def test_select_window_interval_max_count():
    files = [CheckpointFile(path=None, step=s, format="safetensors") for s in range(100, 1100, 100)]  # 100..1000
    pick = lambda **kw: [f.step for f in select_checkpoints(files, **kw)]  # noqa: E731
    assert pick() == list(range(100, 1100, 100))
    assert pick(window=400) == [700, 800, 900, 1000]  # last 400 iterations: 4 checkpoints at interval 100
    assert pick(interval=3) == [100, 400, 700, 1000]  # newest always kept
    assert pick(window=500, interval=2, max_count=2) == [800, 1000]
    for flag, kwargs in (("--window", {"window": 0}), ("--interval", {"interval": 0}),
                         ("--max-checkpoints", {"max_count": -1})):
        with pytest.raises(LcscError, match=flag):
            select_checkpoints(files, **kwargs)


def test_ckpt_key_resolution(tmp_path):
    write_run(tmp_path, [1], layout="pt", key="ema")
    file = discover_checkpoints(tmp_path)[0]
    assert set(load_state_dict(file)) == set(load_state_dict(file, "ema"))  # the one state dict is found
    with pytest.raises(LcscError, match=r"--ckpt-key 'model' not found at the top level; keys there: ema, step"):
        load_state_dict(file, "model")
    with pytest.raises(LcscError, match="does not hold a state dict"):
        load_state_dict(file, "optimizer")
    both = {"model": {"w": torch.ones(1)}, "model_ema": {"w": torch.zeros(1)}, "step": 3}
    torch.save(both, tmp_path / "model_000001.pt")
    with pytest.raises(LcscError, match=r"several state dicts \(model, model_ema\); pick one with --ckpt-key"):
        load_state_dict(file)
    assert load_state_dict(file, "model_ema")["w"].item() == 0.0
    torch.save({"state": {"nested": {"w": torch.ones(1)}}}, tmp_path / "model_000001.pt")
    with pytest.raises(LcscError, match="no state dict of tensors found; keys in the file: state"):
        load_state_dict(file)
    assert load_state_dict(file, "state/nested")["w"].item() == 1.0


def test_ordered_dict_state_dict_loads(tmp_path):
    torch.save(collections.OrderedDict(torch.nn.Linear(2, 2).state_dict()), tmp_path / "m_5.pt")
    assert set(load_state_dict(discover_checkpoints(tmp_path)[0])) == {"weight", "bias"}


def test_unsafe_truncated_and_nan_files_are_refused(tmp_path):
    torch.save({"w": torch.ones(1), "obj": argparse.Namespace(lr=0.1)}, tmp_path / "model_1.pt")
    save_file({"w": torch.ones(1000)}, str(tmp_path / "model_2.safetensors"))
    data = (tmp_path / "model_2.safetensors").read_bytes()
    (tmp_path / "model_2.safetensors").write_bytes(data[: len(data) // 2])
    torch.save({"w": torch.ones(1000)}, tmp_path / "model_3.pt")
    data = (tmp_path / "model_3.pt").read_bytes()
    (tmp_path / "model_3.pt").write_bytes(data[: len(data) // 2])
    save_file({"layer.w": torch.tensor([1.0, float("nan")])}, str(tmp_path / "model_4.safetensors"))
    files = {f.step: f for f in discover_checkpoints(tmp_path)}
    with pytest.raises(LcscError, match=r"model_1\.pt: holds objects other than tensors .* not unpickled"):
        load_state_dict(files[1])
    with pytest.raises(LcscError, match=r"model_2\.safetensors: unreadable or truncated safetensors"):
        load_state_dict(files[2])
    with pytest.raises(LcscError, match=r"model_3\.pt: unreadable or truncated checkpoint"):
        load_state_dict(files[3])
    with pytest.raises(LcscError, match=r"model_4\.safetensors: tensor 'layer\.w' holds NaN or Inf"):
        load_state_dict(files[4])
    with pytest.raises(LcscError, match="drop --ckpt-key"):
        load_state_dict(files[4], "model")
