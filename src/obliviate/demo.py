"""`make demo`: the main job on the shipped model, written as a report folder.

Removes `star`, then `striped`, from the shipped model with DUGE (the default method),
measures the model after each request against the shipped one, and writes the benchmark
report (before/after grids of each target and of a related concept, the UA table, retained
accuracy, cost) to `out`. A few minutes on a laptop CPU.
"""

from __future__ import annotations

from pathlib import Path

from .bench import run_bench, table, to_json
from .report import write_report


def run_demo(out: Path, model: str = "shapes", method: str = "duge",
             sequence: tuple[str, ...] = ("star", "striped")) -> Path:
    """Run the demo sequence and write `out/index.html` (plus figures and `bench.json`)."""
    result = run_bench([method], list(sequence), model=model, images_per_combo=1)
    print(table(result))
    index = write_report(result, out, command=f"obliviate demo --model {model} --out {out}")
    (Path(out) / "bench.json").write_text(to_json(result))
    return index
