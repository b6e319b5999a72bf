"""fastvar: VAR-family next-scale image generators with training-free acceleration."""

__version__ = "0.1.0"

from .accel import AccelPlan, apply, remove  # noqa: E402

__all__ = ["AccelPlan", "apply", "remove", "__version__"]
