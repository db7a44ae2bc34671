"""Model families: what methods need to know about a pipeline, one small file per family.

A method never reads a pipeline's internals; it asks the family (through the EraseContext)
to encode prompts, predict from noisy latents, name the weight components and the text
encoders. `family_of(pipe)` finds the family from the loaded pipeline's class.
- `sd` (sd.py): Stable Diffusion 1.x/2.x, one CLIP encoder, UNet, ε- or v-prediction;
- `sdxl` (sdxl.py): two CLIP encoders (penultimate states concatenated), pooled text
  embedding and size/crop ids as extra UNet conditioning;
- `sd3` (sd3.py): MMDiT transformer with joint attention, CLIP-L + CLIP-G + T5, rectified flow;
- `flux` (flux.py): CLIP pooled + T5 states, packed latents, rotary positions, guidance embedding.
"""

from __future__ import annotations

from ..errors import ObliviateError
from .base import Conditioning, Family
from .sd import StableDiffusion
from .flux import Flux
from .sd3 import StableDiffusion3
from .sdxl import StableDiffusionXL

FAMILIES: dict[str, Family] = {f.name: f for f in (StableDiffusion(), StableDiffusionXL(), StableDiffusion3(), Flux())}


def family_of(pipe) -> Family:
    """The family of a loaded pipeline, from its class name; one clear error for others."""
    cls = type(pipe).__name__
    for family in FAMILIES.values():
        if cls in family.pipeline_classes:
            return family
    known = ", ".join(c for f in FAMILIES.values() for c in f.pipeline_classes)
    raise ObliviateError(f"{cls} is not a model family obliviate supports yet ({known}); "
                         "load a Stable Diffusion 1.x/2.x, SDXL, SD3 or Flux pipeline")


def family_for_class(class_name: str) -> Family | None:
    """The family a pipeline class name (a `model_index.json` `_class_name`) belongs to."""
    return next((f for f in FAMILIES.values() if class_name in f.pipeline_classes), None)


__all__ = ["Conditioning", "Family", "FAMILIES", "family_of", "family_for_class"]
