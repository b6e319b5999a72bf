"""Qwen2 text encoder for HART, producing the context exactly as ``hart.utils.encode_prompts`` does.

The released pipeline (sample.py / app.py) tokenizes each prompt on its own with ``padding='max_length'``
and truncation at 300 tokens, marks the non-pad ids as valid, takes ``cumsum(mask) - 1`` as the text
RoPE positions, and runs the Qwen2 base model on ``[system prompt | prompt]`` (the system prompt is on by
default: ``--use_llm_system_prompt`` is ``type=bool``, so any value means True), keeping the final
(normed) hidden states of the prompt tokens in float32. HART consumes those states for all 300 slots,
padding included, so the padding convention matters and is reproduced here.

``transformers`` is imported lazily: the rest of fastvar works without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

DEFAULT_QWEN2 = "mit-han-lab/Qwen2-VL-1.5B-Instruct"
MAX_TOKEN_LENGTH = 300

LLM_SYSTEM_PROMPT = """Given a user prompt, generate an "Enhanced prompt" that provides detailed visual descriptions suitable for image generation.

Examples:
- User Prompt: A cat sleeping -> A small, fluffy white cat curled up in a round shape, sleeping peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.
- User Prompt: A busy city street -> A bustling city street scene at dusk, featuring glowing street lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass skyscrapers.

Please generate only the enhanced description for the prompt below and DO NOT include any additional sentences. Start your response with "Enhanced Prompt:".

User Prompt:\n"""  # noqa: E501 - verbatim text the released model was used with


@dataclass
class HARTContext:
    """What :meth:`fastvar.models.hart.HART.autoregressive_infer` consumes (plus the token ids)."""

    tokens: Tensor  # (B, max_length) int64
    mask: Tensor  # (B, max_length) bool, True for non-pad ids
    position_ids: Tensor  # (B, max_length) int64, cumsum(mask) - 1
    features: Tensor  # (B, max_length, hidden) float32

    def to(self, device: torch.device | str) -> HARTContext:
        return HARTContext(self.tokens.to(device), self.mask.to(device), self.position_ids.to(device), self.features.to(device))


class Qwen2TextEncoder:
    """A tokenizer + Qwen2 base model pair; ``encoder(["a cat"])`` returns a :class:`HARTContext`."""

    def __init__(
        self, model: Any, tokenizer: Any, max_length: int = MAX_TOKEN_LENGTH,
        system_prompt: str | None = LLM_SYSTEM_PROMPT, use_system_prompt: bool = True,
    ) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.system_prompt = system_prompt
        self.use_system_prompt = bool(use_system_prompt and system_prompt)

    @classmethod
    def from_pretrained(
        cls, name_or_path: str = DEFAULT_QWEN2, device: torch.device | str | None = None,
        dtype: torch.dtype | None = None, max_length: int = MAX_TOKEN_LENGTH, **kwargs: Any,
    ) -> Qwen2TextEncoder:
        """Load from a local folder or a hub id (``mit-han-lab/Qwen2-VL-1.5B-Instruct`` for HART-0.7B).

        ``AutoModel`` gives the base model, as in the official scripts. ``dtype`` defaults to float32
        (the official scripts load in float32 and run under fp16 autocast). Extra ``kwargs`` go to both
        ``from_pretrained`` calls (e.g. ``cache_dir``, ``local_files_only``).
        """
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError as e:  # pragma: no cover - transformers is a declared optional dependency
            raise ImportError("the Qwen2 text encoder needs transformers: pip install 'fastvar-vision[text]'") from e
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
            try:
                model = AutoModel.from_pretrained(name_or_path, dtype=dtype or torch.float32, **kwargs)
            except TypeError:  # transformers < 4.56 names it torch_dtype
                model = AutoModel.from_pretrained(name_or_path, torch_dtype=dtype or torch.float32, **kwargs)
        except OSError as e:
            raise OSError(
                f"could not load the Qwen2 text model from {name_or_path!r} ({str(e).splitlines()[0][:200]}); pass a "
                f"local folder holding config.json, the tokenizer files and the weights (e.g. a clone of "
                f"https://huggingface.co/{DEFAULT_QWEN2})"
            ) from None
        return cls(model.to(device), tokenizer, max_length=max_length)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def channels(self) -> int:
        """Feature width (HART's ``context_dim``: 1536 for Qwen2-1.5B)."""
        return int(self.model.config.hidden_size)

    def tokenize(self, prompts: Sequence[str]) -> Tensor:
        """(B, max_length) ids: each prompt alone, padded to ``max_length`` and truncated (official)."""
        ids = [
            self.tokenizer(p, return_tensors="pt", padding="max_length", max_length=self.max_length, truncation=True).input_ids[0]
            for p in prompts
        ]
        return torch.stack(ids)

    def system_tokens(self) -> Tensor | None:
        if not self.use_system_prompt:
            return None
        return self.tokenizer(
            self.system_prompt, return_tensors="pt", padding="longest", max_length=self.max_length, truncation=True
        ).input_ids[0]

    @torch.no_grad()
    def encode_tokens(self, tokens: Tensor, system_tokens: Tensor | None = None) -> HARTContext:
        """Context from token ids; ``system_tokens`` (S,) are prepended for the encoder and then dropped."""
        tokens = tokens.to(self.device)
        mask = tokens != self.tokenizer.pad_token_id
        position_ids = torch.cumsum(mask, dim=1) - 1
        if system_tokens is None:
            hidden = self.model(tokens, attention_mask=mask).last_hidden_state
        else:
            S = system_tokens.shape[0]
            sys_ids = system_tokens.to(self.device).unsqueeze(0).repeat(tokens.shape[0], 1)
            sys_mask = torch.ones_like(mask)[:, :S]
            out = self.model(torch.cat([sys_ids, tokens], dim=1), attention_mask=torch.cat([sys_mask, mask], dim=1))
            hidden = out.last_hidden_state[:, S:]
        # last_hidden_state is the final-normed state, i.e. the official hidden_states[-1].
        return HARTContext(tokens, mask, position_ids, hidden.float())

    def encode(self, prompts: str | Sequence[str]) -> HARTContext:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("no prompt given")
        return self.encode_tokens(self.tokenize(prompts), self.system_tokens())

    __call__ = encode


__all__ = ["DEFAULT_QWEN2", "HARTContext", "LLM_SYSTEM_PROMPT", "MAX_TOKEN_LENGTH", "Qwen2TextEncoder"]
