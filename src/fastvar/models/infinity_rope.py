"""Infinity's RoPE-2D tables.

Each token of a scale (h, w) gets a row angle and a column angle. With ``rope2d_normalized_by_hw=2``
(every released model) the positions are not 0..h-1 but the scale's grid stretched onto the last scale
of the aspect ratio's **1M** schedule (``round(arange(h) * H_last / h)``), so a coarse scale sees the
same angles as the matching region of the finest one, at every resolution. The cos/sin values are
computed on the full 128x128 grid first and then gathered, exactly like the official precomputation,
so the tables are bitwise identical to it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..schedules_infinity import rope_reference_hw


def rope2d_grid(head_dim: int, base: float = 10000.0, grid: int = 128) -> Tensor:
    """(2, grid, grid, head_dim/2): cos and sin of ``concat(y·inv_freq, x·inv_freq)`` for every grid cell."""
    half = head_dim // 2
    inv_freq = 1.0 / (base ** (torch.arange(0, half, 2, dtype=torch.int64).float() / half))
    t = torch.arange(grid, dtype=torch.int64).type_as(inv_freq)
    f = torch.outer(t, inv_freq)
    angles = torch.cat([f[:, None, :].expand(-1, grid, -1), f[None, :, :].expand(grid, -1, -1)], dim=-1)
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=0)


def default_rope_reference(sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The last scale of the 1M schedule with the aspect ratio of ``sizes`` (the official table's anchor)."""
    return tuple(rope_reference_hw(sizes))


def rope2d_positions(h: int, w: int, ref_hw: tuple[int, int]) -> Tensor:
    """(h·w, 2) int grid positions (row, column) of a scale's tokens, row-major (mode 2)."""
    uph, upw = ref_hw
    rows = (torch.arange(h) * (uph / h)).reshape(h, 1).expand(h, w)
    cols = (torch.arange(w) * (upw / w)).reshape(1, w).expand(h, w)
    return torch.stack([rows, cols], dim=-1).round().long().reshape(-1, 2)


def rope2d_table(
    sizes: Sequence[tuple[int, int]], head_dim: int, mode: int = 2, ref_hw: tuple[int, int] | None = None,
    base: float = 10000.0, grid: int = 128,
) -> Tensor:
    """(2, sum(h·w), head_dim/2) cos/sin for every token of ``sizes`` in sequence order."""
    g = rope2d_grid(head_dim, base, grid)
    if mode in (1, 2) and ref_hw is None:
        ref_hw = default_rope_reference(sizes)
    parts = []
    for h, w in sizes:
        if mode == 2:
            pos = rope2d_positions(h, w, ref_hw)
            if int(pos.max()) >= grid:
                raise ValueError(f"RoPE position {int(pos.max())} is outside the {grid}x{grid} table")
            parts.append(g[:, pos[:, 0], pos[:, 1], :])
        elif mode == 1:
            ph, pw = ref_hw
            uph, upw = (grid, int(grid / ph * pw)) if ph >= pw else (int(grid / pw * ph), grid)
            r = F.interpolate(g[:, :uph, :upw, :].permute(0, 3, 1, 2), size=(h, w), mode="bilinear", align_corners=True)
            parts.append(r.permute(0, 2, 3, 1).reshape(2, h * w, -1))
        elif mode == 0:
            parts.append(g[:, :h, :w, :].reshape(2, h * w, -1))
        else:
            raise ValueError(f"rope2d_normalized_by_hw={mode} is unknown; the official values are 0, 1, 2")
    return torch.cat(parts, dim=1)
