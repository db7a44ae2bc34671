"""RGD — restricted gradient with diverse data ("Boosting Alignment", seed 001).

Forget objective: gradient ascent on the denoising loss of images of the target,
`L_f = −‖ε − ε_θ(x_t, c_f, t)‖²`; remain objective: the denoising loss on paired remain
data, `L_r = ‖ε − ε_θ(x_t, c_r, t)‖²`. Their gradients are combined by the restricted
(mutual projection) rule of `engine.gradients.restricted_gradient`, step along g_f + α·g_r.
Ascent stops while the forget loss is past the bound m (the ε-MSE is already normalised:
1.0 is what predicting zero costs), so the model is not driven to noise.
Diversity: forget prompts put the target in many contexts (templates, colours, styles),
and each is paired with a remain prompt identical but for the concept word, the remain
concepts cycling through every other concept of the kind (class balance).
Trains the whole UNet, as the reference does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from ..engine.gradients import restricted_gradient
from .base import Method, register


@register
@dataclass
class RGD(Method):
    name: ClassVar[str] = "rgd"
    param_group: str = "unet"
    steps: int = 60
    lr: float = 1e-4
    batch_size: int = 8
    alpha: float = 1.6
    forget_bound: float = 1.1
    pairs_per_target: int = 24
    _data: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.combine = self._combine

    def prepare(self, ctx) -> None:
        rng = np.random.default_rng(ctx.seed)
        req = ctx.request
        removed = {t.name for r in ctx.history for t in r.targets} | set(req.names)
        forget, remain = [], []
        for target, anchor in zip(req.targets, req.anchors):
            others = [c for c in [anchor, *req.preserve] if c and c not in removed] or [anchor]
            for i in range(self.pairs_per_target):
                (p_f, p_r), = ctx.world.prompt_pairs(target, others[i % len(others)], 1, rng)
                forget.append(p_f)
                remain.append(p_r)
        self._data = {
            "forget": {"prompts": forget, "latents": ctx.model_latents(forget)},
            "remain": {"prompts": remain, "latents": ctx.base_latents(remain)},
        }

    def batch(self, ctx, batch_size, generator):
        out = {}
        for key, data in self._data.items():
            idx = torch.randint(0, len(data["prompts"]), (batch_size,), generator=generator).tolist()
            out[key] = ctx.draw({"prompts": [data["prompts"][i] for i in idx],
                                 "latents": data["latents"][idx]}, generator)
        return out

    def loss(self, ctx, batch):
        forget = ctx.diffusion_loss(batch["forget"])
        terms = {"remain": ctx.diffusion_loss(batch["remain"])}
        # past the bound the forget term is reported but gives no gradient
        terms["forget"] = -forget if forget.item() < self.forget_bound else -forget.detach()
        return terms

    def _combine(self, ctx, grads: dict) -> list[torch.Tensor]:
        if "forget" not in grads:
            return [self.alpha * g for g in grads["remain"]]
        return restricted_gradient(grads["forget"], grads["remain"], self.alpha)
