"""Image outputs: sample grids and matplotlib figures, each written atomically (a crash leaves the old file
or the complete new one, never a truncated PNG next to finished results)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lcsc_ray.atomic import atomic_path, atomic_write
from lcsc_ray.noise import FixedNoise
from lcsc_ray.run_folder import RunInfo
from lcsc_ray.sampling import Sampler, build_sampler


def write_sample_grid(run: RunInfo, net: nn.Module, path: Path, count: int = 100, seed: int = 0, scale: int = 4,
                      sampler: Sampler | None = None, title: str | None = None,
                      transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Path:
    """Sample `count` images with fixed noise (the run's default sampler unless `sampler` is given), apply
    `transform` (an output correction) if given, and save them as a square grid, upscaled `scale`x (nearest)
    so small images stay legible; with `title`, the grid is drawn under it, so grids of different candidates
    can be told apart without their file names."""
    # imported here: `import torchvision` loads its models and torch's compiler (about 1.5 s), which every
    # driver and Ray worker would otherwise pay at start-up although grids are written only at the end
    from torchvision.utils import make_grid, save_image

    images = (sampler or build_sampler(run)).sample(net, FixedNoise(seed, run.image_shape), 0, count)
    if transform is not None:
        images = transform(images)
    images = torch.nn.functional.interpolate((images + 1) / 2, scale_factor=scale, mode="nearest")
    nrow = max(1, int(count**0.5))
    if title is None:
        return atomic_write(path, lambda tmp: save_image(images, str(tmp), nrow=nrow, padding=2, pad_value=0.5))
    grid = make_grid(images.clamp(0, 1), nrow=nrow, padding=2, pad_value=0.5).permute(1, 2, 0).cpu().numpy()
    fig, axes = new_figure(width=4.2, height=4.5)
    axes[0, 0].imshow(grid, interpolation="nearest")
    axes[0, 0].set_title(title, fontsize=10)
    axes[0, 0].axis("off")
    return save_figure(fig, path)


def distinct_styles(count: int) -> list[dict[str, Any]]:
    """Matplotlib line styles for `count` lines that no two share: the 20 colours of `tab20` without its reds
    and greys (kept for the best-so-far curve and the trial points), then the same colours dotted, dashed..."""
    from matplotlib import colormaps

    palette = [colormaps["tab20"](i) for i in range(20) if i not in (6, 7, 14, 15)]  # no reds, no greys
    dashes = ["--", ":", "-.", (0, (5, 1, 1, 1))]
    return [{"color": palette[i % len(palette)], "ls": dashes[(i // len(palette)) % len(dashes)]}
            for i in range(count)]


def new_figure(cols: int = 1, *, width: float = 6.5, height: float = 4.2) -> tuple[Any, Any]:
    """(figure, axes[1, cols]) outside pyplot: no display needed and no global figure state, so the search
    monitor can draw from a background thread while the driver runs."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * cols, height), dpi=110)
    return fig, fig.subplots(1, cols, squeeze=False)


def save_figure(fig: Any, path: Path) -> Path:
    """Lay out `fig` and write it to `path` as PNG atomically."""
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)
