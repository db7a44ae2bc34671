"""UCE — Unified Concept Editing (Gandikota et al. 2024), closed form, no gradient steps.

For every cross-attention projection W (to_k, to_v), with text-encoder states c_i of the
target prompts, their anchor counterparts c_g,i (guide: v*_i = W_old·c_g,i), and states c_j
of prompts to preserve:
    W = (λ·W_old + Σ_i v*_i c_iᵀ + Σ_j W_old c_j c_jᵀ) (λ·I + Σ_i c_i c_iᵀ + Σ_j c_j c_jᵀ)⁻¹.
Choices: every token position of a prompt is a column (the UNet attends to all of them, and
in a causal CLIP the positions after the concept word carry it too); positions before the
concept word are identical in target and anchor prompt, so they act as preservation.
Continual: the states of earlier targets are preserved with their current (already edited)
mapping, so an earlier removal stays removed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from .base import Method, register


@register
@dataclass
class UCE(Method):
    name: ClassVar[str] = "uce"
    closed_form: ClassVar[bool] = True
    param_group: str = "attn2-kv"
    lam: float = 0.5
    erase_scale: float = 1.0
    preserve_scale: float = 1.0
    prompts_per_target: int = 16
    prompts_per_preserved: int = 8
    memory_prompts: int = 32

    @torch.no_grad()
    def apply(self, ctx) -> dict:
        rng = np.random.default_rng(ctx.seed)
        req, world = ctx.request, ctx.world
        pairs = [p for t, a in zip(req.targets, req.anchors)
                 for p in world.prompt_pairs(t, a, self.prompts_per_target, rng)]
        removed = ctx.removed
        keep = [p for c in req.preserve for p in world.prompts_naming(c, self.prompts_per_preserved, rng, removed)]
        keep += world.memory_prompts(removed, self.memory_prompts, rng)
        keep += [t for r in ctx.history for tg, a in zip(r.targets, r.anchors)
                 for t, _ in world.prompt_pairs(tg, a, self.prompts_per_target // 2, rng)]
        flat = lambda h: h.reshape(-1, h.shape[-1]).double()  # noqa: E731
        c_e = flat(ctx.encode([t for t, _ in pairs], frozen=True))
        c_g = flat(ctx.encode([a for _, a in pairs], frozen=True))
        c_p = flat(ctx.encode(keep, frozen=True))
        eye = torch.eye(c_e.shape[1], dtype=torch.float64, device=c_e.device)
        rhs = self.lam * eye + self.erase_scale * c_e.T @ c_e + self.preserve_scale * c_p.T @ c_p
        rhs_inv = torch.linalg.inv(rhs)
        guide = self.erase_scale * c_g.T @ c_e + self.preserve_scale * c_p.T @ c_p + self.lam * eye
        edited = 0
        for name, module in ctx.pipe.unet.named_modules():
            if name.endswith("attn2.to_k") or name.endswith("attn2.to_v"):
                w = module.weight.double()
                module.weight.copy_((w @ guide @ rhs_inv).to(module.weight.dtype))
                edited += 1
        return {"layers_edited": edited, "columns_erased": len(c_e), "columns_preserved": len(c_p)}
