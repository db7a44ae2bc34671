"""UCE's closed form, shared: the least-squares edit of a linear map that reads the text.

For a map W_old and columns c_e (what to erase), c_g (the guide each erased column should
now map like) and c_p (what to keep):
    W = W_old·M,   M = (λ·I + s_e·C_gᵀC_e + s_p·C_pᵀC_p)(λ·I + s_e·C_eᵀC_e + s_p·C_pᵀC_p)⁻¹
(rows of C are columns c), the minimiser of s_e·Σ‖W c_e − W_old c_g‖² + s_p·Σ‖W c_p − W_old c_p‖²
+ λ‖W − W_old‖²_F. UCE applies it to every K/V projection (`methods/uce.py`), and so does
DUGE where a removal sends earlier targets on to a new anchor (`methods/duge.py`):
`text_columns` gives the columns, `text_projections` the maps and `edit_projections` sets them.
`gram_matrix` is the same solution from sums of outer products (`engine.body_edit`).

`edit_pooled_read` applies it to the first linear layer of the module that reads a prompt's
pooled embedding into every block of SD3 and Flux (`Family.pooled_text_map`): one vector per
prompt, so the closed form is exact where gradient steps on it also moved what they should
keep (on `shapes-sd3`, DUGE with that layer trained: star removed, dotted −0.18;
docs/experiments.md, session 17). DUGE and UCE both call it.
"""

from __future__ import annotations

import torch


def gram_matrix(ee: torch.Tensor, ge: torch.Tensor, pp: torch.Tensor, lam: float) -> torch.Tensor:
    """M = (λI + G_ge + G_pp)(λI + G_ee + G_pp)⁻¹ from the sums G_ee = Σ c_e c_eᵀ,
    G_ge = Σ c_g c_eᵀ and G_pp = Σ c_p c_pᵀ (float64): the closed form above when the columns
    are too many to keep (`body_edit` sums them over the pixels of many images)."""
    eye = torch.eye(ee.shape[0], dtype=torch.float64, device=ee.device)
    return (lam * eye + ge + pp) @ torch.linalg.inv(lam * eye + ee + pp)


def uce_matrix(c_e: torch.Tensor, c_g: torch.Tensor, c_p: torch.Tensor, lam: float,
               erase_scale: float = 1.0, preserve_scale: float = 1.0) -> torch.Tensor:
    """M with W = W_old·M the closed-form edit above (float64, columns as rows of c_*)."""
    return gram_matrix(erase_scale * c_e.T @ c_e, erase_scale * c_g.T @ c_e,
                       preserve_scale * c_p.T @ c_p, lam)


def edit_prompts(ctx, rng, per_target: int, per_preserved: int, memory: int,
                 per_earlier: int) -> tuple[list[tuple[str, str]], list[str]]:
    """The prompts a closed-form edit reads, drawn from `rng` in this order: `per_target`
    (target, anchor) caption pairs per target of the request, and the prompts to keep:
    `per_preserved` naming each preserved concept, `memory` memory prompts and `per_earlier`
    naming each earlier target of the lineage. UCE reads their text states, the body edit
    (`engine.body_edit`) the original model's drawings of them."""
    req, world, removed = ctx.request, ctx.world, ctx.removed
    pairs = [p for t, a in zip(req.targets, req.anchors)
             for p in world.prompt_pairs(t, a, per_target, rng)]
    keep = [p for c in req.preserve for p in world.prompts_naming(c, per_preserved, rng, removed)]
    keep += world.memory_prompts(removed, memory, rng)
    keep += [t for r in ctx.history for tg, a in zip(r.targets, r.anchors)
             for t, _ in world.prompt_pairs(tg, a, per_earlier, rng)]
    return pairs, keep


def text_columns(ctx, prompts: list[str]) -> torch.Tensor:
    """The columns c of `prompts`: the text-encoder states of the model before this request,
    one per token position (the UNet attends to all of them), float64."""
    return ctx.encode(prompts, frozen=True).states.flatten(0, -2).double()


def text_projections(ctx) -> dict:
    """Every map that reads the text in the denoiser (`Family.text_projections`: the
    cross-attention K/V), each with a float64 copy of its current weights: {name: (module, W)}."""
    layers = ctx.family.text_projections(getattr(ctx.pipe, ctx.family.denoiser))
    return {name: (module, module.weight.double().clone()) for name, module in layers.items()}


@torch.no_grad()
def edit_projections(projections: dict, edit: torch.Tensor) -> int:
    """Set every module of `projections` ({name: (module, W)}) to W·M; returns how many."""
    for module, w in projections.values():
        module.weight.copy_((w @ edit).to(module.weight.dtype))
    return len(projections)


@torch.no_grad()
def edit_pooled_read(ctx, targets: list[str], anchors: list[str], keep: list[str], lam: float = 0.5) -> int:
    """Map each target prompt's pooled embedding as its anchor prompt's is mapped, and keep
    the `keep` prompts' as they are, in the pooled read's first linear layer (SD3, Flux).
    Returns the number of layers edited: 0 for a family without a pooled read."""
    read = ctx.family.pooled_text_map(getattr(ctx.pipe, ctx.family.denoiser))
    if read is None:
        return 0
    e, g = (ctx.encode(prompts, frozen=True).extra["pooled_projections"].double() for prompts in (targets, anchors))
    p = ctx.encode(keep, frozen=True).extra["pooled_projections"].double() if keep else e[:0]
    layer = read.linear_1
    layer.weight.copy_((layer.weight.double() @ uce_matrix(e, g, p, lam)).to(layer.weight.dtype))
    return 1
