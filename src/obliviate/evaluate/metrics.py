"""Numbers of the UnlearnCanvas protocol computed from judged generations.

- accuracy per kind: share of generated images whose judged concept of that kind matches
  the prompt;
- per-concept accuracy: the same, restricted to prompts naming that concept;
- unlearning accuracy UA(c) = 1 - accuracy(c) for a removed concept c;
- Fréchet distance between two feature sets,
  `d² = ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁^{1/2} Σ₂ Σ₁^{1/2})^{1/2})`.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch


def per_concept_accuracy(
    labels: list[dict[str, str]], predictions: dict[str, list[str]]
) -> dict[str, dict]:
    """`{concept: {"kind", "accuracy", "n"}}` for every concept named in `labels`.

    `labels[i]` maps kind -> concept named by prompt i; `predictions[kind][i]` is the judge's
    call for image i.
    """
    hits: dict[tuple[str, str], list[bool]] = defaultdict(list)
    for i, named in enumerate(labels):
        for kind, concept in named.items():
            hits[(kind, concept)].append(predictions[kind][i] == concept)
    return {
        concept: {"kind": kind, "accuracy": float(np.mean(h)), "n": len(h)}
        for (kind, concept), h in sorted(hits.items())
    }


def accuracy_by_kind(labels: list[dict[str, str]], predictions: dict[str, list[str]]) -> dict[str, float]:
    """Share of images whose judged concept matches the prompt, per kind named in prompts."""
    kinds = sorted({k for named in labels for k in named})
    return {
        k: float(np.mean([predictions[k][i] == named[k] for i, named in enumerate(labels) if k in named]))
        for k in kinds
    }


def _sqrtm_psd(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature sets `a` (N, D) and `b` (M, D)."""
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    root_a = _sqrtm_psd(cov_a)
    cross = _sqrtm_psd(root_a @ cov_b @ root_a)
    value = (mu_a - mu_b).pow(2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * torch.trace(cross)
    return float(value.clamp(min=0))
