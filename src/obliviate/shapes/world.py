"""Deterministic renderer and captioner of the shapes world (a stand-in for UnlearnCanvas).

An image is one object of one colour, drawn with one style (texture) on one background.
Pose (centre, size, rotation) and texture phase vary with a seed; the same
(object, colour, style, background, seed) always gives the same pixels. Shapes are drawn on
a 4x supersampled grid and box-filtered down, so edges are anti-aliased.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from . import vocab

IMAGE_SIZE = 32
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class Scene:
    """One picture's concepts: object, colour, style and background names (canonical)."""

    object: str
    colour: str
    style: str
    background: str

    def labels(self) -> dict[str, int]:
        """Class index of each concept within its kind, in `vocab.BY_KIND` order."""
        return {
            kind: [c.name for c in vocab.BY_KIND[kind]].index(getattr(self, kind))
            for kind in vocab.KINDS
        }


def all_scenes() -> list[Scene]:
    """Every combination of object x colour x style x background, in a fixed order."""
    names = [[c.name for c in vocab.BY_KIND[k]] for k in vocab.KINDS]
    return [Scene(*combo) for combo in itertools.product(*names)]


def _polygon_inside(x: np.ndarray, y: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Even-odd rule point-in-polygon test for every (x, y); works for non-convex shapes."""
    inside = np.zeros(x.shape, dtype=bool)
    n = len(vertices)
    for i in range(n):
        x0, y0 = vertices[i]
        x1, y1 = vertices[(i + 1) % n]
        crosses = (y0 > y) != (y1 > y)
        x_at = (x1 - x0) * (y - y0) / (y1 - y0 + 1e-12) + x0
        inside ^= crosses & (x < x_at)
    return inside


def _regular(n: int, radius: float, start: float = -np.pi / 2) -> np.ndarray:
    angles = start + 2 * np.pi * np.arange(n) / n
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)


def _star(radius: float) -> np.ndarray:
    outer = _regular(5, radius)
    inner = _regular(5, 0.45 * radius, start=-np.pi / 2 + np.pi / 5)
    return np.stack([outer, inner], axis=1).reshape(10, 2)


def shape_mask(name: str, x: np.ndarray, y: np.ndarray, radius: float) -> np.ndarray:
    """Boolean mask of object `name` of size `radius` centred at the origin of (x, y)."""
    if name == "circle":
        return x**2 + y**2 < (0.9 * radius) ** 2
    if name == "square":
        return np.maximum(abs(x), abs(y)) < 0.78 * radius
    if name == "diamond":
        return abs(x) + abs(y) < 1.08 * radius
    if name == "triangle":
        return _polygon_inside(x, y - 0.15 * radius, _regular(3, 1.1 * radius))
    if name == "star":
        return _polygon_inside(x, y, _star(1.12 * radius))
    if name == "cross":
        arm = 0.34 * radius
        return ((abs(x) < arm) & (abs(y) < radius)) | ((abs(y) < arm) & (abs(x) < radius))
    raise KeyError(f"unknown object {name!r}")


def _texture(style: str, x: np.ndarray, y: np.ndarray, phase: float) -> np.ndarray:
    """Where the object's colour shows (True) versus the background (False), pre-mask."""
    if style in ("solid", "outlined"):
        return np.ones(x.shape, dtype=bool)
    if style == "striped":
        return np.mod(y + phase, 4.0) < 2.4
    if style == "dotted":  # polka holes: the outline survives, so the object stays legible
        px, py = np.mod(x + phase, 4.0) - 2.0, np.mod(y + phase, 4.0) - 2.0
        return px**2 + py**2 > 1.1**2
    raise KeyError(f"unknown style {style!r}")


def render(scene: Scene, seed: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """Draw `scene` as an (size, size, 3) uint8 RGB array; pose and phase come from `seed`."""
    rng = np.random.default_rng(seed)
    scale = size / 32.0
    cx, cy = (size / 2 + rng.uniform(-2.5, 2.5, 2) * scale)
    radius = rng.uniform(10.0, 13.0) * scale
    angle = np.deg2rad(rng.uniform(-12, 12))
    phase = rng.uniform(0, 5)

    n = size * _SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / _SUPERSAMPLE
    gy, gx = np.meshgrid(coords, coords, indexing="ij")
    dx, dy = gx - cx, gy - cy
    rx = np.cos(angle) * dx + np.sin(angle) * dy
    ry = -np.sin(angle) * dx + np.cos(angle) * dy

    mask = shape_mask(scene.object, rx, ry, radius)
    if scene.style == "outlined":
        border = 2.6 * scale
        mask &= ~shape_mask(scene.object, rx, ry, radius - border / 0.9)
    fg = mask & _texture(scene.style, gx / scale, gy / scale, phase)

    colour = np.array(vocab.COLOUR_RGB[scene.colour], dtype=np.float32)
    background = np.array(vocab.BACKGROUND_RGB[scene.background], dtype=np.float32)
    cover = fg.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(1, 3))[..., None]
    image = cover * colour + (1 - cover) * background
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def caption(scene: Scene, rng: np.random.Generator, template: str | None = None) -> str:
    """A caption for `scene` from a random template, with random synonyms for each concept."""
    template = template or vocab.TEMPLATES[rng.integers(len(vocab.TEMPLATES))]
    words = {}
    for kind, key in vocab.FIELD.items():
        options = vocab.CONCEPTS[getattr(scene, kind)].words
        words[key] = options[rng.integers(len(options))]
    return vocab.fix_articles(template.format(**words))


def random_scene(rng: np.random.Generator) -> Scene:
    """A uniformly random scene."""
    pick = [vocab.BY_KIND[k][rng.integers(len(vocab.BY_KIND[k]))].name for k in vocab.KINDS]
    return Scene(*pick)


def dataset_scenes(n: int, seed: int) -> tuple[list[Scene], np.ndarray]:
    """The scenes and pose seeds of `dataset(n, seed)`, without rendering anything.

    Scenes cycle through every combination in a seeded random order, so every combination
    appears n // 432 or n // 432 + 1 times; each image has its own pose seed.
    """
    rng = np.random.default_rng(seed)
    combos = all_scenes()
    scenes: list[Scene] = []
    while len(scenes) < n:
        order = rng.permutation(len(combos))
        scenes.extend(combos[i] for i in order)
    return scenes[:n], rng.integers(0, 2**31 - 1, size=n)


def dataset(n: int, seed: int, size: int = IMAGE_SIZE) -> tuple[np.ndarray, list[Scene]]:
    """`n` rendered images (uint8, N x H x W x 3) and their scenes, balanced over combos."""
    scenes, pose_seeds = dataset_scenes(n, seed)
    images = np.stack([render(s, int(p), size) for s, p in zip(scenes, pose_seeds)])
    return images, scenes
