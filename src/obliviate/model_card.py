"""The model card every output folder carries: `README.md` with the Hugging Face card header.

The YAML header (`library_name: diffusers`, `base_model`, `tags`) is what the Hub and other
tools read; the body says what the folder is: the lineage's base and the sha256 of its
weights, every request (concept, anchor, method, settings, date) and, once `obliviate eval`
ran on the folder, the measured figures. The figures sit between two HTML comments so a
later evaluation replaces them and leaves the rest of the card as it was.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

CARD_FILE = "README.md"
_EVAL_START = "<!-- obliviate:eval -->"
_EVAL_END = "<!-- /obliviate:eval -->"
_NO_EVAL = "Not measured yet: run `obliviate eval --model FOLDER` to add the figures here."
_KINDS = {"model": "a diffusers pipeline folder",
          "lora": "a LoRA (diffusers/peft format) to load on the base with `pipe.load_lora_weights`",
          "guarded": "a diffusers pipeline folder with a FreezeAsGuard mask",
          "finetuned": "a diffusers pipeline folder, fine-tuned"}


def _yaml_list(items: list[str]) -> str:
    return "\n".join(f"- {json.dumps(i)}" for i in items)


def card_text(ledger, kind: str = "model", weights_sha256: str | None = None, extra: dict | None = None,
              evaluation: str | None = None) -> str:
    """The card's text for a folder of `kind` holding lineage `ledger` (None: no lineage)."""
    base = ledger.base if ledger else (extra or {}).get("Base model", "unknown")
    removed = ledger.removed() if ledger else []
    tags = ["obliviate", "concept-erasure", "text-to-image", "stable-diffusion", "diffusers"]
    tags += ["lora"] if kind == "lora" else []
    tags += [f"erased-{c.replace(' ', '-')}" for c in removed]
    title = (f"{'LoRA: ' if kind == 'lora' else ''}{base} with {', '.join(removed) or 'no concept'} removed"
             if base != "unknown" else "A model trained by obliviate")
    lines = ["---", "library_name: diffusers"] + ([f"base_model: {json.dumps(base)}"] if base != "unknown" else [])
    lines += ["tags:", _yaml_list(tags),
             "pipeline_tag: text-to-image", "---", "", f"# {title}", "",
             f"Written by obliviate as {_KINDS.get(kind, kind)}.", "",
             f"- Base model: `{base}`" + (f" (sha256 `{ledger.base_sha256}`)" if ledger else "")
             if base != "unknown" else "- Base model: none (trained from scratch)",
             f"- Weights sha256: `{weights_sha256 or (ledger.head_sha256 if ledger else 'unknown')}`"
             + (" (of the erased model this LoRA approximates: base + LoRA is close to it, not "
                "bit-identical)" if kind == "lora" else "")]
    lines += [f"- {k}: {v}" for k, v in (extra or {}).items() if k != "Base model"]
    lines += ["", "## Requests", ""]
    if ledger and ledger.entries:
        lines += ["| step | concept | anchor | preserve | method | settings | date |", "|---|---|---|---|---|---|---|"]
        for e in ledger.entries:
            r = e.request
            targets = ", ".join(t["name"] for t in r["targets"])
            anchors = ", ".join(a or "(empty)" for a in r["anchors"])
            preserve = ", ".join(r.get("preserve", [])) or "-"
            settings = ", ".join(f"{k}={v}" for k, v in sorted(e.settings.items())
                                 if not isinstance(v, (dict, list)))
            lines.append(f"| {e.step} | {targets} | {anchors} | {preserve} | {e.method} | {settings} | {e.created} |")
    else:
        lines.append("None: this is the lineage's base.")
    lines += ["", "## Measured", "", _EVAL_START, evaluation or _NO_EVAL, _EVAL_END, "",
              "The full lineage, with hashes, time and memory per request, is in `ledger.json` "
              "(`obliviate ledger FOLDER`).", ""]
    return "\n".join(lines)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_card(folder: Path, ledger, kind: str = "model", weights_sha256: str | None = None,
               extra: dict | None = None) -> Path:
    """Write `folder/README.md` (the folder is being built, so a plain write is atomic enough
    inside `atomic_folder`; elsewhere it is replaced in one rename)."""
    path = Path(folder) / CARD_FILE
    _write_atomic(path, card_text(ledger, kind, weights_sha256, extra))
    return path


def evaluation_text(result: dict, removed: list[str], command: str) -> str:
    """Markdown of `obliviate eval`'s figures: accuracy per kind, UA = 1 − accuracy of each
    removed concept, mean accuracy of the never-removed concepts, Fréchet distance."""
    per = result["per_concept"]
    kept = [c for c in per if c not in removed]
    never = sum(per[c]["accuracy"] for c in kept) / len(kept) if kept else float("nan")
    rows = [f"`{command}`: {result['images']} judged images, seed {result.get('seed', 0)}.", "",
            "| figure | value |", "|---|---|"]
    rows += [f"| accuracy, {kind} | {acc:.3f} |" for kind, acc in result["accuracy"].items()]
    rows += [f"| UA of {c} (1 − accuracy) | {1 - per[c]['accuracy']:.3f} |" for c in removed if c in per]
    rows.append(f"| never-removed concepts, mean accuracy | {never:.3f} |")
    if result.get("fid") is not None:
        rows.append(f"| Fréchet distance (judge features) | {result['fid']:.2f} |")
    return "\n".join(rows)


def update_evaluation(folder: Path, text: str) -> bool:
    """Replace the figures of `folder`'s card with `text`, atomically; False if it has no
    obliviate card (a folder obliviate did not write is left alone)."""
    path = Path(folder) / CARD_FILE
    if not path.exists():
        return False
    card = path.read_text()
    if _EVAL_START not in card or _EVAL_END not in card:
        return False
    head, rest = card.split(_EVAL_START, 1)
    _, tail = rest.split(_EVAL_END, 1)
    _write_atomic(path, f"{head}{_EVAL_START}\n{text}\n{_EVAL_END}{tail}")
    return True
