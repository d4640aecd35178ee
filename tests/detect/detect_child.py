"""Run ``poisonscan detect`` in a child process with the toy encoder registered (for kill and full-disk tests).

Usage: ``python detect_child.py [--stall-in-masking-round N READY_FILE] [--fsize-limit BYTES] -- <detect args>``

``--stall-in-masking-round``: in the N-th call of the masking step (search round N), mask the first half of the
round's images, touch ``READY_FILE`` and sleep, so the parent can SIGKILL the process in the middle of masking.
``--fsize-limit``: RLIMIT_FSIZE for this process (SIGXFSZ ignored), so writes beyond it fail like a full disk.
"""

from __future__ import annotations

import resource
import signal
import sys
import time
from pathlib import Path

import tests.detect.detect_toys  # noqa: F401  (registers the toy encoder)

import torch

from poisonscan.detect import search


def _stall_in_round(n: int, ready: Path) -> None:
    original = search.cluster_activation_masking
    calls = {"n": 0}

    def masking(encoder, clustering, imgs, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            original(encoder, clustering, imgs[: max(1, len(imgs) // 2)], *args, **kwargs)
            ready.write_text("masking\n")
            time.sleep(600)
        return original(encoder, clustering, imgs, *args, **kwargs)

    search.cluster_activation_masking = masking


def main(argv: list[str]) -> None:
    sep = argv.index("--")
    opts, args = argv[:sep], argv[sep + 1:]
    if "--stall-in-masking-round" in opts:
        k = opts.index("--stall-in-masking-round")
        _stall_in_round(int(opts[k + 1]), Path(opts[k + 2]))
    if "--fsize-limit" in opts:
        limit = int(opts[opts.index("--fsize-limit") + 1])
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    torch.set_num_threads(1)
    from poisonscan.cli import app

    app(["detect", *args], prog_name="poisonscan")


if __name__ == "__main__":
    main(sys.argv[1:])
