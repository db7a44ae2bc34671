"""ESD — Erased Stable Diffusion (Gandikota et al. 2023), the gradient baseline.

Distil negative guidance into θ: on x_t,
    target = ε_φ(x_t, ∅, t) − η·(ε_φ(x_t, c_tgt, t) − ε_φ(x_t, ∅, t)),
    L = ‖ε_θ(x_t, c_tgt, t) − target‖².
`reference="anchor"` takes the reference from the same caption with the target's word
replaced by its anchor instead of the empty prompt, ε_φ(x_t, c_anc, t): the guidance then
pushes along target − anchor only, not along everything else the caption names (a
"red striped star" against ∅ also pushes red and star away). Default "empty": the source.
With `lambda_keep=5` and lr 3e-4 it removes star from `shapes-sd3` (UA 1.00, objects mean
−0.01 to −0.04, seeds 0-1) where either alone fails (docs/experiments.md, session 19).
ESD-x (`variant="x"`) trains cross-attention (styles), ESD-u (`"u"`) everything but
cross-attention (objects); `"auto"` (default) picks u when every target is an object, as
the reference recommends, and x otherwise.
`lambda_keep=λ` adds a preservation term on prompts that name no removed concept (the
world's memory prompts and the request's preserve set), images φ draws for them:
    L_keep = λ·‖ε_θ(x_t, c_keep, t) − ε_φ(x_t, c_keep, t)‖²
(the source has none; ESD-u alone took colours down 0.13 on the shapes model when used as
--robust's hardening stage, docs/experiments.md). Default 0: the source's ESD. The keep
prompts name a concept of every removed concept's kind: a prompt that leaves the style free
draws stripes a quarter of the time, and holding it held the stripes too. `keep_reference`:
"before" (ε_φ, the model before the request) or "original" (the lineage's original model,
`ctx.base_eps`: the keep term then cannot carry an earlier request's drift forward).
`lambda_image=λ_img` adds the paired-image term (`--robust`'s hardening uses it): the
lineage's original model draws target prompts and the same prompts with the word replaced
by the anchor, on one seed (the same layout), and the body learns to take a noisy target
image, under the target's or the anchor's prompt (half each), to the anchor image; kept
concepts of the target's kind are held to their own images the same way
(`request.preserve`, `image_pairs/2` each):
    L_img = λ_img·min(SNR_t, 5)·(‖x̂_0,θ(x_t(x_tgt), c, t) − x_anc‖²
                                + ‖x̂_0,θ(x_t(x_keep), c_keep, t) − x_keep‖²)
for t ∈ [200, 1000) (Min-SNR weighting, Hang et al. 2023). Not in the source; a textual
inversion of the target then finds no conditioning that denoises its images well.
`image_memory=M` adds M memory prompts (naming no removed concept, a concept of every
removed kind) to the held images: held only to same-kind concepts, a colour no request
named drifted over three requests (blue 0.85 of the shipped model's).
`image_replay=R` replays the term for every target of the lineage's earlier requests (R
pairs each, to its recorded anchor) in a half-batch of its own; `--robust`'s hardening puts
soft prompts mined for those targets in its captions (engine.harden). Replayed under their
own captions only, it did not hold star over six requests (docs/experiments.md, session 20).
`lora_rank=R` trains rank-R LoRA adapters on the same layers instead (engine.lora), so that
the edit exports to a rank-R LoRA file exactly (ESD-u's dense change does not fit rank 16).
Choice: x_t comes from forward-noising φ's own generations of the target prompts (cached)
rather than from partially sampling φ at every step: both draw x_t from φ's distribution,
and the cached form costs no sampling inside the loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from ..engine.data import either_prompt, paired_pool, sample_pool
from .base import Method, register


@register
@dataclass
class ESD(Method):
    name: ClassVar[str] = "esd"
    option_choices: ClassVar[dict[str, tuple]] = {"keep_reference": ("before", "original"),
                                                  "reference": ("empty", "anchor")}
    forget_prompts: ClassVar = ((None, "prompts"),)
    variant: str = "auto"
    eta: float = 1.0
    reference: str = "empty"
    steps: int = 100
    lr: float = 1e-4
    batch_size: int = 8
    prompts_per_target: int = 24
    lora_rank: int = 0
    lambda_keep: float = 0.0
    keep_prompts: int = 32
    keep_reference: str = "before"
    lambda_image: float = 0.0
    image_pairs: int = 24
    image_t_low: int = 200
    image_t_high: int = 1000
    image_snr_cap: float = 5.0
    image_memory: int = 0
    image_replay: int = 0
    stratified: bool = False
    _data: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.variant not in ("x", "u", "auto"):
            from ..errors import ObliviateError

            raise ObliviateError(f"ESD variant must be 'x', 'u' or 'auto', not {self.variant!r}")
        self.param_group = "non-attn2" if self.variant == "u" else "attn2"

    def configure(self, request) -> None:
        """`auto`: ESD-u when every target is an object, else ESD-x (recorded as param_group)."""
        if self.variant == "auto":
            objects = all(t.kind == "object" for t in request.targets)
            self.param_group = "non-attn2" if objects else "attn2"

    def prepare(self, ctx) -> None:
        self.configure(ctx.request)
        rng = np.random.default_rng(ctx.seed)
        removed = ctx.removed
        if self.reference == "anchor":  # each target prompt with its anchor's caption beside it
            pairs = [pair for t, a in zip(ctx.request.targets, ctx.request.anchors)
                     for pair in ctx.world.prompt_pairs(t, a, self.prompts_per_target, rng, avoid=removed)]
            prompts, extra = [p for p, _ in pairs], {"anchor_prompts": [a for _, a in pairs]}
        else:
            prompts, extra = [p for t in ctx.request.targets
                              for p in ctx.world.prompts_naming(t.name, self.prompts_per_target, rng)], {}
        self._data = {"prompts": prompts, **extra, "latents": ctx.model_latents(prompts)}
        kinds = ctx.removed_kinds
        if self.lambda_keep:
            keep = ctx.world.memory_prompts(removed, self.keep_prompts, rng, named=kinds,
                                           stratified=self.stratified)
            keep += [p for c in ctx.request.preserve for p in ctx.world.prompts_naming(c, 4, rng, removed)]
            latents = ctx.base_latents if self.keep_reference == "original" else ctx.model_latents
            self._keep = {"prompts": keep, "latents": latents(keep)}
        if self.lambda_image:
            self._prepare_images(ctx, rng, removed, kinds)
        self._null = ctx.encode([""], frozen=True)
        ctx.freeze()

    def batch(self, ctx, batch_size, generator):
        out = ctx.draw(sample_pool(self._data, batch_size, generator), generator)
        if self.lambda_keep:
            out["keep"] = ctx.draw(sample_pool(self._keep, batch_size, generator), generator)
        if self.lambda_image:
            out.update(self._image_batch(ctx, batch_size, generator))
        return out

    def loss(self, ctx, batch):
        # every sub-batch the step drew (the target's, and the keep, image, held and replay
        # ones present), noised once; θ predicts on all of them in one call (`ctx.eps_joint`)
        subs = {"esd": batch, **{k: batch[k] for k in ("keep", "image", "held", "replay") if k in batch}}
        noisy = {k: ctx.noisy(sub) for k, sub in subs.items()}
        x_t, _, t = noisy["esd"]
        ref = batch["anchor_prompts"] if "anchor_prompts" in batch else self._null.expand(len(x_t))
        e_c, e_0 = ctx.eps_joint([(x_t, t, batch.get("_plain_prompts", batch["prompts"])), (x_t, t, ref)],
                                 frozen=True)
        target = e_0 - self.eta * (e_c - e_0)
        parts = [(x, t_s, subs[k]["prompts"]) for k, (x, _, t_s) in noisy.items()]
        pred = dict(zip(subs, ctx.eps_joint(parts)))
        terms = {"esd": (pred["esd"] - target).pow(2).mean()}
        if "keep" in batch:
            x_k, _, t_k = noisy["keep"]
            if self.keep_reference == "original":
                want = ctx.base_eps(x_k, t_k, batch["keep"]["prompts"])
            else:
                want = ctx.eps(x_k, t_k, ctx.encode(batch["keep"]["prompts"], frozen=True), frozen=True)
            terms["keep"] = self.lambda_keep * (pred["keep"] - want).pow(2).mean()
        for name, goal in (("image", "anchor_latents"), ("held", "latents"), ("replay", "anchor_latents")):
            if name in batch:
                terms[name] = self.lambda_image * ctx.x0_error(batch[name], batch[name][goal],
                                                               self.image_snr_cap, pred=pred[name])
        return terms

    # -- the paired-image term (--robust's hardening) -------------------------------------------
    def _prepare_images(self, ctx, rng, removed, removed_kinds) -> None:
        """The lineage original's drawings of target prompts and of the same prompts with the
        target's word replaced by its anchor (same seed, so the same layout), and of the same
        prompts naming each kept concept of the target's kind (request.preserve), and of
        `image_memory` memory prompts (held too). From the original, not φ: held to φ's
        drawings, six requests let each one's drift into the next (never-removed mean 0.94 of
        the shipped model's after three)."""
        pairs = [pair for t, a in zip(ctx.request.targets, ctx.request.anchors)
                 for pair in ctx.world.prompt_pairs(t, a, self.image_pairs, rng, avoid=removed)]
        forget, anchor = [p for p, _ in pairs], [a for _, a in pairs]
        kinds = {t.kind for t in ctx.request.targets}
        kept = [c for c in ctx.request.preserve if ctx.world.target(c).kind in kinds]
        held = [p for t in ctx.request.targets for c in kept
                for _, p in ctx.world.prompt_pairs(t, c, max(1, self.image_pairs // 2), rng, avoid=removed)]
        if self.image_memory:
            held += ctx.world.memory_prompts(removed, self.image_memory, rng, named=removed_kinds,
                                             stratified=self.stratified)
        drawn = ctx.base_latents
        self._images = paired_pool(forget, anchor, drawn)
        self._held = {"prompts": held, "latents": drawn(held)} if held else None
        earlier = [pair for r in ctx.history for t, a in zip(r.targets, r.anchors)
                   for pair in ctx.world.prompt_pairs(t, a, self.image_replay, rng, avoid=removed)]
        self._replay = paired_pool([p for p, _ in earlier], [a for _, a in earlier], drawn) if earlier else None

    def _image_batch(self, ctx, batch_size, generator) -> dict:
        """A sub-batch of target images conditioned on the target's or the anchor's prompt
        (at random), one of kept concepts' images on their own prompts, and half a batch of
        earlier targets' images (`image_replay`) like the first."""
        t_range = (self.image_t_low, self.image_t_high)
        out = {"image": ctx.draw(either_prompt(self._images, batch_size, generator), generator, t_range)}
        if self._held:
            out["held"] = ctx.draw(sample_pool(self._held, batch_size, generator), generator, t_range)
        if self._replay:
            replay = either_prompt(self._replay, max(1, batch_size // 2), generator)
            out["replay"] = ctx.draw(replay, generator, t_range)
        return out
