"""Run directories: resolved config, environment record, atomic writes and stage-done markers.

Only this module writes the files of a run, so a reader finds every output in one place and a killed run never
leaves a partial file that looks complete.
"""

from __future__ import annotations

import io
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np

from poisonscan.errors import UsageError


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if is_dataclass(obj):
        return asdict(obj)
    return str(obj)


def to_json(obj: Any) -> str:
    """JSON text of ``obj`` (Paths, numpy scalars and dataclasses allowed)."""
    return json.dumps(obj, indent=2, default=_json_default, ensure_ascii=False)


def atomic_write_bytes(path: Path | str, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temp file in the same folder and ``os.replace``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def atomic_write_text(path: Path | str, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8", errors="surrogateescape"))


def atomic_write_json(path: Path | str, obj: Any) -> Path:
    return atomic_write_text(path, to_json(obj) + "\n")


def atomic_save_npy(path: Path | str, array: np.ndarray) -> Path:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return atomic_write_bytes(path, buf.getvalue())


def git_commit(cwd: Path | None = None) -> str | None:
    """The commit of the poisonscan checkout, if it is one."""
    root = Path(cwd or Path(__file__).resolve().parent)
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment_record(seed: int | None = None, runtime: Any = None) -> dict[str, Any]:
    """Versions, machine, device, commit, seed and command line: enough to reproduce a result."""
    import torch

    record: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
        "git_commit": git_commit(),
        "seed": seed,
    }
    for name in ("poisonscan", "torchvision", "timm", "faiss", "numpy", "PIL", "typer", "webdataset", "safetensors"):
        try:
            mod = __import__(name)
            record[name] = getattr(mod, "__version__", "unknown")
        except ImportError:
            record[name] = None
    if runtime is not None and hasattr(runtime, "describe"):
        record["runtime"] = runtime.describe()
    return record


class RunDir:
    """One run's output folder."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def file(self, name: str) -> Path:
        return self.path / name

    def exists(self, name: str) -> bool:
        return (self.path / name).exists()

    def write_bytes(self, name: str, data: bytes) -> Path:
        return atomic_write_bytes(self.file(name), data)

    def write_text(self, name: str, text: str) -> Path:
        return atomic_write_text(self.file(name), text)

    def write_json(self, name: str, obj: Any) -> Path:
        return atomic_write_json(self.file(name), obj)

    def save_npy(self, name: str, array: np.ndarray) -> Path:
        return atomic_save_npy(self.file(name), array)

    def read_json(self, name: str) -> Any:
        return json.loads(self.file(name).read_text(encoding="utf-8"))

    def stage_done(self, stage: str) -> bool:
        return self.file(f"stages/{stage}.done").exists()

    def mark_done(self, stage: str, info: dict[str, Any] | None = None) -> None:
        self.write_json(f"stages/{stage}.done", {"stage": stage, "time": time.time(), **(info or {})})

    def clear_stage(self, stage: str) -> None:
        self.file(f"stages/{stage}.done").unlink(missing_ok=True)

    def write_config(self, cfg: Any) -> Path:
        from poisonscan.config import config_to_dict

        return self.write_json("config.json", config_to_dict(cfg) if is_dataclass(cfg) else cfg)

    def write_environment(self, seed: int | None = None, runtime: Any = None) -> Path:
        return self.write_json("environment.json", environment_record(seed, runtime))


def _next_name(parent: Path) -> str:
    nums = [int(m.group(1)) for p in parent.glob("run*") if (m := re.fullmatch(r"run(\d+)", p.name))]
    return f"run{max(nums, default=0) + 1}"


def create_run(command: str, out: Path | str | None = None, name: str | None = None,
               runs_root: Path | str = Path("runs"), overwrite: bool = False, resume: bool = False) -> RunDir:
    """Create ``out`` or ``runs/<command>/<name>`` (``run1``, ``run2``, ... when no name is given).

    An existing non-empty folder is refused unless ``overwrite`` or ``resume``.
    """
    if out is None:
        parent = Path(runs_root) / command
        parent.mkdir(parents=True, exist_ok=True)
        out = parent / (name or _next_name(parent))
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UsageError(f"output {path} exists and is not a folder")
    if path.exists() and any(path.iterdir()) and not (overwrite or resume):
        raise UsageError(f"output folder {path} is not empty (use --overwrite, or --resume to continue it)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create output folder {path}: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK):
        raise UsageError(f"output folder {path} is not writable")
    return RunDir(path)
