"""Images the frozen model generates for anchors, priors and the memory bank, cached on disk.

Erasure methods train on the model's own generations (what it draws for the anchor, for
related concepts, for unrelated prompts). Generating them is most of an erasure's cost on a
CPU, so they are cached as latents, keyed by the generating model's weight hash, the
prompts, the seed and the sampler settings: the same model asked the same thing is never
sampled twice, across requests and runs.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..pipeline import sampler_settings


def sample_pool(pool: dict, n: int, generator: torch.Generator) -> dict:
    """`n` entries of a prompt pool drawn with replacement: the same indices of every list
    and tensor in it (prompts, latents, their anchors)."""
    idx = torch.randint(0, len(pool["prompts"]), (n,), generator=generator).tolist()
    return {k: [v[i] for i in idx] if isinstance(v, list) else v[idx] for k, v in pool.items()}


def paired_pool(prompts: list[str], anchor_prompts: list[str], drawn) -> dict:
    """A pool of target prompts, their anchor captions and `drawn`'s images of both (one
    seed, so a target image and its anchor image share a layout)."""
    return {"prompts": prompts, "anchor_prompts": anchor_prompts, "latents": drawn(prompts),
            "anchor_latents": drawn(anchor_prompts)}


def either_prompt(pool: dict, n: int, generator: torch.Generator) -> dict:
    """`n` entries of a paired pool, each conditioned on its target's or its anchor's
    caption at random (half each)."""
    sub = sample_pool(pool, n, generator)
    use_anchor = torch.rand(n, generator=generator).lt(0.5).tolist()
    sub["prompts"] = [a if use else p for p, a, use in zip(sub["prompts"], sub.pop("anchor_prompts"), use_anchor)]
    return sub


def default_cache_dir() -> Path:
    """`$OBLIVIATE_CACHE`, else `~/.cache/obliviate`."""
    return Path(os.environ.get("OBLIVIATE_CACHE", Path.home() / ".cache" / "obliviate"))


class LatentCache:
    """Generated latents on disk: `get(pipe, model_sha, prompts, seed)` samples only once."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root else default_cache_dir()

    def key(self, model_sha: str, prompts: list[str], seed: int, settings: dict) -> str:
        blob = json.dumps([model_sha, prompts, seed, settings], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    @torch.no_grad()
    def get(self, pipe, model_sha: str, prompts: list[str], seed: int,
            batch_size: int = 64, progress: bool = False) -> torch.Tensor:
        """Latents (N, C, h, w), already scaled for the UNet, one per prompt."""
        settings = sampler_settings(pipe)
        path = self.root / "latents" / f"{self.key(model_sha, prompts, seed, settings)}.safetensors"
        if path.exists():
            return load_file(path)["latents"]
        chunks = []
        for i in tqdm(range(0, len(prompts), batch_size), desc="sample", disable=not progress, leave=False):
            gen = torch.Generator().manual_seed(seed + i)
            out = pipe(prompts[i : i + batch_size], generator=gen, output_type="latent", **settings)
            chunks.append(out.images.float().cpu())
        latents = torch.cat(chunks).contiguous()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file({"latents": latents}, tmp)
        os.replace(tmp, path)
        return latents


def read_image_folder(folder: str | Path, size: int, limit: int | None = None) -> "np.ndarray":
    """uint8 (N, size, size, 3) images from a folder (png/jpg/webp), centre-cropped, resized."""
    import numpy as np
    from PIL import Image

    from ..errors import ObliviateError

    folder = Path(folder)
    files = sorted(p for p in folder.glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    if not files:
        raise ObliviateError(f"no images (.png, .jpg, .webp) in {folder}")
    images = []
    for path in files[:limit]:
        im = Image.open(path).convert("RGB")
        side = min(im.size)
        left, top = (im.width - side) // 2, (im.height - side) // 2
        im = im.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
        images.append(np.asarray(im))
    return np.stack(images)


@torch.no_grad()
def encode_images(pipe, images) -> torch.Tensor:
    """VAE latents in the denoiser's space, (z − shift)·scale (SD3's VAE has a shift; SD
    1.x/2.x and SDXL none), of uint8 images, posterior mean."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    x = x.to(pipe.device, pipe.vae.dtype)
    from ..families import family_of

    shift = getattr(pipe.vae.config, "shift_factor", None) or 0.0
    z = (pipe.vae.encode(x).latent_dist.mean - shift) * pipe.vae.config.scaling_factor
    return family_of(pipe).pack(pipe, z).float().cpu()
