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

    def __len__(self) -> int:
        return len(self.states)

    def expand(self, n: int) -> "Conditioning":
        """A one-prompt conditioning repeated for a batch of `n` (e.g. the empty prompt)."""
        return Conditioning(self.states.expand(n, *self.states.shape[1:]),
                            {k: v.expand(n, *v.shape[1:]) for k, v in self.extra.items()})

    def __getitem__(self, idx) -> "Conditioning":
        return Conditioning(self.states[idx], {k: v[idx] for k, v in self.extra.items()})

    @staticmethod
    def cat(parts: list["Conditioning"]) -> "Conditioning":
        """Rows of several conditionings, in order."""
        return Conditioning(torch.cat([p.states for p in parts]),
                            {k: torch.cat([p.extra[k] for p in parts]) for k in parts[0].extra})


Getter = Callable[[str], nn.Module]


class Family:
    """A model family (see the package docstring). Subclasses set the names and override
    `encode` / `predict` where the family differs from Stable Diffusion 1.x."""

    name = "abstract"
    pipeline_classes: tuple[str, ...] = ()
    denoiser = "unet"
    text_encoders: tuple[str, ...] = ("text_encoder",)
    tokenizers: tuple[str, ...] = ("tokenizer",)
    # the white-box text attacks (soft prompt, hard prompt, conditioning), resurgence
    # fine-tuning and --robust read one CLIP encoder and a plain UNet call
    text_attacks = True

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
        tok = getattr(pipe, tokenizer)
        return tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids

    def encode(self, pipe, prompts: list[str], get: Getter) -> Conditioning:  # pragma: no cover
        raise NotImplementedError

    def predict(self, denoiser: nn.Module, x_t: torch.Tensor, t: torch.Tensor,
                cond: Conditioning) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def check_text_attacks(self, what: str) -> None:
        """One-line refusal of `what` (an attack or --robust) where the family lacks them."""
        if not self.text_attacks:
            from ..errors import ObliviateError

            raise ObliviateError(f"{what} is built for Stable Diffusion 1.x/2.x (one CLIP text encoder) and not yet "
                                 f"for {self.name}; use --attacks paraphrase, or a Stable Diffusion 1.x/2.x model")
