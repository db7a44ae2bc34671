"""Probes that try to bring a removed concept back, each usable on any model folder.

- `paraphrase`: prompts naming the concept through synonyms and templates that erasure
  never trained on; reports UA under paraphrase.
- `softprompt`: textual inversion against the edited model, as a ladder of budgets
  (evaluate/softprompt.py); reports every rung and the worst case. On ESD's star model
  (2026-11) the single rung plateaued near 0.55 recovery whatever its budget: ESD-u edits
  the UNet's own layers, which a prompt cannot undo.
- `hardprompt`: a searched prefix of real words (evaluate/textattacks.py).
- `conditioning`: the white-box upper bound, a perturbation of the text encoder's output
  (evaluate/textattacks.py), reported separately from the attacks a user could mount.
- `resurgence`: fine-tune the edited model for a fixed budget on images of unrelated concepts
  only; reports the concept's accuracy before and after ("concept resurgence").
Accuracy of a concept is always the judge's: the share of images whose judged concept of
that kind is the concept.
"""

from __future__ import annotations

import copy

import numpy as np

from ..generate import generate_images
from ..shapes import vocab

from .softprompt import PLACEHOLDERS, SoftPromptAttack, softprompt_ladder  # noqa: F401


def concept_accuracy(pipe, judge, concept: str, prompts: list[str], seed: int = 0) -> float:
    """Share of images for `prompts` that the judge sees as `concept` (of its kind)."""
    kind = vocab.concept(concept).kind
    images = generate_images(pipe, prompts, seed=seed)
    return float(np.mean([p == concept for p in judge.predict(images)[kind]]))


def naming_prompts(concept: str, n: int, seed: int, avoid: set[str] = frozenset()) -> list[str]:
    """Plain prompts naming `concept` in the evaluation template, other attributes random."""
    c = vocab.concept(concept)
    rng = np.random.default_rng(seed)
    return [vocab.fill(vocab.EVAL_TEMPLATE, {c.kind: c.name}, rng, set(avoid) | {c.name}) for _ in range(n)]


def paraphrase_prompts(concept: str, n: int, seed: int) -> list[str]:
    """Prompts naming `concept` only through its synonyms, in templates erasure never used."""
    c = vocab.concept(concept)
    rng = np.random.default_rng(seed)
    templates = [t for t in vocab.TEMPLATES if t not in vocab.ERASURE_TEMPLATES and vocab.names(t, c.kind)]
    templates = templates or [vocab.EVAL_TEMPLATE]
    prompts = []
    for i in range(n):
        word = c.synonyms[i % len(c.synonyms)] if c.synonyms else c.name
        prompts.append(vocab.fill(templates[rng.integers(len(templates))], {c.kind: word}, rng, {c.name}, True))
    return prompts


def paraphrase_attack(pipe, judge, concept: str, n: int = 48, seed: int = 0) -> dict:
    """UA of `concept` under paraphrased prompts."""
    prompts = paraphrase_prompts(concept, n, seed)
    acc = concept_accuracy(pipe, judge, concept, prompts, seed)
    return {"ua": 1 - acc, "n": n, "example_prompt": prompts[0]}


def resurgence_attack(pipe, judge, concept: str, removed: list[str], steps: int = 100,
                      lr: float = 1e-4, n_eval: int = 48, seed: int = 0) -> dict:
    """Accuracy of `concept` before and after fine-tuning a copy of the model on images of
    concepts never removed (the fine-tuning data never shows the concept)."""
    from ..finetune import Captioned, finetune
    from ..shapes import world

    prompts = naming_prompts(concept, n_eval, seed + 2)
    before = concept_accuracy(pipe, judge, concept, prompts, seed)
    rng = np.random.default_rng(seed)
    images, captions = [], []
    allowed = {k: [c.name for c in vocab.BY_KIND[k] if c.name not in removed] for k in vocab.KINDS}
    for _ in range(64):
        scene = world.Scene(**{k: allowed[k][rng.integers(len(allowed[k]))] for k in vocab.KINDS})
        images.append(world.render(scene, int(rng.integers(2**31 - 1))))
        captions.append(world.caption(scene, rng))
    copy_pipe = copy.deepcopy(pipe)
    finetune(copy_pipe, Captioned(np.stack(images), captions), steps=steps, lr=lr, seed=seed, progress=False)
    after = concept_accuracy(copy_pipe, judge, concept, prompts, seed)
    return {"accuracy_before": before, "accuracy_after": after, "steps": steps, "lr": lr, "n": n_eval}


ATTACKS = ("paraphrase", "softprompt", "hardprompt", "conditioning", "resurgence")
BUDGETS = ("quick", "full")


def check_attacks(attacks: list[str], budget: str = "quick") -> None:
    """Refuse an unknown attack or budget in one line, before any model is loaded."""
    from ..errors import ObliviateError

    unknown = set(attacks) - set(ATTACKS)
    if unknown:
        raise ObliviateError(f"unknown attack {sorted(unknown)[0]!r}; choose from {', '.join(ATTACKS)}")
    if budget not in BUDGETS:
        raise ObliviateError(f"--attack-budget {budget!r}: choose quick or full")


# the attacks that read one CLIP encoder's token embeddings (Stable Diffusion 1.x/2.x only);
# resurgence fine-tunes through the family's own loss and runs on every family
TEXT_PATH = ("softprompt", "hardprompt", "conditioning")


def check_attacks_for(pipe, attacks: list[str]) -> None:
    """Refuse, in one line and before any work, attacks the pipeline's family lacks."""
    from ..families import family_of

    for a in attacks:
        if a in TEXT_PATH:
            family_of(pipe).check_text_attacks(f"the {a} attack")


def run_attacks(pipe, judge, targets: list[str], attacks: list[str], seed: int = 0,
                removed: list[str] | None = None, budget: str = "quick", original=None) -> dict:
    """Every requested attack on every concept of `targets`: `{concept: {attack: result}}`.
    `removed` (default: `targets`) is every concept the lineage removed; resurgence
    fine-tunes only on concepts outside it. `budget` picks the soft-prompt ladder;
    `original` (the lineage's original model) adds its rungs trained on that model's images."""
    from .textattacks import conditioning_attack, hardprompt_attack

    check_attacks(attacks, budget)
    check_attacks_for(pipe, attacks)
    removed = list(targets) if removed is None else list(removed)
    results = {}
    for concept in targets:
        r = {}
        if "paraphrase" in attacks:
            r["paraphrase"] = paraphrase_attack(pipe, judge, concept, seed=seed)
        if "softprompt" in attacks:
            r["softprompt"] = softprompt_ladder(pipe, judge, concept, budget, original=original, seed=seed)
        if "hardprompt" in attacks:
            r["hardprompt"] = hardprompt_attack(pipe, judge, concept, seed=seed)
        if "conditioning" in attacks:
            r["conditioning"] = conditioning_attack(pipe, judge, concept, seed=seed)
        if "resurgence" in attacks:
            r["resurgence"] = resurgence_attack(pipe, judge, concept, removed, seed=seed)
        results[concept] = r
    return results
