"""Seconds and peak memory of one request on full-size, randomly initialised models.

    python benchmarks/full_size.py --device cuda --dtype bfloat16 --json full-size.json
    python benchmarks/full_size.py --families sd15 --methods uce,duge --resolution 128 \
        --steps 2 --set duge:prior_images=2      # a CPU smoke test of the build and the loop

Builds Stable Diffusion 1.5, SDXL and SD3-medium with their published layouts (UNet or
MMDiT widths and depths, the CLIP encoders; SD3 without T5, conditioned on its 256 zero T5
tokens as the pipeline does without it) and random weights, so nothing is downloaded: the
timings are those of the real architectures, the erasures themselves mean nothing. The
package's own tokenizer (padded to 77 tokens) stands in for CLIP's. For each family and
method, one request ("van gogh", free text) from a fresh copy of the saved model: seconds
of the request (its image sampling included) and the peak accelerator memory
(`torch.cuda.max_memory_allocated`; on a CPU, the process's peak resident memory). A method
that needs images (fewshot-te) gets random ones. Issue 19 asks for these figures from the
GPU machine; docs/benchmarks.md says which were measured.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from obliviate.cli import parse_options
from obliviate.erase import erase
from obliviate.pipeline import load_pipeline, save_pipeline, shipped_model_path
from obliviate.request import Request

FAMILIES = ("sd15", "sdxl", "sd3-medium")
METHODS = ("duge", "esd", "uce", "fewshot-te")


def clip_text(hidden: int, layers: int, heads: int, projection: int | None = None):
    """A CLIP text encoder of the given size (with a text projection where SDXL's and SD3's
    second encoder, or SD3's first, has one)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=4 * hidden,
                            num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                            projection_dim=projection or hidden, hidden_act="gelu")
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def tokenizer():
    """The shipped model's CLIP tokenizer, padding to CLIP's 77 tokens."""
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(shipped_model_path("shapes") / "tokenizer")
    tok.model_max_length = 77
    return tok


def vae(latent_channels: int):
    """Stable Diffusion's autoencoder layout (SD3's has 16 latent channels and a shift)."""
    from diffusers import AutoencoderKL

    blocks = (128, 256, 512, 512)
    extra = {"shift_factor": 0.0609, "scaling_factor": 1.5305} if latent_channels == 16 else {}
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=blocks,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=2, **extra)


def build(family: str, resolution: int):
    """A randomly initialised pipeline of `family` at its published size."""
    from diffusers import (EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)

    torch.manual_seed(0)
    euler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    latent = resolution // 8
    if family == "sd15":
        unet = UNet2DConditionModel(sample_size=latent, cross_attention_dim=768, attention_head_dim=8)
        return StableDiffusionPipeline(vae(4), clip_text(768, 12, 12), tokenizer(), unet, euler, None, None,
                                       requires_safety_checker=False)
    if family == "sdxl":
        unet = UNet2DConditionModel(
            sample_size=latent, block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
        return StableDiffusionXLPipeline(vae(4), clip_text(768, 12, 12), clip_text(1280, 32, 20, projection=1280),
                                         tokenizer(), tokenizer(), unet, euler)
    if family == "sd3-medium":
        transformer = SD3Transformer2DModel(
            sample_size=latent, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
            num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
            pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
        return StableDiffusion3Pipeline(transformer, FlowMatchEulerDiscreteScheduler(shift=3.0), vae(16),
                                        clip_text(768, 12, 12, projection=768), tokenizer(),
                                        clip_text(1280, 32, 20, projection=1280), tokenizer(), None, None)
    raise SystemExit(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")


def peak_memory_mb(device: str) -> float:
    """Peak accelerator memory since the last reset, or the process's peak resident memory."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    """Build each family once, then time one request of each method on a fresh load of it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(FAMILIES), help=f"comma list of {', '.join(FAMILIES)}")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--resolution", type=int, default=0, help="image side (default: the family's native)")
    parser.add_argument("--steps", type=int, help="optimisation steps (default: the method's)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--set", action="append", default=[], metavar="METHOD:KEY=VALUE")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    native = {"sd15": 512, "sdxl": 1024, "sd3-medium": 1024}
    options: dict[str, dict] = {}
    for pair in args.set:
        method, _, rest = pair.partition(":")
        options.setdefault(method, {}).update(parse_options([rest]))
    dtype = getattr(torch, args.dtype)
    rows = []
    with tempfile.TemporaryDirectory(prefix="obliviate-full-size-") as tmp:
        images = Path(tmp) / "images"
        images.mkdir()
        rng = np.random.default_rng(0)
        for i in range(4):  # fewshot-te's "real" images: noise, the cost is what is measured
            Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(images / f"{i}.png")
        for family in args.families.split(","):
            folder = Path(tmp) / family
            pipe = build(family, args.resolution or native[family])
            denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
            params = sum(p.numel() for p in denoiser.parameters())
            save_pipeline(pipe.to(dtype=dtype), folder)
            del pipe
            for method in args.methods.split(","):
                pipe = load_pipeline(folder, device=args.device, dtype=dtype)
                extra = {"images": str(images)} if method == "fewshot-te" else {}
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                start = time.time()
                erase(pipe, Request(("van gogh",)), method=method, steps=args.steps, progress=False,
                      options={**extra, **options.get(method, {})},
                      gradient_checkpointing=args.gradient_checkpointing)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                row = {"family": family, "method": method, "denoiser_parameters": params, "dtype": args.dtype,
                       "resolution": args.resolution or native[family], "device": args.device,
                       "seconds": round(time.time() - start, 2), "peak_memory_mb": round(peak_memory_mb(args.device))}
                print(json.dumps(row), flush=True)
                rows.append(row)
                del pipe
                if args.device.startswith("cuda"):
                    torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
