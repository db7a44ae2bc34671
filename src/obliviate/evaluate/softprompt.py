"""The soft-prompt attack (textual inversion against an edited model) and its ladder of budgets.

A soft prompt is `tokens` learnable input embeddings put where the concept's word was:
    v* = argmin_v  E_{x0, ε, t ∈ [t_low, t_high)} ‖ε − ε_θ(x_t, E_θ(caption[word → v]), t)‖²
on images of the concept, with θ frozen; the attack's figure is the judged accuracy of the
concept on fresh prompts that name it only through v ("recovery"; UA under attack = 1 − it).
The images are either rendered by the world (`data="rendered"`) or what the lineage's
original model drew for prompts naming the concept (`data="original"`: the attacker holds
the unedited model's outputs). The start is the concept's own word (`init="concept"`), a
neutral filler word ("thing"), or random (the embedding table's mean plus its per-dimension
spread times N(0, 1)).

The ladder (`LADDERS`) runs several budgets and reports every rung and the worst case (the
highest recovery). A run of 1000 steps is also judged at step 300, so the 300- and 1000-step
rungs of one start share their optimisation. `invert()` is shared with the `--robust`
plug-in, which mines soft prompts on the weights being edited; it differentiates only with
respect to the soft vectors, so it can run on a model whose own weights are being trained.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

PLACEHOLDERS = ("~", "^", "|", "#")  # single-token characters that no caption uses
NEUTRAL_WORD = "thing"


def placeholder_ids(tokenizer, n: int) -> list[int]:
    """Token ids of the first `n` placeholder characters."""
    if not 1 <= n <= len(PLACEHOLDERS):
        raise ValueError(f"a soft prompt has 1 to {len(PLACEHOLDERS)} tokens, not {n}")
    return [tokenizer(p, add_special_tokens=False).input_ids[0] for p in PLACEHOLDERS[:n]]


def placeholder_text(n: int) -> str:
    """The text that stands for an `n`-token soft prompt inside a caption."""
    return " ".join(PLACEHOLDERS[:n])


@contextmanager
def soft_tokens(text_encoder, token_ids: list[int], vectors: torch.Tensor):
    """Within the block, the input embeddings of `token_ids` are replaced by `vectors`
    (row j for token j); prompts without those tokens are untouched."""
    embedding = text_encoder.get_input_embeddings()

    def hook(module, inputs, output):
        (input_ids,) = inputs
        out = output
        for j, tid in enumerate(token_ids):
            where = input_ids == tid
            if where.any():
                if out is output:
                    out = output.clone()
                out[where] = vectors[j].to(out.dtype)
        return out

    handle = embedding.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def initial_vectors(text_encoder, tokenizer, init: str, word: str, n: int,
                    generator: torch.Generator) -> torch.Tensor:
    """Start vectors (n, d): the word's own embedding, the neutral word's, or random."""
    table = text_encoder.get_input_embeddings().weight.detach()
    if init == "random":
        noise = torch.randn((n, table.shape[1]), generator=generator).to(table.device)
        return table.mean(0) + table.std(0) * noise
    source = word if init == "concept" else NEUTRAL_WORD if init == "neutral" else init
    ids = tokenizer(source, add_special_tokens=False).input_ids
    return table[ids].mean(0).repeat(n, 1).clone()


def invert(unet, text_encoder, scheduler, latents: torch.Tensor, ids: torch.Tensor,
           token_ids: list[int], vectors: torch.Tensor, steps: int, generator: torch.Generator,
           lr: float = 0.1, batch_size: int = 16, t_range: tuple[int, int] = (100, 900),
           judge_at: tuple[int, ...] = ()) -> tuple[torch.Tensor, dict[int, torch.Tensor], list[float]]:
    """Textual inversion of `vectors` (soft tokens `token_ids`) on (latents, caption ids):
    Adam on ‖ε − ε_θ(x_t, E(ids; v), t)‖². Gradients flow only to the vectors; the models'
    own parameters get none. Returns the final vectors, snapshots at the steps in
    `judge_at`, and the loss per step."""
    from ..families import FAMILIES, Conditioning
    from ..finetune import denoising_loss

    vectors = vectors.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([vectors], lr=lr)
    snapshots, losses = {}, []
    with soft_tokens(text_encoder, token_ids, vectors):
        for step in range(1, steps + 1):
            idx = torch.randint(0, len(latents), (batch_size,), generator=generator)
            loss = denoising_loss(FAMILIES["sd"], unet, scheduler, latents[idx],
                                  Conditioning(text_encoder(ids[idx])[0]), generator, t_range=t_range)
            (grad,) = torch.autograd.grad(loss, [vectors])
            vectors.grad = grad
            opt.step()
            losses.append(float(loss.detach()))
            if step in judge_at:
                snapshots[step] = vectors.detach().clone()
    return vectors.detach(), snapshots, losses


def concept_data(pipe, concept: str, data: str, n: int, seed: int, placeholder: str,
                 original=None) -> tuple[torch.Tensor, list[str]]:
    """Training latents of `concept` and their captions with the concept's word replaced by
    `placeholder`: rendered scenes, or what `original` (a pipeline) draws for naming prompts."""
    from ..engine.data import encode_images
    from ..shapes import vocab, world
    from .attacks import naming_prompts

    c = vocab.concept(concept)
    rng = np.random.default_rng(seed)
    if data == "original":
        if original is None:
            raise ValueError("data='original' needs the lineage's original model")
        from ..generate import generate_images

        prompts = naming_prompts(concept, n, seed + 7)
        latents = encode_images(pipe, generate_images(original, prompts, seed=seed + 7))
        return latents, [p.replace(c.name, placeholder, 1) for p in prompts]
    scenes = [world.Scene(**{**world.random_scene(rng).__dict__, c.kind: c.name}) for _ in range(n)]
    pictures = np.stack([world.render(s, int(rng.integers(2**31 - 1))) for s in scenes])
    captions = []
    for s in scenes:
        fields = {k: getattr(s, k) for k in ("object", "colour", "style")}
        fields[c.kind] = placeholder
        captions.append(vocab.fix_articles(
            vocab.EVAL_TEMPLATE.format(o=fields["object"], c=fields["colour"], s=fields["style"])))
    return encode_images(pipe, pictures), captions


@dataclass(frozen=True)
class Rung:
    """One budget of the ladder: soft tokens, optimiser steps (judged at each), start, data."""

    tokens: int = 2
    steps: tuple[int, ...] = (300,)
    init: str = "concept"
    data: str = "rendered"

    def label(self, steps: int) -> str:
        return f"{self.tokens} tok, {steps} steps, {self.init} start, {self.data}"


LADDERS: dict[str, tuple[Rung, ...]] = {
    "quick": tuple(Rung(2, (300,), init) for init in ("concept", "neutral", "random")),
    "full": tuple(Rung(tokens, (300, 1000), init, data)
                  for data in ("rendered", "original") for tokens in (1, 2, 4)
                  for init in ("concept", "neutral", "random")),
}


@dataclass
class SoftPromptAttack:
    """Textual inversion against an edited model at one rung (budget: steps x batch_size)."""

    steps: int = 300
    tokens: int = 2
    lr: float = 0.1
    batch_size: int = 16
    images: int = 32
    t_low: int = 100
    t_high: int = 900
    init: str = "concept"
    data: str = "rendered"
    seed: int = 0

    def run(self, pipe, judge, concept: str, n_eval: int = 48, original=None,
            judge_at: tuple[int, ...] | None = None) -> dict:
        """Optimise the soft tokens for `concept`, then judge `n_eval` images drawn with them in
        place of its word; with several `judge_at` steps, one result per step under "at"."""
        from diffusers import DDPMScheduler

        from ..finetune import prompt_ids
        from ..shapes import vocab
        from .attacks import concept_accuracy, naming_prompts

        c = vocab.concept(concept)
        tok, text = pipe.tokenizer, pipe.text_encoder
        token_ids = placeholder_ids(tok, self.tokens)
        placeholder = placeholder_text(self.tokens)
        latents, captions = concept_data(pipe, concept, self.data, self.images, self.seed, placeholder,
                                         original)
        for module in (pipe.unet, text, pipe.vae):
            module.requires_grad_(False)
        gen = torch.Generator().manual_seed(self.seed)
        start = initial_vectors(text, tok, self.init, c.name, self.tokens, gen)
        judge_at = tuple(sorted(set(judge_at or (self.steps,))))
        _, snaps, losses = invert(
            pipe.unet, text, DDPMScheduler.from_config(pipe.scheduler.config), latents.to(pipe.device),
            prompt_ids(tok, captions).to(pipe.device), token_ids, start, max(judge_at), gen, lr=self.lr,
            batch_size=self.batch_size, t_range=(self.t_low, self.t_high), judge_at=judge_at)
        prompts = [p.replace(c.name, placeholder, 1) for p in naming_prompts(concept, n_eval, self.seed + 1)]
        results = {}
        for steps, vectors in snaps.items():
            with soft_tokens(text, token_ids, vectors):
                acc = concept_accuracy(pipe, judge, concept, prompts, self.seed)
            results[steps] = {"ua": 1 - acc, "accuracy": acc, "steps": steps, "tokens": self.tokens,
                              "init": self.init, "data": self.data, "batch_size": self.batch_size,
                              "images": self.images, "n": n_eval,
                              "loss_first": float(np.mean(losses[:10])),
                              "loss_last": float(np.mean(losses[steps - 10: steps]))}
        if len(results) == 1:
            return next(iter(results.values()))
        return {"at": results}


def softprompt_ladder(pipe, judge, concept: str, budget: str = "quick", n_eval: int = 48,
                      original=None, seed: int = 0, progress: bool = False) -> dict:
    """Every rung of `LADDERS[budget]` against `concept`; `worst` is the rung with the highest
    recovery (accuracy of the concept under the attack)."""
    from tqdm.auto import tqdm

    if budget not in LADDERS:
        raise ValueError(f"unknown attack budget {budget!r}; choose from {', '.join(LADDERS)}")
    rungs = []
    for rung in tqdm(LADDERS[budget], desc=f"soft-prompt ladder ({concept})", disable=not progress):
        if rung.data == "original" and original is None:
            continue
        attack = SoftPromptAttack(steps=max(rung.steps), tokens=rung.tokens, init=rung.init,
                                  data=rung.data, seed=seed)
        out = attack.run(pipe, judge, concept, n_eval=n_eval, original=original, judge_at=rung.steps)
        for r in (out["at"].values() if "at" in out else [out]):
            rungs.append({**r, "label": rung.label(r["steps"])})
    worst = max(rungs, key=lambda r: r["accuracy"])
    return {"budget": budget, "rungs": rungs, "worst": worst, "ua": worst["ua"],
            "accuracy": worst["accuracy"], "n": n_eval}
