"""Scorers with tiny random-weight networks: FID (an Inception-like extractor injected into torchmetrics' FID
path), CLIP score (transformers' CLIPModel), fidelity (torchmetrics PSNR/SSIM, an LPIPS-shaped callable);
missing libraries and missing weights fail at once with one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from fastvar.errors import MissingInputError, UsageError
from fastvar.eval import metrics as M

from ._tiny_clip import tiny_clip_pair

pytestmark = pytest.mark.usefixtures("one_thread")


class TinyInception(nn.Module):
    """Inception-like: parallel 1x1 / 3x3 / pooled branches concatenated, global average pool; uint8 in."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, stride=2)
        self.b1, self.b3 = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 3, padding=1)
        self.bp = nn.Sequential(nn.AvgPool2d(3, 1, 1), nn.Conv2d(8, 4, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.interpolate(x.float() / 127.5 - 1, size=(32, 32), mode="bilinear", align_corners=False)
        x = torch.relu(self.stem(x))
        x = torch.cat([self.b1(x), self.b3(x), self.bp(x)], dim=1)
        return x.mean(dim=(2, 3))


def _write_images(folder, n: int, seed: int, size: int = 40, categories: tuple[str, ...] = ()) -> None:
    rng = np.random.default_rng(seed)
    for i in range(n):
        sub = folder / categories[i % len(categories)] if categories else folder
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(sub / f"{i:03d}.png")


def _write_generation(folder, prompts: list[str], samples: int, seed: int, categories: list[str] | None = None) -> None:
    rng = np.random.default_rng(seed)
    for p, prompt in enumerate(prompts):
        d = folder / f"{p:05d}"
        (d / "samples").mkdir(parents=True, exist_ok=True)
        meta = {"prompt": prompt, **({"category": categories[p]} if categories else {})}
        (d / "metadata.jsonl").write_text(json.dumps(meta) + "\n")
        for s in range(samples):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(d / "samples" / f"{s:04d}.png")


# ---------------------------------------------------------------------------------------------- FID
def test_fid_matches_torchmetrics_and_is_zero_on_identical_sets(tmp_path):
    from torchmetrics.image.fid import FrechetInceptionDistance

    _write_images(tmp_path / "gen", 12, seed=1)
    _write_images(tmp_path / "ref", 12, seed=2)
    gen, ref = M.collect_images(tmp_path / "gen"), M.collect_images(tmp_path / "ref")
    net = TinyInception().eval()
    res = M.fid_score(gen, ref, feature=net, batch_size=5)
    tm = FrechetInceptionDistance(feature=net)
    for recs, real in ((ref, True), (gen, False)):
        tm.update(torch.stack([torch.from_numpy(M.load_rgb(r.path)).permute(2, 0, 1) for r in recs]), real=real)
    assert res["fid"] == pytest.approx(float(tm.compute()), rel=1e-4)
    assert M.fid_score(gen, gen, feature=net)["fid"] == pytest.approx(0.0, abs=1e-3)


def test_fid_per_category_and_saved_statistics(tmp_path):
    cats = ("animals", "people")
    _write_generation(tmp_path / "gen", ["a", "b", "c", "d"], 2, seed=3, categories=["animals", "people"] * 2)
    _write_images(tmp_path / "ref", 8, seed=4, categories=cats)
    gen, ref = M.collect_images(tmp_path / "gen"), M.collect_images(tmp_path / "ref")
    assert {r.category for r in gen} == {r.category for r in ref} == set(cats)
    net = TinyInception().eval()
    npz = tmp_path / "ref_stats.npz"
    direct = M.fid_score(gen, ref, feature=net, save_ref_stats=npz)
    assert set(direct["categories"]) == set(cats) and all(v["num_images"] == 4 for v in direct["categories"].values())
    assert direct["category_mean"] == pytest.approx(np.mean([v["fid"] for v in direct["categories"].values()]))
    from_stats = M.fid_score(gen, ref_stats=M.load_stats(npz), feature=net)
    assert from_stats["fid"] == pytest.approx(direct["fid"], rel=1e-9)
    assert from_stats["categories"]["people"]["fid"] == pytest.approx(direct["categories"]["people"]["fid"], rel=1e-9)
    np.savez(tmp_path / "bad.npz", x=np.zeros(2))
    with pytest.raises(UsageError, match="no mu/sigma"):
        M.load_stats(tmp_path / "bad.npz")


def test_inception_without_torch_fidelity_names_the_package(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # import fails as if not installed
    with pytest.raises(ImportError, match="torch-fidelity"):
        M.load_inception()


# ---------------------------------------------------------------------------------------------- CLIP score
def test_clip_score_is_100_times_clipped_cosine(tmp_path):
    model, proc = tiny_clip_pair()
    _write_generation(tmp_path / "gen", ["a red fox", "a blue circle " * 40], 2, seed=5)  # the second: > 77 tokens
    recs = M.collect_images(tmp_path / "gen")
    res = M.score_prompted(recs, lambda ims, ps: M.clip_scores(ims, ps, model, proc), "clipscore", batch_size=3)
    assert res["num_images"] == 4 and len(res["per_image"]) == 4
    # reference: the same CLIP by hand, one image at a time
    r = recs[0]
    px = proc(images=[Image.open(r.path).convert("RGB")], return_tensors="pt")["pixel_values"]
    tok = proc(text=[r.prompt], return_tensors="pt")
    with torch.no_grad():
        fi = M._clip_features(model.get_image_features(pixel_values=px))
        ft = M._clip_features(model.get_text_features(**tok))
    cos = float(torch.nn.functional.cosine_similarity(fi, ft))
    assert res["per_image"][r.key] == pytest.approx(max(100 * cos, 0.0), abs=1e-3)
    assert all(0.0 <= v <= 100.0 for v in res["per_image"].values())
    # a long caption keeps CLIP's end token (tokenizer truncation): 77 ids, the last one is <|endoftext|>
    ids = proc(text=["a blue circle " * 40], return_tensors="pt", truncation=True, max_length=77)["input_ids"]
    assert ids.shape[1] == 77 and int(ids[0, -1]) == proc.tokenizer.eos_token_id


def test_prompted_scorers_need_prompts(tmp_path):
    _write_images(tmp_path / "flat", 2, seed=6)
    with pytest.raises(UsageError, match="needs each image's prompt"):
        M.score_prompted(M.collect_images(tmp_path / "flat"), lambda a, b: [0.0] * len(a), "clipscore")


# ---------------------------------------------------------------------------------------------- fidelity
def test_fidelity_psnr_ssim_lpips_against_the_baseline(tmp_path):
    from torchmetrics.functional.image import peak_signal_noise_ratio

    _write_generation(tmp_path / "base", ["a", "b"], 2, seed=7)
    _write_generation(tmp_path / "plan", ["a", "b"], 2, seed=7)
    noisy = tmp_path / "plan" / "00001" / "samples" / "0000.png"
    a = np.asarray(Image.open(noisy)).astype(np.int16)
    a = np.clip(a + np.random.default_rng(0).integers(-8, 9, a.shape), 0, 255).astype(np.uint8)
    Image.fromarray(a).save(noisy)
    pairs = M.match_pairs(M.collect_images(tmp_path / "plan"), M.collect_images(tmp_path / "base"))

    class TinyLPIPS(nn.Module):  # LPIPS-shaped: (x, y) in [-1, 1] -> distance per image
        def forward(self, x, y):
            return (x - y).abs().mean(dim=(1, 2, 3))

    res = M.fidelity(pairs, ("psnr", "ssim", "lpips"), TinyLPIPS())
    assert res["num_images"] == 4 and res["psnr_identical"] == 3
    x = torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255
    y = torch.from_numpy(np.array(Image.open(tmp_path / "base" / "00001" / "samples" / "0000.png"))).permute(2, 0, 1)[None]
    assert res["psnr"] == pytest.approx(float(peak_signal_noise_ratio(x, y.float() / 255, data_range=1.0)), rel=1e-5)
    assert 0.0 < res["ssim"] < 1.0 and res["lpips"] > 0.0
    only_same = M.fidelity(pairs[:1], ("psnr", "ssim"))
    assert only_same["psnr"] == float("inf") and only_same["ssim"] == 1.0
    with pytest.raises(UsageError, match="has no image"):
        M.match_pairs(M.collect_images(tmp_path / "plan"), M.collect_images(tmp_path / "base")[:2])


def test_lpips_hps_imagereward_missing_libraries_name_the_package(monkeypatch):
    import sys

    for mod, call, name in (("lpips", lambda: M.load_lpips(), "lpips"), ("hpsv2", lambda: M.HPSv21(), "hpsv2"),
                            ("ImageReward", lambda: M.ImageRewardScorer(), "image-reward")):
        monkeypatch.setitem(sys.modules, mod, None)
        if mod == "hpsv2":
            monkeypatch.setitem(sys.modules, "hpsv2.img_score", None)
        with pytest.raises(ImportError, match=f"pip install {name}"):
            call()


# ---------------------------------------------------------------------------------------------- weights
def test_offline_missing_weights_fail_at_once_with_name_and_place(monkeypatch, tmp_path):
    import time

    monkeypatch.setenv("FASTVAR_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(MissingInputError, match=r"openai/clip-vit-large-patch14 .*put it in .*--clip-model"):
        M.resolve_hf_model("openai/clip-vit-large-patch14", "--clip-model")
    with pytest.raises(MissingInputError, match=r"weights-inception-2015-12-05-6726825d\.pth .*put it in .*checkpoints"):
        M._local_or_cached(None, tmp_path / "checkpoints", M.INCEPTION_FILE, "--inception-weights", M.INCEPTION_URL,
                           "github.com")
    assert time.perf_counter() - t0 < 5.0
    with pytest.raises(MissingInputError, match="no such file"):
        M._local_or_cached(str(tmp_path / "nope.pth"), tmp_path, "x.pth", "--hps-weights", "", "")
    # a local model folder is used as is
    model, proc = tiny_clip_pair()
    model.save_pretrained(tmp_path / "clip")
    proc.save_pretrained(tmp_path / "clip")
    m2, _ = M.load_clip(str(tmp_path / "clip"))
    assert isinstance(m2, type(model))


def test_image_folders(tmp_path):
    with pytest.raises(MissingInputError, match="does not exist"):
        M.collect_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="holds no images"):
        M.collect_images(tmp_path / "empty")


def test_atomic_output_keeps_the_old_file_when_a_write_dies(tmp_path):
    from fastvar.checkpoints import atomic_output

    target = tmp_path / "stats.npz"
    M.save_stats(target, (np.zeros(2), np.eye(2)))
    before = target.read_bytes()
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(target) as f:
            f.write(b"half a file")
            raise KeyboardInterrupt
    assert target.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["stats.npz"]


def test_cli_clipscore_with_a_local_model_and_missing_libraries_in_one_line(tmp_path, capsys, monkeypatch):
    import sys

    from fastvar.cli import main

    model, proc = tiny_clip_pair()
    model.save_pretrained(tmp_path / "clip")
    proc.save_pretrained(tmp_path / "clip")
    _write_generation(tmp_path / "gen", ["a red fox", "a city"], 2, seed=8, categories=["animals", "places"])
    assert main(["eval", "clipscore", "--images", str(tmp_path / "gen"), "--clip-model", str(tmp_path / "clip"),
                 "--device", "cpu", "--quiet", "--json", str(tmp_path / "c.json")]) == 0
    out = json.loads((tmp_path / "gen" / "scores" / "clipscore.json").read_text())
    assert out["num_images"] == 4 and set(out["categories"]) == {"animals", "places"}
    assert json.loads((tmp_path / "c.json").read_text())["clipscore"] == out["clipscore"]
    assert "animals" in capsys.readouterr().out
    for mod in ("torch_fidelity", "lpips", "hpsv2", "hpsv2.img_score", "ImageReward"):
        monkeypatch.setitem(sys.modules, mod, None)
    gen = str(tmp_path / "gen")
    for argv, package in ((["fid", "--ref", gen], "torch-fidelity"), (["fidelity", "--ref", gen], "lpips"),
                          (["hps"], "hpsv2"), (["imagereward"], "image-reward")):
        assert main(["eval", *argv, "--images", gen, "--device", "cpu", "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert f"pip install {package}" in err and len(err.splitlines()) == 1, err
