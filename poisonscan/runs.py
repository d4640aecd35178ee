"""Run directories: resolved config, environment record, atomic writes, stage-done markers and run locks.

Only this module writes the files of a run, so a reader finds every output in one place and a killed run never
leaves a partial file that looks complete. Every output gets the mode the user's umask gives a new file
(:func:`file_mode`), the paths in a saved config are absolute (:func:`config_record`), and a run folder is locked
against a second process while a command writes it (:func:`lock_run`).

Its length is one concern kept together: every file a run writes goes through here (atomic writes, modes,
locks, the config and environment records), so what a run may write is reviewed in one file.
"""

from __future__ import annotations

import errno
import functools
import io
import json
import os
import platform
import re
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from poisonscan.errors import UsageError

try:
    import fcntl
except ImportError:             # no flock on this platform: run folders are not locked
    fcntl = None  # type: ignore[assignment]

F = TypeVar("F", bound=Callable[..., Any])


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


# ------------------------------------------------------------------------------------------------- file modes

_UMASK_LOCK = threading.Lock()


def _proc_umask() -> int | None:
    """The umask from ``/proc/self/status`` (Linux 4.7+), read without changing it; None elsewhere."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


@functools.lru_cache(maxsize=1)
def _set_and_restore_umask() -> int:
    """The umask read by setting and restoring it (``os.umask`` can only be read that way): done once per process,
    as another thread creating a file in between would get the temporary mask."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def current_umask() -> int:
    """The process's umask: from ``/proc/self/status`` on Linux (each call, so a changed umask counts), else the
    cached set-and-restore reading."""
    mask = _proc_umask()
    return _set_and_restore_umask() if mask is None else mask


def file_mode() -> int:
    """The mode a new file gets under the umask (``0o666 & ~umask``; 0644 under the usual 022)."""
    return 0o666 & ~current_umask()


def temp_file(path: Path | str) -> tuple[int, Path]:
    """A new temp file beside ``path`` (``.<name>.XXXX.tmp``) with :func:`file_mode`: ``(fd, temp path)``.

    ``mkstemp`` creates it 0600, a mode that would stay on the output after the rename; the caller writes, fsyncs
    and ``os.replace``-s it onto ``path`` (or unlinks it on failure).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    mode = file_mode()
    try:
        os.fchmod(fd, mode)
    except (AttributeError, OSError):     # no fchmod (Windows) or a file system that refuses it
        try:
            os.chmod(tmp, mode)
        except OSError:
            pass
    return fd, Path(tmp)


def atomic_write_bytes(path: Path | str, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temp file in the same folder and ``os.replace``; the file gets
    :func:`file_mode`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = temp_file(path)
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


# ---------------------------------------------------------------------------------------------- saved configs

#: settings that name files or folders: a saved config holds them absolute, so the run works from any folder
PATH_SETTINGS = frozenset({"data", "model", "out", "resume", "run", "source", "removed", "reshard", "val",
                           "val_patched", "train", "truth", "trigger", "triggers", "knn_val", "backdoor_trigger",
                           "store_cache", "csv", "plots", "shared_data"})
#: ``CLASS=TRIGGER.png`` settings: the part after ``=`` is a path
TARGET_SETTINGS = frozenset({"targets"})
#: switches of one invocation that a saved config leaves out: how it prints (``quiet``), what it does to the
#: folder (``overwrite``, ``resume``) and what it may run (``trust_checkpoint``: only its flag allows a pickle's
#: code); kept, they would be frozen in a resumed run or act again when the saved config is reused as ``--config``
INVOCATION_SETTINGS = frozenset({"quiet", "overwrite", "resume", "trust_checkpoint"})


def absolute_spec(spec: str) -> str:
    """``spec`` as an absolute path, read as it was from the current folder.

    A WebDataset brace pattern (``shards/train-{000000..000009}.tar.gz``) keeps its pattern: only the folder before
    the first brace is made absolute. Empty specs and URLs (``scheme://``, ``pipe:``) are returned as they are.
    """
    if not spec or "://" in spec or spec.startswith("pipe:") or os.path.isabs(spec):
        return spec
    brace = spec.find("{")
    if brace < 0:
        return os.path.abspath(spec)
    cut = max(spec.rfind("/", 0, brace), spec.rfind(os.sep, 0, brace))
    head, tail = spec[:cut + 1], spec[cut + 1:]
    return os.path.join(os.path.abspath(head) if head else os.getcwd(), tail)


def _absolute(value: Any, target: bool = False) -> Any:
    if isinstance(value, (list, tuple)):            # a list of shards, triggers or targets
        return [_absolute(v, target) for v in value]
    if isinstance(value, Path):
        value = str(value)
    if not isinstance(value, str):
        return value
    if target:
        cls, sep, path = value.partition("=")
        return f"{cls}={absolute_spec(path.strip())}" if sep and path.strip() else value
    return absolute_spec(value)


def absolute_settings(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` (a config as a dict) with every path setting (:data:`PATH_SETTINGS`, the trigger of each
    ``CLASS=TRIGGER`` target) absolute; other settings unchanged."""
    return {k: _absolute(v, k in TARGET_SETTINGS) if k in PATH_SETTINGS | TARGET_SETTINGS else v
            for k, v in values.items()}


def config_record(cfg: Any) -> dict[str, Any]:
    """What a run saves of its config (``config.json``, a pretrain checkpoint): every setting that shapes the
    result, paths absolute, without the invocation switches (:data:`INVOCATION_SETTINGS`)."""
    from poisonscan.settings import config_to_dict

    values = config_to_dict(cfg) if is_dataclass(cfg) else dict(cfg)
    return absolute_settings({k: v for k, v in values.items() if k not in INVOCATION_SETTINGS})


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
        "cwd": os.getcwd(),             # where the relative paths of argv were read from
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


# ------------------------------------------------------------------------------------------------------- locks

#: the lock file inside a run folder: it holds the pid of the process writing the run and is deleted when the
#: command ends; it never counts as content of the folder
LOCK_NAME = ".lock"

_HELD = threading.local()


def _held() -> list[RunLock]:
    """The locks this thread took, in order (:func:`releases_run_locks` releases those of one call)."""
    locks = getattr(_HELD, "locks", None)
    if locks is None:
        locks = _HELD.locks = []
    return locks


def _rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _lock_pid(fd: int) -> int | None:
    """The pid written in an open lock file, if it has one."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 32).decode("ascii", errors="replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None


def same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


class RunLock:
    """An exclusive ``flock`` on ``<folder>/.lock`` (which holds the owner's pid)."""

    def __init__(self, folder: Path, fd: int, created: bool = False) -> None:
        self.folder = folder
        self.fd: int | None = fd
        self.created = created          # the locking command made the folder (removed again if it fails empty)

    def __repr__(self) -> str:
        return f"RunLock({str(self.folder)!r}, held={self.fd is not None})"

    def release(self) -> None:
        """Delete the lock file, then unlock. The file goes while the lock is still held, so no other process has
        it; a process that opened it before checks after locking that it is still the folder's lock file."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            (self.folder / LOCK_NAME).unlink(missing_ok=True)
        except OSError:
            pass
        os.close(fd)


def lock_run(folder: Path | str, created: bool = False) -> RunLock | None:
    """Lock the run folder ``folder`` (it must exist) for this process: a non-blocking exclusive ``flock`` on
    ``folder/.lock``, held until released (:func:`releases_run_locks`: for the command's life). A folder holding a
    link is refused (:func:`refuse_links`).

    Another process holding it: ``UsageError`` naming its pid. Under torchrun only rank 0 locks (the other ranks
    get None), and so does a platform without ``fcntl`` or a file system without ``flock``: nothing is locked there.
    """
    folder = Path(folder)
    if _rank() != 0:
        return None
    if fcntl is None:
        refuse_links(folder)
        return None
    path = folder / LOCK_NAME
    while True:
        try:            # never through a link: a shared run folder's .lock must not point the write elsewhere
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o666)
        except OSError as exc:
            raise UsageError(f"cannot lock run folder {folder}: {path} is not a plain file we can open "
                             f"({exc.strerror or exc})") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise UsageError(f"cannot lock run folder {folder}: {path} is not a regular file")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            pid = _lock_pid(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                who = f" (pid {pid})" if pid is not None else ""
                raise UsageError(f"run folder {folder} is in use by another poisonscan process{who}") from None
            refuse_links(folder)                    # a file system without flock (some network mounts)
            return None
        if same_file(fd, path):
            break
        os.close(fd)                                # its holder released and deleted it meanwhile: lock anew
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
    except OSError:
        pass                                        # the pid is for the message of a refused process only
    lock = RunLock(folder, fd, created)
    _held().append(lock)
    try:
        refuse_links(folder)
    except UsageError:
        lock.release()
        _held().remove(lock)
        raise
    return lock


def refuse_links(folder: Path) -> None:
    """Refuse a run folder that holds a symbolic link anywhere inside (``UsageError`` naming it): a reopened
    folder (``--resume``, ``--overwrite``) made by someone else could otherwise point ``search/`` or a stage file
    elsewhere and have this run write, or clear, through it."""
    todo = [str(folder)]
    while todo:
        with os.scandir(todo.pop()) as entries:
            for entry in entries:
                if entry.is_symlink():
                    raise UsageError(f"run folder {folder} holds a link ({entry.path}): poisonscan writes only into "
                                     "plain folders; remove the link or choose another output folder")
                if entry.is_dir(follow_symlinks=False):
                    todo.append(entry.path)


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def releases_run_locks(fn: F) -> F:
    """Release the run-folder locks that ``fn`` takes when it returns or raises, so they are held for the command's
    life; when it raises, a run folder it created and left empty is removed too."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        held = _held()
        mark = len(held)
        failed = True
        try:
            result = fn(*args, **kwargs)
            failed = False
            return result
        finally:
            for lock in reversed(held[mark:]):
                lock.release()
                if failed and lock.created:
                    _remove_if_empty(lock.folder)
            del held[mark:]

    return wrapper  # type: ignore[return-value]


# -------------------------------------------------------------------------------------------------- run folders


class RunDir:
    """One run's output folder (``lock``: this process's lock on it, when it took one)."""

    def __init__(self, path: Path | str, lock: RunLock | None = None) -> None:
        self.path = Path(path)
        self.lock = lock

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
        """``config.json``: :func:`config_record` of ``cfg`` (absolute paths, no invocation switches)."""
        return self.write_json("config.json", config_record(cfg))

    def write_environment(self, seed: int | None = None, runtime: Any = None) -> Path:
        return self.write_json("environment.json", environment_record(seed, runtime))

    def release(self) -> None:
        """Release this process's lock on the folder (if it holds one)."""
        if self.lock is not None:
            self.lock.release()


def has_content(path: Path) -> bool:
    """Whether the folder ``path`` holds anything besides its lock file."""
    return any(p.name != LOCK_NAME for p in path.iterdir())


def _next_name(parent: Path) -> str:
    nums = [int(m.group(1)) for p in parent.glob("run*") if (m := re.fullmatch(r"run(\d+)", p.name))]
    return f"run{max(nums, default=0) + 1}"


def _claim_next(parent: Path) -> Path:
    """Create the next free ``parent/runN`` (a folder another process creates first is skipped)."""
    while True:
        path = parent / _next_name(parent)
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
        except OSError as exc:
            raise UsageError(f"cannot create output folder {path}: {exc.strerror or exc}") from None


def create_run(command: str, out: Path | str | None = None, name: str | None = None,
               runs_root: Path | str = Path("runs"), overwrite: bool = False, resume: bool = False) -> RunDir:
    """Create ``out`` or ``runs/<command>/<name>`` (``run1``, ``run2``, ... when no name is given) and lock it
    (:func:`lock_run`; a folder in use by another process is refused).

    A folder holding files (its lock file aside) is refused unless ``overwrite`` or ``resume``.
    """
    created = False
    if out is None:
        parent = Path(runs_root) / command
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create output folder {parent}: {exc.strerror or exc}") from None
        if name is None:
            out, created = _claim_next(parent), True
        else:
            out = parent / name
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UsageError(f"output {path} exists and is not a folder")
    created = created or not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create output folder {path}: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK):
        raise UsageError(f"output folder {path} is not writable")
    lock = lock_run(path, created=created)
    if not (overwrite or resume) and has_content(path):
        if lock is not None:
            lock.release()
        raise UsageError(f"output folder {path} is not empty (use --overwrite, or --resume to continue it)")
    return RunDir(path, lock)
