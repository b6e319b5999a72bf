"""A tiny random-weight CLIP (transformers' real CLIPModel architecture) and its processor, built in-process."""

from __future__ import annotations

import functools

import torch
import transformers


@functools.cache
def tiny_clip_pair(seed: int = 0, image_size: int = 32):
    """(CLIPModel, CLIPProcessor), built once per process: byte-level BPE vocabulary without merges, 2-layer
    towers, 32-px images."""
    from tokenizers import pre_tokenizers

    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    tok = transformers.CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=[])
    try:
        from transformers import CLIPImageProcessorPil as ImageProcessor  # transformers 5: no torchvision needed
    except ImportError:  # transformers 4
        from transformers import CLIPImageProcessor as ImageProcessor
    ip = ImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    proc = transformers.CLIPProcessor(image_processor=ip, tokenizer=tok)
    n = len(vocab)
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=77, bos_token_id=n - 2, eos_token_id=n - 1, pad_token_id=n - 1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    return transformers.CLIPModel(cfg).eval(), proc

