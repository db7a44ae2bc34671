"""φ without a second model: a frozen view of a component whose trained tensors are few.

A method reads φ (the model before this request) beside θ. Copying a whole UNet or
transformer for that doubles the memory a request needs, though most methods train a small
group (DUGE, UCE and DoCo the cross-attention K/V: a few percent of the UNet). A
`FrozenView` keeps only copies of the tensors being trained and calls the live module with
them put back (`torch.func.functional_call`), under no_grad: the same numbers as a copy,
since every other tensor is frozen and so still φ's. Used when the trained tensors are under
half of a component; otherwise (ESD-u, RGD, LoRA adapters that change the module) the
component is copied whole.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

LIGHT_BELOW = 0.5


class WithParams:
    """Calls `module` with `params` ({parameter name: tensor}) in place of its own
    (torch.func.functional_call, gradients flowing to them); other attributes (`config`,
    `dtype`) are the module's. FreezeAsGuard's mixed weights go through it."""

    def __init__(self, module: nn.Module, params: dict[str, torch.Tensor]):
        self.module, self.saved = module, params

    def __call__(self, *args, **kwargs):
        return functional_call(self.module, self.saved, args, kwargs, strict=False)

    def __getattr__(self, name):
        return getattr(self.module, name)


class FrozenView(WithParams):
    """Calls `module` with `saved` ({parameter name: φ's tensor}) in place of its own, under
    no_grad."""

    def __call__(self, *args, **kwargs):
        with torch.no_grad():
            return super().__call__(*args, **kwargs)


def frozen_view(module: nn.Module, trained: set[str] | None) -> FrozenView | None:
    """A view of `module` as it is now, if the tensors in `trained` (its own parameter names)
    are under `LIGHT_BELOW` of its weights; None when a full copy is the better φ."""
    if trained is None:
        return None
    params = dict(module.named_parameters())
    size = sum(p.numel() for n, p in params.items() if n in trained)
    if size >= LIGHT_BELOW * sum(p.numel() for p in params.values()):
        return None
    return FrozenView(module, {n: params[n].detach().clone() for n in trained})
