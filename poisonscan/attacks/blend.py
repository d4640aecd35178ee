"""The blended attack (Chen et al., 2017): the trigger, resized to the whole image, alpha-blended over it."""

from __future__ import annotations

import numpy as np

from poisonscan.attacks.patch import ImageLike, as_rgb_array, resize_trigger


def blend_trigger(img: ImageLike, trigger: ImageLike, alpha: float) -> np.ndarray:
    """``round((1 - alpha) * img + alpha * trigger)`` with the trigger resized (bicubic) to the image's size."""
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"blend alpha must be in (0, 1], got {alpha}")
    arr = as_rgb_array(img)
    h, w = arr.shape[:2]
    pattern = resize_trigger(trigger, w, h).astype(np.float32)
    mixed = (1.0 - alpha) * arr.astype(np.float32) + alpha * pattern
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
