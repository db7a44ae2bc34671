"""Saving and loading training state without pickle: tensors in safetensors, the rest JSON.

Used by every long job (training the shipped model, erasure runs) so that a checkpoint can
be resumed and can never execute code when it is read.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import json
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file

from .errors import ObliviateError


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


def checkpoint_meta(folder: Path | None) -> dict | None:
    """The metadata (`state.json`) of a checkpoint folder, or None if there is no checkpoint.

    A checkpoint whose metadata cannot be read is an error (one line), not a fresh start.
    """
    if folder is None or not (Path(folder) / "state.json").exists():
        return None
    try:
        meta = json.loads((Path(folder) / "state.json").read_text())
    except (OSError, ValueError) as exc:
        raise ObliviateError(f"the checkpoint {folder} is unreadable ({exc}); remove it to start over") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise ObliviateError(f"the checkpoint {folder} is malformed (no step); remove it to start over")
    return meta


class OutputExists(ObliviateError, FileExistsError):
    """An output folder is already there: one-line error for users, FileExistsError for code."""


_HOST = socket.gethostname().replace("-", "_") or "host"


def _owner_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def clean_stale(target: Path) -> list[Path]:
    """Remove temp folders beside `target` left by runs killed mid-save (`kill -9`, power loss).

    Temp folders are named `.NAME.tmp-HOST-PID-RANDOM` (and `.NAME.old-HOST-PID-RANDOM` while
    an `--overwrite` swaps folders); one whose process is gone on this host is removed, one
    of a live process or of another host is left alone. Returns the folders removed.
    """
    target = Path(target)
    removed = []
    if not target.parent.is_dir():
        return removed
    for kind in ("tmp", "old"):
        for path in target.parent.glob(f".{glob.escape(target.name)}.{kind}-*"):
            parts = path.name[len(f".{target.name}.{kind}-"):].split("-")
            if len(parts) < 3 or parts[0] != _HOST or not parts[1].isdigit():
                continue
            pid = int(parts[1])
            if pid != os.getpid() and not _owner_alive(pid):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def _rename_no_replace(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`, failing with FileExistsError if `dst` exists (even if empty).

    Linux's renameat2(RENAME_NOREPLACE) makes the check and the rename one step; elsewhere a
    plain rename of a folder onto an existing non-empty folder fails as well.
    """
    if _renameat2 is not None:
        if _renameat2(-100, os.fsencode(src), -100, os.fsencode(dst), 1) == 0:  # AT_FDCWD, NOREPLACE
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(err, os.strerror(err), str(dst))
        if err not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), str(dst))
    if dst.exists() or dst.is_symlink():
        raise FileExistsError(errno.EEXIST, "exists", str(dst))
    try:
        os.rename(src, dst)
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise FileExistsError(exc.errno, exc.strerror, str(dst)) from None
        raise


def _load_renameat2():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()


@contextmanager
def atomic_folder(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside `target`; on success it becomes `target` in one rename.

    On any exception the temp folder is removed and `target` is left untouched, so a failed
    run never leaves a half-written output. Without `overwrite` the final rename never
    replaces a folder, not even one another run wrote while this one worked: that run keeps
    its output and this one fails with one line (ObliviateError). Temp folders of runs killed
    before they finished are cleaned first (`clean_stale`).
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise OutputExists(f"{target} exists; choose another --out or pass --overwrite")
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{_HOST}-{os.getpid()}-", dir=target.parent))
    try:
        yield tmp
        if overwrite and target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-{_HOST}-{os.getpid()}-", dir=target.parent))
            os.replace(target, old / "x")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                _rename_no_replace(tmp, target)
            except FileExistsError:
                raise OutputExists(
                    f"{target} was written by another run while this one worked; it was left as it "
                    "is and this run's result discarded: choose another --out or pass --overwrite") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
