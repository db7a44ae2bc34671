"""Plain fine-tuning of a model's UNet on (image, caption) data, optionally honouring a mask.

This is what a user — or an attacker — does after a model is released: it is the lower
level of FreezeAsGuard, the "relearning attack" a guard must withstand, and the resurgence
probe of the evaluation. A frozen-tensor mask (`freeze`: names of UNet tensors) keeps those
tensors at their released values.

Data: a folder of images with captions (`captions.json`: {"file.png": "caption"}, or a
`.txt` beside each image), or, for the shapes world, a list of concepts to render.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .engine.data import encode_images, read_image_folder
from .errors import ObliviateError


@dataclass(frozen=True)
class Captioned:
    """Images (uint8, N x H x W x 3) and one caption each."""

    images: np.ndarray
    captions: list[str]


def read_captioned_folder(folder: str | Path, size: int) -> Captioned:
    """Images of `folder` with captions from `captions.json` or per-image `.txt` files."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ObliviateError(f"--data {folder} is not a folder of images")
    files = sorted(p for p in folder.glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    table = json.loads((folder / "captions.json").read_text()) if (folder / "captions.json").exists() else {}
    captions = []
    for p in files:
        if p.name in table:
            captions.append(table[p.name])
        elif p.with_suffix(".txt").exists():
            captions.append(p.with_suffix(".txt").read_text().strip())
        else:
            raise ObliviateError(f"{p.name} has no caption: add captions.json or {p.with_suffix('.txt').name}")
    return Captioned(read_image_folder(folder, size), captions)


def shapes_data(concepts: list[str], n: int, seed: int) -> Captioned:
    """`n` rendered images showing all of `concepts` (others random), with captions."""
    from .shapes import vocab, world

    rng = np.random.default_rng(seed)
    fixed = {vocab.concept(c).kind: vocab.concept(c).name for c in concepts}
    images, captions = [], []
    for _ in range(n):
        scene = world.Scene(**{**world.random_scene(rng).__dict__, **fixed})
        images.append(world.render(scene, int(rng.integers(2**31 - 1))))
        captions.append(world.caption(scene, rng, vocab.EVAL_TEMPLATE if rng.random() < 0.5 else None))
    return Captioned(np.stack(images), captions)


def prompt_ids(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids padded to the tokenizer's full length, as Stable Diffusion pipelines do."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def denoising_loss(unet, scheduler, x0: torch.Tensor, context: torch.Tensor,
                   generator: torch.Generator, params: dict | None = None,
                   t_range: tuple[int, int] | None = None) -> torch.Tensor:
    """‖ε − ε_θ(x_t, c, t)‖² with ε and t (uniform in `t_range`, default all) drawn from
    `generator`; with `params`, the UNet is called with those tensors in place of its own
    (torch.func.functional_call)."""
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    lo, hi = t_range or (0, scheduler.config.num_train_timesteps)
    t = torch.randint(lo, hi, (len(x0),), generator=generator).to(x0.device)
    args = (scheduler.add_noise(x0, noise, t), t, context)
    out = torch.func.functional_call(unet, params, args) if params is not None else unet(*args)
    return (out.sample - noise).pow(2).mean()


def finetune(pipe, data: Captioned, steps: int = 100, lr: float = 1e-4, batch_size: int = 8,
             freeze: set[str] | frozenset = frozenset(), seed: int = 0, progress: bool = True) -> dict:
    """Fine-tune `pipe.unet` in place on `data` with the denoising loss; `freeze` tensors stay.

    Returns the first and last losses. The text encoder and VAE are not trained.
    """
    from diffusers import DDPMScheduler

    unet = pipe.unet
    pipe.text_encoder.requires_grad_(False)
    pipe.vae.requires_grad_(False)
    params = [p for n, p in unet.named_parameters() if n not in freeze]
    # Every tensor keeps requires_grad and frozen ones are simply left out of the optimiser:
    # switching it off for part of a layer (e.g. a GroupNorm's weight but not its bias, as
    # FreezeAsGuard masks do) crashed libtorch 2.13's CPU backward with a segfault.
    unet.requires_grad_(True)
    if not params:
        raise ObliviateError("every UNet tensor is frozen; nothing to fine-tune")
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    latents = encode_images(pipe, data.images)
    ids = prompt_ids(pipe.tokenizer, data.captions)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    unet.train()
    for _ in tqdm(range(steps), desc="finetune", disable=not progress):
        idx = torch.randint(0, len(latents), (batch_size,), generator=generator)
        with torch.no_grad():
            context = pipe.text_encoder(ids[idx].to(pipe.device))[0]
        loss = denoising_loss(unet, scheduler, latents[idx].to(pipe.device), context, generator)
        if not torch.isfinite(loss):
            raise ObliviateError("fine-tuning loss became non-finite; lower --lr")
        unet.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    unet.zero_grad(set_to_none=True)
    unet.eval().requires_grad_(False)
    return {"loss_first": float(np.mean(losses[:10])), "loss_last": float(np.mean(losses[-10:])),
            "steps": steps, "trained_tensors": len(params)}
