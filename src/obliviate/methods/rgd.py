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
concepts cycling through every other concept of the kind (class balance). `paired=True`
(default) draws each forget prompt together with its own remain pair under the same noise
and timestep, so the remain gradient holds exactly what the two images share (colour,
style, layout) and the restricted update leaves the concept word alone to move.
Trains the whole UNet, as the reference does.
Measured on the shapes model removing "star" (144 judged images, accuracy on the images
whose prompt does not name the target): the old recipe (untruncated ascent with bound 1.1,
α 1.6, 24 unpaired pairs) UA 0.46, objects 1.00 → 0.82, colours −0.33; per-element
truncation alone (τ 1.0, α 5) UA 0.12; pairing alone UA 0.00; pairing + τ 0.5 + α 5
UA 0.92 (24 pairs) and 1.00 (64 pairs: objects 1.00 → 0.95, colours 1.00 → 0.90,
styles 0.93 → 0.88); 128 pairs UA 0.00 — the method is sensitive to its settings.
A style is where the source is silent, and plain ascent fails there: the striped images lose
their object and colour too (gradient ascent has no anchor: the target's images become
noise), so every object's accuracy over all its images falls, and the earlier target comes
back (chain star then striped on the model shipped 2026-11-25, 144 judged images: striped
UA 0.81, objects −0.108, colours −0.653, star UA back to 0.375).
Choice, for a style target only (an object's request is unchanged): split its timesteps.
A texture is decided late in sampling and the object, colour and layout early, so the
forget ascent draws t < `style_t_max` (400), and at t ≥ `style_t_max` the same forget
prompt is held to what φ draws for its remain pair (same caption, another style):
`L_keep = ‖ε_θ(x_t, c_f, t) − ε_φ(x_t, c_r, t)‖²`, weight `style_keep` (5), added to the
remain term, so the restricted update protects it like the remain data. Same chain, same
144 images: t < 400, keep 5: striped UA 0.944, star stays 1.000, objects −0.108 against the
shipped model (−0.025 of it from this request; the star request cost −0.083), colours
−0.146; t < 500, keep 1: UA 0.889, objects −0.125; t < 700, keep 5: UA 0.944, objects
−0.150. Ascent at t < 400 without the keep term (and 16 replay pairs): UA 0.61, objects
−0.175, star back to 0.25. `style_keep=0, style_t_max=0` restores plain ascent.
`replay_pairs` (off) keeps each earlier target in the forget set; it did not help.
The mirror image for an object (`object_t_min`, `object_keep`, off): ascent at t >= 300 and
the star prompt held to its pair below; chain star then striped (288 images, on an H200):
star UA 0.81, objects −0.033 (with α 10: UA 0.98, −0.037) but the striped request after it
reached only UA 0.65-0.68: not the default.
Seeds (the erase seed draws the prompt pairs, noise and timesteps): the same chain with the
defaults, erase seeds 0-3 (288 images, on an H200): star UA 0.98-1.00 every time (objects
−0.05 to −0.10), but striped UA 0.93, 0.67, 0.58, 0.74; on 2 CPU cores (144 images) striped
UA 0.94, 0.64, 0.56, 0.69, objects −0.11 to −0.16 after both requests, and on seed 2 star
came back (UA 0.33): the striped pairs could name star, and their remain side, drawn by the
shipped model, taught it again. The pairs now avoid every concept removed earlier: star UA
1.00 on all four seeds after striped; striped UA 0.81, 0.64, 0.75, 0.69 (objects −0.07 to
−0.17). From the shipped model, striped alone: UA 1.00 on seeds 1-3 (objects −0.02 to −0.09):
what makes it fragile is the model RGD's star request leaves (colours already −0.13 to
−0.25). No variant tried (α 10/20, τ 0.25, lr 5e-5, 30-100 steps, the teacher target,
style_keep 10, style_t_max 300) gave UA >= 0.9 on both requests for every seed: ascent that
is truncated, not anchored, stops wherever the judge's features happen to flip.
Nor did two more (star alone, 144 images, 2 CPU cores): cross-attention only
(`param_group=attn2`, the reference's "xattn"): lr 1e-4 UA 0.00; lr 1e-3 and 3e-3 UA 0.00 with
objects −0.47/−0.63 (ascent through the text pathway breaks every prompt first); 64 memory
prompts (no removed concept) added to the remain term: UA 1.00, 1.00, 0.79 on seeds 0-2,
colours −0.13 to −0.17 and styles −0.11 to −0.19, no better than without. Ascent weighted
per latent element by where each forget image and its remain pair differ (both sampled from
the same noise, so the difference is mostly the object): star UA 0.00 and 0.33 on seeds 0-1
with colours −0.19/−0.24 all the same — the collateral damage does not come from ascent on
the shared parts of the image, and the removal needs the whole image's error.
Where the colour loss comes from (2026-11-26, on an H200, 288 images, chain star then striped,
erase seeds 0-3; the defaults there: star UA 0.98-1.00 with colours −0.16 to −0.26, striped
UA 0.88, 0.81, 0.74, 0.69). The remain term alone (forget term switched off, same 60 steps at
lr 1e-4 over the whole UNet) moves colours by −0.00 to −0.04: it is the ascent that costs
them. None of these, each measured and dropped, kept the colours: the whole UNet without
normalisation layers and biases (colours −0.17 to −0.26, striped UA 0.71-0.88); the forget
error with each channel's spatial mean removed before squaring (star UA 0.00-0.98 by seed);
the mutual projection tensor by tensor instead of over all parameters (striped UA
0.57-0.83, 3x slower); rendered pairs — one scene and pose drawn with the target and with the
other concept — as forget and remain data (star UA 0.00 on two seeds; striped 0.82-0.97 but
objects −0.15 to −0.25). Drawing the striped request's forget images by the shipped model
rather than the star-erased one (whose style accuracy is already −0.15) lifted striped UA to
0.99, 0.71, 0.92, 0.97, but that request alone then cost objects −0.07 to −0.21; a keep
weight of 10 or 20 with it did not fix either. The mean-free error for the style request only
(star with the defaults; 2 CPU cores, 144 images): striped UA 0.92, 0.94, 0.83, 0.53 on seeds
0-3 (defaults there 0.81, 0.64, 0.75, 0.69), objects −0.07 to −0.18 after both, and star back
to 0.79 on seed 1 — better on average, worse at its worst; dropped. Combined with the object
split (`object_t_min` 300, `object_keep` 1) and α 10, which had cost objects least on the
H200: objects −0.01 to −0.08 after both, but star UA 0.96, 0.58, 0.00, 0.92 and striped
0.67, 0.81, 1.00, 0.53 — each knob that spares the rest also lets the target through on
some draws.
Choice: `remain_target="teacher"` replaces the remain loss's target ε by φ's prediction,
‖ε_θ(x_t, c_r, t) − ε_φ(x_t, c_r, t)‖² (as DUGE's prior does); `"data"` is the source's
(teacher with pairing + τ 0.5: UA 0.79, worse).
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
            x_t, noise, t = ctx.noisy(batch["forget"])
            err = (ctx.eps(x_t, t, ctx.encode(batch["forget"]["prompts"])) - noise).pow(2)
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
