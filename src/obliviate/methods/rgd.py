"""RGD — restricted gradient with diverse data ("Boosting Alignment", seed 001).

Forget objective: gradient ascent on the denoising loss of images of the target, truncated
per element as in the reference's class-unlearning code (EDM on CIFAR-10):
`L_f = −mean(min((ε − ε_θ(x_t, c_f, t))², τ))`, so an output element stops being pushed once
its squared error passes τ (default 0.5) and the target is not driven to ever larger
errors. Remain objective: the denoising loss on paired remain data,
`L_r = ‖ε − ε_θ(x_t, c_r, t)‖²`. Their gradients are combined by the restricted (mutual
projection) rule of `engine.gradients.restricted_gradient`, step along g_f + α·g_r
(α = 5, the reference's class-unlearning λ). With `truncate=0` the forget term is the plain
ascent of the SD reference and stops while the mean forget loss is past the bound m
(`bound_relative=True`: past m·L_f(θ_0)).
Diversity: forget prompts put the target in many contexts (templates, colours, styles),
and each is paired with a remain prompt identical but for the concept word, the remain
concepts cycling through every other concept of the kind (class balance), and avoiding every
concept removed earlier (a remain image of it, drawn by the shipped model, would teach it
again). `paired=True` (default) draws each forget prompt together with its own remain pair
under the same noise and timestep, so the remain gradient holds what the two images share
(colour, style, layout) and the restricted update leaves the concept word alone to move.
Trains the whole UNet, as the reference does.

Choices where the source is silent:
- A style target splits its timesteps (an object's request is unchanged): a texture is
  decided late in sampling and the object and colour early, so the ascent draws
  t < `style_t_max` (400), and at t ≥ `style_t_max` the forget prompt is held to what φ draws
  for its remain pair, `L_keep = ‖ε_θ(x_t, c_f, t) − ε_φ(x_t, c_r, t)‖²`, weight `style_keep`
  (5), inside the remain term. Plain ascent on a style turned its images to noise, taking
  object and colour with it. `style_keep=0, style_t_max=0` restores plain ascent.
- `object_t_min`/`object_keep` (off) are the mirror image for an object; `replay_pairs` (off)
  keeps earlier targets in the forget set. Neither helped, so both are off.
- `remain_target="data"` (default) is the source's remain loss; `"teacher"` replaces ε by
  φ's prediction, as DUGE's prior does (measured worse here).
The method is sensitive to its settings and to the erase seed (a style after an object is
fragile); the variants measured and dropped, with figures, are in docs/experiments.md (RGD).
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
    forget_prompts: ClassVar = (("forget", "prompts"),)
    option_choices: ClassVar[dict[str, tuple]] = {"remain_target": ("data", "teacher")}
    param_group: str = "unet"
    steps: int = 60
    lr: float = 1e-4
    batch_size: int = 8
    alpha: float = 5.0
    forget_bound: float = 1.1
    bound_relative: bool = False
    pairs_per_target: int = 64
    remain_target: str = "data"
    truncate: float | None = 0.5
    paired: bool = True
    style_t_max: int = 400  # >0: a style's forget samples take t < style_t_max only
    replay_pairs: int = 0  # forget pairs of each earlier target of the lineage, kept in the ascent
    style_keep: float = 5.0  # >0 (with style_t_max): at t >= style_t_max a style's forget prompt
    #                          is held to φ's prediction under its remain pair (paired=True)
    object_t_min: int = 0  # >0: an object's forget samples take t >= object_t_min only
    object_keep: float = 0.0  # >0 (with object_t_min): at t < object_t_min an object's forget
    #                           prompt is held to φ's prediction under its remain pair
    _data: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.combine = self._combine

    def prepare(self, ctx) -> None:
        self._forget_start = None
        rng = np.random.default_rng(ctx.seed)
        req = ctx.request
        earlier = [t for r in ctx.history for t in r.targets if t.name not in req.names]
        removed = ctx.removed
        jobs = [(t, [a, *req.preserve], a, self.pairs_per_target) for t, a in zip(req.targets, req.anchors)]
        if self.replay_pairs:  # earlier targets stay in the forget set, so ascent keeps them out
            jobs += [(t, ctx.world.default_preserve(t, removed), None, self.replay_pairs) for t in earlier]
        forget, remain, window, weight = [], [], [], []
        for target, keep, anchor, n in jobs:
            others = [c for c in keep if c and c not in removed] or ([anchor] if anchor else [])
            if not others:  # an earlier target whose whole kind is removed: nothing to pair it with
                continue
            lo, hi, w = self._ascent_window(target.kind, ctx.noise_scheduler.config.num_train_timesteps)
            for i in range(n):
                pair = others[i % len(others)]
                (p_f, p_r), = ctx.world.prompt_pairs(target, pair, 1, rng, avoid=removed)
                forget.append(p_f)
                remain.append(p_r)
                window.append((lo, hi))
                weight.append(w)
        self._window = torch.tensor(window).reshape(-1, 2)  # per forget sample: ascent at t in [lo, hi)
        self._keep_weight = torch.tensor(weight)  # and, where > 0, held to its pair outside it
        self._data = {
            "forget": {"prompts": forget, "latents": ctx.model_latents(forget)},
            "remain": {"prompts": remain, "latents": ctx.base_latents(remain)},
        }

    def batch(self, ctx, batch_size, generator):
        out = {}
        if self.paired:
            # each forget prompt with its own remain pair, under the same noise and timestep
            idx = torch.randint(0, len(self._data["forget"]["prompts"]), (batch_size,), generator=generator).tolist()
            for key, data in self._data.items():
                out[key] = {"prompts": [data["prompts"][i] for i in idx], "latents": data["latents"][idx]}
            drawn = self._restrict_t(ctx, ctx.draw(out["forget"], generator), idx)
            out["remain"] = {**out["remain"], "noise": drawn["noise"], "t": drawn["t"]}
            out["forget"] = drawn
            if bool((self._keep_weight[idx] > 0).any()):
                out["keep"] = self._outside_window(ctx, out, idx, generator)
            return out
        for key, data in self._data.items():
            idx = torch.randint(0, len(data["prompts"]), (batch_size,), generator=generator).tolist()
            drawn = ctx.draw({"prompts": [data["prompts"][i] for i in idx],
                              "latents": data["latents"][idx]}, generator)
            out[key] = self._restrict_t(ctx, drawn, idx) if key == "forget" else drawn
        return out

    def _ascent_window(self, kind: str, total: int) -> tuple[int, int, float]:
        """The timesteps [lo, hi) where a target of this kind is ascended, and the weight of the
        keep term outside them (0: none). A style's texture is decided late in sampling (low t),
        an object's shape early (high t)."""
        if kind == "style" and self.style_t_max:
            return 0, self.style_t_max, self.style_keep
        if kind != "style" and self.object_t_min:
            return self.object_t_min, total, self.object_keep
        return 0, total, 0.0

    def _outside_window(self, ctx, out: dict, idx: list[int], generator) -> dict:
        """The forget samples that have a keep term, noised again at a t outside their ascent
        window ([hi, T) for a style, [0, lo) for an object). Their target is φ's prediction
        under the paired remain prompt; `weight` is each one's keep weight."""
        rows = [j for j, i in enumerate(idx) if self._keep_weight[i] > 0]
        picked = [idx[j] for j in rows]
        total = ctx.noise_scheduler.config.num_train_timesteps
        lo, hi = self._window[picked].unbind(1)
        start = torch.where(lo > 0, torch.zeros_like(lo), hi)  # the complement is one interval
        stop = torch.where(lo > 0, lo, torch.full_like(hi, total))
        u = torch.rand(len(rows), generator=generator)
        t = torch.minimum(start + (u * (stop - start)).long(), stop - 1)
        sub = {"prompts": [out["forget"]["prompts"][j] for j in rows],
               "pair": [out["remain"]["prompts"][j] for j in rows],
               "latents": out["forget"]["latents"][rows],
               "weight": self._keep_weight[picked]}
        return {**sub, "noise": torch.randn(sub["latents"].shape, generator=generator), "t": t}

    def _restrict_t(self, ctx, drawn: dict, idx: list[int]) -> dict:
        """Squeeze each forget sample's timestep into its ascent window [lo, hi):
        t ← lo + ⌊t · (hi − lo) / T⌋, uniform again, with no extra random draw."""
        total = ctx.noise_scheduler.config.num_train_timesteps
        lo, hi = self._window[idx].unbind(1)
        return {**drawn, "t": lo + torch.div(drawn["t"] * (hi - lo), total, rounding_mode="floor")}

    def loss(self, ctx, batch):
        if self.truncate:
            # the class-unlearning reference's per-element truncation: each output element's
            # squared error stops pushing once it passes τ, L_f = mean(min((ε̂ − ε)², τ))
            x_t, _, t = ctx.noisy(batch["forget"])
            err = (ctx.eps(x_t, t, ctx.encode(batch["forget"]["prompts"])) - ctx.target(batch["forget"])).pow(2)
            forget = torch.clamp(err, max=self.truncate).mean()
        else:
            forget = ctx.diffusion_loss(batch["forget"])
        if self.remain_target == "teacher":
            sub = batch["remain"]
            x_t, _, t = ctx.noisy(sub)
            want = ctx.eps(x_t, t, ctx.encode(sub["prompts"], frozen=True), frozen=True)
            terms = {"remain": (ctx.eps(x_t, t, ctx.encode(sub["prompts"])) - want).pow(2).mean()}
        else:
            terms = {"remain": ctx.diffusion_loss(batch["remain"])}
        if "keep" in batch:
            # the forget prompt outside its ascent window: draw what the paired prompt draws
            sub = batch["keep"]
            x_t, _, t = ctx.noisy(sub)
            want = ctx.eps(x_t, t, ctx.encode(sub["pair"], frozen=True), frozen=True)
            err = (ctx.eps(x_t, t, ctx.encode(sub["prompts"])) - want).pow(2).flatten(1).mean(1)
            w = sub["weight"].to(err)
            terms["remain"] = terms["remain"] + (w * err).sum() / len(err)
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
