"""`obliviate eval`: generate a fixed, seeded prompt set, judge it, compute the metrics.

For a model of the shapes world the prompt set covers every object x colour x style
combination (`images_per_combo` images each, default 4 -> 576 images), the judge is the
shipped classifier, and the Fréchet distance compares judge features of the generations
with rendered images of the same scenes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ObliviateError
from ..generate import generate_images
from ..pipeline import model_world, sampler_settings, shipped_model_path
from ..shapes import vocab, world
from .judge import Judge, to_tensor
from .metrics import accuracy_by_kind, frechet_distance, per_concept_accuracy


@dataclass(frozen=True)
class LabelledPrompt:
    """A prompt and the concept it names for each kind (what the judge should see)."""

    text: str
    labels: dict[str, str]


def shapes_eval_prompts(images_per_combo: int = 4) -> list[LabelledPrompt]:
    """Every object x colour x style combination, `images_per_combo` times, in fixed order."""
    prompts = []
    for o in vocab.OBJECTS:
        for c in vocab.COLOURS:
            for s in vocab.STYLES:
                text = vocab.EVAL_TEMPLATE.format(o=o.name, c=c.name, s=s.name)
                labels = {"object": o.name, "colour": c.name, "style": s.name}
                prompts.extend([LabelledPrompt(text, labels)] * images_per_combo)
    return prompts


def load_judge(pipe) -> Judge:
    """The judge for a pipeline: its own `judge/` folder if it has one, else the shipped one."""
    if model_world(pipe) != "shapes":
        raise ObliviateError(
            "this model is not from the shapes world; evaluation of real models needs a judge "
            "(not yet available in this version)"
        )
    own = Path(getattr(pipe, "obliviate_source", "")) / "judge"
    return Judge.load(own if (own / "judge.json").exists() else shipped_model_path("shapes") / "judge")


def reference_images(prompts: list[LabelledPrompt], seed: int) -> np.ndarray:
    """Rendered images of the prompts' scenes (random background and pose), for the FID."""
    rng = np.random.default_rng(seed)
    images = []
    for p in prompts:
        bg = vocab.BACKGROUNDS[rng.integers(len(vocab.BACKGROUNDS))].name
        scene = world.Scene(p.labels["object"], p.labels["colour"], p.labels["style"], bg)
        images.append(world.render(scene, int(rng.integers(2**31 - 1))))
    return np.stack(images)


def evaluate_model(
    pipe,
    images_per_combo: int = 4,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = True,
    judge: Judge | None = None,
    keep_images: bool = False,
) -> dict:
    """Generate the evaluation prompt set with `pipe`, judge it, and return the metrics dict.

    Keys: `accuracy` (per kind), `per_concept` (kind, accuracy, n), `fid`, `images`,
    `seconds`, `sampler`, `seed`; with `keep_images`, also `generated` (the uint8 images)
    and `labels` (each image's prompt labels), so callers can show them without generating
    again.
    """
    judge = judge or load_judge(pipe)
    prompts = shapes_eval_prompts(images_per_combo)
    start = time.time()
    images = generate_images(pipe, [p.text for p in prompts], seed=seed, batch_size=batch_size,
                             progress=progress)
    labels = [p.labels for p in prompts]
    predictions = judge.predict(images)
    with torch.no_grad():
        fake = judge.features(to_tensor(images))
        real = judge.features(to_tensor(reference_images(prompts, seed + 1)))
    kept = {"generated": images, "labels": labels} if keep_images else {}
    return {
        **kept,
        "accuracy": accuracy_by_kind(labels, predictions),
        "per_concept": per_concept_accuracy(labels, predictions),
        "fid": frechet_distance(fake, real),
        "images": len(images),
        "seconds": round(time.time() - start, 2),
        "sampler": sampler_settings(pipe),
        "seed": seed,
    }
