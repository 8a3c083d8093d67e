"""Atomic writes: a failed write leaves the previous file untouched and no temporary files behind."""

import json
import os

import pytest

from lcsc_ray.atomic import atomic_path, atomic_write_json, atomic_write_text


def test_write_replaces_the_file_with_normal_permissions(tmp_path):
    target = tmp_path / "sub" / "results.json"
    atomic_write_json(target, {"a": 1})
    atomic_write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in target.parent.iterdir()] == ["results.json"]


def test_a_failing_writer_keeps_the_old_file(tmp_path):
    target = tmp_path / "merged.safetensors"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            assert tmp.suffix == ".safetensors"  # writers that dispatch on the suffix see the real one
            tmp.write_text("half written")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["merged.safetensors"]
