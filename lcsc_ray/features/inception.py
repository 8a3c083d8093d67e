"""InceptionV3 pool3 features (2048-d) exactly as pytorch-fid computes them: the real FID (docs/METHOD.md, Scoring).

The network is pytorch-fid's own `InceptionV3` (its TF-ported blocks, bilinear resize to 299, [0, 1] -> [-1, 1]
input scaling), so scores are comparable with `python -m pytorch_fid`. Only where the weights come from is
ours: pytorch-fid fetches them with `load_state_dict_from_url`, which unpickles with `weights_only=False`;
we resolve the file ourselves and load it with `weights_only=True` (or safetensors), in this order:
`--inception-weights PATH`, torch hub's cache `<hub>/checkpoints/pt_inception-2015-12-05-6726825d.pth`
(where pytorch-fid puts it), then pytorch-fid's download URL (works only online).

`inception-random` is the same network and preprocessing with random weights drawn from a fixed seed, for
timing checks on machines without the FID weights (benchmarks/gpu_search_check.py).
Its Fréchet distance is not FID and is never called one: its metric is `fd_inception_random`.

Precision: float32, contiguous (NCHW). bf16/fp16/channels-last were not adopted: they would need evidence
that FID moves by <= 0.1%, which needs the real weights (not available offline), and on the CPU they are not
faster.
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

    def __init__(self, model: torch.nn.Module, identity: str, device: torch.device,
                 warning: str | None = None) -> None:
        self.model = model.to(device)
        self.identity = identity
        self.device = device
        self.warning = warning  # said once by the driver's preflight, not by every worker that builds one

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Clamp to [-1, 1], quantise to the 8-bit pixels an image file would hold (EDM's
        `(x * 127.5 + 128).clip(0, 255)` convention, rounding), scale to [0, 1] like pytorch-fid's
        `ToTensor`, repeat grey to RGB; pytorch-fid's model then resizes to 299 and rescales to [-1, 1]."""
        pixels = (images.clamp(-1.0, 1.0) * 127.5 + 127.5).round_() / 255.0
        if pixels.shape[1] == 1:
            pixels = pixels.expand(-1, 3, -1, -1)
        return self.model(pixels.float())[0].flatten(1)


class RandomInceptionExtractor(InceptionExtractor):
    """The FID network with random weights: the cost of FID without its meaning; metric "fd_inception_random"."""

    name = "inception-random"
    metric_name = "fd_inception_random"


def build(*, device: torch.device, inception_weights: str | None = None) -> InceptionExtractor:
    """The registry entry: resolve and load the weights, build the model on `device`."""
    path = resolve_weights(inception_weights)
    state_dict = load_state_dict(path)
    with open(path, "rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    return InceptionExtractor(build_fid_inception(state_dict, path), f"{WEIGHTS_FILE}:{digest}", device,
                              weights_name_mismatch(path, digest))


def weights_name_mismatch(path: Path, sha256: str) -> str | None:
    """A warning when `path` is named like pytorch-fid's weights (`<name>-<hex>.pth`, the hex being the first
    digits of the file's sha256, torch hub's convention) but its content hashes otherwise: other weights under
    the real name (random ones, a bad download) give a distance that is not FID yet is reported as "fid"."""
    name_hash = path.stem.rsplit("-", 1)[-1].lower() if "-" in path.stem else ""
    if len(name_hash) < 8 or not all(c in "0123456789abcdef" for c in name_hash):
        return None  # a name without the hash: nothing to compare (the sha256 is in the scores' identity)
    if sha256.startswith(name_hash):
        return None
    return (f"warning: {path}: its sha256 starts {sha256[:len(name_hash)]}, not {name_hash} as its name says, so "
            f"these are not pytorch-fid's FID weights and the scores are not comparable FID; replace it with a good "
            f"copy of {WEIGHTS_FILE}")


RANDOM_SEED = 0


def random_state_dict(seed: int = RANDOM_SEED) -> dict[str, torch.Tensor]:
    """InceptionV3 weights drawn under a fixed seed: identical tensors in every process (the statistics are
    computed in one, the trials score in others) with no file to fetch. Convolutions get He-normal weights,
    which keep activations O(1) through the ~90 ReLU layers; torchvision's own init (std 0.1) grows them to
    ~1e10, whose squares strain float32 statistics."""
    import torchvision

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None, init_weights=False)
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    return model.state_dict()


def build_random(*, device: torch.device, inception_weights: str | None = None) -> RandomInceptionExtractor:
    """The `inception-random` registry entry: pytorch-fid's network with `random_state_dict()`."""
    import torchvision

    if inception_weights is not None:
        raise LcscError(f"--inception-weights {inception_weights}: the inception-random extractor uses random "
                        "weights; drop the flag, or use --extractor inception for FID with these weights")
    identity = f"inception-random:torchvision-{torchvision.__version__}:seed{RANDOM_SEED}"
    model = build_fid_inception(random_state_dict(), Path(f"<random weights, seed {RANDOM_SEED}>"))
    return RandomInceptionExtractor(model, identity, device)
