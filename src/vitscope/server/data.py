"""The run's own data as the web API sends it: the run description, tables, arrays and images.

Everything here is read-only and answers from the run folder alone (no model needed). Dense data
leaves as Arrow IPC streams (tables) or raw little-endian bytes (arrays), never as JSON lists of
numbers, so a browser reads a 100k-row table or a ``(197, 197)`` matrix without parsing text.
Every bad name, id or parameter raises :class:`~vitscope.server.errors.ApiError` with a 4xx status.
"""

from __future__ import annotations

import io
import json
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, Hashable, Optional, Sequence, Union

import numpy as np

from vitscope.server.errors import ApiError, bad_parameter, not_found

#: dtypes an array is sent as (docs/api.md): anything else is converted to one of these first.
WIRE_DTYPES = ("float32", "float64", "int32", "uint8")
#: Largest side ``size=`` may ask for in ``/api/image``.
MAX_IMAGE_SIZE = 2048
#: Array answers (whole arrays or slices) kept in memory once read, in bytes all together; an
#: answer larger than this is read each time.
MAX_CACHED_ARRAY_BYTES = 256 * 2**20


class LRU:
    """A small thread-safe least-recently-used cache.

    Values are computed outside the lock, once per key: a caller asking for a key that another
    thread is computing waits for that computation instead of repeating it (the server warms its
    caches on a background thread while the first page's requests for the same answers arrive).
    A failed computation is not cached; its error reaches every caller that waited for it.
    """

    def __init__(self, capacity: int, *, max_bytes: Optional[int] = None, size: Optional[Callable[[Any], int]] = None) -> None:
        """At most ``capacity`` values and, with ``max_bytes``, at most that many bytes of them as
        ``size(value)`` counts them (a value larger than that alone is not kept)."""
        self.capacity = int(capacity)
        self.max_bytes = max_bytes
        self._size = size or (lambda _v: 0)
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._bytes: dict[Hashable, int] = {}
        self._total = 0
        self._computing: dict[Hashable, Future] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """The value of ``key``, computed by ``make()`` when missing."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            pending = self._computing.get(key)
            if pending is None:
                mine: Future = Future()
                self._computing[key] = mine
        if pending is not None:
            return pending.result()
        try:
            value = make()
        except BaseException as e:
            with self._lock:
                del self._computing[key]
            mine.set_exception(e)
            raise
        nbytes = self._size(value) if self.max_bytes is not None else 0
        with self._lock:
            del self._computing[key]
            if self.max_bytes is None or nbytes <= self.max_bytes:
                self._items[key] = value
                self._bytes[key] = nbytes
                self._total += nbytes
                while len(self._items) > self.capacity or (self.max_bytes is not None and self._total > self.max_bytes):
                    old, _ = self._items.popitem(last=False)
                    self._total -= self._bytes.pop(old)
        mine.set_result(value)
        return value


def parse_index(text: Optional[str], shape: Sequence[int], name: str) -> tuple[int, ...]:
    """``"i,j"`` -> ``(i, j)``: integer indices into the leading axes of an array of ``shape``."""
    if text is None or text.strip() == "":
        return ()
    parts = [p.strip() for p in text.split(",")]
    if len(parts) > len(shape):
        raise bad_parameter(f"index={text!r} has {len(parts)} entries but array {name!r} has only {len(shape)} axes {tuple(shape)}")
    out = []
    for axis, p in enumerate(parts):
        if not re.fullmatch(r"-?\d+", p):
            raise bad_parameter(f"index={text!r}: entry {axis} ({p!r}) is not an integer; give integers for the leading axes, e.g. index=0,3")
        i, n = int(p), int(shape[axis])
        if not -n <= i < n:
            raise bad_parameter(f"index={text!r}: {i} is out of range for axis {axis} of array {name!r} (size {n}, valid -{n}..{n - 1})")
        out.append(i)
    return tuple(out)


def to_wire(a: np.ndarray) -> np.ndarray:
    """``a`` as one of :data:`WIRE_DTYPES`, little-endian and C-ordered."""
    a = np.asarray(a)
    if a.dtype == np.bool_:
        a = a.astype(np.uint8)
    elif a.dtype.kind == "f" and a.dtype.itemsize <= 4:
        a = a.astype(np.float32)
    elif a.dtype.kind == "f":
        a = a.astype(np.float64)
    elif a.dtype.kind in "iu" and a.dtype != np.uint8:
        a = a.astype(np.int32)
    elif a.dtype.kind not in "fiub":
        raise ValueError(f"arrays of dtype {a.dtype} cannot be sent")
    a = a.astype(a.dtype.newbyteorder("<"), copy=False)
    return a if a.flags.c_contiguous else a.copy(order="C")  # (ascontiguousarray would make a scalar 1-d)


def array_headers(a: np.ndarray, attrs: Optional[dict[str, Any]] = None) -> dict[str, str]:
    """The ``X-Vitscope-*`` headers that describe raw array bytes (docs/api.md)."""
    return {
        "X-Vitscope-Dtype": a.dtype.name,
        "X-Vitscope-Shape": ",".join(str(int(s)) for s in a.shape),
        "X-Vitscope-Attrs": json.dumps(attrs or {}, separators=(",", ":"), ensure_ascii=True, default=_json_default),
    }


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


class RunData:
    """A finished run, answered the way the web API needs it (cached, validated).

    ``run`` is a :class:`vitscope.store.Run` or a run folder path.
    """

    def __init__(self, run: Any) -> None:
        if not hasattr(run, "manifest"):
            from vitscope.store import open_run

            run = open_run(run)
        self.run = run
        self.path: Path = Path(run.path)
        self.manifest: dict[str, Any] = run.manifest
        self._tables = LRU(32)
        self._arrays = LRU(256, max_bytes=MAX_CACHED_ARRAY_BYTES, size=lambda answer: len(answer[0]))
        self._images = LRU(256)
        self._lock = threading.Lock()
        self._images_df: Any = None
        self._array_names: Optional[list[str]] = None

    # ----------------------------------------------------------------- names
    def table_names(self) -> list[str]:
        """Every table of the run: the folder's ``*.parquet`` files (hidden and temporary ones excluded)."""
        return sorted(p.stem for p in self.path.glob("*.parquet") if p.is_file() and not p.name.startswith("."))

    def array_names(self) -> list[str]:
        """Every array of the run. Listed once: walking the zarr store takes tens of milliseconds,
        every array request needs the list, and a finished run's arrays do not change."""
        with self._lock:
            if self._array_names is None:
                self._array_names = list(self.run.arrays())
            return list(self._array_names)

    # ----------------------------------------------------------------- tables
    def table_ipc(self, name: str, columns: Optional[str] = None) -> bytes:
        """Table ``name`` (optionally only ``columns``, comma-separated) as an Arrow IPC stream."""
        names = self.table_names()
        if name not in names:
            raise not_found(f"run has no table {name!r}; it has: {', '.join(names)}")
        cols: Optional[tuple[str, ...]] = None
        if columns is not None and columns.strip() != "":
            cols = tuple(c.strip() for c in columns.split(","))
            if any(not c for c in cols):
                raise bad_parameter(f"columns={columns!r} has an empty name; give comma-separated column names, e.g. columns=layer,head")
        return self._tables.get((name, cols), lambda: self._read_table_ipc(name, cols))

    def _read_table_ipc(self, name: str, cols: Optional[tuple[str, ...]]) -> bytes:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = self.path / f"{name}.parquet"
        if cols is not None:
            have = pq.read_schema(path).names
            missing = [c for c in cols if c not in have]
            if missing:
                raise not_found(f"table {name!r} has no column(s) {', '.join(map(repr, missing))}; it has: {', '.join(have)}")
        table = pq.read_table(path, columns=list(cols) if cols is not None else None)
        sink = io.BytesIO()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        return sink.getvalue()

    # ----------------------------------------------------------------- arrays
    def array_bytes(self, name: str, index: Optional[str] = None) -> tuple[bytes, dict[str, str]]:
        """Array ``name`` (or ``array[index]``) as raw bytes and its ``X-Vitscope-*`` headers.

        Answers are kept (reading and converting a zarr array costs far more than sending it), up
        to :data:`MAX_CACHED_ARRAY_BYTES` in all, keyed by the parsed index so ``0,3`` and ``0, 3``
        share one.
        """
        names = self.array_names()
        if name not in names:
            raise not_found(f"run has no array {name!r}; it has: {', '.join(names) or 'none'}")
        arr = self.run.array(name)
        idx = parse_index(index, arr.shape, name)
        return self._arrays.get((name, idx), lambda: self._read_array(arr, idx))

    @staticmethod
    def _read_array(arr: Any, idx: tuple[int, ...]) -> tuple[bytes, dict[str, str]]:
        data = to_wire(arr[idx] if idx else arr[...])
        return data.tobytes(), array_headers(data, dict(arr.attrs))

    # ----------------------------------------------------------------- images
    @property
    def images(self) -> Any:
        with self._lock:
            if self._images_df is None:
                self._images_df = self.run.images.set_index("image_id", drop=False)
            return self._images_df

    def image_row(self, image_id: Union[int, str]) -> Any:
        """The ``images`` row of ``image_id`` (404 when the run has no such image)."""
        iid = parse_image_id(image_id)
        df = self.images
        if iid not in df.index:
            lo, hi = (int(df.index.min()), int(df.index.max())) if len(df) else (0, -1)
            raise not_found(f"run has no image {iid} (it has {len(df)} images, ids {lo}..{hi}; failed images are listed in the manifest)")
        return df.loc[iid]

    def image_path(self, image_id: Union[int, str]) -> Path:
        """Where image ``image_id``'s file is now (see :func:`resolve_image_path`); 409 when it is gone."""
        row = self.image_row(image_id)
        found = resolve_image_path(str(row["path"]), self.manifest, self.path)
        if found is None:
            raise ApiError(
                409,
                "image_missing",
                f"image {int(row['image_id'])}'s file {row['path']} no longer exists; put it back (or run the server where the run's images are)",
            )
        return found

    def decoded_image(self, image_id: Union[int, str]) -> Any:
        """Image ``image_id`` decoded (a PIL image), from its file or from inside its container
        (a WebDataset shard, a dataset file: the images table's ``member``); 409 when unreadable."""
        from vitscope.data import ImageError, ImageRecord
        from vitscope.data.containers import open_record

        path = self.image_path(image_id)
        member = self.image_row(image_id).get("member")
        record = ImageRecord(parse_image_id(image_id), path, None, member if isinstance(member, str) else None)
        try:
            return open_record(record)
        except (ImageError, OSError) as e:
            raise ApiError(409, "image_unreadable", f"image {record.location} cannot be decoded ({e})") from e

    def preprocessing(self) -> Any:
        """The run's preprocessing (from its manifest), geometry only: the PIL resize and centre crop."""
        from vitscope.models.preprocessing import Preprocessing

        p = dict(self.manifest["model"]["preprocessing"])
        resize = p.get("resize")
        return Preprocessing(
            input_size=tuple(p["input_size"]),  # type: ignore[arg-type]
            mean=tuple(p["mean"]),
            std=tuple(p["std"]),
            interpolation=p.get("interpolation", "bicubic"),
            resize=tuple(resize) if isinstance(resize, list) else resize,  # type: ignore[arg-type]
            crop=tuple(p["crop"]) if p.get("crop") else None,  # type: ignore[arg-type]
        )

    def image_png(self, image_id: Union[int, str], size: Optional[int] = None) -> bytes:
        """Image ``image_id`` as the model sees it (resized, centre-cropped, not normalised) as PNG."""
        if size is not None and not 1 <= int(size) <= MAX_IMAGE_SIZE:
            raise bad_parameter(f"size={size} is out of range; give a side in pixels from 1 to {MAX_IMAGE_SIZE}")
        self.image_path(image_id)  # 404 / 409 before anything is cached
        iid = parse_image_id(image_id)
        return self._images.get((iid, size), lambda: self._render_png(iid, size))

    def _render_png(self, image_id: int, size: Optional[int]) -> bytes:
        from PIL import Image

        img = model_view(self.preprocessing(), self.decoded_image(image_id))
        if size is not None:
            w, h = img.size
            s = size / max(w, h)
            img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.NEAREST)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()


def model_view(prep: Any, path: Union[str, Path, Any]) -> Any:
    """The PIL image the model sees of ``path`` (a file or a decoded PIL image): the run's resize
    and centre crop, no normalisation.

    Uses :class:`vitscope.models.preprocessing.Preprocessing` itself with mean 0, std 1 and no
    rescaling, so the geometry is exactly the analysis's.
    """
    from dataclasses import replace

    from PIL import Image

    plain = replace(prep, mean=(0.0,) * prep.channels, std=(1.0,) * prep.channels, rescale=1.0, transform=None)
    t = plain(path)  # (C, H, W), 0..255
    a = np.clip(np.rint(t.numpy()), 0, 255).astype(np.uint8)
    return Image.fromarray(a[0] if a.shape[0] == 1 else np.moveaxis(a, 0, -1))


def parse_image_id(image_id: Union[int, str]) -> int:
    if isinstance(image_id, (int, np.integer)):
        return int(image_id)
    text = str(image_id)
    if not re.fullmatch(r"-?\d{1,12}", text):
        raise bad_parameter(f"image id {text!r} is not an integer; image ids are the images table's image_id column")
    return int(text)


def resolve_image_path(recorded: str, manifest: dict[str, Any], run_path: Path) -> Optional[Path]:
    """Find an analysed image's file: as recorded (absolute), relative to the run folder, its
    parent or the image source folder, or for the embedded sample, in this installation's copy."""
    p = Path(recorded)
    candidates = [p] if p.is_absolute() else [Path.cwd() / p, run_path / p, run_path.parent / p]
    source = str(manifest.get("images", {}).get("source") or "")
    if source and source != "sample" and not p.is_absolute():
        candidates.append(Path(source) / p)
    if source == "sample" or "assets/sample" in recorded.replace("\\", "/"):
        from vitscope.data.sources import _sample_dir

        candidates.append(_sample_dir() / p.name)
    for c in candidates:
        if c.is_file():
            return c
    return None
