"""Stable Diffusion 3 / 3.5 (MMDiT): CLIP-L and CLIP-G penultimate states concatenated and
zero-padded to T5's width, followed along the sequence by T5's states (zeros when the
pipeline has no T5, as `StableDiffusion3Pipeline` does; as many as the model's sampler
`max_sequence_length`, the pipeline's 256 unless the model sets it, as `shapes-sd3` does
with 0); pooled = both CLIP pooled outputs.
Rectified flow: x_t = (1 − σ)·x_0 + σ·ε, the transformer predicts ε − x_0 at timestep 1000·σ.

Choices (the sources are silent): training draws σ = (t + 1)/1000 for the engine's uniform
integer t (no logit-normal or shift: the erasure loss wants every noise level); the text
that image queries read is the text block of joint attention (`add_k_proj`/`add_v_proj`,
group `attn2-kv`), and UCE's closed form edits `context_embedder`, the one linear map from
the encoders' states into the transformer (the reference UCE-Flux script's choice). The
pooled embedding reaches every block through `time_text_embed.text_embedder`
(`pooled_text_map`), which the `attn2` group (ESD-x) includes and DUGE and UCE edit in
closed form (`engine/closed_form.py`): on `shapes-sd3` it alone decides the object (star
prompts with circle's pooled embedding drew no star in 48; DUGE without it left star at
0.17, docs/experiments.md)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Conditioning, Family

T5_TOKENS = 256
POOLED = "time_text_embed.text_embedder."  # reads the pooled CLIP embedding into every block


def t5_tokens(pipe) -> int:
    """T5 tokens the pipeline conditions on: the model's sampler `max_sequence_length`
    (obliviate.json), else the pipeline's default."""
    from ..pipeline import sampler_settings

    return int(sampler_settings(pipe).get("max_sequence_length", T5_TOKENS))


class FlowMatching(Family):
    """Rectified-flow training (SD3, Flux): σ from the engine's integer t."""

    time_scale = 1000.0  # the transformer's timestep is time_scale·σ (SD3 1000·σ, Flux σ)

    def training_scheduler(self, pipe):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)

    @staticmethod
    def sigma(sched, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """σ ∈ (0, 1] for integer t, shaped to broadcast over `like`."""
        s = (t.float() + 1) / sched.config.num_train_timesteps
        return s.to(like.device, like.dtype).view(-1, *[1] * (like.ndim - 1))

    def add_noise(self, sched, x0, noise, t):
        s = self.sigma(sched, t, x0)
        return (1 - s) * x0 + s * noise

    def target(self, sched, x0, noise, t):
        return noise - x0

    def snr(self, sched, t):
        """Signal-to-noise ratio of x_t = (1 − σ)·x_0 + σ·ε: ((1 − σ)/σ)²."""
        s = self.sigma(sched, t, t.float())
        return ((1 - s) / s) ** 2

    def x0(self, sched, x_t, pred, t):
        return x_t - self.sigma(sched, t, x_t) * pred

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """The transformer's timestep for integer t: time_scale·σ, σ = (t + 1)/1000."""
        return (t.float() + 1) / 1000 * self.time_scale


class StableDiffusion3(FlowMatching):
    name = "sd3"
    pipeline_classes = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline")
    denoiser = "transformer"
    text_encoders = ("text_encoder", "text_encoder_2", "text_encoder_3")
    tokenizers = ("tokenizer", "tokenizer_2", "tokenizer_3")
    text_attacks = False
    denoiser_rules = {
        "attn2-kv": lambda n: ".attn.add_k_proj." in n or ".attn.add_v_proj." in n,
        "attn2": lambda n: ".attn.add_" in n or ".attn.to_add_out." in n or n.startswith(POOLED),
        "non-attn2": lambda n: not (".attn.add_" in n or ".attn.to_add_out." in n or n.startswith(POOLED)),
        "unet": lambda n: True,
    }

    def encode(self, pipe, prompts, get):
        clip, pooled = zip(*(self.clip_states(pipe, prompts, get, enc, tok)
                             for enc, tok in zip(self.text_encoders[:2], self.tokenizers[:2])))
        clip_states = torch.cat(clip, dim=-1)
        width = pipe.transformer.config.joint_attention_dim
        length = t5_tokens(pipe)
        if getattr(pipe, "text_encoder_3", None) is not None:
            encoder = get("text_encoder_3")
            tok = pipe.tokenizer_3
            ids = tok(prompts, padding="max_length", max_length=length, truncation=True,
                      add_special_tokens=True, return_tensors="pt").input_ids
            t5 = encoder(ids.to(encoder.device))[0]
        else:
            t5 = clip_states.new_zeros(len(prompts), length, width)
        states = torch.cat([F.pad(clip_states, (0, t5.shape[-1] - clip_states.shape[-1])), t5], dim=-2)
        return Conditioning(states, {"pooled_projections": torch.cat(pooled, dim=-1)})

    def predict(self, denoiser, x_t, t, cond):
        return denoiser(hidden_states=x_t, timestep=self.model_time(t).to(x_t.device),
                        encoder_hidden_states=cond.states, pooled_projections=cond.extra["pooled_projections"]).sample

    def text_projections(self, denoiser):
        return {"context_embedder": denoiser.context_embedder}

    def pooled_text_map(self, denoiser):
        return denoiser.time_text_embed.text_embedder
