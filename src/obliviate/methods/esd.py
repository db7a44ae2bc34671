"""ESD — Erased Stable Diffusion (Gandikota et al. 2023), the gradient baseline.

Distil negative guidance into θ: on x_t,
    target = ε_φ(x_t, ∅, t) − η·(ε_φ(x_t, c_tgt, t) − ε_φ(x_t, ∅, t)),
    L = ‖ε_θ(x_t, c_tgt, t) − target‖².
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
import torch

from .base import Method, register


@register
@dataclass
class ESD(Method):
    name: ClassVar[str] = "esd"
    option_choices: ClassVar[dict[str, tuple]] = {"keep_reference": ("before", "original")}
    forget_prompts: ClassVar = ((None, "prompts"),)
    variant: str = "auto"
    eta: float = 1.0
    steps: int = 100
    lr: float = 1e-4
    batch_size: int = 8
    prompts_per_target: int = 24
    lora_rank: int = 0
    lambda_keep: float = 0.0
    keep_prompts: int = 32
    keep_reference: str = "before"
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
        prompts = [p for t in ctx.request.targets
                   for p in ctx.world.prompts_naming(t.name, self.prompts_per_target, rng)]
        self._data = {"prompts": prompts, "latents": ctx.model_latents(prompts)}
        if self.lambda_keep:
            removed = ctx.removed
            kinds = {t.kind for r in (*ctx.history, ctx.request) for t in r.targets}
            keep = ctx.world.memory_prompts(removed, self.keep_prompts, rng, named=kinds)
            keep += [p for c in ctx.request.preserve for p in ctx.world.prompts_naming(c, 4, rng, removed)]
            latents = ctx.base_latents if self.keep_reference == "original" else ctx.model_latents
            self._keep = {"prompts": keep, "latents": latents(keep)}
        self._null = ctx.encode([""], frozen=True)
        ctx.freeze()

    def batch(self, ctx, batch_size, generator):
        idx = torch.randint(0, len(self._data["prompts"]), (batch_size,), generator=generator).tolist()
        sub = {"prompts": [self._data["prompts"][i] for i in idx], "latents": self._data["latents"][idx]}
        out = ctx.draw(sub, generator)
        if self.lambda_keep:
            k = torch.randint(0, len(self._keep["prompts"]), (batch_size,), generator=generator).tolist()
            keep = {"prompts": [self._keep["prompts"][i] for i in k], "latents": self._keep["latents"][k]}
            out["keep"] = ctx.draw(keep, generator)
        return out

    def loss(self, ctx, batch):
        x_t, _, t = ctx.noisy(batch)
        cond_frozen = ctx.encode(batch.get("_plain_prompts", batch["prompts"]), frozen=True)
        e_c = ctx.eps(x_t, t, cond_frozen, frozen=True)
        e_0 = ctx.eps(x_t, t, self._null.expand(len(x_t)), frozen=True)
        target = e_0 - self.eta * (e_c - e_0)
        terms = {"esd": (ctx.eps(x_t, t, ctx.encode(batch["prompts"])) - target).pow(2).mean()}
        if "keep" in batch:
            x_k, _, t_k = ctx.noisy(batch["keep"])
            if self.keep_reference == "original":
                want = ctx.base_eps(x_k, t_k, batch["keep"]["prompts"])
            else:
                want = ctx.eps(x_k, t_k, ctx.encode(batch["keep"]["prompts"], frozen=True), frozen=True)
            got = ctx.eps(x_k, t_k, ctx.encode(batch["keep"]["prompts"]))
            terms["keep"] = self.lambda_keep * (got - want).pow(2).mean()
        return terms
