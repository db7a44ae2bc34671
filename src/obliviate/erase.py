"""`erase()`: one request against one model, continuing its lineage, written atomically.

    pipe = load_pipeline("shapes")
    result = erase(pipe, Request(("star",)), method="duge", out="runs/1")

Flow: read the lineage's ledger (or start one), check the weights match it, resolve the
request against the model's concept world, let the method edit the weights (closed form, or
the shared loop), hash the result, append a ledger entry, and write the model (full, or only
the tensors that differ from the lineage's base) with its ledger to a temp folder that is
renamed into place at the end. Any error leaves nothing behind.
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import save_file

from .checkpoint import atomic_folder, checkpoint_meta
from .concepts import world_for
from .engine.body_edit import apply_channel_maps, body_stage
from .engine.body_hold import apply_hold, hold_stage
from .engine.context import EraseContext
from .engine.data import LatentCache
from .engine.harden import harden
from .engine.loop import train
from .engine.refresh import Refresh
from .engine.repair import repair
from .engine.robust import Robust, trains_soft_prompts
from .errors import ObliviateError
from .ledger import Ledger, LedgerEntry, pipeline_state, weights_sha256
from .methods.base import get_method, set_common
from .model_card import write_card
from .pipeline import DELTA_FILE, load_pipeline, save_pipeline
from .request import Request
from .resources import PeakMemory

# what --robust on a method that mines soft prompts can do on a family without the SD text path
ROBUST_WITHOUT_MINING = ("run --robust's hardening stage instead, which learns none: --robust-set mining=false "
                         "--robust-set harden_steps=100")


@dataclass(frozen=True)
class EraseResult:
    """What one request did: the new ledger entry and the lineage's ledger after it."""

    entry: LedgerEntry
    ledger: Ledger
    stats: dict


def lineage_of(pipe, new_lineage: bool = False) -> Ledger:
    """The ledger `pipe` carries from an earlier `erase()` in this process, else the ledger of
    the folder it was loaded from, verified, else a new one rooted at it."""
    source = getattr(pipe, "obliviate_source", None)
    info = getattr(pipe, "obliviate_info", {})
    held = getattr(pipe, "obliviate_ledger", None)
    if held is not None and not new_lineage:
        held.verify(pipe, source or "the pipeline in memory")
        return held
    folder = Path(source) if source and Path(source).is_dir() else None
    ledger = Ledger.load(folder) if folder and not new_lineage else None
    if ledger is not None:
        ledger.verify(pipe, folder)
        return ledger
    if info.get("lineage") and not new_lineage:
        raise ObliviateError(
            f"{source} was written by obliviate but has no ledger.json; pass --new-lineage to "
            "start a new lineage from it")
    return Ledger(base=getattr(pipe, "obliviate_model", str(source)),
                  base_sha256=weights_sha256(pipe), world=world_for(pipe).name)


def erase(
    pipe,
    request: Request,
    method: str = "duge",
    out: str | Path | None = None,
    steps: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    options: dict | None = None,
    save: str = "full",
    overwrite: bool = False,
    new_lineage: bool = False,
    checkpoint_every: int = 0,
    resume: bool = False,
    progress: bool = True,
    cache_dir: Path | None = None,
    accelerator: Accelerator | None = None,
    refresh: bool | dict = False,
    robust: bool | dict = False,
    gradient_checkpointing: bool = False,
) -> EraseResult:
    """Remove `request`'s concepts from `pipe` (edited in place) with `method`.

    With `out`, the edited model and its ledger are written there (a full diffusers folder,
    or with `save="delta"` only the changed tensors plus the base's path and hash).
    `refresh` (True, or a dict of `Refresh` settings) wraps a gradient method in refresh
    learning; its Fisher estimate is carried from the parent folder to `out`. `robust` (True,
    or a dict of `Robust` settings) adds adversarial soft prompts mined during the request
    (engine.robust); the lineage's pool of them is carried from the parent folder to `out`.
    """
    if save not in ("full", "delta"):
        raise ObliviateError(f"--save must be 'full' or 'delta', not {save!r}")
    out = Path(out) if out else None
    if out and out.exists() and not overwrite:
        raise ObliviateError(f"{out} exists; choose another --out or pass --overwrite")
    if not isinstance(checkpoint_every, int) or isinstance(checkpoint_every, bool) or checkpoint_every < 0:
        raise ObliviateError(f"--checkpoint-every must be 0 (off) or a number of steps, not {checkpoint_every!r}")
    options = dict(options or {})
    if robust:
        options = {**get_method(method).robust_defaults, **options}
    m = get_method(method, **options)
    set_common(m, steps=steps, lr=lr, batch_size=batch_size)
    ledger = lineage_of(pipe, new_lineage)
    world = world_for(pipe)
    resolved = request.resolve(world, ledger.removed())
    m.configure(resolved)  # choices that depend on the request, before the ledger records them
    accelerator = accelerator or Accelerator(cpu=str(pipe.device) == "cpu")
    parent_sha = ledger.head_sha256
    plugin = None
    if refresh:
        if m.closed_form:
            raise ObliviateError(f"--refresh wraps gradient methods; {method!r} is closed-form")
        source = getattr(pipe, "obliviate_source", None)
        plugin = Refresh.from_folder(Path(source) if source and Path(source).is_dir() else None,
                                     **(refresh if isinstance(refresh, dict) else {}))
    adversary = None
    if robust:
        from .families import family_of

        source = getattr(pipe, "obliviate_source", None)
        adversary = Robust.from_folder(Path(source) if source and Path(source).is_dir() else None,
                                       **{**m.robust_settings, **(robust if isinstance(robust, dict) else {})})
        if trains_soft_prompts(m, adversary):
            family_of(pipe).check_text_attacks(f"--robust on {method} (it learns soft prompts)",
                                               instead=ROBUST_WITHOUT_MINING)
        if m.closed_form:
            if not hasattr(m, "apply_robust"):
                raise ObliviateError(f"--robust: {method!r} is closed-form and has no robust variant")
        else:
            adversary.check(m)
    settings = {**m.settings(), "seed": seed, "processes": accelerator.num_processes,
                **({"refresh": plugin.settings()} if plugin else {}),
                **({"robust": adversary.settings()} if adversary else {})}
    identity = json.loads(json.dumps({"method": method, "request": resolved.to_json(), "settings": settings,
                                      "parent_sha256": parent_sha}, default=str))
    checkpoint_dir = out.with_name(f".{out.name}.ckpt") if out and (checkpoint_every or resume) else None
    earlier = checkpoint_meta(checkpoint_dir) if resume and not m.closed_form else None
    if earlier is not None:
        _check_same_request(checkpoint_dir, earlier, identity)
    start = time.time()
    ctx = EraseContext(
        pipe=pipe, world=world, request=resolved, history=ledger.history(), accelerator=accelerator,
        model_sha=parent_sha, base_sha=ledger.base_sha256, cache=LatentCache(cache_dir), seed=seed,
        base_loader=lambda: load_pipeline(ledger.base, device=pipe.device), progress=progress,
        train_group=None if getattr(m, "lora_rank", 0) or m.closed_form else m.param_group,
    )
    if gradient_checkpointing:
        set_gradient_checkpointing(pipe, ctx.family, True)
    with PeakMemory(pipe.device) as memory:
        if m.closed_form:
            stats = m.apply_robust(ctx, adversary) if adversary else m.apply(ctx)
        else:
            body = body_stage(ctx, adversary)  # in place of the hardening stage, where it applies
            hardening = adversary and adversary.harden_steps and not body
            held = hold_stage(ctx, adversary) if hardening else None  # read before the stage
            hardened = harden(ctx, adversary) if hardening else {}
            m.prepare(ctx)
            miner = adversary if adversary and adversary.mining else None
            if miner:
                miner.prepare(ctx)
            stats = train(m, ctx, steps=m.step_budget(), lr=m.lr, batch_size=m.batch_size, seed=seed,
                          checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                          resume=resume, refresh=plugin, robust=miner,
                          checkpoint_info={"identity": identity, "started": start})
            stats.update(hardened)
            if body:
                stats["body_layers"] = apply_channel_maps(*body)
            if held:
                stats["hold_layers"] = apply_hold(ctx, held)
            if adversary and adversary.repair_steps:
                stats.update(repair(ctx, adversary))
    if gradient_checkpointing:
        set_gradient_checkpointing(pipe, ctx.family, False)
    for name in ctx.family.components(pipe):
        getattr(pipe, name).requires_grad_(False).eval()
    new_sha = weights_sha256(pipe)
    if new_sha == parent_sha:
        raise ObliviateError(
            f"{method} left the weights unchanged, so nothing was removed and nothing was recorded; "
            "give it steps to work with (--steps 1 or more) or a larger --lr")
    resumed_from = stats.get("resumed_from_step") if isinstance(stats, dict) else None
    seconds = round(time.time() - start + (stats.get("seconds_before", 0.0) if resumed_from else 0.0), 2)
    entry = LedgerEntry(
        step=len(ledger.entries) + 1, method=method, request=resolved.to_json(),
        settings=settings,
        seconds=seconds, peak_memory_mb=round(memory.peak_mb, 1),
        parent_sha256=parent_sha, weights_sha256=new_sha, storage=save,
        bytes_stored=0, out=str(out.resolve()) if out else "",
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        resumed_from_step=resumed_from,
        steps_run=(stats["steps_run"] + (resumed_from or 0)) if "steps_run" in stats else None,
    )
    if out and accelerator.is_main_process:
        entry = save_model(pipe, out, ledger, entry, overwrite=overwrite, refresh=plugin, robust=adversary)
    if checkpoint_dir and checkpoint_dir.exists():
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    ledger = ledger.append(entry)
    pipe.obliviate_ledger = ledger  # the next erase() on this object continues the lineage
    if out:
        pipe.obliviate_source = str(out)
    return EraseResult(entry, ledger, stats)


def set_gradient_checkpointing(pipe, family, on: bool) -> None:
    """Turn activation recomputation on or off in the denoiser and the text encoders (with the
    attention recorders installed for the while: the recomputed forward must match)."""
    from .engine.attention import keep_recorders

    for name in family.components(pipe):
        module = getattr(pipe, name)
        if name == family.denoiser:
            module.enable_gradient_checkpointing() if on else module.disable_gradient_checkpointing()
            keep_recorders(module, on)
        elif name != "vae" and getattr(module, "supports_gradient_checkpointing", False):
            switch = ("activation_checkpointing_" if hasattr(module, "activation_checkpointing_enable")
                      else "gradient_checkpointing_") + ("enable" if on else "disable")
            getattr(module, switch)()


def _check_same_request(folder: Path, meta: dict, identity: dict) -> None:
    """Refuse to resume a checkpoint that another request (or other settings) wrote."""
    theirs = meta.get("identity")
    if theirs == identity:
        return
    if not isinstance(theirs, dict):
        why = "it does not record which request wrote it"
    else:
        names = lambda r: ",".join(t.get("name", "?") for t in (r or {}).get("targets", []))  # noqa: E731
        diff = [k for k in ("method", "request", "settings", "parent_sha256") if theirs.get(k) != identity.get(k)]
        what = {"method": f"method {theirs.get('method')}", "request": f"request {names(theirs.get('request'))}",
                "settings": "other settings or seed", "parent_sha256": "another parent model"}
        why = "it belongs to " + ", ".join(what[k] for k in diff)
    raise ObliviateError(f"--resume: the checkpoint {folder} is not of this request ({why}); repeat that "
                         f"request to resume it, or remove {folder} to start over")


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def save_model(pipe, out: Path, ledger: Ledger, entry: LedgerEntry | None = None,
               storage: str = "full", overwrite: bool = False, refresh: Refresh | None = None,
               robust: Robust | None = None) -> LedgerEntry | None:
    """Write `pipe` with its ledger (plus `entry`, if given) to `out` atomically.

    `storage="delta"` writes only the tensors that differ from the lineage's base, with the
    base's name and sha256. Returns `entry` with the bytes it took on disk filled in.
    """
    storage = entry.storage if entry else storage
    info = {**getattr(pipe, "obliviate_info", {}), "lineage": True}
    info.pop("delta_of", None)
    with atomic_folder(out, overwrite=overwrite) as tmp:
        if storage == "full":
            save_pipeline(pipe, tmp)
        else:
            base_state = pipeline_state(load_pipeline(ledger.base, device="cpu"))
            changed = {k: v.detach().cpu().contiguous() for k, v in pipeline_state(pipe).items()
                       if not torch.equal(v.detach().cpu(), base_state[k])}
            save_file(changed, tmp / DELTA_FILE)
            info.update({"delta_of": ledger.base, "base_sha256": ledger.base_sha256})
        (tmp / "obliviate.json").write_text(json.dumps(info, indent=1))
        if refresh is not None:
            refresh.save(tmp)
        if robust is not None:
            robust.save(tmp)
        if entry is not None:
            ledger = ledger.append(entry)
        write_card(tmp, ledger, extra={"Storage": "delta: only the tensors that differ from the base "
                                                  "(load with obliviate)" if storage == "delta" else "full"})
        if entry is not None:
            entry = LedgerEntry(**{**entry.__dict__, "bytes_stored": _folder_bytes(tmp)})
            ledger = ledger.truncated(len(ledger.entries) - 1).append(entry)
        ledger.save(tmp)
    return entry


def rollback(folder: str | Path, to: int, out: str | Path, overwrite: bool = False) -> Ledger:
    """Restore the model of lineage step `to` (0 = the base) from `folder`'s ledger to `out`.

    The weights come from the folder that step wrote (or the base) and must hash exactly to
    what the ledger recorded; the written ledger ends at step `to`.
    """
    folder, out = Path(folder), Path(out)
    ledger = Ledger.load(folder)
    if ledger is None:
        raise ObliviateError(f"{folder} has no ledger.json; nothing to roll back")
    if not 0 <= to <= len(ledger.entries):
        raise ObliviateError(f"--to must be between 0 and {len(ledger.entries)} for {folder}")
    if out.exists() and not overwrite:
        raise ObliviateError(f"{out} exists; choose another --out or pass --overwrite")
    if to == len(ledger.entries):
        source, want = str(folder), ledger.head_sha256
    elif to == 0:
        source, want = ledger.base, ledger.base_sha256
    else:
        source, want = ledger.entries[to - 1].out, ledger.entries[to - 1].weights_sha256
        if not Path(source).exists():
            raise ObliviateError(f"step {to} was written to {source}, which no longer exists")
    pipe = load_pipeline(source)
    if weights_sha256(pipe) != want:
        raise ObliviateError(f"the weights in {source} no longer match step {to} of the ledger")
    truncated = ledger.truncated(to)
    save_model(pipe, out, truncated, overwrite=overwrite)
    return truncated
