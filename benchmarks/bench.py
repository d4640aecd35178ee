"""Throughput benchmarks, one entry point: ``python benchmarks/bench.py NAME [ARGS]``.

Each NAME is a script of ``benchmarks/throughput/`` that prints both sides of its comparison in one run:

- ``masking``: masked forwards/s of cluster activation masking against bare batched inference;
- ``pretrain``: SSL pretraining images/s per precision and memory format;
- ``precision``: bf16/fp16/fp32 autocast on this machine (what ``--precision auto`` picks);
- ``neighbours``: the feature-neighbour search, exact against the inverted-file index.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

THROUGHPUT = Path(__file__).resolve().parent / "throughput"
NAMES = sorted(p.stem for p in THROUGHPUT.glob("*.py") if not p.stem.startswith("_"))


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in NAMES:
        raise SystemExit(f"usage: python benchmarks/bench.py {{{'|'.join(NAMES)}}} [ARGS]")
    sys.argv = [f"benchmarks/bench.py {argv[0]}", *argv[1:]]
    runpy.run_path(str(THROUGHPUT / f"{argv[0]}.py"), run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
