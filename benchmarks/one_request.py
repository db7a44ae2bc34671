"""One request (or a short chain) on the shipped model: remove a concept, measure the cost.

    python benchmarks/one_request.py --concept star --methods duge,uce,esd [--json out.json] [--work DIR]
    python benchmarks/one_request.py --concept star,striped --methods rgd,doco,fewshot-te
    python benchmarks/one_request.py --concept striped --methods rgd --set style_t_max=300
    python benchmarks/one_request.py --model runs/w/rgd --base shapes --earlier star --concept striped --methods rgd
    python benchmarks/one_request.py --concept star,striped --methods rgd,doco,fewshot-te --seeds 0,1,2,3

For each method and each request (a comma-separated `--concept` is a chain: request k
starts from the model after request k-1): seconds of the request (image generation
included), UA of the target and of the earlier targets, and the change in judged accuracy
of the other objects, of colours and of styles against the shipped model (and, for objects,
against the model the request started from: "this request"), all from
`obliviate eval`'s prompt set (`--images-per-combo` images per object x colour x style).
`--seeds` repeats every chain with each erase seed (the method's prompts, images, noise and
timesteps; the evaluation's seed stays fixed) and ends with the worst and mean of each
figure over the seeds: a method whose result hangs on its seed shows it there.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from obliviate import evaluate, load_pipeline
from obliviate.cli import parse_options
from obliviate.erase import erase
from obliviate.request import Request
from obliviate.shapes import vocab


def summarise(metrics: dict, base: dict, target: str, removed: tuple[str, ...] = ()) -> dict:
    """UA of the target (and of earlier targets `removed`); accuracy drops of the concepts
    never removed, per kind and worst single."""
    kind = vocab.concept(target).kind
    pc, bc = metrics["per_concept"], base["per_concept"]
    gone = {target, *removed}
    out = {"ua": 1 - pc[target]["accuracy"], "ua_earlier": {c: 1 - pc[c]["accuracy"] for c in removed}}
    for k in ("object", "colour", "style"):
        names = [c for c in pc if pc[c]["kind"] == k and c not in gone]
        out[f"{k}_drop"] = float(np.mean([bc[c]["accuracy"] for c in names]) - np.mean([pc[c]["accuracy"] for c in names]))
        out[f"{k}_worst_drop"] = float(max(bc[c]["accuracy"] - pc[c]["accuracy"] for c in names))
    out["kind"] = kind
    return out


def print_spread(rows: list[dict]) -> None:
    """Worst and mean over the seeds of each (method, step): UA (lowest is worst), the
    earlier targets' UA, and the objects' drop (highest is worst)."""
    print("over the seeds: worst / mean")
    for key in dict.fromkeys((r["method"], r["step"], r["concept"]) for r in rows):
        group = [r for r in rows if (r["method"], r["step"], r["concept"]) == key]
        ua = [r["ua"] for r in group]
        earlier = [min(r["ua_earlier"].values()) for r in group if r["ua_earlier"]]
        drop = [r["object_drop"] for r in group]
        shown = f"  earlier UA {min(earlier):.3f} / {np.mean(earlier):.3f}" if earlier else ""
        print(f"{key[0]:<10} {key[1]} {key[2]:<8} {len(group)} seeds  UA {min(ua):.3f} / {np.mean(ua):.3f}"
              f"{shown}  objects drop {max(drop):+.3f} / {np.mean(drop):+.3f}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concept", default="star")
    parser.add_argument("--methods", default="duge,uce,esd")
    parser.add_argument("--images-per-combo", type=int, default=4)
    parser.add_argument("--earlier", default="", help="targets removed before --model (comma-separated), "
                        "reported as earlier targets")
    parser.add_argument("--json")
    parser.add_argument("--work", help="keep the erased models here (default: a temporary folder)")
    parser.add_argument("--model", default="shapes", help="the model to start from (a shapes-world model)")
    parser.add_argument("--base", help="the model the drops are measured against (default: --model); "
                        "e.g. `--model runs/w/rgd --base shapes` continues a chain from a saved model")
    parser.add_argument("--seeds", default="0", help="erase seeds, comma-separated (default 0)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="method option, as in `obliviate erase --set` (repeatable)")
    args = parser.parse_args(argv)
    options = parse_options(args.set)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="obliviate-one-"))
    base = evaluate(load_pipeline(args.base or args.model), images_per_combo=args.images_per_combo, progress=False)
    print(f"base model: accuracy {base['accuracy']}")
    start = base if not args.base or args.base == args.model else evaluate(
        load_pipeline(args.model), images_per_combo=args.images_per_combo, progress=False)
    rows = []
    chain = args.concept.split(",")
    earlier = tuple(c for c in args.earlier.split(",") if c)
    seeds = [int(s) for s in args.seeds.split(",")]
    for method, seed in ((m, s) for m in args.methods.split(",") for s in seeds):
        pipe = load_pipeline(args.model)
        before = start  # the model this request starts from
        for step, concept in enumerate(chain, 1):
            out = work / (method if len(seeds) == 1 else f"{method}-seed{seed}")
            out = out if len(chain) == 1 else out / f"{step}-{concept}"
            result = erase(pipe, Request((concept,)), method=method, out=out, progress=False,
                           options=options, seed=seed)
            metrics = evaluate(pipe, images_per_combo=args.images_per_combo, progress=False)
            removed = (*earlier, *chain[:step - 1])
            own = summarise(metrics, before, concept, removed)  # this request's own cost
            row = {"method": method, "seed": seed, "step": step, "concept": concept,
                   "seconds": result.entry.seconds,
                   **summarise(metrics, base, concept, removed),
                   **{f"{k}_drop_this_request": own[f"{k}_drop"] for k in ("object", "colour", "style")},
                   "accuracy": metrics["accuracy"], "fid": metrics["fid"], "base_fid": base["fid"]}
            rows.append(row)
            before = metrics
            shown = "".join(f" (UA {c} {u:.3f})" for c, u in row["ua_earlier"].items())
            print(f"{method:<10} {seed:>4} {step} {concept:<8} {row['seconds']:6.1f} s  UA {row['ua']:.3f}{shown}  "
                  f"drop: objects {row['object_drop']:+.3f} (worst {row['object_worst_drop']:+.3f}; "
                  f"this request {row['object_drop_this_request']:+.3f})  "
                  f"colours {row['colour_drop']:+.3f}  styles {row['style_drop']:+.3f}  "
                  f"fid {row['fid']:.2f} (base {base['fid']:.2f})", flush=True)
    if len(seeds) > 1:
        print_spread(rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"base": base, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
