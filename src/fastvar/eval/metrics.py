"""Scorers over image folders: FID (overall and per MJHQ category), CLIP score, HPSv2.1, ImageReward, fidelity.

Each scorer takes the networks it uses as arguments (``feature=``, ``model=``/``processor=``, ``lpips_fn=``),
so tests inject tiny random-weight networks of the same architectures, and the loaders below
(:func:`load_inception`, :func:`load_clip`, :func:`load_hps`, :func:`load_imagereward`, :func:`load_lpips`)
find the real weights in the usual caches or at a given local path. Offline, a missing weight fails at
once with the file's name and where to put it, instead of a traceback from a download halfway through.

Libraries: FID = torchmetrics' Inception-v3 feature extractor (torch-fidelity's port of the 2015 TF
weights) and torchmetrics' Fréchet distance; CLIP score = transformers' CLIPModel (ViT-L/14), cosine
× 100 clipped at 0 (torchmetrics' definition; its ``CLIPScore`` class itself is not used because with
transformers 5 ``get_image_features`` returns an output object it cannot normalise, and it cuts long
captions after tokenising, dropping CLIP's end token, where the tokenizer's truncation keeps it);
HPSv2.1 = the ``hpsv2`` package; ImageReward = the ``image-reward`` package; PSNR/SSIM = torchmetrics;
LPIPS = the ``lpips`` package (AlexNet).
"""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import MissingInputError, UsageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
CLIP_DEFAULT = "openai/clip-vit-large-patch14"
HPS_FILE = "HPS_v2.1_compressed.pt"
IMAGEREWARD_FILES = ("ImageReward.pt", "med_config.json")


# ------------------------------------------------------------------------------------------------ image folders
@dataclass
class ImageRecord:
    """One image of a folder: its path, key (relative path: how two runs' images are matched), prompt and
    metadata (GenEval layout), and category (MJHQ metadata, or the first sub-folder of a flat tree)."""

    path: Path
    key: str
    prompt: str | None = None
    metadata: dict[str, Any] | None = None
    category: str | None = None


def is_generation_layout(root: Path) -> bool:
    return any(p.is_dir() and p.name.isdigit() and (p / "samples").is_dir() for p in Path(root).iterdir())


def collect_images(root: str | Path, flag: str = "--images") -> list[ImageRecord]:
    """The images of ``root``: a generation folder (``<00000>/samples/<0000>.png`` + ``metadata.jsonl``) or any
    tree of image files (MJHQ-30K's ``<category>/<id>.jpg``: the first sub-folder is the category)."""
    root = Path(root).expanduser()
    if not root.exists():
        raise MissingInputError(f"{flag} {root}: does not exist; pass a folder of images")
    if not root.is_dir():
        raise UsageError(f"{flag} {root}: is not a folder; pass a folder of images")
    records: list[ImageRecord] = []
    if is_generation_layout(root):
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit()):
            meta_path = folder / "metadata.jsonl"
            meta = None
            if meta_path.is_file():
                lines = meta_path.read_text(encoding="utf-8").strip().splitlines()
                meta = json.loads(lines[0]) if lines else None
            samples = folder / "samples"
            for img in sorted(samples.iterdir()) if samples.is_dir() else []:
                if img.is_file() and re.fullmatch(r"\d+\.png", img.name):
                    records.append(ImageRecord(img, f"{folder.name}/samples/{img.name}", (meta or {}).get("prompt"), meta,
                                               (meta or {}).get("category")))
    else:
        for img in sorted(root.rglob("*")):
            if img.is_file() and img.suffix.lower() in IMAGE_SUFFIXES and not img.name.startswith("."):
                rel = img.relative_to(root)
                records.append(ImageRecord(img, rel.as_posix(), category=rel.parts[0] if len(rel.parts) > 1 else None))
    if not records:
        raise UsageError(f"{flag} {root}: holds no images (expected <00000>/samples/<0000>.png or image files)")
    return records


def load_rgb(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB, EXIF orientation applied (as GenEval opens images)."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        return np.array(ImageOps.exif_transpose(im).convert("RGB"))  # writable: torch.from_numpy warns otherwise


def _uint8_batches(records: Sequence[ImageRecord], batch_size: int) -> Iterator[tuple[list[ImageRecord], Tensor]]:
    """(records, uint8 (N, 3, H, W)) batches of consecutive same-size images (extractors resize internally)."""
    chunk: list[ImageRecord] = []
    arrays: list[np.ndarray] = []
    for r in records:
        a = load_rgb(r.path)
        if arrays and (a.shape != arrays[0].shape or len(arrays) >= batch_size):
            yield chunk, torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
            chunk, arrays = [], []
        chunk.append(r)
        arrays.append(a)
    if arrays:
        yield chunk, torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


# ------------------------------------------------------------------------------------------------ weights
def _online(host: str, timeout: float = 3.0) -> bool:
    """Whether ``host`` answers on 443 (offline detection, so a missing weight fails in seconds)."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("FASTVAR_OFFLINE") == "1":
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def missing_weight(filename: str, where: str, flag: str, source: str) -> MissingInputError:
    return MissingInputError(f"{filename} not found and no network to download it: put it in {where} "
                             f"(download: {source}) or pass its local path with {flag}")


def _missing_library(package: str, extra: str = "eval-gpu", note: str = "") -> ImportError:
    return ImportError(f"this metric needs the `{package}` package{note}: pip install {package} "
                       f"(or pip install 'fastvar-vision[{extra}]')")


def resolve_hf_model(ref: str, flag: str) -> str:
    """A local folder, or a hub id already in the Hugging Face cache (or downloadable): what
    ``from_pretrained`` gets. A hub id that is neither cached nor reachable fails here, naming the fix."""
    p = Path(ref).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise UsageError(f"{flag} {ref}: the folder has no config.json; pass a transformers model folder")
        return str(p)
    if ref.startswith(("/", ".", "~")) or ref.count("/") != 1:
        raise MissingInputError(f"{flag} {ref}: no such folder (and not a hub id owner/name); pass the local "
                                "folder of the downloaded model")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(ref, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached (the hub raises several types for that)
        pass
    if not _online("huggingface.co"):
        try:
            from huggingface_hub.constants import HF_HUB_CACHE
        except ImportError:
            HF_HUB_CACHE = "~/.cache/huggingface/hub"
        raise missing_weight(f"{ref} (config.json + model.safetensors)", f"the Hugging Face cache {HF_HUB_CACHE}",
                             flag, f"huggingface-cli download {ref}")
    return ref


def _local_or_cached(path: str | None, default_dir: Path, filename: str, flag: str, source: str, host: str) -> Path | None:
    """``path`` (must exist), else ``default_dir/filename`` when cached, else None (download allowed: online)."""
    if path is not None:
        p = Path(path).expanduser()
        if p.is_dir():
            p = p / filename
        if not p.is_file():
            raise MissingInputError(f"{flag} {path}: no such file; pass the path of {filename}")
        return p
    cached = default_dir / filename
    if cached.is_file():
        return cached
    if not _online(host):
        raise missing_weight(filename, str(default_dir), flag, source)
    return None


# ------------------------------------------------------------------------------------------------ FID
def load_inception(weights: str | None = None, device: str = "cpu") -> nn.Module:
    """torchmetrics' FID Inception-v3 (torch-fidelity's port of the 2015 TF graph; 2048-d pool features).

    Weights: ``weights`` (local file), else ``<torch hub>/checkpoints/weights-inception-2015-12-05-6726825d.pth``
    (where torch-fidelity downloads it).
    """
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        raise _missing_library("torch-fidelity", note=" (FID's Inception-v3; it requires torchvision)") from None
    from torchmetrics.image.fid import NoTrainInceptionV3

    hub = Path(torch.hub.get_dir()) / "checkpoints"
    path = _local_or_cached(weights, hub, INCEPTION_FILE, "--inception-weights", INCEPTION_URL, "github.com")
    net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                             feature_extractor_weights_path=None if path is None else str(path))
    return net.eval().to(device)


@torch.no_grad()
def extract_features(records: Sequence[ImageRecord], feature: nn.Module, batch_size: int = 32,
                     device: str = "cpu", progress: bool = False) -> np.ndarray:
    """(N, D) float64 features of ``records`` from ``feature`` (uint8 (N, 3, H, W) in, as torchmetrics' FID feeds it)."""
    from tqdm import tqdm

    feats = []
    bar = tqdm(total=len(records), desc="features", disable=not progress)
    for chunk, x in _uint8_batches(records, batch_size):
        f = feature(x.to(device))
        feats.append(f.reshape(f.shape[0], -1).double().cpu().numpy())
        bar.update(len(chunk))
    bar.close()
    return np.concatenate(feats)


def stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma): mean and unbiased covariance, as torchmetrics' FID and clean-fid/pytorch-fid compute them."""
    if len(features) < 2:
        raise UsageError(f"FID needs at least 2 images per side, got {len(features)}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance of two Gaussians: torchmetrics' implementation (float64)."""
    from torchmetrics.image.fid import _compute_fid

    t = [torch.as_tensor(np.asarray(v, dtype=np.float64)) for v in (mu1, sigma1, mu2, sigma2)]
    return float(_compute_fid(*t))


def save_stats(path: str | Path, overall: tuple[np.ndarray, np.ndarray],
               per_category: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> None:
    """An ``.npz`` with ``mu``/``sigma`` (clean-fid/pytorch-fid keys) and ``mu_<cat>``/``sigma_<cat>``, atomically."""
    from ..checkpoints import atomic_output

    arrays = {"mu": overall[0], "sigma": overall[1]}
    for cat, (mu, sigma) in (per_category or {}).items():
        arrays[f"mu_{cat}"], arrays[f"sigma_{cat}"] = mu, sigma
    with atomic_output(path) as f:
        np.savez(f, **arrays)


def load_stats(path: str | Path, flag: str = "--ref") -> tuple[tuple[np.ndarray, np.ndarray], dict[str, tuple]]:
    """(overall (mu, sigma), {category: (mu, sigma)}) from an ``.npz`` written by :func:`save_stats` or clean-fid."""
    try:
        z = np.load(Path(path), allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UsageError(f"{flag} {path}: not a readable .npz ({e}); pass statistics with mu and sigma") from None
    if "mu" not in z or "sigma" not in z:
        raise UsageError(f"{flag} {path}: the .npz has no mu/sigma arrays (keys: {sorted(z.files)})")
    cats = {k[3:]: (z[k], z[f"sigma_{k[3:]}"]) for k in z.files if k.startswith("mu_") and f"sigma_{k[3:]}" in z}
    return (z["mu"], z["sigma"]), cats


def _by_category(records: Sequence[ImageRecord], feats: np.ndarray) -> dict[str, np.ndarray]:
    out: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        if r.category is not None:
            out.setdefault(r.category, []).append(i)
    return {c: feats[idx] for c, idx in out.items()}


def fid_score(gen: Sequence[ImageRecord], ref_records: Sequence[ImageRecord] | None = None,
              ref_stats: tuple[tuple[np.ndarray, np.ndarray], dict[str, tuple]] | None = None, *,
              feature: nn.Module, batch_size: int = 32, device: str = "cpu", progress: bool = False,
              save_ref_stats: str | Path | None = None) -> dict[str, Any]:
    """FID of generated images against a reference folder or precomputed statistics, overall and per category.

    A category is scored when both sides have it with at least 2 images (MJHQ-30K: 10 categories, from the
    generation metadata and the reference sub-folders / ``mu_<cat>`` keys).
    """
    if (ref_records is None) == (ref_stats is None):
        raise ValueError("give exactly one of ref_records and ref_stats")
    g = extract_features(gen, feature, batch_size, device, progress)
    if ref_records is not None:
        r = extract_features(ref_records, feature, batch_size, device, progress)
        ref_overall = stats(r)
        ref_cats = {c: stats(f) for c, f in _by_category(ref_records, r).items() if len(f) >= 2}
        if save_ref_stats is not None:
            save_stats(save_ref_stats, ref_overall, ref_cats)
    else:
        ref_overall, ref_cats = ref_stats
    out: dict[str, Any] = {"fid": frechet_distance(*stats(g), *ref_overall), "num_images": len(g)}
    per_cat = {}
    for cat, f in sorted(_by_category(gen, g).items()):
        if cat in ref_cats and len(f) >= 2:
            per_cat[cat] = {"fid": frechet_distance(*stats(f), *ref_cats[cat]), "num_images": len(f)}
    if per_cat:
        out["categories"] = per_cat
        out["category_mean"] = float(np.mean([v["fid"] for v in per_cat.values()]))
    return out


# ------------------------------------------------------------------------------------------------ CLIP score
def load_clip(ref: str = CLIP_DEFAULT, device: str = "cpu", flag: str = "--clip-model"):
    """(CLIPModel, CLIPProcessor) from a local folder or the Hugging Face cache (transformers)."""
    try:
        from transformers import CLIPModel, CLIPProcessor
    except ImportError:
        raise _missing_library("transformers", "eval") from None
    src = resolve_hf_model(ref, flag)
    return CLIPModel.from_pretrained(src).eval().to(device), CLIPProcessor.from_pretrained(src)


def _clip_features(out) -> Tensor:
    return out if isinstance(out, Tensor) else out.pooler_output


@torch.no_grad()
def clip_scores(images: Sequence[np.ndarray], prompts: Sequence[str], model, processor, device: str = "cpu") -> list[float]:
    """Per image: 100 × max(cos(image, text), 0) with CLIP (captions truncated by the tokenizer to 77 tokens)."""
    from PIL import Image

    px = processor(images=[Image.fromarray(a) for a in images], return_tensors="pt")["pixel_values"].to(device)
    tok = processor(text=list(prompts), return_tensors="pt", padding=True, truncation=True, max_length=77)
    fi = _clip_features(model.get_image_features(pixel_values=px))
    ft = _clip_features(model.get_text_features(input_ids=tok["input_ids"].to(device),
                                                attention_mask=tok["attention_mask"].to(device)))
    cos = torch.nn.functional.cosine_similarity(fi.float(), ft.float(), dim=-1)
    return (100.0 * cos).clamp(min=0).cpu().tolist()


def _with_prompts(records: Sequence[ImageRecord], metric: str) -> list[ImageRecord]:
    missing = [r.key for r in records if not r.prompt]
    if missing:
        raise UsageError(f"{metric} needs each image's prompt: {missing[0]} has none (expected a generation folder "
                         "with <00000>/metadata.jsonl from `fastvar eval generate`)")
    return list(records)


def score_prompted(records: Sequence[ImageRecord], score_batch: Callable[[list[np.ndarray], list[str]], list[float]],
                   metric: str, batch_size: int = 16, progress: bool = False) -> dict[str, Any]:
    """Mean (and per-category mean) of a per-(image, prompt) score over a generation folder."""
    from tqdm import tqdm

    records = _with_prompts(records, metric)
    scores: list[float] = []
    for i in tqdm(range(0, len(records), batch_size), desc=metric, disable=not progress):
        chunk = records[i:i + batch_size]
        scores.extend(float(s) for s in score_batch([load_rgb(r.path) for r in chunk], [r.prompt for r in chunk]))
    out: dict[str, Any] = {metric: float(np.mean(scores)), "num_images": len(scores)}
    cats: dict[str, list[float]] = {}
    for r, s in zip(records, scores):
        if r.category is not None:
            cats.setdefault(r.category, []).append(s)
    if cats:
        out["categories"] = {c: {metric: float(np.mean(v)), "num_images": len(v)} for c, v in sorted(cats.items())}
    out["per_image"] = {r.key: s for r, s in zip(records, scores)}
    return out


# ------------------------------------------------------------------------------------------------ HPSv2.1
class HPSv21:
    """HPSv2.1 through the ``hpsv2`` package: its open_clip ViT-H-14, preprocessing and tokenizer, with the
    ``HPS_v2.1_compressed.pt`` weights loaded once (``hpsv2.score`` reloads them on every call)."""

    def __init__(self, checkpoint: str | None = None, device: str = "cuda") -> None:
        try:
            import hpsv2.img_score as hs
            from hpsv2.utils import root_path
        except ImportError:
            raise _missing_library("hpsv2", note=" (it requires open_clip and torchvision)") from None

        path = _local_or_cached(checkpoint, Path(root_path), HPS_FILE, "--hps-weights",
                                "huggingface.co/xswu/HPSv2 (HPS_v2.1_compressed.pt)", "huggingface.co")
        if path is None:
            try:
                import huggingface_hub
            except ImportError:
                raise _missing_library("huggingface_hub", "hub", " (to download HPS_v2.1_compressed.pt)") from None
            path = Path(huggingface_hub.hf_hub_download("xswu/HPSv2", HPS_FILE))
        hs.device = device
        hs.initialize_model()
        self.model = hs.model_dict["model"]
        self.preprocess = hs.model_dict["preprocess_val"]
        state = torch.load(path, map_location=device, weights_only=False)
        self.model.load_state_dict(state["state_dict"])
        self.model = self.model.to(device).eval()
        self.tokenizer = hs.get_tokenizer("ViT-H-14")
        self.device = device

    @torch.no_grad()
    def __call__(self, images: list[np.ndarray], prompts: list[str]) -> list[float]:
        from PIL import Image

        x = torch.stack([self.preprocess(Image.fromarray(a)) for a in images]).to(self.device)
        text = self.tokenizer(list(prompts)).to(self.device)
        with torch.autocast(device_type=torch.device(self.device).type, enabled=self.device != "cpu"):
            out = self.model(x, text)
            return torch.diagonal(out["image_features"] @ out["text_features"].T).float().cpu().tolist()


# ------------------------------------------------------------------------------------------------ ImageReward
class ImageRewardScorer:
    """ImageReward-v1.0 through the ``image-reward`` package (BLIP + MLP; ``ImageReward.pt``, ``med_config.json``
    in ``~/.cache/ImageReward`` or ``--imagereward-dir``; its BERT tokenizer ``bert-base-uncased`` from the HF cache)."""

    def __init__(self, root: str | None = None, device: str = "cuda") -> None:
        try:
            import ImageReward as RM
        except ImportError:
            raise _missing_library("image-reward", note=" (import name ImageReward; it requires torchvision)") from None
        d = Path(root).expanduser() if root else Path("~/.cache/ImageReward").expanduser()
        for name in IMAGEREWARD_FILES:
            if not (d / name).is_file() and not _online("huggingface.co"):
                raise missing_weight(name, str(d), "--imagereward-dir", f"huggingface.co/THUDM/ImageReward ({name})")
        resolve_hf_model("bert-base-uncased", "--imagereward-dir (BLIP's tokenizer)")
        self.model = RM.load("ImageReward-v1.0", device=device, download_root=str(d))

    @torch.no_grad()
    def __call__(self, images: list[np.ndarray], prompts: list[str]) -> list[float]:
        from PIL import Image

        out = []
        for a, p in zip(images, prompts):
            s = self.model.score(p, [Image.fromarray(a)])
            out.append(float(s[0] if isinstance(s, list) else s))
        return out


# ------------------------------------------------------------------------------------------------ fidelity
def load_lpips(net: str = "alex", device: str = "cpu") -> nn.Module:
    """LPIPS (the ``lpips`` package; its linear heads ship in the wheel, the AlexNet backbone comes from
    torchvision's model zoo: ``alexnet-owt-7be5be79.pth`` in the torch hub cache)."""
    try:
        import lpips
    except ImportError:
        raise _missing_library("lpips", note=" (it requires torchvision)") from None
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    backbone = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}.get(net)
    if backbone:
        _local_or_cached(None, hub, backbone, "(torch hub cache)", "torchvision's model zoo", "download.pytorch.org")
    return lpips.LPIPS(net=net, verbose=False).eval().to(device)


def match_pairs(images: Sequence[ImageRecord], ref: Sequence[ImageRecord]) -> list[tuple[ImageRecord, ImageRecord]]:
    """Pairs of the same key (prompt folder + sample index); every image must have its reference."""
    by_key = {r.key: r for r in ref}
    missing = [r.key for r in images if r.key not in by_key]
    if missing:
        raise UsageError(f"--ref has no image {missing[0]} ({len(missing)} of {len(images)} missing); generate the "
                         "baseline with the same prompts, --samples-per-prompt and --seed")
    return [(r, by_key[r.key]) for r in images]


@torch.no_grad()
def fidelity(pairs: Sequence[tuple[ImageRecord, ImageRecord]], metrics: Sequence[str] = ("psnr", "ssim", "lpips"),
             lpips_fn: Callable[[Tensor, Tensor], Tensor] | None = None, device: str = "cpu",
             progress: bool = False) -> dict[str, Any]:
    """Mean per-image PSNR (dB, data range 1), SSIM (torchmetrics) and LPIPS (inputs in [-1, 1]) of each
    image against its reference. Identical images have infinite PSNR: the mean is then taken over the
    finite ones and ``psnr_identical`` counts the others."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
    from tqdm import tqdm

    vals: dict[str, list[float]] = {m: [] for m in metrics}
    identical = 0
    for a, b in tqdm(pairs, desc="fidelity", disable=not progress):
        x = torch.from_numpy(load_rgb(a.path)).permute(2, 0, 1)[None].float().div(255)
        y = torch.from_numpy(load_rgb(b.path)).permute(2, 0, 1)[None].float().div(255)
        if x.shape != y.shape:
            raise UsageError(f"{a.key}: size {tuple(x.shape[2:])} differs from the reference's {tuple(y.shape[2:])}")
        same = torch.equal(x, y)
        identical += int(same)
        if "psnr" in vals and not same:
            vals["psnr"].append(float(peak_signal_noise_ratio(x, y, data_range=1.0)))
        if "ssim" in vals:
            vals["ssim"].append(1.0 if same else float(structural_similarity_index_measure(x, y, data_range=1.0)))
        if "lpips" in vals:
            if lpips_fn is None:
                raise ValueError("lpips requested without an lpips_fn (see load_lpips)")
            vals["lpips"].append(float(lpips_fn(x.to(device) * 2 - 1, y.to(device) * 2 - 1).mean()))
    out: dict[str, Any] = {"num_images": len(pairs), "psnr_identical": identical}
    for m, v in vals.items():
        out[m] = float(np.mean(v)) if v else (float("inf") if m == "psnr" and identical else float("nan"))
    return out


__all__ = ["CLIP_DEFAULT", "HPSv21", "ImageRecord", "ImageRewardScorer", "clip_scores", "collect_images",
           "extract_features", "fid_score", "fidelity", "frechet_distance", "load_clip", "load_inception", "load_lpips",
           "load_rgb", "load_stats", "match_pairs", "resolve_hf_model", "save_stats", "score_prompted", "stats"]
