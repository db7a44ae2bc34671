import json

import pytest
import torch

from obliviate.checkpoint import atomic_folder, load_training_state, save_training_state


def test_training_state_round_trip_without_pickle(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    save_training_state(tmp_path / "ckpt", {"model": model}, opt, meta={"step": 7})
    other = torch.nn.Linear(3, 2)
    other_opt = torch.optim.AdamW(other.parameters(), lr=1e-3)
    info, _ = load_training_state(tmp_path / "ckpt", {"model": other}, other_opt)
    assert info["step"] == 7
    assert torch.equal(model.weight, other.weight)
    a, b = opt.state_dict()["state"][0], other_opt.state_dict()["state"][0]
    assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["step"], b["step"])
    assert all(p.suffix in (".safetensors", ".json") for p in (tmp_path / "ckpt").iterdir())


def test_atomic_folder_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_folder(tmp_path / "out") as tmp:
            (tmp / "half.txt").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileExistsError):
        (tmp_path / "exists").mkdir()
        with atomic_folder(tmp_path / "exists"):
            pass


def test_train_base_resumes_from_its_checkpoint(tmp_path):
    from obliviate.shapes.train import BaseTrainer, TrainConfig

    small = dict(images=64, judge_steps=2, judge_batch_size=8, vae_steps=2, vae_batch_size=4,
                 text_steps=2, batch_size=4, warmup_steps=1, checkpoint_every=2, probe_every=0,
                 judge_holdout=16)
    BaseTrainer(tmp_path / "out", tmp_path / "work", TrainConfig(unet_steps=2, **small)).run()
    BaseTrainer(tmp_path / "out", tmp_path / "work", TrainConfig(unet_steps=3, **small)).run()
    records = [json.loads(line) for line in (tmp_path / "work" / "log.jsonl").read_text().splitlines()]
    assert {"stage": "unet", "resumed_at": 2}.items() <= next(
        r for r in records if "resumed_at" in r).items()
    assert (tmp_path / "out" / "model_index.json").exists()
    assert json.loads((tmp_path / "work" / "unet" / "state.json").read_text())["step"] == 3
