"""The hardening stage of `--robust`: ESD-u, held on what must stay, before the method runs.

    target = ε_φ(x_t, ∅, t) − η·(ε_φ(x_t, c_tgt, t) − ε_φ(x_t, ∅, t))
    L = ‖ε_θ(x_t, c_tgt, t) − target‖² + λ_keep·‖ε_θ(x_t, c_keep, t) − ε_0(x_t, c_keep, t)‖²
trained on everything in the denoiser but what reads the text (methods.esd, variant u,
`lambda_keep`) for `harden_steps` steps at `harden_lr`. c_keep are prompts naming no removed
concept but naming a concept of every removed kind (the memory bank, the preserve set), and
ε_0 is the lineage's original model: held to the model before the request instead, six
hardened requests drifted (solid down to 0.57 of its accuracy; 0.96 now). Then φ is taken
again (the hardened model is "the model before" for the method's own stage) and the method
edits as usual. Needs no soft prompt, so it runs on every family.

Why: an edit of the cross-attention keys and values (DUGE) moves where the target's word
points, but the UNet body still draws the target for some text state, and a learned soft
prompt finds one (star back at 0.85-0.96 after DUGE). ESD-u changes what the body draws for
the target's conditioning but on its own removes less (UA 0.85). Together, on the shapes
model, star: UA 1.00, the quick soft-prompt ladder at 0.04 (the full one at 0.27 with
session 13's keep prompts), every other concept within 0.04. Not solved: a style (striped back at 0.83), UCE (its closed-form
edit after this stage: 0.92), and a colour eroded by a later style's stage (yellow 0.85
after six requests); docs/experiments.md, sessions 13-14. A white-box perturbation of the
conditioning still finds stars (the upper bound): the capability is out of a prompt's reach,
not gone.
"""

from __future__ import annotations

from .loop import train


def harden(ctx, robust) -> dict:
    """Run the ESD-u stage on `ctx` for `robust.harden_steps` steps, then retake φ for the
    method's stage (which trains the group `ctx.train_group` named before)."""
    from ..methods.base import get_method

    esd = get_method("esd", variant="u", steps=robust.harden_steps, lr=robust.harden_lr,
                     lambda_keep=robust.harden_keep, keep_reference="original")
    after = ctx.train_group
    ctx.restart(esd.param_group)
    esd.prepare(ctx)
    stats = train(esd, ctx, steps=esd.steps, lr=esd.lr, batch_size=esd.batch_size, seed=ctx.seed)
    ctx.restart(after)
    return {"harden_loss_first": stats["loss_first"], "harden_loss_last": stats["loss_last"],
            "harden_seconds": stats["seconds_training"]}
