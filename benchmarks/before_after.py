"""The README's before/after picture: the same prompts and seeds on two models.

    python benchmarks/before_after.py --before shapes --after runs/1 \
        --prompts "a red solid star,a blue striped star,a green solid circle,a yellow dotted cross" \
        --out docs/before_after.png

Each row is one prompt: `--n` images from the model before, a gap, the same seeds from
the model after. The judge's verdict on the object is printed for every image so the
picture and the numbers can be checked against each other.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from obliviate import load_pipeline
from obliviate.evaluate.evaluation import load_judge
from obliviate.generate import generate_images, image_grid


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="shapes")
    parser.add_argument("--after", required=True)
    parser.add_argument("--prompts", required=True, help="comma-separated prompts, one row each")
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=int, default=3)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    prompts = [p.strip() for p in args.prompts.split(",") if p.strip()]
    before, after = load_pipeline(args.before), load_pipeline(args.after)
    judge = load_judge(before)
    rows = []
    for prompt in prompts:
        a = generate_images(before, [prompt] * args.n, seed=args.seed)
        b = generate_images(after, [prompt] * args.n, seed=args.seed)
        print(f"{prompt!r}: before {judge.predict(a)['object']}  after {judge.predict(b)['object']}")
        gap = np.full((1, *a.shape[1:]), 255, np.uint8)
        rows.append(np.concatenate([a, gap, b]))
    image_grid(np.concatenate(rows), columns=2 * args.n + 1, scale=args.scale).save(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
