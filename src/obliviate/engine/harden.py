"""The hardening stage of `--robust`: ESD-u, held on what must stay, before the method runs.
DUGE's default runs it for colour and style requests; a request naming only objects gets
the closed-form body edit instead (engine.body_edit, `object_stage`), where the denoiser
has convolutions to map. After a style's stage (and the method's) the coarse levels are held
to the model before in closed form (engine.body_hold, `body_hold`).

    target = ε_φ(x_t, ∅, t) − η·(ε_φ(x_t, c_tgt, t) − ε_φ(x_t, ∅, t))
    L = ‖ε_θ(x_t, c_tgt, t) − target‖² + λ_keep·‖ε_θ(x_t, c_keep, t) − ε_0(x_t, c_keep, t)‖² + L_img
trained on everything in the denoiser but what reads the text (methods.esd, variant u) for
`harden_steps` steps at `harden_lr`, λ_keep by the target's kind (`stage_recipe`: 5 for
objects, 10 for colours; a style 1.5x the steps, λ 10, the anchor's reference, 128 keep
prompts). c_keep are `harden_keep_prompts` prompts (`harden_keep_prompts_style` for a style)
naming no removed concept but naming a concept of every removed kind (the memory bank), and
the preserve set's; ε_0 is the lineage's original model (held to the model before the
request instead, six hardened requests drifted). 32 for objects and colours: 128 halves
what a style's stage costs objects, but on every request of six it left a never-removed
concept at 0.94-0.95 on one seed of two (sessions 30-31); at a sixth request (a style)
never-removed concepts swing 0.76-0.99 with the data the stage draws and the order it sees
them in, at 32 or 128; 128 image pairs and memory images narrowed seed 1's draws to
0.94-0.98 but left a seed-0 chain at 0.90 (docs/experiments.md, sessions 32-33); the repair
stage after the method's (engine.repair, `repair_steps`, off by default) held all four
draws at 0.96-0.99 and two seeds' chains at 0.987-0.997, but gave star back to 0.35 under
4-token inversions after six (session 34). `harden_stratify` deals the keep and memory
prompts so each never-removed concept is named equally often: it moved which draw failed
(session 34).
For an object, DUGE trains only the coarse half of the UNet's resolution levels and its mid
block (`harden_group_object=non-attn2-deep`, `Family.deep_levels`): a shape is laid out
there, and the fine levels, which draw textures and colours, stay as they were (star at 192
images per concept, seeds 1 and 2: dotted's drop 0.09 → 0.00-0.01, the strongest rungs tried
≤ 0.10; a style needs the fine levels: trained there alone, striped's stage took dotted
0.17; docs/experiments.md, session 29). L_img is
ESD's paired-image term (`harden_image`, λ 2 for DUGE; 0 turns it off): noisy images of the
target denoise to same-seed images of its anchor, kept concepts' images and
`harden_image_memory` memory prompts' images to themselves. It holds a style (striped)
where the keep term alone cannot; without the memory prompts' images a colour no request
named dipped over three requests (docs/benchmarks.md). On a colour request λ_img is
multiplied by `harden_image_attribute_factor` (DUGE: 0, the term off): in a six-request
chain it was red's paired-image term that let star back, whichever levels the stage trained
(docs/experiments.md, session 38). Then φ is taken again (the hardened
model is "the model before" for the method's own stage) and the method edits as usual.
Without the replay below it needs no soft prompt, so it runs on every family.
`harden_reference="anchor"` takes ESD's reference from the anchor's caption instead of the
empty prompt (methods.esd); `harden_image_t_high` bounds the paired-image term's timesteps.
`harden_replay=R` (off by default) replays R pairs of every earlier target of the lineage in
the paired-image term; half their captions name the target, and a share `share` of those
name it through a soft prompt the `--robust` miner finds on the weights being hardened
(every `harden_replay_every` steps, from the newest soft prompt the lineage kept for it).
With it a style's stage can be held at λ_keep 20 without giving star back after six
requests (quick ladder 0.06-0.12 against 0.33-0.40), but six requests ended no better than
at λ 10 without it, at up to 1.7x the seconds (docs/benchmarks.md, experiments.md session
23). It learns soft prompts: SD 1.x/2.x only. A style needs more than the default 100 steps
against 1000-step attacks (striped, full ladder: 0.88; 200 steps with the anchor reference
and λ_keep 20: 0.17, docs/benchmarks.md).

Why: an edit of the cross-attention keys and values (DUGE) moves where the target's word
points, but the UNet body still draws the target for some text state, and a learned soft
prompt finds one (star back at 0.85-0.96 after DUGE). ESD-u changes what the body draws for
the target's conditioning but on its own removes less (UA 0.85). Together, on the shapes
model, star before the paired-image term: UA 1.00, the quick soft-prompt ladder at 0.04, the
full one at 0.31; with it (and the memory images) 0.04 and 0.08. Striped's quick ladder:
0.79 before, 0.08 with it (one seed each; docs/benchmarks.md).
A white-box perturbation of
the conditioning still finds stars (the upper bound): the capability is out of a prompt's
reach, not gone. Variants measured and dropped: docs/experiments.md, sessions 13-16.
"""

from __future__ import annotations

from .loop import run_stage


def stage_recipe(request, robust) -> dict:
    """Steps, λ_keep, keep prompts, ESD reference, trained group and λ_img of this request's
    stage, by the kind of its targets (a colour's λ_img: `harden_image` ×
    `harden_image_attribute_factor`).

    An object: `harden_steps`, `harden_keep`, `harden_reference`, `harden_group_object`. A
    colour: λ_keep `harden_keep_attribute` (a colour is drawn by body features every concept
    shares: at λ 5 a style's stage cost a colour 0.11; an object's stage at λ 10 let star back
    at 0.73 under the 4-token ladder rung, 0.29 at λ 5). A request naming a style:
    `harden_steps` × `harden_style_factor` steps, `harden_keep_style`, `harden_reference_style`,
    `harden_keep_prompts_style` keep prompts (a texture comes back under 1000-step inversions
    after the object recipe: striped 0.88; 2x / 20 / anchor: 0.17; 2x / 10 / anchor: 0.10;
    1.5x / 10 / anchor / 128 prompts: 0.104). DUGE's λ for a style is 10, not 20: held at 20
    to the original model, a later style's stage undid an earlier object's hardening (star's
    quick ladder after six requests 0.40 at 20, 0.17 at 10; docs/experiments.md, session 21)."""
    kinds = {t.kind for t in request.targets}
    if "style" in kinds:
        return {"steps": max(1, round(robust.harden_steps * robust.harden_style_factor)),
                "keep": robust.harden_keep_style, "reference": robust.harden_reference_style,
                "keep_prompts": robust.harden_keep_prompts_style, "group": "non-attn2",
                "image": robust.harden_image}
    objects = kinds == {"object"}
    return {"steps": robust.harden_steps, "keep_prompts": robust.harden_keep_prompts,
            "keep": robust.harden_keep if objects else robust.harden_keep_attribute,
            "reference": robust.harden_reference,
            "group": robust.harden_group_object if objects else "non-attn2",
            "image": robust.harden_image * (1 if objects else robust.harden_image_attribute_factor)}


def harden(ctx, robust) -> dict:
    """Run the ESD-u stage on `ctx` for `robust.harden_steps` steps, then retake φ for the
    method's stage (which trains the group `ctx.train_group` named before)."""
    from ..methods.base import get_method

    recipe = stage_recipe(ctx.request, robust)
    esd = get_method("esd", variant="u", steps=recipe["steps"], lr=robust.harden_lr,
                     lambda_keep=recipe["keep"], keep_prompts=recipe["keep_prompts"],
                     keep_reference="original", reference=recipe["reference"],
                     lambda_image=recipe["image"], image_pairs=robust.harden_image_pairs,
                     image_memory=robust.harden_image_memory, image_replay=robust.harden_replay,
                     image_t_high=robust.harden_image_t_high,
                     stratified=robust.harden_stratify)
    esd.param_group = recipe["group"]
    stats = run_stage(esd, ctx, seed=ctx.seed, robust=lambda: _earlier_adversary(ctx, esd, robust))
    return {"harden_keep": recipe["keep"], "harden_steps_run": recipe["steps"],
            "harden_keep_prompts": recipe["keep_prompts"],
            "harden_group": recipe["group"], "harden_image": recipe["image"],
            "harden_loss_first": stats["loss_first"], "harden_loss_last": stats["loss_last"],
            "harden_seconds": stats["seconds_training"]}


def _earlier_adversary(ctx, esd, robust):
    """With `harden_replay`, a Robust that mines soft prompts for the lineage's earlier
    targets on the weights being hardened (every `harden_replay_every` steps, from each
    target's newest soft prompt in the lineage where there is one) and puts them in the
    replay's captions; its pools go back to `robust`, so the lineage keeps them."""
    from .robust import Robust

    earlier = [t.name for r in ctx.history for t in r.targets]
    if not (robust.harden_replay and earlier):
        return None
    pools = {name: robust.vectors.setdefault(name, []) for name in earlier}  # shared: saved with the model
    adversary = Robust.checked({**robust.settings(), "every": robust.harden_replay_every}, pools)
    adversary._round = 1  # round 0 would start every pool afresh; a kept pool goes on from its newest
    adversary.prepare(ctx, mine_for=earlier)
    esd.forget_prompts = (("replay", "prompts"),)  # the soft prompts go to the replay only
    return adversary
