import json

import pytest
from PIL import Image

from obliviate.cli import main


def test_generate_writes_a_grid_of_the_shipped_model(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["generate", "--model", "shapes", "--prompt", "a red solid star", "-n", "4",
                 "--seed", "0", "--out", str(out)]) == 0
    picture = Image.open(out)
    assert picture.width > 4 * 32 and picture.height >= 32
    assert list(tmp_path.iterdir()) == [out]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "nope"], "not found"),
        (["--model", "/no/such/folder"], "not found"),
        (["--model", "weights.ckpt"], "pickle"),
    ],
)
def test_bad_model_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights.ckpt").write_bytes(b"\x80")
    code = main(["generate", "--prompt", "a star", "--out", "g.png", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.ckpt"]


def test_eval_json_has_the_protocol_keys(tmp_path):
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", "shapes", "--images-per-combo", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["accuracy"]) == {"object", "colour", "style"}
    assert result["images"] == 6 * 6 * 4
    kinds = {v["kind"] for v in result["per_concept"].values()}
    assert kinds == {"object", "colour", "style"} and len(result["per_concept"]) == 16
    assert result["fid"] >= 0 and result["seconds"] > 0
    # a behaviour check, not a floor: the shipped model draws what it is asked for
    assert result["accuracy"]["object"] > 0.5 and result["accuracy"]["colour"] > 0.6  # chance: 1/6
