"""Probes that try to bring a removed concept back, each usable on any model folder.

- `paraphrase`: prompts naming the concept through synonyms and templates that erasure
  never trained on; reports UA under paraphrase.
- `softprompt`: a textual-inversion attack against the edited model: `tokens` learnable
  input embeddings, started at the concept word's own embedding (the attacker knows the
  word; "a" for a blind start), optimised for `steps` on rendered images of the concept (the
  other attributes named in plain words; timesteps in [t_low, t_high), where the prompt
  decides the image), then used in place of the concept's word; reports UA under attack
  and the budget. Measured on ESD's model after it removed "star" (accuracy under attack,
  48 images; 0.22 without it): this default 0.54 in 72 s; 600 steps 0.60; 4 tokens 0.56;
  t in [0, 1000) 0.54; batch 8 0.50; matching the original model's prediction instead of
  the noise (Prompting4Debugging's objective, ‖ε_θ(x_t, P) − ε_φ(x_t, c)‖²) 0.56 in 102 s;
  matching the noise with the classifier-free-guided prediction 0.10. The attack plateaus
  near 0.55 on that model: ESD-u edits the UNet's own layers, which a prompt cannot undo.
- `resurgence`: fine-tune the edited model for a fixed budget on images of unrelated concepts
  only; reports the concept's accuracy before and after ("concept resurgence").
Accuracy of a concept is always the judge's: the share of images whose judged concept of
that kind is the concept.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from ..engine.data import encode_images
from ..finetune import denoising_loss, prompt_ids
from ..generate import generate_images
from ..shapes import vocab

PLACEHOLDERS = ("~", "^")  # single-token characters that no caption uses


def concept_accuracy(pipe, judge, concept: str, prompts: list[str], seed: int = 0) -> float:
    """Share of images for `prompts` that the judge sees as `concept` (of its kind)."""
    kind = vocab.concept(concept).kind
    images = generate_images(pipe, prompts, seed=seed)
    return float(np.mean([p == concept for p in judge.predict(images)[kind]]))


def naming_prompts(concept: str, n: int, seed: int, avoid: set[str] = frozenset()) -> list[str]:
    """Plain prompts naming `concept` in the evaluation template, other attributes random."""
    c = vocab.concept(concept)
    rng = np.random.default_rng(seed)
    return [vocab.fill(vocab.EVAL_TEMPLATE, {c.kind: c.name}, rng, set(avoid) | {c.name}) for _ in range(n)]


def paraphrase_prompts(concept: str, n: int, seed: int) -> list[str]:
    """Prompts naming `concept` only through its synonyms, in templates erasure never used."""
    c = vocab.concept(concept)
    rng = np.random.default_rng(seed)
    templates = [t for t in vocab.TEMPLATES if t not in vocab.ERASURE_TEMPLATES and vocab.names(t, c.kind)]
    templates = templates or [vocab.EVAL_TEMPLATE]
    prompts = []
    for i in range(n):
        word = c.synonyms[i % len(c.synonyms)] if c.synonyms else c.name
        prompts.append(vocab.fill(templates[rng.integers(len(templates))], {c.kind: word}, rng, {c.name}, True))
    return prompts


def paraphrase_attack(pipe, judge, concept: str, n: int = 48, seed: int = 0) -> dict:
    """UA of `concept` under paraphrased prompts."""
    prompts = paraphrase_prompts(concept, n, seed)
    acc = concept_accuracy(pipe, judge, concept, prompts, seed)
    return {"ua": 1 - acc, "n": n, "example_prompt": prompts[0]}


@contextmanager
def _soft_tokens(text_encoder, token_ids: list[int], vectors: torch.Tensor):
    """Within the block, the input embeddings of `token_ids` are replaced by `vectors`."""
    embedding = text_encoder.get_input_embeddings()
    ids = torch.tensor(token_ids)

    def hook(module, inputs, output):
        (input_ids,) = inputs
        out = output.clone()
        for j, tid in enumerate(ids.tolist()):
            where = input_ids == tid
            if where.any():
                out[where] = vectors[j].to(out.dtype)
        return out

    handle = embedding.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@dataclass
class SoftPromptAttack:
    """Textual inversion against an edited model (budget: `steps` x `batch_size`, `tokens`)."""

    steps: int = 300
    tokens: int = 2
    lr: float = 0.1
    batch_size: int = 16
    images: int = 32
    t_low: int = 100
    t_high: int = 900
    init: str = "concept"
    seed: int = 0

    def run(self, pipe, judge, concept: str, n_eval: int = 48) -> dict:
        """Optimise the soft tokens for `concept`, then measure UA with them in the prompt."""
        from diffusers import DDPMScheduler

        from ..shapes import world

        c = vocab.concept(concept)
        tok, text = pipe.tokenizer, pipe.text_encoder
        token_ids = [tok(p, add_special_tokens=False).input_ids[0] for p in PLACEHOLDERS[: self.tokens]]
        placeholder = " ".join(PLACEHOLDERS[: self.tokens])
        rng = np.random.default_rng(self.seed)
        # training data: rendered images, captions with the concept's word replaced by the soft tokens
        scenes = [world.Scene(**{**world.random_scene(rng).__dict__, c.kind: c.name}) for _ in range(self.images)]
        pictures = np.stack([world.render(s, int(rng.integers(2**31 - 1))) for s in scenes])
        captions = []
        for s in scenes:
            fields = {k: getattr(s, k) for k in ("object", "colour", "style")}
            fields[c.kind] = placeholder
            captions.append(vocab.fix_articles(
                vocab.EVAL_TEMPLATE.format(o=fields["object"], c=fields["colour"], s=fields["style"])))
        latents = encode_images(pipe, pictures)
        embedding = text.get_input_embeddings().weight
        word = c.name if self.init == "concept" else self.init
        init_ids = tok(word, add_special_tokens=False).input_ids or tok("a", add_special_tokens=False).input_ids
        init = embedding[init_ids].detach().mean(0)
        vectors = init.repeat(self.tokens, 1).clone().requires_grad_(True)
        opt = torch.optim.Adam([vectors], lr=self.lr)
        sched = DDPMScheduler.from_config(pipe.scheduler.config)
        ids = prompt_ids(tok, captions).to(pipe.device)
        gen = torch.Generator().manual_seed(self.seed)
        for module in (pipe.unet, text, pipe.vae):
            module.requires_grad_(False)
        losses = []
        with _soft_tokens(text, token_ids, vectors):
            for _ in range(self.steps):
                idx = torch.randint(0, len(latents), (self.batch_size,), generator=gen)
                loss = denoising_loss(pipe.unet, sched, latents[idx].to(pipe.device), text(ids[idx])[0], gen,
                                      t_range=(self.t_low, self.t_high))
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
            prompts = naming_prompts(concept, n_eval, self.seed + 1)
            prompts = [p.replace(c.name, placeholder, 1) for p in prompts]
            acc = concept_accuracy(pipe, judge, concept, prompts, self.seed)
        return {"ua": 1 - acc, "accuracy": acc, "steps": self.steps, "tokens": self.tokens,
                "batch_size": self.batch_size, "images": self.images, "n": n_eval,
                "loss_first": float(np.mean(losses[:10])), "loss_last": float(np.mean(losses[-10:]))}


def resurgence_attack(pipe, judge, concept: str, removed: list[str], steps: int = 100,
                      lr: float = 1e-4, n_eval: int = 48, seed: int = 0) -> dict:
    """Accuracy of `concept` before and after fine-tuning a copy of the model on images of
    concepts never removed (the fine-tuning data never shows the concept)."""
    from ..finetune import Captioned, finetune
    from ..shapes import world

    prompts = naming_prompts(concept, n_eval, seed + 2)
    before = concept_accuracy(pipe, judge, concept, prompts, seed)
    rng = np.random.default_rng(seed)
    images, captions = [], []
    allowed = {k: [c.name for c in vocab.BY_KIND[k] if c.name not in removed] for k in vocab.KINDS}
    for _ in range(64):
        scene = world.Scene(**{k: allowed[k][rng.integers(len(allowed[k]))] for k in vocab.KINDS})
        images.append(world.render(scene, int(rng.integers(2**31 - 1))))
        captions.append(world.caption(scene, rng))
    copy_pipe = copy.deepcopy(pipe)
    finetune(copy_pipe, Captioned(np.stack(images), captions), steps=steps, lr=lr, seed=seed, progress=False)
    after = concept_accuracy(copy_pipe, judge, concept, prompts, seed)
    return {"accuracy_before": before, "accuracy_after": after, "steps": steps, "lr": lr, "n": n_eval}


ATTACKS = ("paraphrase", "softprompt", "resurgence")


def run_attacks(pipe, judge, targets: list[str], attacks: list[str], seed: int = 0,
                removed: list[str] | None = None) -> dict:
    """Every requested attack on every concept of `targets`: `{concept: {attack: result}}`.
    `removed` (default: `targets`) is every concept the lineage removed; resurgence
    fine-tunes only on concepts outside it."""
    from ..errors import ObliviateError

    unknown = set(attacks) - set(ATTACKS)
    if unknown:
        raise ObliviateError(f"unknown attack {sorted(unknown)[0]!r}; choose from {', '.join(ATTACKS)}")
    removed = list(targets) if removed is None else list(removed)
    results = {}
    for concept in targets:
        r = {}
        if "paraphrase" in attacks:
            r["paraphrase"] = paraphrase_attack(pipe, judge, concept, seed=seed)
        if "softprompt" in attacks:
            r["softprompt"] = SoftPromptAttack(seed=seed).run(pipe, judge, concept)
        if "resurgence" in attacks:
            r["resurgence"] = resurgence_attack(pipe, judge, concept, removed, seed=seed)
        results[concept] = r
    return results
