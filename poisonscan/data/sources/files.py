"""Image folders and file lists: sources whose samples are individual image files.

- image folder (recursive): ids are paths relative to the root with ``/`` separators; the ImageFolder layout
  (no images directly in the root, images under ``root/<class>/...``) gives labels = index of ``<class>`` in the
  sorted class folder names (empty class folders included, so indices match a sorted listing); any other layout has
  no labels. Hidden files and folders (``.name``) are ignored.
- file list (``path [label]`` per line, SSL-Backdoor/PatchSearch format): relative paths are resolved against the
  list's folder, ``#`` comments and blank lines are skipped; the id is the path as written.

An image file must be a regular file of at most ``max_member_bytes`` (fifos and devices are refused without reading).
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from poisonscan.data.sources.base import (DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, MAX_MEMBER_BYTES, SampleError, Source,
                                          bad_name, read_text)
from poisonscan.errors import DataError

class FileSource(Source):
    """A source whose samples are individual image files."""

    def __init__(self, root: Path, ids: list[str], paths: list[str], labels: list[int | None],
                 class_names: list[str] | None, errors: list[SampleError], warnings_: list[str] | None,
                 max_pixels: int | None, max_member_bytes: int | None = MAX_MEMBER_BYTES) -> None:
        super().__init__(root, ids, labels, class_names, errors, warnings_, max_pixels, max_member_bytes)
        self.paths = paths  # absolute (not symlink-resolved) paths, one per sample

    def read_members(self, i: int) -> dict[str, bytes]:
        try:
            data = _read_file(self.paths[i], self.max_member_bytes)
        except FileNotFoundError:
            raise DataError(f"{self.ids[i]}: file not found ({self.paths[i]})") from None
        except OSError as exc:
            raise DataError(f"{self.ids[i]}: cannot read file ({exc.strerror or exc})") from None
        except DataError as exc:
            raise DataError(f"{self.ids[i]}: {exc}") from None
        return {self.image_ext(i): data}

    def image_ext(self, i: int) -> str:
        return os.path.splitext(self.paths[i])[1].lower().lstrip(".") or "img"

    def read_files(self) -> list[Path]:
        """The list file (if any) and every image file."""
        return [*super().read_files(), *(Path(p) for p in self.paths)]

    def locator(self, i: int) -> str:
        label = self.labels[i]
        return self.paths[i] if label is None else f"{self.paths[i]} {label}"


def _read_file(path: str, limit: int | None) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (fifos and devices are refused without a read)."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise DataError("not a regular file (fifo, device or socket); not read")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a fifo swapped in does not block the open
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DataError("not a regular file (fifo, device or socket); not read")
        if limit is not None and st.st_size > limit:
            raise DataError(f"file is {st.st_size} bytes, over the {limit}-byte limit (max_member_bytes); not read")
        data = fh.read(-1 if limit is None else limit + 1)
    if limit is not None and len(data) > limit:
        raise DataError(f"file is over the {limit}-byte limit (max_member_bytes); not read")
    return data


class FolderSource(FileSource):
    """All image files under a directory (recursive); ImageFolder layout gives labels."""

    kind = "folder"

    def __init__(self, root: Path | str, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 max_member_bytes: int | None = MAX_MEMBER_BYTES) -> None:
        root = Path(os.path.abspath(root))
        if not root.is_dir():
            raise DataError(f"image folder {root} does not exist or is not a folder")
        rel_paths, errors = _walk_images(root)
        top_images = [p for p in rel_paths if "/" not in p]
        try:
            subdirs = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        except OSError as exc:
            raise DataError(f"cannot list {root}: {exc.strerror or exc}") from None
        class_names: list[str] | None = None
        labels: list[int | None] = [None] * len(rel_paths)
        warns: list[str] = []
        if subdirs and not top_images:
            class_names = subdirs
            index = {name: k for k, name in enumerate(subdirs)}
            labels = [index[p.split("/", 1)[0]] for p in rel_paths]
            used = set(labels)
            warns += [f"class folder {name!r} has no images" for k, name in enumerate(subdirs) if k not in used]
        if not rel_paths:
            raise DataError(f"image folder {root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        paths = [os.path.join(str(root), *p.split("/")) for p in rel_paths]
        super().__init__(root, rel_paths, paths, labels, class_names, errors, warns, max_pixels, max_member_bytes)

    def spec(self) -> str:
        return str(self.root)


def _walk_images(root: Path) -> tuple[list[str], list[SampleError]]:
    """Sorted ``/``-separated relative paths of image files under ``root`` (symlink loops guarded)."""
    found: list[str] = []
    errors: list[SampleError] = []
    seen: set[str] = set()

    def onerror(exc: OSError) -> None:
        rel = os.path.relpath(exc.filename, root).replace(os.sep, "/") if exc.filename else str(root)
        errors.append(SampleError(rel, f"cannot list folder ({exc.strerror or exc})"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = os.path.relpath(dirpath, root)
        for fname in filenames:
            if fname.startswith(".") or not fname.lower().endswith(IMAGE_EXTENSIONS):
                continue
            rel = fname if rel_dir == "." else f"{rel_dir.replace(os.sep, '/')}/{fname}"
            if bad_name(rel):
                errors.append(SampleError(rel, "file name contains a tab or line break; skipped (cannot be "
                                               "written to a manifest)"))
                continue
            found.append(rel)
    found.sort()
    return found, errors


def parse_file_list(text: str) -> list[tuple[str, int | None]]:
    """``(path, label)`` per data line of an SSL-Backdoor file list (``path [label]``; ``#`` comments skipped).

    The label is the last whitespace-separated token when it is an integer, so paths may contain spaces.
    """
    entries: list[tuple[str, int | None]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(None, 1)
        if len(parts) == 2 and re.fullmatch(r"-?\d+", parts[1]):
            entries.append((parts[0].strip(), int(parts[1])))
        else:
            entries.append((line, None))
    return entries


class FileListSource(FileSource):
    """The images named in a ``path [label]`` file list; duplicate paths keep their first line only."""

    kind = "filelist"

    def __init__(self, list_path: Path | str, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 max_member_bytes: int | None = MAX_MEMBER_BYTES) -> None:
        list_path = Path(os.path.abspath(list_path))
        self.list_path = list_path
        text = read_text(list_path)
        root = list_path.parent
        ids: list[str] = []
        paths: list[str] = []
        labels: list[int | None] = []
        errors: list[SampleError] = []
        seen: set[str] = set()
        for path, label in parse_file_list(text):
            if path in seen:
                errors.append(SampleError(path, "listed more than once; later lines ignored"))
                continue
            seen.add(path)
            ids.append(path)
            paths.append(os.path.normpath(path if os.path.isabs(path) else os.path.join(str(root), path)))
            labels.append(label)
        if not ids:
            raise DataError(f"file list {list_path} lists no images")
        super().__init__(root, ids, paths, labels, None, errors, None, max_pixels, max_member_bytes)

    def spec(self) -> str:
        return str(self.list_path)
