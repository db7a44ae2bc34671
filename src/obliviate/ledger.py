"""The ledger: the continual history of one model lineage, stored beside its weights.

Every erasure request appends an entry (method, request, settings, seconds, memory, bytes
stored, weight hashes before and after). A model folder's ledger must match its weights:
`verify()` recomputes the hash, so a folder edited behind obliviate's back is refused rather
than silently continued. The whole chain is checked when a ledger is read (`Ledger.load`):
each entry's parent hash is the previous entry's weights hash (the first's is the base's),
steps count 1, 2, ..., and a digest over every entry, written with the ledger, still matches;
an edited, relabelled or truncated ledger is refused in one line.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path

import torch

from .errors import ObliviateError
from .request import ResolvedRequest

LEDGER_FILE = "ledger.json"


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, in sorted name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def pipeline_state(pipe) -> dict[str, torch.Tensor]:
    """All weights of the pipeline's components (the family's order: denoiser, text
    encoders, VAE), keyed `component.parameter`."""
    from .families import family_of

    return {f"{c}.{k}": v for c in family_of(pipe).components(pipe) for k, v in getattr(pipe, c).state_dict().items()}


def weights_sha256(pipe) -> str:
    """Hash of a pipeline's weights (denoiser, text encoders, VAE): its identity in a ledger."""
    return state_sha256(pipeline_state(pipe))


@dataclass(frozen=True)
class LedgerEntry:
    """One request of the lineage, as it was carried out."""

    step: int
    method: str
    request: dict
    settings: dict
    seconds: float
    peak_memory_mb: float
    parent_sha256: str
    weights_sha256: str
    storage: str
    bytes_stored: int
    out: str
    created: str
    metrics: dict | None = None
    resumed_from_step: int | None = None  # set when the request was resumed from a checkpoint
    steps_run: int | None = None  # optimiser steps the request took (a method may stop early or go on)

    @property
    def resolved(self) -> ResolvedRequest:
        """The request as a ResolvedRequest (targets, anchors, preserve)."""
        return ResolvedRequest.from_json(self.request)


@dataclass(frozen=True)
class Ledger:
    """A lineage: the model it started from and the requests applied to it, in order."""

    base: str
    base_sha256: str
    world: str
    entries: tuple[LedgerEntry, ...] = field(default=())

    @property
    def head_sha256(self) -> str:
        """Hash the weights of the newest model of the lineage must have."""
        return self.entries[-1].weights_sha256 if self.entries else self.base_sha256

    def removed(self) -> list[str]:
        """Every concept removed so far, in request order."""
        return [t.name for e in self.entries for t in e.resolved.targets]

    def history(self) -> list[ResolvedRequest]:
        """Earlier requests, oldest first (methods use them to keep removals removed)."""
        return [e.resolved for e in self.entries]

    def append(self, entry: LedgerEntry) -> "Ledger":
        """A new ledger with `entry` added."""
        return replace(self, entries=(*self.entries, entry))

    def truncated(self, steps: int) -> "Ledger":
        """The ledger as it was after `steps` requests (for rollback)."""
        return replace(self, entries=self.entries[:steps])

    def to_json(self) -> dict:
        """The ledger as written to `ledger.json`, with its digest."""
        body = {"base": self.base, "base_sha256": self.base_sha256, "world": self.world,
                "entries": [asdict(e) for e in self.entries]}
        return {**body, "digest": ledger_digest(body)}

    def save(self, folder: Path) -> None:
        """Write `ledger.json` into `folder`."""
        (Path(folder) / LEDGER_FILE).write_text(json.dumps(self.to_json(), indent=1))

    @classmethod
    def load(cls, folder: Path) -> "Ledger | None":
        """The ledger of a model folder (its whole chain checked), or None if it has none.

        A malformed or edited ledger is an ObliviateError naming what is wrong.
        """
        path = Path(folder) / LEDGER_FILE
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise _broken(path, f"not readable JSON ({str(exc).splitlines()[0]})") from None
        ledger = _from_json(path, data)
        ledger.check_chain(path, data.get("digest"))
        return ledger

    def check_chain(self, path: Path | str, digest: str | None) -> None:
        """Refuse a chain whose steps, parent hashes or digest do not line up."""
        parent = self.base_sha256
        for i, e in enumerate(self.entries, 1):
            if e.step != i:
                raise _broken(path, f"entry {i} says it is step {e.step}")
            if e.parent_sha256 != parent:
                raise _broken(path, f"step {i}'s parent hash {e.parent_sha256[:12]} is not the weights "
                                    f"hash {parent[:12]} before it")
            parent = e.weights_sha256
        if digest != self.to_json()["digest"]:
            raise _broken(path, "its digest does not match its entries (edited by hand, or written "
                                "by an obliviate older than the digest)")

    def verify(self, pipe, folder: Path | str) -> None:
        """Refuse weights whose hash differs from the one the ledger recorded."""
        actual = weights_sha256(pipe)
        if actual != self.head_sha256:
            raise ObliviateError(
                f"the weights in {folder} do not match its ledger (sha256 {actual[:12]} != "
                f"{self.head_sha256[:12]}); they were changed outside obliviate, start a new lineage "
                "with --new-lineage")

    def describe(self) -> str:
        """Human-readable lineage, one line per request."""
        lines = [f"base  {self.base}  sha256 {self.base_sha256[:12]}  world {self.world}"]
        for e in self.entries:
            r = e.resolved
            pairs = ", ".join(f"{t.name}->{a or '∅'}" for t, a in zip(r.targets, r.anchors))
            lines.append(f"{e.step:>4}  {e.method:<10} {pairs:<28} {e.seconds:7.1f} s  "
                         f"{e.bytes_stored / 1e6:7.2f} MB {e.storage:<5}  sha256 {e.weights_sha256[:12]}  {e.out}")
        return "\n".join(lines)


def ledger_digest(body: dict) -> str:
    """sha256 of a ledger's canonical JSON (base, world and every entry), without the digest."""
    canonical = json.dumps({k: body[k] for k in ("base", "base_sha256", "world", "entries")},
                           sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _broken(path, why: str) -> ObliviateError:
    return ObliviateError(f"{path} is not a valid ledger: {why}; restore the folder obliviate wrote, "
                          "or pass --new-lineage to start a new lineage from its weights")


_FIELD_TYPES = {"int": int, "str": str, "dict": dict, "float": (int, float)}


def _from_json(path, data) -> Ledger:
    """A Ledger from parsed `ledger.json`, every key and type checked (one-line errors)."""
    if not isinstance(data, dict):
        raise _broken(path, "it is not a JSON object")
    for key in ("base", "base_sha256", "world"):
        if not isinstance(data.get(key), str):
            raise _broken(path, f"{key!r} is missing or not text")
    if not isinstance(data.get("entries"), list):
        raise _broken(path, "'entries' is missing or not a list")
    declared = {f.name: f for f in fields(LedgerEntry)}
    entries = []
    for i, raw in enumerate(data["entries"], 1):
        if not isinstance(raw, dict):
            raise _broken(path, f"entry {i} is not a JSON object")
        unknown = set(raw) - set(declared)
        if unknown:
            raise _broken(path, f"entry {i} has an unknown key {sorted(unknown)[0]!r}")
        for name, f in declared.items():
            if name not in raw:
                if f.default is MISSING:
                    raise _broken(path, f"entry {i} has no {name!r}")
                continue
            kinds = [k.strip() for k in str(f.type).split("|")]
            value = raw[name]
            ok = (value is None and "None" in kinds) or any(
                isinstance(value, _FIELD_TYPES[k]) and not isinstance(value, bool)
                for k in kinds if k in _FIELD_TYPES)
            if not ok:
                raise _broken(path, f"entry {i}'s {name!r} is {type(value).__name__}, not {f.type}")
        entry = LedgerEntry(**raw)
        try:
            entry.resolved
        except (KeyError, TypeError, ValueError, AttributeError):
            raise _broken(path, f"entry {i}'s request is malformed") from None
        entries.append(entry)
    return Ledger(data["base"], data["base_sha256"], data["world"], tuple(entries))
