"""The run primitive (fastvar.eval.run.run_plans): order of runs, seeds, what is timed and kept,
calibration of caching plans, memory held, and bad arguments."""

from __future__ import annotations

import pytest
import torch

from fastvar.accel import AccelPlan, Engine, preset_for_model
from fastvar.accel.cache_presets import get_cache_preset
from fastvar.accel.caching import CachePolicy
from fastvar.accel.hooks import IDENTITY
from fastvar.errors import UsageError
from fastvar.eval.run import needs_calibration, run_plans
from fastvar.pipelines.common import GenerationResult

pytestmark = pytest.mark.usefixtures("one_thread")


class _StubPipe:
    """Records every call; the latent encodes (call number, seed) so the kept round can be identified."""

    model = None

    def __init__(self) -> None:
        self.calls: list[tuple[object, list, int | None, dict]] = []
        self.decoded: list[torch.Tensor] = []

    def __call__(self, conds, seed=0, plan=None, decode=True, **kw):
        assert decode is False  # the primitive decodes once, untimed
        n = len(self.calls)
        self.calls.append((plan, list(conds), seed, kw))
        lat = torch.full((len(conds), 1), float(n))
        return GenerationResult(None, 1.0 + n, {"call": n, "scale_seconds": {"0": 0.5}}, latent=lat)

    def decode(self, latent):
        self.decoded.append(latent)
        return latent * 2


def test_rounds_are_interleaved_after_the_warmup_and_the_first_timed_round_is_kept():
    pipe = _StubPipe()
    a, b = Engine(depth=1), Engine(depth=1)
    res = run_plans(pipe, [1, 2, 3], [("a", a), ("b", b), ("none", None)], repeats=2, warmup=1, seed=10,
                    sampling={"cfg": 3.0}, batch_size=2)
    order = [p for p, *_ in pipe.calls]
    # 2 chunks per generation; warm-up round then two timed rounds, each a, b, none
    assert order == [a, a, b, b, IDENTITY, IDENTITY] * 3
    assert [(c, s) for _p, c, s, _kw in pipe.calls[:2]] == [([1, 2], 10), ([3], 11)]  # chunk i: seed + i
    assert all(kw == {"cfg": 3.0} for *_x, kw in pipe.calls)
    assert [r.name for r in res] == ["a", "b", "none"] and res[0].hooks is a and res[2].hooks is IDENTITY
    # a round's time is the sum over its chunks; rounds 1 and 2 are calls 6.. and 12..
    assert res[0].seconds == res[0].wall_seconds == [(1 + 6) + (1 + 7), (1 + 12) + (1 + 13)]
    assert res[1].median == pytest.approx(((1 + 8) + (1 + 9) + (1 + 14) + (1 + 15)) / 2)
    assert res[0].stats["call"] == 6 and res[0].latent.flatten().tolist() == [6.0, 6.0, 7.0]
    assert torch.equal(res[0].images, res[0].latent * 2) and len(pipe.decoded) == 3
    assert res[0].scale_seconds == [{"0": 0.5}, {"0": 0.5}]


def test_decode_false_and_no_warmup():
    pipe = _StubPipe()
    res = run_plans(pipe, [0], [("x", Engine(depth=1))], repeats=3, warmup=0, decode=False)
    assert len(pipe.calls) == 3 and res[0].images is None and pipe.decoded == []


def test_cpu_clock_counts_this_process_work_only():
    import time

    class Busy(_StubPipe):
        def __call__(self, conds, **kw):
            t0 = time.process_time()
            while time.process_time() - t0 < 0.02:  # 20 ms of CPU work ...
                pass
            time.sleep(0.05)  # ... and 50 ms of waiting, which the CPU clock does not count
            return super().__call__(conds, **kw)

    res = run_plans(Busy(), [0], [("x", None)], repeats=2, warmup=0, decode=False, clock="cpu")
    assert all(0.02 <= s < 0.05 for s in res[0].seconds) and res[0].wall_seconds == [1.0, 2.0]


@pytest.mark.parametrize("kw, match", [(dict(repeats=0), "repeats"), (dict(warmup=-1), "warmup"),
                                       (dict(batch_size=0), "batch_size"), (dict(seed=-3), "seed"),
                                       (dict(clock="sundial"), "clock")])
def test_bad_arguments_are_one_line_usage_errors(kw, match):
    with pytest.raises(UsageError, match=match):
        run_plans(_StubPipe(), [0], [("x", None)], **kw)
    with pytest.raises(UsageError, match="conditions"):
        run_plans(_StubPipe(), [], [("x", None)])


@pytest.fixture(scope="module")
def var_pipe():
    from fastvar.models.var import VAR
    from fastvar.pipelines.var import VARPipeline
    from fastvar.tokenizers.vqvae import VQVAE

    pn = (1, 2, 3, 4, 6, 8)
    torch.manual_seed(0)
    model = VAR(vocab_size=64, cvae=8, num_classes=5, depth=2, embed_dim=32, num_heads=2, patch_nums=pn)
    model.init_weights()
    for blk in model.blocks:
        blk.ada_lin[-1].bias.data[: 2 * model.C].fill_(1.0)  # branch outputs matter: reuse changes images
    vae = VQVAE(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 1), patch_nums=pn, using_sa=False, using_mid_sa=False)
    return VARPipeline(model.eval(), vae.eval(), "tiny", defaults=dict(cfg=2.0, top_k=10, top_p=0.9))


def test_caching_plan_is_calibrated_once_and_its_engine_reused(var_pipe):
    cache = get_cache_preset("original", threshold=0.0, cache_stages=("#2",), skip_stages=("#3", "#4"))
    plan = AccelPlan(name="cached", cache=cache)
    assert needs_calibration(plan) and not needs_calibration(AccelPlan(name="p"))
    logs: list[str] = []
    res = run_plans(var_pipe, [0, 3], [("none", None), ("cached", plan), ("fastvar", "fastvar")], repeats=2,
                    warmup=1, seed=5, log=logs.append)
    base, cached, fv = res
    assert cached.calibrated == 2 * 2 * 2  # (layer, stage, branch): 2 layers x 2 skip stages x attn/ffn
    assert any(m.startswith("calibrated cached: 8") for m in logs)
    pol = cached.policy(CachePolicy)
    assert pol is not None and pol.generations == 1 + 2  # warm-up + timed rounds: calibration had its own engine
    assert cached.cache["hit_rate"] > 0 and cached.memory["cache_peak_bytes"] > 0
    assert not torch.equal(cached.images, base.images) and torch.isfinite(cached.images).all()
    assert base.engine is None and base.memory == {"cache_peak_bytes": 0, "pruning_cache_peak_bytes": 0}
    assert len(base.seconds) == len(cached.seconds) == len(fv.seconds) == 2
    # the preset resolved for this model; its restore cache is the cache scale's branch outputs:
    # depth x branches x (2 classes x CFG 2) x tokens x width x fp32
    model = var_pipe.model
    r = preset_for_model("fastvar", model).resolve(model.schedule, model.depth)
    h, w = model.schedule.sizes[r.cache_si]
    branches = set(r.branches) & set(model.flop_dims().branches)
    want = len(r.layers) * len(branches) * 4 * h * w * 32 * 4
    assert want > 0
    assert fv.memory == {"cache_peak_bytes": 0, "pruning_cache_peak_bytes": want}
    assert fv.stats["tokens_forwarded"] < base.stats["tokens_forwarded"]


def test_unknown_preset_fails_before_anything_runs(var_pipe):
    pipe = _StubPipe()
    pipe.model = var_pipe.model
    with pytest.raises(UsageError, match="unknown preset"):
        run_plans(pipe, [0], [("ok", None), ("cached", AccelPlan(name="c", cache=get_cache_preset("original"))),
                              ("bad", "warp-drive")])
    assert pipe.calls == []


def test_engine_overhead_rows_and_bit_identity(var_pipe):
    from fastvar.eval.run import engine_overhead

    out = engine_overhead(var_pipe, [1, 2], repeats=2, warmup=0, seed=4)
    rows = {r["plan"]: r for r in out["rows"]}
    assert list(rows) == ["none", "identity", "noop-all"]
    assert rows["none"]["overhead"] == 0.0 and rows["none"]["policies"] == []
    assert {"SkipPolicy", "PrunePolicy", "CachePolicy", "GuidancePolicy", "KVPolicy"} <= set(rows["noop-all"]["policies"])
    assert all(r["bit_identical"] and len(r["seconds_all"]) == 2 for r in rows.values())


def test_a_cuda_generation_synchronises_once(monkeypatch):
    """Timing on CUDA: the generation and every scale are bracketed by events; the host waits once (on the
    runner's last event) and never synchronises the whole device. Fake events keep a device clock."""
    from fastvar.accel.stats import FlopDims
    from fastvar.pipelines.common import PlanRunner

    class Ev:
        now = done = 0.0
        waits = 0

        def __init__(self, enable_timing: bool = False) -> None:
            self.t = None

        def record(self) -> None:
            Ev.now += 1.0
            self.t = Ev.now

        def query(self) -> bool:
            return self.t <= Ev.done

        def synchronize(self) -> None:
            Ev.waits += 1
            Ev.done = max(Ev.done, self.t)

        def elapsed_time(self, end: Ev) -> float:
            assert self.query() and end.query(), "read before the device reached the event"
            return (end.t - self.t) * 1000.0

    monkeypatch.setattr(torch.cuda, "Event", Ev)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: pytest.fail("device-wide synchronisation"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 0)
    dev = torch.device("cuda")

    class Model:
        depth, device, hooks = 1, dev, IDENTITY

        def flop_dims(self) -> FlopDims:
            return FlopDims(width=4, ffn_hidden=8, branches=("attn",))

    sizes = [(1, 1), (2, 2), (3, 3)]
    eng = Engine(depth=1)

    def generation() -> str:
        eng.begin(sizes, 2, dev)
        for si, hw in enumerate(sizes):
            eng.begin_scale(si, hw)
            eng.branch(0, "attn", torch.zeros(2, hw[0] * hw[1], 4), lambda t, idx: t)
            eng.end_scale(si)
        eng.end()
        return "latent"

    out, secs, stats, _hooks = PlanRunner(Model()).run(generation, eng, 1, sizes)
    assert out == "latent" and Ev.waits == 1
    assert secs == pytest.approx(7.0)  # events 1 (start) .. 8 (stop)
    assert stats["scale_seconds"] == {"0": 1.0, "1": 1.0, "2": 1.0}
