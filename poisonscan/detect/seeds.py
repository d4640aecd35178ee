"""Seeds for the detect stages: every random draw comes from a generator seeded by ``(seed, purpose, round)``
before the work is split across ranks, so a result does not depend on the world size or the batch size."""

from __future__ import annotations

import hashlib
from typing import Any

import torch


def derive_seed(seed: int, *tags: Any) -> int:
    """A stable 63-bit seed for ``(seed, *tags)`` (the same in every process and Python run)."""
    text = ":".join(str(t) for t in (seed, *tags))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def torch_gen(seed: int, *tags: Any) -> torch.Generator:
    """A torch generator seeded by :func:`derive_seed`."""
    return torch.Generator().manual_seed(derive_seed(seed, *tags))
