"""A closed-form hold of the denoiser body's coarse levels after a hardening stage: what must
stay is read there as the model before the request read it, what the stage made of the
target is kept.

For every convolution W of the coarse levels (`Family.body_convolutions`), each tap (i, j) of
its kernel on its own, with x_k the channel vector at each pixel of the layer's input for
images that must stay, read by the model before the request (W_0 its weights then), and x_s
the same for the target's images read by the model after the stage and the method (W_h now):
    K = Σ x_k x_kᵀ,  S = Σ x_s x_sᵀ,  λ = `hold_lambda` × trace(K + S)/d,
    W'_ij = (λ·W_h,ij + W_0,ij·K + W_h,ij·S)(λI + K + S)⁻¹,
the minimiser of
    Σ‖W'_ij x_k − W_0,ij x_k‖² + Σ‖W'_ij x_s − W_h,ij x_s‖² + λ‖W'_ij − W_h,ij‖².
Each side is read at its own fixed point (kept images through the model before, the target's
through the model after), so the layers agree with each other once all are set.
Why: a style's hardening stage trains the whole body, and the coarse levels, where a shape is
laid out, lose a few hundredths of every object on the way (over issue 18's 0.05 on two
seeds of three for striped; held, under it on all three); the fine levels draw the texture
itself and stay as the stage left them. Figures: docs/benchmarks.md and docs/experiments.md,
session 42.
Choices where nothing decides: the kept images are the lineage's original model's drawings of
`hold_memory` memory prompts, 4 prompts per preserved concept and hold_pairs/2 per earlier
target (so earlier removals are held as they were); the target's, of `hold_pairs` prompts
naming it; each read at 3 timesteps (`body_edit.body_timesteps`) under its caption and the
empty one; a map per kernel tap rather than per 3×3 patch (the same figures on striped, and
its statistics are C×C, not 9C×9C, so it fits an SDXL UNet); the coarse levels only (held on
every level, striped came back under a 4-token inversion).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .body_edit import body_timesteps, channel_rows, per_tap
from .closed_form import edit_prompts

PER_PRESERVED = 4
TIMESTEPS = 3
BATCH = 32


@torch.no_grad()
def channel_grams(ctx, layers: dict[str, nn.Conv2d], prompts: list[str], timesteps: list[int],
                  seed: int) -> dict[str, torch.Tensor]:
    """Σ x xᵀ of every layer's input channels over the original's drawings of `prompts`,
    noised at each of `timesteps`, read under their own captions and the empty one by the
    model as it is now (float64)."""
    latents = ctx.base_latents(prompts, seed)
    conds = (ctx.encode(prompts, frozen=True), ctx.encode([""], frozen=True).expand(len(prompts)))
    grams: dict[str, torch.Tensor] = {}

    def add(name):
        def hook(_module, args):
            rows = channel_rows(args[0])
            gram = (rows.T @ rows).double().cpu()
            grams[name] = grams[name] + gram if name in grams else gram
        return hook

    hooks = [m.register_forward_pre_hook(add(n)) for n, m in layers.items()]
    gen = torch.Generator().manual_seed(seed)
    try:
        for step in timesteps:
            noise, t = torch.randn(latents.shape, generator=gen), torch.full((len(latents),), step)
            x_t = ctx.family.add_noise(ctx.noise_scheduler, latents, noise, t)
            for cond in conds:
                for i in range(0, len(latents), BATCH):
                    rows = torch.arange(i, min(i + BATCH, len(latents)))
                    ctx.eps(x_t[rows].to(ctx.device), t[rows].to(ctx.device), cond.rows(rows))
    finally:
        for h in hooks:
            h.remove()
    return grams


def hold_stage(ctx, robust) -> dict | None:
    """Before the hardening stage, where `robust.body_hold` names this request's kind ("style":
    a request naming a style; "all": every hardened request): the coarse levels' layers,
    their weights W_0 and K on what must stay, and the target prompts to read after. None
    where it does not apply or there is nothing to hold (a transformer denoiser)."""
    if robust is None or robust.body_hold == "off":
        return None
    if robust.body_hold == "style" and "style" not in {t.kind for t in ctx.request.targets}:
        return None
    layers = ctx.family.body_convolutions(ctx.denoiser())
    if not layers:
        return None
    rng = np.random.default_rng(ctx.seed + 11)
    pairs, kept = edit_prompts(ctx, rng, robust.hold_pairs, PER_PRESERVED, robust.hold_memory,
                               max(1, robust.hold_pairs // 2))
    steps = body_timesteps(TIMESTEPS, ctx.noise_scheduler.config.num_train_timesteps)
    return {"layers": layers, "targets": [t for t, _ in pairs], "steps": steps,
            "keep": channel_grams(ctx, layers, kept, steps, ctx.seed + 103),
            "before": {n: m.weight.detach().double().cpu().clone() for n, m in layers.items()},
            "lambda": robust.hold_lambda}


@torch.no_grad()
def apply_hold(ctx, held: dict) -> int:
    """After the stage and the method: W'_ij (formula above) for every layer `hold_stage`
    read; returns how many layers were set."""
    layers = held["layers"]
    target = channel_grams(ctx, layers, held["targets"], held["steps"], ctx.seed + 104)
    for name, conv in layers.items():
        keep, own = held["keep"][name], target[name]
        now, before = conv.weight.detach().double().cpu(), held["before"][name]
        ridge = held["lambda"] * float(torch.trace(keep + own)) / len(keep)
        inverse = torch.linalg.inv(ridge * torch.eye(len(keep), dtype=torch.float64) + keep + own)
        weight = per_tap(ridge * now + per_tap(before, keep) + per_tap(now, own), inverse)
        conv.weight.copy_(weight.to(conv.weight))
    return len(layers)
