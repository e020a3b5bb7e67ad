"""A hardening corpus for the image loader (vitscope.data.decode and vitscope.data.sources), generated in tmp_path.

Every item of the corpus must come out of the loader either decoded (with the right pixels) or
refused with an :class:`ImageError` whose reason says specifically what is wrong with that file,
never a crash, a hang or silently wrong pixels; and a real ``vitscope.analyze`` run over the corpus
folder must finish and account for every listed image. The corpus (nothing of it is committed):

- every format the local Pillow can write (``PIL.Image.SAVE``), each in every mode it accepts of
  1, L, P (with and without transparency), LA, RGB, RGBA, CMYK, I;16, I, F and YCbCr;
- headers claiming ~10^10 pixels (PNG, GIF, BMP, JPEG) and a real decompression bomb (a ~100 kB
  PNG that inflates to 10^8 pixels);
- empty files, every readable format cut at several points, random bytes and text under image
  extensions, a PNG named .jpg and a JPEG named .png;
- a symlink loop, a two-link cycle, a dangling link, a good link and a folder link back to the root;
- a file without read permission; non-UTF-8 (Latin-1) file and folder names, and UTF-8 ones;
- a named pipe and a link to /dev/zero (opening them would block or never end);
- a folder of 10,000 tiny PNGs (written by its own test, not in the end-to-end run).

The run's folder holds one file per listed format (each in an odd mode) and every kind of bad file;
the full format x mode matrix lies beside it and is checked file by file (see :class:`Corpus`).

Expected pixels come from numpy formulas on the source image or from Pillow's own decoding of the
file, never from the code under test. A bounded, deterministic hypothesis fuzz of ``open_image``
over mutated files of several formats closes the file.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import shutil
import struct
import time
import warnings
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile, features

import vitscope
from vitscope.pipeline import AnalyzeSettings
from vitscope.data import ImageError, VitscopeDataWarning, iter_batches, load_images, open_image
from vitscope.data.sources import IMAGE_EXTENSIONS

H, W = 12, 10  # source images: 10 wide, 12 tall (not square, so a transposition shows)
MODES = ("1", "L", "P", "PT", "LA", "RGB", "RGBA", "CMYK", "I;16", "I", "F", "YCbCr")  # PT: P with transparency
# Formats that store pixels exactly (for the modes they keep): their decoded pixels must equal the source's.
LOSSLESS = {"BMP", "DIB", "DDS", "GIF", "ICO", "IM", "JPEG2000", "MSP", "PCX", "PNG", "PPM", "QOI", "SGI", "TGA", "TIFF", "WEBP", "XBM"}
CORE_FORMATS = {"PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM", "ICO", "TGA"}  # must be writable here
PIXEL_LIMIT_MSG = "over the limit of {:,} pixels"

pytestmark = pytest.mark.usefixtures("one_thread")  # small forwards: thread start-up dominates otherwise

SETTINGS = AnalyzeSettings(
    batch_size=16, n_boot=20, ae_epochs=1, ae_min_steps=5, n_clusters=2, projection="pca", curve_images=4, curve_points=2
)


# ----------------------------------------------------------------------------------------------
# expected pixels (numpy formulas, after open_image's documented rules)


def source_image(mode: str, seed: int = 0) -> Image.Image:
    a = np.random.default_rng(seed).integers(0, 256, (H, W, 4), dtype=np.uint8)
    if mode in ("P", "PT"):
        im = Image.fromarray(a[..., :3].copy()).quantize(16)
        if mode == "PT":
            im.info["transparency"] = 0
        return im
    if mode in ("1", "L"):
        return Image.fromarray(a[..., 0]).convert(mode)
    if mode == "LA":
        return Image.fromarray(a[..., :2].copy(), "LA")
    if mode == "RGB":
        return Image.fromarray(a[..., :3].copy())
    if mode in ("RGBA", "CMYK"):
        return Image.fromarray(a, mode)
    if mode == "YCbCr":
        return Image.fromarray(a[..., :3].copy()).convert("YCbCr")
    if mode == "I;16":
        return Image.fromarray(a[..., 0].astype(np.uint16) * 200 + 7)
    if mode == "I":
        return Image.fromarray(a[..., 0].astype(np.int32) * 250 + 1000)  # within 16 bit: PGM stores I as 16 bit
    if mode == "F":
        return Image.fromarray(a[..., 0].astype(np.float32) / 3 - 10)
    raise AssertionError(mode)


def expected_pixels(im: Image.Image) -> np.ndarray:
    """What open_image must return for a decoded PIL image, by its documented rules (float array)."""
    m = im.mode
    if m in ("RGB", "L"):
        return np.asarray(im).astype(np.float64)
    if m == "1":
        return np.asarray(im).astype(np.float64) * 255
    if m.startswith("I") or m == "F":
        a = np.asarray(im).astype(np.float64)
        lo, hi = a.min(), a.max()
        return np.rint((a - lo) * 255 / (hi - lo)) if hi > lo else np.zeros_like(a)
    if m in ("LA", "La"):
        a = np.asarray(im.convert("LA")).astype(np.float64)
        alpha = a[..., 1] / 255
        return a[..., 0] * alpha + 255 * (1 - alpha)
    if m in ("RGBA", "PA") or (m == "P" and "transparency" in im.info):
        a = np.asarray(im.convert("RGBA")).astype(np.float64)
        alpha = a[..., 3:4] / 255
        return a[..., :3] * alpha + 255 * (1 - alpha)
    return np.asarray(im.convert("RGB")).astype(np.float64)


def decoded_by_pillow(path: Path) -> Image.Image:
    with Image.open(path) as im:
        im.load()
        return im.copy()  # keeps .info (transparency)


def pillow_reads(path: Path) -> bool:
    """Whether Pillow itself (any plugin, MPO included) can decode the file."""
    try:
        decoded_by_pillow(path)
        return True
    except Exception:  # noqa: BLE001 - any failure means no
        return False


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


# ----------------------------------------------------------------------------------------------
# corpus


@dataclass(frozen=True)
class Item:
    """One corpus file: ``decode`` True = must decode, False = must be refused, None = either
    (a truncated file whose missing part held no pixels). A refusal's reason must contain one of
    ``reasons``. ``pixels`` are the exact expected pixels when known."""

    path: Path
    kind: str
    decode: Optional[bool]
    reasons: tuple[str, ...] = ()
    pixels: Optional[np.ndarray] = None


def format_extension(fmt: str) -> str:
    exts = sorted(e for e, f in Image.registered_extensions().items() if f == fmt)
    listed = [e for e in IMAGE_EXTENSIONS if e in exts]
    if listed:
        return listed[0]
    if fmt == "JPEG2000":
        return ".jp2"
    if f".{fmt.lower()}" in exts:
        return f".{fmt.lower()}"
    return exts[0] if exts else f".{fmt.lower()}"


def write_format_matrix(folder: Path) -> tuple[list[tuple[str, str, Path, Image.Image]], list[str]]:
    """Every (format, mode) the local Pillow can write; returns the files and the unwritable formats."""
    folder.mkdir(parents=True)
    Image.init()
    written: list[tuple[str, str, Path, Image.Image]] = []
    unwritable: list[str] = []
    for fmt in sorted(Image.SAVE):
        n = 0
        for mode in MODES:
            src = source_image(mode, seed=len(written))
            path = folder / f"{fmt}_{mode.replace(';', '')}{format_extension(fmt)}"
            kw: dict = {}
            if mode == "PT" and fmt in ("PNG", "GIF", "WEBP"):
                kw["transparency"] = 0
            if fmt == "WEBP":
                kw["lossless"] = True
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    src.save(path, format=fmt, **kw)
            except Exception:  # noqa: BLE001 - this format cannot store this mode (or cannot be written here)
                path.unlink(missing_ok=True)
                continue
            written.append((fmt, mode, path, src))
            n += 1
        if n == 0:
            unwritable.append(fmt)
    return written, unwritable


def png_bytes(width: int, height: int, idat: bytes, colour_type: int = 0) -> bytes:
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def encoded(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def write_huge(folder: Path) -> list[Item]:
    """Headers claiming ~10^10 pixels, and a real decompression bomb; all tiny on disk."""
    folder.mkdir(parents=True)
    files: dict[str, bytes] = {"huge_header.png": png_bytes(100_000, 100_000, zlib.compress(b"\0" * 64))}
    gif = bytearray(encoded(Image.new("L", (4, 4)), "GIF"))
    gif[6:10] = struct.pack("<HH", 65535, 65535)  # logical screen size
    files["huge_header.gif"] = bytes(gif)
    bmp = bytearray(encoded(Image.new("RGB", (4, 4)), "BMP"))
    bmp[18:26] = struct.pack("<ii", 100_000, 100_000)
    files["huge_header.bmp"] = bytes(bmp)
    jpg = bytearray(encoded(Image.new("RGB", (8, 8)), "JPEG"))
    sof = jpg.find(b"\xff\xc0")
    jpg[sof + 5 : sof + 9] = struct.pack(">HH", 65500, 65500)  # height, width
    files["huge_header.jpg"] = bytes(jpg)
    # A decompression bomb: 10,000 x 10,000 grey zeros (10^8 pixels, above MAX_IMAGE_PIXELS but below
    # twice it, where Pillow alone would only warn) deflate to ~100 kB.
    z = zlib.compressobj(9)
    row = b"\0" * (10_000 + 1)
    idat = b"".join(z.compress(row * 500) for _ in range(20)) + z.flush()
    files["bomb.png"] = png_bytes(10_000, 10_000, idat)
    limit = PIXEL_LIMIT_MSG.format(Image.MAX_IMAGE_PIXELS)
    items = []
    for name, data in files.items():
        (folder / name).write_bytes(data)
        items.append(Item(folder / name, "huge", False, (limit,)))
    return items


def write_bad(folder: Path) -> list[Item]:
    folder.mkdir(parents=True)
    items: list[Item] = []
    rng = np.random.default_rng(7)
    for ext in IMAGE_EXTENSIONS:
        (folder / f"empty{ext}").write_bytes(b"")
        items.append(Item(folder / f"empty{ext}", "empty", False, ("empty file (0 bytes)",)))
        (folder / f"random{ext}").write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
        items.append(Item(folder / f"random{ext}", "random bytes", False, ("not an image file", "corrupt")))
    (folder / "text.png").write_text("this is not an image\n" * 20)
    (folder / "error_page.jpg").write_text("<!DOCTYPE html><html><body>404 Not Found</body></html>\n")
    items += [Item(folder / n, "text", False, ("not an image file",)) for n in ("text.png", "error_page.jpg")]
    src = source_image("RGB", seed=11)
    (folder / "png_named.jpg").write_bytes(encoded(src, "PNG"))
    items.append(Item(folder / "png_named.jpg", "wrong extension", True, pixels=np.asarray(src)))
    (folder / "jpeg_named.png").write_bytes(encoded(src, "JPEG", quality=95))
    items.append(Item(folder / "jpeg_named.png", "wrong extension", True))
    return items


TRUNCATION_REASONS = ("truncated", "corrupt")


def write_truncated(folder: Path, matrix: list[tuple[str, str, Path, Image.Image]]) -> list[Item]:
    """One file per readable format (its RGB version, or its first mode), cut at several points."""
    folder.mkdir(parents=True)
    first: dict[str, Path] = {}
    for fmt, mode, path, _ in matrix:
        if fmt != "EPS" and (fmt not in first or mode == "RGB") and pillow_reads(path):
            first[fmt] = path
    items: list[Item] = []
    for fmt, path in sorted(first.items()):
        data = path.read_bytes()
        n = len(data)
        for cut in sorted({1, 8, 16, n // 3, n // 2, 2 * n // 3, 9 * n // 10, n - 1}):
            if not 0 < cut < n:
                continue
            out = folder / f"{path.stem}_cut{cut}{path.suffix}"
            out.write_bytes(data[:cut])
            # Cut inside the signature, or for a format without one, it may no longer look like an image at all.
            unrecognisable = cut < 16 or Image.OPEN.get(fmt, (None, True))[1] is None
            reasons = TRUNCATION_REASONS + ((f"or damaged {fmt} data",) if unrecognisable else ())
            items.append(Item(out, "truncated", None, reasons))
    return items


def write_links(folder: Path, good: Path, good_pixels: np.ndarray) -> list[Item]:
    folder.mkdir(parents=True)
    (folder / "loop.png").symlink_to("loop.png")
    (folder / "cycle_a.png").symlink_to("cycle_b.png")
    (folder / "cycle_b.png").symlink_to("cycle_a.png")
    (folder / "dangling.png").symlink_to("no_such_file.png")
    (folder / "good_link.png").symlink_to(good)
    (folder / "up").symlink_to("..", target_is_directory=True)  # a folder loop: listing must end
    loop = ("symbolic link loop",)
    return [
        Item(folder / "loop.png", "symlink loop", False, loop),
        Item(folder / "cycle_a.png", "symlink loop", False, loop),
        Item(folder / "cycle_b.png", "symlink loop", False, loop),
        Item(folder / "dangling.png", "dangling symlink", False, ("broken symbolic link", "no_such_file.png")),
        Item(folder / "good_link.png", "good symlink", True, pixels=good_pixels),
    ]


def write_unreadable(folder: Path) -> Item:
    folder.mkdir(parents=True)
    path = folder / "noread.png"
    path.write_bytes(encoded(source_image("RGB", seed=3), "PNG"))
    path.chmod(0)
    if os.access(path, os.R_OK):  # root reads it anyway: it decodes, honestly
        return Item(path, "no read permission (readable: running as root)", True)
    return Item(path, "no read permission", False, ("permission denied",))


def write_specials(folder: Path) -> list[Item]:
    """A named pipe (opening it would wait for a writer forever) and a link to an endless device."""
    folder.mkdir(parents=True)
    os.mkfifo(folder / "pipe.png")
    (folder / "zero.jpg").symlink_to("/dev/zero")
    reason = ("not a regular file",)
    return [Item(folder / "pipe.png", "named pipe", False, reason), Item(folder / "zero.jpg", "device", False, reason)]


def write_bytes_name(folder: bytes, name: bytes, data: bytes) -> Path:
    os.makedirs(folder, exist_ok=True)
    fd = os.open(folder + b"/" + name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    return Path(os.fsdecode(folder + b"/" + name))


def write_names(folder: Path) -> list[Item]:
    folder.mkdir(parents=True)
    raw = os.fsencode(folder)
    src = source_image("RGB", seed=5)
    png = encoded(src, "PNG")
    not_utf8 = ("file name is not valid UTF-8",)
    items = [
        Item(write_bytes_name(raw, b"caf\xe9.png", png), "non-UTF-8 name", False, not_utf8 + ("caf\\xe9",)),
        Item(write_bytes_name(raw, b"\xff\xfe.jpg", encoded(src, "JPEG")), "non-UTF-8 name", False, not_utf8),
        Item(write_bytes_name(raw + b"/dossier_\xe9t\xe9", b"ok.png", png), "non-UTF-8 folder", False, not_utf8 + ("dossier_\\xe9t\\xe9",)),
    ]
    good = folder / "naïve_日本語.png"
    good.write_bytes(png)
    items.append(Item(good, "UTF-8 name", True, pixels=np.asarray(src)))
    return items


@dataclass
class Corpus:
    """``root`` is the folder a real run goes over; the full format x mode matrix lies beside it
    (``matrix_root``), checked file by file: a run turns every image into the model's 28 x 28 grey
    input, so 150 more decodable files there would only cost minutes. ``root`` keeps one file per
    listed format, each in an odd mode, and every kind of bad file."""

    root: Path
    matrix_root: Path
    items: list[Item]
    matrix: list[tuple[str, str, Path, Image.Image]]
    unwritable: list[str]

    def by_path(self) -> dict[str, Item]:
        return {str(it.path): it for it in self.items}


# One file per listed format for the run, each in a different odd mode.
RUN_SAMPLES = {"PNG": "LA", "JPEG": "CMYK", "BMP": "P", "GIF": "PT", "TIFF": "I;16", "WEBP": "RGBA", "PPM": "F"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Corpus:
    base = tmp_path_factory.mktemp("loader")
    root, matrix_root = base / "corpus", base / "formats"
    root.mkdir()
    matrix, unwritable = write_format_matrix(matrix_root)
    items: list[Item] = []
    for fmt, mode, path, src in matrix:
        if fmt == "EPS":
            items.append(Item(path, "format EPS", False, ("EPS/PostScript", "Ghostscript")))
        elif not pillow_reads(path):  # Pillow writes it but cannot read it (PDF, PALM)
            items.append(Item(path, f"format {fmt} (write-only in Pillow)", False, (f"Pillow writes {fmt} files but cannot read them",)))
        else:
            items.append(Item(path, f"format {fmt}", True))
        if RUN_SAMPLES.get(fmt) == mode:
            (root / "formats").mkdir(exist_ok=True)
            shutil.copyfile(path, root / "formats" / path.name)
            items.append(Item(root / "formats" / path.name, f"format {fmt} {mode}", True))
    top = root / "ok_top.png"  # one image at the top: a mixed layout, so sub-folders are not classes
    top_pixels = np.asarray(source_image("RGB", seed=9))
    top.write_bytes(encoded(Image.fromarray(top_pixels), "PNG"))
    items.append(Item(top, "plain PNG", True, pixels=top_pixels))
    items += write_huge(root / "huge")
    items += write_bad(root / "bad")
    items += write_truncated(root / "truncated", matrix)
    items += write_links(root / "links", top, top_pixels)
    items.append(write_unreadable(root / "perm"))
    items += write_specials(root / "specials")
    items += write_names(root / "names")
    (root / "notes.txt").write_text("not listed")
    yield Corpus(root, matrix_root, items, matrix, unwritable)
    (root / "perm" / "noread.png").chmod(0o644)


def check_item(item: Item, path: Optional[Path] = None) -> str:
    """Decode one item with open_image and check the outcome; returns ``"decoded"`` or the reason."""
    path = path or item.path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = open_image(path)
    except ImageError as e:
        assert item.decode is not True, f"{item.kind}: {path} should decode but: {e.reason}"
        assert e.path == str(path) and path.name in str(e), (path, str(e))
        assert e.reason and any(r in e.reason for r in item.reasons), f"{item.kind}: {path}: unexpected reason {e.reason!r}"
        return e.reason
    assert item.decode is not False, f"{item.kind}: {path} should be refused ({item.reasons}) but decoded"
    assert img.mode in ("RGB", "L") and img.width > 0 and img.height > 0
    if item.pixels is not None:
        assert max_diff(np.asarray(img), item.pixels) == 0, path
    return "decoded"


# ----------------------------------------------------------------------------------------------
# every writable format and mode


def test_every_writable_format_and_mode_decodes_with_the_right_pixels(corpus):
    formats = sorted({fmt for fmt, *_ in corpus.matrix})
    print(f"\nwritable formats ({len(formats)}): {', '.join(formats)}")
    print(f"formats this Pillow cannot write (skipped): {', '.join(corpus.unwritable) or 'none'}")
    print(f"files: {len(corpus.matrix)} (format x mode pairs)")
    assert CORE_FORMATS <= set(formats), CORE_FORMATS - set(formats)
    if features.check("jpg_2000"):
        assert "JPEG2000" in formats
    by_path = corpus.by_path()
    exact = 0
    for fmt, mode, path, src in corpus.matrix:
        item = by_path[str(path)]
        if not item.decode:
            check_item(item)
            continue
        out = open_image(path)
        raw = decoded_by_pillow(path)
        assert out.mode in ("RGB", "L") and out.size == raw.size, (path, out.mode, out.size, raw.size)
        # open_image's conversion of what Pillow decoded, by the documented rules...
        assert max_diff(np.asarray(out), expected_pixels(raw)) <= 1, (path, raw.mode)
        # ...and, where the format kept the source's mode exactly, the source's own pixels.
        kept = raw.mode == src.mode and ("transparency" in raw.info) == ("transparency" in src.info)
        if fmt in LOSSLESS and kept and raw.size == src.size:
            assert max_diff(np.asarray(out), expected_pixels(src)) <= 1, (path, raw.mode)
            exact += 1
    print(f"compared with the source pixels exactly (lossless, mode kept): {exact}")
    assert exact >= 60
    in_run = sorted(p.name for p in (corpus.root / "formats").iterdir())
    assert len(in_run) == len(RUN_SAMPLES), in_run


# ----------------------------------------------------------------------------------------------
# huge images, bad files, truncation


def test_huge_images_are_refused_from_the_header(corpus, monkeypatch):
    loads: list[str] = []
    real_load = ImageFile.ImageFile.load

    def spy_load(self):  # any pixel decoding of these files would go through here
        loads.append(getattr(self, "filename", "?"))
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy_load)
    huge = [it for it in corpus.items if it.kind == "huge"]
    assert len(huge) == 5
    for item in huge:
        t = time.perf_counter()
        reason = check_item(item)
        dt = time.perf_counter() - t
        print(f"{item.path.name} ({item.path.stat().st_size:,} bytes): refused in {dt * 1000:.1f} ms: {reason}")
        assert "decompression bomb" in reason and "max_pixels" in reason
        assert dt < 5.0
    assert loads == []
    # The bomb's real size is in the reason (not Pillow's doubled threshold).
    with pytest.raises(ImageError, match=r"image has 100,000,000 pixels, over the limit of 89,478,485"):
        open_image(corpus.root / "huge" / "bomb.png")
    # A caller who trusts a file may raise the limit; then it is refused by our own check, still from the header.
    with pytest.raises(ImageError, match=r"100000 x 100000 = 10,000,000,000 pixels, over the limit of 200,000,000"):
        open_image(corpus.root / "huge" / "huge_header.png", max_pixels=200_000_000)
    assert loads == []


def test_bad_files_are_refused_or_decoded_by_content(corpus):
    items = [it for it in corpus.items if it.path.parent.name == "bad"]
    outcomes = Counter()
    for item in items:
        outcomes[item.kind, check_item(item) == "decoded"] += 1
    assert outcomes == {
        ("empty", False): len(IMAGE_EXTENSIONS),
        ("random bytes", False): len(IMAGE_EXTENSIONS),
        ("text", False): 2,
        ("wrong extension", True): 2,
    }


def test_truncated_files_are_refused_or_decode_the_same_pixels(corpus):
    items = [it for it in corpus.items if it.kind == "truncated"]
    full = {p.stem: p for _, _, p, _ in corpus.matrix}
    outcomes = Counter()
    for item in items:
        result = check_item(item)
        stem = item.path.stem.rsplit("_cut", 1)[0]
        if result == "decoded":
            # Only a cut that lost no pixel data may decode, and then to exactly the full file's pixels.
            assert max_diff(np.asarray(open_image(item.path)), np.asarray(open_image(full[stem]))) == 0, item.path
        outcomes["decoded (same pixels)" if result == "decoded" else result.split(" (")[0]] += 1
    print(f"\ntruncated: {len(items)} files from {len({i.path.stem.rsplit('_cut', 1)[0] for i in items})} formats: {dict(outcomes)}")
    assert len(items) >= 150
    assert outcomes["decoded (same pixels)"] < len(items) // 4


def test_pcx_without_its_palette_is_not_read_as_grey(tmp_path):
    """Pillow reads an 8-bit PCX whose trailing palette was cut off as greyscale, without an error."""
    src = Image.fromarray(np.random.default_rng(2).integers(0, 256, (40, 40, 3), dtype=np.uint8)).quantize(64)
    data = encoded(src, "PCX")
    (tmp_path / "full.pcx").write_bytes(data)
    assert max_diff(np.asarray(open_image(tmp_path / "full.pcx")), expected_pixels(src)) == 0
    (tmp_path / "cut.pcx").write_bytes(data[:-769])  # every pixel there, the palette gone
    with Image.open(tmp_path / "cut.pcx") as im:  # the Pillow behaviour this guards against
        assert im.mode == "L"
    with pytest.raises(ImageError, match="truncated PCX image data .*palette"):
        open_image(tmp_path / "cut.pcx")


# ----------------------------------------------------------------------------------------------
# links, permissions, names


def test_symlinks_are_listed_and_explained(corpus):
    links = corpus.root / "links"
    names = ["cycle_a.png", "cycle_b.png", "dangling.png", "good_link.png", "loop.png"]
    assert sorted(p.name for p in load_images(links, recursive=False).paths) == names
    # Recursive: links/up -> .. is followed once (the corpus root through it), never round again.
    listed = load_images(links).paths
    assert sorted(p.name for p in listed if p.parent == links) == names
    assert any(p.parent == links / "up" for p in listed)
    assert not any(p.relative_to(links).parts.count("up") > 1 for p in listed)
    # The folder link back to the root (links/up -> ..) does not make the listing loop or list twice.
    paths = load_images(corpus.root).paths
    assert len(paths) == len(set(paths))
    assert not any("up" in p.relative_to(corpus.root).parts for p in paths)
    for item in (it for it in corpus.items if it.path.parent == links):
        reason = check_item(item)
        if item.kind == "dangling symlink":
            assert reason == f"broken symbolic link (its target {links / 'no_such_file.png'} does not exist)"


def test_file_without_read_permission(corpus, monkeypatch):
    item = next(it for it in corpus.items if it.path.name == "noread.png")
    if item.decode:
        print(f"\n{item.path} has mode 000 but this user (uid {os.getuid()}) can read it anyway, so it decodes; "
              "the refusal is checked with a simulated PermissionError below")
    check_item(item)
    real_open = builtins.open

    def no_permission(file, *args, **kwargs):
        if os.fspath(file) == str(item.path):
            raise PermissionError(errno.EACCES, "Permission denied", str(item.path))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_permission)
    with pytest.raises(ImageError) as info:
        open_image(item.path)
    assert info.value.reason == "permission denied (this user may not read the file)"
    assert info.value.path == str(item.path)


def test_unlistable_subfolder_is_reported_not_silently_dropped(corpus, monkeypatch):
    hidden_from = str(corpus.root / "bad")
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path) == hidden_from:
            raise PermissionError(errno.EACCES, "Permission denied", hidden_from)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.warns(VitscopeDataWarning, match=r"could not list folder .*bad \(Permission denied\); the images in it are not included"):
        images = load_images(corpus.root)
    assert images.paths and not any(p.parent.name == "bad" for p in images.paths)


def test_non_utf8_names_are_listed_decoded_and_skipped_with_a_reason(corpus):
    names = corpus.root / "names"
    images = load_images(names)
    raw = sorted(os.fsencode(p.relative_to(names)) for p in images.paths)
    assert raw == sorted([b"caf\xe9.png", b"\xff\xfe.jpg", b"dossier_\xe9t\xe9/ok.png", "naïve_日本語.png".encode()])
    # open_image reads them: the bytes name is a valid path.
    src = np.asarray(source_image("RGB", seed=5))
    assert max_diff(np.asarray(open_image(names / os.fsdecode(b"caf\xe9.png"))), src) == 0
    # Batching (what a run does) skips those whose results could not be stored, saying why.
    seen: list[tuple[str, str]] = []
    with pytest.warns(VitscopeDataWarning, match="not valid UTF-8"):
        batches = list(iter_batches(images, _tensor, batch_size=4, on_failure=lambda r, why: seen.append((r.path.name, why))))
    assert [r.path.name for b in batches for r in b.records] == ["naïve_日本語.png"]
    by_path = corpus.by_path()
    assert len(seen) == 3
    for rec_path, reason in images.failures:
        item = by_path[rec_path]
        assert any(r in reason for r in item.reasons) and "rename" in reason, reason


def _tensor(img: Image.Image):
    import torch

    return torch.from_numpy(np.asarray(img.convert("RGB").resize((8, 8)), dtype=np.float32).copy())


# ----------------------------------------------------------------------------------------------
# a folder of 10,000 files


def test_ten_thousand_files(tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    png = encoded(Image.fromarray(np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [255, 255, 255]]], np.uint8)), "PNG")
    for i in range(10_000):
        with open(folder / f"img_{i:05d}.png", "wb") as fh:
            fh.write(png)
    t = time.perf_counter()
    images = load_images(folder)
    print(f"\nlisted 10,000 files in {time.perf_counter() - t:.2f} s")
    assert len(images) == 10_000
    assert [p.name for p in images.paths[:3]] == ["img_00000.png", "img_00001.png", "img_00002.png"]
    assert images.paths[-1].name == "img_09999.png" and [r.image_id for r in images][-1] == 9_999
    short = load_images(folder, limit=8)
    assert short.records == images.records[:8]
    run = vitscope.analyze("fmnist_vit_tiny", folder, tmp_path / "run", limit=8, settings=SETTINGS, device="cpu", progress=False)
    assert sorted(run.images["image_id"]) == list(range(8)) and run.manifest["failures"] == []


# ----------------------------------------------------------------------------------------------
# the whole corpus through a real run


def test_analyze_over_the_whole_corpus(corpus, tmp_path):
    listed = load_images(corpus.root)
    by_path = corpus.by_path()
    # Everything in the run's folder with a listed extension is listed, and nothing else.
    expected_listed = {p for p, it in by_path.items() if it.path.suffix.lower() in IMAGE_EXTENSIONS and corpus.root in it.path.parents}
    assert {str(p) for p in listed.paths} == expected_listed

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", VitscopeDataWarning)
        run = vitscope.analyze("fmnist_vit_tiny", corpus.root, tmp_path / "run", settings=SETTINGS, device="cpu", progress=False)

    analysed = set(int(i) for i in run.images["image_id"])
    failures = run.manifest["failures"]
    failed = {f["image_id"] for f in failures}
    assert not analysed & failed
    lost = set(range(len(listed))) - analysed - failed
    assert lost == set(), [str(listed[i].path) for i in sorted(lost)]
    assert run.manifest["counts"] == {"listed": len(listed), "analysed": len(analysed), "failed": len(failures)}

    kinds = Counter()
    for image_id in sorted(analysed):
        item = by_path[str(listed[image_id].path)]
        assert item.decode is not False, f"{item.path} ({item.kind}) should have been skipped"
        kinds[item.kind.split(" (")[0], "analysed"] += 1
    for f in failures:
        assert f["stage"] == "decode" and f["path"] == str(listed[f["image_id"]].path)
        item = by_path[f["path"]]
        assert item.decode is not True, f"{item.path} ({item.kind}) should have been analysed: {f['reason']}"
        assert f["reason"] and any(r in f["reason"] for r in item.reasons), (item.kind, f["path"], f["reason"])
        kinds[item.kind.split(" (")[0], "skipped"] += 1

    shown = ", ".join(f"{k} {what} {n}" for (k, what), n in sorted(kinds.items()))
    print(f"\nloader corpus run: tried {len(listed)} / analysed {len(analysed)} / skipped with a reason {len(failures)} / lost {len(lost)}")
    print(f"by kind: {shown}")
    assert len(analysed) > 0 and len(failures) > 0


# ----------------------------------------------------------------------------------------------
# fuzz


FUZZ_MAX_PIXELS = 1_000_000  # a mutated header may claim any size; keep every example fast


def fuzz_seeds() -> dict[str, bytes]:
    rgb = source_image("RGB", seed=21)
    p = source_image("P", seed=22)
    return {
        "png": encoded(rgb, "PNG"),
        "png_palette_transparent": encoded(p, "PNG", transparency=0),
        "jpeg": encoded(rgb, "JPEG", quality=90),
        "gif": encoded(p, "GIF"),
        "bmp": encoded(rgb, "BMP"),
        "tiff_lzw": encoded(rgb, "TIFF", compression="tiff_lzw"),
        "webp": encoded(rgb, "WEBP", lossless=True),
        "tga_rle": encoded(rgb, "TGA", compression="tga_rle"),
        "dds": encoded(rgb.convert("RGBA"), "DDS"),
        "pcx": encoded(p, "PCX"),
    }


EDITS = st.lists(
    st.one_of(
        st.tuples(st.just("flip"), st.integers(0, 1 << 20), st.integers(0, 7)),
        st.tuples(st.just("insert"), st.integers(0, 1 << 20), st.binary(min_size=1, max_size=8)),
        st.tuples(st.just("delete"), st.integers(0, 1 << 20), st.integers(1, 16)),
        st.tuples(st.just("truncate"), st.integers(0, 1 << 20)),
        st.tuples(st.just("set"), st.integers(0, 63), st.integers(0, 255)),  # header bytes
    ),
    min_size=1,
    max_size=6,
)


def mutate(data: bytes, edits) -> bytes:
    b = bytearray(data)
    for edit in edits:
        if not b:
            break
        op, pos = edit[0], edit[1] % len(b)
        if op == "flip":
            b[pos] ^= 1 << edit[2]
        elif op == "insert":
            b[pos:pos] = edit[2]
        elif op == "delete":
            del b[pos : pos + edit[2]]
        elif op == "truncate":
            del b[pos:]
        else:
            b[edit[1] % len(b)] = edit[2]
    return bytes(b)


def test_fuzz_open_image(tmp_path_factory):
    seeds = fuzz_seeds()
    folder = tmp_path_factory.mktemp("fuzz")
    outcomes: Counter = Counter()
    slowest = [0.0]

    @settings(max_examples=200, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(name=st.sampled_from(sorted(seeds)), edits=EDITS)
    def check(name: str, edits) -> None:
        path = folder / f"fuzz_{name}.img"
        path.write_bytes(mutate(seeds[name], edits))
        t = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                img = open_image(path, max_pixels=FUZZ_MAX_PIXELS)
        except ImageError as e:
            assert e.path == str(path) and e.reason, e
            outcomes["refused"] += 1
        else:
            assert img.mode in ("RGB", "L"), img.mode
            assert 0 < img.width * img.height <= FUZZ_MAX_PIXELS, img.size
            outcomes["decoded"] += 1
        dt = time.perf_counter() - t
        slowest[0] = max(slowest[0], dt)
        assert dt < 10.0, f"{name} mutated by {edits} took {dt:.1f} s"

    t = time.perf_counter()
    check()
    total = time.perf_counter() - t
    n = sum(outcomes.values())
    print(f"\nfuzz: {n} examples over {len(seeds)} formats in {total:.1f} s (slowest {slowest[0] * 1000:.0f} ms): {dict(outcomes)}")
    assert n >= 150 and outcomes["decoded"] > 0 and outcomes["refused"] > 0
