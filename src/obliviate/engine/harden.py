"""The hardening stage of `--robust`: ESD-u on the request's targets before the method runs.

    target = ε_φ(x_t, ∅, t) − η·(ε_φ(x_t, c_tgt, t) − ε_φ(x_t, ∅, t)),  L = ‖ε_θ(x_t, c_tgt, t) − target‖²,
trained on everything in the UNet but cross-attention (methods.esd, variant u), for
`harden_steps` steps at `harden_lr`. Then φ is taken again (the hardened model is "the model
before" the method's own stage) and the method edits as usual.

Why: an edit of the cross-attention keys and values (DUGE, UCE) moves where the target's
word points, but the UNet body still draws the target for some text state, and a learned
soft prompt finds one (star came back at 0.85 after DUGE). ESD-u changes what the body
draws for the target's conditioning; on its own it removes less (UA 0.85). Together, on the
shapes model: UA 0.98 and soft prompts at 0.02 (docs/experiments.md, session 13).
"""

from __future__ import annotations

from .loop import train


def harden(ctx, robust) -> dict:
    """Run the ESD-u stage on `ctx` for `robust.harden_steps` steps, then retake φ."""
    from ..methods.base import get_method

    esd = get_method("esd", variant="u", steps=robust.harden_steps, lr=robust.harden_lr,
                     lambda_keep=robust.harden_keep)
    esd.prepare(ctx)
    stats = train(esd, ctx, steps=esd.steps, lr=esd.lr, batch_size=esd.batch_size, seed=ctx.seed)
    ctx.restart()
    return {"harden_loss_first": stats["loss_first"], "harden_loss_last": stats["loss_last"],
            "harden_seconds": stats["seconds_training"]}
