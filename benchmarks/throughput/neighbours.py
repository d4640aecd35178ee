"""Cost of the neighbour consensus (``detect/neighbours.py``): k nearest neighbours of every feature row.

    python benchmarks/bench.py neighbours [--n 50000] [--dim 512] [--k 10] [--clusters 1000] [--threads N]

Random clustered features (``--clusters`` Gaussian blobs, like a threat model's), float32. Reports the seconds of
the exact search (one flat inner-product index, what detect uses up to 20,000 images) and of the inverted-file
search over the k-means centroids (what it uses above), and how many of the inverted file's neighbours are the
exact ones.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from poisonscan.detect.neighbours import NPROBE, nearest_neighbours


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        import faiss

        faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(args.clusters, args.dim)).astype(np.float32)
    x = centres[rng.integers(0, args.clusters, args.n)] + 0.5 * rng.normal(size=(args.n, args.dim)).astype(np.float32)
    t0 = time.perf_counter()
    exact = nearest_neighbours(x, args.k, exact_limit=args.n)
    t_exact = time.perf_counter() - t0
    t0 = time.perf_counter()
    ivf = nearest_neighbours(x, args.k, centroids=centres, exact_limit=0)
    t_ivf = time.perf_counter() - t0
    agree = float(np.mean([len(set(a) & set(b)) / args.k for a, b in zip(exact, ivf)]))
    result = {"n": args.n, "dim": args.dim, "k": args.k, "clusters": args.clusters, "exact_s": round(t_exact, 2),
              "ivf_s": round(t_ivf, 2), "ivf_nprobe": NPROBE, "ivf_recall": round(agree, 4)}
    print(f"{args.n:,} x {args.dim}, k = {args.k}: exact {t_exact:.1f} s, inverted file ({args.clusters} lists, "
          f"{NPROBE} probes) {t_ivf:.1f} s, {agree:.1%} of its neighbours exact")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
