"""An erasure request: which concepts to remove, what they should become, what must survive.

`Request` is what a user says ("remove star"); `resolve()` checks it against the model's
concept world and the lineage's history and fills in the defaults: an anchor of the same
kind for each target, and the related concepts to preserve.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .concepts import ConceptWorld, Target
from .errors import ObliviateError


@dataclass(frozen=True)
class Request:
    """What to remove (`concepts`, one or several removed together), optionally what each
    should look like instead (`anchor`) and what must be kept (`preserve`)."""

    concepts: tuple[str, ...]
    anchor: str | None = None
    preserve: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "concepts", tuple(self.concepts))
        object.__setattr__(self, "preserve", tuple(self.preserve))

    def resolve(self, world: ConceptWorld, removed_before: list[str] | tuple[str, ...] = ()) -> "ResolvedRequest":
        """Validate against `world` and fill defaults; earlier removals are never anchors."""
        if not self.concepts or not any(c.strip() for c in self.concepts):
            raise ObliviateError("empty request: name at least one concept with --concept")
        targets = [world.target(c) for c in self.concepts]
        names = {t.name for t in targets}
        if len(names) < len(targets):
            raise ObliviateError("the same concept is named twice in one request")
        avoid = names | set(removed_before)
        if self.anchor is not None:
            anchor_name = self.anchor.strip()
            if world.name != "free":
                anchor_target = world.target(anchor_name)
                anchor_name = anchor_target.name
                for t in targets:
                    if anchor_target.kind != t.kind:
                        raise ObliviateError(
                            f"anchor {anchor_name!r} is a {anchor_target.kind}, but {t.name!r} is "
                            f"a {t.kind}; pick an anchor of the same kind")
            if anchor_name.lower() in {n.lower() for n in names}:
                raise ObliviateError(f"the anchor {anchor_name!r} equals a target; pick another --anchor")
            anchors = tuple(anchor_name for _ in targets)
        else:
            anchors = tuple(world.default_anchor(t, avoid) for t in targets)
        if self.preserve:
            preserve = [world.target(p).name if world.name != "free" else p for p in self.preserve]
            clash = set(preserve) & names
            if clash:
                raise ObliviateError(f"{sorted(clash)[0]!r} is both removed and preserved")
        else:
            preserve = []
            for t in targets:
                preserve += [p for p in world.default_preserve(t, avoid) if p not in preserve]
        return ResolvedRequest(tuple(targets), anchors, tuple(preserve))


@dataclass(frozen=True)
class ResolvedRequest:
    """A validated request: targets with their anchors (same order) and concepts to keep."""

    targets: tuple[Target, ...]
    anchors: tuple[str, ...]
    preserve: tuple[str, ...] = field(default=())

    @property
    def names(self) -> list[str]:
        """Canonical names of the targets."""
        return [t.name for t in self.targets]

    def to_json(self) -> dict:
        """Serialisable form, stored in the ledger."""
        return {"targets": [asdict(t) for t in self.targets], "anchors": list(self.anchors),
                "preserve": list(self.preserve)}

    @classmethod
    def from_json(cls, data: dict) -> "ResolvedRequest":
        """Inverse of `to_json`."""
        targets = tuple(Target(t["name"], t["kind"], tuple(t["words"])) for t in data["targets"])
        return cls(targets, tuple(data["anchors"]), tuple(data["preserve"]))
