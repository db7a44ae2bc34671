"""Refresh learning (seed 002): an unlearn-then-relearn step any gradient method can wrap.

Before each ordinary update, the current batch's loss gradient g gives one small "unlearn"
perturbation — normalised ascent, with noise, damped where the diagonal Fisher F says a
weight matters:
    θ ← θ + δ·(ĝ + σ·N(0, I)) / (1 + γ·F),   ĝ = g / ‖g‖,   F ← β·F + (1 − β)·g²,
then the method's ordinary "relearn" step runs at the perturbed point. The aim is flatter
minima and less forgetting of what must be kept over many requests. F is kept across
requests: it is stored beside the model (`refresh_fisher.safetensors`) and read back by the
next request of the lineage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FISHER_FILE = "refresh_fisher.safetensors"


@dataclass
class Refresh:
    """Settings and the running diagonal Fisher of the refresh plug-in."""

    delta: float = 1e-3
    sigma: float = 0.1
    gamma: float = 1e3
    beta: float = 0.9
    fisher: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @torch.no_grad()
    def unlearn(self, names: list[str], params: list[torch.Tensor], grads: list[torch.Tensor | None],
                generator: torch.Generator) -> None:
        """Apply the unlearn perturbation in place and update the Fisher estimate."""
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads if g is not None)) + 1e-12
        for name, p, g in zip(names, params, grads):
            if g is None:
                continue
            f = self.fisher.get(name)
            f = g.pow(2) if f is None else self.beta * f.to(g.device) + (1 - self.beta) * g.pow(2)
            self.fisher[name] = f
            noise = torch.randn(p.shape, generator=generator).to(p.device)
            p.add_(self.delta * (g / norm + self.sigma * noise) / (1 + self.gamma * f))

    def settings(self) -> dict:
        return {"delta": self.delta, "sigma": self.sigma, "gamma": self.gamma, "beta": self.beta}

    def save(self, folder: Path) -> None:
        if self.fisher:
            save_file({k: v.detach().cpu().contiguous() for k, v in self.fisher.items()}, Path(folder) / FISHER_FILE)

    @classmethod
    def from_folder(cls, folder: Path | None, **settings) -> "Refresh":
        """A Refresh carrying the Fisher a previous request left in `folder`, if any."""
        fisher = {}
        if folder and (Path(folder) / FISHER_FILE).exists():
            fisher = load_file(Path(folder) / FISHER_FILE)
        return cls(fisher=fisher, **settings)
