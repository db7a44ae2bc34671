"""Named parameter groups of a Stable Diffusion pipeline, and freezing everything else.

Groups (the vocabulary of the erasure literature; on a transformer family (SD3) the model
family says what each means: `attn2-kv` is the text block's keys and values in joint
attention, `unet` the whole transformer):
- `attn2-kv`: key and value projections of every UNet cross-attention layer (UCE, DoCo,
  DUGE's default) — the only weights that read the text;
- `attn2`: all of cross-attention (ESD-x);
- `non-attn2`: the UNet without cross-attention (ESD-u);
- `non-attn2-deep`: the same in the deeper half of the UNet's resolution levels and its mid
  block (`Family.deep_levels`; the whole body of a transformer): where an object is laid
  out, not where textures and colours are drawn (`--robust`'s stage for an object);
- `unet`: the whole UNet (RGD);
- `text-mlp`: the MLPs (fc1, fc2) of every text-encoder layer (few-shot text-encoder
  unlearning); `text`: the whole text encoder (every text encoder of the family: SDXL's two);
- `lora`: LoRA adapters added with peft (only the adapters train).
A union is written with `+`: `attn2-kv+text` trains the cross-attention K/V and the text encoder.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..errors import ObliviateError

# the denoiser's groups; which tensors each takes is the model family's (families.base)
_DENOISER_GROUPS = ("attn2-kv", "attn2", "non-attn2", "non-attn2-deep", "unet")
_TEXT_RULES: dict[str, Callable[[str], bool]] = {
    "text-mlp": lambda n: ".mlp.fc1." in n or ".mlp.fc2." in n or ".DenseReluDense.w" in n,  # CLIP, T5
    "text": lambda n: True,
}
GROUPS = (*_DENOISER_GROUPS, *_TEXT_RULES, "lora")


def check_group(group: str) -> str:
    """`group`, a group name or a `+`-joined union of them (e.g. `attn2-kv+text-mlp`), checked."""
    parts = group.split("+") if isinstance(group, str) else [group]
    bad = [p for p in parts if p not in GROUPS]
    if bad or ("lora" in parts and len(parts) > 1):
        raise ObliviateError(f"unknown parameter group {bad[0] if bad else group!r}; choose from "
                             f"{', '.join(GROUPS)}, or join UNet and text groups with + (e.g. attn2-kv+text-mlp)")
    return group


def group_rules(pipe, group: str) -> list[tuple[nn.Module, str, Callable[[str], bool]]]:
    """The components a single UNet or text-encoder group lives in, their names, and the rule
    that picks the group's parameter names (a text group spans every text encoder)."""
    from ..families import family_of

    if group in _DENOISER_GROUPS:
        family = family_of(pipe)
        denoiser = getattr(pipe, family.denoiser)
        if group == "non-attn2-deep":
            body, deep = family.denoiser_rules["non-attn2"], family.deep_levels(denoiser)
            in_deep = (lambda n: body(n) and n.startswith(deep)) if deep else body
            return [(denoiser, family.denoiser, in_deep)]
        return [(denoiser, family.denoiser, family.denoiser_rules[group])]
    if group in _TEXT_RULES:
        return [(getattr(pipe, n), n, _TEXT_RULES[group]) for n in family_of(pipe).present_text_encoders(pipe)]
    raise ObliviateError(f"unknown parameter group {group!r}; choose from {', '.join(GROUPS)}")


def named_group(pipe, group: str) -> dict[str, nn.Parameter]:
    """Parameters of `group` (or of a `+`-joined union), keyed `unet.<name>` or `text_encoder.<name>`."""
    if "+" in group:
        check_group(group)
        found = {}
        for part in group.split("+"):
            found.update(named_group(pipe, part))
        return found
    if group == "lora":
        found = {f"{prefix}.{n}": p for prefix in trainable_components(pipe)
                 for n, p in getattr(pipe, prefix).named_parameters() if "lora_" in n}
        if not found:
            raise ObliviateError("no LoRA adapters on this model; add them with peft first")
        return found
    found = {f"{prefix}.{n}": p for module, prefix, rule in group_rules(pipe, group)
             for n, p in module.named_parameters() if rule(n)}
    if not found:
        raise ObliviateError(f"parameter group {group!r} is empty for this model")
    return found


def freeze_all_but(pipe, group: str) -> dict[str, nn.Parameter]:
    """Make only `group` trainable (requires_grad) in the whole pipeline; return it."""
    from ..families import family_of

    for name in family_of(pipe).components(pipe):
        getattr(pipe, name).requires_grad_(False)
    params = named_group(pipe, group)
    for p in params.values():
        p.requires_grad_(True)
    return params


def trainable_components(pipe) -> tuple[str, ...]:
    """The components a method may train: the denoiser and the text encoders (not the VAE)."""
    from ..families import family_of

    return tuple(n for n in family_of(pipe).components(pipe) if n != "vae")


def snapshot(params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """Detached copies of parameters (for pulls toward previous weights, deltas, rollback)."""
    return {n: p.detach().clone() for n, p in params.items()}
