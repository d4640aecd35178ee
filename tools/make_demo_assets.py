"""Build the demo's bundled data and threat model from ../shared/data (documented in docs/demo.md).

Steps (each reproducible from the seed):
1. ``subset``: a class-balanced CIFAR-10 subset as uncompressed WebDataset shards, original JPEG bytes:
   the first 500 training images per class and the first 100 test images per class in sorted key order
   -> ``poisonscan/assets/demo/{train,val}-000000.tar.gz``.
2. ``threat``: poison the subset exactly as ``poisonscan demo`` does, pretrain the threat model with poisonscan's own
   ``pretrain`` (recipe below), and save it as fp16 safetensors with a JSON record (recipe, seed, hashes).

Usage: python tools/make_demo_assets.py subset|threat [--shared-data ../shared/data] [--epochs N]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "poisonscan" / "assets"
DEMO = ASSETS / "demo"


def _read_shards(paths: list[Path]) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for p in paths:
        with tarfile.open(p) as tar:
            for m in tar.getmembers():
                if m.isfile():
                    key, ext = m.name.split(".", 1)
                    samples.setdefault(key, {})[ext] = tar.extractfile(m).read()  # type: ignore[union-attr]
    return samples


def _write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext in sorted(members):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(members[ext]), 0, 0o644
                tar.addfile(info, io.BytesIO(members[ext]))
    gz = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=gz, mtime=0) as fh:
        fh.write(buf.getvalue())
    path.write_bytes(gz.getvalue())


def make_subset(shared: Path, per_class_train: int = 500, per_class_val: int = 100) -> None:
    wds = shared / "cifar10-wds"
    for split, shards, per_class in (("train", sorted(wds.glob("train-*.tar.gz")), per_class_train),
                                     ("val", sorted(wds.glob("test-*.tar.gz")), per_class_val)):
        samples = _read_shards(shards)
        counts: dict[int, int] = {}
        chosen = []
        for key in sorted(samples):
            label = int(samples[key]["cls"])
            if counts.get(label, 0) < per_class:
                counts[label] = counts.get(label, 0) + 1
                chosen.append((key, {"jpg": samples[key]["jpg"], "cls": samples[key]["cls"]}))
        DEMO.mkdir(parents=True, exist_ok=True)
        _write_shard(DEMO / f"{split}-000000.tar.gz", chosen)
        print(f"{split}: {len(chosen)} samples -> {DEMO / f'{split}-000000.tar.gz'}")
    shutil.copy(wds / "classes.tsv", DEMO / "classes.tsv")
    shutil.copy(shared / "triggers" / "trigger_10.png", ASSETS / "triggers" / "trigger_10.png")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_threat(work: Path, epochs: int) -> None:
    from poisonscan.demo import DEMO_RECIPE, poison_demo_data

    work.mkdir(parents=True, exist_ok=True)
    poisoned = poison_demo_data(work / "data", overwrite=True)
    recipe = dict(DEMO_RECIPE, epochs=epochs)
    run = work / "pretrain"
    shutil.rmtree(run, ignore_errors=True)
    from poisonscan.demo import DEMO_VAL

    cmd = [sys.executable, "-m", "poisonscan", "pretrain", "--data", str(poisoned["train"]), "--out", str(run),
           "--save-fp16", "--knn-val", str(DEMO_VAL), "--knn-every", "20", "--json"]
    for key, value in recipe.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True)
    src = run / "encoder.safetensors"
    dst = DEMO / "threat_model.safetensors"
    shutil.copy(src, dst)
    record = {
        "recipe": recipe, "command": " ".join(cmd[1:]), "train_seconds": round(time.time() - t0, 1),
        "data": {"train": "assets/demo/train-000000.tar.gz", "train_sha256": sha256(DEMO / "train-000000.tar.gz"),
                 "ground_truth_sha256": sha256(Path(poisoned["ground_truth"]))},
        "sha256": sha256(dst),
    }
    (DEMO / "threat_model.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=["subset", "threat"])
    ap.add_argument("--shared-data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--work", type=Path, default=Path(".bench/demo-threat"))
    ap.add_argument("--epochs", type=int, default=None)
    args = ap.parse_args()
    if args.step == "subset":
        make_subset(args.shared_data)
    else:
        from poisonscan.demo import DEMO_RECIPE

        make_threat(args.work, args.epochs or DEMO_RECIPE["epochs"])


if __name__ == "__main__":
    main()
