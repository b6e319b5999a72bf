"""The composable engine: one hooks object made of independent policies plus an always-on recorder.

Why: methods used to combine by inheritance (``CachingHooks(PlanHooks)``) and only the pruning hooks
recorded statistics, so every new method meant a new subclass and a new special case in the runners.
Here a method is a :class:`Policy` — a small object that implements only the hook points it needs —
and :class:`Engine` dispatches each hook point to its policies in a fixed order (``Policy.order``,
lower first). A :class:`Recorder` beside them counts tokens per (scale, layer, branch), the skipped
scales and the per-scale time whatever the policies are, so statistics are real for any combination.

Dispatch rules (the contract between policies):

- ``begin``: every policy in order; a policy may read :attr:`Engine.planned_skip` (the scales the
  policies before it will skip) and other policies through :meth:`Engine.policy`.
- ``skip_scale``: a scale is skipped if any policy skips it; every policy is asked (no short cut).
- ``branch``: a chain, outermost = lowest order. Each policy gets ``(x, idx, inner)`` and returns the
  branch output, calling ``inner(t, idx)`` zero or more times (caching may not call it; pruning calls
  it on the kept tokens). The innermost ``inner`` is the block's own function wrapped by the recorder,
  which counts the tokens it really computes. After the chain every policy sees the final output in
  ``branch_output`` (pruning stores its restore cache there, whichever policy produced the output).
- ``kv_tokens``: per scale and layer, each policy may lower the number of tokens appended.
- ``kv_append``: each policy in order may keep a subset of what the previous one kept (the backbone
  also passes its queries, attention scale and the keys held so far, for attention-based scores); the
  recorder counts the bytes kept and held per (scale, layer), the K/V each attention read and its key
  count (the FLOP estimate's), from tensor sizes.
- ``cond_only``: True from the first scale any policy asks for it (then for every later scale: the
  backbone has dropped the unconditional rows); the recorder counts B rows instead of 2B from there.
- ``guidance``: a chain like ``branch``; the innermost call is the backbone's official arithmetic (or,
  with ``uncond=None`` at a conditional-only scale, a copy of ``cond``). Policies read the site
  (``where``) from :attr:`Engine.guidance_site`.
- ``begin_scale`` / ``end_scale`` / ``end``: every policy in order; the recorder times the scale.

With no policy every call is a pass-through, so the output is bit-identical to the identity hooks.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol, TypeVar, runtime_checkable

import torch
from torch import Tensor

from .hooks import BranchFn, GuidanceFn, Hooks
from .stats import FlopDims

P = TypeVar("P", bound="Policy")


class Policy:
    """One acceleration method on the engine's hook points; every method is a no-op by default."""

    order: int = 50
    """Dispatch position (lower first, outermost in chains): skip 0, cache 10, prune 20, guidance 30, kv 40."""

    engine: Engine | None = None

    def begin(self, engine: Engine) -> None:
        """A generation starts; ``engine.sizes`` / ``engine.batch`` / ``engine.depth`` are set."""
        self.engine = engine

    def planned_skip(self) -> frozenset[int]:
        """Scales this policy will skip in this generation (known after ``begin``)."""
        return frozenset()

    def skip_scale(self, si: int) -> bool:
        return si in self.planned_skip()

    def kv_tokens(self, si: int, layer: int, n: int) -> int:
        """Tokens of scale ``si`` (``n`` of them would be forwarded) that block ``layer`` appends."""
        return n

    def cond_only(self, si: int) -> bool:
        """True if scale ``si`` should forward the conditional half of the CFG batch only (see Hooks.cond_only)."""
        return False

    def begin_scale(self, si: int, hw: tuple[int, int]) -> None:
        """Blocks are about to run on scale ``si`` of size ``hw``."""

    def branch(self, layer: int, name: str, x: Tensor, idx: Tensor | None, inner: BranchFn) -> Tensor:
        return inner(x, idx)

    def branch_output(self, layer: int, name: str, out: Tensor) -> None:
        """The final output of branch ``name`` of block ``layer`` at the current scale."""

    def guidance(self, si: int, cond: Tensor, uncond: Tensor | None, t: float, inner: GuidanceFn) -> Tensor:
        return inner(cond, uncond, t)

    def kv_append(self, layer: int, k: Tensor, v: Tensor, q: Tensor | None = None, scale: float | None = None,
                  past: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Keys/values (B, H, n, c) of the current scale that block ``layer`` keeps (default: all); see
        :meth:`fastvar.accel.hooks.Hooks.kv_append` for ``q`` / ``scale`` / ``past``."""
        return k, v

    def end_scale(self, si: int) -> None:
        """Blocks of scale ``si`` ran."""

    def end(self) -> None:
        """The generation is over; drop per-generation tensors here."""


class Recorder:
    """Tokens per (scale, layer, branch), skipped scales and per-scale block time of one generation.

    Time: on CPU ``perf_counter`` around the blocks of each scale; on CUDA one pair of events per scale,
    read when :attr:`scale_seconds` is first asked for after the generation (by then the runner's one
    synchronisation per generation has happened, so recording never serialises the host with the device).
    """

    def __init__(self, timing: bool = True) -> None:
        self.timing = timing
        self.begin((), 0)

    def begin(self, sizes: Sequence[tuple[int, int]], batch: int, device: torch.device | None = None) -> None:
        self.sizes: tuple[tuple[int, int], ...] = tuple(tuple(s) for s in sizes)
        self.batch = batch
        self.device = device
        self.counts: dict[tuple[int, int, str], tuple[int, int]] = {}
        self.skipped: list[int] = []
        self._scale_seconds: dict[int, float] = {}
        self.kv_bytes: dict[tuple[int, int], int] = {}  # (scale, layer) -> bytes of K and V kept in the cache
        self.kv_held: dict[tuple[int, int], int] = {}  # (scale, layer) -> bytes the layer's cache holds after it
        self.kv_attended: dict[tuple[int, int], int] = {}  # (scale, layer) -> K/V bytes its attention reads
        self._kv_layer: dict[int, int] = {}  # layer -> bytes held now
        self.kv_len: dict[tuple[int, int], int] = {}  # (scale, layer) -> keys its attention reads (held + new)
        self._kv_tokens: dict[int, int] = {}  # layer -> tokens held now
        self.rows: dict[int, int] = {}  # scale -> batch rows really forwarded (B at a conditional-only scale)
        self._events: dict[int, tuple[torch.cuda.Event, torch.cuda.Event]] = {}
        self._t0 = 0.0

    def kv_appended(self, si: int, layer: int, k: Tensor, v: Tensor, k_in: Tensor, v_in: Tensor) -> None:
        """Count what a cache keeps of an append (``k``/``v``) and what the attention reads (held + ``k_in``).

        Exact bytes from tensor sizes, not process memory: the held bytes are the cache's stored tensors
        (with no KV policy exactly what the official code's concatenated cache holds).
        """
        kept = k.numel() * k.element_size() + v.numel() * v.element_size()
        new = k_in.numel() * k_in.element_size() + v_in.numel() * v_in.element_size()
        key = (si, layer)
        held = self._kv_layer.get(layer, 0)
        self.kv_attended[key] = self.kv_attended.get(key, 0) + held + new
        self.kv_bytes[key] = self.kv_bytes.get(key, 0) + kept
        self._kv_layer[layer] = held + kept
        self.kv_held[key] = held + kept
        t = self._kv_tokens.get(layer, 0)
        self.kv_len[key] = t + k_in.shape[2]
        self._kv_tokens[layer] = t + k.shape[2]

    def kv_summary(self) -> dict:
        """KV bytes of the generation: held at the end, peak held (all layers together, after each scale),
        per scale (held by all layers after it) and per layer (at the end), and the largest K/V one
        attention call read (held + the whole current scale, a transient)."""
        per_scale: dict[int, int] = {}
        last: dict[int, int] = {}
        for (si, layer), b in sorted(self.kv_held.items()):
            last[layer] = b
            per_scale[si] = sum(last.values())
        return {
            "kv_bytes": sum(self._kv_layer.values()),
            "kv_peak_bytes": max(per_scale.values(), default=0),
            "kv_bytes_per_scale": {str(si): b for si, b in per_scale.items()},
            "kv_bytes_per_layer": {str(layer): b for layer, b in sorted(self._kv_layer.items())},
            "kv_attended_peak_bytes": max(self.kv_attended.values(), default=0),
        }

    @property
    def _cuda(self) -> bool:
        return self.device is not None and self.device.type == "cuda"

    def begin_scale(self, si: int) -> None:
        if not self.timing:
            return
        if self._cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self._events[si] = (start, torch.cuda.Event(enable_timing=True))
        else:
            self._t0 = time.perf_counter()

    def end_scale(self, si: int) -> None:
        if not self.timing:
            return
        if self._cuda:
            self._events[si][1].record()
        else:
            self._scale_seconds[si] = time.perf_counter() - self._t0

    def end(self) -> None:
        """Nothing waits here: CUDA events are read by :attr:`scale_seconds`."""

    @property
    def scale_seconds(self) -> dict[int, float]:
        """Block seconds per executed scale (CUDA: waits for the last scale's event if it has not completed)."""
        if self._events:
            last = max(self._events)
            if not self._events[last][1].query():  # done once the runner has synchronised: no second wait
                self._events[last][1].synchronize()
            for si, (a, b) in sorted(self._events.items()):
                self._scale_seconds[si] = a.elapsed_time(b) / 1000.0
            self._events = {}
        return self._scale_seconds


class Engine(Hooks):
    """Hooks made of independent policies (each optional) and a recorder; see the module docstring."""

    active = True

    def __init__(self, policies: Sequence[Policy] = (), depth: int = 0, plan=None, timing: bool = True) -> None:
        self.policies: list[Policy] = sorted(policies, key=lambda p: p.order)
        self.depth = depth
        self.plan = plan
        self.recorder = Recorder(timing)
        self.planned_skip: frozenset[int] = frozenset()
        self.si = -1
        self.hw: tuple[int, int] = (0, 0)

    def policy(self, kind: type[P]) -> P | None:
        """The first policy of class ``kind`` (policies that cooperate find each other here)."""
        return next((p for p in self.policies if isinstance(p, kind)), None)

    @property
    def sizes(self) -> tuple[tuple[int, int], ...]:
        return self.recorder.sizes

    @property
    def batch(self) -> int:
        return self.recorder.batch

    # ------------------------------------------------------------------ hook points
    def begin(self, sizes: Sequence[tuple[int, int]], batch: int, device: torch.device | None = None) -> None:
        self.recorder.begin(sizes, batch, device)
        self.planned_skip = frozenset()
        self._begun = True
        self._cond_from: int | None = None
        self.guidance_site = "logits"
        for p in self.policies:
            p.begin(self)
            self.planned_skip = self.planned_skip | p.planned_skip()

    def skip_scale(self, si: int) -> bool:
        skip = any([p.skip_scale(si) for p in self.policies])
        if skip:
            self.recorder.skipped.append(si)
        return skip

    def kv_tokens(self, sizes: Sequence[tuple[int, int]], layer: int) -> int:
        if not getattr(self, "_begun", False):  # before the first generation: every token
            return super().kv_tokens(sizes, layer)
        total = 0
        for si, (h, w) in enumerate(sizes):
            n = h * w
            for p in self.policies:
                n = p.kv_tokens(si, layer, n)
            total += n
        return total

    def cond_only(self, si: int) -> bool:
        if getattr(self, "_cond_from", None) is not None:
            return True
        if any([p.cond_only(si) for p in self.policies]):
            self._cond_from = si
            held = getattr(self.recorder, "_kv_layer", None)
            if held:  # the backbone now drops the unconditional half of every cache
                for layer in held:
                    held[layer] //= 2
            return True
        return False

    def begin_scale(self, si: int, hw: tuple[int, int]) -> None:
        self.si, self.hw = si, tuple(hw)
        half = getattr(self, "_cond_from", None) is not None
        self.recorder.rows[si] = self.batch // 2 if half else self.batch
        for p in self.policies:
            p.begin_scale(si, self.hw)
        self.recorder.begin_scale(si)

    def branch(self, layer: int, name: str, x: Tensor, fn: BranchFn) -> Tensor:
        computed = [0]

        def counted(t: Tensor, idx: Tensor | None) -> Tensor:
            computed[0] += t.shape[1]
            return fn(t, idx)

        inner: BranchFn = counted
        for p in reversed(self.policies):
            inner = _bind_branch(p, layer, name, inner)
        out = inner(x, None)
        self.recorder.counts[(self.si, layer, name)] = (x.shape[1], computed[0])
        for p in self.policies:
            p.branch_output(layer, name, out)
        return out

    def guidance(self, si: int, cond: Tensor, uncond: Tensor | None, t: float, combine: GuidanceFn,
                 where: str = "logits") -> Tensor:
        self.guidance_site = where

        def innermost(c: Tensor, u: Tensor | None, w: float) -> Tensor:
            return c.clone() if u is None else combine(c, u, w)

        inner: GuidanceFn = innermost
        for p in reversed(self.policies):
            inner = _bind_guidance(p, si, inner)
        return inner(cond, uncond, t)

    def kv_append(self, layer: int, k: Tensor, v: Tensor, q: Tensor | None = None, scale: float | None = None,
                  past: Tensor | None = None) -> tuple[Tensor, Tensor]:
        kin, vin = k, v
        for p in self.policies:
            k, v = p.kv_append(layer, k, v, q=q, scale=scale, past=past)
        self.recorder.kv_appended(self.si, layer, k, v, kin, vin)
        return k, v

    def end_scale(self, si: int) -> None:
        self.recorder.end_scale(si)
        for p in self.policies:
            p.end_scale(si)

    def end(self) -> None:
        for p in self.policies:
            p.end()
        self.recorder.end()

    # ------------------------------------------------------------------ reporting
    @property
    def counts(self) -> dict[tuple[int, int, str], tuple[int, int]]:
        return self.recorder.counts

    @property
    def skipped(self) -> list[int]:
        return self.recorder.skipped

    @property
    def scale_seconds(self) -> dict[int, float]:
        return self.recorder.scale_seconds

    def token_counts(self) -> dict[tuple[int, int, str], tuple[int, int]]:
        return dict(self.recorder.counts)

    def __getattr__(self, name: str):
        # Backwards compatibility: ``PlanHooks``/``CachingHooks`` exposed their state as attributes
        # (``hooks.kept``, ``hooks.decisions``, ``hooks.similarity`` ...); look them up on the policies.
        if name.startswith("__") or name in ("policies", "recorder"):
            raise AttributeError(name)
        for p in self.__dict__.get("policies", ()):
            if hasattr(p, name):
                return getattr(p, name)
        raise AttributeError(f"{type(self).__name__} (policies {[type(p).__name__ for p in self.__dict__.get('policies', ())]}) "
                             f"has no attribute {name!r}")


def _bind_branch(p: Policy, layer: int, name: str, inner: BranchFn) -> BranchFn:
    return lambda t, idx: p.branch(layer, name, t, idx, inner)


def _bind_guidance(p: Policy, si: int, inner: GuidanceFn) -> GuidanceFn:
    return lambda c, u, t: p.guidance(si, c, u, t, inner)


def compose(*policies: Policy | None, depth: int, plan=None, timing: bool = True) -> Engine:
    """An engine of the given policies (``None`` entries are left out: each policy is optional)."""
    return Engine([p for p in policies if p is not None], depth=depth, plan=plan, timing=timing)


__all__ = ["Policy", "Recorder", "Engine", "compose", "Backbone", "noop_engine"]


@runtime_checkable
class Backbone(Protocol):
    """What the engine, plans and presets need of a model (VAR, Infinity and HART implement it).

    ``family`` names the sampling loop ("var", "infinity", "hart"); ``depth`` the blocks a plan's layer
    ranges refer to; ``flop_dims()`` what the FLOP estimate needs; ``hooks`` the installed hooks (an
    :class:`Engine` or the identity). The scale schedule of a generation reaches the hooks in
    ``begin(sizes, batch, device)`` (Infinity's depends on the aspect ratio), and each family's
    pipeline has one generation call returning ``GenerationResult``.
    """

    family: str
    depth: int
    hooks: Hooks

    def flop_dims(self) -> FlopDims: ...

    # The caching API the HART caching extension documents on the model (fastvar.accel.caching.CachingAPI).
    def set_cache_config(self, cfg, record: bool = False) -> Hooks: ...

    def get_cache_statistics(self) -> dict: ...

    def save_similarity_data(self, path=None): ...


def noop_engine(depth: int, timing: bool = True) -> Engine:
    """Every policy present at its no-op setting: skip, prune (an empty plan), cache (an empty config),
    guidance (no weight, no conditional-only scale) and KV (keep everything).

    Why: the engine's own cost (dispatch through every hook point of every policy, the recorder) must
    stay small against no plan at all (target <= 3 %), and its output must equal the plain model's bit
    for bit; this engine is what both checks run.
    """
    from .caching import CachePolicy
    from .guidance import GuidancePolicy
    from .kv import KVPolicy
    from .plan import AccelPlan, CacheConfig
    from .pruning import PrunePolicy, SkipPolicy

    noop = AccelPlan(name="noop-all", description="every policy present at its no-op setting (overhead check)")
    return Engine([SkipPolicy(noop), PrunePolicy(noop), CachePolicy(CacheConfig(), depth), GuidancePolicy(),
                   KVPolicy({"#-1": 1.0})], depth=depth, plan=noop, timing=timing)
