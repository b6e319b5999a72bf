"""HARTPipeline: random init, the official folder layout through from_pretrained (tiny random models, no
download), seeded determinism, plans (FastVAR preset, pruning, feature caching) and fail-fast errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from fastvar.accel import AccelPlan, CacheConfig
from fastvar.models.hart import HART, HARTConfig
from fastvar.pipelines.hart import HARTPipeline, random_context

from ._tiny_text import tiny_qwen2, word_tokenizer

# The three largest scales are the real ones, so the `fastvar` preset (48 and 64, cached from 36) prunes.
PATCH_NUMS = (1, 2, 36, 48, 64)
TINY = dict(depth=2, embed_dim=16, num_heads=1, text_tokens=8, text_channels=16, diff_width=16, diff_depth=1,
            vocab_size=32, cvae=4, patch_nums=PATCH_NUMS)
WORDS = ["<|endoftext|>", "<unk>", "a", "red", "cat", "on", "the", "mat", "given", "prompt", ":"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe() -> HARTPipeline:
    return HARTPipeline.random_init("hart-0.7b", device="cpu", seed=0, **TINY)


@pytest.fixture(scope="module")
def base(pipe):
    return pipe(["a red cat"], seed=3, decode=False)


# ---------------------------------------------------------------------------------------------- random init
def test_random_init_shapes_and_defaults(pipe, base):
    cfg = pipe.model.config
    assert (cfg.depth, cfg.embed_dim, cfg.num_heads, cfg.context_token, cfg.context_dim) == (2, 16, 1, 8, 16)
    assert pipe.defaults == dict(cfg=4.5, top_k=None, top_p=0.0, more_smooth=True, diffusion_steps="8")
    assert base.images is None and base.latent.shape == (1, 4, 64, 64)
    s = base.stats
    assert s["plan"] == "none" and s["seconds"] > 0 and s["total_flops"] > 0
    assert s["tokens_forwarded"] == s["tokens_total"] == sum(p * p for p in PATCH_NUMS) * 2 * 2  # 2 layers x 2 branches
    img = pipe.decode(base.latent)
    assert img.shape == (1, 3, 64, 64) and img.dtype == torch.float32 and 0 <= img.min() and img.max() <= 1


def test_full_size_architecture_builds_on_meta():
    # random_init's default is the released architecture; building it for real takes 3 GB, so check the config.
    from fastvar.models.hart import hart_config

    cfg = hart_config("hart-0.7b")
    with torch.device("meta"):
        sd = HART(cfg).state_dict()
    n = sum(v.numel() for k, v in sd.items() if k not in ("lvl_1L", "attn_bias_for_masking"))
    assert n == 732_436_032 and cfg.context_token == 300 and cfg.context_dim == 1536


def test_width_override_keeps_head_dim_64():
    p = HARTPipeline.random_init(device="cpu", depth=1, embed_dim=128, text_tokens=4, text_channels=8, diff_width=8,
                                 diff_depth=1, vocab_size=16, cvae=4, patch_nums=(1, 2))
    assert p.model.num_heads == 2 and p.model.head_dim == 64


def test_seeded_generation_is_deterministic(pipe, base):
    again = pipe(["a red cat"], seed=3, decode=False)
    assert torch.equal(again.latent, base.latent)
    other_seed = pipe(["a red cat"], seed=4, decode=False)
    other_prompt = pipe(["a blue dog"], seed=3, decode=False)
    assert not torch.equal(other_seed.latent, base.latent) and not torch.equal(other_prompt.latent, base.latent)


def test_random_context_depends_on_prompt_only():
    f1, p1 = random_context(["a red cat", "x"], 8, 16)
    f2, p2 = random_context(["a red cat"], 8, 16)
    assert torch.equal(f1[:1], f2) and torch.equal(p1[:1], p2)
    assert p1[0].tolist() == [0, 1, 2, 2, 2, 2, 2, 2] and p1[1].tolist() == [0] * 8


def test_batch_of_prompts(pipe):
    two = pipe(["a red cat", "a mat"], seed=0, decode=False)
    assert two.latent.shape == (2, 4, 64, 64) and not torch.equal(two.latent[0], two.latent[1])
    assert two.stats["tokens_total"] == sum(p * p for p in PATCH_NUMS) * 2 * 2  # per row pair, not per batch


# ---------------------------------------------------------------------------------------------- plans
def test_fastvar_preset_prunes_48_and_64(pipe, base):
    fast = pipe(["a red cat"], seed=3, plan="fastvar", decode=False, record=True)
    hooks = fast.stats["hooks"]
    si48, si64 = PATCH_NUMS.index(48), PATCH_NUMS.index(64)
    assert hooks.kept[(si48, 0, "attn")].shape == (2, 48 * 48 - int(48 * 48 * 0.5))  # CFG rows select separately
    assert hooks.kept[(si64, 1, "ffn")].shape == (2, 64 * 64 - int(64 * 64 * 0.75))
    assert fast.stats["plan"] == "fastvar" and fast.stats["total_flops"] < 0.5 * base.stats["total_flops"]
    assert fast.latent.shape == base.latent.shape and torch.isfinite(fast.latent).all()
    assert not torch.equal(fast.latent, base.latent)
    # an identity plan keeps every token: bit-identical to no plan
    ident = pipe(["a red cat"], seed=3, plan="identity", decode=False)
    assert torch.equal(ident.latent, base.latent)


def test_flops_count_the_diffusion_head(pipe, base):
    """The residual diffusion head runs on every last-scale token of both CFG rows at every step, whatever the
    plan: FLOP-predicted speedups must include it (it is most of a narrow model's time)."""
    m = pipe.model
    net = m.diffloss.net
    macs = sum(mod.in_features * mod.out_features for mod in net.modules() if isinstance(mod, torch.nn.Linear))
    per_row = 64 * 64 * (8 * 2 * macs + 2 * m.Cvae * m.C)
    assert m.flop_dims().tail_flops == per_row and base.stats["tail_flops"] == 2 * per_row
    fast = pipe(["a red cat"], seed=3, plan="fastvar", decode=False)
    assert fast.stats["tail_flops"] == base.stats["tail_flops"]
    skip = pipe(["a red cat"], seed=3, plan="skip-last", decode=False)  # no last scale: no diffusion head
    assert skip.stats["tail_flops"] == 0


def test_feature_caching_plan(pipe, base):
    cache = CacheConfig(cache_stages=("1296",), skip_stages=("4096",), calibration=True)
    calib = pipe(["a red cat"], seed=3, plan=AccelPlan(name="calib", cache=cache), decode=False, record=True)
    assert torch.equal(calib.latent, base.latent)  # calibration computes every branch fresh
    sim = calib.stats["hooks"].similarity
    assert len(sim) == 2 * 2  # (layer, branch) pairs recorded at the 64x64 stage
    reuse = CacheConfig(cache_stages=("1296",), skip_stages=("4096",), threshold=0.0)
    from fastvar.accel.caching import CachingHooks

    hooks = CachingHooks(AccelPlan(name="reuse", cache=reuse), pipe.model.depth, similarity=sim)
    pipe.model.hooks = hooks
    try:
        out = pipe(["a red cat"], seed=3, decode=False)  # plan=None keeps the installed hooks
    finally:
        from fastvar.accel import remove

        remove(pipe)
    assert sum(map(sum, hooks.hits.values())) == 4 and out.stats["total_flops"] < base.stats["total_flops"]
    assert torch.isfinite(out.latent).all()


# ---------------------------------------------------------------------------------------------- official folders
def _tiny_qwen(folder):
    tiny_qwen2(len(WORDS), layers=1, max_positions=512).save_pretrained(folder)
    word_tokenizer(WORDS, "qwen").save_pretrained(folder)
    return folder


def _write_official(root, seed: int = 0):
    """The hart-0.7b-1024px layout: llm/{config.json, model.safetensors, ema_model.bin}, tokenizer/{...}."""
    from fastvar.tokenizers.hart_tokenizer import HARTTokenizer

    torch.manual_seed(seed)
    cfg = HARTConfig(context_token=8, context_dim=16, depth=2, embed_dim=16, num_heads=1, patch_nums=PATCH_NUMS,
                     diff_width=16, diff_depth=1, vocab_size=32, cvae=4)
    model = HART(cfg)
    tok = HARTTokenizer(vocab_size=32, z_channels=4, ch=32, ch_mult=(1, 1), patch_nums=PATCH_NUMS)
    llm, tdir = root / "llm", root / "tokenizer"
    llm.mkdir(parents=True)
    tdir.mkdir()
    (llm / "config.json").write_text(json.dumps(dict(cfg.to_dict(), model_type="hart_transformer_t2i", vae_path=None)))
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file({k: v for k, v in sd.items() if k != "attn_bias_for_masking"}, str(llm / "model.safetensors"))
    torch.save({k: v * 0.5 if v.is_floating_point() and k != "attn_bias_for_masking" else v for k, v in sd.items()},
               llm / "ema_model.bin")
    (tdir / "config.json").write_text(json.dumps(dict(tok.official_config(), model_type="hart_autoencoder_with_disc")))
    tsd = {"vae." + k: v.contiguous() for k, v in tok.state_dict().items()}
    tsd["disc.main.0.weight"] = torch.zeros(2, 3, 4, 4)
    save_file(tsd, str(tdir / "model.safetensors"))
    return model, tok


def test_from_pretrained_official_layout(tmp_path):
    model, tok = _write_official(tmp_path / "hart-0.7b-1024px")
    qwen = _tiny_qwen(tmp_path / "qwen")
    pipe = HARTPipeline.from_pretrained("hart-0.7b", weights=str(tmp_path / "hart-0.7b-1024px"), text_encoder=str(qwen),
                                        device="cpu")
    # EMA weights are loaded over llm/model.safetensors, as sample.py does
    torch.testing.assert_close(pipe.model.head.weight, model.head.weight * 0.5, atol=0, rtol=0)
    assert all(torch.equal(a, b) for a, b in zip(tok.state_dict().values(), pipe.tokenizer.state_dict().values()))
    assert pipe.text_encoder.max_length == 8 and pipe.text_encoder.use_system_prompt
    res = pipe(["a red cat on the mat"], seed=0, plan="fastvar")
    assert res.images.shape == (1, 3, 128, 128) and 0 <= res.images.min() and res.images.max() <= 1
    assert res.latent.shape == (1, 4, 64, 64)
    torch.testing.assert_close(pipe.decode(res.latent), res.images, atol=0, rtol=0)
    # the llm/ folder itself (the official --model_path) with the tokenizer given separately
    p2 = HARTPipeline.from_pretrained("hart", weights=tmp_path / "hart-0.7b-1024px" / "llm", use_ema=False,
                                      vae_weights=tmp_path / "hart-0.7b-1024px" / "tokenizer",
                                      text_encoder=pipe.text_encoder, device="cpu")
    assert torch.equal(p2.model.head.weight, model.head.weight)


def test_load_pipeline_dispatch(tmp_path):
    from fastvar.models.registry import get_spec
    from fastvar.pipelines import load_pipeline

    spec = get_spec("hart")
    assert spec.family == "hart" and spec.resolution == 1024 and spec.text_encoder == "mit-han-lab/Qwen2-VL-1.5B-Instruct"
    p = load_pipeline(spec, random_init=True, device="cpu", depth=1, embed_dim=16, num_heads=1, text_tokens=4,
                      text_channels=8, aspect=None, pn=None)
    assert isinstance(p, HARTPipeline) and p.model.depth == 1 and p.model.context_token == 4
    with pytest.raises(ValueError, match="square"):
        load_pipeline(spec, random_init=True, device="cpu", aspect="16:9")
    with pytest.raises(ValueError, match="random-init"):
        load_pipeline(spec, weights=str(tmp_path), device="cpu", depth=3)


def test_missing_files_name_the_flag(tmp_path):
    with pytest.raises(FileNotFoundError, match="--weights"):
        HARTPipeline.from_pretrained(weights=str(tmp_path / "nope"), device="cpu")
    with pytest.raises(FileNotFoundError, match="--weights"):
        HARTPipeline.from_pretrained(weights=str(tmp_path), device="cpu")  # a folder without llm/config.json
    root = tmp_path / "hart"
    _write_official(root)
    qwen = _tiny_qwen(tmp_path / "qwen")
    with pytest.raises(FileNotFoundError, match="--vae-weights"):
        HARTPipeline.from_pretrained(weights=str(root), vae_weights=str(tmp_path / "no-tok"), text_encoder=str(qwen),
                                     device="cpu")
    (root / "llm" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="--weights"):
        HARTPipeline.from_pretrained(weights=str(root), text_encoder=str(qwen), device="cpu")
    root2 = tmp_path / "hart2"
    _write_official(root2)
    with pytest.raises(FileNotFoundError, match="--text-encoder"):
        HARTPipeline.from_pretrained(weights=str(root2), text_encoder=str(tmp_path / "no-qwen"), device="cpu")
    with pytest.raises(OSError, match="--text-encoder"):  # hub id while offline (or unknown online)
        HARTPipeline.from_pretrained(weights=str(root2), text_encoder="nobody/no-such-text-model", device="cpu")
    with pytest.raises(ConnectionError, match="--weights"):  # hub id while offline (or unknown online)
        HARTPipeline.from_pretrained(weights="nobody/no-such-hart:llm", device="cpu")
    with pytest.raises(ValueError, match="context_dim"):
        HARTPipeline(HART(HARTConfig(context_token=8, context_dim=32, depth=1, embed_dim=16, num_heads=1,
                                     patch_nums=(1, 2), diff_width=8, diff_depth=1, vocab_size=16, cvae=4)),
                     None, text_encoder=HARTPipeline.from_pretrained(weights=str(root2), text_encoder=str(qwen),
                                                                     device="cpu").text_encoder).check_text_encoder()
