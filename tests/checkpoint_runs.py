"""Small real checkpoint runs on disk for the merge-engine tests (tiny model, several layouts)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file


def tiny_model() -> torch.nn.Module:
    """Linear -> BatchNorm (with its int64 `num_batches_tracked`) -> Linear: floats and an integer buffer."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3)).eval()


def run_states(steps: list[int], seed: int = 0, scale: float = 0.05,
               relative: bool = False) -> dict[int, dict[str, torch.Tensor]]:
    """State dicts of the tiny model as if saved at `steps`: a random walk of `scale` per save (the default
    moves the weights ~10% per save, far more than late training, so merge errors are visible; `relative`
    scales each tensor's steps by its RMS, like late training), integer buffer = step."""
    generator = torch.Generator().manual_seed(seed)
    state = {k: v.clone() for k, v in tiny_model().state_dict().items()}
    states = {}
    for step in steps:
        for name, tensor in state.items():
            if tensor.is_floating_point():
                size = scale * (float(tensor.pow(2).mean().sqrt()) if relative else 1.0)
                tensor.add_(size * torch.randn(tensor.shape, generator=generator))
            else:
                tensor.fill_(step)
        states[step] = {k: v.clone() for k, v in state.items()}
    return states


def write_run(folder: Path, steps: list[int], layout: str = "safetensors", seed: int = 0,
              key: str | None = None, scale: float = 0.05,
              relative: bool = False) -> dict[int, dict[str, torch.Tensor]]:
    """Write a run in one of the supported layouts: `safetensors` (model_<step:07d>.safetensors, our training
    code's), `pt` (model_<step>.pt, optionally nested under `key` next to an optimizer-like entry) or `folder`
    (checkpoint-<step>/model.safetensors next to an optimizer.bin)."""
    folder.mkdir(parents=True, exist_ok=True)
    states = run_states(steps, seed, scale, relative)
    for step, state in states.items():
        if layout == "safetensors":
            save_file(state, str(folder / f"model_{step:07d}.safetensors"))
        elif layout == "pt":
            obj = state if key is None else {key: state, "step": step, "optimizer": {"lr": 0.1}}
            torch.save(obj, folder / f"model_{step:06d}.pt")
        elif layout == "folder":
            sub = folder / f"checkpoint-{step}"
            sub.mkdir()
            save_file(state, str(sub / "model.safetensors"))
            torch.save({"state": {}}, sub / "optimizer.bin")
        else:
            raise ValueError(layout)
    return states
