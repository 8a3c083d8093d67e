"""The checkpoint stack: K checkpoints flattened once into a [K, P] tensor, merged many times.

θ(α) = Σᵢ αᵢ θᵢ over every floating-point tensor that differs between the checkpoints; integer and
bool buffers, and floating tensors identical in every selected checkpoint (constant buffers such as EDM's
resample filters or EDM2's Fourier frequencies), are copied from the newest checkpoint: a merge whose Σα ≠ 1
would otherwise scale them into values no checkpoint ever held. A search evaluates thousands of α, so the merge is
one GEMV over the stack (memory-bandwidth bound) written straight into a flat float32 buffer that the
resident model's parameters view: no allocation of size P and no disk I/O per merge.

Storage: float32 holds θᵢ as they are. bfloat16/float16 hold deltas δᵢ = θᵢ − θ_K from the newest
checkpoint (kept in float32 as `base`), so the rounding error scales with |δᵢ| ≪ |θᵢ|:
θ(α) = (Σᵢ αᵢ) θ_K + Σᵢ αᵢ δᵢ, accumulated in float32 (the low-precision rows are widened chunk by chunk).

Memory plan: the bytes are known from the newest checkpoint before the others are read.
A stack that fits the device stays resident; on CUDA one that does not is kept in pinned host memory and
merged in column chunks copied to the device; otherwise `LcscError` names the size and the options.
A stack built into a file (`file=`, lcsc_ray/stack_file.py) is memory-mapped instead: its rows live in the
page cache, shared by every process on the node that maps the file, and a stack larger than host memory
still merges, at the speed the disk can feed the pages.
"""

from __future__ import annotations

import warnings
import weakref
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from lcsc_ray.checkpoints import CheckpointFile, LoadedCheckpoint, all_finite, layout_difference, load_checkpoint
from lcsc_ray.devices import resolve_device
from lcsc_ray.errors import LcscError

STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Column-chunk sizes (bytes of one float32 [K, c] chunk): large, so each chunk's widening copy,
# host-to-device copy and GEMV are long compared with the per-chunk Python overhead
# (docs/ARCHITECTURE.md, "Measurements behind defaults").
_CHUNK_BYTES = {"cpu": 128 << 20, "cuda": 256 << 20}
_DEVICE_HEADROOM = 0.8  # share of free device memory the stack may take (the model and sampling need the rest)


@dataclass(frozen=True)
class TensorEntry:
    """One merged tensor: its state-dict name, shape, dtype (the one most checkpoints hold it in: what the
    export writes) and slice [offset, offset+numel) of P."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int
    numel: int


@dataclass
class _Binding:
    """How one resident model is wired to the stack (built once per model, checked on every merge)."""

    flat: torch.Tensor  # [P] float32 on the compute device; the merge writes here
    views: list[tuple[torch.Tensor, int]]  # model tensors re-pointed at `flat` slices, with the expected data_ptr
    copies: list[tuple[torch.Tensor, torch.Tensor]]  # (model tensor, flat slice) for other dtypes/devices
    fixed: list[tuple[torch.Tensor, torch.Tensor]]  # (model integer/bool buffer, newest value on its device)

    def is_current(self) -> bool:
        """False once the model's storage was replaced (e.g. `model.to(...)`), so the binding is rebuilt."""
        return all(tensor.data_ptr() == ptr for tensor, ptr in self.views)


# ----------------------------------------------------------------------------------------------------


def available_host_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where the OS does not say)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


def plan_memory(nbytes: int, device: torch.device, *, max_bytes: int | None = None, stream: bool | None = None,
                what: str = "the checkpoint stack") -> bool:
    """Decide where the stack lives before it is loaded; True means "stream from pinned host memory".

    The device budget is `max_bytes` when given, else 80% of the free CUDA memory or the available host
    memory. `stream=True` forces streaming (also on CPU, where it exercises the same chunked path),
    `stream=False` forbids it, None streams only when a CUDA device cannot hold the stack.
    """
    host = available_host_bytes()
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = max_bytes if max_bytes is not None else int(free * _DEVICE_HEADROOM)
    else:
        budget = max_bytes if max_bytes is not None else host
    fits_device = budget is None or nbytes <= budget
    fits_host = host is None or nbytes <= host
    options = ("options: --stack-dtype bfloat16 (about half the bytes), fewer checkpoints "
               "(--max-checkpoints, --interval, --window)")
    if stream:
        if not fits_host:
            raise LcscError(f"{what} needs {_gib(nbytes)} but only {_gib(host)} of host memory is available "
                            f"for streaming; {options}")
        return True
    if fits_device:
        return False
    if device.type == "cuda" and stream is None and fits_host:
        return True
    where = f"{device} (budget {_gib(budget)})"
    extra = ", or --device cpu" if device.type == "cuda" else ""
    raise LcscError(f"{what} needs {_gib(nbytes)} but does not fit on {where}; {options}{extra}")


# ----------------------------------------------------------------------------------------------------


class CheckpointStack:
    """A validated [K, P] stack of one run's checkpoints, merged into resident models (see module doc)."""

    def __init__(self, *, data: torch.Tensor, base: torch.Tensor | None, entries: list[TensorEntry],
                 fixed: dict[str, torch.Tensor], order: list[str], files: list[CheckpointFile],
                 key_path: tuple[str, ...], metadata: dict[str, str] | None, device: torch.device,
                 streamed: bool) -> None:
        """Use `from_files` or `from_payload`; `data` already sits where the memory plan put it."""
        self.files = list(files)
        self.steps = [f.step for f in self.files]
        self.num_checkpoints = int(data.shape[0])
        self.num_params = int(data.shape[1])
        self.storage_dtype = data.dtype
        self.entries = entries
        self.fixed = fixed
        self.order = order
        self.key_path = key_path
        self.metadata = metadata
        self.device = device
        self.streamed = streamed
        self.nbytes = data.numel() * data.element_size() + (0 if base is None else base.numel() * 4)
        self._data = data
        self._base = base
        self._alpha = torch.zeros(self.num_checkpoints, dtype=torch.float32, device=device)
        self._bindings: weakref.WeakKeyDictionary[torch.nn.Module, _Binding] = weakref.WeakKeyDictionary()
        chunked = streamed or base is not None
        columns = max(1, _CHUNK_BYTES[device.type if device.type in _CHUNK_BYTES else "cuda"]
                      // (4 * self.num_checkpoints))
        self._chunk = min(columns, self.num_params) if chunked else self.num_params
        self._stage = (torch.empty(self.num_checkpoints, self._chunk, dtype=data.dtype, device=device)
                       if streamed else None)
        self._work = (torch.empty(self.num_checkpoints, self._chunk, dtype=torch.float32, device=device)
                      if base is not None else None)

    @property
    def copied_float_tensors(self) -> list[str]:
        """Floating tensors identical in every checkpoint: copied from the newest, never merged (module doc)."""
        return [name for name, tensor in self.fixed.items() if tensor.is_floating_point()]

    @property
    def data(self) -> torch.Tensor:
        """The [K, P] storage (θᵢ, or δᵢ for low-precision stacks); read it, never write it."""
        return self._data

    # -- building ---------------------------------------------------------------------------------------

    @classmethod
    def from_files(cls, files: Sequence[CheckpointFile], *, ckpt_key: str | None = None,
                   strip_prefix: str | None = None, device: str | torch.device = "cpu",
                   storage_dtype: torch.dtype = torch.float32,
                   max_bytes: int | None = None, stream: bool | None = None,
                   trust_pickle: bool = False, file: Path | None = None) -> "CheckpointStack":
        """Load, validate and stack `files` (any order; sorted by step here).

        The newest checkpoint fixes names, shapes and the byte count; the memory plan runs before the
        other K−1 files are read, and the peak is the stack plus one checkpoint. With `file`, the rows are
        written into that new file, memory-mapped (no memory plan: the page cache holds what fits), and the
        stack merges on the CPU from the mapping.
        """
        files = sorted(files, key=lambda f: f.step)
        if not files:
            raise LcscError("no checkpoints selected; check the folder and --window/--interval/--max-checkpoints")
        if storage_dtype not in STORAGE_DTYPES.values():
            raise LcscError(f"--stack-dtype {storage_dtype}: choose one of {', '.join(STORAGE_DTYPES)}")
        target = resolve_device(device)
        newest_file = files[-1]
        newest = load_checkpoint(newest_file, ckpt_key, strip_prefix, trust_pickle)
        entries, fixed, order = _layout(newest)
        num_params = sum(e.numel for e in entries)
        if num_params == 0:
            raise LcscError(f"{newest_file.path}: holds no floating-point tensors to merge")
        delta = storage_dtype != torch.float32
        itemsize = torch.empty((), dtype=storage_dtype).element_size()
        nbytes = len(files) * num_params * itemsize + (num_params * 4 if delta else 0)
        if file is not None:
            if target.type != "cpu":
                raise LcscError(f"a stack file is built on the CPU, not {target}; map it on the device afterwards")
            streamed, data = False, create_mapped_rows(file, (len(files), num_params), storage_dtype)
        else:
            streamed = plan_memory(nbytes, target, max_bytes=max_bytes, stream=stream,
                                   what=f"the stack of {len(files)} checkpoints x {num_params:,} parameters "
                                        f"({storage_dtype})")
            pin = streamed and target.type == "cuda"
            home = torch.device("cpu") if streamed else target
            data = torch.empty(len(files), num_params, dtype=storage_dtype, device=home, pin_memory=pin)
        base = _flatten(newest.state_dict, entries, target) if delta else None
        constant = {e.name for e in entries} if len(files) > 1 else set()
        dtypes: dict[str, Counter] = {e.name: Counter() for e in entries}  # per tensor, its dtype in each file
        for row, file in enumerate(files):
            loaded = newest if file is newest_file else load_checkpoint(file, ckpt_key, strip_prefix, trust_pickle)
            difference = layout_difference(newest.state_dict, loaded.state_dict)
            if difference is not None:
                raise LcscError(f"{file.path}: {difference} compared with {newest_file.path.name}; all checkpoints "
                                "must come from one architecture: narrow the selection (--ckpt-pattern, --window)")
            if loaded is not newest:
                constant = {name for name in constant if torch.equal(loaded.state_dict[name], newest.state_dict[name])}
            for entry in entries:
                dtypes[entry.name][loaded.state_dict[entry.name].dtype] += 1
            flat = _flatten(loaded.state_dict, entries, target)
            if delta:
                flat.sub_(base)
            data[row].copy_(flat)
            if delta and not all_finite(data[row]):
                raise LcscError(f"{file.path}: its difference from {newest_file.path.name} overflows "
                                f"{storage_dtype}; use --stack-dtype bfloat16 or float32")
        entries = [replace(e, dtype=majority_dtype(dtypes[e.name], len(files))) for e in entries]  # the export's
        if len(constant) == len(entries):
            raise LcscError(f"the {len(files)} selected checkpoints ({files[0].path.name} .. {newest_file.path.name}) "
                            "hold identical weights, so every merge is the same network; select checkpoints of a "
                            "training run that changed (--window, --interval, --ckpt-select)")
        if constant:
            data, base, entries = _drop_columns(data, base, entries, constant)
            fixed.update({name: newest.state_dict[name].clone() for name in constant})
        return cls(data=data, base=base, entries=entries, fixed=fixed, order=order, files=files,
                   key_path=newest.key_path, metadata=newest.metadata, device=target, streamed=streamed)

    def to_payload(self) -> dict:
        """A picklable description with numpy arrays, for the Ray object store (numpy arrives zero-copy).

        bfloat16 has no numpy dtype, so its rows travel as their int16 bit pattern.
        """
        data = self._data.cpu()
        return {
            "data": (data.view(torch.int16) if data.dtype == torch.bfloat16 else data).numpy(),
            "storage_dtype": str(self.storage_dtype).removeprefix("torch."),
            "base": None if self._base is None else self._base.cpu().numpy(),
            "entries": [(e.name, e.shape, str(e.dtype).removeprefix("torch."), e.offset, e.numel)
                        for e in self.entries],
            "fixed": {name: (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()
                      for name, tensor in self.fixed.items()},  # bfloat16 has no numpy dtype; float32 holds it exactly
            "fixed_dtypes": {name: str(tensor.dtype).removeprefix("torch.") for name, tensor in self.fixed.items()},
            "order": list(self.order),
            "files": [(str(f.path), f.step, f.format, None if f.folder is None else str(f.folder))
                      for f in self.files],
            "key_path": list(self.key_path),
            "metadata": self.metadata,
        }

    @classmethod
    def from_payload(cls, payload: dict, *, device: str | torch.device = "cpu", max_bytes: int | None = None,
                     stream: bool | None = None) -> "CheckpointStack":
        """Rebuild a stack from `to_payload()`; on CPU the (read-only) array is used without a copy."""
        target = resolve_device(device)
        storage_dtype = STORAGE_DTYPES[payload["storage_dtype"]]
        with warnings.catch_warnings():  # the stack is never written, so a read-only array is fine
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            data = torch.from_numpy(payload["data"])
            base = None if payload["base"] is None else torch.from_numpy(payload["base"])
        if storage_dtype == torch.bfloat16:
            data = data.view(torch.bfloat16)
        nbytes = data.numel() * data.element_size() + (0 if base is None else base.numel() * 4)
        mapped = isinstance(payload["data"], np.memmap)
        # On the CPU the array is used where it already lies (no new memory), so only a device copy is planned.
        if target.type == "cpu":
            streamed = bool(stream)
        elif mapped and stream is None:  # a mapped stack streams from the page cache when the device cannot hold it
            free, _ = torch.cuda.mem_get_info(target)
            streamed = nbytes > (max_bytes if max_bytes is not None else int(free * _DEVICE_HEADROOM))
        else:
            streamed = plan_memory(nbytes, target, max_bytes=max_bytes, stream=stream)
        if streamed and target.type == "cuda" and not mapped:
            data = data.pin_memory()
        elif not streamed:
            data = data.to(target)
        entries = [TensorEntry(name, tuple(shape), getattr(torch, dtype), offset, numel)
                   for name, shape, dtype, offset, numel in payload["entries"]]
        fixed = {name: torch.from_numpy(np.array(array)).to(getattr(torch, payload["fixed_dtypes"][name]))
                 for name, array in payload["fixed"].items()}
        files = [CheckpointFile(Path(path), step, fmt, None if folder is None else Path(folder))
                 for path, step, fmt, folder in payload["files"]]
        return cls(data=data, base=None if base is None else base.to(target), entries=entries, fixed=fixed,
                   order=list(payload["order"]), files=files, key_path=tuple(payload["key_path"]),
                   metadata=payload["metadata"], device=target, streamed=streamed)

    # -- merging ----------------------------------------------------------------------------------------

    def merge_into(self, model: torch.nn.Module, alpha: np.ndarray | torch.Tensor | Sequence[float]) -> None:
        """Write θ(α) = Σᵢ αᵢ θᵢ into `model` in place ready for a forward pass.

        The first call binds the model: its float32 tensors on the stack's device are re-pointed at
        slices of one flat buffer (bind before `torch.compile` or CUDA-graph capture; the storage then
        never moves), others receive a copy. Later calls reuse the binding: one GEMV, no allocation of
        size P. Integer/bool buffers and constant floating tensors are copied from the newest checkpoint.
        """
        binding = self._bindings.get(model)
        if binding is None or not binding.is_current():
            binding = self._bind(model)
            self._bindings[model] = binding
        alpha_sum = self._set_alpha(alpha)
        with torch.no_grad():
            self._merge_flat(binding.flat, alpha_sum)
            for tensor, source in binding.copies:
                tensor.copy_(source)
            for tensor, value in binding.fixed:
                tensor.copy_(value)

    def merged_state_dict(self, alpha: np.ndarray | torch.Tensor | Sequence[float]) -> dict[str, torch.Tensor]:
        """θ(α) as a fresh CPU state dict in the checkpoints' key order, each tensor in the dtype most checkpoints
        hold it in (for export)."""
        alpha_sum = self._set_alpha(alpha)
        flat = torch.empty(self.num_params, dtype=torch.float32, device=self.device)
        with torch.no_grad():
            self._merge_flat(flat, alpha_sum)
        merged = {e.name: flat[e.offset:e.offset + e.numel].view(e.shape).to("cpu", e.dtype, copy=True)
                  for e in self.entries}
        merged.update({name: tensor.clone() for name, tensor in self.fixed.items()})
        return {name: merged[name] for name in self.order}

    def _set_alpha(self, alpha: np.ndarray | torch.Tensor | Sequence[float]) -> float:
        """Copy α into the device vector; return Σα (float64) for the delta form."""
        values = alpha.detach().cpu().double().numpy() if isinstance(alpha, torch.Tensor) else \
            np.asarray(alpha, dtype=np.float64)
        if values.shape != (self.num_checkpoints,):
            raise LcscError(f"coefficients have shape {list(values.shape)} but the stack holds "
                            f"{self.num_checkpoints} checkpoints (steps {self.steps[0]}..{self.steps[-1]}); "
                            "give one coefficient per selected checkpoint")
        if not np.isfinite(values).all():
            raise LcscError("coefficients hold NaN or Inf; give finite values")
        self._alpha.copy_(torch.from_numpy(np.array(values)))  # a private copy: Ray hands read-only arrays
        return float(values.sum())

    def _merge_flat(self, out: torch.Tensor, alpha_sum: float) -> None:
        """out[P] = Σᵢ αᵢ θᵢ, in float32. Resident float32: one GEMV. Otherwise column chunks: copy the
        chunk to the device if streamed, widen it to float32 if stored as deltas, then GEMV
        (plus (Σα)·θ_K for deltas, module doc)."""
        if self._stage is None and self._base is None:
            torch.mv(self._data.T, self._alpha, out=out)
            return
        for start in range(0, self.num_params, self._chunk):
            stop = min(start + self._chunk, self.num_params)
            block = self._data[:, start:stop]
            if self._stage is not None:
                stage = self._stage[:, :stop - start]
                for row in range(self.num_checkpoints):  # contiguous rows: no host-side staging copy
                    stage[row].copy_(block[row], non_blocking=True)
                block = stage
            if self._work is not None:
                work = self._work[:, :stop - start]
                work.copy_(block)
                block = work
            if self._base is not None:
                torch.addmv(self._base[start:stop], block.T, self._alpha, beta=alpha_sum, out=out[start:stop])
            else:
                torch.mv(block.T, self._alpha, out=out[start:stop])

    def _bind(self, model: torch.nn.Module) -> _Binding:
        """Wire `model` to a new flat buffer; names and shapes must match the checkpoints exactly."""
        tensors = model.state_dict(keep_vars=True)
        expected = {e.name for e in self.entries} | set(self.fixed)
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        if missing or extra:
            raise LcscError(f"the model does not match the checkpoints: missing in the model {missing[:5]}, "
                            f"not in the checkpoints {extra[:5]}; build the model the run was trained with")
        for entry in self.entries:  # validate everything before re-pointing anything
            shape = tuple(tensors[entry.name].shape)
            if shape != entry.shape:
                raise LcscError(f"model tensor {entry.name!r} has shape {list(shape)} but the checkpoints "
                                f"have {list(entry.shape)}; build the model the run was trained with")
        flat = torch.empty(self.num_params, dtype=torch.float32, device=self.device)
        views, copies, seen = [], [], set()
        for entry in self.entries:
            tensor = tensors[entry.name]
            if id(tensor) in seen:  # tied weights: one storage, already bound
                continue
            seen.add(id(tensor))
            source = flat[entry.offset:entry.offset + entry.numel].view(entry.shape)
            if tensor.dtype == torch.float32 and tensor.device == self.device:
                tensor.data = source
                views.append((tensor, tensor.data_ptr()))
            else:
                copies.append((tensor, source))
        fixed = [(tensors[name], value.to(tensors[name].device)) for name, value in self.fixed.items()]
        return _Binding(flat=flat, views=views, copies=copies, fixed=fixed)


# ----------------------------------------------------------------------------------------------------


def _layout(newest: LoadedCheckpoint) -> tuple[list[TensorEntry], dict[str, torch.Tensor], list[str]]:
    """Slices of P for the floating tensors (state-dict order) and the integer/bool tensors kept as-is."""
    entries, fixed, offset = [], {}, 0
    for name, tensor in newest.state_dict.items():
        if tensor.is_floating_point():
            entries.append(TensorEntry(name, tuple(tensor.shape), tensor.dtype, offset, tensor.numel()))
            offset += tensor.numel()
        else:
            fixed[name] = tensor.clone()
    return entries, fixed, list(newest.state_dict)


def majority_dtype(counts: Counter, total: int) -> torch.dtype:
    """The dtype more than half of `total` checkpoints hold a tensor in, else float32: an export in the
    newest checkpoint's dtype would round every merged weight to float16 when only the newest was float16."""
    dtype, count = counts.most_common(1)[0]
    return dtype if 2 * count > total else torch.float32


def numpy_storage_dtype(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype that holds a stack's rows: bfloat16, which numpy lacks, as its int16 bit pattern."""
    return np.dtype(np.int16) if dtype == torch.bfloat16 else torch.empty((), dtype=dtype).numpy().dtype


def create_mapped_rows(path: Path, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """A new file `path` of [K, P] rows in `dtype`, as a memory-mapped tensor: the rows written into it go to
    the page cache and the file, never to the process's own memory."""
    tensor = torch.from_numpy(np.memmap(path, dtype=numpy_storage_dtype(dtype), mode="w+", shape=shape))
    return tensor.view(torch.bfloat16) if dtype == torch.bfloat16 else tensor


def _drop_columns(data: torch.Tensor, base: torch.Tensor | None, entries: list[TensorEntry],
                  dropped: set[str]) -> tuple[torch.Tensor, torch.Tensor | None, list[TensorEntry]]:
    """The stack without the columns of the `dropped` entries, compacted in place (no second [K, P] buffer):
    kept spans move left row by row, so every copy reads bytes not yet overwritten (a span that overlaps its
    destination is cloned first)."""
    kept, spans, offset = [], [], 0
    for entry in entries:
        if entry.name in dropped:
            continue
        if spans and spans[-1][0] + spans[-1][2] == entry.offset and spans[-1][1] + spans[-1][2] == offset:
            spans[-1] = (spans[-1][0], spans[-1][1], spans[-1][2] + entry.numel)  # extends the previous span
        else:
            spans.append((entry.offset, offset, entry.numel))
        kept.append(replace(entry, offset=offset))
        offset += entry.numel
    rows, width = data.shape
    flat = data.view(-1)
    for row in range(rows):
        for source, target, numel in spans:
            src, dst = row * width + source, row * offset + target
            if src != dst:
                block = flat[src:src + numel]
                flat[dst:dst + numel].copy_(block if src - dst >= numel else block.clone())
    if base is not None:
        base = torch.cat([base[source:source + numel] for source, _, numel in spans])
    return flat[:rows * offset].view(rows, offset), base, kept


def _flatten(state: dict[str, torch.Tensor], entries: list[TensorEntry], device: torch.device) -> torch.Tensor:
    """One checkpoint's floating tensors as a float32 [P] vector on `device`."""
    flat = torch.empty(sum(e.numel for e in entries), dtype=torch.float32, device=device)
    for entry in entries:
        flat[entry.offset:entry.offset + entry.numel].copy_(state[entry.name].reshape(-1))
    return flat
