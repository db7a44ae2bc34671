"""Train a method's parameter group through LoRA adapters (peft), then fold them in.

With a method's `lora_rank` R > 0, every Linear and Conv2d layer whose weight is in the
method's parameter group gets a peft LoRA adapter of rank R (α = R, so the scale is 1), and
only the adapters train: the layer computes W₀x + B·A·x with A (R × in) Gaussian-initialised
and B (out × R) zero, so the model starts unchanged. When the request ends the adapters are
merged (W ← W₀ + B·A) and removed, so every output is plain weights like any other request;
each changed tensor then differs from its parent by a matrix of rank ≤ R, which
`obliviate export --format lora --rank R` reproduces exactly (for a one-request lineage).
Biases and norms of the group do not train in this mode.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..errors import ObliviateError
from .params import check_group, group_rules, trainable_components

ADAPTER = "obliviate"


def _layers(module: nn.Module, rule) -> list[str]:
    """Names of the Linear/Conv2d layers of `module` whose weight `rule` selects."""
    return [name for name, layer in module.named_modules()
            if isinstance(layer, (nn.Linear, nn.Conv2d)) and rule(f"{name}.weight")]


def add_lora(pipe, group: str, rank: int) -> None:
    """Put a rank-`rank` LoRA adapter on every Linear/Conv2d of `group` (UNet or text encoder
    groups, or a `+`-joined union of them)."""
    for part in check_group(group).split("+"):
        if part == "lora":
            raise ObliviateError("lora_rank applies to a UNet or text-encoder group, not 'lora'")
        for module, _, rule in group_rules(pipe, part):
            targets = _layers(module, rule)
            if not targets:
                raise ObliviateError(f"parameter group {part!r} has no Linear or Conv2d layer for a LoRA")
            config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=targets)
            inject_adapter_in_model(config, module, adapter_name=ADAPTER)


@torch.no_grad()
def merge_lora(pipe) -> int:
    """Fold every adapter into its layer's weight (W ← W₀ + B·A) and put the plain layer back;
    returns how many layers were merged."""
    merged = 0
    for prefix in trainable_components(pipe):
        root = getattr(pipe, prefix)
        wrapped = [(name, layer) for name, layer in root.named_modules() if isinstance(layer, BaseTunerLayer)]
        for name, layer in wrapped:
            layer.merge(adapter_names=[ADAPTER])
            parent_name, _, child = name.rpartition(".")
            parent = root.get_submodule(parent_name) if parent_name else root
            setattr(parent, child, layer.get_base_layer())
            merged += 1
    return merged
