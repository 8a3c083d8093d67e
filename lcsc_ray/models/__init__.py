"""Raw networks F(x_in, c_noise) and their factory registry."""

from lcsc_ray.models.registry import MODELS, build_model, resolve_factory
from lcsc_ray.models.unet import UNet

__all__ = ["MODELS", "UNet", "build_model", "resolve_factory"]
