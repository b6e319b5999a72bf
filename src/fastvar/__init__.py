"""fastvar: VAR-family next-scale image generators with training-free acceleration."""

__version__ = "0.1.0"
