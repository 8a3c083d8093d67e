"""InceptionV3 pool3 features (2048-d) exactly as pytorch-fid computes them: the real FID (LCSC-NOTES §4).

The network is pytorch-fid's own `InceptionV3` (its TF-ported blocks, bilinear resize to 299, [0, 1] -> [-1, 1]
input scaling), so scores are comparable with `python -m pytorch_fid`. Only where the weights come from is
ours: pytorch-fid fetches them with `load_state_dict_from_url`, which unpickles with `weights_only=False`;
we resolve the file ourselves and load it with `weights_only=True` (or safetensors), in this order:
`--inception-weights PATH`, torch hub's cache `<hub>/checkpoints/pt_inception-2015-12-05-6726825d.pth`
(where pytorch-fid puts it), then pytorch-fid's download URL (works only online).

Precision: float32, contiguous (NCHW). bf16/fp16/channels-last were not adopted: the issue allows them only
with evidence that FID moves by <= 0.1%, which needs the real weights (not available offline), and on the
CPU they are not faster.
"""

from __future__ import annotations

import hashlib
import unittest.mock
from pathlib import Path

import torch

from lcsc_ray.errors import LcscError

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
POOL3_DIM = 2048


def hub_weights_path() -> Path:
    """Where pytorch-fid's download puts (and torch hub looks for) the FID Inception weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE


def resolve_weights(inception_weights: str | None) -> Path:
    """The weights file to use: the flag, else the torch hub cache, else pytorch-fid's download (online)."""
    if inception_weights is not None:
        path = Path(inception_weights).expanduser()
        if not path.is_file():
            raise LcscError(f"--inception-weights {inception_weights}: file not found; give the path of "
                            f"{WEIGHTS_FILE} (pytorch-fid's FID Inception weights)")
        return path
    cached = hub_weights_path()
    if cached.is_file():
        return cached
    from pytorch_fid.inception import FID_WEIGHTS_URL

    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(FID_WEIGHTS_URL, str(cached), progress=False)
    except Exception as error:  # offline, proxy, disk: every failure means "put the file there yourself"
        raise LcscError(
            f"FID Inception weights {WEIGHTS_FILE} not found and the download failed ({type(error).__name__}); "
            f"copy the file to {cached} or pass --inception-weights PATH (source: {FID_WEIGHTS_URL})"
        ) from None
    return cached


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a weights file safely: safetensors, or a torch state dict with `weights_only=True`."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise LcscError(f"{path}: cannot read Inception weights ({type(error).__name__}: {error}); "
                        f"replace it with a good copy of {WEIGHTS_FILE}") from None
    if not isinstance(state, dict):
        raise LcscError(f"{path}: holds a {type(state).__name__}, not a state dict; use {WEIGHTS_FILE}")
    return state


def build_fid_inception(state_dict: dict[str, torch.Tensor], source: Path):
    """pytorch-fid's `InceptionV3` (pool3 block) with `state_dict` loaded in place of its download."""
    from pytorch_fid import inception as fid_inception

    with unittest.mock.patch.object(fid_inception, "load_state_dict_from_url", lambda *args, **kwargs: state_dict):
        try:
            model = fid_inception.InceptionV3([fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[POOL3_DIM]])
        except RuntimeError as error:  # load_state_dict: missing/unexpected keys or shapes
            first_line = str(error).splitlines()[0]
            raise LcscError(f"{source}: not pytorch-fid's FID Inception weights ({first_line}); "
                            f"use {WEIGHTS_FILE}") from None
    return model.eval()


class InceptionExtractor:
    """Images in [-1, 1] -> pytorch-fid pool3 features; metric "fid"."""

    name = "inception"
    metric_name = "fid"
    dim = POOL3_DIM

    def __init__(self, model: torch.nn.Module, identity: str, device: torch.device) -> None:
        self.model = model.to(device)
        self.identity = identity
        self.device = device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Clamp to [-1, 1], quantise to the 8-bit pixels an image file would hold (EDM's
        `(x * 127.5 + 128).clip(0, 255)` convention, rounding), scale to [0, 1] like pytorch-fid's
        `ToTensor`, repeat grey to RGB; pytorch-fid's model then resizes to 299 and rescales to [-1, 1]."""
        pixels = (images.clamp(-1.0, 1.0) * 127.5 + 127.5).round_() / 255.0
        if pixels.shape[1] == 1:
            pixels = pixels.expand(-1, 3, -1, -1)
        return self.model(pixels.float())[0].flatten(1)


def build(*, device: torch.device, inception_weights: str | None = None) -> InceptionExtractor:
    """The registry entry: resolve and load the weights, build the model on `device`."""
    path = resolve_weights(inception_weights)
    state_dict = load_state_dict(path)
    with open(path, "rb") as handle:
        identity = f"{WEIGHTS_FILE}:{hashlib.file_digest(handle, 'sha256').hexdigest()}"
    return InceptionExtractor(build_fid_inception(state_dict, path), identity, device)
