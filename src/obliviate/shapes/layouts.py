"""The denoiser layouts `obliviate train-base --family` trains on the shapes world.

- `sd` (the shipped `shapes` model): one CLIP text encoder (last hidden states), a UNet with
  cross-attention, ε-prediction on Stable Diffusion's DDPM schedule, Min-SNR-5 weighting.
- `sd3` (`shapes-sd3`): two CLIP text encoders with projection (penultimate states
  concatenated, pooled outputs concatenated) and no T5, an SD3 MMDiT transformer with joint
  attention, rectified flow x_t = (1 − σ)·x_0 + σ·ε with target ε − x_0, unweighted.

The training step noises, predicts and takes its target through the model family
(obliviate.families), the interface the erasure methods use, so the model is trained on
exactly the conditioning and noise the methods later see. Choices the SD3 source leaves
open at this size: σ uniform (the family's (t + 1)/1000, as the erasure methods draw it,
not SD3's logit-normal), no timestep shift (16x16 latents), and no T5 tokens at all: the
pipeline's 256 zero tokens made a training step 4.5x slower on CPU, so the model's
sampler sets `max_sequence_length` 0 (pass it to a plain diffusers pipeline too).
"""

from __future__ import annotations

import torch
from diffusers import (
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ..families import FAMILIES, Conditioning
from ..families.base import clip_outputs
from . import world
from .tokenizer import MAX_LENGTH


def clip_config(tok, width: int = 64) -> CLIPTextConfig:
    """A 3-layer, `width`-wide CLIP text transformer over the world's tokenizer."""
    return CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id,
        projection_dim=width,
    )


class UNetLayout:
    """The shipped model: Stable Diffusion 1.x's layout at 32x32 pixels."""

    family = "sd"
    encoders = ("text",)  # checkpoint names; pipeline components in the same order: text_encoder
    components = ("text_encoder",)
    sampler = {"num_inference_steps": 20, "guidance_scale": 5.0}
    loading = "`StableDiffusionPipeline.from_pretrained(folder)`"

    def build_encoders(self, tok) -> list[torch.nn.Module]:
        """Fresh text encoders, in the order of `components`."""
        return [CLIPTextModel(clip_config(tok))]

    def load_encoders(self, folder) -> list[torch.nn.Module]:
        """The text encoders of a model folder of this layout (--init-from)."""
        return [CLIPTextModel.from_pretrained(folder / "text_encoder")]

    def pooled_width(self, encoders) -> int:
        """Width of the pooled text the concept heads classify."""
        return encoders[0].config.hidden_size

    def build_denoiser(self, encoders, latent_channels: int) -> UNet2DConditionModel:
        """A 16x16 UNet with cross-attention at 8x8 and 4x4 (and the 4x4 mid block); 4.1 M
        parameters. The 16x16 level has no attention: on 2 CPU cores its 256-token
        self-attention cost more than half of every training step (1.62 s against 0.74 s at
        batch 64), and at this size the convolutions already see the whole object."""
        return UNet2DConditionModel(
            sample_size=world.IMAGE_SIZE // 2,
            in_channels=latent_channels,
            out_channels=latent_channels,
            layers_per_block=1,
            block_out_channels=(32, 64, 128),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=encoders[0].config.hidden_size,
            attention_head_dim=4,
            norm_num_groups=16,
        )

    def load_denoiser(self, folder) -> UNet2DConditionModel:
        """The denoiser of a model folder of this layout (--init-from)."""
        return UNet2DConditionModel.from_pretrained(folder / "unet")

    def training_scheduler(self) -> DDPMScheduler:
        """Stable Diffusion's training noise schedule (scaled-linear betas, epsilon target)."""
        return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                             beta_end=0.012, prediction_type="epsilon", clip_sample=False, steps_offset=1)

    def condition(self, encoders, ids) -> tuple[Conditioning, torch.Tensor]:
        """(what the denoiser reads, the pooled text the auxiliary heads classify)."""
        out = encoders[0](ids)
        return Conditioning(out.last_hidden_state), out.pooler_output

    def loss_weight(self, sched, t) -> torch.Tensor:
        """Min-SNR-5 for ε-prediction: min(SNR_t, 5)/SNR_t (Hang et al. 2023)."""
        snr = FAMILIES[self.family].snr(sched, t)
        return torch.clamp(snr, max=5.0) / snr

    def assemble(self, vae, denoiser, encoders, tokenizer) -> StableDiffusionPipeline:
        """A standard StableDiffusionPipeline around the parts, with a DPM-Solver++ sampler."""
        scheduler = DPMSolverMultistepScheduler.from_config(self.training_scheduler().config)
        return StableDiffusionPipeline(vae=vae, text_encoder=encoders[0], tokenizer=tokenizer, unet=denoiser,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)


class MMDiTLayout(UNetLayout):
    """`shapes-sd3`: Stable Diffusion 3's layout at 32x32 pixels, without T5."""

    family = "sd3"
    encoders = ("text", "text_2")
    components = ("text_encoder", "text_encoder_2")
    sampler = {"num_inference_steps": 20, "guidance_scale": 5.0, "max_sequence_length": 0}
    loading = ("`StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)`, "
               "called with `max_sequence_length=0` (it was trained without T5 tokens)")

    def build_encoders(self, tok) -> list[torch.nn.Module]:
        """Two fresh CLIP encoders with projection (SD3's CLIP-L and CLIP-G places)."""
        return [CLIPTextModelWithProjection(clip_config(tok)) for _ in self.encoders]

    def load_encoders(self, folder) -> list[torch.nn.Module]:
        """Both text encoders of a `shapes-sd3` folder (--init-from)."""
        return [CLIPTextModelWithProjection.from_pretrained(folder / c) for c in self.components]

    def pooled_width(self, encoders) -> int:
        """Both projected pooled outputs, concatenated (SD3's pooled_projections)."""
        return sum(e.config.projection_dim for e in encoders)

    def build_denoiser(self, encoders, latent_channels: int) -> SD3Transformer2DModel:
        """An MMDiT over 2x2 patches of the 16x16 latent (64 image tokens): 6 joint blocks,
        4 heads of 32; 3.5 M parameters, a training step as long as the UNet's on CPU."""
        width = sum(e.config.hidden_size for e in encoders)
        return SD3Transformer2DModel(
            sample_size=world.IMAGE_SIZE // 2, patch_size=2, in_channels=latent_channels,
            out_channels=latent_channels, num_layers=6, attention_head_dim=32, num_attention_heads=4,
            joint_attention_dim=width, caption_projection_dim=128, pooled_projection_dim=self.pooled_width(encoders),
            pos_embed_max_size=world.IMAGE_SIZE // 4)

    def load_denoiser(self, folder) -> SD3Transformer2DModel:
        """The transformer of a `shapes-sd3` folder (--init-from)."""
        return SD3Transformer2DModel.from_pretrained(folder / "transformer")

    def training_scheduler(self) -> FlowMatchEulerDiscreteScheduler:
        """Rectified flow without a timestep shift."""
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)

    def condition(self, encoders, ids) -> tuple[Conditioning, torch.Tensor]:
        """As StableDiffusion3Pipeline encodes (obliviate.families.sd3), with no T5 tokens."""
        hidden, pooled = zip(*(clip_outputs(e, ids) for e in encoders))
        states, pooled = torch.cat(hidden, dim=-1), torch.cat(pooled, dim=-1)
        return Conditioning(states, {"pooled_projections": pooled}), pooled

    def loss_weight(self, sched, t) -> torch.Tensor:
        """1: the rectified-flow loss unweighted (σ is drawn uniformly)."""
        return torch.ones(len(t), device=t.device)

    def assemble(self, vae, denoiser, encoders, tokenizer) -> StableDiffusion3Pipeline:
        """A standard StableDiffusion3Pipeline (no T5) with the Euler flow sampler; the VAE
        gets SD3's `shift_factor` entry (0: latents scaled as Stable Diffusion's, not shifted)."""
        if vae.config.get("shift_factor") is None:
            vae.register_to_config(shift_factor=0.0)
        return StableDiffusion3Pipeline(transformer=denoiser, scheduler=self.training_scheduler(), vae=vae,
                                        text_encoder=encoders[0], tokenizer=tokenizer, text_encoder_2=encoders[1],
                                        tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None)


LAYOUTS = {"sd": UNetLayout(), "sd3": MMDiTLayout()}


def layout(family: str):
    """The layout `train-base --family` names (one clear error for others)."""
    if family not in LAYOUTS:
        from ..errors import ObliviateError

        raise ObliviateError(f"train-base --family {family!r}: choose one of {', '.join(LAYOUTS)}")
    return LAYOUTS[family]
