"""Model factories by name, or by `module:function` for a user's own architecture.

run.json stores `{"factory": <name or module:function>, "kwargs": {...}}`; later tools rebuild the raw
network from that alone. A factory returns an `nn.Module` callable as `net(x_in [N,C,H,W], c_noise [N])`
returning [N,C,H,W]; a network of another code base is called its own way instead, as run.json's
`convention` says (lcsc_ray/conventions.py: e.g. the OpenAI CM U-Net as `net(x, t, y)`), with no wrapper.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from torch import nn

from lcsc_ray.errors import LcscError
from lcsc_ray.models.unet import UNet

MODELS: dict[str, Callable[..., nn.Module]] = {"unet": UNet}


def resolve_factory(factory: str) -> Callable[..., nn.Module]:
    """The callable named by `factory`: a key of MODELS, or `package.module:function`."""
    if factory in MODELS:
        return MODELS[factory]
    if ":" not in factory:
        raise LcscError(f"model factory {factory!r} unknown; use one of {sorted(MODELS)} or 'package.module:function'")
    module_name, attr = factory.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise LcscError(f"model factory {factory!r}: cannot import {module_name!r} ({error}); put your code base "
                        "on PYTHONPATH (or pass --code-dir DIR)") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise LcscError(f"model factory {factory!r}: {module_name} has no callable {attr!r}")
    return fn


def build_model(factory: str, kwargs: dict[str, Any]) -> nn.Module:
    """A freshly initialised raw network on the CPU in float32."""
    build = resolve_factory(factory)
    try:
        net = build(**kwargs)
    except Exception as error:  # noqa: BLE001 - whatever the user's factory raises is an input problem
        first = str(error).splitlines()[0] if str(error) else ""
        raise LcscError(f"model factory {factory!r} with kwargs {kwargs} raised {type(error).__name__}: {first}; "
                        "fix 'model' in run.json") from None
    if not isinstance(net, nn.Module):
        raise LcscError(f"model factory {factory!r} returned {type(net).__name__}, not a torch.nn.Module")
    return net.float()
