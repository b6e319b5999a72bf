"""Bad input, one test per class: out-of-range values, wrong types, devices that are not there, unreadable
checkpoint files, unusable input/output paths, unknown names, and the same checks in the Python API.

Every CLI case must exit with status 2 and print exactly one line ``fastvar: error: ...`` that names the
flag and the fix, with no traceback, and it must fail *before* anything is loaded: the loaders are
replaced by functions that fail the test if they are ever called.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fastvar.cli import main
from fastvar.errors import UsageError

pytestmark = pytest.mark.usefixtures("one_thread")


def _fails(argv: list[str], capsys, *needles: str) -> str:
    """Run the CLI in-process; assert exit 2, one error line, no traceback, and every needle in the message."""
    rc = main(argv)
    cap = capsys.readouterr()
    assert rc == 2, (argv, cap.out, cap.err)
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastvar: error: "), cap.err
    assert "Traceback" not in cap.err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _boom(*a, **k):
    raise AssertionError("something was loaded before the bad input was reported")


@pytest.fixture()
def no_loading(monkeypatch):
    """Any model, weights, dataset or embedded-asset load fails the test."""
    import fastvar.pipelines as pipelines
    import fastvar.train.check as check
    import fastvar.train.var_train as var_train
    import fastvar.train.vqvae_train as vqvae_train

    monkeypatch.setattr(pipelines, "load_pipeline", _boom)
    monkeypatch.setattr(check, "check_embedded", _boom)
    monkeypatch.setattr(var_train, "init_distributed", _boom)
    monkeypatch.setattr(var_train, "load_vqvae", _boom)
    monkeypatch.setattr(vqvae_train, "build_dataset", _boom)
    monkeypatch.setattr(vqvae_train, "init_distributed", _boom)


# ---------------------------------------------------------------------------------------------- ranges
@pytest.mark.parametrize(
    "argv, needles",
    [
        (["generate", "--top-k", "-3"], ["--top-k -3", ">= 0", "0 turns top-k filtering off", "e.g. --top-k 900"]),
        (["generate", "--top-p", "1.5"], ["--top-p 1.5", "[0, 1]", "e.g. --top-p 0.95"]),
        (["generate", "--top-p", "-0.1"], ["--top-p -0.1", "[0, 1]"]),
        (["generate", "--cfg", "-2"], ["--cfg -2", ">= 0", "e.g. --cfg 4"]),
        (["generate", "--seed", "-1"], ["--seed -1", ">= 0", "e.g. --seed 0"]),
        (["generate", "--num-samples", "0"], ["--num-samples 0", ">= 1"]),
        (["generate", "--batch-size", "0"], ["--batch-size 0", ">= 1"]),
        (["generate", "--benchmark", "0"], ["--benchmark 0", ">= 1"]),
        (["generate", "--classes", "3", "10"], ["--classes", "[10] out of range", "0..9"]),
        (["generate", "--model", "var-d16", "--classes", "-1"], ["--classes", "[-1] out of range", "0..999"]),
        (["generate", "--model", "var-d16", "--resolution", "300"], ["--resolution 300", "256 and 512"]),
        (["generate", "--model", "var-d16", "--cache-threshold", "1.5"], ["--cache-threshold 1.5", "[0, 1]"]),
        (["generate", "--model", "infinity-2b", "--random-init", "--depth", "0"], ["--depth 0", ">= 1"]),
        (["generate", "--model", "infinity-2b", "--random-init", "--text-tokens", "0"], ["--text-tokens 0", ">= 1"]),
        (["generate", "--model", "infinity-2b", "--random-init", "--width", "65", "--heads", "2"],
         ["--width 65", "--heads 2", "e.g. --width 64"]),
        (["bench", "--repeats", "0"], ["--repeats 0", ">= 1"]),
        (["bench", "--warmup", "-1"], ["--warmup -1", ">= 0"]),
        (["bench", "--batch", "0"], ["--batch 0", ">= 1"]),
        (["bench", "--threads", "0"], ["--threads 0", ">= 1"]),
        (["bench", "--seed", "-4"], ["--seed -4", ">= 0"]),
        (["bench", "--classes", "1000"], ["--classes", "[1000] out of range", "0..999"]),  # was wrapped modulo 1000
        (["plan", "--last-side", "0"], ["--last-side 0", ">= 1"]),
        (["plan", "--depth", "-2"], ["--depth -2", ">= 1"]),
        (["check-embedded", "--samples", "0"], ["--samples 0", ">= 1"]),
        (["check-embedded", "--seed", "-1"], ["--seed -1", ">= 0"]),
        (["train", "vqvae", "--steps", "0"], ["--steps 0", ">= 1"]),
        (["train", "vqvae", "--lr", "0"], ["--lr 0", "> 0", "e.g. --lr 3e-4"]),
        (["train", "vqvae", "--ema", "1.0"], ["--ema 1.0", "[0, 1)", "e.g. --ema 0.999"]),
        (["train", "vqvae", "--betas", "0.9"], ["--betas 0.9", "two AdamW betas", "e.g. --betas 0.9,0.95"]),
        (["train", "vqvae", "--ch-mult", "1,0,2"], ["--ch-mult 1,0,2", ">= 1"]),
        (["train", "var", "--vqvae", ".", "--pg", "1.5"], ["--pg 1.5", "[0, 1]"]),
        (["train", "var", "--vqvae", ".", "--embed-dim", "100", "--num-heads", "3"], ["--embed-dim 100", "--num-heads 3"]),
        (["train", "var", "--vqvae", ".", "--workers", "-1"], ["--workers -1", ">= 0"]),
    ],
)
def test_out_of_range_values(argv, needles, tmp_path, capsys, no_loading):
    out = tmp_path / "o"
    _fails([*argv, "--out", str(out)] if argv[0] in ("generate", "train") else argv, capsys, *needles)
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- types
@pytest.mark.parametrize(
    "argv, needles",
    [
        (["generate", "--top-k", "abc"], ["argument --top-k", "'abc' is not a whole number", "fastvar generate --help"]),
        (["generate", "--seed", "1.5"], ["argument --seed", "not a whole number"]),
        (["generate", "--cfg", "nan"], ["argument --cfg", "not a finite number"]),
        (["generate", "--top-p", "inf"], ["argument --top-p", "not a finite number"]),
        (["bench", "--threads", "many"], ["argument --threads", "not a whole number", "fastvar bench --help"]),
        (["train", "var", "--out", "o", "--steps", "1e3"], ["argument --steps", "not a whole number"]),
        (["generate", "--dtype", "fp8"], ["argument --dtype", "invalid choice"]),
        (["generate", "--no-such-flag"], ["unrecognized arguments: --no-such-flag", "fastvar --help"]),
        (["train"], ["required", "{vqvae,var,bsq,infinity}"]),
        (["train", "var"], ["required: --out"]),
    ],
)
def test_wrong_types(argv, needles, capsys, no_loading):
    _fails(argv, capsys, *needles)


# ---------------------------------------------------------------------------------------------- devices
def _cpu_only(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _two_gpus(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def _no_mps(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.mark.parametrize(
    "setup, device, needles",
    [
        (_cpu_only, "cuda", ["CUDA is not available in this torch build", "CPU-only", "cpu", "install a CUDA build"]),
        (_cpu_only, "cuda:1", ["CUDA is not available in this torch build"]),
        (_two_gpus, "cuda:7", ["2 CUDA device(s)", "cuda:0 .. cuda:1", "cuda:0"]),
        (_no_mps, "mps", ["MPS is not available", "cpu"]),
        (None, "gpu", ["not a device name", "cpu, cuda, cuda:N or mps"]),
        (None, "meta", ["cpu, cuda, mps devices only"]),
    ],
)
@pytest.mark.parametrize("command", [["generate"], ["bench", "--random-init"], ["check-embedded"],
                                     ["train", "vqvae", "--out", "RUN"]])
def test_unavailable_devices(setup, device, needles, command, tmp_path, capsys, monkeypatch, no_loading):
    if setup is not None:
        setup(monkeypatch)
    argv = [str(tmp_path / "run") if a == "RUN" else a for a in command]
    _fails([*argv, "--device", device], capsys, f"--device {device}:", *needles)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "build",
    [
        lambda d: __import__("fastvar.pipelines.var", fromlist=["x"]).VARPipeline.embedded(device=d),
        lambda d: __import__("fastvar.pipelines.var", fromlist=["x"]).VARPipeline.random_init("var-d16", device=d),
        lambda d: __import__("fastvar.pipelines.var", fromlist=["x"]).VARPipeline.from_pretrained(
            "var-d16", weights="/nonexistent/var_d16.pth", vae_weights="/nonexistent/vae.pth", device=d),
        lambda d: __import__("fastvar.pipelines.hart", fromlist=["x"]).HARTPipeline.random_init(device=d),
        lambda d: __import__("fastvar.pipelines.hart", fromlist=["x"]).HARTPipeline.from_pretrained(
            weights="/nonexistent", device=d),
        lambda d: __import__("fastvar.pipelines.infinity", fromlist=["x"]).InfinityPipeline.random_init(device=d),
        lambda d: __import__("fastvar.pipelines.infinity", fromlist=["x"]).InfinityPipeline.from_pretrained(
            weights="/nonexistent.pth", device=d),
    ],
    ids=["var-embedded", "var-random", "var-pretrained", "hart-random", "hart-pretrained", "inf-random", "inf-pretrained"],
)
def test_unavailable_device_in_python_api(build, monkeypatch):
    """The pipelines give Python callers the same message as a ValueError, before any file or model is touched."""
    _cpu_only(monkeypatch)
    with pytest.raises(ValueError, match=r"device='cuda': CUDA is not available in this torch build .*device='cpu'") as e:
        build("cuda")
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------- checkpoints
def _good_pth(p: Path) -> Path:
    torch.save({"w": torch.ones(64)}, p)
    return p


def _truncated(p: Path, make) -> Path:
    make(p)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return p


def _bad_file(kind: str, tmp_path: Path, monkeypatch) -> Path:
    if kind == "truncated-pth":
        return _truncated(tmp_path / "w.pth", _good_pth)
    if kind == "truncated-safetensors":
        return _truncated(tmp_path / "w.safetensors", lambda p: save_file({"w": torch.ones(64)}, str(p)))
    if kind == "garbage-pth":
        (tmp_path / "w.pth").write_bytes(b"<html>404 not found</html>" * 20)
        return tmp_path / "w.pth"
    if kind == "garbage-safetensors":
        (tmp_path / "w.safetensors").write_bytes(b"\x00garbage" * 20)
        return tmp_path / "w.safetensors"
    if kind == "empty":
        (tmp_path / "w.pth").write_bytes(b"")
        return tmp_path / "w.pth"
    if kind == "pickled-objects":
        torch.save({"w": object()}, tmp_path / "w.pth")
        return tmp_path / "w.pth"
    if kind == "folder-without-file":
        (tmp_path / "ckpts").mkdir()
        return tmp_path / "ckpts"
    if kind == "missing":
        return tmp_path / "nowhere" / "var_d16.pth"
    if kind == "unreadable":
        p = _good_pth(tmp_path / "w.pth")
        p.chmod(0)
        if os.geteuid() == 0:  # root reads anything: emulate what a normal user sees
            real = os.access
            monkeypatch.setattr(os, "access", lambda q, mode, **k: Path(q) != p and real(q, mode, **k))
        return p
    raise AssertionError(kind)


CHECKPOINT_CASES = [
    ("truncated-pth", ["not a readable checkpoint (truncated or not a .pth/.safetensors file: ", "cut off",
                       "re-download it or pass the right file to --weights"]),
    ("truncated-safetensors", ["not a readable checkpoint", "the file has", "pass the right file to --weights"]),
    ("garbage-pth", ["not a readable checkpoint", "neither a torch.save zip/pickle nor safetensors"]),
    ("garbage-safetensors", ["not a readable checkpoint", "no safetensors header"]),
    ("empty", ["not a readable checkpoint", "empty (0 bytes)"]),
    ("pickled-objects", ["pickled Python objects", "never unpickles", "--weights"]),
    ("folder-without-file", ["--weights", "has no 'var_d16.pth'", "pass the checkpoint file itself"]),
    ("missing", ["--weights", "no such file", "pass the"]),
    ("unreadable", ["--weights", "permission denied", "chmod a+r"]),
]


@pytest.mark.parametrize("kind, needles", CHECKPOINT_CASES, ids=[c[0] for c in CHECKPOINT_CASES])
def test_unreadable_checkpoint_via_cli(kind, needles, tmp_path, capsys, monkeypatch):
    import fastvar.pipelines.var as var

    monkeypatch.setattr(var, "VAR", _boom)  # the file must be refused before the model is even built
    vae = _good_pth(tmp_path / "vae.pth")
    bad = _bad_file(kind, tmp_path, monkeypatch)
    out = tmp_path / "o"
    msg = _fails(["generate", "--model", "var-d16", "--weights", str(bad), "--vae-weights", str(vae), "--out", str(out)],
                 capsys, *needles)
    assert "pop from empty list" not in msg and not out.exists()


@pytest.mark.parametrize("kind, needles", CHECKPOINT_CASES[:6], ids=[c[0] for c in CHECKPOINT_CASES[:6]])
def test_unreadable_checkpoint_every_loader(kind, needles, tmp_path, monkeypatch):
    """One helper (fastvar.checkpoints) behind every loader: official pipelines, tokenizers, training resume,
    the frozen VQVAE of a VAR run and the embedded model."""
    from fastvar.checkpoints import CheckpointError, read_state_dict
    from fastvar.models.hart import read_hf_weights
    from fastvar.pipelines.infinity import read_infinity_weights
    from fastvar.tokenizers.bsq import load_bsq_vae_state
    from fastvar.train import ckpt as ck
    from fastvar.train.embedded import load_embedded
    from fastvar.train.var_train import load_vqvae

    bad = _bad_file(kind, tmp_path, monkeypatch)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "model.safetensors").write_bytes(bad.read_bytes())
    run = tmp_path / "ckpt-00000001"
    run.mkdir()
    (run / "model-00000.safetensors").write_bytes(bad.read_bytes())
    vq = tmp_path / "vq.safetensors"
    vq.write_bytes(bad.read_bytes())
    vq.with_suffix(".json").write_text("{}")
    assets = tmp_path / "assets"
    assets.mkdir()
    from fastvar.train.embedded import ASSETS, CONFIG_FILE, VAR_FILE, VQVAE_FILE

    (assets / CONFIG_FILE).write_text((ASSETS / CONFIG_FILE).read_text())
    (assets / VQVAE_FILE).write_bytes(bad.read_bytes())
    (assets / VAR_FILE).write_bytes(bad.read_bytes())

    loaders = {
        "read_state_dict": lambda: read_state_dict(bad),
        "infinity": lambda: read_infinity_weights(bad),
        "bsq-vae": lambda: load_bsq_vae_state(None, bad),
        "hart-folder": lambda: read_hf_weights(hf),
        "train-resume": lambda: ck.load_sharded(run, "model"),
        "frozen-vqvae": lambda: load_vqvae(vq),
        "embedded": lambda: load_embedded("cpu", assets),
    }
    for name, load in loaders.items():
        with pytest.raises(CheckpointError) as e:
            load()
        msg = str(e.value)
        assert "\n" not in msg, (name, msg)
        assert any(n in msg for n in ("not a readable checkpoint", "pickled Python objects")), (name, msg)
    with pytest.raises(CheckpointError, match="--vae-weights"):
        load_bsq_vae_state(None, bad)
    with pytest.raises(CheckpointError, match="--no-resume"):
        ck.load_sharded(run, "model")


def test_unreadable_checkpoint_fails_before_other_loads(tmp_path, monkeypatch):
    """Infinity / HART: a damaged transformer file is reported before the text encoder (GBs) is loaded."""
    import fastvar.pipelines.hart as hart
    import fastvar.pipelines.infinity as inf

    monkeypatch.setattr(inf, "load_text_encoder", _boom)
    monkeypatch.setattr(hart, "load_text_encoder", _boom)
    bad = _truncated(tmp_path / "w.pth", _good_pth)
    vae = _good_pth(tmp_path / "vae.pth")
    with pytest.raises(ValueError, match="not a readable checkpoint.*--weights"):
        inf.InfinityPipeline.from_pretrained(weights=str(bad), vae_weights=str(vae), device="cpu")
    root = tmp_path / "hart" / "llm"
    (root.parent / "tokenizer").mkdir(parents=True)
    root.mkdir()
    (root / "config.json").write_text("{}")
    (root.parent / "tokenizer" / "config.json").write_text("{}")
    (root / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.*--weights"):
        hart.HARTPipeline.from_pretrained(weights=str(root.parent), device="cpu")


# ---------------------------------------------------------------------------------------------- input files
@pytest.mark.parametrize(
    "make, argv, needles",
    [
        (None, ["generate", "--plan", "{tmp}/nope.json"], ["--plan", "does not exist", "fastvar plan fastvar"]),
        (None, ["generate", "--plan", "{tmp}"], ["--plan", "is a folder, not a file"]),
        ("[not json", ["generate", "--plan", "{f}"], ["--plan", "not valid JSON", "line 1"]),
        ("[1, 2]", ["generate", "--plan", "{f}"], ["--plan", "holds a list, not a plan object"]),
        ('{"keep": {"32": 7}}', ["generate", "--plan", "{f}"], ["--plan", "invalid plan"]),
        (None, ["bench", "--plans", "{tmp}/missing.json"], ["--plans", "does not exist"]),
        ("{", ["generate", "--compare-configs", "{f}"], ["--compare-configs", "not valid JSON"]),
        (None, ["generate", "--use-cache", "--sim-path", "{tmp}/sim.json"], ["--sim-path", "does not exist"]),
        ("{}", ["generate", "--calibration", "--sim-path", "{f}/sim.json"], ["--sim-path", "not a folder"]),
        (None, ["generate", "--model", "var-d16", "--weights", "ckpts_missing/var_d16.pth"], ["--weights", "no such"]),
        (None, ["generate", "--model", "infinity-2b", "--text-encoder", "{tmp}/no-t5"], ["--text-encoder", "no such folder"]),
        (None, ["train", "vqvae", "--out", "{tmp}/run", "--data", "{tmp}/no-images"], ["--data", "no such folder"]),
        (None, ["train", "var", "--out", "{tmp}/run", "--vqvae", "{tmp}/no-vq"], ["--vqvae", "does not exist"]),
    ],
)
def test_unusable_input_files(make, argv, needles, tmp_path, capsys, no_loading):
    f = tmp_path / "plan.json"
    if make is not None:
        f.write_text(make)
    argv = [a.format(tmp=tmp_path, f=f) for a in argv]
    if argv[0] == "generate":
        argv += ["--out", str(tmp_path / "o")]
    _fails(argv, capsys, *needles)
    assert not (tmp_path / "o").exists() and not (tmp_path / "run").exists()


def test_unreadable_plan_file(tmp_path, capsys, monkeypatch, no_loading):
    p = tmp_path / "plan.json"
    p.write_text("{}")
    p.chmod(0)
    if os.geteuid() == 0:
        real = os.access
        monkeypatch.setattr(os, "access", lambda q, mode, **k: Path(q) != p and real(q, mode, **k))
    _fails(["generate", "--plan", str(p), "--out", str(tmp_path / "o")], capsys, "--plan", "permission denied", "chmod")


# ---------------------------------------------------------------------------------------------- output paths
@pytest.fixture()
def unwritable_dir(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    if os.geteuid() == 0:  # root writes anywhere: emulate a read-only folder
        real = os.access
        monkeypatch.setattr(os, "access", lambda q, mode, **k: not (Path(q) == d and mode & os.W_OK) and real(q, mode, **k))
    yield d
    d.chmod(0o700)


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["generate", "--out", "{ro}/images"], ["--out", "is not writable", "pass a folder you can write to"]),
        (["generate", "--out", "{file}/images"], ["--out", "is a file, so the folder cannot be created"]),
        (["generate", "--out", "{file}"], ["--out", "exists and is not a folder"]),
        (["generate", "--benchmark", "--json", "{tmp}"], ["--json", "is a folder"]),
        (["generate", "--benchmark", "--json", "{ro}/b.json"], ["--json", "not writable"]),
        (["generate", "--json", "{tmp}/r.json"], ["--json", "only --benchmark and --compare-configs write JSON"]),
        (["bench", "--json", "{ro}/b.json"], ["--json", "not writable"]),
        (["check-embedded", "--json", "{file}/r.json"], ["--json", "exists and is not a folder"]),
        (["train", "vqvae", "--out", "{ro}/run"], ["--out", "is not writable"]),
    ],
)
def test_unwritable_outputs(argv, needles, tmp_path, unwritable_dir, capsys, no_loading):
    f = tmp_path / "a-file"
    f.write_text("x")
    argv = [a.format(ro=unwritable_dir, file=f, tmp=tmp_path) for a in argv]
    _fails(argv, capsys, *needles)
    assert list(unwritable_dir.iterdir()) == []


# ---------------------------------------------------------------------------------------------- names, choices, combinations
@pytest.mark.parametrize(
    "argv, needles",
    [
        (["generate", "--model", "var-d17"], ["--model var-d17", "unknown model", "var-d16"]),
        (["generate", "--preset", "warp-speed"], ["--preset warp-speed", "known presets", "fastvar"]),
        (["generate", "--preset", "fastvar", "--plan", "p.json"], ["--preset and --plan", "give one"]),
        (["generate", "--compare-configs", "fastvar+bogus"], ["--compare-configs fastvar+bogus", "cache preset"]),
        (["generate", "--compare"], ["--compare", "no plan is given", "--preset"]),
        (["bench", "--plans", "warp-speed"], ["--plans warp-speed", "known presets"]),
        (["plan", "warp-speed"], ["plan warp-speed", "known presets"]),
        (["generate", "--model", "infinity-2b", "--pn", "3M"], ["--pn 3M", "0.06M, 0.25M, 0.60M, 1M, 2K"]),
        (["generate", "--model", "infinity-2b", "--aspect", "10:1"], ["--aspect 10:1", "valid aspects"]),
        (["bench", "--model", "infinity-2b", "--random-init", "--aspect", "wide"], ["--aspect wide", "W:H"]),
        (["generate", "--model", "infinity-2b", "--resolution", "512"], ["--resolution 512", "VAR models only", "--pn"]),
        (["generate", "--resolution", "256"], ["--resolution 256", "embedded model generates 128px only"]),
        (["generate", "--model", "infinity-2b", "--prompts", "a", " "], ["--prompts", "[1] are empty"]),
        (["generate", "--model", "var-d16", "--prompts", "a cat"], ["--prompts", "give --classes"]),
        (["bench", "--model", "hart", "--random-init", "--classes", "1"], ["--classes", "text-to-image"]),
        (["train", "vqvae", "--out", "{tmp}/r", "--amp", "fp8"], ["--amp fp8", "auto, bf16, fp16, none"]),
        (["train", "vqvae", "--out", "{tmp}/r", "--moments-dtype", "int8"], ["--moments-dtype int8", "bf16, fp32"]),
    ],
)
def test_unknown_names_and_conflicting_flags(argv, needles, tmp_path, capsys, no_loading):
    argv = [a.format(tmp=tmp_path) for a in argv]
    if argv[0] == "generate":
        argv += ["--out", str(tmp_path / "o")]
    _fails(argv, capsys, *needles)
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------- Python API
@pytest.fixture(scope="module")
def var_pipe():
    from fastvar.models.var import VAR
    from fastvar.pipelines.var import VARPipeline
    from fastvar.tokenizers.vqvae import VQVAE

    torch.manual_seed(0)
    pn = (1, 2)
    model = VAR(vocab_size=16, cvae=4, num_classes=5, depth=1, embed_dim=16, num_heads=1, patch_nums=pn)
    vae = VQVAE(vocab_size=16, z_channels=4, ch=32, ch_mult=(1, 1), patch_nums=pn, using_sa=False)
    return VARPipeline(model.eval(), vae.eval(), "tiny-var")


@pytest.fixture(scope="module")
def inf_pipe():
    from fastvar.pipelines.infinity import InfinityPipeline

    return InfinityPipeline.random_init(device="cpu", depth=2, embed_dim=32, num_heads=2, text_channels=16, pn="0.06M")


@pytest.fixture(scope="module")
def hart_pipe():
    from fastvar.pipelines.hart import HARTPipeline

    return HARTPipeline.random_init(device="cpu", depth=1, embed_dim=16, num_heads=1, text_tokens=4, text_channels=8)


CALL_CASES = [
    ("var", [1], dict(seed=-1), "seed=-1: seeds are whole numbers >= 0"),
    ("var", [1], dict(seed=1.5), "seed=1.5: expected a whole number"),
    ("var", [1], dict(cfg=-1.0), "cfg=-1.0: must be >= 0"),
    ("var", [1], dict(top_k=-3), "top_k=-3: must be >= 0 (0 turns top-k filtering off)"),
    ("var", [1], dict(top_p=1.5), "top_p=1.5: must be in [0, 1]"),
    ("var", [1], dict(plan="warp-speed"), "plan='warp-speed': unknown preset; known presets"),
    ("var", [1], dict(plan=3), "plan=3: expected an AccelPlan, a preset name or None"),
    ("var", [1], dict(more_smooth="no"), "more_smooth='no': expected True or False"),
    ("var", [1], dict(decode="yes"), "decode='yes': expected True or False"),
    ("var", [5], {}, "classes: class id(s) [5] out of range for tiny-var; valid ids are 0..4"),
    ("var", ["a cat"], {}, "class id 'a cat' is not a whole number"),
    ("var", [], {}, "classes: no class ids given"),
    ("infinity", ["a"], dict(tau=0), "tau=0: must be > 0"),
    ("infinity", ["a"], dict(cfg=[1.0, -1.0]), "cfg=-1.0: must be >= 0"),
    ("infinity", ["a"], dict(cfg_insertion_layer=5), "cfg_insertion_layer=5"),
    ("infinity", ["a"], dict(negative_prompt=3), "negative_prompt=3: expected a string or None"),
    ("infinity", ["a", ""], {}, "conditions: prompt(s) at position [1] are empty"),
    ("infinity", [3], {}, "needs prompt strings"),
    ("hart", ["a"], dict(top_k=[600, -1]), "per-scale top-k values must be whole numbers >= 0"),
    ("hart", ["a"], dict(top_p=2), "top_p=2: must be in [0, 1]"),
    ("hart", [], {}, "conditions: no prompts given"),
]


@pytest.mark.parametrize("family, conds, kw, match", CALL_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CALL_CASES)])
def test_pipeline_call_arguments(family, conds, kw, match, request, monkeypatch):
    pipe = request.getfixturevalue({"var": "var_pipe", "infinity": "inf_pipe", "hart": "hart_pipe"}[family])
    monkeypatch.setattr(pipe.model, "autoregressive_infer", _boom)  # nothing is sampled before the check
    if hasattr(pipe, "encode_prompts"):
        monkeypatch.setattr(pipe, "encode_prompts", _boom)
    with pytest.raises(ValueError) as e:
        pipe(conds, **kw)
    assert isinstance(e.value, UsageError) and match in str(e.value) and "\n" not in str(e.value)


LOAD_CASES = [
    ("fastvar.pipelines.var", "VARPipeline.random_init", dict(name="var-d17"), "name='var-d17': not a VAR model"),
    ("fastvar.pipelines.var", "VARPipeline.random_init", dict(seed=-3), "seed=-3"),
    ("fastvar.pipelines.var", "VARPipeline.embedded", dict(dtype="fp8"), "dtype='fp8': unknown dtype; use fp32, bf16 or fp16"),
    ("fastvar.pipelines.var", "VARPipeline.embedded", dict(device="gpu"), "device='gpu': not a device name"),
    ("fastvar.pipelines.hart", "HARTPipeline.random_init", dict(depth=0), "depth=0: must be >= 1"),
    ("fastvar.pipelines.hart", "HARTPipeline.random_init", dict(embed_dim=30, num_heads=4), "embed_dim=30: not divisible"),
    ("fastvar.pipelines.hart", "HARTPipeline.random_init", dict(name="hart-2b"), "name='hart-2b': not a HART model"),
    ("fastvar.pipelines.hart", "HARTPipeline.from_pretrained", dict(use_ema="yes"), "use_ema='yes': expected True or False"),
    ("fastvar.pipelines.infinity", "InfinityPipeline.random_init", dict(text_tokens=0), "text_tokens=0: must be >= 1"),
    ("fastvar.pipelines.infinity", "InfinityPipeline.random_init", dict(pn="3M"), "0.06M, 0.25M, 0.60M, 1M, 2K"),
    ("fastvar.pipelines.infinity", "InfinityPipeline.random_init", dict(aspect="10:1"), "valid aspects"),
    ("fastvar.pipelines.infinity", "InfinityPipeline.random_init", dict(name="infinity-3b"), "unknown Infinity model"),
    ("fastvar.pipelines.infinity", "InfinityPipeline.from_pretrained", dict(depth=-1), "depth=-1: must be >= 1"),
]


@pytest.mark.parametrize("module, method, kw, match", LOAD_CASES, ids=[f"{c[1]}-{i}" for i, c in enumerate(LOAD_CASES)])
def test_pipeline_load_arguments(module, method, kw, match, monkeypatch):
    """from_pretrained / random_init / embedded: a bad argument is a ValueError before anything is built or read."""
    import importlib

    mod = importlib.import_module(module)
    for name in ("VAR", "HART", "build_infinity", "load_text_encoder", "_resolve_folder", "resolve_checkpoint"):
        if hasattr(mod, name):
            monkeypatch.setattr(mod, name, _boom)
    import fastvar.train.embedded as embedded

    monkeypatch.setattr(embedded, "load_embedded", _boom)
    cls_name, meth = method.split(".")
    with pytest.raises(ValueError) as e:
        getattr(getattr(mod, cls_name), meth)(**kw)
    assert match in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------- python -m fastvar
def test_python_m_fastvar_is_the_cli(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")  # the same help layout in both processes
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="100")
    helped = subprocess.run([sys.executable, "-m", "fastvar", "--help"], capture_output=True, text=True, env=env,
                            timeout=300)
    with pytest.raises(SystemExit):
        main(["--help"])
    assert helped.returncode == 0 and helped.stdout == capsys.readouterr().out
    bad = subprocess.run([sys.executable, "-m", "fastvar", "generate", "--top-k", "-3"], capture_output=True,
                         text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [
        "fastvar: error: --top-k -3: must be >= 0 (0 turns top-k filtering off); e.g. --top-k 900"]


def test_usage_error_is_a_value_error():
    """Python callers catch it as ValueError; the missing-file flavour also as FileNotFoundError."""
    from fastvar.checkpoints import CheckpointError, MissingCheckpointError

    assert issubclass(UsageError, ValueError) and issubclass(CheckpointError, UsageError)
    assert issubclass(MissingCheckpointError, FileNotFoundError) and issubclass(MissingCheckpointError, UsageError)
