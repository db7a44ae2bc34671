"""The sequential benchmark, the attacks and the HTML report, end to end on a tiny model."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from obliviate.bench import run_bench, table, to_json
from obliviate.report import write_report
from sd_tiny import save_tiny_sd


@pytest.fixture(scope="module")
def bench_result(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    base = save_tiny_sd(root / "base", world="shapes")
    return run_bench(["uce", "duge"], ["star", "striped"], model=str(base), images_per_combo=1,
                     attacks=["paraphrase", "softprompt", "resurgence"], work=root / "work",
                     options={"duge": {"steps": 2}}, grid_images=4, progress=False)


def test_bench_measures_every_step_and_attack(bench_result):
    rows = bench_result["rows"]
    assert [(r["method"], r["step"]) for r in rows] == [("uce", 1), ("uce", 2), ("duge", 1), ("duge", 2)]
    assert set(rows[1]["ua"]) == {"star", "striped"} and set(rows[0]["ua"]) == {"star"}
    for r in rows:
        assert 0 <= r["ira"] <= 1 and 0 <= r["cra"] <= 1 and r["seconds"] > 0 and r["bytes_stored"] > 0
    attacks = bench_result["attacks"]["uce"]["star"]
    assert attacks["softprompt"]["steps"] > 0 and 0 <= attacks["softprompt"]["ua"] <= 1
    assert 0 <= attacks["paraphrase"]["ua"] <= 1
    assert "accuracy_after" in attacks["resurgence"]
    text = table(bench_result)
    assert "soft-prompt UA" in text and "duge" in text
    assert json.loads(to_json(bench_result))["rows"][0]["method"] == "uce"


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
    assert list(folder.glob("grid-before-star.png")) and list(folder.glob("grid-duge-related-star.png"))
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
