"""What a model knows about its concepts: the world plug-in that requests and methods read.

The engine and the methods never name the shapes world. They ask a `ConceptWorld` for:
which concept a name means, its kind, a default anchor, what is related, prompts that name
a concept in context, and prompts unrelated to a set of concepts (the memory bank).

- `ShapesWorld` answers from the shipped vocabulary (`shapes/vocab.py`).
- `FreeTextWorld` serves real Stable Diffusion models, where a concept is free text
  ("Van Gogh", "a church") and prompts come from generic templates.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .errors import ObliviateError
from .shapes import vocab


@dataclass(frozen=True)
class Target:
    """A concept to remove: its canonical `name`, `kind`, and the word(s) prompts use."""

    name: str
    kind: str
    words: tuple[str, ...]


class ConceptWorld:
    """Interface of a concept vocabulary (see module docstring)."""

    name = "abstract"

    def target(self, name: str) -> Target:  # pragma: no cover - interface
        raise NotImplementedError

    def default_anchor(self, target: Target, avoid: set[str]) -> str:  # pragma: no cover
        raise NotImplementedError

    def default_preserve(self, target: Target, avoid: set[str]) -> list[str]:  # pragma: no cover
        raise NotImplementedError

    def prompt_pairs(self, target: Target, anchor: str, n: int, rng: np.random.Generator, synonyms: bool = False,
                     avoid: set[str] = frozenset()) -> list[tuple[str, str]]:  # pragma: no cover
        raise NotImplementedError

    def prompts_naming(self, concept: str, n: int, rng: np.random.Generator,
                       avoid: set[str] = frozenset()) -> list[str]:  # pragma: no cover
        raise NotImplementedError

    def memory_prompts(self, avoid: set[str], n: int, rng: np.random.Generator,
                       named: set[str] = frozenset(), stratified: bool = False) -> list[str]:  # pragma: no cover
        raise NotImplementedError

    def real_images(self, concept: str, n: int, seed: int) -> np.ndarray:  # pragma: no cover
        """`n` real images (uint8, N x H x W x 3) showing `concept`, for few-shot methods."""
        raise NotImplementedError

    def _words(self, concept: str) -> re.Pattern:
        """Any of `concept`'s words as a whole word, any case (longest first)."""
        words = sorted(self.target(concept).words, key=len, reverse=True)
        return re.compile(r"\b(?:" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)

    def mentions(self, prompt: str, concepts) -> bool:
        """Whether `prompt` names any of `concepts` by any of its words (whole words, any case)."""
        return any(self._words(c).search(prompt) for c in concepts)

    def rename(self, prompt: str, mapping: dict[str, str]) -> str:
        """`prompt` with every word naming a concept in `mapping` (whole words, any case)
        replaced by the name of the concept it maps to."""
        for concept, to in mapping.items():
            prompt = self._words(concept).sub(to, prompt)
        return prompt




class ShapesWorld(ConceptWorld):
    """Concepts of the shipped shapes world."""

    name = "shapes"

    def target(self, name: str) -> Target:
        try:
            c = vocab.concept(name)
        except KeyError as exc:
            raise ObliviateError(exc.args[0]) from None
        return Target(c.name, c.kind, c.words)

    def default_anchor(self, target: Target, avoid: set[str]) -> str:
        """The first concept of the same kind, not removed, related neither to an earlier
        removal (`avoid`, which may hold the target) nor to the target; failing that, one
        related only to the target; then any. A concept related to an earlier removal has
        been moved by it and is what its replay holds apart: sending solid there (dotted,
        striped's neighbour) capped solid's UA at 0.83-0.90 on the neighbours preset, where
        its own relative reached 0.88-0.92 (docs/experiments.md, session 24)."""
        removed = set(avoid) | {target.name}
        near_earlier = {r for c in removed - {target.name} if c in vocab.CONCEPTS for r in vocab.CONCEPTS[c].related}
        near_target = set(vocab.CONCEPTS[target.name].related)
        same_kind = [c.name for c in vocab.BY_KIND[target.kind] if c.name not in removed]
        if not same_kind:
            raise ObliviateError(f"no {target.kind} is left to anchor {target.name!r}; pass --anchor")
        return min(same_kind, key=lambda n: (n in near_earlier, n in near_target))

    def default_preserve(self, target: Target, avoid: set[str]) -> list[str]:
        """Every other concept of the target's kind that has not been removed."""
        return [c.name for c in vocab.BY_KIND[target.kind]
                if c.name != target.name and c.name not in avoid]

    def prompt_pairs(self, target, anchor, n, rng, synonyms=False, avoid=frozenset()):
        """`n` (target prompt, anchor prompt) pairs: the same caption with the target's word
        replaced by the anchor's; the other slots random, never the target nor a concept in
        `avoid` (pass the concepts removed earlier, or the pairs draw them again)."""
        templates = [t for t in vocab.ERASURE_TEMPLATES if vocab.names(t, target.kind)]
        pairs = []
        for _ in range(n):
            template = templates[rng.integers(len(templates))]
            word = target.words[rng.integers(len(target.words))] if synonyms else target.name
            state = rng.bit_generator.state
            p_tgt = vocab.fill(template, {target.kind: word}, rng, {target.name, *avoid}, synonyms)
            rng.bit_generator.state = state
            p_anc = vocab.fill(template, {target.kind: anchor}, rng, {target.name, *avoid}, synonyms)
            pairs.append((p_tgt, p_anc))
        return pairs

    def prompts_naming(self, concept, n, rng, avoid=frozenset()):
        """`n` training-style prompts naming `concept`, other slots avoiding `avoid`."""
        c = vocab.concept(concept)
        templates = [t for t in vocab.ERASURE_TEMPLATES if vocab.names(t, c.kind)]
        return [vocab.fill(templates[rng.integers(len(templates))], {c.kind: c.name}, rng,
                           set(avoid) | {c.name}) for _ in range(n)]

    def memory_prompts(self, avoid, n, rng, named=frozenset(), stratified=False):
        """`n` prompts naming only concepts outside `avoid` (the replay memory bank); with
        `named` (kinds), only templates that fill a slot of each of those kinds, so that no
        prompt leaves the model free to draw an avoided concept of that kind (a prompt that
        names no style draws stripes a quarter of the time). `stratified`: the slots of the
        `named` kinds are dealt from shuffled decks of their concepts, so each concept outside
        `avoid` is named equally often (±1) instead of as a random draw falls."""
        exhausted = [k for k, cs in vocab.BY_KIND.items() if all(c.name in avoid for c in cs)]
        kinds = sorted(set(named) - set(exhausted))
        templates = [t for t in vocab.TEMPLATES if not any(vocab.names(t, k) for k in exhausted)
                     and all(vocab.names(t, k) for k in kinds)]
        decks = {k: _deck([c.name for c in vocab.BY_KIND[k] if c.name not in avoid], n, rng)
                 for k in (kinds if stratified else ())}
        return [vocab.fill(templates[rng.integers(len(templates))], {k: d[i] for k, d in decks.items()},
                           rng, set(avoid)) for i in range(n)]


    def real_images(self, concept, n, seed):
        """Rendered pictures of `concept` with the other attributes random."""
        from .shapes import world as shapes_world

        c = vocab.concept(concept)
        rng = np.random.default_rng(seed)
        images = []
        for _ in range(n):
            scene = shapes_world.random_scene(rng)
            scene = shapes_world.Scene(**{**scene.__dict__, c.kind: c.name})
            images.append(shapes_world.render(scene, int(rng.integers(2**31 - 1))))
        return np.stack(images)


def _deck(names: list[str], n: int, rng: np.random.Generator) -> list[str]:
    """`n` of `names` dealt from shuffled copies of the list, one after another: each name
    comes `n // len(names)` or one more times."""
    out: list[str] = []
    while len(out) < n:
        out += [names[i] for i in rng.permutation(len(names))]
    return out[:n]


_FREE_TEMPLATES = ("{x}", "a photo of {x}", "a painting of {x}", "an image of {x}",
                   "a picture of {x}, high quality", "{x}, detailed")
_FREE_MEMORY = ("a photo of a dog", "a mountain lake at dawn", "a bowl of fruit on a table",
                "a city street at night", "a portrait of an old man", "a red car",
                "a forest path", "a sailing boat at sea", "a cup of coffee", "a bird on a branch")


class FreeTextWorld(ConceptWorld):
    """Concepts of a real model: free text, generic templates, a generic memory bank."""

    name = "free"

    def target(self, name: str) -> Target:
        text = name.strip()
        if not text:
            raise ObliviateError("empty concept; pass the text to remove with --concept")
        return Target(text, "free", (text,))

    def default_anchor(self, target, avoid):
        return ""

    def default_preserve(self, target, avoid):
        return []

    def prompt_pairs(self, target, anchor, n, rng, synonyms=False, avoid=frozenset()):
        """`n` (target prompt, anchor prompt) pairs on generic templates (`avoid` has no
        slot to keep it out of: the template names only the concept)."""
        out = []
        for _ in range(n):
            t = _FREE_TEMPLATES[rng.integers(len(_FREE_TEMPLATES))]
            out.append((t.format(x=target.name), t.format(x=anchor).strip(" ,")))
        return out

    def prompts_naming(self, concept, n, rng, avoid=frozenset()):
        return [_FREE_TEMPLATES[rng.integers(len(_FREE_TEMPLATES))].format(x=concept) for _ in range(n)]

    def memory_prompts(self, avoid, n, rng, named=frozenset(), stratified=False):
        """`n` prompts of the generic memory bank not naming anything in `avoid` (free text
        has no kinds to stratify: `named` and `stratified` are accepted and ignored)."""
        pool = [p for p in _FREE_MEMORY if not any(a.lower() in p for a in avoid)]
        return [pool[rng.integers(len(pool))] for _ in range(n)]

    def real_images(self, concept, n, seed):
        raise ObliviateError(
            f"real images of {concept!r} are needed; pass a folder of them with --set images=DIR")


def world_for(pipe) -> ConceptWorld:
    """The concept world of a loaded pipeline (from its `obliviate.json`), else free text."""
    return ShapesWorld() if getattr(pipe, "obliviate_info", {}).get("world") == "shapes" else FreeTextWorld()
