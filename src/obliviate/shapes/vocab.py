"""The vocabulary of the shapes world: every concept, its kind, its synonyms and its relatives.

This module is the single source of truth the renderer, the captioner, the tokenizer, the
judge and the default anchors/preserve-sets of erasure requests all read. The world is a
small stand-in for UnlearnCanvas (styles x objects): objects, colours, styles (textures)
and backgrounds, with deliberately related pairs (square/diamond, star/cross, ...) so that
"preserve what is related" can be measured.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Kind = Literal["object", "colour", "style", "background"]
KINDS: tuple[Kind, ...] = ("object", "colour", "style", "background")


@dataclass(frozen=True)
class Concept:
    """One nameable concept: its canonical `name`, `kind`, caption `words` and `synonyms`.

    `words` are the phrasings used in training captions (the first is canonical);
    `synonyms` are extra phrasings that also appear in training captions, so the model
    learns them, and that paraphrase attacks later use to probe an erasure.
    """

    name: str
    kind: Kind
    synonyms: tuple[str, ...] = ()
    related: tuple[str, ...] = ()

    @property
    def words(self) -> tuple[str, ...]:
        """Every phrasing of the concept: canonical name first, then synonyms."""
        return (self.name, *self.synonyms)


OBJECTS = (
    Concept("circle", "object", ("disc",), ("diamond",)),
    Concept("square", "object", ("box",), ("diamond",)),
    Concept("diamond", "object", ("rhombus",), ("square",)),
    Concept("triangle", "object", ("wedge",), ("diamond",)),
    Concept("star", "object", ("starburst",), ("cross",)),
    Concept("cross", "object", ("plus",), ("star",)),
)
COLOURS = (
    Concept("red", "colour", ("crimson",), ("magenta",)),
    Concept("green", "colour", ("emerald",), ("cyan",)),
    Concept("blue", "colour", ("navy",), ("cyan",)),
    Concept("yellow", "colour", ("golden",), ("green",)),
    Concept("magenta", "colour", ("pink",), ("red",)),
    Concept("cyan", "colour", ("turquoise",), ("blue",)),
)
STYLES = (
    Concept("solid", "style", ("filled",), ("outlined",)),
    Concept("striped", "style", ("stripy",), ("dotted",)),
    Concept("dotted", "style", ("spotted",), ("striped",)),
    Concept("outlined", "style", ("hollow",), ("solid",)),
)
BACKGROUNDS = (
    Concept("white", "background", ("bright",)),
    Concept("black", "background", ("dark",)),
    Concept("gray", "background", ("grey",)),
)

CONCEPTS: dict[str, Concept] = {c.name: c for c in (*OBJECTS, *COLOURS, *STYLES, *BACKGROUNDS)}
BY_KIND: dict[str, tuple[Concept, ...]] = {
    "object": OBJECTS,
    "colour": COLOURS,
    "style": STYLES,
    "background": BACKGROUNDS,
}

# RGB values, 0..255: saturated and far apart so a 32x32 picture makes colour unambiguous.
COLOUR_RGB = {
    "red": (225, 35, 35),
    "green": (35, 175, 50),
    "blue": (40, 70, 230),
    "yellow": (240, 215, 30),
    "magenta": (215, 45, 200),
    "cyan": (40, 215, 220),
}
BACKGROUND_RGB = {"white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128)}

# Caption templates. Fields: {o} object, {c} colour, {s} style, {b} background. Templates
# that omit a field teach the model that attribute's marginal distribution.
TEMPLATES = (
    "a {c} {s} {o} on a {b} background",
    "a {s} {c} {o}",
    "a picture of a {c} {o}, {s}",
    "a {c} {o} in {s} style on {b}",
    "{s} {c} {o} over a {b} background",
    "a {c} {o}",
    "a {s} {o}",
    "a {o} on a {b} background",
    "an image of a {o}",
    "something {c}",
    "a {s} pattern",
)
EVAL_TEMPLATE = "a {c} {s} {o}"
# The template field of each kind.
FIELD = {"object": "o", "colour": "c", "style": "s", "background": "b"}
# Templates erasure methods train on; paraphrase probes use the others, and the synonyms.
ERASURE_TEMPLATES = TEMPLATES[:5]

# Words that carry no concept; the tokenizer knows them as whole words.
FILLER_WORDS = (
    "a an the of on in over with style background picture image photo drawing painting "
    "something pattern shape thing and"
).split()


def concept(name: str) -> Concept:
    """Look up a concept by canonical name or synonym; raise a one-line KeyError otherwise."""
    key = name.strip().lower()
    if key in CONCEPTS:
        return CONCEPTS[key]
    for c in CONCEPTS.values():
        if key in c.synonyms:
            return c
    known = ", ".join(sorted(CONCEPTS))
    raise KeyError(f"unknown concept {name!r}; the shapes world knows: {known}")


def all_words() -> list[str]:
    """Every word any caption or prompt of the world can contain (tokenizer vocabulary)."""
    words = set(FILLER_WORDS)
    for c in CONCEPTS.values():
        words.update(w for phrase in c.words for w in phrase.split())
    return sorted(words)


def fix_articles(text: str) -> str:
    """'a outlined star' -> 'an outlined star' (captions are filled from templates)."""
    return re.sub(r"\ba ([aeiou])", r"an \1", text)


def names(template: str, kind: str) -> bool:
    """Whether `template` has a slot for concepts of `kind`."""
    return "{" + FIELD[kind] + "}" in template


def fill(template: str, fixed: dict[str, str], rng, avoid=frozenset(), synonyms: bool = False) -> str:
    """Fill `template`: kinds in `fixed` get that word; the other slots a random concept not
    in `avoid` (any, if all are avoided), named by a random synonym when `synonyms`."""
    words = {}
    for kind, key in FIELD.items():
        if kind in fixed:
            words[key] = fixed[kind]
            continue
        options = [c for c in BY_KIND[kind] if c.name not in avoid] or list(BY_KIND[kind])
        c = options[rng.integers(len(options))]
        words[key] = c.words[rng.integers(len(c.words))] if synonyms else c.name
    return fix_articles(template.format(**words))
