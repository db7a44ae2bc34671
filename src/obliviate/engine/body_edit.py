"""A closed-form edit of the denoiser body: noisy images of the target, whatever the caption,
are read by the body's convolutions as the same-seed images of its anchor.

For every convolution W of the body's coarse levels (`Family.body_convolutions`), with x_s the
channel vector at each pixel of the layer's input for noisy target images, x_a the same for
the same-seed images of the anchor (same noise and t, the caption's anchor counterpart or the
same empty caption) and x_k for images that must stay (the anchor's, kept concepts', memory
prompts', earlier targets' as the model now reads them), one channel map per layer:
    M = (λI + Σ x_a x_sᵀ + Σ x_k x_kᵀ)(λI + Σ x_s x_sᵀ + Σ x_k x_kᵀ)⁻¹,
    W'[:, :, i, j] = W[:, :, i, j]·M,
λ = `lam` × trace(Σ x_k x_kᵀ)/d: UCE's closed form (`closed_form.gram_matrix`) on the inputs of
the body instead of the text. Why: an edit of the K/V changes where a word points, and a soft
prompt finds another text state that reads as the target (UCE --robust's RECE rounds: star
back at 0.92 under the quick ladder); the body then still draws it. With this edit the full
36-rung ladder brings star back at worst 0.23 and 0.35 after `uce --robust` and 0.06 and
0.13 after `duge --robust` (erase seeds 0 and 1), which runs it in place of the hardening
stage for a request naming only objects (`body_stage`; docs/experiments.md, sessions 40-41).
Choices where nothing decides: every feature is read from the model before the request, for
every layer at once; images are the lineage's original model's drawings (`base_latents`,
cached per lineage); a target image is read under its own caption and under the empty one (a
soft prompt is neither); a channel map per pixel rather than a map of 3×3 patches (no weaker
under the quick ladder, at a fifth of the seconds); the coarse levels only (an object is laid
out there; the mid block alone left the ladder at 0.69). Measured on objects; on every level
for a style (striped) it cost dotted 0.25, so styles and colours are hardened instead. A
transformer denoiser has no convolutions in its body, so there the edit changes nothing
(`body_layers` 0).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .closed_form import edit_prompts, gram_matrix


Prompts = tuple[list[str], list[str], list[str]]  # target, anchor and kept prompts (edit_prompts)


def channel_rows(x: torch.Tensor) -> torch.Tensor:
    """A conv input (B, C, H, W) as rows of channel vectors, float32."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]).float()


@torch.no_grad()
def body_channel_maps(ctx, layers: dict[str, nn.Conv2d], prompts: Prompts, timesteps: list[int],
                      lam: float, seed: int) -> dict[str, torch.Tensor]:
    """The channel map M of every layer (formula above), from the model as it is now; float64."""
    lat_t, lat_a, lat_k = (ctx.base_latents(p, seed) for p in prompts)
    # each image set under its own captions and under the empty one, encoded once
    own_t, own_a, own_k = (ctx.encode(p, frozen=True) for p in prompts)
    empty = ctx.encode([""], frozen=True)
    grams = {n: {"ee": 0.0, "ge": 0.0, "pp": 0.0} for n in layers}
    seen: dict[str, torch.Tensor] = {}

    def keep_input(name):
        return lambda _module, args: seen.__setitem__(name, channel_rows(args[0]))

    hooks = [m.register_forward_pre_hook(keep_input(n)) for n, m in layers.items()]
    gen = torch.Generator().manual_seed(seed)

    def read(latents, cond, noise, t):
        seen.clear()
        x_t = ctx.family.add_noise(ctx.noise_scheduler, latents, noise, t)
        ctx.eps(x_t.to(ctx.device), t.to(ctx.device), cond)
        return dict(seen)

    def add(name, key, a, b):
        grams[name][key] = grams[name][key] + (a.T @ b).double().cpu()

    try:
        for step in timesteps:
            noise, t = torch.randn(lat_t.shape, generator=gen), torch.full((len(lat_t),), step)
            for c_t, c_a in ((own_t, own_a), (empty.expand(len(lat_t)), empty.expand(len(lat_a)))):
                f_t, f_a = read(lat_t, c_t, noise, t), read(lat_a, c_a, noise, t)
                for n in layers:
                    add(n, "ee", f_t[n], f_t[n])
                    add(n, "ge", f_a[n], f_t[n])
                    add(n, "pp", f_a[n], f_a[n])
            noise, t = torch.randn(lat_k.shape, generator=gen), torch.full((len(lat_k),), step)
            for c_k in (own_k, empty.expand(len(lat_k))):
                f_k = read(lat_k, c_k, noise, t)
                for n in layers:
                    add(n, "pp", f_k[n], f_k[n])
    finally:
        for h in hooks:
            h.remove()
    ridge = {n: lam * float(torch.trace(g["pp"])) / len(g["pp"]) for n, g in grams.items()}
    return {n: gram_matrix(g["ee"], g["ge"], g["pp"], ridge[n]) for n, g in grams.items()}


def per_tap(weight: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """W[:, :, k, l]·M for every tap (k, l) of a conv kernel: Σ_i W[o, i, k, l]·M[i, j]."""
    return torch.einsum("oikl,ij->ojkl", weight, m)


@torch.no_grad()
def apply_channel_maps(layers: dict[str, nn.Conv2d], maps: dict[str, torch.Tensor]) -> int:
    """W'[o, j, k, l] = Σ_i W[o, i, k, l]·M[i, j] for every layer; returns how many."""
    for name, conv in layers.items():
        w = per_tap(conv.weight.double(), maps[name].to(conv.weight.device))
        conv.weight.copy_(w.to(conv.weight.dtype))
    return len(layers)


@torch.no_grad()
def read_body_edit(ctx, robust) -> tuple[dict[str, nn.Conv2d], dict[str, torch.Tensor]]:
    """The layers this request's body edit maps and their maps, read from the model as it is
    now with the `--robust` plug-in's `body_*` settings: `body_pairs` target prompts and their
    anchor counterparts; kept, 2 prompts per preserved concept, `body_keep` memory prompts and
    body_pairs/2 per earlier target (`closed_form.edit_prompts`, drawn at seed + 7), each read
    at `body_timesteps` timesteps on images drawn at seed + 101. No layers with `body_pairs=0`
    or in a denoiser without convolutions."""
    layers = ctx.family.body_convolutions(ctx.denoiser()) if robust.body_pairs else {}
    if not layers:
        return {}, {}
    rng = np.random.default_rng(ctx.seed + 7)
    pairs = robust.body_pairs
    drawn, kept = edit_prompts(ctx, rng, pairs, 2, robust.body_keep, max(1, pairs // 2))
    prompts = ([t for t, _ in drawn], [a for _, a in drawn], kept)
    steps = body_timesteps(robust.body_timesteps, ctx.noise_scheduler.config.num_train_timesteps)
    maps = body_channel_maps(ctx, layers, prompts, steps, robust.body_lambda, ctx.seed + 101)
    return layers, maps


def body_stage(ctx, robust) -> tuple[dict, dict] | None:
    """`--robust`'s body edit for a gradient method (`object_stage="body"`): on a request that
    names only objects, the layers and their maps (`read_body_edit`), read before the
    method's stage (applied after it, `apply_channel_maps`, in place of the hardening stage);
    None where there is nothing to map (`body_pairs=0`, a transformer) or the request names a
    colour or a style, and the hardening stage runs."""
    if robust is None or robust.object_stage != "body":
        return None
    if {t.kind for t in ctx.request.targets} != {"object"}:
        return None
    layers, maps = read_body_edit(ctx, robust)
    return (layers, maps) if layers else None


def body_timesteps(n: int, total: int) -> list[int]:
    """`n` timesteps spread evenly over [0.2, 0.8] of a `total`-step schedule."""
    return [int(round(total * f)) for f in np.linspace(0.2, 0.8, n)] if n > 1 else [total // 2]
