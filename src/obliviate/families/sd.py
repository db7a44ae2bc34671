"""Stable Diffusion 1.x/2.x: one CLIP text encoder (last hidden states), a UNet that reads
them through `attn2`, ε- or v-prediction (the scheduler's `prediction_type`)."""

from __future__ import annotations

import torch

from .base import Conditioning, Family


class StableDiffusion(Family):
    name = "sd"
    pipeline_classes = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")

    def encode(self, pipe, prompts, get):
        """Last hidden states of the text encoder, as `StableDiffusionPipeline` conditions."""
        encoder = get("text_encoder")
        return Conditioning(encoder(self.token_ids(pipe, prompts).to(encoder.device))[0])

    def predict(self, denoiser, x_t, t, cond):
        return denoiser(x_t, t, cond.states).sample
