"""The Method protocol and the registry of methods by name.

A gradient method says which parameters it trains (`param_group`), how to build a batch
(`batch`), which named loss terms to minimise (`loss`), and optionally how to combine their
gradients (`combine`, for gradient surgery). A closed-form method edits weights directly
(`apply`). Methods never own a loop, never write files, never parse arguments.
"""

from __future__ import annotations

import math
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
    # option values the method takes under --robust unless the user sets them, and the
    # plug-in's own settings (engine.robust.Robust) it takes for this method
    robust_defaults: ClassVar[dict] = {}
    robust_settings: ClassVar[dict] = {}
    # Declared ranges of options (checked when the method is built): the smallest value of
    # the options below; `lr` must be above 0; every other number must be finite and >= 0.
    option_minimum: ClassVar[dict[str, int]] = {
        "steps": 1, "batch_size": 1, "shots": 1, "prompts_per_target": 1, "pairs_per_target": 1}
    # Options that take one of a few words.
    option_choices: ClassVar[dict[str, tuple]] = {}

    def configure(self, request) -> None:
        """Settle choices that depend on the (resolved) request, e.g. ESD's variant, before
        the settings are recorded; runs before `prepare`."""

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

    def step_budget(self) -> int:
        """The most optimiser steps the loop may run (`should_stop` may end it sooner)."""
        return self.steps

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


_BASE_TYPES = {"steps": "int", "lr": "float", "batch_size": "int"}
_KINDS = {"int": int, "float": float, "str": str, "bool": bool, "None": type(None)}


def _type_names(annotation) -> list[str]:
    """`"float | None"` (or the type itself) to `["float", "None"]`."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    return [part.strip().replace("NoneType", "None") for part in text.split("|")]


def check_option(cls, key: str, value, annotation):
    """`value` of option `key` of method class `cls`, checked against its declared type and
    range; ints are accepted where a float is declared. One-line error otherwise."""
    kinds = _type_names(annotation)
    what = f"method {cls.name!r} option {key}"
    ok = False
    for kind in kinds:
        if kind == "bool":
            ok = ok or isinstance(value, bool)
        elif kind == "int":
            ok = ok or (isinstance(value, int) and not isinstance(value, bool))
        elif kind == "float":
            ok = ok or (isinstance(value, (int, float)) and not isinstance(value, bool))
        elif kind in _KINDS:
            ok = ok or isinstance(value, _KINDS[kind])
        else:
            ok = True  # a type this check does not know: left to the method
    if not ok:
        wanted = " or ".join("null" if k == "None" else ("a number" if k == "float" else
                             ("an integer" if k == "int" else ("true/false" if k == "bool" else "text")))
                             for k in kinds)
        raise ObliviateError(f"{what} must be {wanted}, not {value!r} (e.g. --set {key}=...)")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ObliviateError(f"{what} must be a finite number, not {value!r}")
        if key == "lr" and value <= 0:
            raise ObliviateError(f"{what} (learning rate) must be above 0, not {value!r}")
        low = cls.option_minimum.get(key, 0)
        if value < low:
            raise ObliviateError(f"{what} must be at least {low}, not {value!r}")
    if key == "param_group":
        from ..engine.params import check_group

        try:
            check_group(value)
        except ObliviateError as exc:
            raise ObliviateError(f"{what}: {exc}") from None
        choices = None
    else:
        choices = cls.option_choices.get(key)
    if choices and value not in choices:
        raise ObliviateError(f"{what} must be one of {', '.join(map(repr, choices))}, not {value!r}")
    return value


def get_method(name: str, **options):
    """Instantiate method `name` with `options` (its config fields), each checked against its
    declared type and range (`check_option`); one-line errors."""
    names = method_names()
    if not isinstance(name, str) or name not in REGISTRY:
        raise ObliviateError(f"unknown method {name!r}; choose from {', '.join(names)}")
    cls = REGISTRY[name]
    declared = {f.name: f.type for f in fields(cls) if not f.name.startswith("_")} if is_dataclass(cls) else {}
    unknown = set(options) - set(declared)
    if unknown:
        raise ObliviateError(f"method {name!r} has no option {sorted(unknown)[0]!r}; "
                             f"it has: {', '.join(sorted(declared))}")
    for key, value in options.items():
        check_option(cls, key, value, declared[key])
    return cls(**options)


def set_common(method, steps=None, lr=None, batch_size=None) -> None:
    """Apply `--steps/--lr/--batch-size` to a built method, with the same checks as options."""
    for key, value in (("steps", steps), ("lr", lr), ("batch_size", batch_size)):
        if value is not None:
            check_option(type(method), key, value, _BASE_TYPES[key])
            setattr(method, key, value)
