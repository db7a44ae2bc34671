"""Six requests in a row on the shipped model, for several methods side by side.

    python benchmarks/sequential.py --methods duge,esd,uce --json runs/seq.json

After each request: UA of every target removed so far (1 - judged accuracy of that
concept), mean accuracy of the concepts never removed relative to the shipped model's
(retained), seconds of the request, peak memory, bytes stored. Everything printed is
measured in this run, from images generated in this run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from obliviate import evaluate, load_pipeline
from obliviate.erase import erase
from obliviate.request import Request

DEFAULT_SEQUENCE = "star,striped,square,red,triangle,dotted"


def run_method(method: str, sequence: list[str], base_metrics: dict, work: Path,
               images_per_combo: int, save: str) -> list[dict]:
    """Apply `sequence` one request at a time with `method`; evaluate after each step."""
    pipe = load_pipeline("shapes")
    rows = []
    for step, concept in enumerate(sequence, 1):
        out = work / method / str(step)
        result = erase(pipe, Request((concept,)), method=method, out=out, save=save, progress=False)
        pipe = load_pipeline(out)
        metrics = evaluate(pipe, images_per_combo=images_per_combo, progress=False)
        removed = sequence[:step]
        ua = {c: 1 - metrics["per_concept"][c]["accuracy"] for c in removed}
        kept = [c for c in metrics["per_concept"] if c not in sequence]
        retained = np.mean([metrics["per_concept"][c]["accuracy"] for c in kept])
        base_retained = np.mean([base_metrics["per_concept"][c]["accuracy"] for c in kept])
        rows.append({"method": method, "step": step, "removed": concept, "ua": ua,
                     "retained": float(retained), "retained_ratio": float(retained / base_retained),
                     "accuracy": metrics["accuracy"], "fid": metrics["fid"],
                     "seconds": result.entry.seconds, "peak_memory_mb": result.entry.peak_memory_mb,
                     "bytes_stored": result.entry.bytes_stored})
        print(format_row(rows[-1], sequence), flush=True)
    return rows


def format_row(row: dict, sequence: list[str]) -> str:
    """One table line: UA per target so far, retained accuracy and ratio, cost."""
    ua = " ".join(f"{row['ua'][c]:5.2f}" if c in row["ua"] else "    -" for c in sequence)
    return (f"{row['method']:<6} {row['step']:>2} {row['removed']:<9} | {ua} | "
            f"{row['retained']:.3f} ({row['retained_ratio']:.2f}) | fid {row['fid']:6.2f} | "
            f"{row['seconds']:6.1f} s {row['peak_memory_mb']:7.0f} MB {row['bytes_stored'] / 1e6:6.2f} MB")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="duge,esd,uce")
    parser.add_argument("--sequence", default=DEFAULT_SEQUENCE)
    parser.add_argument("--images-per-combo", type=int, default=2)
    parser.add_argument("--save", default="delta", choices=["full", "delta"])
    parser.add_argument("--json")
    parser.add_argument("--work", help="folder for the models (default: a temp folder)")
    args = parser.parse_args(argv)
    sequence = args.sequence.split(",")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="obliviate-seq-"))
    base = evaluate(load_pipeline("shapes"), images_per_combo=args.images_per_combo, progress=False)
    print("UA per target (columns in request order), retained = mean accuracy of never-removed "
          "concepts (ratio to the shipped model)")
    print(f"{'method':<6} {'k':>2} {'removed':<9} | " + " ".join(f"{c[:5]:>5}" for c in sequence))
    rows = []
    for method in args.methods.split(","):
        rows += run_method(method, sequence, base, work, args.images_per_combo, args.save)
    if args.json:
        Path(args.json).write_text(json.dumps({"base": base, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
