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


def test_train_base_family_sd3_writes_an_sd3_pipeline_that_conditions_as_diffusers_does(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from obliviate import load_pipeline
    from obliviate.families import family_of
    from obliviate.shapes.train import BaseTrainer, TrainConfig

    small = dict(images=64, judge_steps=2, judge_batch_size=8, vae_steps=2, vae_batch_size=4, text_steps=2,
                 batch_size=4, warmup_steps=1, checkpoint_every=2, probe_every=0, judge_holdout=16)
    BaseTrainer(tmp_path / "out", tmp_path / "work", TrainConfig(unet_steps=2, family="sd3", **small)).run()
    # a plain diffusers folder, loaded as SD3 without T5 is
    plain = StableDiffusion3Pipeline.from_pretrained(tmp_path / "out", text_encoder_3=None, tokenizer_3=None)
    assert plain.text_encoder_3 is None and plain.transformer.config.patch_size == 2
    assert "max_sequence_length=0" in (tmp_path / "out" / "README.md").read_text()  # the card says how
    pipe = load_pipeline(tmp_path / "out")
    family = family_of(pipe)
    assert family.name == "sd3"
    prompts = ["a red star", "a blue circle with stripes"]
    cond = family.encode(pipe, prompts, lambda n: getattr(pipe, n))
    # the model is trained and sampled with no T5 tokens (its sampler's max_sequence_length 0)
    states, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False,
                                              max_sequence_length=0)
    assert cond.states.shape[1] == pipe.tokenizer.model_max_length
    assert torch.allclose(cond.states, states) and torch.allclose(cond.extra["pooled_projections"], pooled)
    from obliviate.generate import generate_images

    assert generate_images(pipe, prompts, seed=0).shape == (2, 32, 32, 3)


@pytest.mark.parametrize("init", ["someone/model", "unet/diffusion_pytorch_model.safetensors"])
def test_train_base_refuses_an_init_from_that_is_not_a_shapes_model(tmp_path, capsys, init):
    """A hub id or a single weights file is not a model train-base can continue from: one
    line, exit 2, no work folder."""
    from obliviate.cli import main
    from obliviate.pipeline import shipped_model_path

    if init.endswith(".safetensors"):
        init = str(shipped_model_path("shapes") / init)
    code = main(["train-base", "--init-from", init, "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--init-from" in err, err
    assert list(tmp_path.iterdir()) == []
