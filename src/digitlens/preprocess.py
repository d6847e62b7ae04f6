"""MNIST's own preprocessing for any digit image (a photo, a scan, a drawing).

LeCun et al. (1998) made MNIST by fitting each digit's bounding box into 20x20 pixels keeping its
aspect ratio (anti-aliased, hence the grey levels) and centring it in a 28x28 field by its centre
of mass. A model trained on MNIST expects exactly that; a raw photo resized to 28x28 is not it
(wrong polarity, the digit small and off-centre, paper texture everywhere).
:func:`to_mnist` applies the recipe:

1. greyscale (Pillow's ITU-R 601 luma; transparent pixels over white paper), values in [0, 1];
2. polarity: MNIST is light ink on a dark background. The median of the border pixels is the
   background; a background lighter than 0.5 means dark ink on light paper, and the image is
   inverted;
3. ink: the background level is subtracted and the ink scaled so its strong pixels reach 1; a
   pixel counts as ink above a threshold set from both the ink's contrast and the border's noise
   (its median absolute deviation), after a small Gaussian blur so lone noisy pixels do not;
   specks much smaller than the largest ink blob are dropped;
4. crop to the ink's bounding box;
5. fit into 20x20 keeping the aspect ratio (Pillow's anti-aliased Lanczos resize);
6. place it in 28x28 so that its centre of mass (``scipy.ndimage.center_of_mass``) falls on
   pixel (14, 14), where it falls in MNIST (mean over the test images: 13.99, 14.00).

An image that already is in MNIST form (28x28, one grey channel, light ink on a dark border) is
passed through unchanged, so a folder of MNIST digits saved as PNG gives exactly the IDX pixels
(``passthrough=False`` applies the recipe anyway).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from digitlens.errors import DigitlensError

#: Side of the box the digit is fitted into, and of the whole image (MNIST's 20 and 28).
BOX = 20
SIZE = 28
#: Where MNIST's centre of mass lies (row, column).
CENTRE = (14.0, 14.0)
#: Image file suffixes read by Pillow in image folders and ``predict``.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")

#: Ink threshold, as a share of the ink's contrast (background to strong ink).
INK_SHARE = 0.25
#: ... and at least this many noise standard deviations above the background.
NOISE_SIGMAS = 4.0
#: Blobs with fewer pixels than this share of the largest blob are dropped as specks.
SPECK_SHARE = 0.05


@dataclass
class Steps:
    """The stages of :func:`to_mnist` for one image: ``stages`` is a list of ``(title, array)``
    with 2-D float arrays in [0, 1] (the first: greyscale, 1 = white; the others: ink, 1 = ink),
    ``inverted`` whether the polarity was flipped, ``bbox`` the ink's (top, bottom, left, right)
    in the greyscale image (bottom and right exclusive), ``passthrough`` whether the image was
    already in MNIST form."""

    stages: list[tuple[str, np.ndarray]] = field(default_factory=list)
    inverted: bool = False
    bbox: tuple[int, int, int, int] | None = None
    passthrough: bool = False


def open_image(path: str | os.PathLike):
    """A Pillow image of ``path``, fully loaded; a one-line DigitlensError naming the file when
    it is missing or not an image Pillow can read."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise DigitlensError(f"{path}: file not found")
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy() if img.mode != "P" else img.convert("RGBA")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DigitlensError(f"{path}: not a readable image ({reason})") from None


def greyscale(image) -> np.ndarray:
    """``image`` (a Pillow image, a path, or an array (H, W), (H, W, 3) or (H, W, 4); integers
    0-255 or floats in [0, 1]) as a float32 array (H, W) in [0, 1], 1 = white. Transparent pixels
    are laid over white paper."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        image = open_image(image)
    if isinstance(image, np.ndarray):
        arr = image
        if arr.dtype.kind == "f":
            if arr.size and (np.nanmin(arr) < 0 or np.nanmax(arr) > 1):
                raise DigitlensError("image: float pixels must lie in [0, 1]")
            arr = np.round(arr * 255)
        arr = np.clip(arr, 0, 255).astype(np.uint8)
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
            raise DigitlensError(f"image: expected shape (H, W), (H, W, 3) or (H, W, 4), got {image.shape}")
        image = Image.fromarray(arr)
    if not isinstance(image, Image.Image):
        raise DigitlensError(f"image: expected a file path, a Pillow image or an array, got {type(image).__name__}")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if arr.max() > 255 else 255.0
        return (arr / peak).astype(np.float32)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(paper, rgba)
    if image.mode == "F":
        arr = np.asarray(image, dtype=np.float32)
        return np.clip(arr / 255.0 if arr.max() > 1 else arr, 0, 1)
    return np.asarray(image.convert("L"), dtype=np.float32) / 255.0


def border_pixels(arr: np.ndarray) -> np.ndarray:
    """The pixels of the outermost ring of ``arr`` (H, W), as a 1-D array."""
    if arr.shape[0] < 3 or arr.shape[1] < 3:
        return arr.ravel()
    return np.concatenate([arr[0], arr[-1], arr[1:-1, 0], arr[1:-1, -1]])


def is_mnist_form(grey: np.ndarray) -> bool:
    """True for a 28x28 greyscale array whose border is dark (light ink on a dark background)."""
    return grey.shape == (SIZE, SIZE) and float(np.median(border_pixels(grey))) < 0.5


def ink_mask(ink: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Which pixels of ``ink`` (H, W; background near 0 after the polarity step) are ink.

    Returns ``(mask (H, W) bool, background, peak)``: the background is the median of the border,
    the peak the 99th percentile of the blurred ink, so one hot pixel does not set it. Pixels of
    the blurred image above background + max(INK_SHARE x contrast, NOISE_SIGMAS x noise) are
    ink; blobs smaller than SPECK_SHARE of the largest are dropped (scipy.ndimage.label).
    """
    border = border_pixels(ink)
    background = float(np.median(border))
    noise = 1.4826 * float(np.median(np.abs(border - background)))  # MAD -> standard deviation
    blurred = ndimage.gaussian_filter(ink.astype(np.float64), sigma=max(0.6, min(ink.shape) / 200.0))
    peak = float(blurred.max())
    contrast = peak - background
    if contrast <= max(3 * noise, 1e-3):
        return np.zeros(ink.shape, bool), background, peak
    mask = blurred > background + max(INK_SHARE * contrast, NOISE_SIGMAS * noise)
    labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
    if n > 1:
        sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
        keep = np.flatnonzero(sizes >= SPECK_SHARE * sizes.max()) + 1
        mask = np.isin(labels, keep)
    return mask, background, peak


def bounding_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the True pixels of ``mask``, bottom and right exclusive."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def fit_into_box(crop: np.ndarray, box: int = BOX) -> np.ndarray:
    """``crop`` (h, w) resized so its longer side is ``box`` pixels, keeping the aspect ratio
    (Pillow's Lanczos filter, anti-aliased), clipped to [0, 1]: float32 array (h', w')."""
    from PIL import Image

    h, w = crop.shape
    scale = box / max(h, w)
    size = (max(1, int(round(w * scale))), max(1, int(round(h * scale))))  # Pillow: (width, height)
    resized = Image.fromarray(crop.astype(np.float32)).resize(size, Image.Resampling.LANCZOS)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def centre_by_mass(digit: np.ndarray, size: int = SIZE, centre: tuple[float, float] = CENTRE) -> np.ndarray:
    """``digit`` (h, w), at most ``size`` on each side, placed on a black ``size`` x ``size``
    canvas so that its centre of mass falls on ``centre`` (rounded to whole pixels, as MNIST's
    centres are; a shift that would push ink off the canvas stops at the edge): float32 (size, size)."""
    h, w = digit.shape
    com = ndimage.center_of_mass(digit) if digit.sum() > 0 else ((h - 1) / 2, (w - 1) / 2)
    top = int(np.clip(round(centre[0] - com[0]), 0, size - h))
    left = int(np.clip(round(centre[1] - com[1]), 0, size - w))
    canvas = np.zeros((size, size), np.float32)
    canvas[top:top + h, left:left + w] = digit
    return canvas


def to_mnist(image, *, passthrough: bool = True, return_steps: bool = False):
    """One digit image in MNIST form: a float32 tensor of shape (1, 28, 28) in [0, 1] (light ink
    on black), following the recipe in this module's docstring.

    ``image``: a file path, a Pillow image or an array (see :func:`greyscale`). With
    ``passthrough`` (the default) an image already in MNIST form (:func:`is_mnist_form`) is
    returned unchanged. With ``return_steps`` returns ``(tensor, Steps)``. An image without ink
    (blank, or noise only) raises a one-line DigitlensError.
    """
    name = str(image) if isinstance(image, (str, os.PathLike)) else "image"
    grey = greyscale(image)
    steps = Steps(stages=[(f"input, greyscale ({grey.shape[1]}x{grey.shape[0]})", grey)])
    if passthrough and is_mnist_form(grey):
        steps.passthrough = True
        steps.stages.append(("already MNIST form: unchanged", grey))
        out = torch.from_numpy(grey.copy()).unsqueeze(0)
        return (out, steps) if return_steps else out
    inverted = float(np.median(border_pixels(grey))) >= 0.5
    ink = 1.0 - grey if inverted else grey
    steps.inverted = inverted
    steps.stages.append(("inverted (dark ink on light)" if inverted else "polarity kept (light ink on dark)", ink))
    mask, background, peak = ink_mask(ink)
    if not mask.any():
        raise DigitlensError(f"{name}: no ink found (the image is blank or only noise)")
    # Strong ink -> 1, background -> 0: MNIST's strokes are saturated on an exactly black field.
    strong = float(np.percentile(ink[mask], 90))
    low = background + 0.5 * INK_SHARE * (max(strong, peak) - background)
    levelled = np.clip((ink - low) / max(strong - low, 1e-6), 0.0, 1.0).astype(np.float32)
    top, bottom, left, right = bounding_box(mask)
    steps.bbox = (top, bottom, left, right)
    crop = levelled[top:bottom, left:right] * ndimage.binary_dilation(mask, iterations=2)[top:bottom, left:right]
    steps.stages.append((f"ink cropped to its box ({right - left}x{bottom - top})", crop))
    fitted = fit_into_box(crop)
    steps.stages.append((f"fitted into {BOX}x{BOX} ({fitted.shape[1]}x{fitted.shape[0]})", fitted))
    centred = centre_by_mass(fitted)
    steps.stages.append((f"centred by mass in {SIZE}x{SIZE}", centred))
    out = torch.from_numpy(centred).unsqueeze(0)
    return (out, steps) if return_steps else out


def naive_resize(image) -> torch.Tensor:
    """What the recipe replaces: greyscale and a plain anti-aliased resize to 28x28, no polarity,
    crop or centring. A float32 tensor (1, 28, 28) in [0, 1]; for comparisons (benchmarks)."""
    from PIL import Image

    grey = greyscale(image)
    small = Image.fromarray(grey.astype(np.float32)).resize((SIZE, SIZE), Image.Resampling.LANCZOS)
    return torch.from_numpy(np.clip(np.asarray(small, dtype=np.float32), 0, 1)).unsqueeze(0)
