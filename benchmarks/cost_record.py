r"""What one finished detect run cost, stage by stage: threat-model forwards, seconds, and the search's seconds and
forwards per scored image, with the model (arch, image size, masking) and the machine beside them.

    python benchmarks/cost_record.py RUN_DIR --name resnet50-224-smoke --note "..." \
        --out benchmarks/results/cost/resnet50-224-smoke.json

The records feed docs/scaling.md's per-image costs: forwards count the same on any machine, seconds only on this one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from poisonscan.runs import atomic_write_json, environment_record


def cost(run: Path) -> dict[str, Any]:
    """The cost of the finished detect run in ``run`` (its ``summary.json`` and ``search.json``)."""
    summary = json.loads((run / "summary.json").read_text())
    search = json.loads((run / "search.json").read_text())
    forwards, seconds = summary["cost"]["forwards"], summary["timings"]
    scored = len(search["scored"])
    per_image = forwards["search"] / max(1, scored)
    return {
        "run": str(run), "arch": summary["model"]["arch"], "image_size": summary["model"]["image_size"],
        "images": summary["counts"]["scanned"], "scored": scored, "method": search["method"],
        "masking": search.get("masking"), "masked_by": search.get("masked_by", "pixels"),
        "masks_per_image": search.get("masks_per_image"), "flip_set": len(search["flip_set"]),
        "window": search["window"], "forwards": forwards, "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "search_forwards_per_scored_image": round(per_image, 1),
        "search_seconds_per_scored_image": round(seconds["search"] / max(1, scored), 3),
        "search_forwards_per_second": round(forwards["search"] / max(seconds["search"], 1e-9), 1),
        "feature_forwards_per_second": round(forwards["features"] / max(seconds["features"], 1e-9), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--name", required=True)
    ap.add_argument("--note", default="", help="what else ran on the machine, what the run was for")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    rec = {"name": args.name, "note": args.note, **cost(args.run), "environment": environment_record()}
    atomic_write_json(args.out, rec)
    print(f"{rec['name']}: {rec['arch']} at {rec['image_size']} px, {rec['images']} images, {rec['scored']} scored "
          f"({rec['masks_per_image']} masks by {rec['masked_by']} + {rec['flip_set']} flips)")
    for stage, n in rec["forwards"].items():
        if stage != "total":
            print(f"  {stage:<11}{n:>10,} forwards {rec['seconds'].get(stage, 0):>9.1f} s")
    print(f"  search: {rec['search_forwards_per_scored_image']:.0f} forwards and "
          f"{rec['search_seconds_per_scored_image']:.2f} s per scored image "
          f"({rec['search_forwards_per_second']:.0f} forwards/s); features {rec['feature_forwards_per_second']:.0f}/s")


if __name__ == "__main__":
    main()
