"""Image files -> the training data's form: 28x28 grey, light on dark (`prepare`).
From any PNG or JPG to the training data's 28x28 grey, light on dark:
  1. Read; apply the EXIF orientation; composite transparency onto white; colour -> luminance
     (ITU-R 601-2, Pillow's "L"); 16-bit and 32-bit grey scaled to [0, 255], not clipped.
     Images over MAX_PIXELS pixels are refused (a decompression bomb would exhaust memory), as
     are files of several frames (an animated GIF, PNG or WebP, a multi-page TIFF), which hold
     no one image to classify; a camera's multi-picture JPEG (MPO) is its first, the photo.
  2. Polarity: the median of the border pixels is the background. A light background (above
     mid-grey) means dark ink on light paper, and the image is inverted, since MNIST digits are
     light on dark. An image then already in MNIST's form (28x28 on a black border, full
     contrast, the ink in the 20x20 box, centred by mass) is taken as it is, so a dataset digit
     saved as a PNG comes back unchanged.
  3. Contrast: the background level is subtracted and the brightest pixel scaled to 255.
  4. Fit, as the dataset was made (`--fit auto` picks by the checkpoint's dataset):
     digit  (MNIST, KMNIST) the ink's bounding box (pixels above 10% of the peak) is scaled,
            keeping its aspect ratio, to fit a 20x20 box, and placed in the 28x28 frame with its
            centre of mass on pixel (14, 14), as LeCun et al. prepared MNIST;
     item   (Fashion-MNIST) the bounding box is scaled to fit the whole 28x28 frame, centred;
     none   the whole image is resized to 28x28.
  Downscaling is Pillow's antialiased bilinear filter.
Then the checkpoint's own normalisation applies (the training set's mean and std, or ImageNet's
for VGG16 and AlexNet), and the model runs in eval mode in the framework that wrote the
checkpoint (a converted checkpoint runs in the other one).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from jaxvision.core.errors import UserError

FITS = ("auto", "digit", "item", "none")
INK_FRACTION = 0.1  # of the peak: what counts as ink when finding the bounding box
MAX_PIXELS = 50_000_000  # larger images are refused, per file (a 7,000 x 7,000 scan fits)
BLANK_PEAK = 8.0  # of 255: an image whose ink peaks below this above its background is blank


def read_grey(path: str | Path) -> np.ndarray:
    """An image file -> (H, W) float32 luminance in [0, 255]. Raises UserError if unreadable."""
    is_name = isinstance(path, str | os.PathLike)
    if is_name and os.path.exists(path) and not os.path.isfile(path) and not os.path.isdir(path):
        raise UserError(f"{path}: not a regular file (a pipe or a device, which could wait "
                        "forever); give an image file")  # fmt: skip
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked below
            im_file = Image.open(path)
        with im_file as im:
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise UserError(f"{path}: {w:,}x{h:,} pixels is over the limit of {MAX_PIXELS:,} "
                                "(a decompression bomb guard); downscale it first")  # fmt: skip
            frames = getattr(im, "n_frames", 1)
            if frames > 1 and im.format != "MPO":  # MPO: a camera's JPEG, frame 0 the photo
                raise UserError(f"{path}: holds {frames} frames (an animation or pages); "
                                "save the one to classify as its own image")  # fmt: skip
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
                return _wide_grey(im)
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                im = Image.alpha_composite(white, rgba)
            return np.asarray(im.convert("L"), dtype=np.float32)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except Image.DecompressionBombError:
        raise UserError(f"{path}: over the limit of {MAX_PIXELS:,} pixels (a decompression "
                        "bomb guard); downscale it first") from None  # fmt: skip
    except UserError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise UserError(f"{path}: cannot read it as an image ({e})") from None
    except Exception as e:  # a damaged file can fail anywhere in a decoder (Pillow's TIFF tags)
        raise UserError(f"{path}: cannot read it as an image ({type(e).__name__}: {e})") from None


def _wide_grey(im: Image.Image) -> np.ndarray:
    """A 16-bit, 32-bit integer or float grey image -> [0, 255], scaled by its bit depth (Pillow's
    own conversion to "L" clips them to 0 and 255). Values past 16 bits have no conventional
    white, so such an image is scaled by its own peak: by 2**32 its ink would be a fraction of
    a grey level, too faint to tell from a blank page."""
    a = np.asarray(im, dtype=np.float64)
    if im.mode.startswith("I;16"):
        full = 65535.0
    elif im.mode == "F":
        # NaN pixels are 0 (below); all-NaN is a blank page, not numpy's "All-NaN slice"
        full = 1.0 if np.nan_to_num(a, nan=-np.inf).max(initial=-np.inf) <= 1.0 else 255.0
    else:  # "I": Pillow's 32-bit integer mode, which 16-bit PNGs also open as
        peak = float(a.max()) if a.size else 0.0
        full = 255.0 if peak <= 255 else 65535.0 if peak <= 65535 else peak
    return np.clip(np.nan_to_num(a) * (255.0 / full), 0.0, 255.0).astype(np.float32)


def is_blank(grey: np.ndarray) -> bool:
    """True when an image holds no ink: after its background is removed, nothing stands more
    than BLANK_PEAK grey levels above it (a uniform, 1x1 or fully transparent image)."""
    g = np.asarray(grey, np.float32)
    background = _background(g)
    ink = 255.0 - g if background > 127.5 else g
    return float(ink.max()) - min(background, 255.0 - background) < BLANK_PEAK


def _background(g: np.ndarray) -> float:
    """The median of the border pixels."""
    h, w = g.shape
    b = max(1, min(h, w) // 20)
    border = np.concatenate([g[:b].ravel(), g[-b:].ravel(), g[:, :b].ravel(), g[:, -b:].ravel()])
    return float(np.median(border))


def _resize(a: np.ndarray, height: int, width: int) -> np.ndarray:
    return np.asarray(Image.fromarray(a, mode="F").resize((width, height), Image.BILINEAR))


def _in_digit_form(g: np.ndarray, background: float, size: int) -> bool:
    """Already what `prepare` would make, up to resampling: size x size, light on a black border,
    full contrast, the ink inside the 20x20 box and its centre of mass within a pixel of the
    frame's centre (a dataset digit saved as a file)."""
    if g.shape != (size, size) or background != 0.0 or g.max() < 200.0:
        return False
    ys, xs = np.nonzero(g > INK_FRACTION * g.max())
    box = round(size * 20 / 28)
    if ys.max() - ys.min() + 1 > box or xs.max() - xs.min() + 1 > box:
        return False
    mass = g.sum()
    cy = (g.sum(1) * np.arange(size)).sum() / mass
    cx = (g.sum(0) * np.arange(size)).sum() / mass
    return abs(cy - size / 2) <= 1.5 and abs(cx - size / 2) <= 1.5


def prepare(grey: np.ndarray, size: int = 28, fit: str = "digit") -> np.ndarray:
    """(H, W) luminance in [0, 255] -> (size, size) uint8, light on dark (see the module doc)."""
    g = np.asarray(grey, np.float32)
    background = _background(g)
    if background > 127.5:  # dark ink on light paper
        g, background = 255.0 - g, 255.0 - background
    if fit == "digit" and _in_digit_form(g, background, size):
        return np.clip(g, 0.0, 255.0).round().astype(np.uint8)
    g = np.clip(g - background, 0.0, None)
    peak = float(g.max())
    if peak * float(np.finfo(np.float32).max) < 255.0:  # blank, or too faint for float32
        return np.zeros((size, size), np.uint8)  # nothing to centre
    g = g * (255.0 / peak)
    if fit == "none":
        return np.clip(_resize(g, size, size), 0, 255).round().astype(np.uint8)
    ys, xs = np.nonzero(g > INK_FRACTION * 255.0)
    crop = g[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    box = size if fit == "item" else round(size * 20 / 28)
    scale = box / max(crop.shape)
    nh, nw = (max(1, min(box, round(n * scale))) for n in crop.shape)
    small = np.clip(_resize(crop, nh, nw), 0.0, 255.0)
    if fit == "item":
        top, left = (size - nh) // 2, (size - nw) // 2
    else:  # centre of mass on pixel (14, 14), as in MNIST; the whole box inside the frame
        mass = small.sum()
        cy = (small.sum(1) * np.arange(nh)).sum() / mass  # in pixel indices
        cx = (small.sum(0) * np.arange(nw)).sum() / mass
        top = int(np.clip(round(size / 2 - cy), 0, size - nh))
        left = int(np.clip(round(size / 2 - cx), 0, size - nw))
    out = np.zeros((size, size), np.float32)
    out[top : top + nh, left : left + nw] = small
    return out.round().astype(np.uint8)
