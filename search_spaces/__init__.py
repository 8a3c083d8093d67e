"""Coefficient spaces (how the searched value becomes merge coefficients α) and presets (paper settings)."""

from search_spaces.preset import available_presets, load_preset
from search_spaces.spaces import DEFAULT_BOUND, SPACES, CoefficientSpace, build_space

__all__ = ["DEFAULT_BOUND", "SPACES", "CoefficientSpace", "available_presets", "build_space", "load_preset"]
