"""Two more attacks on an erasure: a hard prompt (real words only) and the white-box upper bound.

- `hardprompt_attack` (in the style of UnlearnDiffAtk / P4D): a prefix of `length` real words
  in front of prompts that name the concept, searched greedily with gradient guidance
  (GCG): the gradient of the denoising loss on images of the concept with respect to a
  one-hot relaxation of each prefix slot ranks the words, `candidates` single-word swaps
  drawn from the top `top_k` per slot are scored on one fixed batch, and the best is kept
  if it lowers the loss. The vocabulary is the world's whole words minus the concept's own
  name and synonyms (those are the paraphrase attack), so the found prompt is plain text a
  hosted model accepts. Reports the prompts found and the concept's accuracy with them.
- `conditioning_attack`: the upper bound. A perturbation δ (tokens x width), shared by every
  prompt, added to the text encoder's output wherever the prompt names the concept,
      δ* = argmin_δ E ‖ε − ε_θ(x_t, E(p) + δ, t)‖²,
  unbounded, on the same images. No prompt can do more through the text path; a defence
  that edits only what reads the text (cross-attention K/V) is measured against it.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from ..families import FAMILIES, Conditioning
from ..finetune import denoising_loss, prompt_ids
from ..shapes import vocab
from .softprompt import concept_data


def _fixed_batch(latents, generator, batch_size, t_range, device):
    idx = torch.randint(0, len(latents), (batch_size,), generator=generator)
    noise = torch.randn(latents[idx].shape, generator=generator)
    t = torch.randint(*t_range, (batch_size,), generator=generator)
    return idx, noise.to(device), t.to(device)


def hardprompt_attack(pipe, judge, concept: str, length: int = 3, iterations: int = 40,
                      candidates: int = 16, top_k: int = 8, batch_size: int = 16, images: int = 32,
                      t_range: tuple[int, int] = (100, 900), n_eval: int = 48, seed: int = 0) -> dict:
    """Greedy coordinate-gradient search for a `length`-word prefix that brings `concept` back."""
    from diffusers import DDPMScheduler

    from .attacks import concept_accuracy, naming_prompts

    c = vocab.concept(concept)
    tok, text, unet = pipe.tokenizer, pipe.text_encoder, pipe.unet
    for module in (unet, text, pipe.vae):
        module.requires_grad_(False)
    words = [w for w in vocab.all_words() if w not in c.words]
    word_ids = torch.tensor([tok(w, add_special_tokens=False).input_ids[0] for w in words])
    latents, captions = concept_data(pipe, concept, "rendered", images, seed, c.name)
    latents = latents.to(pipe.device)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    table = text.get_input_embeddings().weight
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    prefix = list(rng.integers(len(words), size=length))

    def ids_for(prefix_idx, caps):
        return prompt_ids(tok, [" ".join(words[i] for i in prefix_idx) + " " + cap for cap in caps]).to(pipe.device)

    def loss_of(prefix_idx, batch, onehot=None):
        idx, noise, t = batch
        ids = ids_for(prefix_idx, [captions[i] for i in idx.tolist()])
        if onehot is None:
            context = text(ids)[0]
        else:  # the prefix slots (positions 1..length) embedded through the relaxation
            relaxed = onehot @ table[word_ids.to(table.device)]

            def hook(module, inputs, output):
                output = output.clone()
                output[:, 1:1 + length] = relaxed[None].to(output.dtype)
                return output

            handle = text.get_input_embeddings().register_forward_hook(hook)
            try:
                context = text(ids)[0]
            finally:
                handle.remove()
        pred = unet(sched.add_noise(latents[idx], noise, t), t, context).sample
        return (pred - noise).pow(2).mean()

    history = []
    for _ in range(iterations):
        batch = _fixed_batch(latents, gen, batch_size, t_range, pipe.device)
        onehot = torch.zeros(length, len(words), device=table.device)
        onehot[torch.arange(length), torch.tensor(prefix)] = 1
        onehot.requires_grad_(True)
        current = loss_of(prefix, batch, onehot)
        (grad,) = torch.autograd.grad(current, [onehot])
        best, best_loss = prefix, float(current.detach())
        top = (-grad).topk(min(top_k, len(words)), dim=1).indices.cpu().numpy()
        with torch.no_grad():
            for _ in range(candidates):
                slot = int(rng.integers(length))
                trial = list(prefix)
                trial[slot] = int(top[slot][rng.integers(top.shape[1])])
                if trial == prefix:
                    continue
                value = float(loss_of(trial, batch))
                if value < best_loss:
                    best, best_loss = trial, value
        prefix = best
        history.append(best_loss)
    found = " ".join(words[i] for i in prefix)
    prompts = [f"{found} {p}" for p in naming_prompts(concept, n_eval, seed + 1)]
    acc = concept_accuracy(pipe, judge, concept, prompts, seed)
    return {"ua": 1 - acc, "accuracy": acc, "prefix": found, "example_prompt": prompts[0],
            "length": length, "iterations": iterations, "candidates": candidates, "n": n_eval,
            "loss_first": history[0], "loss_last": history[-1]}


@contextmanager
def _added_to_naming(text_encoder, token_id: int, delta: torch.Tensor):
    """Within the block, `delta` is added to the text encoder's output for every prompt
    containing `token_id` (the concept's word); other prompts (the unconditional one) are
    untouched."""

    def hook(module, inputs, output):
        input_ids = inputs[0] if inputs else None
        if input_ids is None:
            return output
        rows = (input_ids == token_id).any(dim=1)
        if not rows.any():
            return output
        hidden = output[0].clone()
        hidden[rows] = hidden[rows] + delta.to(hidden.dtype)
        output.last_hidden_state = hidden
        return output

    handle = text_encoder.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def conditioning_attack(pipe, judge, concept: str, steps: int = 300, lr: float = 0.05,
                        batch_size: int = 16, images: int = 32, t_range: tuple[int, int] = (100, 900),
                        n_eval: int = 48, seed: int = 0) -> dict:
    """The white-box upper bound: an unbounded perturbation of the conditioning of prompts that
    name `concept`, optimised on rendered images of it; accuracy of the concept with it."""
    from diffusers import DDPMScheduler

    from .attacks import concept_accuracy, naming_prompts

    c = vocab.concept(concept)
    tok, text, unet = pipe.tokenizer, pipe.text_encoder, pipe.unet
    for module in (unet, text, pipe.vae):
        module.requires_grad_(False)
    latents, captions = concept_data(pipe, concept, "rendered", images, seed, c.name)
    latents = latents.to(pipe.device)
    ids = prompt_ids(tok, captions).to(pipe.device)
    with torch.no_grad():
        context = text(ids)[0]
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    delta = torch.zeros(context.shape[1:], device=context.device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(latents), (batch_size,), generator=gen)
        loss = denoising_loss(FAMILIES["sd"], unet, sched, latents[idx], Conditioning(context[idx] + delta), gen,
                              t_range=t_range)
        (delta.grad,) = torch.autograd.grad(loss, [delta])
        opt.step()
        losses.append(float(loss.detach()))
    word_id = tok(c.name, add_special_tokens=False).input_ids[0]
    with _added_to_naming(text, word_id, delta.detach()):
        acc = concept_accuracy(pipe, judge, concept, naming_prompts(concept, n_eval, seed + 1), seed)
    return {"ua": 1 - acc, "accuracy": acc, "steps": steps, "n": n_eval,
            "delta_norm_ratio": float(delta.detach().norm() / context[0].norm()),
            "loss_first": float(np.mean(losses[:10])), "loss_last": float(np.mean(losses[-10:]))}
