"""Finding, labelling, decoding and batching images.

Everything here is built so that a run over a folder of real-world files is reproducible and never
dies on one bad file:

- :func:`load_images` lists images in a fixed (sorted) order and attaches labels from class
  sub-folders, a CSV file or a list, giving each image a stable ``image_id``.
- :func:`open_image` fully decodes one file into an 8-bit ``"RGB"`` or ``"L"`` image, or raises
  :class:`ImageError` saying why it could not.
- :func:`iter_batches` decodes and preprocesses, skips files that fail (with a warning that names the
  file), and yields :class:`Batch` objects, optionally decoding in worker processes.
"""

from __future__ import annotations

import atexit
import contextlib
import csv
import errno
import os
import re
import stat
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union, overload

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
"""File name endings listed from folders (compared case-insensitively)."""

PathLike = Union[str, "os.PathLike[str]"]
LabelsArg = Union[PathLike, Sequence[Union[int, str, None]], Mapping[Any, Union[int, str, None]], None]

# Column names accepted in label CSV files (compared case-insensitively).
_LABEL_COLUMNS = ("label", "class_index")
_NAME_COLUMNS = ("label_name", "description", "class_name")


class VitscopeDataWarning(UserWarning):
    """An image was skipped or read imperfectly; the message names the file and the reason."""


class DataError(ValueError):
    """The images or labels given cannot be used as they are (the message names the item and the fix)."""


class ImageError(ValueError):
    """One file could not be decoded into an image.

    ``path`` is the file and ``reason`` a short human-readable cause such as ``"empty file"``.
    """

    def __init__(self, path: PathLike, reason: str) -> None:
        super().__init__(str(path), reason)
        self.path = str(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass(frozen=True)
class ImageRecord:
    """One image of a set: ``image_id`` is its position in the set, ``label`` its class index or ``None``."""

    image_id: int
    path: Path
    label: Optional[int] = None


@dataclass
class ImageSet:
    """An ordered list of images with optional labels.

    ``class_names[i]`` names class index ``i`` when known (given by the caller, taken from class
    folders or from a names column of the labels file). ``root`` is the folder the images were found
    in (``None`` for a list of files). ``failures`` collects ``(path, reason)`` for every image that
    :func:`iter_batches` had to skip.
    """

    records: list[ImageRecord]
    class_names: Optional[list[str]] = None
    root: Optional[Path] = None
    failures: list[tuple[str, str]] = field(default_factory=list)
    # Names for class indices read from a labels file whose names do not cover 0..K-1 without gaps;
    # only used to fill ``label_name`` in :meth:`to_frame` when ``class_names`` is unknown.
    label_names: dict[int, str] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[ImageRecord]:
        return iter(self.records)

    @overload
    def __getitem__(self, index: int) -> ImageRecord: ...

    @overload
    def __getitem__(self, index: slice) -> "ImageSet": ...

    def __getitem__(self, index: Union[int, slice]) -> Union[ImageRecord, "ImageSet"]:
        """One record, or for a slice a new set sharing class names (records keep their ``image_id``)."""
        if isinstance(index, slice):
            return ImageSet(self.records[index], self.class_names, self.root, [], dict(self.label_names))
        return self.records[index]

    @property
    def labels(self) -> list[Optional[int]]:
        return [r.label for r in self.records]

    @property
    def paths(self) -> list[Path]:
        return [r.path for r in self.records]

    def label_name(self, label: Optional[int]) -> Optional[str]:
        """The name of class index ``label``, or ``None`` when it has no known name."""
        if label is None:
            return None
        if self.class_names is not None and 0 <= label < len(self.class_names):
            return self.class_names[label]
        return self.label_names.get(label)

    def to_frame(self) -> Any:
        """A pandas DataFrame with columns ``image_id, path, label, label_name`` (missing labels are ``<NA>``)."""
        import pandas as pd

        return pd.DataFrame(
            {
                "image_id": pd.Series([r.image_id for r in self.records], dtype="int64"),
                "path": pd.Series([str(r.path) for r in self.records], dtype="object"),
                "label": pd.Series([r.label for r in self.records], dtype="Int64"),
                "label_name": pd.Series([self.label_name(r.label) for r in self.records], dtype="object"),
            }
        )


@dataclass
class Batch:
    """Preprocessed images ``x`` of shape ``(B, C, H, W)`` with their ids, labels (``-1`` = unknown) and records."""

    image_ids: list[int]
    x: torch.Tensor
    labels: torch.Tensor
    records: list[ImageRecord]

    def __len__(self) -> int:
        return len(self.image_ids)


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


# --------------------------------------------------------------------------------------------------
# Finding and labelling images


def load_images(
    source: Union[PathLike, Sequence[PathLike], None] = None,
    labels: LabelsArg = None,
    limit: Optional[int] = None,
    class_names: Optional[Sequence[str]] = None,
    recursive: bool = True,
) -> ImageSet:
    """List images and their labels in a reproducible order.

    ``source`` may be:

    - a folder: image files (``IMAGE_EXTENSIONS``, any case; hidden files and folders skipped) are
      listed in sorted order of their path relative to the folder, through sub-folders when
      ``recursive``. When every image sits in a sub-folder, the first sub-folder level names its class
      (``root/cat/x.jpg`` has class ``cat``), as in torchvision's ``ImageFolder``; folders named
      ``0``, ``1``, ... are class indices. A ``labels.csv``
      directly inside the folder is used as ``labels`` when none is given.
    - a single image file, or a list of files (kept in the given order).
    - ``None`` or the string ``"sample"``: the embedded sample (:func:`embedded_sample`), or when
      ``labels`` is a CSV file, the images that file lists (in its row order).

    ``labels`` may be a CSV file with a ``path`` column and a ``label`` or ``class_index`` column
    (ImageNet style ``path,wnid,class_index,description`` works as is); paths are absolute or relative
    to the CSV's folder or to ``source``. A label is a class index or a class name; an empty cell
    means unknown. An optional ``label_name``/``description``/``class_name`` column names the indices.
    ``labels`` may also be a list aligned with the files, or a mapping from path to label.

    ``class_names`` (e.g. ``model.class_names``) fixes which index each class name gets; names are
    matched exactly, then ignoring case, then by any comma-separated synonym ("tench" matches
    ImageNet's "tench, Tinca tinca"). Without it, class names get indices in sorted order.

    ``limit`` keeps the first N images of that order. Each image's ``image_id`` is its position.
    Missing paths raise ``FileNotFoundError``; unusable labels raise :class:`DataError`.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DataError(f"limit must be a positive whole number of images, got {limit!r}")
    names = list(class_names) if class_names is not None else None

    if source is None and labels is not None:
        if not _is_pathlike(labels):
            raise DataError("without a source, labels must be a CSV file listing the images; pass the images as source")
        return _set_from_csv(_existing_file(labels, "labels file"), None, names, limit)
    if source is None or (isinstance(source, str) and source == "sample"):
        if labels is not None:
            raise DataError("the embedded sample has its own labels; leave labels out, or pass your images as source")
        return _finish(_sample_set(names), limit)

    if _is_pathlike(source):
        src = Path(source)  # type: ignore[arg-type]
        if not src.exists():
            raise FileNotFoundError(f"image source {src} does not exist; pass an image folder, an image file or a list of files")
        if src.is_dir():
            return _set_from_folder(src, labels, limit, names, recursive)
        files, root = [src.absolute()], src.absolute().parent
    elif isinstance(source, Iterable):
        files = []
        for item in source:
            if not _is_pathlike(item):
                raise DataError(f"image list items must be file paths, got {type(item).__name__}: {item!r}")
            f = Path(item)
            if not f.exists():
                raise FileNotFoundError(f"image file {f} does not exist (item {len(files)} of the image list)")
            if f.is_dir():
                raise DataError(f"{f} is a folder; pass a folder as the whole source, or list its image files")
            files.append(f.absolute())
        if not files:
            raise DataError("the image list is empty; pass at least one image file")
        root = None
    else:
        raise DataError(f"cannot load images from a {type(source).__name__}; pass a folder, a file, a list of files or None")

    if labels is None:
        return _finish(ImageSet([ImageRecord(i, f, None) for i, f in enumerate(files)], names, root), limit)
    return _attach_labels(files, labels, names, root, root, limit)


def _is_pathlike(x: Any) -> bool:
    return isinstance(x, (str, os.PathLike))


def _existing_file(p: Any, what: str) -> Path:
    path = Path(p)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist or is not a file")
    return path


def _list_images(root: Path, recursive: bool) -> list[Path]:
    """Image files under ``root`` sorted by relative path; hidden files and folders are skipped."""
    found: list[tuple[str, Path]] = []
    if recursive:
        # Symlinked folders are followed (datasets are often assembled from links); a folder reached
        # twice through links is listed once, which also stops link cycles.
        visited: set[str] = set()
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=_warn_unlistable):
            real = os.path.realpath(dirpath)
            if real in visited:
                dirnames[:] = []
                continue
            visited.add(real)
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                    full = Path(dirpath) / name
                    found.append((full.relative_to(root).as_posix(), full))
    else:
        for entry in os.scandir(root):
            # Like os.walk: everything that is not a folder is a file, so a broken or looping symlink
            # is listed (and later skipped with its reason) instead of vanishing or raising here.
            if not entry.name.startswith(".") and entry.name.lower().endswith(IMAGE_EXTENSIONS) and not _is_dir(entry):
                found.append((entry.name, Path(entry.path)))
    found.sort(key=lambda t: t[0])
    return [p for _, p in found]


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # e.g. a symlink loop
        return False


def _warn_unlistable(e: OSError) -> None:
    """os.walk error handler: a sub-folder that cannot be read is reported, not silently left out."""
    warnings.warn(
        f"could not list folder {e.filename} ({e.strerror or e}); the images in it are not included",
        VitscopeDataWarning,
        stacklevel=2,
    )


def _set_from_folder(src: Path, labels: LabelsArg, limit: Optional[int], names: Optional[list[str]], recursive: bool) -> ImageSet:
    root = src.absolute()
    files = _list_images(root, recursive)
    if not files:
        raise DataError(
            f"no images found in {src} (looked for {', '.join(IMAGE_EXTENSIONS)}"
            f"{' in it and its sub-folders' if recursive else ''}; hidden files are skipped)"
        )
    if labels is None and (root / "labels.csv").is_file():
        labels = root / "labels.csv"
    if labels is not None:
        return _attach_labels(files, labels, names, root, root, limit)

    rel = [f.relative_to(root).parts for f in files]
    if not recursive or any(len(parts) == 1 for parts in rel):
        return _finish(ImageSet([ImageRecord(i, f, None) for i, f in enumerate(files)], names, root), limit)

    # Class-folder layout: every image sits in a sub-folder named for its class.
    folders = sorted({parts[0] for parts in rel})
    if all(name.isdigit() for name in folders):
        # Folders named 0, 1, 2, ... are class indices, not names to renumber.
        index = {name: int(name) for name in folders}
        if names is not None and max(index.values()) >= len(names):
            raise DataError(f"class folder {root / max(folders, key=int)} is out of range for {len(names)} class names")
        set_names: Optional[list[str]] = names
    elif names is None:
        index = {name: i for i, name in enumerate(folders)}
        set_names = folders
    else:
        matcher = _ClassMatcher(names)
        index = {}
        for name in folders:
            idx, problem = matcher.lookup(name)
            if problem:
                raise DataError(
                    f"class folder {root / name}: {problem}. Rename the folder to a class name, "
                    "give labels=CSV with class indices, or leave class_names out to number the folders in sorted order"
                )
            index[name] = idx  # type: ignore[assignment]
        set_names = names
    records = [ImageRecord(i, f, index[parts[0]]) for i, (f, parts) in enumerate(zip(files, rel))]
    return _finish(ImageSet(records, set_names, root), limit)


def _finish(images: ImageSet, limit: Optional[int]) -> ImageSet:
    if limit is not None and limit < len(images.records):
        images.records = images.records[:limit]
    return images


def _attach_labels(
    files: list[Path],
    labels: LabelsArg,
    names: Optional[list[str]],
    root: Optional[Path],
    base: Optional[Path],
    limit: Optional[int],
) -> ImageSet:
    """Give ``files`` (already in final order) labels from a CSV, a list or a mapping."""
    if _is_pathlike(labels):
        table = _read_label_csv(_existing_file(labels, "labels file"), base)
        # Resolve every row, not just the listed files, so that name -> index numbering depends
        # only on the CSV and not on which of its files happen to be present.
        raw = [(r.label, r.where) for r in table.rows]
        resolved, set_names, extra = _resolve_labels(raw, names, table.index_names, str(table.csv_path))
        by_file = {_key(r.path): lab for r, lab in zip(table.rows, resolved)}  # duplicates rejected while reading
        keys = [_key(f) for f in files]
        if not any(k in by_file for k in keys):
            raise DataError(
                f"none of the {len(files)} images appear in {table.csv_path}; its paths must be absolute or "
                f"relative to {table.csv_path.parent}" + (f" or {base}" if base else "")
            )
        records = [ImageRecord(i, f, by_file.get(k)) for i, (f, k) in enumerate(zip(files, keys))]
        return _finish(ImageSet(records, set_names, root, label_names=extra), limit)

    if isinstance(labels, Mapping):
        # Relative keys are taken relative to the source folder (or the working directory for lists).
        lookup = {_key(base / k if base is not None else Path(k)): v for k, v in labels.items()}
        raw = [(lookup.get(_key(f)), f"labels entry for {f}") for f in files]
    elif isinstance(labels, Sequence) and not isinstance(labels, (str, bytes)):
        if len(labels) != len(files):
            raise DataError(f"labels has {len(labels)} entries but there are {len(files)} images; give one label per image (None for unknown)")
        raw = [(v, f"labels[{i}] ({files[i].name})") for i, v in enumerate(labels)]
    else:
        raise DataError(f"labels must be a CSV file, a list or a mapping, not {type(labels).__name__}")
    label_of, set_names, extra = _resolve_labels(raw, names, {}, "labels")
    records = [ImageRecord(i, f, label_of[i]) for i, f in enumerate(files)]
    return _finish(ImageSet(records, set_names, root, label_names=extra), limit)


def _key(p: Path) -> str:
    """A comparison key for a file path that ignores how the path was spelled (relative, symlinked)."""
    return os.path.normcase(os.path.realpath(p))


@dataclass
class _Row:
    path: Path
    label: Union[int, str, None]
    where: str  # "FILE line N" for messages


@dataclass
class _LabelTable:
    csv_path: Path
    rows: list[_Row]
    index_names: dict[int, str]


def _read_label_csv(csv_path: Path, base: Optional[Path]) -> _LabelTable:
    """Read ``path`` + ``label``/``class_index`` (+ names) rows; every path must exist."""
    with open(csv_path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = {(h or "").strip().lower(): h for h in (reader.fieldnames or [])}
        label_col = next((header[c] for c in _LABEL_COLUMNS if c in header), None)
        if "path" not in header or label_col is None:
            raise DataError(
                f"labels CSV {csv_path} needs a 'path' column and a 'label' or 'class_index' column "
                f"(found columns: {', '.join(reader.fieldnames or []) or 'none'})"
            )
        path_col = header["path"]
        name_col = next((header[c] for c in _NAME_COLUMNS if c in header), None)
        rows: list[_Row] = []
        index_names: dict[int, str] = {}
        seen: dict[str, _Row] = {}
        for rec in reader:
            where = f"{csv_path} line {reader.line_num}"
            rel = (rec.get(path_col) or "").strip()
            if not rel:
                raise DataError(f"{where}: the path is empty; every row needs an image path")
            path = _resolve_row_path(rel, csv_path.parent, base, where)
            value = _parse_label((rec.get(label_col) or "").strip())
            if name_col is not None and isinstance(value, int):
                name = (rec.get(name_col) or "").strip()
                if name:
                    if index_names.get(value, name) != name:
                        raise DataError(f"{where}: class index {value} is named {name!r} here but {index_names[value]!r} on an earlier row")
                    index_names[value] = name
            row = _Row(path, value, where)
            k = _key(path)
            if k in seen:
                if seen[k].label != value:
                    raise DataError(f"{where}: {rel} already has label {seen[k].label!r} at {seen[k].where}; keep one row per image")
                continue
            seen[k] = row
            rows.append(row)
    if not rows:
        raise DataError(f"labels CSV {csv_path} has no rows; add one 'path,label' row per image")
    return _LabelTable(csv_path, rows, index_names)


def _resolve_row_path(rel: str, csv_dir: Path, base: Optional[Path], where: str) -> Path:
    p = Path(rel)
    if p.is_absolute():
        if p.is_file():
            return p
        raise FileNotFoundError(f"{where}: image {p} does not exist")
    tried = [csv_dir / p] + ([base / p] if base is not None and base.absolute() != csv_dir.absolute() else [])
    for cand in tried:
        if cand.is_file():
            return cand.absolute()
    raise FileNotFoundError(f"{where}: image {rel} not found (looked in {' and '.join(str(t.parent) for t in tried)})")


def _parse_label(text: str) -> Union[int, str, None]:
    if text == "":
        return None
    try:
        return int(text)
    except ValueError:
        return text


def _resolve_labels(
    raw: list[tuple[Any, str]],
    names: Optional[list[str]],
    index_names: dict[int, str],
    source: str,
) -> tuple[list[Optional[int]], Optional[list[str]], dict[int, str]]:
    """Turn raw labels (indices, names or None) into class indices.

    Returns the indices, the set's class names and any partial index -> name table.
    """
    values: list[tuple[Union[int, str, None], str]] = []
    for v, where in raw:
        if isinstance(v, str):
            v = _parse_label(v.strip())
        elif isinstance(v, (bool, np.bool_)) or not (v is None or isinstance(v, (int, np.integer))):
            raise DataError(f"{where}: label {v!r} is neither a class index nor a class name")
        values.append((int(v) if isinstance(v, (int, np.integer)) else v, where))

    has_names = any(isinstance(v, str) for v, _ in values)
    has_ints = any(isinstance(v, int) for v, _ in values)
    if names is None and has_names and has_ints:
        first = next(w for v, w in values if isinstance(v, str))
        raise DataError(
            f"{source} mixes class indices and class names (first name at {first}); use one kind, "
            "or pass class_names so names can be mapped to indices"
        )

    if names is None and has_names:
        set_names: Optional[list[str]] = sorted({v for v, _ in values if isinstance(v, str)})
        index = {n: i for i, n in enumerate(set_names)}
        return [index[v] if v is not None else None for v, _ in values], set_names, {}

    set_names = names
    extra: dict[int, str] = {}
    if set_names is None and index_names:
        k = max(index_names) + 1
        if sorted(index_names) == list(range(k)):
            set_names = [index_names[i] for i in range(k)]
        else:
            extra = dict(index_names)

    matcher = _ClassMatcher(names) if names is not None and has_names else None
    out: list[Optional[int]] = []
    for v, where in values:
        if v is None:
            out.append(None)
        elif isinstance(v, int):
            if v < 0 or (names is not None and v >= len(names)):
                bound = f"0..{len(names) - 1}" if names is not None else "0 or more"
                raise DataError(f"{where}: class index {v} is out of range (must be {bound}); check the label column")
            out.append(v)
        else:
            idx, problem = matcher.lookup(v)  # type: ignore[union-attr]
            if problem:
                raise DataError(f"{where}: {problem}; use a class index or one of the model's class names")
            out.append(idx)
    return out, set_names, extra


class _ClassMatcher:
    """Maps a class name to its index: exact, then case-insensitive, then by comma-separated synonym."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self.exact: dict[str, list[int]] = {}
        self.folded: dict[str, list[int]] = {}
        self.synonyms: dict[str, list[int]] = {}
        for i, n in enumerate(self.names):
            self.exact.setdefault(n, []).append(i)
            self.folded.setdefault(_fold(n), []).append(i)
            for s in {_fold(part) for part in n.split(",") if part.strip()}:
                self.synonyms.setdefault(s, []).append(i)

    def lookup(self, name: str) -> tuple[Optional[int], Optional[str]]:
        """``(index, None)`` or ``(None, problem)``."""
        for table, key in ((self.exact, name), (self.folded, _fold(name)), (self.synonyms, _fold(name))):
            hits = table.get(key)
            if hits:
                if len(hits) == 1:
                    return hits[0], None
                shown = ", ".join(f"{i} ({self.names[i]!r})" for i in hits[:5])
                return None, f"class name {name!r} matches several classes: {shown}"
        return None, f"class name {name!r} is not one of the {len(self.names)} given class names"


def _fold(s: str) -> str:
    return " ".join(s.split()).casefold()


def _set_from_csv(csv_path: Path, base: Optional[Path], names: Optional[list[str]], limit: Optional[int]) -> ImageSet:
    table = _read_label_csv(csv_path, base)
    raw = [(r.label, r.where) for r in table.rows]
    label_of, set_names, extra = _resolve_labels(raw, names, table.index_names, str(csv_path))
    records = [ImageRecord(i, r.path, label_of[i]) for i, r in enumerate(table.rows)]
    return _finish(ImageSet(records, set_names, csv_path.parent.absolute(), label_names=extra), limit)


# --------------------------------------------------------------------------------------------------
# Embedded sample

_RESOURCES = contextlib.ExitStack()
atexit.register(_RESOURCES.close)


def _sample_dir() -> Path:
    from importlib.resources import as_file, files

    res = files("vitscope").joinpath("assets", "sample")
    if isinstance(res, Path):
        return res
    # Installed from a zip: extract once for the life of the process.
    return _RESOURCES.enter_context(as_file(res))


def _sample_set(names: Optional[list[str]]) -> ImageSet:
    folder = _sample_dir()
    csv_path = folder / "labels.csv"
    if not csv_path.is_file():
        raise FileNotFoundError(
            f"the embedded sample is missing ({csv_path} not found); reinstall vitscope, "
            "or pass your own image folder as the source"
        )
    return _set_from_csv(csv_path, None, names, None)


def embedded_sample() -> ImageSet:
    """The small labelled image sample shipped with vitscope (``vitscope/assets/sample``).

    Useful for trying the tools without data. Raises ``FileNotFoundError`` if the package was installed
    without its data files.
    """
    return _sample_set(None)


# --------------------------------------------------------------------------------------------------
# Batching

Preprocess = Callable[[Image.Image], torch.Tensor]
_Item = tuple[Optional[torch.Tensor], Optional[str], list[tuple[type, str]]]


def _load_one(record: ImageRecord, preprocess: Preprocess, max_pixels: Optional[float]) -> _Item:
    """Decode + preprocess one record; returns ``(tensor, None, warnings)`` or ``(None, reason, warnings)``.

    Warnings are returned rather than emitted so that worker processes can hand them to the caller.
    """
    problem = _unstorable_name(record.path)
    if problem is not None:
        return None, problem, []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            img = open_image(record.path, max_pixels=max_pixels)
        except ImageError as e:
            return None, e.reason, _caught(caught)
        try:
            x = preprocess(img)
        except Exception as e:
            raise RuntimeError(f"preprocessing {record.path} failed: {type(e).__name__}: {e}") from e
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"preprocess must return a torch.Tensor, got {type(x).__name__} for {record.path}")
    return x, None, _caught(caught)


def _unstorable_name(path: Path) -> Optional[str]:
    """Why results for ``path`` could not be stored, or ``None``: its name is not valid UTF-8.

    Linux file names are bytes; Python keeps bytes that are not UTF-8 (e.g. Latin-1 ``caf\\xe9.png``)
    as lone surrogates, which the run's tables (UTF-8 text) cannot hold, so such a file would stop a
    whole run when its row is written. It is skipped with this reason instead.
    """
    if _encodes(str(path)):
        return None
    bad = next((part for part in path.parts if not _encodes(part)), path.name)
    return (
        f"file name is not valid UTF-8 ({os.fsencode(bad)!r}); vitscope stores file names as UTF-8 text, "
        "so rename the file (e.g. with convmv) to analyse it"
    )


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _caught(caught: list[warnings.WarningMessage]) -> list[tuple[type, str]]:
    return [(w.category, str(w.message)) for w in caught]


class _DecodeDataset(torch.utils.data.Dataset):
    """Map-style dataset used only to run :func:`_load_one` in DataLoader workers."""

    def __init__(self, records: Sequence[ImageRecord], preprocess: Preprocess, max_pixels: Optional[float]) -> None:
        self.records = list(records)
        self.preprocess = preprocess
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> _Item:
        return _load_one(self.records[i], self.preprocess, self.max_pixels)


def _as_list(items: list[_Item]) -> list[_Item]:
    return items


def iter_batches(
    images: Union[ImageSet, Sequence[ImageRecord]],
    preprocess: Preprocess,
    batch_size: int = 32,
    num_workers: int = 0,
    on_failure: Optional[Callable[[ImageRecord, str], None]] = None,
    max_pixels: Optional[float] = None,
) -> Iterator[Batch]:
    """Decode and preprocess images in order, yielding :class:`Batch` es of ``batch_size`` (the last may be smaller).

    Files that cannot be decoded are skipped: each raises a :class:`VitscopeDataWarning` naming the
    file and the reason, is appended to ``images.failures`` when ``images`` is an :class:`ImageSet`,
    and is passed to ``on_failure(record, reason)``. Batches are filled with the images that did
    decode, so a batch holds ``batch_size`` images whenever that many remain.

    ``num_workers > 0`` decodes in that many worker processes with a torch ``DataLoader``; results,
    order and failure reports are the same as with ``num_workers=0``. ``preprocess`` then has to be
    picklable if the platform starts workers by spawning. Errors raised by ``preprocess`` itself are
    not skipped: they stop the iteration, naming the file. ``max_pixels`` is passed to :func:`open_image`.
    A file whose name is not valid UTF-8 is skipped too (with a reason saying so), since its results
    could not be stored.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be 0 or more, got {num_workers!r}")
    records = list(images.records if isinstance(images, ImageSet) else images)
    failures = images.failures if isinstance(images, ImageSet) else None

    def results() -> Iterator[_Item]:
        if num_workers == 0 or len(records) <= 1:
            for rec in records:
                yield _load_one(rec, preprocess, max_pixels)
            return
        loader = torch.utils.data.DataLoader(
            _DecodeDataset(records, preprocess, max_pixels),
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            collate_fn=_as_list,
        )
        for chunk in loader:
            yield from chunk

    pending: list[tuple[ImageRecord, torch.Tensor]] = []
    for rec, (x, reason, caught) in zip(records, results()):
        for category, message in caught:
            warnings.warn(message, category, stacklevel=2)
        if x is None:
            reason = reason or "unknown error"
            warnings.warn(f"skipped image {rec.path}: {reason}", VitscopeDataWarning, stacklevel=2)
            if failures is not None:
                failures.append((str(rec.path), reason))
            if on_failure is not None:
                on_failure(rec, reason)
            continue
        pending.append((rec, x))
        if len(pending) == batch_size:
            yield _make_batch(pending)
            pending = []
    if pending:
        yield _make_batch(pending)


def _make_batch(items: list[tuple[ImageRecord, torch.Tensor]]) -> Batch:
    shape = items[0][1].shape
    for rec, x in items:
        if x.shape != shape:
            raise ValueError(
                f"preprocess gave {rec.path} shape {tuple(x.shape)} but {items[0][0].path} shape {tuple(shape)}; "
                "the preprocessing must resize/crop every image to one size"
            )
    recs = [r for r, _ in items]
    return Batch(
        image_ids=[r.image_id for r in recs],
        x=torch.stack([x for _, x in items]),
        labels=torch.tensor([-1 if r.label is None else r.label for r in recs], dtype=torch.long),
        records=recs,
    )
