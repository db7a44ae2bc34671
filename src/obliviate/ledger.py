"""The ledger: the continual history of one model lineage, stored beside its weights.

Every erasure request appends an entry (method, request, settings, seconds, memory, bytes
stored, weight hashes before and after). A model folder's ledger must match its weights:
`verify()` recomputes the hash, so a folder edited behind obliviate's back is refused rather
than silently continued.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .errors import ObliviateError
from .request import ResolvedRequest

LEDGER_FILE = "ledger.json"
HASHED_COMPONENTS = ("unet", "text_encoder", "vae")


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, in sorted name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def pipeline_state(pipe) -> dict[str, torch.Tensor]:
    """All weights of the hashed components, keyed `component.parameter`."""
    return {f"{c}.{k}": v for c in HASHED_COMPONENTS for k, v in getattr(pipe, c).state_dict().items()}


def weights_sha256(pipe) -> str:
    """Hash of a pipeline's UNet, text encoder and VAE weights: its identity in a ledger."""
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
        return {"base": self.base, "base_sha256": self.base_sha256, "world": self.world,
                "entries": [asdict(e) for e in self.entries]}

    def save(self, folder: Path) -> None:
        """Write `ledger.json` into `folder`."""
        (Path(folder) / LEDGER_FILE).write_text(json.dumps(self.to_json(), indent=1))

    @classmethod
    def load(cls, folder: Path) -> "Ledger | None":
        """The ledger of a model folder, or None if it has none."""
        path = Path(folder) / LEDGER_FILE
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        entries = tuple(LedgerEntry(**e) for e in data["entries"])
        return cls(data["base"], data["base_sha256"], data["world"], entries)

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
