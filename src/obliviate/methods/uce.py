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
In SD3 and Flux the pooled prompt embedding is read into every block too
(`Family.pooled_text_map`); its first linear layer gets the same closed form, one column per
prompt (docs/experiments.md, session 17).
Robust (`--robust`, `apply_robust`): RECE-style rounds that solve for the text state the
edited layers still map to the target's keys and values and erase it too, then a closed-form
edit of the body's coarse-level convolutions (`engine.body_edit`, with the plug-in's `body_*`
settings; `--robust-set body_pairs=0` turns it off), so that a noisy image of the target is
read as its anchor's whatever text state a soft prompt finds: the RECE rounds alone left
star at 0.92 under the quick soft-prompt ladder, with the body edit the full ladder's worst
is 0.23-0.35 (two erase seeds; docs/experiments.md, session 40).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np
import torch

from ..engine.body_edit import apply_channel_maps, read_body_edit
from ..engine.closed_form import (edit_pooled_read, edit_projections, edit_prompts, text_columns,
                                  text_projections, uce_matrix)
from .base import Method, register


@register
@dataclass
class UCE(Method):
    name: ClassVar[str] = "uce"
    closed_form: ClassVar[bool] = True
    option_choices: ClassVar[dict[str, tuple]] = {"robust_mode": ("rece", "mined")}
    param_group: str = "attn2-kv"
    lam: float = 0.5
    erase_scale: float = 1.0
    preserve_scale: float = 1.0
    prompts_per_target: int = 16
    prompts_per_preserved: int = 8
    memory_prompts: int = 32
    rece_rounds: int = 3
    rece_lambda: float = 0.1
    robust_mode: str = "rece"

    def _prompt_sets(self, ctx) -> tuple[list[str], list[str], list[str], list[tuple[str, str]]]:
        """The request's prompts, drawn from the erase seed: target prompts, their anchor
        prompts, everything to preserve, and the (target, anchor) pairs."""
        pairs, keep = edit_prompts(ctx, np.random.default_rng(ctx.seed), self.prompts_per_target,
                                   self.prompts_per_preserved, self.memory_prompts,
                                   self.prompts_per_target // 2)
        return [t for t, _ in pairs], [a for _, a in pairs], keep, pairs

    @staticmethod
    def _columns(ctx, prompts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Text-encoder states (one column per token position) of the target, anchor and
        preserved prompts, from the model before this request."""
        return tuple(text_columns(ctx, p) for p in prompts[:3])

    def _edit(self, ctx, originals: dict, c_e, c_g, c_p) -> int:
        """Set every K/V projection to the UCE solution from its weights before the request."""
        edit = uce_matrix(c_e, c_g, c_p, self.lam, self.erase_scale, self.preserve_scale)
        return edit_projections(originals, edit)

    @torch.no_grad()
    def apply(self, ctx) -> dict:
        prompts = self._prompt_sets(ctx)
        c_e, c_g, c_p = self._columns(ctx, prompts)
        edited = self._edit(ctx, text_projections(ctx), c_e, c_g, c_p) + edit_pooled_read(ctx, *prompts[:3], self.lam)
        return {"layers_edited": edited, "columns_erased": len(c_e), "columns_preserved": len(c_p)}

    @torch.no_grad()
    def apply_robust(self, ctx, robust=None) -> dict:
        """The robust edit: the body's channel maps are read from the model before the
        request (`engine.body_edit`, the `--robust` plug-in's `body_*` settings), the K/V are
        edited with RECE rounds (or, with `robust_mode=mined`, with mined soft prompts), then
        the maps are applied."""
        from ..engine.robust import Robust

        layers, maps = read_body_edit(ctx, robust or Robust())
        mined = self.robust_mode == "mined"
        stats = self._apply_mined(ctx, robust) if mined else self._apply_rece(ctx)
        return {**stats, "body_layers": apply_channel_maps(layers, maps)}

    @torch.no_grad()
    def _apply_rece(self, ctx) -> dict:
        """UCE's edit, then RECE-style rounds: after each edit, the text state that still
        regenerates the target's keys and values is solved for in closed form,
            c* = (Σ_l W_lᵀW_l + λ·s·I)⁻¹ Σ_l W_lᵀ W_l,old c,   s = mean_l ‖W_l‖²_F / d,
        over every K/V projection l, for every target column c, and added to the columns
        mapped to the anchor; the edit is then solved again from the weights before the
        request (`rece_rounds` times)."""
        prompts = self._prompt_sets(ctx)
        c_e, c_g, c_p = self._columns(ctx, prompts)
        originals = text_projections(ctx)
        erase, guides = c_e, c_g
        edited, norms = self._edit(ctx, originals, erase, guides, c_p) + edit_pooled_read(ctx, *prompts[:3], self.lam), []
        d = c_e.shape[1]
        eye = torch.eye(d, dtype=torch.float64, device=c_e.device)
        for _ in range(self.rece_rounds):
            gram = sum(m.weight.double().T @ m.weight.double() for m, _ in originals.values())
            cross = sum(m.weight.double().T @ w for m, w in originals.values())
            scale = float(torch.trace(gram)) / d
            found = (torch.linalg.solve(gram + self.rece_lambda * scale * eye, cross @ c_e.T)).T
            norms.append(float(found.norm(dim=1).mean() / c_e.norm(dim=1).mean()))
            erase, guides = torch.cat([erase, found]), torch.cat([guides, c_g])
            self._edit(ctx, originals, erase, guides, c_p)
        return {"layers_edited": edited, "columns_erased": len(erase), "columns_preserved": len(c_p),
                "rece_rounds": self.rece_rounds, "rece_norm_ratio": norms}

    @torch.no_grad()
    def _apply_mined(self, ctx, robust) -> dict:
        """Robust rounds with a gradient attack inside: after each edit, the `--robust`
        plug-in mines one-token soft prompts for each target on the edited model; the target
        prompts with the word replaced by each of them become more columns mapped to the
        anchor, and the edit is solved again from the weights before the request."""
        from ..engine.robust import Robust, _word, put
        from ..evaluate.softprompt import soft_tokens

        # one token keeps the positions aligned with the anchor; the caller's settings (as the
        # ledger records them) are left alone, and only the mined pool is handed back
        miner = replace(robust or Robust(), tokens=1, vary_tokens=False)
        miner.prepare(ctx)
        sets = self._prompt_sets(ctx)
        (c_e, c_g, c_p), pairs = self._columns(ctx, sets), sets[3]
        originals = text_projections(ctx)
        erase, guides = c_e, c_g
        edited = self._edit(ctx, originals, erase, guides, c_p)
        (slot, slot_id), text = miner.slots[0], ctx.pipe.text_encoder
        for r in range(self.rece_rounds):
            with torch.enable_grad():
                miner.mine(ctx, r * miner.every)
            for name in ctx.request.names:
                word, vec = _word(name), miner.vectors[name][-1]
                prompts = [put(word, slot, t) for t, _ in pairs]
                with soft_tokens(text, [slot_id], vec.to(ctx.device)):
                    found = ctx.encode(prompts).states.reshape(-1, c_e.shape[1]).double()
                erase, guides = torch.cat([erase, found]), torch.cat([guides, c_g])
            self._edit(ctx, originals, erase, guides, c_p)
        if robust is not None:
            robust.vectors = miner.vectors
        return {"layers_edited": edited, "columns_erased": len(erase), "columns_preserved": len(c_p),
                "rounds": self.rece_rounds, "robust_mode": "mined"}
