"""SDXL: two CLIP text encoders whose penultimate hidden states are concatenated (the
cross-attention context, 2048 wide in the real model), the second encoder's projected pooled
embedding, and the size/crop ids (original size, crop corner, target size), both passed to
the UNet as `added_cond_kwargs` — as `StableDiffusionXLPipeline` does for text-to-image.

Choice: the ids describe an uncropped square picture at the UNet's native resolution
(original = target = sample_size × VAE scale, crop (0, 0)), the pipeline's default."""

from __future__ import annotations

import torch

from .base import Conditioning, Family


class StableDiffusionXL(Family):
    name = "sdxl"
    pipeline_classes = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")
    text_encoders = ("text_encoder", "text_encoder_2")
    tokenizers = ("tokenizer", "tokenizer_2")
    text_attacks = False

    def encode(self, pipe, prompts, get):
        """cat(penultimate states of each encoder), pooled embedding of the last encoder."""
        states, pooled = [], None
        for enc_name, tok_name in zip(self.text_encoders, self.tokenizers):
            if getattr(pipe, enc_name, None) is not None:
                hidden, pooled = self.clip_states(pipe, prompts, get, enc_name, tok_name)
                states.append(hidden)
        size = self.image_size(pipe)
        ids = torch.tensor([size, size, 0, 0, size, size], dtype=states[0].dtype, device=states[0].device)
        extra = {"text_embeds": pooled, "time_ids": ids.expand(len(prompts), -1)}
        return Conditioning(torch.cat(states, dim=-1), extra)

    def predict(self, denoiser, x_t, t, cond):
        return denoiser(x_t, t, cond.states, added_cond_kwargs=cond.extra).sample
