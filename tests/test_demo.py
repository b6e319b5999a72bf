"""``fastvar demo``: the logic without Gradio (inputs, plans, baseline cache, heat map, chart), and the real
server driven over HTTP with ``gradio_client`` (generate, change the plan, bad inputs shown as one line)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fastvar.cli import main
from fastvar.demo import (
    GRADIO_MISSING,
    DemoSession,
    diff_heatmap,
    error_text,
    parse_condition,
    parse_plan_text,
    scale_time_chart,
)
from fastvar.errors import UsageError

from ._demo_server import DemoServer

pytestmark = pytest.mark.usefixtures("one_thread", "demo_boot")


@pytest.fixture(scope="module")
def demo_boot(request, tmp_path_factory):
    """Start the real server at the beginning of the module when HTTP tests are selected, so it boots
    (~35 s on the loaded dev box: torch, gradio, torchmetrics imports, warm-up) while the in-process
    tests run; the ``server`` fixture waits for it."""
    wanted = any(item.module is request.module and item.name.startswith("test_http") for item in request.session.items)
    srv = DemoServer(tmp_path_factory.mktemp("demo")).start() if wanted else None
    yield srv
    if srv is not None:
        srv.stop()


# ---------------------------------------------------------------------------------------------- pure functions
@pytest.mark.parametrize("text, expect", [
    ("", "plan: empty"),
    ("{not json", "plan: not valid JSON (Expecting property name enclosed in double quotes at line 1 column 2)"),
    ("[1, 2]", "the JSON holds a list, not a plan object"),
    ('{"keep": {"16": 2}}', "keep ratio for scale '16' is 2.0; keep ratios must be in [0, 1]"),
    ('{"kep": {}}', "unknown plan field(s) ['kep']"),
    ('{"interp": "cubic"}', "interp 'cubic' is unknown"),
    ('{"cache": {"calibration": true, "sim_path": "/tmp/x.json"}}', "the demo reads and writes no files"),
])
def test_plan_text_errors_are_one_line(text, expect):
    with pytest.raises(UsageError) as e:
        parse_plan_text(text)
    assert expect in str(e.value) and "\n" not in str(e.value)


def test_conditions_use_the_cli_validators():
    assert parse_condition("3: red cross", "var", 10, "embedded") == 3
    assert parse_condition(7.0, "var", 10) == 7 and parse_condition(" 2 ", "var", 10) == 2
    with pytest.raises(UsageError, match=r"out of range for embedded; valid ids are 0..9"):
        parse_condition(10, "var", 10, "embedded")
    with pytest.raises(UsageError, match="not a class id"):
        parse_condition("a fox", "var", 10)
    assert parse_condition("  a red fox ", "infinity") == "a red fox"
    with pytest.raises(UsageError, match="empty"):
        parse_condition("   ", "infinity")


def test_heatmap_is_black_where_images_agree():
    a = torch.rand(1, 3, 16, 20, generator=torch.Generator().manual_seed(0))
    assert diff_heatmap(a, a).shape == (16, 20, 3) and not diff_heatmap(a, a).any()
    b = a.clone()
    b[..., :4, :4] = 1 - b[..., :4, :4]
    h = diff_heatmap(b, a)
    assert h[:4, :4].any() and not h[4:, 4:].any() and h.dtype == np.uint8
    assert (diff_heatmap(torch.ones(3, 2, 2), torch.zeros(3, 2, 2)) == [252, 253, 191]).all()  # full scale


def test_chart_draws_both_runs_and_marks_skipped_scales():
    sizes = [[1, 1], [2, 2], [4, 4]]
    img = scale_time_chart(sizes, {"0": 0.01, "1": 0.02, "2": 0.04}, {"0": 0.01, "1": 0.015}, "skip-last")
    assert img.shape == (320, 760, 3) and img.dtype == np.uint8
    colours = {tuple(c) for c in img.reshape(-1, 3)}
    assert (0x5B, 0x7F, 0xBF) in colours and (0xF2, 0x8E, 0x2B) in colours  # baseline and plan bars


def test_error_text_hides_tracebacks():
    assert error_text(UsageError("seed=-1: bad; fix")) == "seed=-1: bad; fix"
    assert error_text(RuntimeError("boom\nline 2")).startswith("internal error (RuntimeError: boom)")


# ---------------------------------------------------------------------------------------------- the session
@pytest.fixture(scope="module")
def session():
    from fastvar.pipelines.var import VARPipeline

    return DemoSession(VARPipeline.embedded(device="cpu"), "embedded")


def test_baseline_is_cached_and_only_the_plan_reruns(session, monkeypatch):
    calls = []
    real = session._generate
    monkeypatch.setattr(session, "_generate", lambda req, plan=None, hooks=None: calls.append(plan) or real(req, plan, hooks))
    first = session.run("1: red square", 0, None, None, None, session.plan_json("fastvar"))
    m = first.metrics
    assert not m["baseline_cached"] and m["plan"] == "fastvar" and m["guidance"] == 3.0
    assert m["speedup"] == pytest.approx(m["baseline_seconds"] / m["plan_seconds"])
    assert 0 < m["ssim"] < 1 and m["psnr"] > 10 and m["flop_ratio"] < 1
    assert set(m["scale_seconds"]["baseline"]) == {str(i) for i in range(10)}  # per-scale times of both runs
    assert set(m["scale_seconds"]["plan"]) == {str(i) for i in range(10)}
    assert first.baseline.shape == first.accelerated.shape == first.heatmap.shape == (256, 256, 3)  # 128 px, 2x
    calls.clear()
    again = session.run(1, 0.0, 3.0, None, None, session.plan_json("skip-last"))  # same key: default cfg spelled out
    assert len(calls) == 1  # one generation: the plan's
    assert again.metrics["baseline_cached"] and again.metrics["baseline_seconds"] == m["baseline_seconds"]
    assert np.array_equal(again.baseline, first.baseline) and "9" not in again.metrics["scale_seconds"]["plan"]
    same = session.run(1, 0, None, None, None, '{"name": "identity"}')  # nothing pruned: the baseline's image
    assert same.metrics["psnr"] is None and same.metrics["ssim"] == 1.0 and not same.heatmap.any()
    calls.clear()
    req = session.parse_request(1, 0, None, None, None)
    assert session.baseline_key(req) == session.baseline_key(session.parse_request("1: x", 0.0, 3, None, None))
    assert session.baseline_key(req) != session.baseline_key(session.parse_request(1, 1, None, None, None))
    assert session.baseline_key(req) != session.baseline_key(session.parse_request(1, 0, 2.5, None, None))


def test_caching_plan_is_calibrated_on_the_request(session):
    r = session.run(1, 0, None, None, None, session.plan_json("original"))
    assert r.metrics["plan"] == "original" and r.metrics["baseline_cached"] and r.metrics["psnr"] is not None


def test_plan_resolution_errors_name_the_schedule(session):
    with pytest.raises(UsageError, match=r"plan: plan 'custom': layer range \(0, 40\) is outside the model's depth 6"):
        session.run(1, 0, None, None, None, '{"layers": [0, 40]}')
    with pytest.raises(UsageError, match=r"scale 99 is not in this schedule \(1, 2, 3, 4, 5, 6, 8, 10, 13, 16\)"):
        session.run(1, 0, None, None, None, '{"keep": {"99": 0.5}}')
    with pytest.raises(UsageError, match="preset 'fast': unknown"):
        session.plan_json("fast")


def test_infinity_session_takes_aspect_and_pixel_budget():
    from fastvar.models.registry import get_spec
    from fastvar.pipelines import load_pipeline

    pipe = load_pipeline(get_spec("infinity"), random_init=True, device="cpu", pn="0.06M", aspect="1:1", depth=2,
                         embed_dim=64, num_heads=2, text_channels=32, text_tokens=4)
    s = DemoSession(pipe, "infinity", aspect="1:1", pn="0.06M")
    r = s.run("a red fox", 0, None, "3:4", "0.06M", s.plan_json("fastvar"))
    h, w = pipe.schedule.sizes[-1]
    assert h > w and r.metrics["aspect"] == "3:4" and r.metrics["pn"] == "0.06M"
    assert r.metrics["sizes"][-1] == [h, w]
    with pytest.raises(UsageError, match="aspect '9:1'"):
        s.run("a red fox", 0, None, "9:1", "0.06M", s.plan_json("fastvar"))
    with pytest.raises(UsageError, match="pixel budget '3M'"):
        s.run("a red fox", 0, None, "1:1", "3M", s.plan_json("fastvar"))


def test_fixed_schedule_model_ignores_aspect_and_pixel_budget():
    from fastvar.models.embedded_t2i import load_embedded_t2i_pipeline

    pipe = load_embedded_t2i_pipeline(device="cpu", random_init=True)
    s = DemoSession(pipe, "embedded-t2i")
    assert s.fixed_schedule and s.default_pn is None
    assert s.default_condition() == "two red circles"  # a prompt in the model's own vocabulary
    r = s.run("two red circles", 0, None, "3:4", "3M", s.plan_json("fastvar"))  # choosers hidden: values ignored
    assert "pn" in r.metrics and r.metrics["pn"] is None
    assert r.metrics["sizes"][-1] == list(pipe.schedule.sizes[-1])


# ---------------------------------------------------------------------------------------------- command line
def test_demo_without_gradio_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` raises ImportError
    assert main(["demo"]) == 2
    assert capsys.readouterr().err.strip() == f"fastvar: error: {GRADIO_MISSING}"


def test_demo_flags_fail_before_loading(capsys):
    assert main(["demo", "--port", "70000"]) == 2
    assert "--port 70000" in capsys.readouterr().err
    assert main(["demo", "--model", "var-d17"]) == 2
    assert "unknown model 'var-d17'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- over HTTP
@pytest.fixture(scope="module")
def server(demo_boot):
    demo_boot.wait()
    return demo_boot


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server.url, verbose=False)


def _png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_http_generate(client, server):
    assert f"http://127.0.0.1:{server.port}/" in server.tail()  # it says where it listens: loopback only
    plan = client.predict("fastvar-mild", api_name="/preset")
    plan = plan[0] if isinstance(plan, (list, tuple)) else plan
    assert json.loads(plan)["keep"] == {"13": 0.8, "16": 0.7}  # the preset resolved for the 16x16 schedule
    base, acc, heat, summary, chart, details, status = client.predict(
        "0: red circle", 0, 3.0, "1:1", "1M", plan, api_name="/generate")
    assert status.startswith("Done") and "speedup" in summary and "SSIM" in summary
    assert details["plan"] == "fastvar-mild" and details["condition"] == 0 and details["speedup"] > 0
    assert details["baseline_cached"]  # the warm-up ran this (the page's default) condition at start
    for p in (base, acc, heat):
        assert _png(p).shape == (256, 256, 3)
    assert _png(chart).std() > 10
    assert _png(base).std() > 5 and not np.array_equal(_png(base), _png(acc))


def test_http_change_plan_reruns_only_the_plan(client):
    first = client.predict("6: blue square", 2, 3.0, "1:1", "1M", '{"name": "mine", "keep": {"16": 0.5}}',
                           api_name="/generate")[5]
    second = client.predict("6: blue square", 2, 3.0, "1:1", "1M", '{"name": "mine2", "skip": ["16"]}',
                            api_name="/generate")[5]
    assert not first["baseline_cached"] and second["baseline_cached"]
    assert second["baseline_seconds"] == first["baseline_seconds"] and second["plan"] == "mine2"
    assert "9" not in second["scale_seconds"]["plan"] and "9" in first["scale_seconds"]["plan"]


def test_http_bad_plan_and_bad_class_are_one_line_on_the_page(client):
    out = client.predict("0: red circle", 0, 3.0, "1:1", "1M", '{"keep": {"16": 1.5}}', api_name="/generate")
    base, acc, heat, summary, chart, details, status = out
    assert base is None and acc is None and chart is None
    assert status == "**Error:** plan: keep ratio for scale '16' is 1.5; keep ratios must be in [0, 1] (0 skips the scale)"
    assert details == {"error": status.removeprefix("**Error:** ")}
    status = client.predict("0: red circle", 0, 3.0, "1:1", "1M", "{", api_name="/generate")[6]
    assert status.startswith("**Error:** plan: not valid JSON") and "Traceback" not in status
    status = client.predict("42", 0, 3.0, "1:1", "1M", '{"name": "x"}', api_name="/generate")[6]
    assert status == "**Error:** class: class id(s) [42] out of range for embedded; valid ids are 0..9"
