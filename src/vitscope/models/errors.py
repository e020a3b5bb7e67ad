"""Errors raised while loading models."""


class UnsupportedModelError(ValueError):
    """The model cannot be analysed by vitscope (the message says why and what to use instead)."""


class ModelLoadError(ValueError):
    """The model spec or weights could not be turned into a model."""
