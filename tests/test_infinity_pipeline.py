"""InfinityPipeline end to end on tiny random files written in the official layouts (no download).

A tiny Infinity (flat state dict, like ``infinity_2b_reg.pth``), a tiny BSQ-VAE (top-level ``'vae'``, like
``infinity_vae_d32reg.pth``) and a tiny Flan-T5 folder (``save_pretrained`` of a random T5 encoder and an
in-process word-level tokenizer) go through ``from_pretrained`` exactly as the released files would.
Generation runs at 0.06M (7 scales, 256x256 images) except one latent-only run of the fastvar preset at
1M, where the preset actually prunes and skips.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fastvar.accel import AccelPlan
from fastvar.accel.cache_presets import get_cache_preset
from fastvar.checkpoints import CheckpointError
from fastvar.models.infinity import build_infinity
from fastvar.models.registry import get_spec
from fastvar.pipelines import load_pipeline
from fastvar.pipelines.infinity import InfinityPipeline, random_text_features, resolve_aspect, resolve_pn
from fastvar.tokenizers.bsq import BSQVAE, BSQVAEConfig

from ._tiny_text import tiny_t5, word_tokenizer

WORDS = ["<pad>", "</s>", "<unk>", "a", "red", "fox", "in", "the", "snow", "blue", "house"]
ARCH = dict(depth=4, embed_dim=64, num_heads=2, text_channels=32, text_maxlen=16, d_vae=16, block_chunks=2)
VAE_CFG = BSQVAEConfig(16, patch_size=16, base_ch=32, num_res_blocks=1, encoder_ch_mult=(1,) * 5,
                       decoder_ch_mult=(1,) * 5)
PROMPTS = ["a red fox in the snow", "a blue house"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("infinity")
    model = build_infinity("infinity-2b", seed=0, **ARCH)
    torch.save(model.state_dict(), root / "infinity_tiny.pth")  # flat, un-prefixed: the official layout
    torch.manual_seed(0)
    vae = BSQVAE(VAE_CFG)
    torch.save({"vae": vae.state_dict()}, root / "infinity_vae_tiny.pth")  # top-level 'vae' like the releases
    t5 = root / "flan-t5-tiny"
    tiny_t5(len(WORDS), ARCH["text_channels"]).save_pretrained(t5)
    word_tokenizer(WORDS, "t5").save_pretrained(t5)
    return {"weights": root / "infinity_tiny.pth", "vae": root / "infinity_vae_tiny.pth", "t5": t5, "root": root}


def _load(files: dict, **kw) -> InfinityPipeline:
    args = dict(weights=str(files["weights"]), vae_weights=str(files["vae"]), text_encoder=str(files["t5"]),
                device="cpu", pn="0.06M", vae_config=VAE_CFG, **ARCH)
    args.update(kw)
    return InfinityPipeline.from_pretrained("infinity-2b", **args)


@pytest.fixture(scope="module")
def pipe(files) -> InfinityPipeline:
    return _load(files)


@pytest.fixture(scope="module")
def baseline(pipe):
    return pipe(PROMPTS, seed=1)


# ----------------------------------------------------------------------------------------- loading + generation


def test_from_pretrained_generates_images(pipe, baseline):
    assert pipe.family == "infinity" and pipe.device.type == "cpu" and pipe.image_size == (256, 256)
    assert pipe.text_encoder.max_length == ARCH["text_maxlen"]
    assert pipe.defaults["cfg"] == 3.0 and pipe.defaults["tau"] == 0.5
    imgs = baseline.images
    assert imgs.shape == (2, 3, 256, 256) and imgs.dtype == torch.float32 and imgs.device.type == "cpu"
    assert 0.0 <= float(imgs.min()) and float(imgs.max()) <= 1.0
    assert baseline.latent.shape == (2, 16, 16, 16)
    assert baseline.seconds > 0 and baseline.stats["executed_scales"] == list(range(7))
    assert baseline.stats["plan"] == "none"


def test_seed_determinism(pipe, baseline):
    again = pipe(PROMPTS, seed=1)
    assert torch.equal(again.images, baseline.images)
    other = pipe(PROMPTS, seed=2, decode=False)
    assert other.images is None and not torch.equal(other.latent, baseline.latent)
    # different prompts, different images
    assert not torch.equal(baseline.latent[0], baseline.latent[1])


def test_fastvar_preset_and_custom_pruning(pipe, baseline):
    # 0.06M (up to 16x16) is not an official budget: the preset follows its positions instead of doing nothing
    res = pipe(PROMPTS, seed=1, plan="fastvar", record=True)
    assert res.stats["plan"] == "fastvar" and res.stats["total_flops"] < baseline.stats["total_flops"]
    assert not torch.equal(res.images, baseline.images)
    plan = AccelPlan(name="prune-tiny", keep={"12": 0.6, "16": 0.5}, cache_scale="8", layers=(1, 4))
    pruned = pipe(PROMPTS, seed=1, plan=plan, record=True)
    assert pruned.images.shape == baseline.images.shape
    kept = pruned.stats["hooks"].kept
    assert kept[(6, 1, "attn")].shape == (4, 128)  # CFG-doubled batch, 256 - int(256 * 0.5) tokens
    assert pruned.stats["total_flops"] < baseline.stats["total_flops"]
    assert torch.equal(pipe(PROMPTS, seed=1, plan=plan).images, pruned.images)


def test_fastvar_preset_at_1m_prunes_and_skips(files):
    pipe = _load(files, pn="1M")
    res = pipe(PROMPTS[:1], seed=0, plan="fastvar", decode=False, record=True)
    assert res.stats["executed_scales"] == list(range(11))  # 48x48 and 64x64 skipped
    assert res.latent.shape == (1, 16, 64, 64)
    kept = res.stats["hooks"].kept
    assert kept[(9, 3, "ffn")].shape == (2, 615) and kept[(10, 3, "cross")].shape == (2, 800)
    assert (9, 2, "attn") not in kept  # layers 3..27 only


def test_caching_plan_calibrate_then_infer(pipe, baseline, tmp_path):
    sim = tmp_path / "sim.json"
    cal = AccelPlan(name="cache", cache=get_cache_preset("original", pipe.schedule, calibration=True, sim_path=str(sim)))
    res = pipe(PROMPTS, seed=1, plan=cal)
    assert torch.equal(res.images, baseline.images) and sim.is_file()  # calibration computes everything
    inf = dataclasses.replace(cal, cache=dataclasses.replace(cal.cache, calibration=False, threshold=0.0))
    a = pipe(PROMPTS, seed=1, plan=inf, record=True)
    b = pipe(PROMPTS, seed=1, plan=inf)
    assert a.images.shape == (2, 3, 256, 256) and torch.equal(a.images, b.images)
    assert a.stats["hooks"].statistics()["hit_rate"] > 0
    assert not torch.equal(a.images, baseline.images)


def test_negative_prompt_and_overrides(pipe, baseline):
    res = pipe(PROMPTS, seed=1, negative_prompt="blue", decode=False)
    assert not torch.equal(res.latent, baseline.latent)
    assert torch.equal(pipe(PROMPTS, seed=1, cfg=3.0, tau=0.5, top_k=900, top_p=0.97, decode=False).latent,
                       baseline.latent)


# ----------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("key", "flag"), [("weights", "--weights"), ("vae_weights", "--vae-weights"),
                                           ("text_encoder", "--text-encoder")])
def test_missing_files_name_the_flag(files, key, flag):
    with pytest.raises(FileNotFoundError, match=flag):
        _load(files, **{key: str(files["root"] / "missing" / "nothing.pth")})


def test_offline_hub_fails_fast_naming_the_flag(files, monkeypatch):
    import huggingface_hub

    import fastvar.pipelines.infinity as inf

    def offline(*a, **k):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)  # no cache hit, no download
    monkeypatch.setattr(inf, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(ConnectionError, match="--vae-weights"):
        _load(files, vae_weights="FoundationVision/Infinity:infinity_vae_d32reg.pth")
    with pytest.raises(ConnectionError, match="--weights .*infinity_2b_reg.pth"):
        _load(files, weights=None)  # the registry default: FoundationVision/Infinity:infinity_2b_reg.pth
    with pytest.raises(ConnectionError, match="--text-encoder"):
        _load(files, text_encoder="fastvar-tests/no-such-t5")  # a hub id that no cache holds


def test_wrong_checkpoint_names_flag(files):
    with pytest.raises(CheckpointError, match="--weights"):
        _load(files, depth=2, block_chunks=1)


def test_registry_hub_defaults():
    spec = get_spec("infinity-2b")
    assert spec.weights == "FoundationVision/Infinity:infinity_2b_reg.pth"
    assert spec.vae_weights == "FoundationVision/Infinity:infinity_vae_d32reg.pth"
    assert spec.text_encoder == "google/flan-t5-xl" and get_spec("infinity") is spec
    assert get_spec("infinity-8b").weights.endswith(":infinity_8b_weights")
    assert get_spec("infinity-layer12").weights is None


def test_pn_and_aspect_validation():
    assert [resolve_pn(p) for p in ("0.06M", "0.25m", "0.6M", "0.60M", "1M", "2k")] == [
        "0.06M", "0.25M", "0.60M", "0.60M", "1M", "2K"]
    with pytest.raises(ValueError, match="0.06M, 0.25M, 0.60M, 1M, 2K"):
        resolve_pn("3M")
    assert resolve_aspect("1:1") == 1.0 and resolve_aspect("4:3") == 0.75 and resolve_aspect("16:9") == 0.571
    with pytest.raises(ValueError, match="1:1"):
        resolve_aspect("10:1")
    with pytest.raises(ValueError, match="W:H"):
        resolve_aspect("wide")


# ----------------------------------------------------------------------------------------- random init (bench)


def test_random_init_prompts_are_reproducible():
    a = random_text_features(["prompt 0", "prompt 1"], 5, 8)
    b = random_text_features(["prompt 1"], 5, 8)
    assert a.lens == [5, 5] and torch.equal(a.kv_compact[5:], b.kv_compact)
    pipe = load_pipeline(get_spec("infinity"), random_init=True, device="cpu", pn="0.06M", aspect="3:4",
                         depth=3, embed_dim=64, num_heads=2, text_channels=32, text_tokens=6, width=None)
    h, w = pipe.schedule.sizes[-1]
    assert pipe.model.cfg.block_chunks == 1 and h / w == pytest.approx(4 / 3)  # W:H = 3:4 is portrait
    prompts = [f"prompt {i}" for i in range(2)]
    r1, r2 = pipe(prompts, seed=0, decode=False), pipe(prompts, seed=0, decode=False)
    assert torch.equal(r1.latent, r2.latent) and r1.latent.shape == (2, 32, h, w)
    img = pipe.decode(r1.latent)
    assert img.shape == (2, 3, h, w) and 0 <= float(img.min()) and float(img.max()) <= 1
    with pytest.raises(ValueError, match="--random-init"):
        load_pipeline(get_spec("infinity"), weights="x.pth", random_init=True)


# ----------------------------------------------------------------------------------------- optimised paths


def test_rope_pair_tables_match_the_pairwise_rotation_bit_for_bit():
    """apply_rope2d computes t·cos2 + swap(t)·sin2; it must equal (cos·a − sin·b, sin·a + cos·b) exactly."""
    from fastvar.models.infinity_layers import apply_rope2d, rope_pair_tables

    g = torch.Generator().manual_seed(0)
    B, H, L, c = 2, 3, 20, 8
    qkv = torch.randn(B, L, 3, H, c, generator=g)
    q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # non-contiguous, as in the model
    cos, sin = torch.randn(L, c // 2, generator=g), torch.randn(L, c // 2, generator=g)

    def reference(t, cos, sin):
        tf = t.contiguous().reshape(*t.shape[:-1], -1, 2)
        a, b = tf[..., 0], tf[..., 1]
        return torch.stack([cos * a - sin * b, sin * a + cos * b], dim=-1).reshape(t.shape)

    cos2, sin2 = rope_pair_tables(cos, sin)
    rq, rk = apply_rope2d(q, k, cos2, sin2)
    assert torch.equal(rq, reference(q, cos, sin)) and torch.equal(rk, reference(k, cos, sin)) and rq.is_contiguous()
    idx = torch.stack([torch.randperm(L, generator=g)[:7] for _ in range(B)])  # pruned: per-row gathered tables
    qs = q.gather(2, idx[:, None, :, None].expand(B, H, 7, c))
    rq, _ = apply_rope2d(qs, qs, cos2[idx].unsqueeze(1), sin2[idx].unsqueeze(1))
    assert torch.equal(rq, reference(qs, cos[idx].unsqueeze(1), sin[idx].unsqueeze(1)))


def test_pruned_branch_restores_like_gather_and_scatter():
    """PlanHooks moves kept rows with index_select / index_copy_; the result equals gather / scatter_."""
    from fastvar.accel.pruning import PlanHooks, pivotal_indices, resize_tokens

    plan = AccelPlan(name="p", keep={"4": 0.5}, cache_scale="2", interp="area")
    hooks = PlanHooks(plan, depth=1)
    hooks.begin([(1, 1), (2, 2), (4, 4)], 2)
    g = torch.Generator().manual_seed(0)
    fn = lambda t, idx: t * 2.0 + 1.0  # noqa: E731
    hooks.begin_scale(1, (2, 2))
    cached = hooks.branch(0, "ffn", torch.randn(2, 4, 6, generator=g), fn)
    hooks.begin_scale(2, (4, 4))
    x = torch.randn(2, 16, 6, generator=g)
    out = hooks.branch(0, "ffn", x, fn)
    idx = pivotal_indices(x, (4, 4), 8)
    gidx = idx.unsqueeze(-1).expand(-1, -1, 6)
    ref = resize_tokens(cached, (2, 2), (4, 4), "area").scatter_(1, gidx, fn(torch.gather(x, 1, gidx), idx))
    assert torch.equal(out, ref) and hooks.counts[(2, 0, "ffn")] == (16, 8)
