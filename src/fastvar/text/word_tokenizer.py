"""A word-level tokenizer and the text encoder of the embedded text-to-image model (no ``transformers``).

The embedded model's captions come from a closed vocabulary (shapes, colours, numbers, relations), so a
word-level tokenizer is exact where a sentencepiece model would only add a download: lowercase, split
on whitespace and punctuation, one id per word, ``</s>`` appended, ``<pad>`` = 0 (Flan-T5's
conventions: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2). The vocabulary is a JSON list of words, its index
being the id.

Unknown words become ``<unk>`` and are reported once per word on the ``fastvar`` logger (one line),
not raised: a prompt file written for other models ("a photo of ...") should still run, and the line
says which words this model cannot see. ``strict=True`` raises instead.

:class:`WordT5TextEncoder` pairs the tokenizer with :class:`~fastvar.text.t5_native.T5Encoder` and has
the call of :class:`fastvar.text.t5.T5TextEncoder`: prompts in, a packed
:class:`~fastvar.text.condition.TextCondition` out, so :class:`~fastvar.pipelines.infinity.InfinityPipeline`
takes either.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from ..errors import UsageError
from .condition import TextCondition, pack_text_features
from .t5_native import T5Encoder

__all__ = ["PAD", "EOS", "UNK", "SPECIALS", "WordTokenizer", "WordT5TextEncoder"]

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
SPECIALS = (PAD, EOS, UNK)
_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)?|[^\sa-z0-9]")
_LOG = logging.getLogger("fastvar")


class WordTokenizer:
    """``vocab``: the full id -> word list, starting with ``<pad>``, ``</s>``, ``<unk>``."""

    def __init__(self, vocab: Sequence[str], strict: bool = False) -> None:
        vocab = [str(w) for w in vocab]
        if tuple(vocab[:3]) != SPECIALS:
            raise ValueError(f"a word vocabulary must start with {list(SPECIALS)} (ids 0, 1, 2), got {vocab[:3]}; "
                             "build it with WordTokenizer.from_words(words)")
        dup = sorted({w for w in vocab if vocab.count(w) > 1})
        if dup:
            raise ValueError(f"the word vocabulary repeats {dup[:5]}: every word needs one id")
        bad = [w for w in vocab[3:] if _TOKEN.fullmatch(w) is None]
        if bad:
            raise ValueError(f"vocabulary entries {bad[:5]} are not single lowercase words or punctuation marks")
        self.vocab = vocab
        self.ids = {w: i for i, w in enumerate(vocab)}
        self.strict = strict
        self._warned: set[str] = set()

    @classmethod
    def from_words(cls, words: Sequence[str], strict: bool = False) -> WordTokenizer:
        """Specials first, then the distinct lowercased words in first-seen order (ids stable for a list)."""
        out = list(SPECIALS)
        for w in words:
            w = str(w).lower()
            if w not in out:
                out.append(w)
        return cls(out, strict=strict)

    @classmethod
    def from_json(cls, path: str | Path, strict: bool = False) -> WordTokenizer:
        """A tokenizer from a JSON file holding the full list (as :meth:`save` writes it)."""
        try:
            vocab = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"word vocabulary {path}: cannot be read as JSON ({type(e).__name__}: {e})") from None
        if not isinstance(vocab, list):
            raise ValueError(f"word vocabulary {path}: expected a JSON list of words, got {type(vocab).__name__}")
        return cls(vocab, strict=strict)

    def save(self, path: str | Path) -> None:
        from ..checkpoints import atomic_output

        with atomic_output(Path(path), "w") as f:
            f.write(json.dumps(self.vocab, indent=0) + "\n")

    def __len__(self) -> int:
        return len(self.vocab)

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def eos_id(self) -> int:
        return 1

    @property
    def unk_id(self) -> int:
        return 2

    def words(self, text: str) -> list[str]:
        """Lowercased words of ``text``; punctuation separates words and is kept only if it is in the vocabulary."""
        return [t for t in _TOKEN.findall(text.lower()) if t[0].isalnum() or t in self.ids]

    def unknown(self, text: str) -> list[str]:
        return [w for w in self.words(text) if w not in self.ids]

    def encode(self, text: str) -> list[int]:
        """Ids of the words of ``text`` followed by ``</s>`` (unknown words: ``<unk>``, reported once)."""
        words = self.words(text)
        unk = [w for w in words if w not in self.ids]
        if unk:
            msg = (f"{', '.join(repr(w) for w in dict.fromkeys(unk))} not in the {len(self.vocab)}-word vocabulary "
                   f"of this text encoder (prompt {text!r})")
            if self.strict:
                raise UsageError(f"{msg}; use only the model's words (see its embedded_t2i_vocab.json)")
            new = [w for w in dict.fromkeys(unk) if w not in self._warned]
            if new:
                self._warned.update(new)
                _LOG.warning("warning: %s: encoded as <unk> (the model cannot see them)", msg)
        return [self.ids.get(w, self.unk_id) for w in words] + [self.eos_id]

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        """Words up to ``</s>`` joined by spaces (padding dropped): ``decode(encode(t))`` is ``t`` normalised."""
        vals = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        out = []
        for i in vals:
            if i == self.eos_id:
                break
            if i != self.pad_id:
                out.append(self.vocab[i])
        return " ".join(out)

    def __call__(self, texts: str | Sequence[str], max_length: int, padding: str = "max_length") -> tuple[Tensor, Tensor]:
        """(ids (B, T) int64, mask (B, T) bool), right-padded to ``max_length`` (or the longest with
        ``padding="longest"``); a longer caption keeps its first ``max_length - 1`` words and ``</s>``."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if padding not in ("max_length", "longest"):
            raise ValueError(f"padding {padding!r}: use 'max_length' or 'longest'")
        seqs = []
        for t in texts:
            ids = self.encode(t)
            if len(ids) > max_length:
                ids = ids[: max_length - 1] + [self.eos_id]
            seqs.append(ids)
        T = max_length if padding == "max_length" else max(len(s) for s in seqs)
        out = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(seqs), T, dtype=torch.bool)
        for i, s in enumerate(seqs):
            out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = True
        return out, mask


class WordT5TextEncoder:
    """A :class:`WordTokenizer` + :class:`T5Encoder`; ``encoder(prompts)`` -> :class:`TextCondition`.

    Captions are padded to ``max_length`` (the transformer's ``text_maxlen``) like the official Flan-T5
    path, so a prompt's features do not depend on the other prompts of its batch.
    """

    def __init__(self, encoder: T5Encoder, tokenizer: WordTokenizer, max_length: int = 32) -> None:
        if encoder.config.vocab_size < len(tokenizer):
            raise ValueError(f"the T5 embedding has {encoder.config.vocab_size} rows but the vocabulary "
                             f"{len(tokenizer)} words")
        self.encoder, self.tokenizer, self.max_length = encoder, tokenizer, int(max_length)

    @property
    def device(self) -> torch.device:
        return self.encoder.shared.weight.device

    @property
    def channels(self) -> int:
        """Feature width (the transformer's ``text_channels``)."""
        return int(self.encoder.config.d_model)

    def features(self, prompts: str | Sequence[str]) -> tuple[Tensor, Tensor]:
        """(B, max_length, C) float32 features and the (B, max_length) mask; differentiable (for training)."""
        captions = [prompts] if isinstance(prompts, str) else list(prompts)
        if not captions:
            raise ValueError("no prompt given")
        ids, mask = self.tokenizer(captions, self.max_length)
        ids, mask = ids.to(self.device), mask.to(self.device)
        return self.encoder(ids, mask).float(), mask

    @torch.no_grad()
    def encode(self, prompts: str | Sequence[str]) -> TextCondition:
        """Packed float32 features of ``prompts`` (one caption per prompt, in order)."""
        feats, mask = self.features(prompts)
        return pack_text_features(feats, mask)

    __call__ = encode
