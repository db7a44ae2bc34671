"""Sampling images from a pipeline, seeded and batched, and laying them out as grids."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .pipeline import sampler_settings


@torch.no_grad()
def generate_images(
    pipe,
    prompts: list[str],
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = False,
    **overrides,
) -> np.ndarray:
    """uint8 (N, H, W, 3) images, one per prompt, with the model's default sampler settings.

    Batch i uses the generator seeded `seed + i * batch_size`, so the same prompts and seed
    give the same images whatever else runs.
    """
    settings = {**sampler_settings(pipe), **overrides}
    out = []
    starts = range(0, len(prompts), batch_size)
    for i in tqdm(starts, desc="generate", disable=not progress, unit="batch"):
        gen = torch.Generator(device="cpu").manual_seed(seed + i)
        result = pipe(prompts[i : i + batch_size], generator=gen, output_type="np", **settings)
        out.append(np.clip(np.rint(result.images * 255), 0, 255).astype(np.uint8))
    return np.concatenate(out)


def image_grid(images: np.ndarray, columns: int = 8, scale: int = 1, pad: int = 1) -> Image.Image:
    """Tile uint8 images (N, H, W, 3) into one picture, `columns` wide, upscaled by `scale`."""
    n, h, w, _ = images.shape
    columns = min(columns, n)
    rows = -(-n // columns)
    canvas = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), 255, np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        canvas[y : y + h, x : x + w] = image
    picture = Image.fromarray(canvas)
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    return picture
