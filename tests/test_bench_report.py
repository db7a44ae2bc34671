"""The sequential benchmark, the attacks and the HTML report, end to end on a tiny model."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from obliviate.bench import run_bench, table, to_json
from obliviate.report import write_report
from sd_tiny import SMALL_IMAGES, save_tiny_sd


@pytest.fixture(scope="module")
def bench_result(tmp_path_factory):
    from obliviate.evaluate import softprompt

    root = tmp_path_factory.mktemp("bench")
    base = save_tiny_sd(root / "base", world="shapes")
    quick = softprompt.LADDERS["quick"]
    softprompt.LADDERS["quick"] = (softprompt.Rung(2, (20, 40), "concept"), softprompt.Rung(1, (30,), "neutral"))
    try:
        return run_bench(["uce", "duge+refresh"], ["star", "striped"], model=str(base), images_per_combo=1,
                         attacks=["paraphrase", "softprompt", "resurgence"], work=root / "work",
                         options={"duge": {"steps": 2}}, grid_images=4, progress=False, seeds=(0, 1))
    finally:
        softprompt.LADDERS["quick"] = quick


def test_bench_measures_every_step_and_attack(bench_result):
    rows = bench_result["rows"]
    assert [(r["method"], r["step"]) for r in rows] == [("uce", 1), ("uce", 2), ("duge+refresh", 1),
                                                        ("duge+refresh", 2)]
    # the refresh plug-in ran and handed its Fisher estimate to the next request
    assert (Path(rows[2]["model"]) / "refresh_fisher.safetensors").exists()
    assert "refresh" in json.loads((Path(rows[3]["model"]) / "ledger.json").read_text())["entries"][-1]["settings"]
    assert set(rows[1]["ua"]) == {"star", "striped"} and set(rows[0]["ua"]) == {"star"}
    for r in rows:
        assert 0 <= r["ira"] <= 1 and 0 <= r["cra"] <= 1 and r["seconds"] > 0 and r["bytes_stored"] > 0
    attacks = bench_result["attacks"]["uce"]["star"]
    ladder = attacks["softprompt"]
    assert [r["steps"] for r in ladder["rungs"]] == [20, 40, 30]  # every rung is reported
    assert ladder["worst"]["accuracy"] == max(r["accuracy"] for r in ladder["rungs"])
    assert ladder["ua"] == pytest.approx(1 - ladder["worst"]["accuracy"])
    assert 0 <= attacks["paraphrase"]["ua"] <= 1
    assert "accuracy_after" in attacks["resurgence"]
    # by default each target is attacked on the model right after the request that removed it
    assert attacks["after_request"] == 1 and bench_result["attacks"]["uce"]["striped"]["after_request"] == 2
    text = table(bench_result)
    assert "soft-prompt worst-case recovery" in text and "duge" in text
    assert json.loads(to_json(bench_result))["rows"][0]["method"] == "uce"


def test_bench_repeats_over_seeds_and_shows_each_never_removed_concept(bench_result):
    from obliviate.bench import erosion, never_removed

    runs = bench_result["runs"]
    assert sorted(runs) == [0, 1] and bench_result["rows"] == runs[0]
    assert [(r["method"], r["step"]) for r in runs[1]] == [(r["method"], r["step"]) for r in runs[0]]
    assert "seed1" in runs[1][0]["model"] and "seed0" in runs[0][0]["model"]
    kept = never_removed(bench_result)
    assert "star" not in kept and "striped" not in kept and {"cross", "dotted", "red"} <= set(kept)
    summary = {e["method"]: e for e in erosion(bench_result)}
    assert set(summary) == {"uce", "duge+refresh"}
    for e in summary.values():
        assert [p["seed"] for p in e["seeds"]] == [0, 1]
        assert e["worst"]["kept_lowest"] == min(p["kept_lowest"] for p in e["seeds"])
        ratios = e["seeds"][0]["ratios"]
        assert set(ratios) == set(kept) and all(len(v) == 2 for v in ratios.values())
        base = bench_result["base"]["per_concept"]
        row = [r for r in runs[0] if r["method"] == e["method"]][-1]
        assert ratios["cross"][-1] == pytest.approx(row["per_concept"]["cross"] / base["cross"]["accuracy"])
    text = table(bench_result)
    assert "never-removed accuracy / the base model's" in text and "worst" in text and "mean" in text
    assert table(json.loads(to_json(bench_result))) == text  # a saved result prints the same


def test_bench_presets_and_bad_sequences():
    from obliviate.bench import SEQUENCES, check_seeds, resolve_sequence
    from obliviate.errors import ObliviateError
    from obliviate.shapes import vocab

    neighbours = resolve_sequence("neighbours")
    for target in neighbours:  # each target is the declared relative of a concept that stays
        assert any(target in vocab.CONCEPTS[c].related for c in vocab.CONCEPTS if c not in neighbours), target
    long = resolve_sequence("long")
    assert len(long) == 12 and {vocab.CONCEPTS[c].kind for c in long} == {"object", "colour", "style"}
    assert resolve_sequence("star, red") == ["star", "red"] and resolve_sequence("friendly") == list(SEQUENCES["friendly"])
    for bad in ("", "star,star", "neighbors", "star,unicorn"):
        with pytest.raises(ObliviateError):
            resolve_sequence(bad)
    for bad in ([], [0, 0], [-1], ["x"]):
        with pytest.raises(ObliviateError):
            check_seeds(bad)


def test_bench_cli_refuses_a_bad_sequence_or_seed_before_any_work(tmp_path, capsys):
    from obliviate.cli import main

    for extra in (["--sequence", "neighbors"], ["--seeds", "0,x"], ["--seeds", "1,1"],
                  ["--robust-set", "harden_replay=2"], ["--methods", "duge+robust", "--robust-set", "harden_replay=x"]):
        assert main(["bench", "--methods", "uce", "--work", str(tmp_path / "w"), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and any(w in err for w in ("--sequence", "--seeds", "--robust")), err
    assert not (tmp_path / "w").exists()


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    try:
        subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], check=True, capture_output=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as exc:
        try:
            subprocess.run(["apt-get", "update", "-q"], check=True, capture_output=True, timeout=300)
            subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], check=True, capture_output=True, timeout=600)
        except (OSError, subprocess.SubprocessError):
            pytest.skip(f"chromium is not installed and could not be installed here ({exc})")
    found = shutil.which("chromium")
    if not found:
        pytest.skip("chromium could not be installed here")
    return found


def test_report_renders_in_headless_chromium(bench_result, tmp_path):
    index = write_report(bench_result, tmp_path / "report", command="obliviate bench ...")
    folder = index.parent
    assert (folder / "ua.png").exists() and (folder / "retained.png").exists()
    assert (folder / "erosion-uce.png").exists() and (folder / "erosion-duge-refresh.png").exists()
    assert list(folder.glob("grid-before-star.png")) and list(folder.glob("grid-duge-refresh-related-star.png"))
    browser = _chromium()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([browser, *flags, "--dump-dom", index.as_uri()], capture_output=True,
                         text=True, timeout=120).stdout
    assert dom.count("<table") >= 4, dom[:500]
    images = re.findall(r"<img[^>]+src=\"data:image/png;base64,", dom)
    assert len(images) >= 2 + 2 * 3  # two plots, and before/after grids
    shot = tmp_path / "shot.png"
    subprocess.run([browser, *flags, f"--screenshot={shot}", "--window-size=1200,2400", index.as_uri()],
                   capture_output=True, timeout=120)
    from PIL import Image

    picture = Image.open(shot).convert("L")
    assert picture.getextrema()[0] < 100  # something dark was drawn: the page is not blank


def _tiny_clip(folder):
    from transformers import CLIPConfig, CLIPModel

    from obliviate.shapes.tokenizer import build_tokenizer

    tok = build_tokenizer()
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    CLIPModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
def test_real_model_eval_with_a_clip_judge(tmp_path, capsys, family):
    """`eval --judge clip:FOLDER` scores free-text concepts on a model of any family."""
    from obliviate.cli import main
    from sd_tiny import save_tiny

    base = save_tiny(tmp_path / family, family)
    clip = _tiny_clip(tmp_path / "clip")
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(base), "--judge", f"clip:{clip}", "--concepts", "a castle,a dog",
                 "--images-per-concept", "3", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["per_concept"]) == {"a castle", "a dog"}
    assert all(0 <= v["accuracy"] <= 1 and v["n"] == 3 for v in result["per_concept"].values())
    assert main(["eval", "--model", str(base), "--judge", f"clip:{tmp_path / 'nope'}", "--concepts", "x"]) == 2
    assert "no CLIP model folder" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_bench_on_a_real_model_with_a_clip_judge(tmp_path, capsys, monkeypatch, family):
    """`bench --judge clip:FOLDER` runs a free-text sequence on a model of any family and
    reports every target's UA and what stays; what it cannot do is refused before any work."""
    from obliviate.cli import main
    from sd_tiny import save_tiny

    monkeypatch.setenv("OBLIVIATE_CACHE", str(tmp_path / "cache"))
    base = save_tiny(tmp_path / family, family)
    judge = f"clip:{_tiny_clip(tmp_path / 'clip')}"
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", str(base), "--methods", "uce", "--sequence", "a castle,a dog",
                 "--judge", judge, "--concepts", "a tree", "--images-per-concept", "2",
                 "--json", str(out), "--work", str(tmp_path / "w")]) == 0
    result = json.loads(out.read_text())
    assert [r["removed"] for r in result["rows"]] == ["a castle", "a dog"]
    assert set(result["rows"][-1]["ua"]) == {"a castle", "a dog"}
    assert set(result["base"]["per_concept"]) == {"a castle", "a dog", "a tree"}
    assert 0 <= result["rows"][-1]["per_concept"]["a tree"] <= 1
    for extra, says in ((["--concepts", "a castle"], "must stay"), ([], "must stay"),
                        (["--concepts", "a tree", "--attacks", "softprompt"], "drop --attacks"),
                        (["--concepts", "a tree", "--images-per-concept", "0"], "at least 1")):
        capsys.readouterr()
        assert main(["bench", "--model", str(base), "--methods", "uce", "--sequence", "a castle",
                     "--judge", judge, *extra, "--work", str(tmp_path / "no")]) == 2
        assert says in capsys.readouterr().err
    assert main(["bench", "--methods", "uce", "--concepts", "a tree", "--work", str(tmp_path / "no")]) == 2
    assert not (tmp_path / "no").exists()


def test_bench_hands_robust_settings_to_every_robust_method(tmp_path, monkeypatch):
    """`--robust-set` reaches the requests of a +robust method: the ledger records them."""
    monkeypatch.setenv("OBLIVIATE_CACHE", str(tmp_path / "cache"))
    base = save_tiny_sd(tmp_path / "base", world="shapes")
    result = run_bench(["duge+robust"], ["star"], model=str(base), images_per_combo=1, work=tmp_path / "work",
                       options={"duge": {"steps": 2}}, grid_images=2, progress=False,
                       robust_settings={"harden_steps": 2, **SMALL_IMAGES})
    entry = json.loads((Path(result["rows"][0]["model"]) / "ledger.json").read_text())["entries"][-1]
    assert entry["settings"]["robust"]["harden_steps"] == 2 and entry["settings"]["robust"]["harden_image_memory"] == 4
