"""Flan-T5 text encoder for Infinity, producing the packed condition the official ``encode_prompt`` builds.

The official pipeline tokenizes with ``padding='max_length'`` (512), runs ``T5EncoderModel`` with the
attention mask, takes ``last_hidden_state`` in float32 and keeps only each caption's valid rows. We do
the same (padding to the full length by default, since padded and unpadded runs of a half-precision
encoder are not bitwise equal), so a prompt gives the features the released models were trained on.

``transformers`` is imported lazily: the rest of fastvar works without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .condition import TextCondition, pack_text_features

DEFAULT_T5 = "google/flan-t5-xl"


class T5TextEncoder:
    """A tokenizer + ``T5EncoderModel`` pair; ``encoder("a cat")`` returns a :class:`TextCondition`."""

    def __init__(self, encoder: Any, tokenizer: Any, max_length: int = 512, pad_to_max_length: bool = True) -> None:
        self.encoder = encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.pad_to_max_length = pad_to_max_length

    @classmethod
    def from_pretrained(
        cls, name_or_path: str = DEFAULT_T5, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
        max_length: int = 512, **kwargs: Any,
    ) -> T5TextEncoder:
        """Load from a local folder or a hub id (``google/flan-t5-xl`` for every released Infinity).

        ``dtype`` defaults to float16 on CUDA (what the official loader uses) and float32 elsewhere.
        Extra ``kwargs`` go to both ``from_pretrained`` calls (e.g. ``cache_dir``, ``local_files_only``).
        """
        try:
            from transformers import AutoTokenizer, T5EncoderModel
        except ImportError as e:  # pragma: no cover - transformers is a declared optional dependency
            raise ImportError("the T5 text encoder needs transformers: pip install 'fastvar-vision[text]'") from e
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            dtype = torch.float16 if device.type == "cuda" else torch.float32
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, legacy=True, **kwargs)
        tokenizer.model_max_length = max_length
        try:
            encoder = T5EncoderModel.from_pretrained(name_or_path, dtype=dtype, **kwargs)
        except TypeError:  # transformers < 4.56 names it torch_dtype
            encoder = T5EncoderModel.from_pretrained(name_or_path, torch_dtype=dtype, **kwargs)
        return cls(encoder.to(device), tokenizer, max_length=max_length)

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    @property
    def channels(self) -> int:
        """Feature width (Infinity's ``text_channels``: 2048 for Flan-T5-XL)."""
        return int(self.encoder.config.d_model)

    @torch.no_grad()
    def encode(self, prompts: str | Sequence[str]) -> TextCondition:
        """Packed float32 features of ``prompts`` (one caption per prompt, in order)."""
        captions = [prompts] if isinstance(prompts, str) else list(prompts)
        if not captions:
            raise ValueError("no prompt given")
        tokens = self.tokenizer(
            text=captions, max_length=self.max_length, padding="max_length" if self.pad_to_max_length else "longest",
            truncation=True, return_tensors="pt",
        )
        ids = tokens.input_ids.to(self.device)
        mask = tokens.attention_mask.to(self.device)
        feats = self.encoder(input_ids=ids, attention_mask=mask)["last_hidden_state"].float()
        return pack_text_features(feats, mask)

    __call__ = encode
