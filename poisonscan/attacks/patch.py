"""The HTBA patch attack (Saha et al.): paste a resized trigger patch at a random corner inside the margins,
optionally changed copy by copy (:class:`Transform`: scaled, turned, recoloured) as an attacker who wants no two
pasted copies alike would do."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from poisonscan.data.sources.base import DECODE_FORMATS, DEFAULT_MAX_PIXELS, MAX_MEMBER_BYTES
from poisonscan.errors import UsageError

ImageLike = Image.Image | np.ndarray


@dataclass(frozen=True)
class Transform:
    """How one pasted copy of the trigger differs from the file: its side scaled by ``scale`` (the box is drawn
    with the scaled side), turned ``angle`` degrees counter-clockwise inside its box (the corners the turned
    trigger leaves keep the image's pixels) and each RGB channel multiplied by ``gains``."""

    scale: float = 1.0
    angle: float = 0.0
    gains: tuple[float, float, float] = (1.0, 1.0, 1.0)


IDENTITY = Transform()


def draw_transform(rng: np.random.Generator, scale_jitter: float, rotation: float, colour_jitter: float) -> Transform:
    """A random :class:`Transform`: scale uniform in ``1 +- scale_jitter``, angle in ``+- rotation`` degrees, each
    channel's gain in ``1 +- colour_jitter``; :data:`IDENTITY` (no draw) when all three are 0."""
    if not (scale_jitter or rotation or colour_jitter):
        return IDENTITY
    scale = 1.0 + float(rng.uniform(-scale_jitter, scale_jitter))
    angle = float(rng.uniform(-rotation, rotation))
    g = rng.uniform(-colour_jitter, colour_jitter, 3)
    return Transform(scale, angle, (1.0 + float(g[0]), 1.0 + float(g[1]), 1.0 + float(g[2])))


def as_rgb_array(img: ImageLike) -> np.ndarray:
    """``img`` as an ``H x W x 3`` uint8 array (PIL images are converted to RGB)."""
    if isinstance(img, Image.Image):
        return np.asarray(img.convert("RGB"), dtype=np.uint8)
    arr = np.asarray(img)
    if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"expected an H x W x 3 uint8 image, got {arr.dtype} {arr.shape}")
    return arr


def load_trigger(path: Path | str) -> Image.Image:
    """Read a trigger image as RGB (alpha composited on black); a missing or unreadable file is a ``UsageError``.

    Bounded like a data set's images: at most ``MAX_MEMBER_BYTES`` and ``DEFAULT_MAX_PIXELS``, decoded only by the
    ``DECODE_FORMATS`` decoders (sniffed from the content: no plugin that runs an external program)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"trigger file {path} not found")
    try:
        if path.stat().st_size > MAX_MEMBER_BYTES:
            raise UsageError(f"trigger file {path} is over {MAX_MEMBER_BYTES >> 20} MiB: not a trigger")
        data = path.read_bytes()
        with Image.open(io.BytesIO(data), formats=DECODE_FORMATS) as im:
            if im.width * im.height > DEFAULT_MAX_PIXELS:
                raise UsageError(f"trigger file {path} is {im.width} x {im.height} px: too large for a trigger")
            im.load()
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
                return Image.alpha_composite(black, rgba).convert("RGB")
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UsageError(f"trigger file {path} is not a readable image ({exc.__class__.__name__})") from None


def resize_trigger(trigger: ImageLike, width: int, height: int | None = None) -> np.ndarray:
    """The trigger resized to ``width x height`` (bicubic, PIL's default as in the reference attack code)."""
    height = width if height is None else height
    if width < 1 or height < 1:
        raise ValueError(f"trigger size must be at least 1 px, got {width}x{height}")
    if isinstance(trigger, np.ndarray) and trigger.shape[:2] == (height, width):
        return as_rgb_array(trigger)
    pil = trigger if isinstance(trigger, Image.Image) else Image.fromarray(as_rgb_array(trigger), "RGB")
    pil = pil.convert("RGB")
    if pil.size != (width, height):
        pil = pil.resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(pil, dtype=np.uint8)


def trigger_side(trigger_size: float, width: int, height: int) -> int:
    """Trigger side in pixels: ``trigger_size < 1`` is a fraction of the short side, otherwise pixels."""
    if trigger_size <= 0:
        raise ValueError(f"trigger size must be positive, got {trigger_size}")
    if trigger_size < 1:
        return max(1, int(round(trigger_size * min(width, height))))
    return int(round(trigger_size))


def corner_range(extent: int, size: int, margin: float) -> tuple[int, int]:
    """Inclusive range of the top-left coordinate: ``[int(m * extent), int((1 - m) * extent) - size]``."""
    lo, hi = int(margin * extent), int((1.0 - margin) * extent) - size
    if size > extent:
        raise ValueError(f"trigger of {size} px is larger than the image side of {extent} px")
    if hi < lo:
        raise ValueError(f"trigger of {size} px does not fit between margins of {margin:g} on a {extent} px side")
    return lo, hi


def random_corner(rng: np.random.Generator, width: int, height: int, size: int, margin: float) -> tuple[int, int]:
    """Uniform top-left corner ``(x, y)`` with ``x`` in ``[m W, (1 - m) W - size]`` (likewise ``y``)."""
    x_lo, x_hi = corner_range(width, size, margin)
    y_lo, y_hi = corner_range(height, size, margin)
    x, y = rng.integers((x_lo, y_lo), (x_hi + 1, y_hi + 1))
    return int(x), int(y)


def transformed_patch(patch: np.ndarray, transform: Transform) -> tuple[np.ndarray, np.ndarray | None]:
    """``patch`` (``s x s x 3`` uint8, already at its pasted size) recoloured and turned by ``transform`` (bicubic),
    and which pixels the turned trigger covers (``s x s`` float32, 1 where a pixel's centre falls inside the turned
    square, else 0: a hard edge; ``None`` when not turned)."""
    out = patch
    if transform.gains != (1.0, 1.0, 1.0):
        gains = np.asarray(transform.gains, dtype=np.float32)
        out = np.clip(np.rint(out.astype(np.float32) * gains), 0, 255).astype(np.uint8)
    if transform.angle == 0.0:
        return out, None
    size = out.shape[0]
    turned = Image.fromarray(out, "RGB").rotate(transform.angle, resample=Image.Resampling.BICUBIC)
    cover = Image.new("L", (size, size), 255).rotate(transform.angle, resample=Image.Resampling.NEAREST)
    return np.asarray(turned, dtype=np.uint8), np.asarray(cover, dtype=np.float32) / 255.0


def paste_trigger(img: ImageLike, trigger: ImageLike, x: int, y: int, size: int, opacity: float = 1.0,
                  transform: Transform = IDENTITY) -> np.ndarray:
    """Return a copy of ``img`` with ``trigger`` resized to ``size x size`` pasted with its top-left at ``(x, y)``.

    ``opacity`` 1.0 replaces the pixels (the HTBA paste); below 1 the patch is alpha-blended:
    ``round((1 - a) * img + a * trigger)`` inside the box, pixels outside it are untouched. ``transform`` recolours
    and turns the resized trigger first (:func:`transformed_patch`; ``size`` is already the scaled side); the pixels
    of the box a turned trigger leaves keep the image's.
    """
    arr = as_rgb_array(img)
    h, w = arr.shape[:2]
    if not 0.0 < opacity <= 1.0:
        raise ValueError(f"opacity must be in (0, 1], got {opacity}")
    if x < 0 or y < 0 or x + size > w or y + size > h:
        raise ValueError(f"box ({x}, {y}, {size}, {size}) does not fit in a {w}x{h} image")
    patch, cover = transformed_patch(resize_trigger(trigger, size), transform)
    out = arr.copy()
    if opacity >= 1.0 and cover is None:
        out[y:y + size, x:x + size] = patch
    else:
        alpha = np.float32(opacity) * (cover[..., None] if cover is not None else np.float32(1.0))
        region = arr[y:y + size, x:x + size].astype(np.float32)
        mixed = (1.0 - alpha) * region + alpha * patch.astype(np.float32)
        out[y:y + size, x:x + size] = np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
    return out
