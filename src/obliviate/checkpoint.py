"""Saving and loading training state without pickle: tensors in safetensors, the rest JSON.

Used by every long job (training the shipped model, erasure runs) so that a checkpoint can
be resumed and can never execute code when it is read.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file


def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer's state dict into a flat tensor dict and JSON-able metadata."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, per_param in state["state"].items():
        for key, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_flat(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    """Inverse of `optimizer_to_flat`: load the state back into `optimizer`."""
    state: dict[int, dict] = {}
    for name, value in {**tensors, **meta["scalars"]}.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_training_state(
    folder: Path,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    meta: dict | None = None,
) -> None:
    """Write modules, optimizer and metadata to `folder` atomically (temp dir, then rename)."""
    with atomic_folder(folder, overwrite=True) as tmp:
        for name, module in modules.items():
            sd = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
            save_file(sd, tmp / f"{name}.safetensors")
        info = dict(meta or {})
        if optimizer is not None:
            tensors, info["optimizer"] = optimizer_to_flat(optimizer)
            save_file(tensors, tmp / "optimizer.safetensors")
        if extra_tensors:
            save_file({k: v.contiguous() for k, v in extra_tensors.items()}, tmp / "extra.safetensors")
        (tmp / "state.json").write_text(json.dumps(info))


def load_training_state(
    folder: Path,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer | None = None,
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Load what `save_training_state` wrote; returns (metadata, extra tensors)."""
    info = json.loads((folder / "state.json").read_text())
    for name, module in modules.items():
        module.load_state_dict(load_file(folder / f"{name}.safetensors"))
    if optimizer is not None and "optimizer" in info:
        optimizer_from_flat(optimizer, load_file(folder / "optimizer.safetensors"), info["optimizer"])
    extra = load_file(folder / "extra.safetensors") if (folder / "extra.safetensors").exists() else {}
    return info, extra


@contextmanager
def atomic_folder(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside `target`; on success it replaces `target` in one rename.

    On any exception the temp folder is removed and `target` is left untouched, so a failed
    run never leaves a half-written output.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; choose another --out or pass --overwrite")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
