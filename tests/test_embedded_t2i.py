"""embedded-t2i: word tokenizer, save/load of the three parts, generation through the Infinity pipeline and the CLI
(random weights built in-process and written to a temporary assets folder; no transformers on this path)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch

from fastvar.cli import main
from fastvar.errors import UsageError
from fastvar.models import embedded_t2i as et
from fastvar.text.word_tokenizer import WordTokenizer

PROMPTS = ["two red circles", "a blue square to the left of a green ring"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A random model (seed 0) saved like an export (fp16), and the in-memory parts it came from."""
    folder = tmp_path_factory.mktemp("embedded_t2i_assets")
    enc, vae, model = et.build_embedded_t2i(seed=0)
    cfg = dict(et.DEFAULT_CONFIG, sampling=dict(cfg=3.0, tau=1.0, top_k=0, top_p=0.0), steps=0)
    et.save_embedded_t2i(folder, cfg, enc, vae, model)
    return folder, (enc, vae, model)


@pytest.fixture(scope="module")
def pipe(assets):
    return et.load_embedded_t2i_pipeline(device="cpu", assets=assets[0])


# ---------------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_round_trip_and_padding():
    tok = WordTokenizer(et.default_vocab())
    assert tok.vocab[:3] == ["<pad>", "</s>", "<unk>"] and len(tok) == 3 + len(et.caption_words())
    for text in PROMPTS + ["Three YELLOW triangles, above a cross."]:
        ids = tok.encode(text)
        assert ids[-1] == tok.eos_id and tok.unk_id not in ids
        assert tok.decode(ids) == " ".join(tok.words(text))
    assert tok.decode(tok.encode("Three YELLOW triangles, above a cross.")) == "three yellow triangles above a cross"
    ids, mask = tok(PROMPTS, max_length=6)
    assert ids.shape == mask.shape == (2, 6)
    assert mask.sum(1).tolist() == [4, 6]  # 3 words + </s>; the long caption truncated to 5 words + </s>
    assert ids[0, 4:].tolist() == [0, 0] and ids[1, -1].item() == tok.eos_id
    assert tok(PROMPTS, 40, padding="longest")[0].shape == (2, 11)


def test_unknown_word_is_unk_with_one_warning(caplog):
    tok = WordTokenizer(et.default_vocab())
    with caplog.at_level(logging.WARNING, logger="fastvar"):
        a = tok.encode("a purple circle")
        b = tok.encode("two purple circles")  # same unknown word: reported once
    assert a[1] == tok.unk_id and b[1] == tok.unk_id and a[2] == tok.ids["circle"]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "'purple'" in lines[0] and "<unk>" in lines[0] and "\n" not in lines[0]
    with pytest.raises(UsageError, match="'purple'"):
        WordTokenizer(et.default_vocab(), strict=True).encode("a purple circle")


def test_vocabulary_file_round_trip_and_bad_lists(tmp_path):
    tok = WordTokenizer.from_words(["Red", "circle", "red"])
    assert tok.vocab == ["<pad>", "</s>", "<unk>", "red", "circle"]
    tok.save(tmp_path / "v.json")
    assert WordTokenizer.from_json(tmp_path / "v.json").vocab == tok.vocab
    with pytest.raises(ValueError, match="must start with"):
        WordTokenizer(["red", "circle"])
    with pytest.raises(ValueError, match="repeats"):
        WordTokenizer(["<pad>", "</s>", "<unk>", "red", "red"])
    (tmp_path / "bad.json").write_text('{"red": 3}')
    with pytest.raises(ValueError, match="JSON list"):
        WordTokenizer.from_json(tmp_path / "bad.json")


# ---------------------------------------------------------------------------------------------- model files
def test_config_mismatch_is_one_line():
    with pytest.raises(ValueError, match="infinity.text_channels 64 != text.d_model 128"):
        et.resolve_config({"infinity": {"text_channels": 64}})
    with pytest.raises(ValueError, match="image_size 256"):
        et.resolve_config({"image_size": 256})


def test_registry_matches_the_model_config(assets):
    from fastvar.models.registry import get_spec

    spec = get_spec("embedded-t2i")
    shipped = json.loads((assets[0] / et.CONFIG_FILE).read_text())
    for cfg in [et.resolve_config(None)] + ([json.loads(et.ASSETS.joinpath(et.CONFIG_FILE).read_text())]
                                            if (et.ASSETS / et.CONFIG_FILE).is_file() else []) + [shipped]:
        assert list(spec.config["patch_nums"]) == cfg["schedule"]
        assert spec.config["depth"] == cfg["infinity"]["depth"] and spec.resolution == cfg["image_size"]


def test_saved_files_load_back_exactly(assets, pipe):
    folder, (enc, vae, model) = assets
    size = sum(p.stat().st_size for p in et.embedded_t2i_files(folder).values())
    assert size < 30e6  # the budget for the shipped model
    for ours, theirs in ((pipe.model, model), (pipe.vae, vae), (pipe.text_encoder.encoder, enc.encoder)):
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys()
        for k in a:
            want = b[k].half().float() if b[k].is_floating_point() else b[k]
            assert torch.equal(a[k], want), k
    assert pipe.image_size == (128, 128) and [h for h, _ in pipe.schedule.sizes] == et.DEFAULT_CONFIG["schedule"]


def test_missing_files_name_the_training_command(tmp_path):
    with pytest.raises(et.EmbeddedT2IMissing, match=r"embedded_t2i_infinity.safetensors.*train.sh"):
        et.load_embedded_t2i_pipeline(assets=tmp_path)


# ---------------------------------------------------------------------------------------------- generation
def test_generation_is_seeded_and_fastvar_prunes(pipe):
    a = pipe(PROMPTS, seed=0, record=True)
    b = pipe(PROMPTS, seed=0)
    assert a.images.shape == (2, 3, 128, 128) and torch.equal(a.images, b.images)
    assert not torch.equal(a.images[0], a.images[1])  # the prompts reach the model
    c = pipe(PROMPTS, seed=1, decode=False)
    assert not torch.equal(c.latent, a.latent)
    fast = pipe(PROMPTS, seed=0, plan="fastvar", record=True)
    assert fast.stats["total_flops"] < 0.9 * a.stats["total_flops"]
    assert fast.images.shape == a.images.shape
    # the custom schedule's own largest scales are the ones pruned (11 and 16 here), with cross-attention
    kept = fast.stats["hooks"].kept
    assert any(k[0] == 7 and k[2] == "cross" for k in kept) and not any(k[0] < 6 for k in kept)


def test_every_preset_applies(pipe):
    from fastvar.accel.presets import NO_OP_PRESETS, PRESETS, preset_for_model

    from .test_presets_schedule import changes

    for name in PRESETS:  # read from the loaded model itself: its fixed schedule and depth
        plan = preset_for_model(name, pipe.model)
        did = changes(plan, pipe.model.schedule, pipe.model.depth)
        assert bool(did) == (name not in NO_OP_PRESETS), (name, did)


def test_no_transformers_when_loading_or_encoding(assets, monkeypatch):
    # a lazy `import transformers` anywhere on the load/encode/generate path would raise ImportError here
    monkeypatch.setitem(sys.modules, "transformers", None)
    p = et.load_embedded_t2i_pipeline(device="cpu", assets=assets[0])
    c = p.encode_prompts(["two red circles"])
    assert c.lens == [4] and c.kv_compact.shape == (4, 128)


@pytest.mark.slow
def test_no_transformers_in_a_fresh_process(assets):
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "from fastvar.models.embedded_t2i import load_embedded_t2i_pipeline\n"
        f"p = load_embedded_t2i_pipeline(device='cpu', assets={str(assets[0])!r})\n"
        "c = p.encode_prompts(['two red circles'])\n"
        "assert c.lens == [4] and c.kv_compact.shape == (4, 128), c\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


# ---------------------------------------------------------------------------------------------- command line
def test_cli_generate_and_errors(assets, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(et.ENV_DIR, str(tmp_path / "empty"))
    assert main(["generate", "--model", "embedded-t2i", "--prompts", "two red circles", "--out", str(tmp_path / "x"),
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "embedded_t2i_t5.safetensors" in err and "train.sh" in err
    assert main(["generate", "--model", "embedded-t2i", "--pn", "0.25M", "--out", str(tmp_path / "x")]) == 2
    assert "--pn: embedded-t2i has one architecture" in capsys.readouterr().err
    assert main(["generate", "--model", "embedded-t2i", "--resolution", "256", "--out", str(tmp_path / "x")]) == 2
    assert "embedded-t2i has one resolution" in capsys.readouterr().err

    monkeypatch.setenv(et.ENV_DIR, str(assets[0]))
    out = tmp_path / "o"
    assert main(["generate", "--model", "embedded-t2i", "--prompts", *PROMPTS, "--preset", "fastvar", "--seed", "0",
                 "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == "embedded-t2i" and report["plan"] == "fastvar" and report["images"] == 2
    assert len(list(out.glob("0*.png"))) == 2


@pytest.mark.slow  # --compare's PSNR/SSIM import torchmetrics (tens of seconds on a loaded machine)
def test_cli_compare(assets, tmp_path, monkeypatch):
    monkeypatch.setenv(et.ENV_DIR, str(assets[0]))
    out = tmp_path / "o"
    assert main(["generate", "--model", "embedded-t2i", "--prompts", *PROMPTS, "--preset", "fastvar", "--compare",
                 "--seed", "0", "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == "embedded-t2i" and report["plan"] == "fastvar" and report["images"] == 2
    assert report["speedup"] > 0 and report["psnr_vs_baseline"] < 100  # the plan changed the images
    assert len(list((out / "baseline").glob("0*.png"))) == 2 and len(list((out / "fastvar").glob("0*.png"))) == 2


def test_cli_default_prompts_use_only_known_words():
    from fastvar.cli import MODEL_PROMPTS

    tok = WordTokenizer(et.default_vocab(), strict=True)  # raises on any unknown word
    for p in MODEL_PROMPTS["embedded-t2i"]:
        assert tok.unk_id not in tok.encode(p)
