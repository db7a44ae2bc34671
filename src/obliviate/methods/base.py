"""The Method protocol and the registry of methods by name.

A gradient method says which parameters it trains (`param_group`), how to build a batch
(`batch`), which named loss terms to minimise (`loss`), and optionally how to combine their
gradients (`combine`, for gradient surgery). A closed-form method edits weights directly
(`apply`). Methods never own a loop, never write files, never parse arguments.
"""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from typing import Callable, ClassVar

import torch

from ..errors import ObliviateError

REGISTRY: dict[str, type] = {}


def register(cls):
    """Class decorator: make a method selectable by its `name`."""
    REGISTRY[cls.name] = cls
    return cls


class Method:
    """Base of gradient methods. Subclasses set the class attributes and `loss`."""

    name: ClassVar[str] = "abstract"
    closed_form: ClassVar[bool] = False
    param_group: str = "attn2-kv"
    steps: int = 100
    lr: float = 1e-4
    batch_size: int = 8
    max_grad_norm: float | None = 1.0
    combine: Callable | None = None
    # where the forget prompts sit in a batch: (sub-batch key or None for the batch itself,
    # field); the --robust plug-in substitutes mined soft prompts there
    forget_prompts: ClassVar[tuple[tuple[str | None, str], ...]] = ()
    # option values the method takes under --robust unless the user sets them
    robust_defaults: ClassVar[dict] = {}

    def prepare(self, ctx) -> None:
        """Build prompts and cached data, take frozen copies; runs before any update."""

    def batch(self, ctx, batch_size: int, generator: torch.Generator) -> dict:
        """The full (unsharded) batch of this step, with every random draw in it (noise,
        timesteps: `ctx.draw`), so that processes sharing the work see the same numbers."""
        raise NotImplementedError

    def loss(self, ctx, batch: dict) -> dict[str, torch.Tensor]:
        """Named, already weighted loss terms; the engine minimises their sum."""
        raise NotImplementedError

    def after_step(self, ctx, step: int, terms: dict) -> None:
        """Hook after the optimiser step (e.g. a discriminator update)."""

    def should_stop(self, ctx, step: int, terms: dict) -> bool:
        """Early stop (e.g. a bound on the forget loss)."""
        return False

    def state(self) -> dict[str, torch.Tensor]:
        """Extra tensors to checkpoint (e.g. a discriminator's weights)."""
        return {}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of `state`."""

    def settings(self) -> dict:
        """The method's configuration, recorded in the ledger."""
        keys = ("param_group", "steps", "lr", "batch_size")
        out = {k: getattr(self, k) for k in keys if hasattr(self, k)}
        if is_dataclass(self):
            out.update({f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")})
        return out


def method_names() -> list[str]:
    """Names of every registered method."""
    from . import doco, duge, esd, fewshot_te, rgd, uce  # noqa: F401  (registration side effects)

    return sorted(REGISTRY)


def get_method(name: str, **options):
    """Instantiate method `name` with `options` (its config fields); one-line errors."""
    names = method_names()
    if name not in REGISTRY:
        raise ObliviateError(f"unknown method {name!r}; choose from {', '.join(names)}")
    cls = REGISTRY[name]
    known = {f.name for f in fields(cls)} if is_dataclass(cls) else set()
    unknown = set(options) - known
    if unknown:
        raise ObliviateError(f"method {name!r} has no option {sorted(unknown)[0]!r}; "
                             f"it has: {', '.join(sorted(known))}")
    return cls(**options)
