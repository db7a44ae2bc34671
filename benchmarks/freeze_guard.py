"""FreezeAsGuard on the shipped model: does the mask stop re-learning a removed concept by
fine-tuning, while fine-tuning on a legal concept still works?

    python benchmarks/freeze_guard.py [--concept star] [--legal dotted] [--erase-with uce]
        [--steps 100] [--json out.json]

1. Remove `--concept` from the shipped model (`--erase-with`, default UCE: the mask, not the
   eraser, is under test here, and UCE takes a second).
2. Learn a FreezeAsGuard mask on that model: illegal data = rendered images of the concept,
   legal data = rendered images of `--legal` (the same as `obliviate guard`).
3. Relearning attack: fine-tune the same number of steps on images of the removed concept,
   once honouring the mask and once ignoring it; report the concept's judged accuracy.
4. Legal fine-tuning: the same, on images of `--legal`; report that concept's accuracy.
Accuracies come from 96 generated images per measurement (plain prompts naming the concept).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

from obliviate import load_pipeline
from obliviate.erase import erase
from obliviate.evaluate.attacks import concept_accuracy, naming_prompts
from obliviate.evaluate.evaluation import load_judge
from obliviate.finetune import finetune, shapes_data
from obliviate.methods.freeze_guard import FreezeAsGuard
from obliviate.request import Request


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concept", default="star")
    parser.add_argument("--legal", default="dotted")
    parser.add_argument("--erase-with", default="uce")
    parser.add_argument("--steps", type=int, default=100, help="fine-tuning steps of every run")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--rho", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--n-eval", type=int, default=96)
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    pipe = load_pipeline("shapes")
    judge = load_judge(pipe)
    erase(pipe, Request((args.concept,)), method=args.erase_with,
          out=Path(tempfile.mkdtemp(prefix="obliviate-guard-")) / "erased", progress=False)

    def accuracy(p, concept):
        return concept_accuracy(p, judge, concept, naming_prompts(concept, args.n_eval, 11), seed=3)

    base = {c: accuracy(pipe, c) for c in (args.concept, args.legal)}
    print(f"erased model ({args.erase_with}): {args.concept} {base[args.concept]:.3f}, "
          f"{args.legal} {base[args.legal]:.3f}", flush=True)
    illegal_data = shapes_data([args.concept], 64, 0)
    legal_data = shapes_data([args.legal], 64, 1)
    start = time.perf_counter()
    mask = FreezeAsGuard(rho=args.rho, rounds=args.rounds).learn(pipe, illegal_data, legal_data)
    guard_seconds = time.perf_counter() - start
    print(f"mask: {len(mask.frozen)} tensors frozen ({mask.frozen_fraction:.0%} of UNet parameters), "
          f"{guard_seconds:.0f} s", flush=True)

    results = {}
    for label, concept, data in (("relearn", args.concept, shapes_data([args.concept], 64, 2)),
                                 ("legal", args.legal, shapes_data([args.legal], 64, 3))):
        for masked in (False, True):
            p = copy.deepcopy(pipe)
            finetune(p, data, steps=args.steps, lr=args.lr, freeze=set(mask.frozen) if masked else set(),
                     seed=0, progress=False)
            acc = accuracy(p, concept)
            results[f"{label}_{'masked' if masked else 'unmasked'}"] = acc
            print(f"{label:<8} {concept:<8} {'with mask   ' if masked else 'without mask'}: accuracy "
                  f"{base[concept]:.3f} -> {acc:.3f}", flush=True)
    relearn_ratio = results["relearn_masked"] / max(results["relearn_unmasked"], 1e-9)
    legal_ratio = results["legal_masked"] / max(results["legal_unmasked"], 1e-9)
    print(f"relearning: masked/unmasked accuracy {relearn_ratio:.2f} (floor: at most 0.50)")
    print(f"legal:      masked/unmasked accuracy {legal_ratio:.2f} (floor: at least 0.90)")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "args": vars(args), "base": base, "results": results, "relearn_ratio": relearn_ratio,
            "legal_ratio": legal_ratio, "frozen_tensors": len(mask.frozen),
            "frozen_fraction": mask.frozen_fraction, "guard_seconds": guard_seconds}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
