"""`make demo`: a tour of the shipped model that writes a small report folder.

Writes, atomically, to `out`: one image grid per object of the world, the evaluation
metrics (`eval.json`) and `index.html` that shows both. Later steps of the tour (erasure,
before/after) build on this.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from .checkpoint import atomic_folder
from .evaluate.evaluation import evaluate_model
from .generate import generate_images, image_grid
from .pipeline import load_pipeline
from .shapes import vocab


def run_demo(out: Path, model: str = "shapes", images_per_combo: int = 1, overwrite: bool = True) -> Path:
    """Generate grids and metrics for `model` and write them with an HTML page to `out`."""
    pipe = load_pipeline(model)
    with atomic_folder(Path(out), overwrite=overwrite) as tmp:
        rows = []
        for obj in vocab.OBJECTS:
            prompt = f"a {obj.name}"
            images = generate_images(pipe, [prompt] * 8, seed=0)
            image_grid(images, columns=8, scale=3).save(tmp / f"{obj.name}.png")
            rows.append(f"<tr><td>{html.escape(prompt)}</td><td><img src='{obj.name}.png'></td></tr>")
        metrics = evaluate_model(pipe, images_per_combo=images_per_combo)
        (tmp / "eval.json").write_text(json.dumps(metrics, indent=1))
        table = "".join(
            f"<tr><td>{html.escape(name)}</td><td>{m['kind']}</td><td>{m['accuracy']:.3f}</td></tr>"
            for name, m in metrics["per_concept"].items()
        )
        acc = ", ".join(f"{k} {v:.3f}" for k, v in metrics["accuracy"].items())
        (tmp / "index.html").write_text(
            "<!doctype html><meta charset='utf-8'><title>obliviate demo</title>"
            f"<h1>obliviate: the shipped model <code>{html.escape(model)}</code></h1>"
            f"<h2>Samples</h2><table>{''.join(rows)}</table>"
            f"<h2>Judged accuracy</h2><p>{acc}; Fréchet distance {metrics['fid']:.3f} "
            f"({metrics['images']} images, {metrics['seconds']:.0f} s)</p>"
            f"<table><tr><th>concept</th><th>kind</th><th>accuracy</th></tr>{table}</table>"
        )
    return Path(out)
