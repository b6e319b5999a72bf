"""End-to-end training runs on tiny models: 2-step runs, exact resume, torchrun (2 CPU processes), bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastvar.train import ckpt as ck
from fastvar.train.folder import DatasetError
from fastvar.train.var_train import train_var
from fastvar.train.vqvae_train import train_vqvae

# 32 px, 4x tokenizer (ch_mult of 3 levels) -> 8x8 latent, 4-scale schedule
TINY_VQ = dict(image_size=32, ch=32, ch_mult="1,1,2", z_channels=4, vocab_size=32, num_res_blocks=1,
               patch_nums="1,2,4,8", batch_size=2, warmup=1, log_every=1, ckpt_every=1, threads=1,
               restart_every=2, moments_dtype="fp32")
TINY_VAR = dict(image_size=32, depth=2, embed_dim=32, num_heads=2, batch_size=2, warmup=1, log_every=1,
                ckpt_every=1, threads=1, moments_dtype="fp32")


@pytest.fixture(scope="module")
def vq_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vq")
    train_vqvae(dict(TINY_VQ, out=str(out), steps=2))
    return out


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return ck.load_sharded(ck.find_latest(run), "model")


def test_vqvae_two_steps_write_resumable_checkpoint(vq_run):
    latest = json.loads((vq_run / "latest.json").read_text())
    assert latest["step"] == 2 and (vq_run / latest["dir"] / "meta.json").is_file()
    meta, groups = ck.load_checkpoint(vq_run / latest["dir"])
    assert meta["kind"] == "vqvae" and {"model", "optim", "extra"} <= set(groups)
    rows = (vq_run / "log.csv").read_text().strip().splitlines()
    assert rows[0].startswith("step,") and len(rows) == 3


def test_resume_continues_at_the_right_step(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    train_vqvae(dict(TINY_VQ, out=str(a), steps=2))
    train_vqvae(dict(TINY_VQ, out=str(a), steps=4))  # resumes at 2
    train_vqvae(dict(TINY_VQ, out=str(b), steps=4))  # uninterrupted
    steps = [int(r.split(",")[0]) for r in (a / "log.csv").read_text().strip().splitlines()[1:]]
    assert steps == [1, 2, 3, 4]
    wa, wb = _weights(a), _weights(b)
    for k in wb:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)


def test_var_two_steps_and_resume(vq_run, tmp_path):
    out = tmp_path / "var"
    train_var(dict(TINY_VAR, out=str(out), vqvae=str(vq_run), steps=2, pg=0.5, pg0=1, workers=2))
    assert json.loads((out / "latest.json").read_text())["step"] == 2
    train_var(dict(TINY_VAR, out=str(out), vqvae=str(vq_run), steps=3))
    meta, _ = ck.load_checkpoint(ck.find_latest(out))
    assert meta["step"] == 3 and meta["kind"] == "var"


def test_torchrun_two_cpu_processes(vq_run, tmp_path):
    out = tmp_path / "ddp"
    args = [f"--{k.replace('_', '-')}={v}" for k, v in TINY_VAR.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fastvar.train.cli", "var", f"--out={out}", f"--vqvae={vq_run}", "--steps=2", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    meta, groups = ck.load_checkpoint(ck.find_latest(out))
    assert meta["step"] == 2 and "model" in groups
    # the checkpoint written by the 2-process run resumes in a single process
    train_var(dict(TINY_VAR, out=str(out), vqvae=str(vq_run), steps=3))
    assert ck.load_checkpoint(ck.find_latest(out))[0]["step"] == 3


def test_resume_with_another_config_is_a_clear_error(vq_run, tmp_path):
    out = tmp_path / "v"
    train_var(dict(TINY_VAR, out=str(out), vqvae=str(vq_run), steps=1))
    with pytest.raises(ck.CheckpointMismatchError, match="different configuration"):
        train_var(dict(TINY_VAR, out=str(out), vqvae=str(vq_run), steps=2, depth=3))
    with pytest.raises(ck.CheckpointMismatchError, match="vocab_size"):
        train_vqvae(dict(TINY_VQ, out=str(vq_run), steps=3, vocab_size=64))


def test_image_too_small_for_schedule(tmp_path):
    with pytest.raises(ValueError, match="too small for the schedule"):
        train_vqvae(dict(TINY_VQ, out=str(tmp_path), steps=1, image_size=16))


def test_empty_and_malformed_dataset_folder(tmp_path, vq_run):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="no class sub-folders"):
        train_vqvae(dict(TINY_VQ, out=str(tmp_path / "o"), steps=1, data=str(empty)))
    (empty / "cls").mkdir()
    (empty / "cls" / "x.JPEG").write_bytes(b"\x00garbage")
    with pytest.raises(DatasetError, match="cannot read image"):
        train_var(dict(TINY_VAR, out=str(tmp_path / "o2"), vqvae=str(vq_run), steps=1, data=str(empty)))


def test_checkpoint_files_are_safetensors_without_pickle(vq_run):
    d = ck.find_latest(vq_run)
    names = sorted(p.name for p in d.iterdir())
    assert all(n.endswith(".safetensors") or n == "meta.json" for n in names)
    assert load_file(str(d / "model-00000.safetensors"))
