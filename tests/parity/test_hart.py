"""HART parity against the official code (fixtures in $FASTVAR_PARITY_DIR/hart/tiny): hybrid tokenizer,
teacher forcing, diffusion head, seeded inference, and FastVAR through the acceleration engine.

Every size, seed, setting, case and tensor name comes from the fixture (config.json, cases.json and the
names stored in cases.safetensors); tolerances are the README's. Inference is compared exactly only where
the official code itself is stable: on the scales before the first one at which its own sensitivity probe
(cases.json ``sensitivity_probe_explicit_softmax_attention``) flipped an index.
"""

from __future__ import annotations

import pytest
import torch

from fastvar.accel.hooks import IDENTITY, Hooks
from fastvar.models.hart import HART, HARTConfig, official_top_k

from .conftest import load_fixture, nonempty

PARITY_MODEL = "hart"  # the fixture folder (conftest reads its thread count)

IDX_EXACT = dict(atol=0, rtol=0)
TOK_TOL = dict(atol=1e-5, rtol=0)  # tokenizer f / frest_last
IMG_TOL = dict(atol=1e-4, rtol=0)
HIDDEN_TOL = dict(atol=1e-4, rtol=1e-5)  # logits and hidden states
NET_TOL = dict(atol=1e-5, rtol=0)  # diffusion_net
SAMPLE_TOL = dict(atol=1e-4, rtol=0)  # diffusion_sample
RESIDUAL_TOL = dict(atol=1e-3, rtol=0)  # inference residual (the sampler's clamp amplifies rounding)


def _fixture():
    return load_fixture("hart")


def _case_storing(pattern: str) -> str:
    """The one case that stores an output named like ``pattern`` (case names are not hard-coded)."""
    found = _fixture().cases_storing(pattern)
    assert len(found) == 1, f"expected one case storing {pattern!r}, found {found}"
    return found[0]


KEEP_IDX = r"block(\d+)_(\w+?)_keep_idx_pn(\d+)"  # FastVAR: indices kept by block <l>, branch <b>, at side <pn>
PROBE = "sensitivity_probe_explicit_softmax_attention"


def _inference_cases(fastvar: bool) -> list[str]:
    """autoregressive_infer_cfg cases (they record the sampler calls); FastVAR ones store kept indices."""
    f = _fixture()
    found = [c for c in f.case_names() if "sampler_calls" in f.case(c) and bool(f.matching(c, KEEP_IDX)) == fastvar]
    return nonempty(found, f"{'FastVAR ' if fastvar else ''}inference case")


@pytest.fixture(scope="module")
def fx():
    return _fixture()


@pytest.fixture(scope="module")
def model(fx) -> HART:
    kw, tk = fx.config["llm"]["kwargs"], fx.config["tokenizer"]["kwargs"]
    m = HART(HARTConfig.from_official(kw, vocab_size=tk["vocab_size"], cvae=tk["z_channels"]))
    m.load_state_dict(fx.weights_with_prefix(fx.config["llm"]["weights_prefix"]), strict=True)
    return m.eval()


@pytest.fixture(scope="module")
def tok(fx):
    from fastvar.tokenizers.hart_tokenizer import HARTTokenizer

    t = HARTTokenizer.from_official_config(fx.config["tokenizer"]["kwargs"])
    t.load_state_dict(fx.weights_with_prefix(fx.config["tokenizer"]["weights_prefix"].split()[0]), strict=True)
    return t.eval()


def _split(fx, idx_cat: torch.Tensor, patch_nums) -> list[torch.Tensor]:
    return list(torch.split(idx_cat, [p * p for p in patch_nums], dim=1))


# ---------------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_encode(fx, tok):
    c = _case_storing("frest_last")  # README: tokenizer_encode (img_to_idxBl_and_frest)
    pn = fx.case(c)["patch_nums"]
    img = fx.t(f"{c}.input.image")
    with torch.no_grad():
        f = tok.img_to_f(img)
        idx, frest = tok.img_to_idxBl_and_frest(img, pn)
    torch.testing.assert_close(f, fx.t(f"{c}.output.f"), **TOK_TOL)
    torch.testing.assert_close(torch.cat(idx, 1), fx.t(f"{c}.output.idx_cat"), **IDX_EXACT)
    torch.testing.assert_close(frest, fx.t(f"{c}.output.frest_last"), **TOK_TOL)


def test_tokenizer_decode_and_var_input(fx, tok):
    enc, dec = _case_storing("frest_last"), _case_storing("image_hybrid")  # README: tokenizer_encode / _decode
    tf = _case_storing("logits_argmax")  # README: transformer_forward, whose input is idxBl_to_var_input(idx)
    pn = fx.case(enc)["patch_nums"]
    idx = _split(fx, fx.t(f"{dec}.input.idx_cat"), pn)  # stored once, as {"same_as": <the encoder's output>}
    frest = fx.t(f"{dec}.input.frest_last")
    with torch.no_grad():
        discrete = tok.decode_discrete(idx)
        resid = tok.continuous_target(idx[-1], frest)
        f_hat = tok.quantize.hybrid_fhat(idx, resid)
        hybrid = tok.fhat_to_img(f_hat)
        var_input = tok.quantize.idx_to_var_input(idx, pn)
    torch.testing.assert_close(discrete, fx.t(f"{dec}.output.image_discrete_only"), **IMG_TOL)
    torch.testing.assert_close(hybrid, fx.t(f"{dec}.output.image_hybrid"), **IMG_TOL)
    torch.testing.assert_close(f_hat, fx.t(f"{enc}.output.f"), atol=1e-4, rtol=0)  # cases.json: "< 1e-4"
    torch.testing.assert_close(var_input, fx.t(f"{tf}.input.x_BLCv_wo_first_l"), **TOK_TOL)


# ---------------------------------------------------------------------------------------------- transformer
def test_transformer_forward(fx, model, tok):
    c = _case_storing("logits_argmax")  # README: transformer_forward (teacher forcing)
    meta, ctx = fx.case(c), model.context_token
    assert meta["sampler_args_in_forward"] == [600, 0.96]  # the official forward's constants, which ours uses
    gen = torch.Generator().manual_seed(meta["tf_seed"])
    torch.manual_seed(meta["tf_seed"] + 1)
    torch.randn(fx.t(f"{c}.input.context").shape[0])  # the official cond-drop draw (we never drop in forward)
    trace: dict = {}
    with torch.no_grad():
        logits, diff_loss = model(
            fx.t(f"{c}.input.context").clone(), fx.t(f"{c}.input.x_BLCv_wo_first_l"), fx.t(f"{c}.input.context_position_ids"),
            fx.t(f"{c}.input.context_mask").bool(), last_layer_gt=fx.t(f"{c}.input.last_layer_gt"), vae=tok,
            generator=gen, trace=trace,
        )
    sel = fx.t(f"{c}.input.sel_positions")
    out = lambda n: fx.t(f"{c}.output.{n}")  # noqa: E731
    torch.testing.assert_close(logits[:, sel], out("logits_sel"), **HIDDEN_TOL)
    torch.testing.assert_close(logits.max(-1).values, out("logits_max"), **HIDDEN_TOL)
    torch.testing.assert_close(logits.logsumexp(-1), out("logits_logsumexp"), **HIDDEN_TOL)
    top2 = logits.topk(2, dim=-1).values
    ambiguous = (top2[..., 0] - top2[..., 1]) < 2 * HIDDEN_TOL["atol"]
    agree = logits.argmax(-1) == out("logits_argmax")
    assert bool((agree | ambiguous).all()), f"{int((~agree & ~ambiguous).sum())} argmax mismatches outside ties"
    for name, ref in (("blocks_input", "blocks_input_sel"), ("block0_output", "block0_output_sel"), ("hidden", "hidden_sel")):
        torch.testing.assert_close(trace[name][:, ctx - 1 :][:, sel], out(ref), **HIDDEN_TOL)
    torch.testing.assert_close(trace["idx_last_sampled"], out("idx_last_sampled"), **IDX_EXACT)
    sel_last = fx.t(f"{c}.input.sel_last_positions")
    torch.testing.assert_close(trace["diffusion_cond"][:, sel_last], out("diffusion_cond_sel"), **HIDDEN_TOL)
    torch.testing.assert_close(diff_loss.view(1), out("diff_loss"), atol=0, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- diffusion head
def test_diffusion_net(fx, model):
    c, net = _case_storing("out_cfg"), model.diffloss.net  # README: diffusion_net (net and forward_with_cfg)
    with torch.no_grad():
        out = net(fx.t(f"{c}.input.x"), fx.t(f"{c}.input.t"), fx.t(f"{c}.input.c"))
        out_cfg = net.forward_with_cfg(fx.t(f"{c}.input.x2"), fx.t(f"{c}.input.t2"), fx.t(f"{c}.input.c2"),
                                       fx.case(c)["cfg_scale"])
    torch.testing.assert_close(out, fx.t(f"{c}.output.out"), **NET_TOL)
    torch.testing.assert_close(out_cfg, fx.t(f"{c}.output.out_cfg"), **NET_TOL)


def test_diffusion_sample(fx, model):
    c = _case_storing("sample_nocfg")  # README: diffusion_sample (the 8-step sampler, with and without CFG)
    meta, z = fx.case(c), fx.t(f"{c}.input.z")
    assert model.diffloss.gen_diffusion.timestep_map == meta["timestep_map"]
    torch.manual_seed(meta["seed"] + 1)
    s = model.diffloss.sample(z, temperature=1.0, cfg=meta["cfg"])
    torch.manual_seed(meta["seed"] + 2)
    s1 = model.diffloss.sample(z[: fx.t(f"{c}.output.sample_nocfg").shape[0]], temperature=1.0, cfg=1.0)
    torch.testing.assert_close(s, fx.t(f"{c}.output.sample"), **SAMPLE_TOL)
    torch.testing.assert_close(s1, fx.t(f"{c}.output.sample_nocfg"), **SAMPLE_TOL)


# ---------------------------------------------------------------------------------------------- inference
class _StopAfter(Hooks):
    """Skips every scale from ``n`` on (no blocks, no sampling, no RNG draw): the earlier scales are unchanged."""

    def __init__(self, n: int) -> None:
        self.n = n

    def skip_scale(self, si: int) -> bool:
        return si >= self.n


def _stable_scales(fx, model, case: str) -> int:
    """The number of leading scales the official code itself reproduces: those before the first scale at
    which its sensitivity probe (the same call with an equivalent attention kernel, ~1e-6 apart) sampled
    another index. From that scale on, its outputs are bit-exactness checks only (README, tolerances)."""
    probe = fx.case(case)[PROBE]["idx_mismatches_per_scale"]
    assert len(probe) == len(model.patch_nums)
    return next((si for si, n in enumerate(probe) if n), len(probe))


def _stored_logit_scales(fx, model, case: str) -> tuple[str | None, int]:
    """The stored CFG logits of the first scales (``cfg_logits_first<n>``, if any) and how many scales they cover."""
    found = fx.matching(case, r"cfg_logits_first\d+")
    if not found:
        return None, 0
    name = f"{case}.output.{found[0].group(0)}"
    return name, _first_scales(model, fx.t(name).shape[1])


def _infer(fx, model, tok, case: str, decode: bool, stop_after: int | None = None) -> tuple[dict, torch.Tensor]:
    """Run a case with its own kwargs and seeds; ``stop_after``: generate only the first scales."""
    meta = fx.case(case)
    kw = meta["kwargs"]
    assert kw["num_maskgit_iters"] == 1 and kw["final_stage"] == 0
    assert [official_top_k(si) for si in range(len(model.patch_nums))] == [
        s["top_k_requested_by_official_code"] for s in meta["sampler_calls"]
    ]
    greedy = meta.get("greedy_override") is not None  # the fixture wrapped the sampler to force top_k = 1
    inp = lambda n: fx.t(f"{case}.input.{n}")  # noqa: E731
    hooks = model.hooks
    if stop_after is not None:
        if hooks is IDENTITY:
            model.hooks = _StopAfter(stop_after)
        else:  # an engine plan: also skip the scales from stop_after on (instance attribute, gone with the plan)
            plan_skip = hooks.skip_scale
            hooks.skip_scale = lambda si: si >= stop_after or plan_skip(si)
    torch.manual_seed(meta["global_seeds"]["torch_manual_seed"])
    trace: dict = {}
    try:
        out = model.autoregressive_infer(
            tok, inp("context"), inp("context_position_ids"), inp("context_mask").bool(), cfg=kw["cfg"],
            top_k=1 if greedy else None, top_p=kw.get("top_p", 0.0), g_seed=kw["g_seed"], more_smooth=kw["more_smooth"],
            trace=trace, decode=decode,
        )
    finally:
        if stop_after is not None and hooks is IDENTITY:
            model.hooks = IDENTITY
    return trace, out


def _first_scales(model, n_tokens: int) -> int:
    total, n = 0, 0
    while total < n_tokens:
        total += model.patch_nums[n] ** 2
        n += 1
    assert total == n_tokens
    return n


def _run_plan(fx, model, case: str) -> tuple[int, bool]:
    """How many scales to generate, and whether to decode: everything when the probe shows the official code
    stable on every scale (decoding where the case stores f_hat, the greedy one: the decoder is checked
    there and by the tokenizer cases, a decode costs seconds); otherwise the stable scales plus the stored
    logits, since nothing later can be compared."""
    sn, stable = len(model.patch_nums), _stable_scales(fx, model, case)
    if stable == sn:
        return sn, bool(fx.matching(case, "f_hat"))
    return min(sn, max(stable, _stored_logit_scales(fx, model, case)[1])), False


def _check_inference(fx, model, case: str, trace: dict, img: torch.Tensor | None) -> None:
    """Exact on the probe-stable scales (README tolerances); beyond them only well-formedness."""
    meta = fx.case(case)
    probe = meta[PROBE]
    out = lambda n: fx.t(f"{case}.output.{n}")  # noqa: E731
    sn, stable = len(model.patch_nums), _stable_scales(fx, model, case)
    ref_idx = _split(fx, out("idx_cat"), model.patch_nums)
    ran = len(trace["idx"])
    assert ran >= stable and len(trace["cfg_logits"]) == ran
    for si in range(stable):
        torch.testing.assert_close(trace["idx"][si], ref_idx[si], **IDX_EXACT, msg=f"{case}: tokens differ at scale {si}")
    key, n_logit_scales = _stored_logit_scales(fx, model, case)
    if key is not None:
        n = min(n_logit_scales, stable)
        ref = fx.t(key)[:, : sum(p * p for p in model.patch_nums[:n])]
        torch.testing.assert_close(torch.cat(trace["cfg_logits"][:n], 1), ref, **HIDDEN_TOL)
    # past the probe-stable scales the official code is not reproducible itself: only well-formedness
    V = model.head.out_features
    for si in range(stable, ran):
        assert trace["idx"][si].shape == ref_idx[si].shape and 0 <= int(trace["idx"][si].min()) <= int(trace["idx"][si].max()) < V
        assert bool(torch.isfinite(trace["cfg_logits"][si]).all())
    if stable < sn:
        return
    # every scale stable: the last stage (diffusion residual, f_hat, image) is compared too, each at the
    # README's tolerance unless the probe itself moved it by more (then only its shape and finiteness)
    sel = fx.t(f"{case}.input.sel_last_positions")
    torch.testing.assert_close(trace["diffusion_cond"][:, sel], out("diffusion_cond_sel"), **HIDDEN_TOL)
    assert trace["diffusion_cfg"] == pytest.approx(meta["diffusion_cfg_used"][0], rel=1e-12)  # the stale-ratio CFG
    comparable = [("residual", trace["residual"], probe["residual_max_abs_diff"], RESIDUAL_TOL)]
    if fx.matching(case, "f_hat"):
        # f_hat = discrete part + the diffusion residual, so it inherits the residual's sampler-clamp amplification
        # (README: residual atol 1e-3); CPUs with other fp32 accumulation orders land just above 1e-4
        comparable.append(("f_hat", trace["f_hat"], probe["residual_max_abs_diff"], RESIDUAL_TOL))
    if img is not None:
        comparable.append(("image", img, probe["image_max_abs_diff"], IMG_TOL))
    for name, ours, probe_diff, tol in comparable:
        if probe_diff <= tol["atol"]:
            torch.testing.assert_close(ours, out(name), **tol)
        else:
            assert ours.shape == out(name).shape and bool(torch.isfinite(ours).all())


@pytest.mark.parametrize("case", _inference_cases(fastvar=False))
def test_inference(fx, model, tok, case):
    """Greedy, sampled and more_smooth cases. With more_smooth the Gumbel path at low temperature amplifies
    1e-6 differences into token flips (the probe shows from which scale), so only the scales before that
    one and the stored first-scale logits are compared, and the later scales are not even generated."""
    n_run, decode = _run_plan(fx, model, case)
    trace, out = _infer(fx, model, tok, case, decode=decode, stop_after=n_run if n_run < len(model.patch_nums) else None)
    _check_inference(fx, model, case, trace, out if decode else None)


# ---------------------------------------------------------------------------------------------- FastVAR
@pytest.mark.parametrize("case", _inference_cases(fastvar=True))
def test_fastvar_inference(fx, model, tok, case):
    from fastvar.accel import apply, remove
    from fastvar.accel.presets import get_preset

    n_run, decode = _run_plan(fx, model, case)
    stable = _stable_scales(fx, model, case)
    hooks = apply(model, get_preset("fastvar", "hart"), record=True)
    try:
        trace, out = _infer(fx, model, tok, case, decode=decode, stop_after=n_run if n_run < len(model.patch_nums) else None)
    finally:
        remove(model)
    stored = [m for m in fx.matching(case, KEEP_IDX) if model.patch_nums.index(int(m.group(3))) < n_run]
    pruned = {si for si, _, _ in hooks.kept}
    # the engine prunes exactly at the (generated) scales the fixture stores kept indices for
    assert pruned == {model.patch_nums.index(int(m.group(3))) for m in stored}
    for m in stored:
        layer, branch, side = int(m.group(1)), m.group(2), int(m.group(3))
        si = model.patch_nums.index(side)
        if si >= stable:
            continue  # from the probe's first flipped scale on, the official code does not reproduce itself
        ref = fx.t(f"{case}.output.{m.group(0)}")
        ours = hooks.kept[(si, layer, branch)]
        # Compared as sets, per batch row. The official order is a non-stable argsort(descending=True) of the
        # scores, so among (near-)tied scores it is not defined (sort kernel, last-ulp rounding of the scores;
        # cases.json records the boundary gap, not the gaps inside the kept set). Nothing downstream depends on
        # it beyond summation order: the kept tokens go through per-token ops and unmasked attention and are
        # scattered back by index, and the kept k/v enter the cache as a set (tokens and outputs are compared
        # below). WHICH tokens are kept is defined and changes the result: exactly equal.
        assert ours.shape == ref.shape, f"block {layer} {branch}: {ours.shape[-1]} kept at {side}², official {ref.shape[-1]}"
        assert torch.equal(ours.sort(-1).values, ref.sort(-1).values), f"block {layer} {branch} kept set differs at {side}²"
    _check_inference(fx, model, case, trace, out if decode else None)
