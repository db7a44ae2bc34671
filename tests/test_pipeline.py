import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from obliviate import ObliviateError, generate_images, load_pipeline
from obliviate.pipeline import resolve_model


def test_save_and_load_round_trip_offline(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "model", safe_serialization=True)
    files = {p.suffix for p in (tmp_path / "model").rglob("*") if p.is_file()}
    assert ".safetensors" in files and not files & {".bin", ".ckpt", ".pt"}
    again = load_pipeline(tmp_path / "model")
    plain = StableDiffusionPipeline.from_pretrained(tmp_path / "model", local_files_only=True)
    for a, b in zip(tiny_pipe.unet.state_dict().values(), again.unet.state_dict().values()):
        assert torch.equal(a, b)
    kwargs = dict(seed=1, num_inference_steps=2, guidance_scale=3.0)
    first = generate_images(tiny_pipe, ["a red star"], **kwargs)
    assert np.array_equal(first, generate_images(again, ["a red star"], **kwargs))
    plain.set_progress_bar_config(disable=True)
    assert np.array_equal(first, generate_images(plain, ["a red star"], **kwargs))


def test_shipped_model_is_a_standard_pipeline(shapes_pipe):
    from obliviate.pipeline import shipped_model_path

    folder = shipped_model_path("shapes")
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size < 40e6
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size


@pytest.mark.parametrize(
    "name, message",
    [
        ("no-such-model", "not found"),
        ("./missing/folder", "not found"),
    ],
)
def test_unknown_or_missing_model_is_a_clear_error(name, message):
    with pytest.raises(ObliviateError, match=message):
        resolve_model(name)


def test_folder_without_pipeline_and_pickle_checkpoints_are_refused(tmp_path):
    with pytest.raises(ObliviateError, match="model_index.json"):
        resolve_model(tmp_path)
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\x80\x04pickle")
    with pytest.raises(ObliviateError, match="pickle"):
        resolve_model(ckpt)
    folder = tmp_path / "pickled"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80")
    with pytest.raises(ObliviateError, match="pickle"):
        resolve_model(folder)
