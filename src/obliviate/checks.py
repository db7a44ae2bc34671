"""Cheap checks of command-line values, run before any model is loaded.

Each raises ObliviateError with one line naming the problem and the fix, so that a bad
`--device`, count or output path costs nothing and writes nothing.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from .errors import ObliviateError


def check_device(device: str) -> str:
    """`cpu`, `cuda`, `cuda:N` or `mps`, and only one this machine has."""
    import torch

    text = str(device).strip()
    try:
        parsed = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise ObliviateError(f"--device {device!r} is not a device; use cpu or cuda (cuda:N for the N-th GPU)") \
            from None
    if parsed.type == "cpu":
        return text
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ObliviateError(f"--device {device}: no CUDA GPU is visible on this machine; use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ObliviateError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s); "
                                 "use cuda:0 or --device cpu")
        return text
    if parsed.type == "mps" and torch.backends.mps.is_available():
        return text
    raise ObliviateError(f"--device {device!r} is not available here; use cpu or cuda")


def check_at_least(flag: str, value, minimum: int) -> None:
    """Refuse an integer option below `minimum` (e.g. `-n 0`)."""
    if value is not None and value < minimum:
        raise ObliviateError(f"{flag} must be at least {minimum}, not {value}")


def check_seed(value) -> None:
    """Seeds are 0 .. 2**31-1 (every generator obliviate seeds takes them)."""
    if not 0 <= value < 2**31:
        raise ObliviateError(f"--seed must be between 0 and {2**31 - 1}, not {value}")


def check_finite(flag: str, value, positive: bool = False) -> None:
    """Refuse a float option that is nan/inf (or not > 0 when `positive`)."""
    if value is None:
        return
    if not math.isfinite(value) or (positive and value <= 0):
        raise ObliviateError(f"{flag} must be a finite number{' above 0' if positive else ''}, not {value}")


def _writable_parent(path: Path, flag: str) -> None:
    """The nearest existing ancestor of `path` must be a folder this process can write in."""
    parent = path.parent if str(path.parent) else Path(".")
    probe = parent
    while not probe.exists():
        if probe.is_symlink() or probe == probe.parent:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ObliviateError(f"{flag} {path}: {probe} is a file, not a folder; choose another path")
    if not probe.exists() or not os.access(probe, os.W_OK | os.X_OK):
        raise ObliviateError(f"{flag} {path}: cannot write in {probe}; choose a path in a writable folder")


def check_output_file(path: str | os.PathLike, flag: str, suffixes: tuple[str, ...] = (),
                      overwrite: bool = True) -> Path:
    """A file output: right suffix, not a folder, its folder writable (or creatable)."""
    if not str(path).strip():
        raise ObliviateError(f"{flag} is empty; name the file to write")
    out = Path(path)
    if suffixes and out.suffix.lower() not in suffixes:
        raise ObliviateError(f"{flag} {out} must end in {' or '.join(suffixes)}")
    if out.is_dir():
        raise ObliviateError(f"{flag} {out} is a folder; give a file name")
    if out.exists() and not os.access(out, os.W_OK):
        raise ObliviateError(f"{flag} {out} exists and cannot be written; choose another path")
    if out.exists() and not overwrite:
        raise ObliviateError(f"{flag} {out} exists; choose another path or pass --overwrite")
    _writable_parent(out, flag)
    return out


def check_output_folder(path: str | os.PathLike, flag: str = "--out", overwrite: bool = False) -> Path:
    """A folder output: absent (or `overwrite`), and its parent writable (or creatable)."""
    out = Path(path)
    if not str(path).strip():
        raise ObliviateError(f"{flag} is empty; name the folder to write")
    if out.exists() and not overwrite:
        raise ObliviateError(f"{out} exists; choose another {flag} or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise ObliviateError(f"{flag} {out} is a file; give a folder name")
    _writable_parent(out, flag)
    return out
