"""Six requests in a row on the shipped model, DUGE, ESD and UCE side by side.

    python benchmarks/sequential.py [--methods duge,esd,uce,rgd,doco,fewshot-te] [...]

A thin wrapper over `obliviate bench` (every option of that command works here), kept so
the benchmark lives beside the other long runs.
"""

import sys

from obliviate.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
