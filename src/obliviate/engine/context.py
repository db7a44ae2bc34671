"""Everything a method may read while it edits a model: the EraseContext.

It holds the pipeline being edited (θ), lazily a frozen copy of it as it was before this
request (φ), the resolved request and the lineage's earlier requests, the concept world,
the latent cache, the training noise schedule and the accelerate `Accelerator`. Methods
call its helpers (`encode`, `noise`, `eps`, `model_latents`) instead of touching diffusers
internals, which is what keeps them small and model-agnostic.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import torch
from accelerate import Accelerator

from ..concepts import ConceptWorld
from ..families import Conditioning, family_of
from ..request import ResolvedRequest
from .data import LatentCache
from .frozen import frozen_view


@dataclass
class EraseContext:
    """The model, the request, its history, and shared helpers for methods."""

    pipe: object
    world: ConceptWorld
    request: ResolvedRequest
    history: list[ResolvedRequest]
    accelerator: Accelerator
    model_sha: str
    base_sha: str
    cache: LatentCache
    seed: int = 0
    base_loader: Callable[[], object] | None = None
    progress: bool = True
    # the parameter group the current stage trains (engine.params), so that φ can be a light
    # view of a component instead of a copy (engine.frozen); None: copy components whole
    train_group: str | None = None
    _frozen: dict = field(default_factory=dict)

    def __post_init__(self):
        self.family = family_of(self.pipe)
        self.noise_scheduler = self.family.training_scheduler(self.pipe)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def tokenizer(self):
        return self.pipe.tokenizer

    @property
    def removed(self) -> set[str]:
        """Every concept the lineage has removed, this request's targets included: what
        prompts built for keeping, pairing or replay must not name."""
        return {t.name for r in self.history for t in r.targets} | set(self.request.names)

    @property
    def removed_kinds(self) -> set[str]:
        """The kinds (object, colour, ...) of every concept the lineage has removed, this
        request's included: the slots a keep prompt must fill so none is left free."""
        return {t.kind for r in (*self.history, self.request) for t in r.targets}

    # -- frozen copies (φ) -----------------------------------------------------------------
    def frozen(self, component: str) -> torch.nn.Module:
        """A frozen copy of a component (`unet`, `text_encoder`, ...) as it was when first asked for.

        Methods ask for it in `prepare()`, before any update, so φ is the model before this
        request.
        """
        if component not in self._frozen:
            live = getattr(self.pipe, component)
            view = frozen_view(live, self._trained_in(component))
            self._frozen[component] = view or copy.deepcopy(live).eval().requires_grad_(False)
        return self._frozen[component]

    def _trained_in(self, component: str) -> set[str] | None:
        """Names (within `component`) of the tensors the current stage trains, if known."""
        if self.train_group is None:
            return None
        from .params import named_group

        prefix = f"{component}."
        return {n[len(prefix):] for n in named_group(self.pipe, self.train_group) if n.startswith(prefix)}

    def restart(self, train_group: str | None = None) -> None:
        """The weights as they are now become φ, "the model before" (after a stage such as
        --robust's hardening), for a next stage that trains `train_group`: frozen copies are
        retaken and the latent cache keys on them."""
        from ..ledger import weights_sha256

        self.train_group = train_group
        self._frozen = {k: v for k, v in self._frozen.items() if k == "base_pipe"}
        self.model_sha = weights_sha256(self.pipe)

    def denoiser(self, frozen: bool = False) -> torch.nn.Module:
        """θ's denoiser (UNet or transformer), or φ's frozen copy."""
        name = self.family.denoiser
        return self.frozen(name) if frozen else getattr(self.pipe, name)

    def freeze(self) -> None:
        """Make φ now (frozen copies of the denoiser and the text encoders), before any update."""
        for name in (self.family.denoiser, *self.family.present_text_encoders(self.pipe)):
            self.frozen(name)

    def autocast(self):
        """The context every training forward runs in: with half-precision weights (bf16,
        fp16), torch.autocast in their type, so float32 master copies of the trained tensors
        meet them; otherwise the accelerator's own."""
        dtype = getattr(self.pipe, "dtype", torch.float32)
        if dtype in (torch.float16, torch.bfloat16):
            return torch.autocast(self.device.type, dtype=dtype)
        return self.accelerator.autocast()

    # -- text --------------------------------------------------------------------------------
    def token_ids(self, prompts: list[str]) -> torch.Tensor:
        """Ids of `prompts` for the (first) tokenizer, padded as the pipelines pad."""
        return self.family.token_ids(self.pipe, prompts).to(self.device)

    def encode(self, prompts: list[str], frozen: bool = False) -> Conditioning:
        """The denoiser's text conditioning for `prompts` (the family's `Conditioning`:
        cross-attention states, plus pooled/size conditioning where the family has them).

        With `frozen`, φ's text encoders (no gradient); else θ's, with gradient only if some
        of their weights are being trained.
        """
        if frozen:
            with torch.no_grad(), self.autocast():
                return self.family.encode(self.pipe, prompts, self.frozen)
        trains = any(p.requires_grad for n in self.family.present_text_encoders(self.pipe)
                     for p in getattr(self.pipe, n).parameters())
        with torch.set_grad_enabled(trains), self.autocast():
            return self.family.encode(self.pipe, prompts, lambda n: getattr(self.pipe, n))

    # -- diffusion ---------------------------------------------------------------------------
    def draw(self, sub: dict, generator: torch.Generator,
             t_range: tuple[int, int] | None = None) -> dict:
        """`sub` with its diffusion noise ε and timesteps t drawn (uniform in `t_range`).

        Drawn in `batch()`, for the whole batch, before it is split across processes: so one
        process or several see exactly the same noise.
        """
        lo, hi = t_range or (0, self.noise_scheduler.config.num_train_timesteps)
        latents = sub["latents"]
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(lo, hi, (len(latents),), generator=generator)
        return {**sub, "noise": noise, "t": t}

    def noisy(self, sub: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Forward-diffuse a drawn sub-batch: (x_t, ε, t) on the device."""
        latents, noise, t = (sub[k].to(self.device) for k in ("latents", "noise", "t"))
        return self.family.add_noise(self.noise_scheduler, latents, noise, t), noise, t

    def eps(self, x_t: torch.Tensor, t: torch.Tensor, context: Conditioning, frozen: bool = False) -> torch.Tensor:
        """The denoiser's prediction ε(x_t, c, t) of θ, or of φ with `frozen` (no gradient);
        ε, v or flow velocity, as the model was trained (`target` gives the matching truth)."""
        with self.autocast():
            if frozen:
                with torch.no_grad():
                    return self.family.predict(self.denoiser(frozen=True), x_t, t, context)
            return self.family.predict(self.denoiser(), x_t, t, context)

    def eps_joint(self, parts: list[tuple], frozen: bool = False) -> list[torch.Tensor]:
        """`eps` for several (x_t, t, c) sub-batches in one denoiser call, split back in order;
        c is a `Conditioning` or a sequence of prompts (every part's prompts encoded in one
        call, by φ's encoders with `frozen`, else θ's).

        The denoiser and the text encoders treat batch rows independently (norms are per
        sample), so each part gets the prediction a call of its own gives, up to float
        rounding; on the shapes model on a CPU one call of 32 rows costs about two thirds of
        four calls of 8, backward included (docs/experiments.md, session 37)."""
        prompts = [p for _, _, c in parts if not isinstance(c, Conditioning) for p in c]
        encoded = self.encode(prompts, frozen=frozen) if prompts else None
        contexts, at = [], 0
        for _, _, c in parts:
            if isinstance(c, Conditioning):
                contexts.append(c)
            else:
                contexts.append(encoded.rows(slice(at, at + len(c))))
                at += len(c)
        x_t = torch.cat([x for x, _, _ in parts])
        t = torch.cat([t for _, t, _ in parts])
        pred = self.eps(x_t, t, Conditioning.cat(contexts), frozen=frozen)
        return list(pred.split([len(x) for x, _, _ in parts]))

    def target(self, sub: dict) -> torch.Tensor:
        """What the denoiser should predict for a drawn sub-batch: ε for ε-prediction, the
        velocity for v-prediction (Stable Diffusion 2.x at 768 px), ε − x_0 for flow matching."""
        latents, noise, t = (sub[k].to(self.device) for k in ("latents", "noise", "t"))
        return self.family.target(self.noise_scheduler, latents, noise, t)

    def x0(self, x_t: torch.Tensor, pred: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The clean latent a prediction of the denoiser implies at x_t, t."""
        return self.family.x0(self.noise_scheduler, x_t, pred, t)

    def x0_error(self, sub: dict, goal: torch.Tensor, snr_cap: float,
                 pred: torch.Tensor | None = None) -> torch.Tensor:
        """min(SNR_t, cap)·‖x̂_0,θ(x_t, c, t) − goal‖² on a drawn sub-batch, x_t noised from
        sub["latents"] (Min-SNR weighting: the ε-space loss at high noise, capped where x̂_0
        is nearly given). `pred`: θ's prediction on the sub-batch where the caller made it
        already (`eps_joint`)."""
        x_t, _, t = self.noisy(sub)
        if pred is None:
            pred = self.eps(x_t, t, self.encode(sub["prompts"]))
        x0 = self.x0(x_t, pred, t)
        weight = self.family.snr(self.noise_scheduler, t).clamp(max=snr_cap)
        return (weight * (x0 - goal.to(x0.device)).pow(2).flatten(1).mean(1)).mean()

    def diffusion_loss(self, sub: dict) -> torch.Tensor:
        """The ordinary denoising loss ‖target − pred_θ(x_t, c, t)‖² on a drawn sub-batch."""
        x_t, _, t = self.noisy(sub)
        return (self.eps(x_t, t, self.encode(sub["prompts"])) - self.target(sub)).pow(2).mean()

    # -- data --------------------------------------------------------------------------------
    def model_latents(self, prompts: list[str], seed: int | None = None) -> torch.Tensor:
        """What the model before this request draws for `prompts` (cached latents)."""
        return self.cache.get(self.pipe, self.model_sha, prompts, self.seed if seed is None else seed,
                              progress=self.progress)

    def base_latents(self, prompts: list[str], seed: int | None = None) -> torch.Tensor:
        """What the lineage's original model draws for `prompts` (its prior; cached).

        Falls back to the current model when the base cannot be loaded (documented in the
        ledger settings as `prior_source`).
        """
        seed = self.seed if seed is None else seed
        base = self.base_pipe()
        if base is None:
            return self.model_latents(prompts, seed)
        return self.cache.get(base, self.base_sha, prompts, seed, progress=self.progress)

    def base_pipe(self):
        """The lineage's original model (loaded once), or None when this model is the
        original or the original cannot be loaded."""
        if self.base_sha == self.model_sha or self.base_loader is None:
            return None
        if "base_pipe" not in self._frozen:
            try:
                self._frozen["base_pipe"] = self.base_loader()
            except Exception:  # noqa: BLE001 - the base may be gone; callers fall back to φ
                return None
        return self._frozen["base_pipe"]

    @torch.no_grad()
    def base_eps(self, x_t: torch.Tensor, t: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """The lineage's original model's prediction for `prompts` (its own text encoders),
        or φ's where there is no separate original (the first request of a lineage)."""
        base = self.base_pipe()
        if base is None:
            return self.eps(x_t, t, self.encode(prompts, frozen=True), frozen=True)
        with self.autocast():
            cond = self.family.encode(base, prompts, lambda n: getattr(base, n))
            return self.family.predict(getattr(base, self.family.denoiser), x_t, t, cond)
