"""Taking an erasure anywhere: LoRA export loaded by plain diffusers, kohya naming, model
cards in every output folder, and help text for every option."""

from __future__ import annotations

import argparse
import re

import pytest
import torch

from obliviate.cli import build_parser, main
from obliviate.erase import erase
from obliviate.ledger import Ledger
from obliviate.pipeline import load_pipeline, shipped_model_path
from obliviate.request import Request
from sd_tiny import save_tiny_sd


@pytest.fixture(scope="module")
def lineage(tmp_path_factory):
    """A tiny shapes-world base; ESD-u (UNet convs, linears, norms) then fewshot-te (text
    encoder MLPs), one step each: every kind of change a LoRA must carry or report."""
    root = tmp_path_factory.mktemp("lineage")
    mp = pytest.MonkeyPatch()
    mp.setenv("OBLIVIATE_CACHE", str(root / "cache"))
    base = save_tiny_sd(root / "base", world="shapes")
    pipe = load_pipeline(base)
    erase(pipe, Request(("star",)), method="esd", options={"variant": "u"}, out=root / "1",
          steps=1, batch_size=2, progress=False)
    erase(pipe, Request(("red",)), method="fewshot-te", out=root / "2", steps=1, batch_size=2,
          progress=False, save="delta")
    yield root
    mp.undo()


def test_lora_loaded_by_plain_diffusers_reproduces_the_edit_at_full_rank(lineage, capsys):
    from diffusers import StableDiffusionPipeline

    assert main(["export", str(lineage / "2"), "--format", "lora", "--rank", "100000",
                 "--out", str(lineage / "lora")]) == 0
    assert "keeps" in capsys.readouterr().out
    report = (lineage / "lora" / "lora_report.json").read_text()
    left_out = set(__import__("json").loads(report)["left_out"])
    assert left_out and all(n.endswith(".bias") or "norm" in n for n in left_out), sorted(left_out)[:3]
    base = StableDiffusionPipeline.from_pretrained(lineage / "base")
    plain = StableDiffusionPipeline.from_pretrained(lineage / "base")
    plain.load_lora_weights(str(lineage / "lora"))
    plain.fuse_lora(components=["unet", "text_encoder"])
    plain.unload_lora_weights()
    edited = load_pipeline(lineage / "2")
    checked = 0
    for component in ("unet", "text_encoder"):
        got, want, was = (getattr(p, component).state_dict() for p in (plain, edited, base))
        for name, value in want.items():
            if f"{component}.{name}" in left_out:
                assert torch.equal(got[name], was[name])
            else:
                assert torch.allclose(got[name], value, atol=1e-5), name
                checked += not torch.equal(value, was[name])
    assert checked > 20  # convs and linears of the UNet and the text encoder's MLPs


def test_a_method_trained_through_lora_exports_exactly_at_its_rank(lineage, capsys):
    """ESD with lora_rank=2: the output is plain weights (no adapter left), only weights of
    Linear/Conv2d layers moved, each by a change of rank <= 2, and a rank-2 LoRA export
    loaded by plain diffusers gives those weights back."""
    from diffusers import StableDiffusionPipeline

    base = load_pipeline(lineage / "base")
    erase(base, Request(("star",)), method="esd", options={"variant": "u", "lora_rank": 2}, out=lineage / "l1",
          steps=2, batch_size=2, lr=1e-2, progress=False)
    assert not any("lora" in n for n in base.unet.state_dict())
    edited, was = load_pipeline(lineage / "l1").unet.state_dict(), load_pipeline(lineage / "base").unet.state_dict()
    moved = [n for n in edited if not torch.equal(edited[n], was[n])]
    assert len(moved) > 10 and all(n.endswith(".weight") and "norm" not in n for n in moved), moved[:5]
    for n in moved:
        change = (edited[n] - was[n]).flatten(1)
        assert torch.linalg.matrix_rank(change, rtol=1e-4) <= 2, n
    assert main(["export", str(lineage / "l1"), "--format", "lora", "--rank", "2", "--out", str(lineage / "l1-lora")]) == 0
    plain = StableDiffusionPipeline.from_pretrained(lineage / "base")
    plain.load_lora_weights(str(lineage / "l1-lora"))
    plain.fuse_lora(components=["unet"])
    plain.unload_lora_weights()
    got = plain.unet.state_dict()
    assert all(torch.allclose(got[n], edited[n], atol=1e-5) for n in edited)


def test_kohya_file_has_the_a1111_key_names_and_low_rank(lineage):
    from safetensors import safe_open

    out = lineage / "erase.safetensors"
    assert main(["export", str(lineage / "2"), "--format", "kohya", "--rank", "2", "--out", str(out)]) == 0
    with safe_open(out, "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
        ups = [f.get_tensor(k) for k in keys if k.endswith(".lora_up.weight")]
    assert keys and all(re.fullmatch(r"lora_(unet|te)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)", k)
                        for k in keys)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_mlp_fc1.") for k in keys)
    assert any(k.startswith("lora_unet_down_blocks_0_resnets_0_conv1.") for k in keys)
    assert all(u.shape[1] <= 2 for u in ups)
    assert meta["ss_base_model"] and meta["obliviate_removed"] == "star,red"


def test_export_refuses_bad_input_in_one_line_and_writes_nothing(lineage, capsys):
    for args, message in [(["--format", "onnx"], "--format must be"),
                          (["--format", "lora", "--rank", "0"], "--rank must be"),
                          (["--format", "lora", "--energy", "1.5"], "--energy must be"),
                          (["--format", "kohya"], "must end in .safetensors"),
                          (["--format", "lora", "--dtype", "int8"], "--dtype must be"),
                          (["--rank", "4"], "apply to --format lora")]:
        assert main(["export", str(lineage / "2"), "--out", str(lineage / "bad"), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("obliviate: error:") and message in err and "\n" not in err
        assert not (lineage / "bad").exists()


def test_every_output_folder_has_a_model_card(lineage, tmp_path):
    from obliviate.model_card import evaluation_text, update_evaluation

    assert main(["rollback", str(lineage / "2"), "--to", "1", "--out", str(tmp_path / "rb")]) == 0
    assert main(["export", str(lineage / "2"), "--out", str(tmp_path / "full")]) == 0
    for folder in (lineage / "1", lineage / "2", lineage / "lora", tmp_path / "rb", tmp_path / "full"):
        card = (folder / "README.md").read_text()
        head = card.split("---")[1]
        assert "library_name: diffusers" in head and "base_model:" in head and "tags:" in head, folder
        ledger = Ledger.load(lineage / "2")
        assert ledger.base_sha256 in card and "| star |" in card and "esd" in card, folder
    assert "| red |" in (lineage / "2" / "README.md").read_text()
    assert Ledger.load(tmp_path / "rb").head_sha256 in (tmp_path / "rb" / "README.md").read_text()
    per = {c: {"kind": "object", "accuracy": a, "n": 4} for c, a in (("star", 0.25), ("circle", 1.0))}
    text = evaluation_text({"accuracy": {"object": 0.6}, "per_concept": per, "images": 8, "fid": 3.0},
                           ["star"], "obliviate eval --model X")
    assert update_evaluation(tmp_path / "rb", text)
    from types import SimpleNamespace

    from obliviate.cli import _update_card

    result = {"accuracy": {"object": 0.5}, "per_concept": {**per, "red": {"kind": "colour", "accuracy": 0.5, "n": 4}},
              "images": 8, "fid": 2.0}
    args = argparse.Namespace(model=str(lineage / "2"), judge=None, images_per_combo=1, seed=0)
    _update_card(SimpleNamespace(obliviate_source=str(lineage / "2")), result, args)
    assert "UA of red (1 − accuracy) | 0.500" in (lineage / "2" / "README.md").read_text()
    # the package's own models are never written into: their cards keep the documented figures
    shipped = shipped_model_path("shapes-sd3") / "README.md"
    before = shipped.read_bytes()
    _update_card(SimpleNamespace(obliviate_source=str(shipped.parent)), result, args)
    assert shipped.read_bytes() == before
    card = (tmp_path / "rb" / "README.md").read_text()
    assert "UA of star (1 − accuracy) | 0.750" in card and "never-removed concepts, mean accuracy | 1.000" in card
    assert card.count("## Requests") == 1


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_option_of_every_subcommand_has_help_and_an_example():
    parser = build_parser()
    subs = _subparsers(parser)
    assert set(subs) >= {"erase", "eval", "export", "generate", "bench", "rollback", "ledger"}
    missing = [f"{name} {'/'.join(a.option_strings) or a.dest}" for name, sub in subs.items()
               for a in sub._actions if not isinstance(a, argparse._HelpAction) and not (a.help or "").strip()]
    assert not missing, missing
    for name, sub in subs.items():
        assert f"obliviate {name}" in (sub.epilog or ""), name
    top = parser.format_help()
    assert "duge" in top and "fewshot-te" in top and "striped" in top
    assert "duge, esd" in subs["erase"].format_help().replace("\n", " ") or "doco, duge" in subs["erase"].format_help()
