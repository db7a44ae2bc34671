"""Judges for real Stable Diffusion models, where no shipped classifier knows the concepts.

- `clip:FOLDER` — a local CLIP model (transformers format) classifies each image zero-shot
  among the concepts of the evaluation plus a neutral label, with the prompt template
  "a picture of {concept}".
- `classifier:FOLDER` — a user's image classifier (transformers
  AutoModelForImageClassification); its `id2label` names must include the concepts.
`evaluate_concepts` generates images for prompts naming each concept (the free-text
templates) and reports the judged accuracy per concept; UA of a removed concept is
1 − accuracy.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from ..concepts import FreeTextWorld
from ..errors import ObliviateError
from ..generate import generate_images

NEUTRAL = "something else"
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _pixels(images: np.ndarray, size: int, mean, std) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _features(output) -> torch.Tensor:
    return output if torch.is_tensor(output) else output.pooler_output


class ClipJudge:
    """Zero-shot classification with a local CLIP folder."""

    def __init__(self, folder: str | Path, template: str = "a picture of {}"):
        from transformers import CLIPModel, CLIPTokenizer

        folder = Path(folder)
        if not (folder / "config.json").exists():
            raise ObliviateError(f"--judge clip:{folder}: no CLIP model folder (config.json) there")
        self.model = CLIPModel.from_pretrained(folder, local_files_only=True, use_safetensors=True).eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        self.template = template
        pre = folder / "preprocessor_config.json"
        cfg = json.loads(pre.read_text()) if pre.exists() else {}
        self.mean, self.std = cfg.get("image_mean", _CLIP_MEAN), cfg.get("image_std", _CLIP_STD)
        self.size = self.model.config.vision_config.image_size

    @torch.no_grad()
    def classify(self, images: np.ndarray, labels: list[str]) -> list[str]:
        """The label (of `labels`) each uint8 image matches best."""
        ids = self.tokenizer([self.template.format(label) for label in labels], padding=True, return_tensors="pt")
        text = torch.nn.functional.normalize(_features(self.model.get_text_features(**ids)), dim=-1)
        image = _features(self.model.get_image_features(pixel_values=_pixels(images, self.size, self.mean, self.std)))
        image = torch.nn.functional.normalize(image, dim=-1)
        return [labels[i] for i in (image @ text.T).argmax(1).tolist()]


class ClassifierJudge:
    """A user's transformers image classifier; labels are matched case-insensitively."""

    def __init__(self, folder: str | Path):
        from transformers import AutoModelForImageClassification

        folder = Path(folder)
        if not (folder / "config.json").exists():
            raise ObliviateError(f"--judge classifier:{folder}: no model folder (config.json) there")
        self.model = AutoModelForImageClassification.from_pretrained(folder, local_files_only=True,
                                                                     use_safetensors=True).eval()
        pre = folder / "preprocessor_config.json"
        cfg = json.loads(pre.read_text()) if pre.exists() else {}
        self.mean, self.std = cfg.get("image_mean", (0.5,) * 3), cfg.get("image_std", (0.5,) * 3)
        self.size = getattr(self.model.config, "image_size", 224)

    @torch.no_grad()
    def classify(self, images: np.ndarray, labels: list[str]) -> list[str]:
        names = {i: n.lower() for i, n in self.model.config.id2label.items()}
        missing = [label for label in labels if label != NEUTRAL and label.lower() not in names.values()]
        if missing:
            raise ObliviateError(f"the classifier has no label {missing[0]!r}; its labels: {sorted(names.values())[:10]}")
        logits = self.model(pixel_values=_pixels(images, self.size, self.mean, self.std)).logits
        out = []
        for i in logits.argmax(1).tolist():
            match = [label for label in labels if label.lower() == names[i]]
            out.append(match[0] if match else NEUTRAL)
        return out


def check_judge(spec: str) -> tuple[str, Path]:
    """Parse `clip:FOLDER` / `classifier:FOLDER` and check the folder before anything loads:
    a transformers model folder (config.json) with safetensors weights; pickle weights
    (pytorch_model.bin and the like) are refused, since loading them can run code."""
    from ..pipeline import PICKLE_SUFFIXES

    kind, _, name = str(spec).partition(":")
    if kind not in ("clip", "classifier") or not name:
        raise ObliviateError(f"--judge {spec!r}: use clip:FOLDER or classifier:FOLDER")
    folder = Path(name)
    if not (folder / "config.json").is_file():
        raise ObliviateError(f"--judge {spec}: no {'CLIP ' if kind == 'clip' else ''}model folder (config.json) there")
    if not any(folder.glob("*.safetensors")):
        pickles = [p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES]
        if pickles:
            raise ObliviateError(f"--judge {spec}: its weights {pickles[0]} are a pickle, which can run code when "
                                 "loaded; convert them to model.safetensors first")
        raise ObliviateError(f"--judge {spec}: no .safetensors weights in {folder}")
    return kind, folder


def load_external_judge(spec: str):
    """`clip:FOLDER` or `classifier:FOLDER` to a judge object (safetensors weights only)."""
    kind, folder = check_judge(spec)
    return ClipJudge(folder) if kind == "clip" else ClassifierJudge(folder)


def evaluate_concepts(pipe, judge, concepts: list[str], images_per_concept: int = 8, seed: int = 0) -> dict:
    """Judged accuracy of each free-text concept on images of prompts naming it."""
    if not concepts:
        raise ObliviateError("name the concepts to evaluate with --concepts a,b,c")
    world = FreeTextWorld()
    rng = np.random.default_rng(seed)
    labels = [*concepts, NEUTRAL]
    start = time.time()
    per_concept, total = {}, 0
    for concept in concepts:
        prompts = world.prompts_naming(concept, images_per_concept, rng)
        images = generate_images(pipe, prompts, seed=seed)
        calls = judge.classify(images, labels)
        per_concept[concept] = {"kind": "free", "accuracy": float(np.mean([c == concept for c in calls])),
                                "n": len(calls)}
        total += len(calls)
    return {"accuracy": {"free": float(np.mean([v["accuracy"] for v in per_concept.values()]))},
            "per_concept": per_concept, "fid": None, "images": total,
            "seconds": round(time.time() - start, 2), "judge_labels": labels}
