"""VAR transformer parity against the official code (fixtures in $FASTVAR_PARITY_DIR/var/tiny).

Every size, label, seed and sampling setting comes from the fixture JSON; tolerances are the README's.
"""

from __future__ import annotations

import pytest
import torch

from fastvar.models.var import VAR

from .conftest import load_fixture

LOGIT_TOL = dict(atol=1e-4, rtol=1e-5)


def fix():
    return load_fixture("var")


def build_var(name: str) -> VAR:
    f = fix()
    sub = f.config["sub_models"][name]
    kw = sub["constructor_kwargs"]
    vae_kw = f.config["sub_models"]["vae"]["constructor_kwargs"]
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
    sub = f.config["sub_models"]["vae"]
    kw = dict(sub["constructor_kwargs"])
    vae = VQVAE(
        vocab_size=kw["vocab_size"], z_channels=kw["z_channels"], ch=kw["ch"],
        share_quant_resi=kw["share_quant_resi"], patch_nums=kw["v_patch_nums"],
    )
    vae.load_state_dict(f.weights_with_prefix(sub["weights_prefix"]), strict=True)
    return vae.eval()


@pytest.mark.parametrize("case", ["var_forward", "var_forward_uncond", "var_saln_forward"])
def test_teacher_forcing_logits(case):
    f = fix()
    meta = f.case(case)
    model = build_var(meta["model"])
    with torch.inference_mode():
        logits = model(f.t(f"{case}.input.label_B"), f.t(f"{case}.input.x_BLCv_wo_first_l"))
    torch.testing.assert_close(logits, f.t(f"{case}.output.logits_BLV"), **LOGIT_TOL)


def _infer_cases():
    return [k for k in fix().cases["cases"] if "_infer_" in k]


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
    for si, ref in enumerate(f.per_scale(f"{case}.output.idx")):
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
