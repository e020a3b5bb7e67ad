"""Decoding one file into an 8-bit ``"RGB"`` or ``"L"`` image, or an :class:`ImageError` saying why not.

:func:`open_image` is built so that a run over a folder of real-world files never dies on one bad
file and never reads wrong pixels silently: truncated, oversized, mislabelled or exotic files are
refused with a reason.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import stat
import threading
import warnings
from pathlib import Path
from typing import (
    BinaryIO,
    Iterator,
    Optional,
)

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vitscope.data.records import ImageError, PathLike, VitscopeDataWarning

# --------------------------------------------------------------------------------------------------
# Decoding


def open_image(path: PathLike, max_pixels: Optional[float] = None) -> Image.Image:
    """Fully decode one image file into an 8-bit ``"RGB"`` or ``"L"`` PIL image.

    - EXIF orientation is applied, so photos come out the way viewers show them.
    - Colour, CMYK, YCbCr and palette images become ``"RGB"``; transparent images (RGBA, LA, palette
      with transparency) are composited on white first, because models were trained on opaque images.
    - Greyscale stays ``"L"``. 16-bit and 32-bit integer or float greyscale (``I;16``, ``I``, ``F``)
      is scaled linearly from the image's own value range (min..max) to 0..255, since their nominal
      range rarely matches the data (e.g. 12-bit sensors stored as 16 bit); a constant image becomes 0.
    - Multi-frame files (GIF, TIFF) give their first frame.

    ``max_pixels`` bounds width x height so a hostile or broken file cannot exhaust memory; ``None``
    uses ``PIL.Image.MAX_IMAGE_PIXELS``. Any image above the limit is refused from its header, before
    its pixels are allocated (Pillow itself only warns below twice the limit).

    Raises :class:`ImageError` (with ``.path`` and ``.reason``) for missing, unreadable, empty,
    non-image, corrupt, truncated (unless ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` was set) and
    over-limit files, and for broken or looping symbolic links; whatever exception Pillow's reader for
    the format raises becomes an ``ImageError``. EPS files are never opened, since decoding them runs
    Ghostscript on the file.
    """
    p = Path(path)
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        st = p.stat()
    except OSError as e:
        raise ImageError(p, _unreadable_reason(p, e)) from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(p, "is a folder, not an image file")
    if not stat.S_ISREG(st.st_mode):
        # Opening a named pipe would wait for a writer forever, and a device never ends.
        raise ImageError(p, "not a regular file (a named pipe, socket or device), so not an image file")
    if st.st_size == 0:
        raise ImageError(p, "empty file (0 bytes)")
    try:
        fh = open(p, "rb")
    except OSError as e:
        raise ImageError(p, _unreadable_reason(p, e)) from None

    # The file is opened here, not by Pillow, so that an OSError from Pillow is always about the
    # data (e.g. a seek before the start of a short file), never mistaken for a permission problem.
    with fh:
        return _decode_stream(p, fh, limit)


def open_image_bytes(data: bytes, name: str, max_pixels: Optional[float] = None) -> Image.Image:
    """Decode one encoded image held in memory (a WebDataset member, a dataset row) like :func:`open_image`.

    ``name`` says where the bytes came from (``"shard-0003.tar::n01440764_10026.jpg"``); every
    :class:`ImageError` names it. The same conversions, limits and refusals apply as for a file.
    """
    if not data:
        raise ImageError(name, "empty image (0 bytes)")
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    return _decode_stream(Path(name), io.BytesIO(data), limit)


def _decode_stream(p: Path, fh: BinaryIO, limit: Optional[float]) -> Image.Image:
    """Decode the open image ``fh`` (named ``p``) into a standard-mode PIL image detached from ``fh``."""
    with warnings.catch_warnings():
        # Pillow's own bomb check warns between 1x and 2x its limit; make every over-limit image an error.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with _pillow_pixel_limit(limit):
            im = _decode(p, fh, limit)
    with im:
        try:
            img = _to_standard_mode(p, _apply_exif_orientation(p, im))
        except ImageError:
            raise
        except (OSError, ValueError) as e:
            raise ImageError(p, f"corrupt image data ({e or type(e).__name__})") from None
        if img is im:
            img = im.copy()  # detach from the file closed on exit
    return img


def _decode(path: Path, fh: BinaryIO, limit: Optional[float]) -> Image.Image:
    """Read ``path`` (open as ``fh``) with Pillow and load its (first) frame; every failure becomes an :class:`ImageError`.

    Pillow's format readers report a damaged file with many exception types besides ``OSError``,
    ``SyntaxError``, ``ValueError`` and ``EOFError``: ``IndexError``, ``TypeError`` or
    ``ZeroDivisionError`` from impossible header values and, found by fuzzing, ``NotImplementedError``
    for an unknown DDS pixel format or BLP compression, ``RuntimeError`` from libavif, even
    ``AttributeError`` from the SPIDER reader. Whatever a reader raises while reading one file means
    that file cannot be decoded, so every ``Exception`` is caught here; the conversion of the decoded
    pixels is outside, so a bug there still surfaces instead of being reported as a bad file.
    """
    im: Optional[Image.Image] = None
    try:
        im = Image.open(fh, formats=_safe_formats())
        _check_pixels(path, im.size, limit)
        im.load()
        _check_complete(path, fh, im)
        return im
    except Exception as e:  # noqa: BLE001 - see the docstring
        fmt = im.format if im is not None else None
        if im is not None:
            im.close()
        if isinstance(e, ImageError):
            raise
        raise _decode_error(path, e, fmt, limit) from None


def _decode_error(path: Path, e: Exception, fmt: Optional[str], limit: Optional[float]) -> ImageError:
    """The :class:`ImageError` for exception ``e`` raised by Pillow while reading ``path`` (a ``fmt`` file, if known)."""
    if isinstance(e, UnidentifiedImageError):
        claimed = _claimed_format(path)
        if claimed == "EPS":
            return ImageError(
                path,
                "EPS/PostScript file, which vitscope does not open (decoding it runs Ghostscript on the "
                "program it contains); convert it to PNG first if you trust it",
            )
        if claimed:
            return ImageError(path, f"corrupt image data (starts like a {claimed} file but its header cannot be read)")
        named = Image.registered_extensions().get(path.suffix.lower())
        if named and named not in Image.OPEN and named != "MPO":  # the JPEG reader opens MPO files
            return ImageError(path, f"not an image file that can be read (Pillow writes {named} files but cannot read them)")
        if named:
            # Some formats (TGA, IM, SPIDER) have no signature, so damage and "not an image" look alike.
            return ImageError(
                path,
                f"not an image file (no supported image format recognised, although the {path.suffix} name "
                f"suggests {named}: it is another kind of file, or damaged {named} data)",
            )
        return ImageError(path, "not an image file (no supported image format recognised)")
    if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        # Raised from the header, before any pixel is allocated; say it with our limit (above twice
        # its limit Pillow's message quotes that doubled threshold, not the limit in force).
        m = re.search(r"\((\d+) pixels\)", str(e))
        n = f"{int(m.group(1)):,} pixels" if m else "more pixels than allowed"
        shown = f"the limit of {int(limit):,} pixels" if limit is not None else "Pillow's pixel limit"
        return ImageError(
            path,
            f"image has {n}, over {shown} (a possible decompression bomb); pass a larger max_pixels if you trust this file",
        )
    if isinstance(e, MemoryError):
        return ImageError(path, "not enough memory to decode this image")
    msg = str(e) or type(e).__name__
    what = f"{fmt} image data" if fmt else "image data"
    if "truncated" in msg:
        return ImageError(path, f"truncated {what} ({msg})")
    if isinstance(e, NotImplementedError):
        return ImageError(path, f"corrupt or unsupported {what} ({msg})")
    return ImageError(path, f"corrupt {what} ({msg})")


def _unreadable_reason(path: Path, e: OSError) -> str:
    """Why the operating system would not let us read ``path``, in words for the user."""
    if e.errno == errno.ENOENT:
        if os.path.islink(path):
            return f"broken symbolic link (its target {os.path.realpath(path)} does not exist)"
        return "file not found"
    if e.errno == errno.ELOOP:
        return "symbolic link loop (following the link leads back to itself)"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied (this user may not read the file)"
    return f"cannot read file ({e.strerror or e})"


def _check_complete(path: Path, fh: BinaryIO, im: Image.Image) -> None:
    """Refuse a file that Pillow decodes without complaint although its end is missing.

    An 8-bit PCX image keeps its 256-colour palette in its last 769 bytes (a 12 byte, then 256 RGB
    triples). When that is cut off, Pillow silently reads the colour indices as grey levels, which
    would analyse wrong pixels. (Every other format Pillow writes raises on truncated pixel data.)
    """
    if im.format != "PCX":
        return
    fh.seek(0)
    header = fh.read(128)
    if len(header) < 66 or (header[1], header[3], header[65]) != (5, 8, 1):
        return  # not a 256-colour image: no palette at the end
    size = fh.seek(0, os.SEEK_END)
    marker = b""
    if size >= 128 + 769:
        fh.seek(-769, os.SEEK_END)
        marker = fh.read(1)
    if marker != b"\x0c":
        raise ImageError(path, "truncated PCX image data (the 256-colour palette that ends the file is missing)")


_SAFE_FORMATS: Optional[list[str]] = None


def _safe_formats() -> list[str]:
    """Every format Pillow can read except EPS, whose decoder runs Ghostscript on the file's code."""
    global _SAFE_FORMATS
    if _SAFE_FORMATS is None:
        Image.init()
        _SAFE_FORMATS = [f for f in Image.OPEN if f not in ("EPS",)]
    return _SAFE_FORMATS


def _claimed_format(path: Path) -> Optional[str]:
    """The format whose signature the file starts with, if any (to tell corrupt images and EPS from non-images)."""
    try:
        with open(path, "rb") as fh:
            prefix = fh.read(16)
    except OSError:
        return None
    for fmt in [*_safe_formats(), "EPS"]:
        if fmt not in Image.OPEN:
            continue
        accept = Image.OPEN[fmt][1]
        try:
            if accept is not None and accept(prefix) is True:
                return fmt
        except Exception:  # noqa: BLE001 - a plugin's signature check failing just means "not this format"
            continue
    return None


def _check_pixels(path: Path, size: tuple[int, int], limit: Optional[float]) -> None:
    w, h = size
    if limit is not None and w * h > limit:
        raise ImageError(
            path,
            f"image is {w} x {h} = {w * h:,} pixels, over the limit of {int(limit):,} pixels "
            "(a possible decompression bomb); pass a larger max_pixels if you trust this file",
        )
    if w <= 0 or h <= 0:
        raise ImageError(path, f"image has no pixels ({w} x {h})")


_PIXEL_LIMIT_LOCK = threading.Lock()


@contextlib.contextmanager
def _pillow_pixel_limit(limit: Optional[float]) -> Iterator[None]:
    """Lift Pillow's global bomb limit while opening when the caller allows more pixels than it.

    Pillow only has a process-wide limit; a higher per-call ``max_pixels`` must be able to open such
    files, and our own check (:func:`_check_pixels`) then enforces the caller's limit instead.
    """
    current = Image.MAX_IMAGE_PIXELS
    if current is None or (limit is not None and limit <= current):
        yield
        return
    with _PIXEL_LIMIT_LOCK:
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = current


def _apply_exif_orientation(path: Path, im: Image.Image) -> Image.Image:
    try:
        out = ImageOps.exif_transpose(im)
    except Exception as e:  # noqa: BLE001 - a broken EXIF block should not cost the whole image
        warnings.warn(
            f"{path}: could not read its EXIF orientation ({e}); using the pixels as stored",
            VitscopeDataWarning,
            stacklevel=4,
        )
        return im
    return im if out is None else out


def _to_standard_mode(path: Path, im: Image.Image) -> Image.Image:
    """Convert any decoded mode to 8-bit ``"RGB"`` or ``"L"``."""
    mode = im.mode
    if mode in ("RGB", "L"):
        return im
    if mode == "1":
        return im.convert("L")
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _scale_to_l(im)
    if mode in ("LA", "La"):
        return _on_white(im.convert("LA").convert("RGBA")).convert("L")
    if mode in ("RGBA", "RGBa", "PA") or (mode == "P" and "transparency" in im.info):
        return _on_white(im.convert("RGBA"))
    try:
        return im.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageError(path, f"unsupported colour mode {mode} ({e})") from None


def _on_white(rgba: Image.Image) -> Image.Image:
    """Composite an RGBA image on an opaque white background and drop alpha."""
    bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(bg, rgba).convert("RGB")


def _scale_to_l(im: Image.Image) -> Image.Image:
    """Map a high-bit-depth greyscale image linearly from its finite min..max to 0..255."""
    a = np.asarray(im).astype(np.float64)
    finite = np.isfinite(a)
    out = np.zeros(a.shape, dtype=np.uint8)
    if finite.any():
        lo, hi = float(a[finite].min()), float(a[finite].max())
        if hi > lo:
            scaled = np.rint((a - lo) * (255.0 / (hi - lo)))
            out = np.where(finite, np.clip(scaled, 0, 255), 0).astype(np.uint8)
    return Image.fromarray(out, mode="L")
