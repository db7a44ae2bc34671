"""The hardening stage of `--robust`: ESD-u, held on what must stay, before the method runs.

    target = ε_φ(x_t, ∅, t) − η·(ε_φ(x_t, c_tgt, t) − ε_φ(x_t, ∅, t))
    L = ‖ε_θ(x_t, c_tgt, t) − target‖² + λ_keep·‖ε_θ(x_t, c_keep, t) − ε_φ(x_t, c_keep, t)‖²
trained on everything in the UNet but cross-attention (methods.esd, variant u, `lambda_keep`)
for `harden_steps` steps at `harden_lr`; c_keep are prompts naming no removed concept (the
memory bank and the preserve set). Then φ is taken again (the hardened model is "the model
before" for the method's own stage) and the method edits as usual.

Why: an edit of the cross-attention keys and values (DUGE, UCE) moves where the target's
word points, but the UNet body still draws the target for some text state, and a learned
soft prompt finds one (star back at 0.85 after DUGE). ESD-u changes what the body draws for
the target's conditioning but on its own removes less (UA 0.85). Together, on the shapes
model, star: UA 1.00, the quick soft-prompt ladder at 0.06 and the full one at 0.27; without
the keep term the colours lost 0.13 (yellow 0.35), with λ_keep 5 no concept lost more than
0.04. Not solved: a style (striped back at 0.79: the keep term holds the texture too), and
six hardened requests in a row, whose stages drift (solid down to 0.57 of its accuracy);
docs/experiments.md, session 13. A white-box perturbation of the conditioning still finds
stars (the upper bound): the capability is out of a prompt's reach, not gone.
"""

from __future__ import annotations

from .loop import train


def harden(ctx, robust) -> dict:
    """Run the ESD-u stage on `ctx` for `robust.harden_steps` steps, then retake φ for the
    method's stage (which trains the group `ctx.train_group` named before)."""
    from ..methods.base import get_method

    esd = get_method("esd", variant="u", steps=robust.harden_steps, lr=robust.harden_lr,
                     lambda_keep=robust.harden_keep,
                     keep_reference="original" if robust.harden_original else "before")
    after = ctx.train_group
    ctx.restart(esd.param_group)
    esd.prepare(ctx)
    stats = train(esd, ctx, steps=esd.steps, lr=esd.lr, batch_size=esd.batch_size, seed=ctx.seed)
    ctx.restart(after)
    return {"harden_loss_first": stats["loss_first"], "harden_loss_last": stats["loss_last"],
            "harden_seconds": stats["seconds_training"]}
