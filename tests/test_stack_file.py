"""The stack as a memory-mapped file (lcsc_ray/stack_file.py): the same merges as the in-memory stack, one copy
in the page cache for every process, reuse only while the sources are unchanged, and a merge that works under
a memory limit far below the stack's size (a real cgroup, where the machine lets us make one)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from checkpoint_runs import run_states, tiny_model, write_run
from lcsc_ray.checkpoints import discover_checkpoints
from lcsc_ray.scoring import ScoringSpec, load_stack
from lcsc_ray.stack import CheckpointStack
from lcsc_ray.stack_file import open_stack_file, read_stack_payload, write_stack_file

STEPS = [100, 200, 350, 500, 800]
ALPHA = np.array([-2.5, 0.75, 3.0, -0.25, 0.5])  # Σα = 1.5: constant tensors must stay the newest's
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def files(tmp_path):
    states = run_states(STEPS)
    for step, state in states.items():
        state["1.running_var"] = torch.linspace(0.5, 1.5, 8)  # constant in every checkpoint
        save_file(state, str(tmp_path / f"model_{step:07d}.safetensors"))
    return discover_checkpoints(tmp_path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_stack_file_merges_exactly_like_the_stack_in_memory(files, tmp_path, dtype):
    memory = CheckpointStack.from_files(files, storage_dtype=dtype)
    folder = write_stack_file(tmp_path / "stack", files, storage_dtype=dtype)
    assert not (tmp_path / "stack.partial").exists()
    mapped = open_stack_file(folder)
    assert isinstance(read_stack_payload(folder)["data"], np.memmap)
    assert mapped.copied_float_tensors == memory.copied_float_tensors == ["1.running_var"]
    assert mapped.steps == STEPS and mapped.num_params == memory.num_params
    expected, merged = memory.merged_state_dict(ALPHA), mapped.merged_state_dict(ALPHA)
    assert all(torch.equal(merged[name], expected[name]) for name in expected)
    model_a, model_b = tiny_model(), tiny_model()
    memory.merge_into(model_a, ALPHA)
    mapped.merge_into(model_b, ALPHA)
    assert all(torch.equal(a, b) for a, b in zip(model_a.state_dict().values(), model_b.state_dict().values()))


def test_a_stack_file_is_reused_only_while_its_sources_are_unchanged(files, tmp_path):
    folder = write_stack_file(tmp_path / "stack", files)
    built = (folder / "data.bin").stat().st_mtime_ns
    assert write_stack_file(tmp_path / "stack", files) == folder
    assert (folder / "data.bin").stat().st_mtime_ns == built  # reused, not rewritten
    os.utime(files[2].path, ns=(1, 1))  # a source changed since: rebuilt
    write_stack_file(tmp_path / "stack", files)
    assert (folder / "data.bin").stat().st_mtime_ns != built
    write_stack_file(tmp_path / "stack", files, storage_dtype=torch.bfloat16)  # another dtype: rebuilt
    assert read_stack_payload(folder)["storage_dtype"] == "bfloat16"


def test_the_scorer_maps_the_stack_file_its_spec_names(files, tmp_path):
    folder = write_stack_file(tmp_path / "stack", files)
    spec = ScoringSpec(run_dir=str(tmp_path), files=tuple(files), reference_stats="unused", extractor="pixels",
                       stack_file=str(folder))
    stack = load_stack(spec)
    assert _mapped_file(stack.data.data_ptr()) == str((folder / "data.bin").resolve())  # the rows are the mapping


def _mapped_file(address: int) -> str | None:
    """The file whose mapping (in /proc/self/maps) holds `address`, or None for anonymous memory."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        start, end = (int(part, 16) for part in fields[0].split("-"))
        if start <= address < end:
            return fields[5] if len(fields) > 5 else None
    return None


def _memory_cgroup(limit_bytes: int) -> Path:
    """A cgroup (v1 memory controller) limited to `limit_bytes`, or skip where the machine does not let us."""
    root = Path("/sys/fs/cgroup/memory")
    group = root / f"lcsc-test-{uuid.uuid4().hex[:8]}"
    try:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(limit_bytes))
        if (group / "memory.memsw.limit_in_bytes").exists():
            (group / "memory.memsw.limit_in_bytes").write_text(str(limit_bytes))
    except OSError as error:
        pytest.skip(f"cannot make a memory cgroup here ({error}); the mapped merge is covered without a limit above")
    return group


def test_a_stack_far_larger_than_the_memory_limit_still_merges(tmp_path):
    """A 640 MB stack (16 x 10M float32) merged by a process whose cgroup allows 512 MiB, about 290 MiB of which
    importing torch takes: the mapped rows are page cache, which the kernel reclaims as the merge streams
    through them; the same stack loaded into the process's own memory is killed by the limit (so the limit
    is real)."""
    torch.manual_seed(0)
    folder = tmp_path / "big"
    folder.mkdir()
    for step in range(1, 17):
        save_file({"w": torch.randn(10_000_000)}, str(folder / f"model_{step:07d}.safetensors"))
    files = discover_checkpoints(folder)
    stack = write_stack_file(tmp_path / "stack", files)
    group = _memory_cgroup(512 << 20)
    script = textwrap.dedent(f"""
        import os, sys
        open({str(group / 'cgroup.procs')!r}, 'w').write(str(os.getpid()))
        import torch
        from lcsc_ray.checkpoints import discover_checkpoints
        from lcsc_ray.stack import CheckpointStack
        from lcsc_ray.stack_file import open_stack_file
        if sys.argv[1] == 'mapped':
            merged = open_stack_file({str(stack)!r}).merged_state_dict([1 / 16] * 16)
        else:
            stack = CheckpointStack.from_files(discover_checkpoints({str(folder)!r}), max_bytes=1 << 40)
            merged = stack.merged_state_dict([1 / 16] * 16)
        print('merged', float(merged['w'][:3].sum()))
    """)
    try:
        mapped = subprocess.run([sys.executable, "-c", script, "mapped"], capture_output=True, text=True, timeout=300)
        loaded = subprocess.run([sys.executable, "-c", script, "loaded"], capture_output=True, text=True, timeout=300)
    finally:
        group.rmdir()
    assert mapped.returncode == 0 and "merged" in mapped.stdout, mapped.stderr[-2000:]
    assert loaded.returncode != 0  # killed by the memory limit: the limit really is below the stack's size
