"""Text conditioning for the text-to-image families (Flan-T5 for Infinity, Qwen2 for HART)."""

from .condition import TextCondition, pack_text_features

__all__ = ["TextCondition", "pack_text_features"]
