"""The one optimisation loop every gradient method runs on.

Per step: the method builds the full batch from a generator every process seeds the same
way; each process keeps its shard (`batch[rank::world]`), the method returns its named loss
terms, gradients come from one backward pass (or, for methods with gradient surgery, one
per term, combined by `method.combine`), are averaged across processes, clipped, and Adam
steps. A non-finite loss stops the run with a clear error before anything is written.
Checkpoints (trainable tensors, optimizer, method state) are safetensors + JSON.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..checkpoint import load_training_state, save_training_state
from ..errors import ObliviateError
from .lora import add_lora, merge_lora
from .params import freeze_all_but


def shard(batch, rank: int, world: int):
    """This process's share of a batch: every list/tensor is strided by `world` from `rank`."""
    if world == 1:
        return batch
    if isinstance(batch, dict):
        return {k: shard(v, rank, world) for k, v in batch.items()}
    if isinstance(batch, (list, tuple, torch.Tensor)) and len(batch) >= world:
        return batch[rank::world]
    return batch


def run_stage(method, ctx, seed: int, robust=None) -> dict:
    """One stage of a request around the method's own (the --robust hardening or repair):
    the weights now become φ for `method`'s group, it prepares and trains for its own
    steps, and φ is retaken for the group trained before. `robust`, if given, is called
    after `prepare` and returns the soft-prompt miner `train` takes (or None)."""
    after = ctx.train_group
    ctx.restart(method.param_group)
    method.prepare(ctx)
    stats = train(method, ctx, steps=method.steps, lr=method.lr, batch_size=method.batch_size, seed=seed,
                  robust=robust() if robust else None)
    ctx.restart(after)
    return stats


def train(method, ctx, steps: int, lr: float, batch_size: int, seed: int = 0,
          checkpoint_dir: Path | None = None, checkpoint_every: int = 0, resume: bool = False,
          refresh=None, robust=None, checkpoint_info: dict | None = None) -> dict:
    """Run `method` for `steps` optimiser steps on `ctx.pipe`; returns loss history and timing.

    With `refresh` (an `engine.refresh.Refresh`), every step is preceded by its unlearn
    perturbation computed on the same batch. With `robust` (an `engine.robust.Robust`), soft
    prompts that bring the targets back are mined on the current weights every few steps,
    and a share of the method's forget prompts uses them. `checkpoint_info` (`identity`:
    what the caller needs to recognise its own checkpoint; `started`: when its request
    began, `time.time()`) is stored in every checkpoint with the seconds spent so far,
    resumed runs included; a resumed run reports `resumed_from_step` and `seconds_before`.
    A method with `lora_rank` R > 0 trains rank-R adapters on its group instead
    (engine.lora); they are merged into the weights when the loop ends.
    """
    rank = getattr(method, "lora_rank", 0)
    if not rank:
        return _train(method, ctx, freeze_all_but(ctx.pipe, method.param_group), steps, lr, batch_size, seed,
                      checkpoint_dir, checkpoint_every, resume, refresh, robust, checkpoint_info)
    try:
        add_lora(ctx.pipe, method.param_group, rank)
        return _train(method, ctx, freeze_all_but(ctx.pipe, "lora"), steps, lr, batch_size, seed, checkpoint_dir,
                      checkpoint_every, resume, refresh, robust, checkpoint_info)
    finally:
        merge_lora(ctx.pipe)


def _train(method, ctx, params, steps, lr, batch_size, seed, checkpoint_dir, checkpoint_every, resume,
           refresh, robust, checkpoint_info) -> dict:
    """The loop, on the trainable tensors `params` ({name: parameter}); tensors stored in half
    precision train as float32 master copies (the forward runs under `ctx.autocast`, in the
    weights' type) and go back to their type when the loop ends."""
    half = {n: p.dtype for n, p in params.items() if p.dtype in (torch.float16, torch.bfloat16)}
    for n in half:
        params[n].data = params[n].data.float()
    try:
        return _loop(method, ctx, params, steps, lr, batch_size, seed, checkpoint_dir, checkpoint_every, resume,
                     refresh, robust, checkpoint_info)
    finally:
        for n, dtype in half.items():
            params[n].data = params[n].data.to(dtype)


def _loop(method, ctx, params, steps, lr, batch_size, seed, checkpoint_dir, checkpoint_every, resume,
          refresh, robust, checkpoint_info) -> dict:
    """One step after another (see `train`)."""
    acc = ctx.accelerator
    names, plist = list(params), list(params.values())
    optimizer = torch.optim.Adam(plist, lr=lr)
    start, seconds_before = 0, 0.0
    info_in = checkpoint_info or {}
    if resume and checkpoint_dir and (Path(checkpoint_dir) / "state.json").exists():
        info, tensors = load_training_state(Path(checkpoint_dir), {}, optimizer)
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(tensors[n])
        method.load_state({k[len("method.") :]: v for k, v in tensors.items() if k.startswith("method.")})
        if robust is not None:
            robust.load_state({k[len("robust.") :]: v for k, v in tensors.items() if k.startswith("robust.")})
        start = info["step"]
        seconds_before = float(info.get("seconds", 0.0))

    history: list[dict[str, float]] = []
    t0 = time.time()
    bar = tqdm(total=steps, initial=start, desc=method.name, disable=not (ctx.progress and acc.is_main_process))
    step = start
    for step in range(start, steps):
        generator = torch.Generator().manual_seed(seed * 100_003 + step)
        batch = method.batch(ctx, batch_size, generator)
        soft = nullcontext  # a fresh context per use: the mined soft prompts, read by θ's text encoder
        if robust is not None:
            robust.mine(ctx, step)
            batch, ids, vectors = robust.adversarial(method, batch, generator)
            soft = lambda: robust.active(ctx, ids, vectors)  # noqa: E731
        batch = shard(batch, acc.process_index, acc.num_processes)
        if refresh is not None:
            with ctx.autocast(), soft():
                grads = torch.autograd.grad(sum(method.loss(ctx, batch).values()), plist, allow_unused=True)
            grads = [acc.reduce(g, reduction="mean") if g is not None and acc.num_processes > 1 else g
                     for g in grads]
            refresh.unlearn(names, plist, grads, generator)
        with ctx.autocast(), soft():
            terms = method.loss(ctx, batch)
        total = sum(terms.values())
        if not torch.isfinite(total):
            raise ObliviateError(
                f"{method.name}: loss became {total.item()} at step {step}; nothing was written "
                "(lower --lr or check the model)")
        if method.combine is not None:
            per_term = {k: torch.autograd.grad(v, plist, retain_graph=True, allow_unused=True)
                        for k, v in terms.items() if v.requires_grad}
            grads = method.combine(ctx, {k: [g if g is not None else torch.zeros_like(p)
                                             for g, p in zip(gs, plist)] for k, gs in per_term.items()})
            for p, g in zip(plist, grads):
                p.grad = g
        else:
            total.backward()
        if acc.num_processes > 1:
            for p in plist:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad = acc.reduce(p.grad, reduction="mean")
        if method.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(plist, method.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        method.after_step(ctx, step, terms)
        history.append({k: float(v.detach()) for k, v in terms.items()})
        bar.update(1)
        bar.set_postfix({k: f"{v:.4f}" for k, v in history[-1].items()})
        done = method.should_stop(ctx, step, terms)
        if checkpoint_dir and checkpoint_every and (step + 1) % checkpoint_every == 0 and acc.is_main_process:
            tensors = {n: p.detach() for n, p in zip(names, plist)}
            tensors.update({f"method.{k}": v for k, v in method.state().items()})
            if robust is not None:
                tensors.update({f"robust.{k}": v for k, v in robust.state().items()})
            elapsed = seconds_before + time.time() - info_in.get("started", t0)
            save_training_state(Path(checkpoint_dir), {}, optimizer, tensors,
                                {"step": step + 1, "seconds": round(elapsed, 2),
                                 **({"identity": info_in["identity"]} if "identity" in info_in else {})})
        if done:
            break
    bar.close()
    return {"steps_run": step + 1 - start, "seconds_training": round(time.time() - t0, 2),
            "resumed_from_step": start or None, "seconds_before": round(seconds_before, 2),
            "loss_first": history[0] if history else {}, "loss_last": history[-1] if history else {}}
