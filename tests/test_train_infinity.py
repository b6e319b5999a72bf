"""`fastvar train bsq` / `fastvar train infinity`: checkpoints, exact resume, Bitwise Self-Correction, flags.

Tiny configs (32-px images, 4x BSQ-VAE, a 1-block Infinity with a 1-layer T5) so every test takes seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastvar.train import ckpt as ck
from fastvar.train.bsq_train import export_bsq, load_bsq, train_bsq
from fastvar.train.infinity_train import bsc_flip_requant, scale_loss_weights, train_infinity

TINY_BSQ = dict(image_size=32, codebook_dim=8, patch_size=4, base_ch=32, ch_mult="1,1,1", num_res_blocks=1,
                schedule="1,2,4,8", batch_size=2, warmup=10, log_every=1, threads=1, data_seed=3,
                moments_dtype="fp32")
TINY_INF = dict(depth=1, embed_dim=64, num_heads=2, t5_d_model=16, t5_layers=1, t5_heads=2, t5_d_ff=32,
                text_maxlen=16, batch_size=2, warmup=10, log_every=1, threads=1, ema=0.9, bsc_rate=0.2,
                moments_dtype="fp32")


def _weights(run: Path) -> dict[str, torch.Tensor]:
    meta, groups = ck.load_checkpoint(ck.find_latest(run))
    return {f"{g}/{k}": v for g in ("model", "ema") for k, v in groups.get(g, {}).items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def tiny_bsq(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("bsq")
    train_bsq(dict(TINY_BSQ, out=str(run), steps=1, ckpt_every=1))
    return export_bsq(run, run / "frozen.safetensors")


# ----------------------------------------------------------------------------------------- BSC


def _latents(seed: int = 0, B: int = 4, d: int = 16, H: int = 8) -> torch.Tensor:
    return torch.randn(B, d, H, H, generator=torch.Generator().manual_seed(seed))


def test_bsc_rate_zero_is_the_clean_quantiser():
    """Rate 0: labels are the inference quantiser's bits, whatever the RNG state and mode."""
    from fastvar.tokenizers.bsq import BSQVAE, BSQVAEConfig

    h = _latents()
    sizes = ((1, 1), (2, 2), (4, 4), (8, 8))
    vae = BSQVAE(BSQVAEConfig(16, patch_size=4, base_ch=32, encoder_ch_mult=(1, 1, 1), decoder_ch_mult=(1, 1, 1)))
    _, ref_bits, _ = vae.quantizer(h, sizes)
    torch.manual_seed(1)
    x0, lab0, st0 = bsc_flip_requant(h, sizes, 0.0, mode="fixed")
    torch.manual_seed(2)
    x1, lab1, _ = bsc_flip_requant(h, sizes, 0.0, mode="uniform")
    assert st0["flipped"] == 0.0
    assert torch.equal(x0, x1)
    for got, ref, (ph, pw) in zip(lab0, ref_bits, sizes):
        assert torch.equal(got, ref.reshape(4, ph * pw, 16).long())
    assert x0.shape == (4, 4 + 16 + 64, 16)


def test_bsc_flips_bits_at_the_set_rate():
    """Measured on the transformer input itself: with two full-size scales the next input is the first
    scale's (flipped) codes, so its signs against the clean labels give the flip fraction."""
    h = _latents(B=8, H=16)
    sizes = ((16, 16), (16, 16))
    for rate in (0.1, 0.3):
        torch.manual_seed(0)
        x, labels, st = bsc_flip_requant(h, sizes, rate, layers=1, mode="fixed")
        fed = (x > 0).long()  # (B, 256, d): bits the model sees as scale 1's input
        measured = (fed != labels[0]).float().mean().item()
        assert abs(measured - rate) < 0.02, (rate, measured)
        assert abs(st["flipped"] - measured) < 1e-6
        # the next scale's labels correct the corruption: they are the bits of the new residual
        assert not torch.equal(labels[1], labels[0])
    torch.manual_seed(0)
    x_clean, lab_clean, _ = bsc_flip_requant(h, sizes, 0.0)
    assert torch.equal(((x_clean > 0).long()), lab_clean[0])


def test_bsc_uniform_mode_and_layers():
    """Official mode: one rate per call drawn from [0, rate] (mean rate / 2); --bsc-layers limits the scales."""
    h = _latents(B=2, H=8)
    sizes = ((8, 8), (8, 8))
    torch.manual_seed(0)
    fr = [bsc_flip_requant(h, sizes, 0.4, mode="uniform")[2]["flipped"] for _ in range(200)]
    mean = sum(fr) / len(fr)
    assert 0.16 < mean < 0.24, mean
    assert len({round(f, 2) for f in fr}) > 10
    # only scale 0 corruptible -> scale 1's own codes are clean: its input equals the clean one at rate 0
    torch.manual_seed(0)
    sizes3 = ((2, 2), (4, 4), (8, 8))
    x_l1, _, _ = bsc_flip_requant(h, sizes3, 0.5, layers=1, mode="fixed")
    x_all, _, _ = bsc_flip_requant(h, sizes3, 0.0)
    assert not torch.equal(x_l1[:, :16], x_all[:, :16])


def test_scale_loss_weights_official():
    w = scale_loss_weights(((1, 1), (2, 2), (4, 4)), True)
    assert w.shape == (21,) and abs(w.sum().item() - 1) < 1e-6
    assert abs(w[0].item() / w[-1].item() - 4.0) < 1e-5  # sqrt(16 / 1)
    u = scale_loss_weights(((1, 1), (2, 2)), False)
    assert torch.allclose(u, torch.full((5,), 0.2))


# ----------------------------------------------------------------------------------------- trainers


def test_train_bsq_two_steps_and_resume(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    train_bsq(dict(TINY_BSQ, out=str(full), steps=2, ckpt_every=1))
    train_bsq(dict(TINY_BSQ, out=str(part), steps=1, ckpt_every=1))
    assert json.loads((part / "latest.json").read_text())["step"] == 1
    train_bsq(dict(TINY_BSQ, out=str(part), steps=2, ckpt_every=1))
    assert json.loads((part / "latest.json").read_text())["step"] == 2
    _same(_weights(full), _weights(part))
    rows = (part / "log.csv").read_text().strip().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2"]
    vae, info, desc = load_bsq(part)
    assert desc["step"] == 2 and info["schedule"][-1] == [8, 8]


def test_train_infinity_two_steps_and_resume(tmp_path, tiny_bsq):
    full, part = tmp_path / "full", tmp_path / "part"
    train_infinity(dict(TINY_INF, out=str(full), bsq=str(tiny_bsq), steps=2, ckpt_every=1))
    train_infinity(dict(TINY_INF, out=str(part), bsq=str(tiny_bsq), steps=1, ckpt_every=1))
    meta = json.loads((ck.find_latest(part) / "meta.json").read_text())
    assert meta["step"] == 1 and meta["kind"] == "infinity"
    train_infinity(dict(TINY_INF, out=str(part), bsq=str(tiny_bsq), steps=2, ckpt_every=1))
    assert json.loads((part / "latest.json").read_text())["step"] == 2
    a, b = _weights(full), _weights(part)
    _same(a, b)
    assert any(k.startswith("model/text.") for k in a) and any(k.startswith("ema/gpt.") for k in a)
    # the first step moved the weights (a resume that silently restarted would still match itself)
    init = tmp_path / "init"
    train_infinity(dict(TINY_INF, out=str(init), bsq=str(tiny_bsq), steps=1, ckpt_every=1, lr=1e-12))
    c = _weights(init)
    assert not torch.equal(a["model/gpt.head.weight"], c["model/gpt.head.weight"])


def test_export_loads_in_the_embedded_builder(tmp_path, tiny_bsq):
    from fastvar.models.embedded_t2i import build_embedded_t2i
    from fastvar.train.infinity_train import export_t2i, load_t2i_run

    run = tmp_path / "run"
    train_infinity(dict(TINY_INF, out=str(run), bsq=str(tiny_bsq), steps=1, ckpt_every=1))
    files = export_t2i(run, tiny_bsq, tmp_path / "assets", dtype=torch.float32)
    assert all(Path(p).is_file() for p in files.values())
    enc, vae, gpt = build_embedded_t2i(weights=tmp_path / "assets")
    model, _, cfg, _ = load_t2i_run(run)
    for k, v in model.gpt.state_dict().items():
        assert torch.equal(gpt.state_dict()[k], v), k
    cond = enc(["a red circle"])
    assert cond.kv_compact.shape[-1] == cfg["text"]["d_model"]


@pytest.mark.parametrize("args, needle", [
    (["infinity", "--out", "{t}/r", "--bsq", "{t}/missing"], "--bsq"),
    (["infinity", "--out", "{t}/r", "--bsq", "{bsq}", "--bsc-rate", "2"], "--bsc-rate"),
    (["infinity", "--out", "{t}/r", "--bsq", "{bsq}", "--zero", "2"], "FSDP needs CUDA"),
    (["infinity", "--out", "{t}/r", "--bsq", "{bsq}", "--text-mode", "magic"], "--text-mode"),
    (["infinity", "--out", "{t}/r", "--bsq", "{bsq}", "--data", "{t}/nope"], "--data"),
    (["bsq", "--out", "{t}/r", "--patch-size", "6"], "--patch-size"),
    (["bsq", "--out", "{t}/r", "--schedule", "1,2,4"], "--schedule"),
])
def test_bad_flags_one_line(tmp_path, tiny_bsq, args, needle, capsys, monkeypatch):
    """``fastvar train ...`` (the CLI's own main, in process): exit status 2 and one line naming the flag."""
    from fastvar.cli import main

    monkeypatch.setattr("fastvar.train.infinity_train.torch.cuda.is_available", lambda: False)
    args = [a.format(t=tmp_path, bsq=tiny_bsq) for a in args]
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("fastvar: error:"), err
    assert not (tmp_path / "r" / "latest.json").exists()


@pytest.mark.slow
def test_torchrun_two_processes_cpu(tmp_path, tiny_bsq):
    """2-process DDP (gloo) under torch.distributed.run writes a resumable checkpoint."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "fastvar.cli",
           "train", "infinity", "--out", str(out), "--bsq", str(tiny_bsq), "--steps", "2", "--ckpt-every", "1",
           "--depth", "1", "--embed-dim", "64", "--num-heads", "2", "--t5-d-model", "16", "--t5-layers", "1",
           "--t5-heads", "2", "--t5-d-ff", "32", "--text-maxlen", "16", "--batch-size", "1", "--threads", "1",
           "--ema", "0.9", "--device", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "latest.json").read_text())["step"] == 2
    meta, groups = ck.load_checkpoint(ck.find_latest(out))
    assert "ema" in groups and "optim" in groups
    # resumable: a longer run continues at step 2 (single process)
    train_infinity(dict(TINY_INF, out=str(out), bsq=str(tiny_bsq), steps=3, ckpt_every=1, batch_size=1))
    assert json.loads((out / "latest.json").read_text())["step"] == 3


def test_train_infinity_on_a_jsonl_folder(tmp_path, tiny_bsq):
    """The official JSONL format (DATA's JsonlBuckets, square bucket) feeds the trainer like the procedural data."""
    from PIL import Image

    root = tmp_path / "jsonl"
    root.mkdir()
    lines = []
    for i, colour in enumerate([(220, 30, 30), (30, 60, 220), (30, 180, 40), (230, 200, 30)]):
        p = tmp_path / f"img{i}.png"
        Image.new("RGB", (48, 48), colour).save(p)
        lines.append(json.dumps({"image_path": str(p), "h_div_w": 1.0, "long_caption": "a red circle"}))
    (root / "1.000_000000004.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    train_infinity(dict(TINY_INF, out=str(out), bsq=str(tiny_bsq), data=str(root), steps=1, ckpt_every=1))
    meta = json.loads((ck.find_latest(out) / "meta.json").read_text())
    assert meta["step"] == 1
    assert ck.load_checkpoint(ck.find_latest(out))[0]["fingerprint"]["data"] == "jsonl"


def test_compact_checkpoint_resumes(tmp_path, tiny_bsq):
    """The committed (bf16) resume point: half the bytes, same step, and training continues from it."""
    from fastvar.train.infinity_train import compact_checkpoint

    run = tmp_path / "run"
    train_infinity(dict(TINY_INF, out=str(run), bsq=str(tiny_bsq), steps=1, ckpt_every=1))
    before = _weights(run)
    size = sum(f.stat().st_size for f in ck.find_latest(run).glob("model*.safetensors"))
    compact_checkpoint(run)
    after = _weights(run)
    assert sum(f.stat().st_size for f in ck.find_latest(run).glob("model*.safetensors")) < 0.6 * size
    for k, v in before.items():
        assert after[k].dtype == torch.bfloat16 and torch.allclose(after[k].float(), v, rtol=1e-2, atol=1e-3), k
    train_infinity(dict(TINY_INF, out=str(run), bsq=str(tiny_bsq), steps=2, ckpt_every=1))
    assert json.loads((run / "latest.json").read_text())["step"] == 2
    assert _weights(run)["model/gpt.head.weight"].dtype == torch.float32
    compact_checkpoint(run, drop_optimizer=True)
    assert "optim" not in ck.load_checkpoint(ck.find_latest(run))[1]
    train_infinity(dict(TINY_INF, out=str(run), bsq=str(tiny_bsq), steps=3, ckpt_every=1))
    assert json.loads((run / "latest.json").read_text())["step"] == 3
