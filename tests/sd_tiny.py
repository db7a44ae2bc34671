"""A tiny random pipeline shaped like Stable Diffusion 1.x, for engine tests.

77-token CLIP tokenizer, cross-attention at two resolutions, widths unlike the shipped
model; no world: concepts are free text, as for a real model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline,
                       UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel

from obliviate.shapes.tokenizer import build_tokenizer

FAST_SAMPLER = {"num_inference_steps": 2, "guidance_scale": 3.0}
# --robust settings that keep the hardening stage's pools small (paired images, memory images,
# keep prompts), so tests of the stage stay fast
SMALL_IMAGES = {"harden_image_pairs": 4, "harden_image_memory": 4, "harden_keep_prompts": 4,
                "harden_keep_prompts_style": 6}


def tiny_sd(world: str | None = None) -> StableDiffusionPipeline:
    """A random SD-1.x-shaped pipeline (seeded); `world="shapes"` tags it with that vocabulary."""
    torch.manual_seed(0)
    tok = build_tokenizer()
    tok.model_max_length = 77
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D",) * 2,
        up_block_types=("CrossAttnUpBlock2D",) * 2, cross_attention_dim=32,
        attention_head_dim=2, norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                        norm_num_groups=8, sample_size=16)
    scheduler = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                            beta_end=0.012)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                   scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _clip(hidden: int, intermediate: int | None = None) -> tuple:
    """The world's tokenizer (77 tokens) and a small CLIP text config of width `hidden`."""
    tok = build_tokenizer()
    tok.model_max_length = 77
    config = CLIPTextConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate or 2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=hidden,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    return tok, config


def tiny_sdxl() -> "StableDiffusionXLPipeline":
    """A random SDXL-shaped pipeline (seeded): two CLIP encoders (the second with a projected
    pooled output), a UNet with `text_time` added conditioning reading their concatenated
    states, the layout of diffusers' own SDXL tests at smaller widths."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(0)
    tok, config = _clip(hidden=16)
    text, text_2 = CLIPTextModel(config), CLIPTextModelWithProjection(config)
    time_dim = 4
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=time_dim, projection_class_embeddings_input_dim=6 * time_dim + 16,
        transformer_layers_per_block=(1, 2), norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                        norm_num_groups=8, sample_size=16)
    scheduler = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                            beta_end=0.012)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=tok,
                                     tokenizer_2=tok, unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe



def tiny_sd3() -> "StableDiffusion3Pipeline":
    """A random SD3-shaped pipeline (seeded): two CLIP encoders with projection, no T5 (the
    pipeline then conditions on zeros in T5's place), an MMDiT with joint attention, a VAE
    with a shift factor (as SD3's), the flow-matching scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(0)
    tok, config = _clip(hidden=16)
    text, text_2 = CLIPTextModelWithProjection(config), CLIPTextModelWithProjection(config)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        caption_projection_dim=16, joint_attention_dim=32, pooled_projection_dim=32, out_channels=4)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                        sample_size=16, shift_factor=0.06, scaling_factor=1.5, use_quant_conv=False,
                        use_post_quant_conv=False)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
                                    vae=vae, text_encoder=text, tokenizer=tok, text_encoder_2=text_2,
                                    tokenizer_2=tok, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe



def tiny_flux() -> "FluxPipeline":
    """A random Flux-shaped pipeline (seeded): CLIP (pooled) and a small T5 (states), a
    transformer with one double and one single block and a guidance embedding, a 1-channel
    VAE (latents packed 2×2 into 4 channels), the flow-matching scheduler; 16-px images."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    tok, config = _clip(hidden=32, intermediate=37)
    text = CLIPTextModel(config)
    t5 = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                 relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0))
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
        guidance_embeds=True)
    vae = AutoencoderKL(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                        latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035)
    pipe = FluxPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                        text_encoder=text, tokenizer=tok, text_encoder_2=t5, tokenizer_2=tok)
    pipe.set_progress_bar_config(disable=True)
    return pipe


BUILDERS = {"sd": tiny_sd, "sdxl": tiny_sdxl, "sd3": tiny_sd3, "flux": tiny_flux}
# Flux has no native sample size in its config; its tiny pipeline draws 16-px images
SAMPLERS = {"flux": {"height": 16, "width": 16}}


def save_tiny(folder: Path, family: str = "sd", world: str | None = None) -> Path:
    """Write the tiny pipeline of `family` as a diffusers folder with fast sampler defaults;
    `world="shapes"` tags it with that vocabulary."""
    BUILDERS[family]().save_pretrained(folder, safe_serialization=True)
    info = {"sampler": {**FAST_SAMPLER, **SAMPLERS.get(family, {})}, **({"world": world} if world else {})}
    (folder / "obliviate.json").write_text(json.dumps(info))
    return folder


def save_tiny_sd(folder: Path, world: str | None = None) -> Path:
    """`save_tiny` for the SD-1.x-shaped pipeline."""
    return save_tiny(folder, "sd", world)
