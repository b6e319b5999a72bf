"""Generation for evaluation: GenEval's folder layout, one seed per image, sharded over ranks, resumable.

Layout (what GenEval's ``evaluate_images.py`` reads, and what every scorer here reads)::

    OUT/manifest.json                       model, plan, seeds, sampling, versions (the run's identity)
    OUT/<00000>/metadata.jsonl              the prompt's metadata (GenEval: the original JSON line)
    OUT/<00000>/samples/<0000>.png          sample 0 of prompt 0, ...
    OUT/logs/rank-<r>.jsonl                 one line per generated image: seconds, rank (for the report)

Why one generator per image: the image of (prompt i, sample k) is generated alone from
:func:`image_seed` ``(seed, i, k)``, so it does not depend on which process made it, on the batch it was
in, or on whether the run was interrupted; a sharded run equals a single-process run image for image.
Why the shard is a stride over (prompt, sample) units: every unit has exactly one owner (no duplicates,
no gaps) for any world size, and ranks get equal work even when a prompt has fewer samples than ranks.
Why resuming is "skip complete PNGs": every PNG is written to a temporary name and renamed into place,
so a file with the final name is complete; a killed run leaves at most a ``.tmp-*`` file, removed on the
next start.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .prompts import PromptItem

MANIFEST = "manifest.json"
LOGS = "logs"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_IEND = b"IEND\xaeB`\x82"
# Fields of the manifest that define the images; a resumed run must match them, or it would mix two runs.
IDENTITY_FIELDS = ("model", "weights", "plan", "seed", "samples_per_prompt", "prompts_sha256", "num_prompts",
                   "sampling", "seed_rule")
SEED_RULE = "blake2b-64(seed:prompt:sample) & (2**63-1)"


def image_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The seed of one image: a hash of (run seed, prompt index, sample index), below 2**63.

    A hash rather than ``seed + i * K + k`` so that neighbouring runs (seed 0 and seed 1) share no images
    and changing ``--samples-per-prompt`` does not renumber the seeds of existing samples.
    """
    digest = hashlib.blake2b(f"{int(seed)}:{int(prompt_index)}:{int(sample_index)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def work_units(num_prompts: int, samples_per_prompt: int) -> list[tuple[int, int]]:
    """Every (prompt index, sample index) of a run, prompt-major."""
    return [(p, s) for p in range(num_prompts) for s in range(samples_per_prompt)]


def shard(units: Sequence[tuple[int, int]], rank: int, world: int) -> list[tuple[int, int]]:
    """The units rank ``rank`` of ``world`` generates: every ``world``-th one, starting at ``rank``."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside a world of {world}")
    return list(units[rank::world])


def prompt_dir(out: Path, prompt_index: int) -> Path:
    return Path(out) / f"{prompt_index:05d}"


def sample_path(out: Path, prompt_index: int, sample_index: int) -> Path:
    return prompt_dir(out, prompt_index) / "samples" / f"{sample_index:04d}.png"


def is_complete_png(path: Path) -> bool:
    """A PNG that starts with the signature and ends with the IEND chunk (cheap: 20 bytes read)."""
    try:
        size = path.stat().st_size
        if size < len(PNG_SIGNATURE) + len(PNG_IEND):
            return False
        with open(path, "rb") as f:
            head = f.read(len(PNG_SIGNATURE))
            f.seek(size - len(PNG_IEND))
            tail = f.read()
        return head == PNG_SIGNATURE and tail == PNG_IEND
    except OSError:
        return False


def clean_stale_temp(out: Path) -> int:
    """Remove ``.tmp-*`` files a killed run left in sample folders; call before any rank starts writing."""
    n = 0
    for p in Path(out).glob("[0-9]*/samples/.tmp-*"):
        p.unlink(missing_ok=True)
        n += 1
    return n


def _atomic_text(text: str, path: Path) -> None:
    from ..checkpoints import atomic_output

    with atomic_output(path) as f:
        f.write(text.encode("utf-8"))


def write_metadata(out: Path, items: Sequence[PromptItem]) -> None:
    """``<index>/metadata.jsonl`` per prompt (GenEval's evaluator ``json.load``\\ s it: one object, one line).

    Written only when absent or different, so a resumed run does not touch finished folders.
    """
    for it in items:
        path = prompt_dir(out, it.index) / "metadata.jsonl"
        text = json.dumps(it.metadata) + "\n"
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            _atomic_text(text, path)


def prompts_digest(items: Sequence[PromptItem]) -> str:
    """SHA-256 of the prompts' metadata in order: a resumed run must read the same prompts."""
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps(it.metadata, sort_keys=True).encode())
        h.update(b"\n")
    return h.hexdigest()


def versions() -> dict[str, str]:
    """Library versions that can change the pixels (recorded in the manifest)."""
    import numpy
    import torch

    from .. import __version__

    return {"fastvar": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "python": platform.python_version(), "platform": sys.platform}


def check_manifest(out: Path, manifest: dict[str, Any]) -> None:
    """Refuse to resume into a folder that holds a different run (one line naming the differing field)."""
    path = Path(out) / MANIFEST
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UsageError(f"--out {out}: {MANIFEST} is unreadable; delete it or use a new --out") from None
    for key in IDENTITY_FIELDS:
        if old.get(key) != manifest.get(key):
            raise UsageError(f"--out {out}: holds a run with a different {key} ({old.get(key)!r}, this run "
                             f"{manifest.get(key)!r}); use a new --out folder, or delete {out} to start over")


def write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    _atomic_text(json.dumps(manifest, indent=2, default=str) + "\n", Path(out) / MANIFEST)


@dataclass
class GenerationJob:
    """What one rank generates: the prompts, the run's seed and options, and its place in the world.

    ``generate_one(item, seed) -> (image CHW float [0, 1], transformer seconds)`` is the only model
    contact, so tests and other families plug in without this module knowing about pipelines.
    """

    items: Sequence[PromptItem]
    out: Path
    generate_one: Callable[[PromptItem, int], tuple[Any, float]]
    samples_per_prompt: int = 1
    seed: int = 0
    rank: int = 0
    world: int = 1
    progress: bool = True
    limit: int | None = None  # stop after this many new images (tests: simulate a kill mid-run)
    log_extra: dict[str, Any] = field(default_factory=dict)

    def my_units(self) -> list[tuple[int, int]]:
        return shard(work_units(len(self.items), self.samples_per_prompt), self.rank, self.world)


def run_job(job: GenerationJob) -> dict[str, Any]:
    """Generate this rank's missing images; returns counts and seconds. Existing complete PNGs are skipped."""
    from PIL import Image
    from tqdm import tqdm

    from ..checkpoints import atomic_output
    from ..pipelines.common import to_uint8

    units = job.my_units()
    todo = [(p, s) for p, s in units if not is_complete_png(sample_path(job.out, p, s))]
    log_path = Path(job.out) / LOGS / f"rank-{job.rank:02d}.jsonl"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    done, secs = 0, 0.0
    bar = tqdm(total=len(units), initial=len(units) - len(todo), desc=f"rank {job.rank}/{job.world}",
               position=job.rank, disable=not job.progress, leave=True, dynamic_ncols=True)
    try:
        with open(log_path, "a", encoding="utf-8") as log:
            for p, s in todo:
                if job.limit is not None and done >= job.limit:
                    break
                item = job.items[p]
                seed = image_seed(job.seed, p, s)
                t0 = time.perf_counter()
                img, model_secs = job.generate_one(item, seed)
                with atomic_output(sample_path(job.out, p, s)) as f:
                    Image.fromarray(to_uint8(img[None] if img.dim() == 3 else img)[0]).save(f, format="PNG")
                wall = time.perf_counter() - t0
                # a log line is written after its image: a killed run can lose a line, never claim a missing image
                log.write(json.dumps({"prompt": p, "sample": s, "seed": seed, "seconds": model_secs, "wall": wall,
                                      "rank": job.rank, "world": job.world, **job.log_extra}) + "\n")
                log.flush()
                done += 1
                secs += model_secs
                bar.update(1)
    finally:
        bar.close()
    return {"rank": job.rank, "assigned": len(units), "skipped": len(units) - len(todo), "generated": done,
            "seconds": secs, "remaining": len(todo) - done}


def read_timings(out: Path) -> list[dict[str, Any]]:
    """Per-image log lines of a run (last line per image wins; a torn last line of a killed run is ignored)."""
    rows: dict[tuple[int, int], dict] = {}
    for path in sorted((Path(out) / LOGS).glob("rank-*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                r = json.loads(line)
                rows[(int(r["prompt"]), int(r["sample"]))] = r
            except (ValueError, KeyError, TypeError):
                continue
    return [rows[k] for k in sorted(rows)]


def make_manifest(*, model: str, weights: dict[str, Any], plan: Any, seed: int, samples_per_prompt: int,
                  items: Sequence[PromptItem], prompts_file: str | None, sampling: dict[str, Any], world: int,
                  device: str, dtype: str) -> dict[str, Any]:
    """The run's identity (``IDENTITY_FIELDS``) plus how it ran; ``plan`` is a preset name, a plan dict or None."""
    return {
        "model": model, "weights": weights, "plan": plan, "seed": seed, "samples_per_prompt": samples_per_prompt,
        "prompts_file": prompts_file, "prompts_sha256": prompts_digest(items), "num_prompts": len(items),
        "sampling": sampling, "seed_rule": SEED_RULE, "layout": "<00000>/metadata.jsonl, <00000>/samples/<0000>.png",
        "world_size": world, "device": device, "dtype": dtype, "versions": versions(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "pid": os.getpid(),
    }


__all__ = ["GenerationJob", "MANIFEST", "check_manifest", "clean_stale_temp", "image_seed", "is_complete_png",
           "make_manifest", "prompt_dir", "read_timings", "run_job", "sample_path", "shard", "work_units",
           "write_manifest", "write_metadata"]
