"""VAR transformer parity against the official code (fixtures in $FASTVAR_PARITY_DIR/var/tiny).

Every size, label, seed and sampling setting comes from the fixture JSON; tolerances are the README's.
"""

from __future__ import annotations

import pytest
import torch

from fastvar.models.var import VAR

from .conftest import load_fixture, nonempty

PARITY_MODEL = "var"  # the fixture folder (conftest reads its thread count)

LOGIT_TOL = dict(atol=1e-4, rtol=1e-5)


def fix():
    return load_fixture("var")


def sub_model(cls: str) -> str:
    """The one sub-model of config.json built from the official class ``cls`` (e.g. ``VQVAE``)."""
    found = [k for k, v in fix().config["sub_models"].items() if v["class_"].rsplit(".", 1)[-1] == cls]
    assert len(found) == 1, f"config.json: expected one {cls} sub-model, found {found}"
    return found[0]


def the_case(pattern: str) -> str:
    """The one case that stores an output named like ``pattern`` (case names are not hard-coded)."""
    found = fix().cases_storing(pattern)
    assert len(found) == 1, f"expected one case storing {pattern!r}, found {found}"
    return found[0]


def build_var(name: str) -> VAR:
    f = fix()
    sub = f.config["sub_models"][name]
    kw = sub["constructor_kwargs"]
    vae_kw = f.config["sub_models"][sub_model("VQVAE")]["constructor_kwargs"]
    model = VAR(
        vocab_size=vae_kw["vocab_size"], cvae=vae_kw["z_channels"], num_classes=kw["num_classes"],
        depth=kw["depth"], embed_dim=kw["embed_dim"], num_heads=kw["num_heads"], patch_nums=kw["patch_nums"],
        mlp_ratio=kw["mlp_ratio"], shared_aln=kw["shared_aln"], norm_eps=kw["norm_eps"],
        attn_l2_norm=kw["attn_l2_norm"], drop_path_rate=kw.get("drop_path_rate", 0.0),
    )
    model.load_state_dict(f.weights_with_prefix(sub["weights_prefix"]), strict=True)
    for k, v in sub.get("runtime_overrides", {}).items():
        if k != "eval":
            setattr(model, k, v)
    return model.eval()


def build_vae():
    from fastvar.tokenizers.vqvae import VQVAE

    f = fix()
    sub = f.config["sub_models"][sub_model("VQVAE")]
    kw = dict(sub["constructor_kwargs"])
    vae = VQVAE(
        vocab_size=kw["vocab_size"], z_channels=kw["z_channels"], ch=kw["ch"],
        share_quant_resi=kw["share_quant_resi"], patch_nums=kw["v_patch_nums"],
    )
    vae.load_state_dict(f.weights_with_prefix(sub["weights_prefix"]), strict=True)
    return vae.eval()


@pytest.mark.parametrize("case", nonempty(fix().cases_storing("logits_BLV"), "teacher-forcing case"))
def test_teacher_forcing_logits(case):
    f = fix()
    meta = f.case(case)
    model = build_var(meta["model"])
    with torch.inference_mode():
        logits = model(f.t(f"{case}.input.label_B"), f.t(f"{case}.input.x_BLCv_wo_first_l"))
    torch.testing.assert_close(logits, f.t(f"{case}.output.logits_BLV"), **LOGIT_TOL)


def _infer_cases():
    """The autoregressive_infer_cfg cases: those whose JSON records the sampling call's g_seed."""
    return nonempty([c for c in fix().case_names() if "g_seed" in fix().case(c)], "inference case")


def _assert_logits(ours: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float = 1e-5):
    inf_ref = torch.isinf(ref)
    assert torch.equal(torch.isinf(ours), inf_ref), "-inf (filtered) positions differ"
    torch.testing.assert_close(ours[~inf_ref], ref[~inf_ref], atol=atol, rtol=rtol)


@pytest.mark.parametrize("case", _infer_cases())
def test_autoregressive_inference(case):
    f = fix()
    meta = f.case(case)
    model, vae = build_var(meta["model"]), build_vae()
    smooth = bool(meta["more_smooth"])
    label_key = f"{case}.input.label_B"
    labels = f.t(label_key) if label_key in f.tensors else None
    trace: dict = {}
    with torch.inference_mode():
        img = model.autoregressive_infer(
            vae, B=meta["B"], label_B=labels, cfg=meta["cfg"], top_k=meta["top_k"], top_p=meta["top_p"],
            g_seed=meta["g_seed"], more_smooth=smooth, trace=trace,
        )
    if labels is None:
        assert torch.equal(trace["label_B"], f.t(f"{case}.output.label_B_drawn"))
    ref_idx = f.per_scale(f"{case}.output.idx")
    assert len(ref_idx) == len(trace["idx"]) == len(model.patch_nums)
    for si, ref in enumerate(ref_idx):
        assert torch.equal(trace["idx"][si].view_as(ref), ref), f"sampled tokens differ at scale {si}"
    for si, ref in enumerate(f.per_scale(f"{case}.output.raw_logits")):
        torch.testing.assert_close(trace["raw_logits"][si], ref, **LOGIT_TOL)
    guided_atol = 2e-3 if smooth else 1e-4
    for si, ref in enumerate(f.per_scale(f"{case}.output.guided_logits")):
        _assert_logits(trace["guided_logits"][si], ref, guided_atol)
    for si, ref in enumerate(f.per_scale(f"{case}.output.filtered_logits")):
        _assert_logits(trace["filtered_logits"][si], ref, guided_atol)
    img_atol = 2e-4 if smooth else 1e-4
    torch.testing.assert_close(trace["fhat"], f.t(f"{case}.output.fhat"), atol=img_atol, rtol=0)
    torch.testing.assert_close(img, f.t(f"{case}.output.img"), atol=img_atol, rtol=0)


# ---------------------------------------------------------------------------------------------- VQVAE
VAE_TOL = dict(atol=1e-4, rtol=0)


def build_quantizer():
    from fastvar.tokenizers.vqvae import MultiScaleVQ

    f = fix()
    sub = f.config["sub_models"][sub_model("VectorQuantizer2")]
    kw = sub["constructor_kwargs"]
    q = MultiScaleVQ(kw["vocab_size"], kw["Cvae"], kw["v_patch_nums"], kw["quant_resi"], kw["share_quant_resi"], kw["beta"])
    q.load_state_dict(f.weights_with_prefix(sub["weights_prefix"]), strict=True)
    return q.eval()


def _encode_case() -> str:
    return the_case(r"recon_s\d+")  # README: vqvae_encode (img_to_reconstructed_img's last element)


def _quant_case() -> str:
    return the_case("embed_to_fhat_last")  # README: the stand-alone quantizer on a real schedule


def test_phi_index_per_scale_matches_fixture():
    f = fix()
    vae, quant = build_vae(), build_quantizer()
    sn_vae = len(vae.patch_nums)
    assert [vae.quantize.quant_resi.index(si, sn_vae) for si in range(sn_vae)] == f.case(_encode_case())["phi_index_per_scale"]
    meta = f.case(_quant_case())
    sn = len(meta["patch_nums"])
    assert [quant.quant_resi.index(si, sn) for si in range(sn)] == meta["phi_index_per_scale"]


def test_vqvae_encode():
    f = fix()
    vae = build_vae()
    case = _encode_case()
    img = f.t(f"{case}.input.img")
    with torch.inference_mode():
        feat = vae.img_to_f(img)
        idx = vae.img_to_idx(img)
        fhats = vae.quantize.encode(feat, to_fhat=True)
        recon = vae.img_to_reconstructed_img(img, last_one=True)
    out = f"{case}.output"
    sn = len(vae.patch_nums)
    ref_idx, ref_fhat = f.per_scale(f"{out}.idx"), f.per_scale(f"{out}.fhat")
    assert len(ref_idx) == len(ref_fhat) == len(idx) == sn
    torch.testing.assert_close(feat, f.t(f"{out}.f"), **VAE_TOL)
    for si, ref in enumerate(ref_idx):
        assert torch.equal(idx[si], ref), f"VQ codes differ at scale {si}"
    for si, ref in enumerate(ref_fhat):
        torch.testing.assert_close(fhats[si], ref, **VAE_TOL)
    # only the last element of img_to_reconstructed_img(last_one=False) is stored: recon_s<last scale>
    (recon_name,) = f.matching(case, r"recon_s(\d+)")
    assert int(recon_name.group(1)) == sn - 1, f"{recon_name.group(0)} is not the last of {sn} scales"
    torch.testing.assert_close(recon, f.t(f"{out}.{recon_name.group(0)}"), **VAE_TOL)


def test_vqvae_decode():
    f = fix()
    vae = build_vae()
    case = the_case(r"img_all_s\d+")  # README: vqvae_decode (idxBl_to_img(last_one=False), some elements stored)
    idx = f.per_scale(f"{case}.input.idx")
    assert len(idx) == len(vae.patch_nums)
    with torch.inference_mode():
        imgs = vae.idx_to_img(idx, last_one=False)
        last = vae.idx_to_img(idx, last_one=True)
        fhat_last = vae.idx_to_fhat(idx, last_one=True)
    stored = {int(m.group(1)): m.group(0) for m in f.matching(case, r"img_all_s(\d+)")}
    assert len(idx) - 1 in stored, f"the last scale's image is not among {sorted(stored)}"
    for si, name in stored.items():
        torch.testing.assert_close(imgs[si], f.t(f"{case}.output.{name}"), **VAE_TOL)
    assert torch.equal(last, imgs[-1])  # last_one=True is the last element of last_one=False
    torch.testing.assert_close(fhat_last, f.t(f"{case}.output.fhat_last"), **VAE_TOL)


def test_quantizer_on_a_real_multiscale_schedule():
    f = fix()
    case = _quant_case()
    meta = f.case(case)
    q = build_quantizer()
    assert list(q.patch_nums) == list(meta["patch_nums"])
    feat = f.t(f"{case}.input.f")
    with torch.inference_mode():
        idx = q.encode(feat)
        fhats = q.encode(feat, to_fhat=True)
        var_in = q.idx_to_var_input(idx)
        B, C = feat.shape[:2]
        ms_h = [q.embedding(i).transpose(1, 2).reshape(B, C, pn, pn) for i, pn in zip(idx, meta["patch_nums"])]
        fhat_e = q.embed_to_fhat(ms_h, last_one=True)
        # scale-by-scale inference steps give the teacher-forcing inputs exactly
        f_hat = torch.zeros_like(feat)
        nexts = []
        for si, h in enumerate(ms_h):
            f_hat, nxt = q.next_autoregressive_input(si, len(ms_h), f_hat, h)
            if si < len(ms_h) - 1:
                nexts.append(nxt.view(B, C, -1).transpose(1, 2))
    out = f"{case}.output"
    ref_idx, ref_fhat = f.per_scale(f"{out}.idx"), f.per_scale(f"{out}.fhat")
    assert len(ref_idx) == len(ref_fhat) == len(idx) == len(meta["patch_nums"])
    for si, ref in enumerate(ref_idx):
        assert torch.equal(idx[si], ref), f"VQ codes differ at scale {si}"
    for si, ref in enumerate(ref_fhat):
        torch.testing.assert_close(fhats[si], ref, **VAE_TOL)
    torch.testing.assert_close(var_in, f.t(f"{out}.var_input"), **VAE_TOL)
    torch.testing.assert_close(fhat_e, f.t(f"{out}.embed_to_fhat_last"), **VAE_TOL)
    assert torch.equal(torch.cat(nexts, 1), var_in)
    torch.testing.assert_close(f_hat, fhats[-1], atol=meta["checks"]["ar_fhat_vs_f_to_fhat"] * 2 + 1e-7, rtol=0)
