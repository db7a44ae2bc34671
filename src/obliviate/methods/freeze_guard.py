"""FreezeAsGuard (seed 002): learn which UNet tensors to freeze so re-learning a removed
concept by fine-tuning adapts poorly, while fine-tuning on legal data still works.

Bilevel, per-tensor soft mask m = σ(x / T):
- lower level (the user's fine-tuning, simulated): θ_ft starts at the released weights
  θ_pre and takes `inner_steps` Adam steps on a mix of illegal and legal data;
- upper level: with θ_mix = m·θ_pre + (1 − m)·θ_ft,
      min_x  L_legal(θ_mix) − λ·L_illegal(θ_mix) + c·(ρ − mean_params(m))²,
  i.e. freeze the tensors whose fine-tuning helps the illegal domain most and the legal
  domain least, at a frozen fraction ρ (by parameter count).
The result is a binary mask: the highest-m tensors up to ρ of the parameters. Choice: the
lower level is re-run from θ_pre every round (a fresh simulated user), which keeps the
mask from fitting one fine-tuning trajectory.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..engine.data import encode_images
from ..families import family_of
from ..finetune import denoising_loss, encode_captions

GUARD_FILE = "guard_mask.json"


@dataclass(frozen=True)
class GuardMask:
    """The frozen UNet tensors, the fraction of parameters they hold, and their scores."""

    frozen: tuple[str, ...]
    rho: float
    frozen_fraction: float
    scores: dict[str, float]

    def save(self, folder: Path) -> None:
        (Path(folder) / GUARD_FILE).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, folder: Path) -> "GuardMask | None":
        path = Path(folder) / GUARD_FILE
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        return cls(tuple(data["frozen"]), data["rho"], data["frozen_fraction"], data["scores"])


@dataclass
class FreezeAsGuard:
    """Settings of the mask learning (names follow METHODS.md)."""

    rho: float = 0.5
    rounds: int = 8
    inner_steps: int = 8
    inner_lr: float = 3e-4
    mask_steps: int = 4
    mask_lr: float = 0.2
    temperature: float = 1.0
    lambda_illegal: float = 1.0
    sparsity: float = 10.0
    batch_size: int = 8
    seed: int = 0

    def learn(self, pipe, illegal, legal, progress: bool = True) -> GuardMask:
        """Learn the mask for the pipeline's denoiser (UNet or transformer) from illegal and
        legal `Captioned` data."""
        family = family_of(pipe)
        denoiser = getattr(pipe, family.denoiser)
        model = (family, denoiser, family.training_scheduler(pipe))  # what every loss below runs on
        names = [n for n, _ in denoiser.named_parameters()]
        pre = {n: p.detach().clone() for n, p in denoiser.named_parameters()}
        sizes = torch.tensor([pre[n].numel() for n in names], dtype=torch.float32)
        logits = torch.zeros(len(names), requires_grad=True)
        mask_opt = torch.optim.Adam([logits], lr=self.mask_lr)
        data = {k: self._encode(pipe, d) for k, d in (("illegal", illegal), ("legal", legal))}
        gen = torch.Generator().manual_seed(self.seed)
        for _ in tqdm(range(self.rounds), desc="guard", disable=not progress):
            ft = self._simulate_finetune(model, pre, names, data, gen)
            for _ in range(self.mask_steps):
                m = torch.sigmoid(logits / self.temperature)
                mixed = {n: m[i] * pre[n] + (1 - m[i]) * ft[n] for i, n in enumerate(names)}
                legal_loss = self._loss(model, mixed, data["legal"], gen)
                illegal_loss = self._loss(model, mixed, data["illegal"], gen)
                frac = (m * sizes).sum() / sizes.sum()
                upper = legal_loss - self.lambda_illegal * illegal_loss + self.sparsity * (self.rho - frac) ** 2
                mask_opt.zero_grad()
                upper.backward()
                mask_opt.step()
        scores = torch.sigmoid(logits / self.temperature).detach()
        order = torch.argsort(scores, descending=True).tolist()
        frozen, count = [], 0.0
        for i in order:
            if count >= self.rho * sizes.sum():
                break
            frozen.append(names[i])
            count += float(sizes[i])
        return GuardMask(tuple(frozen), self.rho, count / float(sizes.sum()),
                         {n: float(scores[i]) for i, n in enumerate(names)})

    def _encode(self, pipe, data) -> dict:
        return {"latents": encode_images(pipe, data.images), "cond": encode_captions(pipe, data.captions)}

    def _loss(self, model: tuple, params: dict, data: dict, gen: torch.Generator) -> torch.Tensor:
        """The family's denoising loss of `model` (family, denoiser, training schedule) with
        `params` in place of the denoiser's, on a batch of `data` drawn from `gen`."""
        family, denoiser, scheduler = model
        idx = torch.randint(0, len(data["latents"]), (self.batch_size,), generator=gen)
        return denoising_loss(family, denoiser, scheduler, data["latents"][idx].to(denoiser.device),
                              data["cond"].rows(idx), gen, params=params)

    def _simulate_finetune(self, model, pre, names, data, gen) -> dict[str, torch.Tensor]:
        ft = {n: pre[n].clone().requires_grad_(True) for n in names}
        opt = torch.optim.Adam(list(ft.values()), lr=self.inner_lr)
        for _ in range(self.inner_steps):
            loss = self._loss(model, ft, data["illegal"], gen) + self._loss(model, ft, data["legal"], gen)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return {n: v.detach() for n, v in ft.items()}
