"""Flux (FLUX.1 dev/schnell): CLIP gives only the pooled embedding, T5 the token states; the
transformer reads 2×2-packed latents (a sequence of patches) with positional ids for text
and image tokens, a guidance embedding (dev), and rectified flow at timestep σ ∈ (0, 1].

Choices (the sources are silent): latents stay packed throughout (the pipeline's own
`output_type="latent"` returns them packed, and rectified flow acts elementwise); the
guidance value during erasure is the pipeline's default, 3.5; the text block of the double
(joint) blocks is what `attn2-kv` trains and what DUGE reads — the single blocks, where text
and image share one set of projections, are left to the body groups; UCE edits
`context_embedder` (the reference UCE-Flux script's choice)."""

from __future__ import annotations

import torch

from .base import Conditioning
from .sd3 import FlowMatching, StableDiffusion3

T5_TOKENS = 512
GUIDANCE = 3.5


class Flux(FlowMatching):
    name = "flux"
    pipeline_classes = ("FluxPipeline", "FluxImg2ImgPipeline")
    denoiser = "transformer"
    text_encoders = ("text_encoder", "text_encoder_2")
    tokenizers = ("tokenizer", "tokenizer_2")
    text_attacks = False
    time_scale = 1.0  # the pipeline divides its timesteps by 1000: the transformer takes σ
    denoiser_rules = StableDiffusion3.denoiser_rules
    text_projections = StableDiffusion3.text_projections
    pooled_text_map = StableDiffusion3.pooled_text_map

    def encode(self, pipe, prompts, get):
        clip, t5 = get("text_encoder"), get("text_encoder_2")
        pooled = clip(self.token_ids(pipe, prompts).to(clip.device), output_hidden_states=False).pooler_output
        ids = pipe.tokenizer_2(prompts, padding="max_length", max_length=min(T5_TOKENS, pipe.tokenizer_2.model_max_length),
                               truncation=True, return_tensors="pt").input_ids
        states = t5(ids.to(t5.device), output_hidden_states=False)[0]
        return Conditioning(states, {"pooled_projections": pooled})

    def predict(self, denoiser, x_t, t, cond):
        from diffusers import FluxPipeline

        side = int(round(x_t.shape[1] ** 0.5))  # packed: (batch, (h/2)·(w/2), 4·channels), square
        img_ids = FluxPipeline._prepare_latent_image_ids(len(x_t), side, side, x_t.device, x_t.dtype)
        txt_ids = torch.zeros(cond.states.shape[1], 3, device=x_t.device, dtype=x_t.dtype)
        guidance = (torch.full((len(x_t),), GUIDANCE, device=x_t.device)
                    if denoiser.config.guidance_embeds else None)
        return denoiser(hidden_states=x_t, timestep=self.model_time(t).to(x_t.device), guidance=guidance,
                        pooled_projections=cond.extra["pooled_projections"], encoder_hidden_states=cond.states,
                        txt_ids=txt_ids, img_ids=img_ids).sample

    def pack(self, pipe, latents: torch.Tensor) -> torch.Tensor:
        """(batch, c, h, w) VAE latents as the transformer reads them: 2×2 patches in a row."""
        from diffusers import FluxPipeline

        return FluxPipeline._pack_latents(latents, *latents.shape)

    def native_size(self, pipe) -> int:
        return pipe.default_sample_size

    def unpack(self, pipe, latents: torch.Tensor) -> torch.Tensor:
        from diffusers import FluxPipeline

        pixels = 2 * int(round(latents.shape[1] ** 0.5)) * pipe.vae_scale_factor
        return FluxPipeline._unpack_latents(latents, pixels, pixels, pipe.vae_scale_factor)

    def latent_channels(self, pipe) -> int:
        return pipe.transformer.config.in_channels // 4
