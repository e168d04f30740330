"""Rendering of stored frames to consumer images (PS3.18 8.3.5 / 9.3 / 10.4.1.1.3):
modality LUT (rescale slope/intercept or LUT), VOI (a requested window, the VOI LUT,
the stored window, else the frame's range), MONOCHROME1 inversion, colour photometric
interpretations, viewport scaling, then JPEG, PNG or GIF.

Pure functions over a file object; callers run them in the executor.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import BinaryIO, Iterable

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, pixel_array

# Pillow imports its encoders on the first save (``Image.preinit``): ~9 ms of a
# process's first rendered frame, a viewer's first thumbnail. Loaded with this module.
Image.preinit()

RENDERED_TYPES = ("image/jpeg", "image/png", "image/gif")
PIL_FORMAT = {"image/jpeg": "JPEG", "image/png": "PNG", "image/gif": "GIF"}
WINDOW_FUNCTIONS = ("linear", "linear-exact", "sigmoid")
THUMBNAIL_SIZE = 128
MAX_ANIMATED_FRAMES = 200
MAX_ANIMATED_PIXELS = 32_000_000  # all frames of an animated GIF together (bounds memory)
MAX_VIEWPORT = 8192
# What decoding or the LUTs raise on data they cannot handle (a missing attribute, a
# codec with no plugin, a malformed LUT): the image is not renderable, not a server fault.
DECODE_ERRORS = (NotImplementedError, RuntimeError, ValueError, AttributeError, KeyError, TypeError, IndexError)


class RenderError(ValueError):
    """The request asks for a rendering that cannot be made (the message says why)."""

    status = 400


class NoImage(RenderError):
    """The instance holds nothing that renders as an image (an SR, a bad codec)."""

    status = 406


class NoSuchFrame(RenderError):
    status = 404


@dataclass(frozen=True)
class Window:
    center: float
    width: float
    function: str = "linear"


@dataclass(frozen=True)
class RenderOptions:
    media_type: str = "image/jpeg"
    window: Window | None = None
    viewport: tuple[int, int] | None = None  # (width, height) to fit the image into
    quality: int = 90
    frame: int | None = None  # 0-based; None: the first (or every frame for an animated GIF)


# --------------------------------------------------------------------------- parameters


def parse_window(text: str) -> Window:
    parts = [p.strip() for p in text.split(",")]
    if len(parts) not in (2, 3):
        raise RenderError(f"window={text!r}: use window=center,width[,function] (function: {', '.join(WINDOW_FUNCTIONS)})")
    try:
        center, width = float(parts[0]), float(parts[1])
    except ValueError:
        raise RenderError(f"window={text!r}: center and width must be numbers") from None
    function = parts[2].lower().replace("_", "-") if len(parts) == 3 else "linear"
    if function not in WINDOW_FUNCTIONS:
        raise RenderError(f"window function {parts[2]!r} is not one of {', '.join(WINDOW_FUNCTIONS)}")
    if width <= 0 or (function == "linear" and width < 1):
        raise RenderError(f"window width must be positive (at least 1 for linear), got {parts[1]}")
    return Window(center, width, function)


def parse_viewport(text: str) -> tuple[int, int]:
    parts = [p.strip() for p in text.split(",")]
    try:
        width, height = int(parts[0]), int(parts[1])
    except (ValueError, IndexError):
        raise RenderError(f"viewport={text!r}: use viewport=width,height in pixels") from None
    if not (0 < width <= MAX_VIEWPORT and 0 < height <= MAX_VIEWPORT):
        raise RenderError(f"viewport={text!r}: width and height must be between 1 and {MAX_VIEWPORT}")
    return width, height


def parse_quality(text: str) -> int:
    try:
        quality = int(text)
    except ValueError:
        raise RenderError(f"quality={text!r}: use a whole number from 1 to 100") from None
    if not 1 <= quality <= 100:
        raise RenderError(f"quality={text!r}: use a whole number from 1 to 100")
    return quality


# --------------------------------------------------------------------------- rendering


def frame_count(ds: Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames") or 1))
    except (TypeError, ValueError):
        return 1


def render(fh: BinaryIO, options: RenderOptions) -> bytes:
    """Render one stored instance (a whole Part-10 file in ``fh``) to image bytes."""
    header = pydicom.dcmread(fh, stop_before_pixels=True)
    if "Rows" not in header or "Columns" not in header:
        raise NoImage("this instance has no image to render (no Rows/Columns); retrieve it as application/dicom")
    frames = frame_count(header)
    if options.frame is not None and not 0 <= options.frame < frames:
        raise NoSuchFrame(f"frame {options.frame + 1} does not exist; this instance has {frames} frame(s)")
    if options.frame is None and options.media_type == "image/gif" and frames > 1:
        pixels_per_frame = int(header.Rows) * int(header.Columns)
        indices = list(range(min(frames, MAX_ANIMATED_FRAMES, max(1, MAX_ANIMATED_PIXELS // pixels_per_frame))))
    else:
        indices = [options.frame or 0]
    first = _decode(fh, 0 if len(indices) > 1 else indices[0], header, options.viewport)
    window = options.window
    if window is None and _needs_common_window(header, first):
        window = _common_window(header, [first] if len(indices) == 1 else
                                (_decode(fh, i, header, options.viewport) for i in indices))
    images = []
    for index in indices:
        pixels = first if index == indices[0] else _decode(fh, index, header, options.viewport)
        try:
            images.append(_fit(to_image(header, pixels, window), options.viewport))
        except DECODE_ERRORS as exc:  # attributes the LUTs need are missing or malformed
            raise NoImage(f"this image cannot be rendered ({exc}); retrieve it as application/dicom") from exc
    return encode(images, options, header)


def _decode(fh: BinaryIO, index: int, header: Dataset, viewport: tuple[int, int] | None) -> np.ndarray:
    """One decoded frame; thinned out first when the viewport is at most half its size,
    so that a thumbnail of a large image stays cheap in memory."""
    fh.seek(0)
    try:
        pixels = pixel_array(fh, index=index)
    except DECODE_ERRORS as exc:
        raise NoImage(f"the pixel data cannot be decoded here ({exc}); retrieve it as application/dicom") from exc
    if viewport is not None:
        step = int(min(int(header.Columns) / viewport[0], int(header.Rows) / viewport[1]))
        if step >= 2:
            pixels = pixels[::step, ::step]
    return pixels


def to_image(ds: Dataset, pixels: np.ndarray, window: Window | None = None) -> Image.Image:
    """An 8-bit PIL image of one decoded frame."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if photometric == "PALETTE COLOR":
        descriptor = ds.get("RedPaletteColorLookupTableDescriptor") or [0, 0, 16]
        return Image.fromarray(_to_uint8(apply_color_lut(pixels, ds), int(descriptor[2])), "RGB")
    if pixels.ndim == 3 and pixels.shape[-1] in (3, 4):
        bits = int(ds.get("BitsStored", 8) or 8)
        return Image.fromarray(_to_uint8(pixels[..., :3], bits), "RGB")
    return Image.fromarray(grayscale(ds, pixels, window), "L")


def grayscale(ds: Dataset, pixels: np.ndarray, window: Window | None = None) -> np.ndarray:
    """Modality LUT, VOI and polarity of a grayscale frame, as uint8 display values."""
    values = apply_modality_lut(pixels, ds).astype(np.float32, copy=False)
    if window is not None:
        shown = apply_window(values, window)
    elif "VOILUTSequence" in ds:
        shown = _voi_lut(values, ds)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        shown = apply_window(values, _stored_window(ds))
    else:
        low, high = float(values.min()), float(values.max())
        shown = apply_window(values, Window((low + high + 1) / 2, max(high - low + 1, 1.0)))
    if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        shown = 255.0 - shown
    return np.clip(np.rint(shown), 0, 255).astype(np.uint8)


def apply_window(values: np.ndarray, window: Window) -> np.ndarray:
    """PS3.3 C.11.2.1.2 (linear, linear exact, sigmoid) onto 0..255."""
    c, w = window.center, window.width
    if window.function == "sigmoid":
        return 255.0 / (1.0 + np.exp(-4.0 * (values - c) / w))
    if window.function == "linear-exact":
        return np.clip((values - c) / w + 0.5, 0.0, 1.0) * 255.0
    c, w = c - 0.5, w - 1.0
    if w <= 0:
        return np.where(values > c, 255.0, 0.0)
    return np.clip((values - c) / w + 0.5, 0.0, 1.0) * 255.0


def _needs_common_window(ds: Dataset, pixels: np.ndarray) -> bool:
    """Grayscale with no stored VOI: the window comes from the values themselves."""
    if pixels.ndim == 3 or str(ds.get("PhotometricInterpretation", "")).strip() == "PALETTE COLOR":
        return False
    return not ("VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds))


def _common_window(ds: Dataset, frames: Iterable[np.ndarray]) -> Window:
    """One window spanning the modality values of every rendered frame (so that the
    frames of an animation compare); frames are looked at one at a time."""
    low, high = np.inf, -np.inf
    for pixels in frames:
        values = apply_modality_lut(pixels, ds)
        low, high = min(low, float(values.min())), max(high, float(values.max()))
    return Window((low + high + 1) / 2, max(high - low + 1, 1.0))


def _stored_window(ds: Dataset) -> Window:
    def first(value) -> float:
        return float(value[0] if isinstance(value, pydicom.multival.MultiValue) else value)

    function = str(ds.get("VOILUTFunction", "LINEAR")).strip().lower().replace("_", "-") or "linear"
    width = max(first(ds.WindowWidth), 1.0)
    return Window(first(ds.WindowCenter), width, function if function in WINDOW_FUNCTIONS else "linear")


def _voi_lut(values: np.ndarray, ds: Dataset) -> np.ndarray:
    item = ds.VOILUTSequence[0]
    bits = int(item.LUTDescriptor[2]) if "LUTDescriptor" in item else 16
    out = apply_voi_lut(values.astype(np.int64) if np.all(values == np.round(values)) else values, ds, prefer_lut=True)
    return out.astype(np.float64) * 255.0 / float((1 << bits) - 1)


def _to_uint8(pixels: np.ndarray, bits: int) -> np.ndarray:
    if pixels.dtype == np.uint8 and bits <= 8:
        return np.ascontiguousarray(pixels)
    top = float((1 << bits) - 1)
    return np.clip(np.rint(pixels.astype(np.float64) * 255.0 / top), 0, 255).astype(np.uint8)


def _fit(image: Image.Image, viewport: tuple[int, int] | None) -> Image.Image:
    """Scale to fit the viewport, keeping the aspect ratio (PS3.18 8.3.5.1.3)."""
    if viewport is None:
        return image
    scale = min(viewport[0] / image.width, viewport[1] / image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BILINEAR)


def encode(images: list[Image.Image], options: RenderOptions, ds: Dataset | None = None) -> bytes:
    buf = io.BytesIO()
    fmt = PIL_FORMAT[options.media_type]
    first = images[0]
    if fmt == "JPEG":
        first.save(buf, format="JPEG", quality=options.quality)
    elif fmt == "GIF" and len(images) > 1:
        duration = 100
        if ds is not None and ds.get("FrameTime"):
            duration = max(20, int(float(ds.FrameTime)))
        first.save(buf, format="GIF", save_all=True, append_images=images[1:], duration=duration, loop=0)
    else:
        first.save(buf, format=fmt)
    return buf.getvalue()
