"""What every model family provides, and the conditioning object methods pass around."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn


@dataclass
class Conditioning:
    """A batch of encoded prompts: `states` (batch, tokens, width), what text→image attention
    reads and what UCE edits, and `extra`, per-row tensors the denoiser also takes (SDXL's
    pooled text embedding and size ids); empty for Stable Diffusion 1.x/2.x."""

    states: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def rows(self, idx: torch.Tensor) -> "Conditioning":
        """The conditioning of the batch rows `idx`."""
        return Conditioning(self.states[idx], {k: v[idx] for k, v in self.extra.items()})

    def expand(self, n: int) -> "Conditioning":
        """A one-prompt conditioning repeated for a batch of `n` (e.g. the empty prompt)."""
        return Conditioning(self.states.expand(n, *self.states.shape[1:]),
                            {k: v.expand(n, *v.shape[1:]) for k, v in self.extra.items()})

    @staticmethod
    def cat(parts: list["Conditioning"]) -> "Conditioning":
        """Several conditionings stacked along the batch, in order (one denoiser call for
        several sub-batches)."""
        return Conditioning(torch.cat([p.states for p in parts]),
                            {k: torch.cat([p.extra[k] for p in parts]) for k in parts[0].extra})


Getter = Callable[[str], nn.Module]


def clip_outputs(encoder: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate hidden states, pooled or projected output) of a CLIP text encoder on
    token ids, as the SDXL and SD3 pipelines read them."""
    out = encoder(ids, output_hidden_states=True)
    return out.hidden_states[-2], out[0]


class Family:
    """A model family (see the package docstring). Subclasses set the names and override
    `encode` / `predict` where the family differs from Stable Diffusion 1.x."""

    name = "abstract"
    pipeline_classes: tuple[str, ...] = ()
    denoiser = "unet"
    text_encoders: tuple[str, ...] = ("text_encoder",)
    tokenizers: tuple[str, ...] = ("tokenizer",)
    # the white-box text attacks (soft prompt, hard prompt, conditioning) and --robust's
    # soft-prompt mining read one CLIP encoder and a plain UNet call
    text_attacks = True
    # parameter groups of the denoiser (engine.params): which tensor names each one takes
    denoiser_rules = {
        "attn2-kv": lambda n: ".attn2.to_k." in n or ".attn2.to_v." in n,
        "attn2": lambda n: ".attn2." in n,
        "non-attn2": lambda n: ".attn2." not in n,
        "unet": lambda n: True,
    }

    def deep_levels(self, denoiser: nn.Module) -> tuple[str, ...] | None:
        """Name prefixes of the deeper half of a UNet's resolution levels (group
        `non-attn2-deep`): of n down blocks the last ⌊n/2⌋ (at least one), the mid block, and
        the first as many up blocks. The coarse levels lay out what is drawn (an object); the
        fine ones draw texture and colour. None for a denoiser with one resolution (a
        transformer), where the group is the whole body."""
        down = getattr(denoiser, "down_blocks", None)
        if down is None:
            return None
        deep = max(1, len(down) // 2)
        return (*(f"down_blocks.{i}." for i in range(len(down) - deep, len(down))), "mid_block.",
                *(f"up_blocks.{i}." for i in range(deep)))

    def body_convolutions(self, denoiser: nn.Module) -> dict[str, nn.Conv2d]:
        """The convolutions of the deeper levels (`deep_levels`) that `--robust`'s body edit
        maps (engine.body_edit; uce, and duge on an object request) and holds after a style's
        hardening stage (engine.body_hold): where an object is laid out. Empty for a
        transformer denoiser, whose body has no convolutions to map."""
        deep = self.deep_levels(denoiser)
        if deep is None:
            return {}
        return {n: m for n, m in denoiser.named_modules()
                if n.startswith(deep) and isinstance(m, nn.Conv2d) and m.groups == 1}

    def components(self, pipe) -> tuple[str, ...]:
        """Names of the weight-holding components present in `pipe`, in a fixed order (the
        ledger hashes them in this order): denoiser, text encoders, VAE."""
        names = (self.denoiser, *self.text_encoders, "vae")
        return tuple(n for n in names if getattr(pipe, n, None) is not None)

    def present_text_encoders(self, pipe) -> tuple[str, ...]:
        """The text encoders this pipeline has (SDXL's refiner has only the second)."""
        return tuple(n for n in self.text_encoders if getattr(pipe, n, None) is not None)

    def token_ids(self, pipe, prompts: list[str], tokenizer: str = "tokenizer") -> torch.Tensor:
        """Token ids padded to the tokenizer's length, as the pipelines tokenize."""
        from ..finetune import prompt_ids

        return prompt_ids(getattr(pipe, tokenizer), prompts)

    def clip_states(self, pipe, prompts: list[str], get: Getter, encoder: str, tokenizer: str):
        """(penultimate hidden states, pooled/projected output) of one CLIP encoder, the two
        things SDXL and SD3 condition on."""
        module = get(encoder)
        return clip_outputs(module, self.token_ids(pipe, prompts, tokenizer).to(module.device))

    # -- noise and what the denoiser predicts (DDPM: ε- or v-prediction) ----------------------
    def training_scheduler(self, pipe):
        """The schedule training noise is drawn on (DDPM from the pipeline's config)."""
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(pipe.scheduler.config)

    def add_noise(self, sched, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε."""
        return sched.add_noise(x0, noise, t)

    def target(self, sched, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the denoiser is trained to predict: ε, or v = √ᾱ_t·ε − √(1−ᾱ_t)·x_0."""
        if sched.config.prediction_type == "v_prediction":
            return sched.get_velocity(x0, noise, t)
        return noise

    def snr(self, sched, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio of x_t at integer t: ᾱ_t/(1−ᾱ_t)."""
        a = sched.alphas_cumprod[t.cpu()].float()
        return (a / (1 - a)).to(t.device)

    def x0(self, sched, x_t: torch.Tensor, pred: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The clean latent a prediction implies: (x_t − √(1−ᾱ)·ε)/√ᾱ, or √ᾱ·x_t − √(1−ᾱ)·v."""
        a = sched.alphas_cumprod.to(x_t.device)[t].view(-1, *[1] * (x_t.ndim - 1))
        if sched.config.prediction_type == "v_prediction":
            return a.sqrt() * x_t - (1 - a).sqrt() * pred
        return (x_t - (1 - a).sqrt() * pred) / a.sqrt()

    # -- where the text enters the denoiser ---------------------------------------------------
    def text_projections(self, denoiser: nn.Module) -> dict[str, nn.Linear]:
        """The linear layers that read the encoded prompt (UCE's closed-form edit): every
        cross-attention key and value projection of a UNet."""
        return {n: m for n, m in denoiser.named_modules() if n.endswith("attn2.to_k") or n.endswith("attn2.to_v")}

    def pooled_text_map(self, denoiser: nn.Module) -> nn.Module | None:
        """The module that reads the pooled prompt embedding (`cond.extra["pooled_projections"]`)
        into every block's modulation, where the family has one; a second way the text
        reaches the image, which a removal must edit too. None for a UNet."""
        return None

    def pack(self, pipe, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents (batch, c, h, w) in the layout the denoiser reads (Flux packs them)."""
        return latents

    def image_size(self, pipe) -> int:
        """Image side in pixels: the model's sampler height if it sets one (obliviate.json),
        else the denoiser's latent size times the VAE's scale."""
        from ..pipeline import sampler_settings

        height = sampler_settings(pipe).get("height")
        if height:
            return int(height)
        return self.native_size(pipe) * 2 ** (len(pipe.vae.config.block_out_channels) - 1)

    def native_size(self, pipe) -> int:
        """The denoiser's native latent side."""
        return getattr(pipe, self.denoiser).config.sample_size

    def latent_channels(self, pipe) -> int:
        """Channels of a latent image (before any packing)."""
        return getattr(pipe, self.denoiser).config.in_channels

    def unpack(self, pipe, latents: torch.Tensor) -> torch.Tensor:
        """Latents as the denoiser reads them, back to (batch, c, h, w) latent images."""
        return latents

    def encode(self, pipe, prompts: list[str], get: Getter) -> Conditioning:  # pragma: no cover
        raise NotImplementedError

    def predict(self, denoiser: nn.Module, x_t: torch.Tensor, t: torch.Tensor,
                cond: Conditioning) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def check_text_attacks(self, what: str, instead: str = "use --attacks paraphrase") -> None:
        """One-line refusal of `what` (an attack or --robust's soft-prompt mining) where the
        family lacks them, saying what to do `instead`."""
        if not self.text_attacks:
            from ..errors import ObliviateError

            raise ObliviateError(f"{what} is built for Stable Diffusion 1.x/2.x (one CLIP text encoder) and not yet "
                                 f"for {self.name}; {instead}, or a Stable Diffusion 1.x/2.x model")
