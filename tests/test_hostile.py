"""Issue 21: the ledger never says what did not happen; hostile input gets one line, exit 2.

Each test runs the real command (`main([...])` in-process, or a subprocess for races, kill -9
and the first line a fresh process prints) on a tiny model, and checks the exit code, the one
line, and that nothing was written or replaced.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from obliviate.cli import main
from obliviate.ledger import Ledger, weights_sha256

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
ENV.pop("TRANSFORMERS_VERBOSITY", None)  # a fresh shell: nothing silenced beforehand


@pytest.fixture()
def work(tmp_path, monkeypatch):
    monkeypatch.setenv("OBLIVIATE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def one_line(capsys, *pieces) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("obliviate: error: "), err
    for piece in pieces:
        assert piece in err, err
    return err


def tree(folder) -> dict:
    """Every file under `folder` with its bytes: to show nothing was written or replaced."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# 1. a request that changes nothing is not a removal ----------------------------------------

@pytest.mark.parametrize("args", [["--steps", "0"], ["--set", "steps=0"], ["--steps", "-3"]])
def test_a_request_without_steps_is_refused(lineage, work, capsys, args):
    code = main(["erase", "--model", str(lineage / "base"), "--method", "fewshot-te", "--concept", "star",
                 "--out", "o", *args])
    assert code == 2
    one_line(capsys, "steps", "at least 1")
    assert not (work / "o").exists()


def test_a_uce_body_edit_read_at_no_timestep_is_refused(lineage, work, capsys):
    code = main(["erase", "--model", str(lineage / "base"), "--method", "uce", "--concept", "star",
                 "--robust", "--robust-set", "body_timesteps=0", "--out", "o"])
    assert code == 2
    one_line(capsys, "body_timesteps=0", ">= 1")
    assert not (work / "o").exists()


def test_a_request_that_leaves_the_weights_unchanged_is_not_recorded(lineage, work, capsys, monkeypatch):
    from obliviate.methods.uce import UCE

    monkeypatch.setattr(UCE, "apply", lambda self, ctx: {})
    code = main(["erase", "--model", str(lineage / "1"), "--method", "uce", "--concept", "circle", "--out", "o"])
    assert code == 2
    one_line(capsys, "unchanged", "nothing was recorded")
    assert not (work / "o").exists() and not list(work.glob(".o*"))


# 2 and 5. --resume continues only the identical request, and records all of it ------------

def test_resume_only_the_same_request_and_record_its_whole_time(lineage, work, capsys, monkeypatch):
    from obliviate.methods.fewshot_te import FewShotTextEncoder

    def interrupt(self, ctx, step, terms):
        if step == 2:
            raise KeyboardInterrupt
        return False

    common = ["erase", "--model", str(lineage / "base"), "--method", "fewshot-te", "--steps", "3",
              "--batch-size", "2", "--set", "keep_prompts=8",
              "--checkpoint-every", "2", "--out", "o"]
    with monkeypatch.context() as mp:
        mp.setattr(FewShotTextEncoder, "should_stop", interrupt)
        assert main([*common, "--concept", "star"]) == 130
    checkpoint = work / ".o.ckpt"
    state = json.loads((checkpoint / "state.json").read_text())
    assert state["step"] == 2 and state["seconds"] > 0
    capsys.readouterr()
    before = tree(checkpoint)
    # another concept, another seed: refused, the checkpoint kept
    for other in (["--concept", "square"], ["--concept", "star", "--seed", "1"]):
        assert main([*common, *other, "--resume"]) == 2
        one_line(capsys, "--resume", "not of this request")
        assert not (work / "o").exists() and tree(checkpoint) == before
    # the same request: resumed, marked so, with the seconds of both runs
    assert main([*common, "--concept", "star", "--resume"]) == 0
    entry = Ledger.load(work / "o").entries[-1]
    assert entry.resolved.names == ["star"] and entry.resumed_from_step == 2
    assert entry.seconds >= state["seconds"]
    assert not checkpoint.exists()


# 3. two runs with the same --out: neither replaces the other -------------------------------

def test_a_folder_written_meanwhile_by_another_run_is_never_replaced(lineage, work, capsys, monkeypatch):
    original = Ledger.save

    def other_run_finishes_first(self, folder):
        original(self, folder)
        (work / "o").mkdir()  # the other run's rename lands while this one is still saving
        (work / "o" / "theirs.txt").write_text("the other run's result")

    monkeypatch.setattr(Ledger, "save", other_run_finishes_first)
    code = main(["erase", "--model", str(lineage / "1"), "--method", "uce", "--concept", "circle",
                 "--out", "o", "--save", "delta"])
    assert code == 2
    one_line(capsys, "another run", "--overwrite")
    assert tree(work / "o") == {"theirs.txt": b"the other run's result"}
    assert sorted(p.name for p in work.iterdir() if p.name != "cache") == ["o"]


def test_two_concurrent_runs_one_wins_one_line_for_the_other(lineage, tmp_path):
    """Also item 13: the loser, a fresh process, prints its error as its first and only line
    (no notices from transformers before it)."""
    cmd = [sys.executable, "-m", "obliviate.cli", "erase", "--model", str(lineage / "1"),
           "--method", "uce", "--concept", "circle", "--out", str(tmp_path / "o")]
    env = {**ENV, "OBLIVIATE_CACHE": str(tmp_path / "cache")}
    runs = [subprocess.Popen([*cmd, "--seed", str(seed)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for seed in (0, 1)]
    results = [(r.wait(timeout=240), *r.communicate()) for r in runs]
    assert sorted(code for code, _, _ in results) == [0, 2], [err[-800:] for _, _, err in results]
    winner = next(i for i, (code, _, _) in enumerate(results) if code == 0)
    loser_err = results[1 - winner][2].strip()
    assert len(loser_err.splitlines()) == 1 and loser_err.startswith("obliviate: error: "), loser_err
    entry = Ledger.load(tmp_path / "o").entries[-1]
    assert entry.settings["seed"] == winner  # the folder holds the winner's result, whole
    assert weights_sha256(__import__("obliviate").load_pipeline(tmp_path / "o")) == entry.weights_sha256
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


# 4. the whole ledger chain is verified ------------------------------------------------------

def _edit_entry_one(data):
    data["entries"][0]["request"]["targets"][0]["name"] = "square"  # relabelled


def _edit_hash_consistently(data):
    data["entries"][0]["weights_sha256"] = "0" * 64
    data["entries"][1]["parent_sha256"] = "0" * 64


def _edit_parent(data):
    data["entries"][1]["parent_sha256"] = "f" * 64


@pytest.mark.parametrize("edit, message", [(_edit_entry_one, "digest"), (_edit_hash_consistently, "digest"),
                                           (_edit_parent, "parent hash")])
@pytest.mark.parametrize("command", ["ledger", "erase", "export"])
def test_an_edited_earlier_entry_is_refused(lineage, work, capsys, edit, message, command):
    folder = work / "edited"
    shutil.copytree(lineage / "2", folder)  # two steps; a delta of the base, which stays in place
    assert main(["ledger", str(folder)]) == 0
    capsys.readouterr()
    data = json.loads((folder / "ledger.json").read_text())
    edit(data)
    (folder / "ledger.json").write_text(json.dumps(data))
    args = {"ledger": ["ledger", str(folder)],
            "erase": ["erase", "--model", str(folder), "--method", "uce", "--concept", "square", "--out", "o"],
            "export": ["export", str(folder), "--out", "o"]}[command]
    assert main(args) == 2
    one_line(capsys, "not a valid ledger", message)
    assert not (work / "o").exists()


# 6 and 7. offline means no socket; a missing folder is a missing folder --------------------

@pytest.fixture()
def no_network(monkeypatch):
    """As in a shell without HF_HUB_OFFLINE set, but every connection attempt is recorded and fails."""
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] in ("huggingface_hub", "diffusers", "transformers") and \
                isinstance(getattr(module, "HF_HUB_OFFLINE", None), bool):
            monkeypatch.setattr(module, "HF_HUB_OFFLINE", False)
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "OBLIVIATE_ONLINE"):
        monkeypatch.delenv(key, raising=False)
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[:2])
        raise OSError("network blocked by the test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


def test_a_single_safetensors_file_loads_offline_without_a_socket(work, capsys, monkeypatch, no_network):
    from safetensors.torch import save_file

    monkeypatch.setenv("HF_HOME", str(work / "hf"))  # an empty hub cache
    save_file({"model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight":
               torch.zeros(320, 768)}, work / "sd.safetensors")
    code = main(["generate", "--model", "sd.safetensors", "--prompt", "a cat", "-n", "1", "--out", "g.png"])
    assert no_network == []
    assert code == 2
    one_line(capsys, "OBLIVIATE_ONLINE=1")
    assert not (work / "g.png").exists()


def test_a_hub_id_is_looked_up_in_the_cache_only(work, capsys, monkeypatch, no_network):
    monkeypatch.setenv("HF_HOME", str(work / "hf"))
    code = main(["generate", "--model", "someone/some-model", "--prompt", "a cat", "--out", "g.png"])
    assert no_network == []
    assert code == 2
    one_line(capsys, "not in the local cache", "OBLIVIATE_ONLINE=1")


def test_a_missing_relative_folder_is_said_to_be_missing(work, capsys, no_network):
    (work / "runs").mkdir()
    assert main(["generate", "--model", "runs/missing", "--prompt", "a cat", "--out", "g.png"]) == 2
    err = one_line(capsys, "runs/missing does not exist")
    assert "OBLIVIATE_ONLINE" not in err and "hub" not in err
    assert no_network == [] and sorted(p.name for p in work.iterdir()) == ["runs"]


# 8. bad values: one line, exit 2, nothing written -------------------------------------------

def _ledger_edit(folder, how):
    path = folder / "ledger.json"
    if how == "malformed":
        path.write_text(path.read_text()[:-40])
    else:
        data = json.loads(path.read_text())
        del data["entries"][0]["weights_sha256"]
        path.write_text(json.dumps(data))


@pytest.mark.parametrize("args, message", [
    (["erase", "--method", "uce", "--set", "lam=abc"], "lam must be a number"),
    (["erase", "--method", "duge", "--set", "steps=abc"], "steps must be an integer"),
    (["erase", "--method", "duge", "--set", "lr=-1"], "above 0"),
    (["erase", "--method", "duge", "--lr", "-1"], "above 0"),
    (["erase", "--method", "duge", "--set", "attn_match=nope"], "must be one of"),
    (["erase", "--method", "uce", "--device", "foo"], "not a device"),
    (["erase", "--method", "uce", "--device", "cuda"], "no CUDA GPU"),
    (["generate", "-n", "0"], "-n must be at least 1"),
    (["generate", "-n", "-1"], "-n must be at least 1"),
    (["generate", "-n", "abc"], "invalid int"),
    (["generate", "--device", "cuda:0"], "no CUDA GPU"),
])
def test_bad_values_are_one_line(lineage, work, capsys, monkeypatch, args, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = ["--model", str(lineage / "1")]
    extra = (["--concept", "circle", "--out", "o"] if args[0] == "erase"
             else ["--prompt", "a star", "--out", "g.png"])
    assert main([*args, *model, *extra]) == 2
    one_line(capsys, message)
    assert sorted(p.name for p in work.iterdir()) == []


@pytest.mark.parametrize("how", ["malformed", "missing key"])
@pytest.mark.parametrize("command", ["ledger", "erase", "rollback"])
def test_a_broken_ledger_json_is_one_line(lineage, work, capsys, how, command):
    folder = work / "m"
    shutil.copytree(lineage / "1", folder)
    _ledger_edit(folder, how)
    args = {"ledger": ["ledger", str(folder)], "rollback": ["rollback", str(folder), "--to", "0", "--out", "o"],
            "erase": ["erase", "--model", str(folder), "--method", "uce", "--concept", "circle", "--out", "o"]}
    assert main(args[command]) == 2
    one_line(capsys, "not a valid ledger", "--new-lineage")
    assert sorted(p.name for p in work.iterdir()) == ["m"]


# 9 and 10. output paths and judges are checked before any work ------------------------------

@pytest.fixture()
def no_work(monkeypatch):
    """Loading a model fails the test: the command must stop before it."""
    import obliviate.pipeline

    def fail(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(obliviate.pipeline, "load_pipeline", fail)
    monkeypatch.setattr(torch, "load", fail)


@pytest.mark.parametrize("target, message", [("afile/eval.json", "is a file, not a folder"),
                                             ("adir", "is a folder")])
def test_eval_json_that_cannot_be_written_fails_before_any_work(work, capsys, no_work, target, message):
    (work / "afile").write_text("x")
    (work / "adir").mkdir()
    assert main(["eval", "--model", "shapes", "--json", target]) == 2
    one_line(capsys, "--json", message)
    assert sorted(p.name for p in work.iterdir()) == ["adir", "afile"] and not any((work / "adir").iterdir())


def test_a_pickle_judge_is_refused(work, capsys, no_work):
    judge = work / "clip"
    judge.mkdir()
    (judge / "config.json").write_text("{}")
    (judge / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")
    assert main(["eval", "--model", "shapes", "--judge", f"clip:{judge}", "--concepts", "cat"]) == 2
    one_line(capsys, "pytorch_model.bin", "pickle")


# 11. temp folders of a run killed mid-save are cleaned -------------------------------------

def test_the_temp_folder_of_a_run_killed_during_the_save_is_cleaned(lineage, work, capsys):
    script = textwrap.dedent(f"""
        import os, signal
        from obliviate.ledger import Ledger
        from obliviate.cli import main
        Ledger.save = lambda self, folder: os.kill(os.getpid(), signal.SIGKILL)
        main(["erase", "--model", {str(lineage / "1")!r}, "--method", "uce", "--concept", "circle",
              "--out", "o"])
    """)
    killed = subprocess.run([sys.executable, "-c", script], cwd=work, env={**ENV, "OBLIVIATE_CACHE": str(work / "c")},
                            capture_output=True, text=True, timeout=240)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-800:]
    stale = [p for p in work.iterdir() if p.name.startswith(".o.tmp-")]
    assert len(stale) == 1 and not (work / "o").exists()
    # a temp folder of a run still going (this process's parent) is left alone
    host = socket.gethostname().replace("-", "_")
    live = work / f".o.tmp-{host}-{os.getppid()}-abc"
    live.mkdir()
    assert main(["erase", "--model", str(lineage / "1"), "--method", "uce", "--concept", "circle",
                 "--out", "o"]) == 0
    assert not stale[0].exists() and live.exists()
    assert Ledger.load(work / "o").entries[-1].resolved.names == ["circle"]


# 12. a delta whose base moved says so, and how to re-point it -------------------------------

def test_a_delta_whose_base_moved_names_it_and_the_way_to_repoint(lineage, work, capsys):
    base = work / "base"
    shutil.copytree(lineage / "base", base)
    assert main(["erase", "--model", str(base), "--method", "uce", "--concept", "star", "--out", "d",
                 "--save", "delta"]) == 0
    base.rename(work / "moved")
    capsys.readouterr()
    assert main(["generate", "--model", "d", "--prompt", "a star", "-n", "1", "--out", "g.png"]) == 2
    one_line(capsys, "is a delta", "base", "--base NEW_PLACE")
    assert not (work / "g.png").exists()
    assert main(["export", "d", "--base", "moved", "--out", "full"]) == 0
    from obliviate import load_pipeline

    assert weights_sha256(load_pipeline(work / "full")) == Ledger.load(work / "d").head_sha256
