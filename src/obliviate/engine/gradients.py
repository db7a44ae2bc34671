"""Gradient surgery shared by methods: restricted gradients (RGD) and conflict projection (DoCo).

Gradients are lists of tensors aligned with the trained parameters.
"""

from __future__ import annotations

import torch


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


def restricted_gradient(g_forget: list[torch.Tensor], g_remain: list[torch.Tensor],
                        alpha: float) -> list[torch.Tensor]:
    """RGD's mutual projection, over all parameters flattened together.

    If g_f·g_r < 0: g_f ← g_f − (g_f·g_r/‖g_r‖²) g_r and g_r ← g_r − (g_f·g_r/‖g_f‖²) g_f
    (both from the original pair); the step is along g_f + α·g_r.
    """
    dot = _dot(g_forget, g_remain)
    if dot < 0:
        nf, nr = _dot(g_forget, g_forget), _dot(g_remain, g_remain)
        f = [gf - dot / (nr + 1e-12) * gr for gf, gr in zip(g_forget, g_remain)]
        r = [gr - dot / (nf + 1e-12) * gf for gf, gr in zip(g_forget, g_remain)]
        g_forget, g_remain = f, r
    return [gf + alpha * gr for gf, gr in zip(g_forget, g_remain)]


def project_conflicts(g_main: list[torch.Tensor], g_keep: list[torch.Tensor]) -> list[torch.Tensor]:
    """DoCo's concept-preserving gradient, per tensor: where cos(g_main, g_keep) < 0, remove
    from g_main its component along g_keep; returns g_main' + g_keep."""
    out = []
    for gm, gk in zip(g_main, g_keep):
        dot = (gm * gk).sum()
        if dot < 0:
            gm = gm - dot / (gk.pow(2).sum() + 1e-12) * gk
        out.append(gm + gk)
    return out
