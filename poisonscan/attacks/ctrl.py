"""The CTRL attack (Li et al., ICCV 2023): a fixed spectral trigger in the chroma channels.

RGB -> YUV (BT.601 full range, as JPEG's YCbCr), block DCT-II (orthonormal) of the U and V planes, a fixed magnitude
added at fixed high frequencies of every block, inverse DCT, back to RGB. The reference implementation uses blocks of
32 px, frequencies (15, 15) and (31, 31) and magnitude 50 on the training set (100 on the test set).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from PIL import Image

#: RGB -> YUV (rows Y, U = Cb, V = Cr), plus an offset of 128 on U and V
RGB_TO_YUV = np.array([[0.299, 0.587, 0.114],
                       [-0.168736, -0.331264, 0.5],
                       [0.5, -0.418688, -0.081312]], dtype=np.float64)
YUV_TO_RGB = np.linalg.inv(RGB_TO_YUV)
YUV_OFFSET = np.array([0.0, 128.0, 128.0])
REFERENCE_BLOCK = 32
REFERENCE_SIZE = 224


@lru_cache(maxsize=16)
def dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix ``D`` (``n x n``): ``D @ x`` transforms, ``D.T @ X`` inverts."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    d = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    d[0] /= np.sqrt(2.0)
    d.setflags(write=False)
    return d


def block_dct2(x: np.ndarray, block: int) -> np.ndarray:
    """2-D DCT of every ``block x block`` tile of ``x`` (``... x H x W``, both multiples of ``block``).

    Returns ``... x H/b x b x W/b x b``: tile row, vertical frequency, tile column, horizontal frequency.
    """
    *lead, h, w = x.shape
    tiles = x.reshape(*lead, h // block, block, w // block, block)
    d = dct_matrix(block)
    return np.einsum("ui,...aibj,vj->...aubv", d, tiles, d, optimize=True)


def block_idct2(coef: np.ndarray) -> np.ndarray:
    """Inverse of :func:`block_dct2`: tiles back to a ``... x H x W`` plane."""
    *lead, nh, block, nw, _ = coef.shape
    d = dct_matrix(block)
    tiles = np.einsum("ui,...aubv,vj->...aibj", d, coef, d, optimize=True)
    return tiles.reshape(*lead, nh * block, nw * block)


def scaled_block(height: int, width: int) -> int:
    """The reference block (32 px on 224 px images) scaled to this image's short side, even, at least 4."""
    side = min(height, width) * REFERENCE_BLOCK / REFERENCE_SIZE
    return max(4, 2 * int(round(side / 2)))


def default_freqs(block: int) -> tuple[tuple[int, int], ...]:
    """The reference frequencies for ``block``: ``(b/2 - 1, b/2 - 1)`` and ``(b - 1, b - 1)``."""
    mid = block // 2 - 1
    return ((mid, mid), (block - 1, block - 1))


def ctrl_trigger(img: Image.Image | np.ndarray, magnitude: float = 50.0,
                 freqs: Sequence[tuple[int, int]] | None = None, block: int | None = REFERENCE_BLOCK,
                 channels: Sequence[int] = (1, 2)) -> np.ndarray:
    """Add the CTRL spectral trigger to one image (``H x W x 3``) or a batch (``N x H x W x 3``) of uint8 RGB.

    ``block`` None scales the block with the image (:func:`scaled_block`); a block larger than the short side is
    cut to it. Sides that are not a multiple of the block are edge-padded for the transform and cropped back.
    ``freqs`` default to :func:`default_freqs` of the block; ``channels`` index Y, U, V (default U and V).
    """
    arr = np.asarray(img.convert("RGB") if isinstance(img, Image.Image) else img)
    if arr.dtype != np.uint8 or arr.ndim not in (3, 4) or arr.shape[-1] != 3:
        raise ValueError(f"expected uint8 RGB images (H x W x 3 or N x H x W x 3), got {arr.dtype} {arr.shape}")
    h, w = arr.shape[-3:-1]
    b = min(block if block else scaled_block(h, w), h, w)
    freqs = tuple(freqs) if freqs is not None else default_freqs(b)
    for u, v in freqs:
        if not (0 <= u < b and 0 <= v < b):
            raise ValueError(f"frequency ({u}, {v}) outside a {b} px block")
    chans = list(channels)
    yuv = arr.astype(np.float64) @ RGB_TO_YUV.T + YUV_OFFSET
    planes = np.moveaxis(yuv[..., chans], -1, -3)                  # ... x C x H x W
    pad_h, pad_w = (-h) % b, (-w) % b
    if pad_h or pad_w:
        width = [(0, 0)] * (planes.ndim - 2) + [(0, pad_h), (0, pad_w)]
        planes = np.pad(planes, width, mode="edge")
    coef = block_dct2(planes, b)
    for u, v in freqs:
        coef[..., :, u, :, v] += magnitude
    planes = block_idct2(coef)[..., :h, :w]
    yuv[..., chans] = np.moveaxis(planes, -3, -1)
    rgb = (yuv - YUV_OFFSET) @ YUV_TO_RGB.T
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
