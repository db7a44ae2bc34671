"""The attack suite (soft-prompt ladder, hard prompt, upper bound) and the --robust plug-in."""

from __future__ import annotations

import copy
import json

import pytest
from safetensors.torch import load_file

from obliviate import load_pipeline
from obliviate.cli import main
from obliviate.engine.robust import PROMPTS_FILE
from obliviate.erase import erase
from obliviate.evaluate import softprompt
from obliviate.evaluate.softprompt import Rung, SoftPromptAttack, softprompt_ladder
from obliviate.evaluate.textattacks import conditioning_attack, hardprompt_attack
from obliviate.families import family_of
from obliviate.finetune import prompt_ids
from obliviate.ledger import Ledger, pipeline_state
from obliviate.request import Request
from obliviate.shapes import vocab
from sd_tiny import SMALL_IMAGES, save_tiny_sd

# mining on (DUGE's --robust default is the hardening stage without it)
TINY_ROBUST = {"every": 2, "mine_steps": 2, "first_steps": 3, "batch_size": 2, "prompts": 4, "mining": True,
               "harden_steps": 0}


@pytest.fixture()
def shapes_base(tmp_path, monkeypatch):
    monkeypatch.setenv("OBLIVIATE_CACHE", str(tmp_path / "cache"))
    return save_tiny_sd(tmp_path / "shapes-base", world="shapes")


def test_robust_mines_soft_prompts_and_carries_them_down_the_lineage(shapes_base, tmp_path):
    pipe = load_pipeline(shapes_base)
    erase(pipe, Request(("star",)), out=tmp_path / "1", robust=TINY_ROBUST, steps=4, batch_size=2,
          progress=False)
    first = load_file(tmp_path / "1" / PROMPTS_FILE)
    assert sorted(first) == ["star.0", "star.1"]  # mined at steps 0 and 2
    assert Ledger.load(tmp_path / "1").entries[0].settings["robust"]["every"] == 2
    erase(load_pipeline(tmp_path / "1"), Request(("striped",)), out=tmp_path / "2", robust=TINY_ROBUST,
          steps=4, batch_size=2, progress=False)
    second = load_file(tmp_path / "2" / PROMPTS_FILE)
    assert {k for k in second if k.startswith("striped.")} == {"striped.0", "striped.1"}
    # the earlier target's soft prompts are kept in the lineage (and defended again)
    assert all((second[k] == first[k]).all() for k in first)


def test_duge_robust_edits_an_objects_body_in_closed_form(shapes_base, tmp_path):
    """DUGE's --robust default for a request naming only objects: the convolutions of the
    coarse levels are edited in closed form (engine.body_edit) in place of the hardening
    stage, DUGE edits the cross-attention keys and values, and nothing else moves."""
    pipe = load_pipeline(shapes_base)
    before = {k: v.clone() for k, v in pipeline_state(pipe).items()}
    result = erase(pipe, Request(("star",)), out=tmp_path / "b", robust={"harden_steps": 3, "body_pairs": 4,
                   "body_keep": 4}, steps=2, batch_size=2, progress=False)
    changed = {k for k, v in pipeline_state(pipe).items() if not (v == before[k]).all()}
    convs = {f"unet.{n}.weight" for n in family_of(pipe).body_convolutions(pipe.unet)}
    kv = {k for k in changed if ".attn2.to_k." in k or ".attn2.to_v." in k}
    assert convs and kv and changed == convs | kv
    assert result.stats["body_layers"] == len(convs) and "harden_seconds" not in result.stats
    assert Ledger.load(tmp_path / "b").entries[0].settings["robust"]["object_stage"] == "body"


def test_duge_robust_holds_a_styles_coarse_levels_to_the_model_before(shapes_base, tmp_path):
    """After a style's hardening stage and DUGE's edit, DUGE's --robust default sets the
    coarse levels' convolutions in closed form (engine.body_hold): nothing else differs from
    the same request without the hold, and prompts that must stay are predicted nearer to
    the model before the request, while the target's stay as the stage left them."""
    import torch

    settings = {"harden_steps": 2, **SMALL_IMAGES, "hold_pairs": 4, "hold_memory": 8}
    runs = {}
    for hold in ("style", "off"):
        pipe = load_pipeline(shapes_base)
        result = erase(pipe, Request(("striped",)), robust={**settings, "body_hold": hold}, steps=2,
                       batch_size=2, progress=False, out=tmp_path / hold)
        runs[hold] = (pipe, result)
    (held, result), (plain, plain_result) = runs["style"], runs["off"]
    convs = {f"unet.{n}.weight" for n in family_of(held).body_convolutions(held.unet)}
    ours, theirs = pipeline_state(held), pipeline_state(plain)
    assert {k for k in ours if not torch.equal(ours[k], theirs[k])} == convs
    assert result.stats["hold_layers"] == len(convs) and "hold_layers" not in plain_result.stats
    assert Ledger.load(tmp_path / "style").entries[0].settings["robust"]["body_hold"] == "style"
    before = load_pipeline(shapes_base)
    x = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([300, 500, 700] * 2)

    def eps(pipe, prompts):
        ids = prompt_ids(pipe.tokenizer, prompts)
        with torch.no_grad():
            return pipe.unet(x, t, pipe.text_encoder(ids)[0]).sample

    kept = ["a blue circle", "a dotted square", "a red triangle"] * 2
    off = lambda pipe: (eps(pipe, kept) - eps(before, kept)).pow(2).mean()  # noqa: E731
    assert off(held) < off(plain)
    target = ["a striped square", "a striped circle", "a striped star"] * 2
    moved = (eps(plain, target) - eps(before, target)).pow(2).mean()
    assert (eps(held, target) - eps(plain, target)).pow(2).mean() < moved


def test_duge_robust_hardens_the_unet_body_before_its_own_edit(shapes_base, tmp_path):
    """DUGE's --robust for a colour or a style, and for an object with
    `object_stage=harden`: an ESD-u stage changes the UNet outside cross-attention, then DUGE
    edits the cross-attention keys and values; the ledger records the stage."""
    pipe = load_pipeline(shapes_base)
    before = {k: v.clone() for k, v in pipeline_state(pipe).items()}
    result = erase(pipe, Request(("star",)), out=tmp_path / "h", robust={"harden_steps": 3, "object_stage": "harden",
                   **SMALL_IMAGES}, steps=3, batch_size=2, progress=False)
    changed = {k for k, v in pipeline_state(pipe).items() if not (v == before[k]).all()}
    body = {k for k in changed if ".attn2." not in k}
    kv = {k for k in changed if ".attn2.to_k." in k or ".attn2.to_v." in k}
    assert body and kv and all(k.startswith("unet.") for k in changed)
    settings = Ledger.load(tmp_path / "h").entries[0].settings["robust"]
    assert settings["harden_steps"] == 3 and settings["mining"] is False
    assert result.stats["harden_seconds"] >= 0 and not (tmp_path / "h" / PROMPTS_FILE).exists()
    # a colour is held harder to what stays than an object; a style as hard, half again as long
    assert result.stats["harden_keep"] == 5.0 and result.stats["harden_steps_run"] == 3
    coloured = erase(load_pipeline(shapes_base), Request(("red",)),
                     robust={"harden_steps": 1, **SMALL_IMAGES}, steps=1, batch_size=2,
                     progress=False)
    assert coloured.stats["harden_keep"] == 10.0 and coloured.stats["harden_steps_run"] == 1
    # a colour's stage has no paired-image term (it let star back, docs/experiments.md)
    assert coloured.stats["harden_image"] == 0.0 and result.stats["harden_image"] == 2.0
    styled_pipe = load_pipeline(shapes_base)
    styled = erase(styled_pipe, Request(("striped",)), robust={"harden_steps": 2, **SMALL_IMAGES}, steps=1,
                   batch_size=2, progress=False)
    assert styled.stats["harden_keep"] == 10.0 and styled.stats["harden_steps_run"] == 3
    assert styled.stats["harden_keep_prompts"] == 6 and result.stats["harden_keep_prompts"] == 4
    # an object's stage trains the coarse resolution levels, where a shape is laid out, and
    # leaves the fine ones, which draw textures and colours; a style's stage needs the fine ones
    coarse = tuple(f"unet.{p}" for p in family_of(pipe).deep_levels(pipe.unet))
    assert result.stats["harden_group"] == "non-attn2-deep" and all(k.startswith(coarse) for k in body)
    assert any(k.startswith("unet.mid_block.") for k in body) and "unet.mid_block." in coarse
    styled_body = {k for k, v in pipeline_state(styled_pipe).items() if ".attn2." not in k and not (v == before[k]).all()}
    assert any(not k.startswith(coarse) for k in styled_body)
    # without the stage, the body is untouched
    plain = load_pipeline(shapes_base)
    erase(plain, Request(("star",)), robust={"harden_steps": 0, "object_stage": "harden"}, steps=3, batch_size=2,
          progress=False)
    assert not any(".attn2." not in k and not (v == before[k]).all() for k, v in pipeline_state(plain).items())


def test_the_hardening_holds_later_requests_to_the_lineage_original(shapes_base, tmp_path, monkeypatch):
    """In a lineage, the keep term's reference is the original model, not the model before
    the request: otherwise each request's drift is kept by the next one and adds up."""
    import torch

    import obliviate.erase as erase_module

    first = load_pipeline(shapes_base)
    erase(first, Request(("star",)), method="esd", options={"variant": "u", "lr": 1e-2}, out=tmp_path / "1",
          steps=3, batch_size=2, progress=False)
    seen, real = {}, erase_module.harden

    def spy(ctx, robust):
        x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500, 500])
        prompts = ["a red square", "a blue circle"]
        seen["reference"] = ctx.base_eps(x, t, prompts)
        seen["before"] = ctx.eps(x, t, ctx.encode(prompts, frozen=True), frozen=True)
        original = load_pipeline(shapes_base)
        ids = prompt_ids(original.tokenizer, prompts)
        with torch.no_grad():
            seen["original"] = original.unet(x, t, original.text_encoder(ids)[0]).sample
        return real(ctx, robust)

    monkeypatch.setattr(erase_module, "harden", spy)
    erase(load_pipeline(tmp_path / "1"), Request(("square",)), out=tmp_path / "2",
          robust={"harden_steps": 2, "object_stage": "harden", **SMALL_IMAGES},
          steps=2, batch_size=2, progress=False)
    assert torch.allclose(seen["reference"], seen["original"], atol=1e-5)
    assert not torch.allclose(seen["before"], seen["original"], atol=1e-3)


def test_the_paired_image_term_denoises_the_targets_images_to_their_anchor_counterparts(tmp_path, monkeypatch):
    """ESD with `lambda_image` (the hardening's paired-image term): after training, the UNet
    takes a noisy image of the target, under the target's prompt, closer to the same-seed
    image of its anchor than the same training without the term does."""
    import numpy as np
    import torch

    from obliviate.concepts import world_for
    from obliviate.engine.data import LatentCache
    from obliviate.families import family_of
    from obliviate.finetune import prompt_ids

    def x0_distance(pipe, forget, anchor):
        ids = prompt_ids(pipe.tokenizer, prompts)
        gen = torch.Generator().manual_seed(1)
        noise, t = torch.randn(forget.shape, generator=gen), torch.full((len(forget),), 400)
        x_t = pipe.scheduler.add_noise(forget, noise, t)
        with torch.no_grad():
            eps = pipe.unet(x_t, t, pipe.text_encoder(ids)[0]).sample
        return float((family_of(pipe).x0(pipe.scheduler, x_t, eps, t) - anchor).pow(2).mean())

    monkeypatch.setenv("OBLIVIATE_CACHE", str(tmp_path / "cache"))
    base = load_pipeline("shapes")
    world = world_for(base)
    pairs = world.prompt_pairs(world.target("striped"), "solid", 8, np.random.default_rng(5))
    prompts = [p for p, _ in pairs]
    cache, sha = LatentCache(), "base"
    forget = cache.get(base, sha, prompts, 0)
    anchor = cache.get(base, sha, [a for _, a in pairs], 0)
    distances = {}
    for weight in (0.0, 10.0):
        pipe = load_pipeline("shapes")
        erase(pipe, Request(("striped",)), method="esd",
              options={"variant": "u", "lr": 1e-3, "lambda_image": weight, "image_pairs": 8},
              steps=10, batch_size=4, progress=False)
        distances[weight] = x0_distance(pipe, forget, anchor)
    assert distances[10.0] < 0.8 * distances[0.0], distances


def test_the_repairs_hold_term_keeps_what_the_request_did_to_the_targets_images(tmp_path, monkeypatch):
    """`repair_hold`: the repair pulls the body towards the lineage's original, which would
    give the removal back on the target's own images; with the hold term the model after
    the repair stays closer, on star's images, to the model before it than without."""
    import numpy as np
    import torch

    from obliviate.concepts import world_for
    from obliviate.engine.data import LatentCache
    from obliviate.finetune import prompt_ids

    monkeypatch.setenv("OBLIVIATE_CACHE", str(tmp_path / "cache"))
    base = load_pipeline("shapes")
    world = world_for(base)
    prompts = [p for p, _ in world.prompt_pairs(world.target("star"), "cross", 8, np.random.default_rng(3))]
    latents = LatentCache().get(base, "base", prompts, 0)
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(latents.shape, generator=generator)
    t = torch.randint(100, 900, (len(prompts),), generator=generator)
    x_t, ids = base.scheduler.add_noise(latents, noise, t), prompt_ids(base.tokenizer, prompts)

    def eps(pipe):
        with torch.no_grad():
            return pipe.unet(x_t, t, pipe.text_encoder(ids)[0]).sample

    robust = {"harden_steps": 0, "repair_prompts": 8, "harden_lr": 1e-3}
    runs = {}
    for steps, hold in ((0, 0.0), (10, 0.0), (10, 10.0)):
        pipe = load_pipeline("shapes")
        erase(pipe, Request(("star",)), robust={**robust, "repair_steps": steps, "repair_hold": hold},
              steps=10, batch_size=4, progress=False)
        runs[steps, hold] = eps(pipe)
    before = runs[0, 0.0]
    drift = {hold: float((runs[10, hold] - before).pow(2).mean()) for hold in (0.0, 10.0)}
    assert drift[10.0] < 0.8 * drift[0.0], drift


def test_robust_wraps_esd_and_uce_has_a_closed_form_variant(shapes_base, tmp_path):
    pipe = load_pipeline(shapes_base)
    before = {k: v.clone() for k, v in pipeline_state(pipe).items()}
    erase(pipe, Request(("star",)), method="esd", options={"variant": "x"}, robust=TINY_ROBUST, steps=4,
          batch_size=2, progress=False)
    changed = {k for k, v in pipeline_state(pipe).items() if not (v == before[k]).all()}
    assert changed and all(".attn2." in k for k in changed)
    plain, robust = load_pipeline(shapes_base), load_pipeline(shapes_base)
    erase(plain, Request(("star",)), method="uce", progress=False)
    result = erase(robust, Request(("star",)), method="uce", robust=True, progress=False)
    assert result.stats["rece_rounds"] == 3 and result.stats["columns_erased"] > 3 * 16
    assert pipeline_state(plain).keys() == pipeline_state(robust).keys()
    assert any(not (pipeline_state(plain)[k] == v).all() for k, v in pipeline_state(robust).items())


def test_uce_mined_mode_records_what_the_user_set_and_keeps_its_one_token_prompts(shapes_base, tmp_path):
    """UCE's mined variant mines one-token prompts without changing the settings the ledger
    records, and hands the pool to the lineage."""
    settings = {**TINY_ROBUST, "tokens": 2}
    erase(load_pipeline(shapes_base), Request(("star",)), method="uce", options={"robust_mode": "mined",
          "rece_rounds": 2}, robust=settings, out=tmp_path / "u", progress=False)
    recorded = Ledger.load(tmp_path / "u").entries[0].settings["robust"]
    assert recorded["tokens"] == 2 and recorded["vary_tokens"] is False
    pool = load_file(tmp_path / "u" / PROMPTS_FILE)
    assert sorted(pool) == ["star.0", "star.1"] and all(v.shape[0] == 1 for v in pool.values())


@pytest.mark.parametrize("args, message", [
    (["--robust", "--robust-set", "tokens=9"], "tokens=9 must be >= 1 and <= 4"),
    (["--robust", "--robust-set", "share=0"], "share=0.0 must be > 0 and <= 1"),
    (["--robust", "--robust-set", "t_low=800", "--robust-set", "t_high=700"], "t_low must be below t_high"),
    (["--robust", "--robust-set", "harden_reference=none"], "harden_reference='none' must be one of: empty, anchor"),
    (["--robust", "--robust-set", "harden_reference_style=x"], "harden_reference_style='x' must be one of"),
    (["--robust", "--robust-set", "harden_style_factor=0"], "harden_style_factor=0.0 must be > 0"),
    (["--robust", "--robust-set", "harden_group_object=unet"], "harden_group_object='unet' must be one of"),
    (["--robust", "--robust-set", "harden_keep_prompts=0"], "harden_keep_prompts=0 must be >= 1"),
    (["--robust", "--robust-set", "object_stage=both"], "object_stage='both' must be one of: harden, body"),
    (["--robust", "--refresh", "--method", "uce"], "closed-form"),
])
def test_bad_robust_settings_are_one_line_exit_2(shapes_base, tmp_path, capsys, args, message):
    code = main(["erase", "--model", str(shapes_base), "--concept", "star", "--out", str(tmp_path / "o"),
                 "--steps", "2", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "o").exists()


def test_the_ladder_reports_every_rung_and_the_worst(shapes_pipe, shapes_judge, monkeypatch):
    ladder = (Rung(1, (2, 4), "neutral"), Rung(2, (3,), "random"))
    monkeypatch.setitem(softprompt.LADDERS, "quick", ladder)
    result = softprompt_ladder(copy.deepcopy(shapes_pipe), shapes_judge, "star", "quick", n_eval=4)
    assert [(r["tokens"], r["steps"], r["init"]) for r in result["rungs"]] == \
        [(1, 2, "neutral"), (1, 4, "neutral"), (2, 3, "random")]
    assert result["worst"]["accuracy"] == max(r["accuracy"] for r in result["rungs"])
    assert all(0 <= r["accuracy"] <= 1 and r["n"] == 4 for r in result["rungs"])
    full = softprompt.LADDERS["full"]
    assert {(r.tokens, r.init, r.data) for r in full} == {
        (t, i, d) for t in (1, 2, 4) for i in ("concept", "neutral", "random") for d in ("rendered", "original")}
    assert all(r.steps == (300, 1000) for r in full)


def test_hard_prompt_is_real_words_and_the_upper_bound_runs(shapes_pipe, shapes_judge):
    pipe = copy.deepcopy(shapes_pipe)
    hard = hardprompt_attack(pipe, shapes_judge, "star", iterations=2, candidates=4, n_eval=4)
    words = hard["prefix"].split()
    assert len(words) == 3 and all(w in vocab.all_words() for w in words)
    assert not set(words) & set(vocab.concept("star").words)
    bound = conditioning_attack(pipe, shapes_judge, "star", steps=3, n_eval=4)
    assert 0 <= bound["accuracy"] <= 1 and bound["delta_norm_ratio"] > 0


def test_sanity_rung_recovers_star_on_the_shipped_model_and_after_uce(shapes_pipe, shapes_judge, tmp_path,
                                                                      monkeypatch):
    """No defence may be graded by a weak attack: from a neutral word, 300 steps of the
    ladder's 2-token rung bring star back on the unedited model and on plain UCE's."""
    monkeypatch.setenv("OBLIVIATE_CACHE", str(tmp_path / "cache"))
    rung = SoftPromptAttack(tokens=2, steps=300, init="neutral")
    unedited = rung.run(copy.deepcopy(shapes_pipe), shapes_judge, "star")
    assert unedited["accuracy"] >= 0.9, unedited
    pipe = copy.deepcopy(shapes_pipe)
    erase(pipe, Request(("star",)), method="uce", progress=False)
    after_uce = rung.run(pipe, shapes_judge, "star")
    assert after_uce["accuracy"] >= 0.75, after_uce
    json.dumps([unedited, after_uce])
