"""Shared fixtures: a tiny random Stable Diffusion pipeline, and the shipped model."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def shapes_pipe():
    """The shipped model, loaded once per test session."""
    from obliviate import load_pipeline

    return load_pipeline("shapes")


@pytest.fixture(scope="session")
def shapes_judge(shapes_pipe):
    from obliviate.evaluate.evaluation import load_judge

    return load_judge(shapes_pipe)


@pytest.fixture()
def tiny_pipe():
    """A random StableDiffusionPipeline built from the world's tokenizer (seconds to build)."""
    from obliviate.shapes.tokenizer import build_tokenizer
    from obliviate.shapes.layouts import layout
    from obliviate.shapes.train import assemble_pipeline, build_vae

    torch.manual_seed(0)
    tok = build_tokenizer()
    encoders = layout("sd").build_encoders(tok)
    return assemble_pipeline(build_vae(), layout("sd").build_denoiser(encoders, 4), encoders, tok)


@pytest.fixture(scope="session")
def lineage(tmp_path_factory):
    """A tiny shapes-world base folder and two UCE steps on it (full, then delta): base, 1, 2."""
    from obliviate.cli import main
    from sd_tiny import save_tiny_sd

    root = tmp_path_factory.mktemp("lineage")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OBLIVIATE_CACHE", str(root / "cache"))
        base = save_tiny_sd(root / "base", world="shapes")
        assert main(["erase", "--model", str(base), "--method", "uce", "--concept", "star",
                     "--out", str(root / "1")]) == 0
        assert main(["erase", "--model", str(root / "1"), "--method", "uce", "--concept", "circle",
                     "--out", str(root / "2"), "--save", "delta"]) == 0
    return root
