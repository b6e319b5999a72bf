"""The `eval-gpu` libraries through fastvar's own loaders. They require torchvision, so they carry the
`eval_gpu` marker, outside the fast suite: run `pytest -m eval_gpu` after `pip install -e '.[eval-gpu]'`
(without the libraries these tests fail, they do not skip). torch-fidelity's Inception-v3 architecture with
random weights through `load_inception` and the FID path, and LPIPS's AlexNet (random backbone, the wheel's
linear heads) through `fidelity`; offline, their missing weight files fail at once with the file name."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fastvar.errors import MissingInputError
from fastvar.eval import metrics as M

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.eval_gpu]


def _images(folder, n: int, seed: int, size: int = 48) -> list[M.ImageRecord]:
    rng = np.random.default_rng(seed)
    for i in range(n):
        d = folder / f"{i:05d}" / "samples"
        d.mkdir(parents=True)
        (d.parent / "metadata.jsonl").write_text(json.dumps({"prompt": f"p{i}"}) + "\n")
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(d / "0000.png")
    return M.collect_images(folder)


def test_fid_with_torch_fidelity_inception(tmp_path, monkeypatch):
    import torch_fidelity.feature_extractor_inceptionv3 as tf
    with monkeypatch.context() as m:  # the real architecture with random weights: skip the download once
        m.setattr(tf, "load_state_dict_from_url", lambda *a, **k: None)
        m.setattr(tf.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        torch.manual_seed(0)
        net = tf.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    weights = tmp_path / M.INCEPTION_FILE
    torch.save(net.state_dict(), weights)
    inception = M.load_inception(str(weights))
    gen, ref = _images(tmp_path / "gen", 4, 1), _images(tmp_path / "ref", 4, 2)
    assert M.extract_features(gen, inception).shape == (4, 2048)
    assert M.fid_score(gen, ref, feature=inception)["fid"] > 0
    assert M.fid_score(gen, gen, feature=inception)["fid"] == pytest.approx(0.0, abs=1e-2)
    from fastvar.cli import main  # the command line end to end: folder reference, then its saved statistics

    common = ["--images", str(tmp_path / "gen"), "--inception-weights", str(weights), "--device", "cpu", "--quiet"]
    stats = tmp_path / "ref.npz"
    assert main(["eval", "fid", *common, "--ref", str(tmp_path / "ref"), "--save-ref-stats", str(stats)]) == 0
    first = json.loads((tmp_path / "gen" / "scores" / "fid.json").read_text())["fid"]
    assert main(["eval", "fid", *common, "--ref", str(stats)]) == 0
    assert json.loads((tmp_path / "gen" / "scores" / "fid.json").read_text())["fid"] == pytest.approx(first, rel=1e-9)
    monkeypatch.setenv("FASTVAR_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(MissingInputError, match=M.INCEPTION_FILE.replace(".", r"\.")):
        M.load_inception()


def test_fidelity_with_lpips_alexnet(tmp_path, monkeypatch):
    import lpips
    torch.manual_seed(0)
    net = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False).eval()  # random backbone: no download
    base, plan = _images(tmp_path / "base", 2, 3), _images(tmp_path / "plan", 2, 4)
    res = M.fidelity(M.match_pairs(plan, base), ("psnr", "ssim", "lpips"), net)
    assert res["lpips"] > 0 and np.isfinite(res["psnr"])
    assert M.fidelity(M.match_pairs(base, base), ("lpips",), net)["lpips"] == pytest.approx(0.0, abs=1e-6)
    monkeypatch.setenv("FASTVAR_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(MissingInputError, match=r"alexnet-owt-7be5be79\.pth"):
        M.load_lpips("alex")
