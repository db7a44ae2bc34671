"""Model families beyond SD 1.x: every method runs one request on tiny random SDXL and SD3
pipelines built here, touches only its own parameters, and the output reloads in plain
diffusers."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from obliviate import ObliviateError, load_pipeline
from obliviate.engine.attention import capture_cross_attention, cross_attention_names
from obliviate.engine.context import EraseContext
from obliviate.erase import erase
from obliviate.families import family_of
from obliviate.ledger import pipeline_state, weights_sha256
from obliviate.request import Request
from sd_tiny import save_tiny

FAST = dict(steps=2, batch_size=2, progress=False)
KV = lambda k: k.startswith("unet.") and (".attn2.to_k." in k or ".attn2.to_v." in k)  # noqa: E731
# SD3: the text block of joint attention
POOLED = "transformer.time_text_embed.text_embedder."  # reads the pooled prompt embedding
JOINT_KV = lambda k: k.startswith("transformer.") and (".attn.add_k_proj." in k or ".attn.add_v_proj." in k)  # noqa: E731
JOINT_TEXT = lambda k: k.startswith("transformer.") and (".attn.add_" in k or ".attn.to_add_out." in k  # noqa: E731
                                                         or k.startswith(POOLED))
TEXT_MLP = lambda k: k.startswith("text_encoder") and (".mlp.fc" in k or ".DenseReluDense.w" in k)  # noqa: E731
UNET = {"duge": KV, "uce": KV, "doco": KV, "esd-object": lambda k: k.startswith("unet.") and ".attn2." not in k,
        "esd-style": lambda k: k.startswith("unet.") and ".attn2." in k, "rgd": lambda k: k.startswith("unet.")}
TRANSFORMER = {"duge": lambda k: JOINT_KV(k) or k == POOLED + "linear_1.weight", "doco": JOINT_KV,
               "uce": lambda k: k.startswith("transformer.context_embedder.") or k == POOLED + "linear_1.weight",
               "esd-object": lambda k: k.startswith("transformer.") and not JOINT_TEXT(k), "esd-style": JOINT_TEXT,
               "rgd": lambda k: k.startswith("transformer.")}
# (method, concept, options, which of the family's rules); fewshot-te trains every text encoder's MLPs
CASES = [("duge", "star", {}, "duge"), ("uce", "star", {}, "uce"), ("esd", "star", {}, "esd-object"),
         ("esd", "striped", {}, "esd-style"), ("doco", "star", {"disc_warmup": 2}, "doco"),
         ("rgd", "star", {"pairs_per_target": 4}, "rgd"), ("fewshot-te", "star", {}, "fewshot-te")]
RULES = {"sdxl": UNET, "sd3": TRANSFORMER, "flux": TRANSFORMER}


def tiny_base(tmp_path, monkeypatch, family: str):
    """A tiny random pipeline of `family` in the shapes world, with its own latent cache."""
    monkeypatch.setenv("OBLIVIATE_CACHE", str(tmp_path / "cache"))
    return save_tiny(tmp_path / f"{family}-base", family, world="shapes")


@pytest.fixture()
def sdxl_base(tmp_path, monkeypatch):
    return tiny_base(tmp_path, monkeypatch, "sdxl")


def test_an_sdxl_folder_loads_as_sdxl_and_its_conditioning_has_both_encoders(sdxl_base):
    pipe = load_pipeline(sdxl_base)
    family = family_of(pipe)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline" and family.name == "sdxl"
    cond = family.encode(pipe, ["a red star", "a blue circle"], lambda n: getattr(pipe, n))
    width = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert cond.states.shape == (2, 77, width) == (2, 77, pipe.unet.config.cross_attention_dim)
    assert cond.extra["text_embeds"].shape == (2, pipe.text_encoder_2.config.projection_dim)
    # the attention capture sees every cross-attention layer of the XL UNet, text-wide keys
    x = torch.randn(2, 4, 8, 8)
    with capture_cross_attention(pipe.unet) as seen:
        family.predict(pipe.unet, x, torch.tensor([500, 500]), cond)
    assert set(seen) == set(cross_attention_names(pipe.unet)) and len(seen) >= 3
    assert all(r["probs"].shape[-1] == 77 for r in seen.values())


def test_an_sdxl_lineage_saves_deltas_and_continues(sdxl_base, tmp_path):
    first = erase(load_pipeline(sdxl_base), Request(("star",)), method="uce", out=tmp_path / "1", **FAST)
    second = erase(load_pipeline(tmp_path / "1"), Request(("circle",)), method="duge", out=tmp_path / "2",
                   save="delta", **FAST)
    assert second.entry.parent_sha256 == first.entry.weights_sha256
    assert (tmp_path / "2" / "delta.safetensors").exists()
    reloaded = load_pipeline(tmp_path / "2")
    assert type(reloaded).__name__ == "StableDiffusionXLPipeline"
    assert weights_sha256(reloaded) == second.entry.weights_sha256
    assert [e.method for e in second.ledger.entries] == ["uce", "duge"]


def test_an_unsupported_pipeline_class_is_refused_in_one_line(tmp_path):
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "KandinskyPipeline"}')
    with pytest.raises(ObliviateError, match="not a model family obliviate supports"):
        load_pipeline(folder)


def test_the_cli_erases_an_sdxl_folder_and_refuses_what_sdxl_lacks(sdxl_base, tmp_path, capsys):
    from obliviate.cli import main

    out = tmp_path / "cli"
    assert main(["erase", "--model", str(sdxl_base), "--concept", "star", "--out", str(out),
                 "--steps", "2", "--batch-size", "2"]) == 0
    assert (out / "ledger.json").exists() and (out / "unet").is_dir() and (out / "text_encoder_2").is_dir()
    for args in (["erase", "--model", str(sdxl_base), "--concept", "star", "--out", str(tmp_path / "r"), "--robust",
                  "--method", "esd"],
                 ["eval", "--model", str(out), "--attacks", "softprompt"]):
        capsys.readouterr()
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "not" in err and "yet" in err and "sdxl" in err, err
    assert not (tmp_path / "r").exists()


@pytest.fixture()
def sd3_base(tmp_path, monkeypatch):
    return tiny_base(tmp_path, monkeypatch, "sd3")


def test_an_sd3_folder_loads_and_conditions_as_the_diffusers_pipeline_does(sd3_base):
    pipe = load_pipeline(sd3_base)
    family = family_of(pipe)
    assert type(pipe).__name__ == "StableDiffusion3Pipeline" and family.name == "sd3"
    cond = family.encode(pipe, ["a red star", "a blue circle"], lambda n: getattr(pipe, n))
    states, _, pooled, _ = pipe.encode_prompt(["a red star", "a blue circle"], None, None,
                                             do_classifier_free_guidance=False)
    assert torch.allclose(cond.states, states) and torch.allclose(cond.extra["pooled_projections"], pooled)
    x = torch.randn(2, 4, 8, 8)
    plain = family.predict(pipe.transformer, x, torch.tensor([100, 700]), cond)
    with capture_cross_attention(pipe.transformer) as seen:
        recorded = family.predict(pipe.transformer, x, torch.tensor([100, 700]), cond)
    # the recorder computes joint attention as diffusers does, and sees the text block
    assert torch.allclose(plain, recorded, atol=1e-5)
    assert set(seen) == set(cross_attention_names(pipe.transformer)) == {
        f"transformer_blocks.{i}.attn.processor" for i in range(len(pipe.transformer.transformer_blocks))}
    assert all(r["probs"].shape[-1] == states.shape[1] for r in seen.values())




@pytest.fixture()
def flux_base(tmp_path, monkeypatch):
    return tiny_base(tmp_path, monkeypatch, "flux")


def test_a_flux_folder_loads_and_its_double_block_attention_is_recorded_faithfully(flux_base):
    pipe = load_pipeline(flux_base)
    family = family_of(pipe)
    assert type(pipe).__name__ == "FluxPipeline" and family.name == "flux"
    cond = family.encode(pipe, ["a red star", "a blue circle"], lambda n: getattr(pipe, n))
    states, pooled, _ = pipe.encode_prompt(["a red star", "a blue circle"], None, max_sequence_length=77)
    assert torch.allclose(cond.states, states) and torch.allclose(cond.extra["pooled_projections"], pooled)
    x = torch.randn(2, 64, 4)  # 16 px, VAE scale 1, packed 2x2: 8 x 8 patches of 4 channels
    plain = family.predict(pipe.transformer, x, torch.tensor([100, 700]), cond)
    with capture_cross_attention(pipe.transformer) as seen:
        recorded = family.predict(pipe.transformer, x, torch.tensor([100, 700]), cond)
    assert torch.allclose(plain, recorded, atol=1e-5)
    assert list(seen) == ["transformer_blocks.0.attn.processor"]
    assert seen["transformer_blocks.0.attn.processor"]["probs"].shape == (2 * 2, 64, 77)


def test_gradient_checkpointing_and_half_precision_weights(tmp_path, monkeypatch, capsys):
    """Memory options: recomputing activations gives the same weights; bf16 weights train
    through float32 master copies of the trained tensors and are saved in bf16; float16 on
    a CPU is refused in one line."""
    from obliviate.cli import main

    base = tiny_base(tmp_path, monkeypatch, "sd")
    plain, recomputed = load_pipeline(base), load_pipeline(base)
    erase(plain, Request(("star",)), **FAST)
    erase(recomputed, Request(("star",)), gradient_checkpointing=True, **FAST)
    assert weights_sha256(plain) == weights_sha256(recomputed)
    assert "Recorder" not in type(next(iter(recomputed.unet.attn_processors.values()))).__name__
    half = load_pipeline(base, dtype=torch.bfloat16)
    before = {k: v.clone() for k, v in pipeline_state(half).items()}
    erase(half, Request(("star",)), **FAST)
    after = pipeline_state(half)
    assert all(v.dtype == torch.bfloat16 for v in after.values())
    assert any(not torch.equal(v, before[k]) for k, v in after.items() if ".attn2.to_k." in k)
    capsys.readouterr()
    assert main(["erase", "--model", str(base), "--concept", "star", "--out", str(tmp_path / "f16"),
                 "--dtype", "float16"]) == 2
    assert "needs a GPU" in capsys.readouterr().err and not (tmp_path / "f16").exists()


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
@pytest.mark.parametrize("method, concept, options, rule", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_every_method_runs_on_every_family_and_the_output_loads_in_diffusers(tmp_path, monkeypatch, family, method,
                                                                              concept, options, rule):
    import diffusers

    from obliviate.pipeline import absent_components

    base = tiny_base(tmp_path, monkeypatch, family)
    pipe = load_pipeline(base)
    allowed = TEXT_MLP if rule == "fewshot-te" else RULES[family][rule]
    before = {k: v.clone() for k, v in pipeline_state(pipe).items()}
    result = erase(pipe, Request((concept,)), method=method, options=options, out=tmp_path / "out", **FAST)
    changed = {k for k, v in pipeline_state(pipe).items() if not torch.equal(v, before[k])}
    assert changed and all(allowed(k) for k in changed), sorted(changed)[:3]
    if family != "sdxl" and method in ("duge", "uce"):  # the pooled embedding's read is edited too
        assert POOLED + "linear_1.weight" in changed
    if method == "fewshot-te":  # every text encoder the family conditions on
        assert {k.split(".")[0] for k in changed} == {"text_encoder", "text_encoder_2"}
    out = tmp_path / "out"
    again = getattr(diffusers, type(pipe).__name__).from_pretrained(out, local_files_only=True, **absent_components(out))
    assert weights_sha256(again) == result.entry.weights_sha256 == weights_sha256(load_pipeline(out))


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_duge_robust_hardens_the_body_on_every_family(tmp_path, monkeypatch, family):
    """--robust on DUGE learns no soft prompt (an object's body edited in closed form, or an
    ESD-u stage where the denoiser has no convolutions to map, then DUGE), so it runs on every
    family: the denoiser's body moves as well as the text keys and values, nothing else; the
    same for UCE's closed-form robust rounds on what reads the text."""
    pipe = load_pipeline(tiny_base(tmp_path, monkeypatch, family))
    before = {k: v.clone() for k, v in pipeline_state(pipe).items()}
    # the paired-image term too
    robust = {"harden_steps": 2, "harden_image": 1.0, "harden_image_pairs": 4, "harden_keep_prompts": 4}
    result = erase(pipe, Request(("star",)), out=tmp_path / "out", robust=robust, **FAST)
    changed = {k for k, v in pipeline_state(pipe).items() if not torch.equal(v, before[k])}
    kv = RULES[family]["duge"]
    body = RULES[family]["esd-object"]
    assert any(kv(k) for k in changed) and any(body(k) and not kv(k) for k in changed)
    assert all(kv(k) or body(k) for k in changed), sorted(changed)[:3]
    denoiser = getattr(pipe, family_of(pipe).denoiser)
    convs = {f"unet.{n}.weight" for n in family_of(pipe).body_convolutions(denoiser)}
    if convs:  # a UNet: the object's body edit, no hardening stage
        assert {k for k in changed if not kv(k)} == convs and "harden_seconds" not in result.stats
    else:  # a transformer: the hardening stage instead
        assert result.stats["harden_seconds"] > 0 and "body_layers" not in result.stats
    # a style is hardened, then its coarse levels held in closed form where a UNet has them
    styled = erase(load_pipeline(tmp_path / "out"), Request(("striped",)),
                   robust={**robust, "harden_steps": 1, "hold_pairs": 2, "hold_memory": 2}, **FAST)
    assert styled.stats["harden_seconds"] > 0 and styled.stats.get("hold_layers", 0) == len(convs)
    # the replay of earlier targets mines soft prompts: refused on this family, in one line
    with pytest.raises(ObliviateError, match="Stable Diffusion 1.x/2.x") as refused:
        erase(load_pipeline(tmp_path / "out"), Request(("square",)), robust={**robust, "harden_replay": 4}, **FAST)
    assert "\n" not in str(refused.value)
    # UCE's closed-form robust rounds need no soft prompt either; its body edit maps the
    # coarse levels' convolutions of a UNet, and a transformer has none to map
    before = {k: v.clone() for k, v in pipeline_state(pipe).items()}
    result = erase(pipe, Request(("square",)), method="uce", out=tmp_path / "uce", robust=True, progress=False)
    changed = {k for k, v in pipeline_state(pipe).items() if not torch.equal(v, before[k])}
    assert changed and all(RULES[family]["uce"](k) or k in convs for k in changed)
    assert result.stats["rece_rounds"] == 3 and result.stats["body_layers"] == len(convs)
    assert convs <= changed and bool(convs) == (family == "sdxl")


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
def test_one_denoiser_call_for_several_sub_batches_predicts_what_separate_calls_predict(tmp_path, monkeypatch,
                                                                                      family):
    """`eps_joint` (the hardening stage's θ and φ passes) stacks sub-batches, with every
    family's extra conditioning, into one call: each part must get the prediction a call of
    its own gives, from prompts (encoded together) or from a conditioning (the empty prompt's,
    expanded)."""
    pipe = load_pipeline(tiny_base(tmp_path, monkeypatch, family))
    ctx = EraseContext(pipe=pipe, world=None, request=None, history=[], accelerator=Accelerator(cpu=True),
                       model_sha="", base_sha="", cache=None)
    fam, side = ctx.family, ctx.family.native_size(pipe)
    torch.manual_seed(0)
    latents = lambda n: fam.pack(pipe, torch.randn(n, fam.latent_channels(pipe), side, side))  # noqa: E731
    parts = [(latents(1), torch.tensor([50]), ["a red star"]),
             (latents(3), torch.tensor([10, 400, 900]), ["a blue circle", "a star", ""]),
             (latents(2), torch.tensor([700, 999]), ctx.encode([""]).expand(2))]
    with torch.no_grad():
        joint = ctx.eps_joint(parts)
        alone = [ctx.eps(x, t, ctx.encode(c) if isinstance(c, list) else c) for x, t, c in parts]
    assert [p.shape for p in joint] == [p.shape for p in alone]
    assert all(torch.allclose(j, a, atol=1e-5) for j, a in zip(joint, alone))


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_freezeasguard_and_finetuning_run_on_every_family(tmp_path, monkeypatch, family):
    """FreezeAsGuard's mask is learned over the family's denoiser through its own training
    loss (ε, or the flow velocity), and `obliviate finetune` (the relearning attack, and the
    resurgence probe) honours it: frozen tensors keep their values, the others move."""
    from obliviate.cli import main
    from obliviate.methods.freeze_guard import GuardMask

    base = tiny_base(tmp_path, monkeypatch, family)
    denoiser = family_of(load_pipeline(base)).denoiser
    assert main(["guard", "--model", str(base), "--concept", "star", "--legal", "circle", "--rho", "0.5",
                 "--rounds", "1", "--images", "4", "--out", str(tmp_path / "g")]) == 0
    mask = GuardMask.load(tmp_path / "g")
    names = set(getattr(load_pipeline(base), denoiser).state_dict())
    assert mask.frozen and set(mask.frozen) <= names and 0.5 <= mask.frozen_fraction < 1
    assert main(["finetune", "--model", str(tmp_path / "g"), "--concepts", "star", "--images", "4",
                 "--steps", "2", "--batch-size", "2", "--out", str(tmp_path / "f")]) == 0
    before = getattr(load_pipeline(tmp_path / "g"), denoiser).state_dict()
    after = getattr(load_pipeline(tmp_path / "f"), denoiser).state_dict()
    assert all(torch.equal(before[n], after[n]) for n in mask.frozen)
    assert any(not torch.equal(before[n], after[n]) for n in before if n not in mask.frozen)


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_a_lora_export_of_every_family_loads_in_its_diffusers_pipeline(tmp_path, monkeypatch, family):
    """ESD-u (the denoiser's body) then fewshot-te (the text encoders' MLPs), exported at full
    rank as diffusers' LoRA file: the family's own pipeline loads and fuses it into the base
    and gets the edited weights back, except what the report says no LoRA carries (biases,
    norms, a T5 encoder); kohya naming is refused in one line; rollback restores step 1."""
    import json

    import diffusers

    from obliviate.cli import main
    from obliviate.pipeline import absent_components

    base = tiny_base(tmp_path, monkeypatch, family)
    pipe = load_pipeline(base)
    erase(pipe, Request(("star",)), method="esd", options={"variant": "u"}, out=tmp_path / "1", **FAST)
    erase(pipe, Request(("red",)), method="fewshot-te", out=tmp_path / "2", save="delta", **FAST)
    assert main(["export", str(tmp_path / "2"), "--format", "lora", "--rank", "100000",
                 "--out", str(tmp_path / "lora")]) == 0
    left_out = set(json.loads((tmp_path / "lora" / "lora_report.json").read_text())["left_out"])
    cls = getattr(diffusers, type(pipe).__name__)
    was, plain = (cls.from_pretrained(base, local_files_only=True, **absent_components(base)) for _ in range(2))
    plain.load_lora_weights(str(tmp_path / "lora"))
    carried = [c for c in family_of(pipe).components(pipe) if c != "vae" and not any(
        n.startswith(f"{c}.") for n in left_out if "norm" not in n and not n.endswith(".bias"))]
    plain.fuse_lora(components=carried)
    plain.unload_lora_weights()
    edited, checked = load_pipeline(tmp_path / "2"), 0
    for component in family_of(pipe).components(pipe):
        got, want, before = (getattr(p, component).state_dict() for p in (plain, edited, was))
        for name, value in want.items():
            if f"{component}.{name}" in left_out:
                assert torch.equal(got[name], before[name]), name
            else:
                assert torch.allclose(got[name], value, atol=1e-5), f"{component}.{name}"
                checked += not torch.equal(value, before[name])
    assert checked > 10
    assert main(["export", str(tmp_path / "2"), "--format", "kohya", "--out", str(tmp_path / "k.safetensors")]) == 2
    assert not (tmp_path / "k.safetensors").exists()
    # rollback to step 1 gives step 1's weights back, as on Stable Diffusion
    assert main(["rollback", str(tmp_path / "2"), "--to", "1", "--out", str(tmp_path / "back")]) == 0
    assert weights_sha256(load_pipeline(tmp_path / "back")) == weights_sha256(load_pipeline(tmp_path / "1"))


@pytest.mark.parametrize("key, cls", [
    ("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", "StableDiffusionPipeline"),
    ("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight", "StableDiffusionXLPipeline"),
    ("model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight", "StableDiffusion3Pipeline"),
    ("double_blocks.0.img_attn.qkv.weight", "FluxPipeline")])
def test_a_single_checkpoint_file_is_read_as_its_family_from_its_tensor_names(tmp_path, key, cls):
    """A single .safetensors checkpoint (A1111/ComfyUI style) is loaded with the pipeline class
    its tensor names belong to (it then needs that family's configs in the hub cache)."""
    from safetensors.torch import save_file

    from obliviate.pipeline import pipeline_class

    save_file({key: torch.zeros(2, 2)}, tmp_path / "model.safetensors")
    assert pipeline_class(tmp_path / "model.safetensors").__name__ == cls


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_robust_esd_runs_its_hardening_where_soft_prompts_cannot_be_mined(tmp_path, monkeypatch, family, capsys):
    """--robust on a method that mines soft prompts is refused on a family without SD's text
    path, and the one line names the settings that run it anyway (the hardening stage, no
    soft prompt); with them ESD's request runs and hardens the body."""
    from obliviate.cli import main

    base = tiny_base(tmp_path, monkeypatch, family)
    args = ["erase", "--model", str(base), "--method", "esd", "--concept", "star", "--robust", "--steps", "2",
            "--batch-size", "2"]
    assert main([*args, "--out", str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--robust-set mining=false --robust-set harden_steps=100" in err
    assert not (tmp_path / "no").exists()
    assert main([*args, "--robust-set", "mining=false", "--robust-set", "harden_steps=2", "--robust-set",
                 "harden_image_pairs=4", "--out", str(tmp_path / "yes")]) == 0
    from obliviate.ledger import Ledger

    assert Ledger.load(tmp_path / "yes").entries[-1].settings["robust"]["harden_steps"] == 2
