"""Named plans. Each preset is a function of the family, the schedule's last side and the depth, so the
same name means the same *intent* on every backbone and resolution.

Intent of each name:
- ``none``: no plan (everything forwarded); the reference for every comparison.
- ``identity``: the engine's hooks run and record, but keep every token; measures the engine's overhead.
- ``fastvar``: the published settings. Infinity 1024²: keep 60 % at 32², 50 % at 40², skip 48² and 64²,
  layers 3–27. HART 1024²: keep 50 % at 48², 25 % at 64², every layer. VAR (our analogue, the paper
  has no VAR row): prune the two largest scales (60 % / 50 %), caching the third largest, in the middle
  ~78 % of the blocks (the same 3/32…28/32 band as Infinity, rescaled to the depth).
- ``fastvar-mild``: the same scales at 80 % / 70 %; for when fidelity matters more than speed.
- ``fastvar-strong``: also prunes the third largest scale, and keeps 40 % / 25 % of the two largest.
- ``skip-last``: scale skipping only: the largest scale is not forwarded (Infinity: the two largest).
"""

from __future__ import annotations

from collections.abc import Callable

from .plan import AccelPlan, PlanError

FAMILIES = ("var", "infinity", "hart")


def _var_layers(depth: int) -> tuple[int, int]:
    return (round(3 * depth / 32), max(round(28 * depth / 32), round(3 * depth / 32) + 1))


_VAR_SIDES = {16: [8, 10, 13, 16], 32: [13, 18, 24, 32]}


def _sides(last_side: int, family: str, sides: tuple[int, ...] | None = None) -> list[int]:
    """The largest scales of each family's schedule ending at ``last_side``, largest last (``sides``: a
    non-standard VAR schedule's own largest sides, e.g. a small trained model's)."""
    if family == "var" and sides:
        return list(sides)
    if family == "var":
        table = _VAR_SIDES
        if last_side not in table:
            raise PlanError(f"no VAR preset for a schedule ending at {last_side}; VAR schedules end at 16 or 32")
        return table[last_side]
    if family == "hart":
        return [27, 36, 48, 64]
    return [20, 24, 32, 40, 48, 64]


def _fastvar(family: str, last_side: int, depth: int, sides=None) -> AccelPlan:
    if family == "infinity":
        return AccelPlan(
            name="fastvar", keep={"32": 0.6, "40": 0.5}, skip=("48", "64"), layers=(3, 28),
            branches=("attn", "cross", "ffn"), cache_scale="24", interp="area", strict=False,
            description="FastVAR paper settings for Infinity 1024²",
        )
    if family == "hart":
        return AccelPlan(
            name="fastvar", keep={"48": 0.5, "64": 0.25}, branches=("attn", "ffn"), cache_scale="36",
            interp="area", strict=False, description="FastVAR paper settings for HART 1024²",
        )
    s = _sides(last_side, "var", sides)
    return AccelPlan(
        name="fastvar", keep={str(s[2]): 0.6, str(s[3]): 0.5}, layers=_var_layers(depth),
        branches=("attn", "ffn"), cache_scale=str(s[1]), strict=False,
        description="FastVAR analogue for VAR: prune the two largest scales",
    )


def _mild(family: str, last_side: int, depth: int, sides=None) -> AccelPlan:
    p = _fastvar(family, last_side, depth, sides)
    ks = sorted(p.keep, key=int)
    p.keep = {ks[0]: 0.8, ks[1]: 0.7}
    p.skip = ()
    p.name, p.description = "fastvar-mild", "fastvar's scales, more tokens kept, nothing skipped"
    return p


def _strong(family: str, last_side: int, depth: int, sides=None) -> AccelPlan:
    p = _fastvar(family, last_side, depth, sides)
    s = _sides(last_side, family, sides)
    if family == "infinity":
        p.keep, p.cache_scale = {"24": 0.6, "32": 0.4, "40": 0.3}, "20"
    else:
        p.keep, p.cache_scale = {str(s[1]): 0.6, str(s[2]): 0.4, str(s[3]): 0.25}, str(s[0])
    p.name, p.description = "fastvar-strong", "prune one more scale and keep fewer tokens"
    return p


def _skip_last(family: str, last_side: int, depth: int, sides=None) -> AccelPlan:
    s = _sides(last_side, family, sides)
    skip = ("48", "64") if family == "infinity" else (str(s[-1]),)
    return AccelPlan(name="skip-last", skip=skip, strict=False, description="scale skipping only")


def _none(family: str, last_side: int, depth: int, sides=None) -> AccelPlan:
    return AccelPlan(name="none", description="no plan: the official computation")


def _identity(family: str, last_side: int, depth: int, sides=None) -> AccelPlan:
    return AccelPlan(name="identity", description="the engine's hooks active but keeping everything (overhead check)")


PRESETS: dict[str, Callable[..., AccelPlan]] = {
    "none": _none,
    "identity": _identity,
    "fastvar": _fastvar,
    "fastvar-mild": _mild,
    "fastvar-strong": _strong,
    "skip-last": _skip_last,
}


def get_preset(name: str, family: str = "var", last_side: int = 16, depth: int = 16,
               sides: tuple[int, ...] | None = None) -> AccelPlan:
    """The named plan for a backbone family, a schedule's last side and a depth (``sides``: the four largest
    sides of a non-standard VAR schedule)."""
    if family not in FAMILIES:
        raise PlanError(f"unknown model family {family!r}; known: {FAMILIES}")
    if name not in PRESETS:
        raise PlanError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
    return PRESETS[name](family, int(last_side), int(depth), sides)


def preset_for_model(name: str, model) -> AccelPlan:
    """The named plan for a model object (reads its family, schedule and depth)."""
    sched = getattr(model, "schedule", None)
    last = max(sched.last) if sched is not None else 64
    sides = None
    if model.family == "var" and sched is not None and last not in _VAR_SIDES:
        # a non-standard VAR schedule (e.g. a small trained model): the same rule on its own largest scales
        all_sides = sorted({max(hw) for hw in sched.sizes})
        if len(all_sides) < 4:
            raise PlanError(f"presets need a schedule with at least 4 scales; this one has {all_sides}")
        sides = tuple(all_sides[-4:])
    return get_preset(name, model.family, last, model.depth, sides)
