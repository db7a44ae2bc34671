"""Plain fine-tuning of a model's denoiser on (image, caption) data, optionally honouring a mask.

This is what a user — or an attacker — does after a model is released: it is the lower
level of FreezeAsGuard, the "relearning attack" a guard must withstand, and the resurgence
probe of the evaluation. A frozen-tensor mask (`freeze`: names of the denoiser's tensors)
keeps those tensors at their released values. Every family: the loss is the family's own
(ε or v on a DDPM schedule, the flow velocity for SD3 and Flux).

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


def denoising_loss(family, denoiser, scheduler, x0: torch.Tensor, cond, generator: torch.Generator,
                   params: dict | None = None, t_range: tuple[int, int] | None = None) -> torch.Tensor:
    """‖y − f_θ(x_t, c, t)‖², the family's own training loss: x_t its noising of `x0`, y its
    target (ε, v or the flow velocity ε − x_0), with ε and t (uniform in `t_range`, default
    all) drawn from `generator`; `cond` a family `Conditioning`. With `params`, the denoiser
    is called with those tensors in place of its own (FreezeAsGuard's mixed weights)."""
    from .engine.frozen import WithParams

    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    lo, hi = t_range or (0, scheduler.config.num_train_timesteps)
    t = torch.randint(lo, hi, (len(x0),), generator=generator).to(x0.device)
    net = denoiser if params is None else WithParams(denoiser, params)
    pred = family.predict(net, family.add_noise(scheduler, x0, noise, t), t, cond)
    return (pred - family.target(scheduler, x0, noise, t)).pow(2).mean()


def encode_captions(pipe, captions: list[str]):
    """The family's conditioning of `captions` by the pipeline's own text encoders, no
    gradient: what fine-tuning and FreezeAsGuard train the denoiser on."""
    from .families import family_of

    with torch.no_grad():
        return family_of(pipe).encode(pipe, list(captions), lambda name: getattr(pipe, name))


def finetune(pipe, data: Captioned, steps: int = 100, lr: float = 1e-4, batch_size: int = 8,
             freeze: set[str] | frozenset = frozenset(), seed: int = 0, progress: bool = True) -> dict:
    """Fine-tune the pipeline's denoiser (UNet or transformer) in place on `data` with its
    family's training loss; `freeze` tensors stay.

    Returns the first and last losses. The text encoders and VAE are not trained.
    """
    from .families import family_of

    family = family_of(pipe)
    denoiser = getattr(pipe, family.denoiser)
    for name in (*family.present_text_encoders(pipe), "vae"):
        getattr(pipe, name).requires_grad_(False)
    params = [p for n, p in denoiser.named_parameters() if n not in freeze]
    # Every tensor keeps requires_grad and frozen ones are simply left out of the optimiser:
    # switching it off for part of a layer (e.g. a GroupNorm's weight but not its bias, as
    # FreezeAsGuard masks do) crashed libtorch 2.13's CPU backward with a segfault.
    denoiser.requires_grad_(True)
    if not params:
        raise ObliviateError(f"every {family.denoiser} tensor is frozen; nothing to fine-tune")
    scheduler = family.training_scheduler(pipe)
    latents = encode_images(pipe, data.images)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    denoiser.train()
    for _ in tqdm(range(steps), desc="finetune", disable=not progress):
        idx = torch.randint(0, len(latents), (batch_size,), generator=generator)
        cond = encode_captions(pipe, [data.captions[i] for i in idx.tolist()])
        loss = denoising_loss(family, denoiser, scheduler, latents[idx].to(pipe.device), cond, generator)
        if not torch.isfinite(loss):
            raise ObliviateError("fine-tuning loss became non-finite; lower --lr")
        denoiser.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    denoiser.zero_grad(set_to_none=True)
    denoiser.eval().requires_grad_(False)
    return {"loss_first": float(np.mean(losses[:10])), "loss_last": float(np.mean(losses[-10:])),
            "steps": steps, "trained_tensors": len(params)}
