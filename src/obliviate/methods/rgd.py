"""RGD — restricted gradient with diverse data ("Boosting Alignment", seed 001).

Forget objective: gradient ascent on the denoising loss of images of the target,
`L_f = −‖ε − ε_θ(x_t, c_f, t)‖²`; remain objective: the denoising loss on paired remain
data, `L_r = ‖ε − ε_θ(x_t, c_r, t)‖²`. Their gradients are combined by the restricted
(mutual projection) rule of `engine.gradients.restricted_gradient`, step along g_f + α·g_r.
Ascent stops while the forget loss is past the bound m, so the model is not driven to noise.
`bound_relative=True` makes the bound relative to the forget loss at the first step (ascent
pauses while L_f > m·L_f(θ_0)); the default is the absolute m on the ε-MSE.
Measured on the shapes model, removing "star" (144 judged images; drops are accuracy lost):
defaults (whole UNet, lr 1e-4, data remain) UA 0.50, other objects −0.15, colours −0.33,
styles −0.32; lr 3e-5 UA 0.00 and colours −0.24; cross-attention only, lr 5e-4: UA 0.58,
colours −0.24; teacher remain: UA 0.46, colours −0.27; teacher remain with a relative
bound of 3: UA 0.00, colours −0.24. Every variant damaged colours and styles before it
removed the target: on this model RGD does not meet its floor (UA >= 0.90). Open problem.
Diversity: forget prompts put the target in many contexts (templates, colours, styles),
and each is paired with a remain prompt identical but for the concept word, the remain
concepts cycling through every other concept of the kind (class balance).
Trains the whole UNet, as the reference does.
Choice: `remain_target="teacher"` replaces the remain loss's target ε by φ's prediction,
‖ε_θ(x_t, c_r, t) − ε_φ(x_t, c_r, t)‖² (as DUGE's prior does); `"data"` is the source's.
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
    bound_relative: bool = False
    pairs_per_target: int = 24
    remain_target: str = "data"
    _data: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.combine = self._combine

    def prepare(self, ctx) -> None:
        self._forget_start = None
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
        if self.remain_target == "teacher":
            sub = batch["remain"]
            x_t, _, t = ctx.noisy(sub)
            want = ctx.eps(x_t, t, ctx.encode(sub["prompts"], frozen=True), frozen=True)
            terms = {"remain": (ctx.eps(x_t, t, ctx.encode(sub["prompts"])) - want).pow(2).mean()}
        else:
            terms = {"remain": ctx.diffusion_loss(batch["remain"])}
        # past the bound the forget term is reported but gives no gradient
        if self.bound_relative and getattr(self, "_forget_start", None) is None:
            self._forget_start = forget.item()
        bound = self.forget_bound * (self._forget_start if self.bound_relative else 1.0)
        terms["forget"] = -forget if forget.item() < bound else -forget.detach()
        return terms

    def _combine(self, ctx, grads: dict) -> list[torch.Tensor]:
        if "forget" not in grads:
            return [self.alpha * g for g in grads["remain"]]
        return restricted_gradient(grads["forget"], grads["remain"], self.alpha)
