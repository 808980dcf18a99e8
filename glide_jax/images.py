"""Images in and out of the models: PIL or uint8 arrays ↔ the [-1, 1] NHWC arrays they take.

Inpainting masks are 1 (white) where the image is kept and 0 (black) where it is generated.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


class ImageInputError(ValueError):
    """An input image or mask cannot be read or does not fit; the message names which one."""


def as_pil(value, what: str = "image") -> Image.Image:
    """A PIL image from a PIL image or an array: (H, W, 3) uint8 or float in [-1, 1], or for a
    mask (H, W) / (H, W, 1) of 0/1 or 0..255."""
    if isinstance(value, Image.Image):
        return value
    array = np.asarray(value)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] != 3) or 0 in array.shape:
        raise ImageInputError(f"{what} must be a PIL image or an (H, W, 3) or (H, W) array, got shape {array.shape}")
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ImageInputError(f"{what} holds NaN or infinite values")
        # Colour images in [-1, 1] as the models give them; masks as 0/1 values.
        array = (array + 1) * 127.5 if array.ndim == 3 else array * 255.0
        array = np.clip(np.round(array), 0, 255)
    elif array.dtype == bool:
        array = array * 255
    elif not np.issubdtype(array.dtype, np.integer) or array.min() < 0 or array.max() > 255:
        raise ImageInputError(f"{what}: integer values must lie in [0, 255], got dtype {array.dtype}")
    elif array.ndim == 2 and array.max() <= 1:
        array = array * 255   # a 0/1 integer mask
    return Image.fromarray(array.astype(np.uint8))


def image_to_array(image: Image.Image, size: int) -> np.ndarray:
    """RGB image resized (bicubic, as the reference's inpainting notebook) → (size, size, 3) in [-1, 1]."""
    resized = image.convert("RGB").resize((size, size), resample=Image.BICUBIC)
    return np.asarray(resized, np.float32) / 127.5 - 1


def mask_to_array(mask: Image.Image, size: int) -> np.ndarray:
    """Mask image → (size, size, 1) float32 of 0/1, 1 (white) where the image is kept.

    Area-averaged to `size` then thresholded at half, so a pixel is kept when most of what it
    covers is white; alpha is ignored (only luminance counts).
    """
    grey = mask.convert("L").resize((size, size), resample=Image.BOX)
    return (np.asarray(grey, np.float32) >= 127.5).astype(np.float32)[..., None]


def upsample_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """A (h, w, 1) 0/1 mask → (size, size, 1), nearest neighbour (the reference upsamples its 64px mask so)."""
    image = Image.fromarray((mask[..., 0] * 255).astype(np.uint8))
    return (np.asarray(image.resize((size, size), resample=Image.NEAREST)) >= 128).astype(np.float32)[..., None]
