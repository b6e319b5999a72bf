"""Scale schedules: the list of token-map sizes a next-scale model walks through.

Every model family and every acceleration plan talks about scales; this module is the one place that
turns "scale 7", "side 24" or "576 tokens" into the same index, so plans stay portable across schedules.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# VAR's two official schedules (256 px and 512 px with the 16x VQVAE).
VAR_PATCH_NUMS = {
    256: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
    512: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),
}


@dataclass(frozen=True)
class Schedule:
    """An ordered list of (h, w) token-map sizes.

    Square schedules (VAR, HART) and aspect-ratio schedules (Infinity) share this type so that the
    acceleration engine never needs to know which family it is driving.
    """

    sizes: tuple[tuple[int, int], ...]

    @classmethod
    def square(cls, sides: Iterable[int]) -> Schedule:
        return cls(tuple((int(s), int(s)) for s in sides))

    def __len__(self) -> int:
        return len(self.sizes)

    def __iter__(self):
        return iter(self.sizes)

    def __getitem__(self, si: int) -> tuple[int, int]:
        return self.sizes[si]

    @property
    def token_counts(self) -> tuple[int, ...]:
        return tuple(h * w for h, w in self.sizes)

    @property
    def total_tokens(self) -> int:
        return sum(self.token_counts)

    @property
    def begin_ends(self) -> tuple[tuple[int, int], ...]:
        out, cur = [], 0
        for n in self.token_counts:
            out.append((cur, cur + n))
            cur += n
        return tuple(out)

    @property
    def last(self) -> tuple[int, int]:
        return self.sizes[-1]

    def describe(self) -> str:
        return ", ".join(f"{h}x{w}" if h != w else f"{h}" for h, w in self.sizes)

    def resolve(self, key: int | str) -> int:
        """Map a scale reference to its index.

        Accepted forms: ``"#3"`` or ``"i3"`` (index 3), ``"24"`` / ``"24x24"`` (side or h x w),
        ``"t576"`` (token count), or an int, which is read as a *side length*
        (the way the FastVAR paper names scales). A bare number is only ever a side: falling back to a
        token count would make "64" mean the 8x8 scale of a schedule that has no 64-side scale.
        """
        if isinstance(key, str):
            k = key.strip().lower()
            if k.startswith("#") or k.startswith("i"):
                return self._check_index(int(k[1:]), key)
            if k.startswith("t"):
                return self._by_tokens(int(k[1:]), key)
            if "x" in k:
                h, w = (int(v) for v in k.split("x"))
                for i, hw in enumerate(self.sizes):
                    if hw == (h, w):
                        return i
                raise self._unknown(key)
            key = int(k)
        key = int(key)
        for i, (h, w) in enumerate(self.sizes):
            if max(h, w) == key:
                return i
        raise self._unknown(key)

    def _check_index(self, i: int, orig) -> int:
        if not 0 <= i < len(self):
            raise self._unknown(orig)
        return i

    def _by_tokens(self, n: int, orig) -> int:
        for i, t in enumerate(self.token_counts):
            if t == n:
                return i
        raise self._unknown(orig)

    def _unknown(self, key) -> ValueError:
        return ValueError(
            f"scale {key!r} is not in this schedule ({self.describe()}); name a scale by side length "
            f"(e.g. '{max(self.sizes[-1])}'), by token count ('t{self.token_counts[-1]}') or by index ('#{len(self) - 1}')"
        )


def square_schedule(patch_nums: Sequence[int]) -> Schedule:
    return Schedule.square(patch_nums)
