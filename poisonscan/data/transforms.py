"""Model inputs from uint8 image tensors, and batched self-supervised augmentation.

Images live in an :class:`~poisonscan.data.store.ImageStore` as uint8 ``N x 3 x S x S``. ``to_input`` turns a batch
into the encoder's normalised float input; ``SSLAugment`` draws two augmented views of a whole batch at once on the
batch's device, which is much faster on CPU than per-image PIL transforms in data-loader workers. Random resized
crop, flip and gaussian blur are all separable linear maps, so each view's geometry is two batched matrix products
``My @ x @ Mx^T`` with per-sample matrices (antialiased bilinear resampling); colour jitter (brightness, contrast,
saturation, hue as a YIQ chroma rotation), grayscale and solarize follow on the whole batch. Blur is applied with the
geometry, i.e. before colour jitter rather than after it, and jitter runs in a fixed order (brightness and contrast
as one affine map, then saturation, hue and grayscale as one 3x3 matrix) instead of torchvision's random order; these
shortcuts differ from the per-image recipe only where values clip.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# ITU-R 601 luma weights (what torchvision's rgb_to_grayscale uses)
_LUMA = (0.299, 0.587, 0.114)
# RGB <-> YIQ: hue rotation and saturation become a per-sample 3x3 matrix on the chroma plane (I, Q)
_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ2RGB = torch.linalg.inv(_RGB2YIQ)


def _stats(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.float32, device=like.device).view(1, -1, 1, 1)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float],
              channels_last: bool = True) -> torch.Tensor:
    """Normalise a float batch in ``[0, 1]`` with per-channel ``mean``/``std`` (one fused pass)."""
    scale = 1.0 / _stats(std, x)
    shift = -_stats(mean, x) * scale
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device).contiguous(memory_format=fmt)
    return torch.addcmul(shift, x, scale, out=out)


def to_input(u8: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
             channels_last: bool = True) -> torch.Tensor:
    """uint8 ``N x 3 x S x S`` -> float32 ``(x / 255 - mean) / std`` (channels_last by default)."""
    if u8.dtype != torch.uint8:
        raise TypeError(f"to_input expects a uint8 tensor, got {u8.dtype}")
    return normalize(u8.float().div_(255.0), mean, std, channels_last)


@dataclass(frozen=True)
class ViewSpec:
    """Probabilities that differ between the two views (BYOL's asymmetric recipe)."""

    blur_p: float
    solarize_p: float


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, generator=gen) * (hi - lo) + lo


def _bernoulli(n: int, p: float, gen: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, generator=gen) < p


class SSLAugment:
    """Batched MoCo v3 / BYOL augmentation of uint8 image batches, scaled to the output ``size``.

    Random parameters are drawn per sample on the CPU from ``generator`` (so the result is reproducible and the
    same on every device), the pixels are processed on the batch's device in float32.

    Args:
        size: output side in pixels.
        scale, ratio: random resized crop area fraction and aspect-ratio range.
        flip_p: horizontal flip probability.
        jitter: colour jitter strengths (brightness, contrast, saturation, hue), applied with ``jitter_p``.
        gray_p: grayscale probability.
        blur_p, solarize_p: per-view probabilities (BYOL: blur 1.0 / 0.1, solarize 0.0 / 0.2).
        blur_sigma: gaussian sigma range at 224 px, scaled by ``size / 224``; the kernel is ~10% of ``size``.
        mean, std: the encoder's normalisation.
    """

    def __init__(self, size: int, scale: tuple[float, float] = (0.2, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), flip_p: float = 0.5,
                 jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1), jitter_p: float = 0.8,
                 gray_p: float = 0.2, blur_p: Sequence[float] = (1.0, 0.1), solarize_p: Sequence[float] = (0.0, 0.2),
                 blur_sigma: tuple[float, float] = (0.1, 2.0), mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, channels_last: bool = True) -> None:
        if len(blur_p) != len(solarize_p):
            raise ValueError("blur_p and solarize_p need one entry per view")
        self.size = int(size)
        self.scale, self.ratio = scale, ratio
        self.flip_p, self.jitter, self.jitter_p, self.gray_p = flip_p, jitter, jitter_p, gray_p
        self.views = [ViewSpec(float(b), float(s)) for b, s in zip(blur_p, solarize_p)]
        k = max(3, int(round(0.1 * self.size)))
        self.blur_kernel = k + 1 if k % 2 == 0 else k
        self.blur_sigma = (blur_sigma[0] * self.size / 224, blur_sigma[1] * self.size / 224)
        self.mean, self.std = tuple(mean), tuple(std)
        self.channels_last = channels_last

    def __repr__(self) -> str:
        return (f"SSLAugment(size={self.size}, scale={self.scale}, jitter={self.jitter}@{self.jitter_p}, "
                f"gray={self.gray_p}, views={self.views}, blur_kernel={self.blur_kernel})")

    def __call__(self, u8: torch.Tensor, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """One normalised float view per view spec (two by default) of the uint8 batch ``u8`` (N x 3 x H x W)."""
        if u8.dtype != torch.uint8 or u8.ndim != 4 or u8.shape[1] != 3:
            raise TypeError(f"SSLAugment expects uint8 N x 3 x H x W, got {u8.dtype} {tuple(u8.shape)}")
        x = u8.float()  # 0..255: the 1/255 is folded into the geometry matrices
        return [self.view(x, spec, generator) for spec in self.views]

    # -- one view -------------------------------------------------------------------------------------------
    def view(self, x: torch.Tensor, spec: ViewSpec, gen: torch.Generator | None) -> torch.Tensor:
        """Augment a float batch in [0, 255] (N x 3 x H x W) into one normalised view (N x 3 x size x size)."""
        n, _, h, w = x.shape
        s = self.size
        my, mx = self.geometry(n, h, w, spec, gen)
        dev = x.device
        # crop + resize + flip + blur are separable linear maps: out = My @ x @ Mx^T (two batched matmuls);
        # their rows are convex combinations, so the result stays in [0, 1] without clamping
        cols = torch.bmm(x.reshape(n, 3 * h, w), mx.to(dev).mul_(1 / 255).transpose(1, 2))
        out = torch.matmul(my.to(dev).unsqueeze(1), cols.view(n, 3, h, s))
        out = self._color(out, gen)
        sol = torch.nonzero(_bernoulli(n, spec.solarize_p, gen)).flatten().to(dev)
        if sol.numel():
            sub = out[sol]
            out[sol] = torch.where(sub >= 127.5 / 255, 1.0 - sub, sub)  # uint8 threshold 128
        return normalize(out, self.mean, self.std, self.channels_last)

    def geometry(self, n: int, h: int, w: int, spec: ViewSpec,
                 gen: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample row and column matrices (N x size x H, N x size x W) of crop, resize, flip and blur."""
        area = _uniform(n, *self.scale, gen) * (h * w)
        r = torch.exp(_uniform(n, math.log(self.ratio[0]), math.log(self.ratio[1]), gen))
        cw = torch.sqrt(area * r).clamp(1.0, float(w))
        ch = torch.sqrt(area / r).clamp(1.0, float(h))
        x0 = torch.rand(n, generator=gen) * (w - cw)
        y0 = torch.rand(n, generator=gen) * (h - ch)
        flip = _bernoulli(n, self.flip_p, gen)
        blur = torch.nonzero(_bernoulli(n, spec.blur_p, gen)).flatten()
        sigma = _uniform(n, *self.blur_sigma, gen)
        rx = resample_matrix(x0, cw, self.size, w)
        rx = torch.where(flip.view(-1, 1, 1), rx.flip(1), rx)
        ry = resample_matrix(y0, ch, self.size, h)
        if blur.numel():
            g = blur_matrix(sigma[blur], self.size, self.blur_kernel)
            rx[blur], ry[blur] = g @ rx[blur], g @ ry[blur]
        return ry, rx

    def _color(self, x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        n, dev = x.shape[0], x.device
        b, c, s, hue = self.jitter
        apply = _bernoulli(n, self.jitter_p, gen)
        one = torch.ones(n)
        bf = torch.where(apply, _uniform(n, max(0.0, 1 - b), 1 + b, gen), one)
        cf = torch.where(apply, _uniform(n, max(0.0, 1 - c), 1 + c, gen), one)
        sf = torch.where(apply, _uniform(n, max(0.0, 1 - s), 1 + s, gen), one)
        hf = torch.where(apply, _uniform(n, -hue, hue, gen), torch.zeros(n))
        gray = _bernoulli(n, self.gray_p, gen)
        # brightness then contrast around the mean luma (torchvision's definitions), fused into one affine map
        luma = torch.as_tensor(_LUMA, device=dev).view(1, 1, 3)
        mean = torch.matmul(luma, x.view(n, 3, -1)).mean(2).view(-1)
        bfd, cfd = bf.to(dev), cf.to(dev)
        shift = ((1 - cfd) * bfd * mean).view(-1, 1, 1, 1)
        x = torch.addcmul(shift, x, (bfd * cfd).view(-1, 1, 1, 1)).clamp_(0.0, 1.0)
        # saturation and hue (rotation of the YIQ chroma plane), then grayscale: one 3x3 matrix per sample
        theta = hf * 2 * math.pi
        cos, sin = torch.cos(theta) * sf, torch.sin(theta) * sf
        chroma = torch.zeros(n, 3, 3)
        chroma[:, 0, 0] = 1.0
        chroma[:, 1, 1], chroma[:, 1, 2], chroma[:, 2, 1], chroma[:, 2, 2] = cos, -sin, sin, cos
        m = _YIQ2RGB @ chroma @ _RGB2YIQ
        gray_m = torch.tensor(_LUMA).expand(3, 3)
        m = torch.where(gray.view(-1, 1, 1), gray_m @ m, m)
        h, w = x.shape[2:]
        x = torch.bmm(m.to(dev), x.reshape(n, 3, h * w)).view(n, 3, h, w)
        return x.clamp_(0.0, 1.0)


def resample_matrix(start: torch.Tensor, length: torch.Tensor, out: int, size: int) -> torch.Tensor:
    """N x out x size matrices resampling the window ``[start, start + length)`` of a ``size`` axis to ``out`` pixels.

    Bilinear (triangle filter) sampling at pixel centres, widened by the zoom factor when shrinking (antialiasing,
    as PIL does); taps beyond the border reuse the edge pixel; each row sums to 1.
    """
    scale = (length / out).view(-1, 1, 1)
    support = scale.clamp(min=1.0)
    centres = start.view(-1, 1, 1) + (torch.arange(out, dtype=torch.float32).view(1, -1, 1) + 0.5) * scale - 0.5
    taps = int(math.ceil(2 * float(support.max()))) + 1
    idx = torch.floor(centres - support) + 1 + torch.arange(taps, dtype=torch.float32).view(1, 1, -1)
    wgt = (1.0 - (idx - centres).abs() / support).clamp_(min=0.0)
    wgt = wgt / wgt.sum(2, keepdim=True)
    mat = torch.zeros(start.shape[0], out, size)
    return mat.scatter_add_(2, idx.long().clamp_(0, size - 1), wgt)


def blur_matrix(sigma: torch.Tensor, size: int, kernel: int) -> torch.Tensor:
    """N x size x size gaussian blur matrices (reflect padding, ``kernel`` taps); sigma 0 gives the identity."""
    n, r = sigma.shape[0], kernel // 2
    taps = torch.arange(-r, r + 1, dtype=torch.float32)
    wgt = torch.exp(-(taps.view(1, -1) ** 2) / (2 * sigma.clamp(min=1e-3).view(-1, 1) ** 2))
    wgt = wgt / wgt.sum(1, keepdim=True)                                      # N x K
    src = torch.arange(size).view(-1, 1) + torch.arange(-r, r + 1).view(1, -1)  # size x K
    src = src.abs()
    src = torch.where(src > size - 1, 2 * (size - 1) - src, src).clamp(0, size - 1)
    mat = torch.zeros(n, size, size)
    return mat.scatter_add_(2, src.expand(n, size, kernel), wgt.view(n, 1, kernel).expand(n, size, kernel))
