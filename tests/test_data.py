"""Tests for vitscope.data: listing, labelling, decoding and batching images.

All images are generated in tmp_path; expected pixels come from numpy formulas or direct PIL reads,
never from the code under test.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitscope.data as vdata
from vitscope.data import (
    Batch,
    DataError,
    ImageError,
    ImageRecord,
    ImageSet,
    VitscopeDataWarning,
    embedded_sample,
    iter_batches,
    load_images,
    open_image,
)

RNG = np.random.default_rng(1234)


# ----------------------------------------------------------------------------------------------
# helpers


def rgb_array(h: int = 16, w: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def save_png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def to_tensor(img: Image.Image) -> torch.Tensor:
    """A minimal preprocess: 8-bit RGB -> (3, H, W) float in [0, 1]. Module level so workers can pickle it."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def make_bad_files(folder: Path) -> dict[str, str]:
    """Write one file per failure kind; returns {file name: expected reason fragment}."""
    folder.mkdir(parents=True, exist_ok=True)
    # Corrupt bytes: a valid PNG whose compressed pixel data is overwritten.
    a = (np.random.default_rng(0).integers(0, 8, (64, 64)) * 30).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    b = bytearray(buf.getvalue())
    i = b.find(b"IDAT")
    b[i + 100 : i + 400] = bytes([0xAB]) * 300
    (folder / "b_corrupt.png").write_bytes(bytes(b))
    # Truncated JPEG: the first half of a real JPEG.
    buf = io.BytesIO()
    Image.fromarray(rgb_array(64, 64, seed=5)).save(buf, "JPEG", quality=90)
    (folder / "c_truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (folder / "d_empty.png").write_bytes(b"")
    (folder / "e_text.jpg").write_text("this is not an image\n")
    # "Huge": over the lowered pixel limit used in the tests (HUGE_LIMIT).
    save_png(folder / "f_huge.png", np.zeros((120, 120, 3), np.uint8))
    return {
        "b_corrupt.png": "corrupt",
        "c_truncated.jpg": "truncated",
        "d_empty.png": "empty",
        "e_text.jpg": "not an image",
        "f_huge.png": "pixels",
    }


HUGE_LIMIT = 100 * 100  # good test images are 16x16, f_huge.png is 120x120


# ----------------------------------------------------------------------------------------------
# open_image: failures


@pytest.fixture
def bad_dir(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    return tmp_path / "bad", make_bad_files(tmp_path / "bad")


def test_open_image_rejects_each_bad_file_with_its_reason(bad_dir):
    folder, expected = bad_dir
    for name, fragment in expected.items():
        with pytest.raises(ImageError) as info:
            open_image(folder / name, max_pixels=HUGE_LIMIT)
        assert info.value.path == str(folder / name)
        assert fragment in info.value.reason, (name, info.value.reason)
        assert name in str(info.value)


def test_open_image_missing_and_folder(tmp_path):
    with pytest.raises(ImageError, match="file not found"):
        open_image(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="folder"):
        open_image(tmp_path)


def test_pixel_limit_defaults_to_pillow_and_is_strict(tmp_path, monkeypatch):
    path = save_png(tmp_path / "x.png", np.zeros((30, 40, 3), np.uint8))  # 1200 pixels
    assert open_image(path, max_pixels=1200).size == (40, 30)
    with pytest.raises(ImageError, match="1,200 pixels"):
        open_image(path, max_pixels=1199)
    # Default follows PIL.Image.MAX_IMAGE_PIXELS; Pillow would only *warn* between 1x and 2x its limit.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageError, match="pixels"):
        open_image(path)
    # A per-call limit above Pillow's global one (even above 2x, where Pillow raises) is honoured.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    assert open_image(path, max_pixels=10_000).size == (40, 30)
    assert Image.MAX_IMAGE_PIXELS == 500  # restored


def test_image_error_pickles():
    import pickle

    e = pickle.loads(pickle.dumps(ImageError("/a/b.png", "empty file")))
    assert (e.path, e.reason) == ("/a/b.png", "empty file")


# ----------------------------------------------------------------------------------------------
# open_image: conversions against direct formulas


def test_rgb_and_greyscale_pass_through(tmp_path):
    rgb = rgb_array(8, 12)
    out = open_image(save_png(tmp_path / "rgb.png", rgb))
    assert out.mode == "RGB" and np.array_equal(np.asarray(out), rgb)
    grey = rgb[:, :, 0]
    out = open_image(save_png(tmp_path / "g.png", grey))
    assert out.mode == "L" and np.array_equal(np.asarray(out), grey)
    bw = Image.fromarray(grey > 127)
    bw.save(tmp_path / "bw.png")
    out = open_image(tmp_path / "bw.png")
    assert out.mode == "L" and np.array_equal(np.asarray(out), np.where(grey > 127, 255, 0))


def test_cmyk_to_rgb(tmp_path):
    cmyk = np.random.default_rng(3).integers(0, 256, (6, 7, 4), dtype=np.uint8)
    Image.fromarray(cmyk, mode="CMYK").save(tmp_path / "c.tif")  # lossless, unlike JPEG
    out = open_image(tmp_path / "c.tif")
    c = cmyk.astype(np.float64)
    expected = (255 - c[..., :3]) * (255 - c[..., 3:4]) / 255.0
    assert out.mode == "RGB"
    assert np.abs(np.asarray(out).astype(np.float64) - expected).max() <= 1.0


def test_palette_to_rgb(tmp_path):
    palette = np.random.default_rng(4).integers(0, 256, (256, 3), dtype=np.uint8)
    idx = np.random.default_rng(5).integers(0, 256, (9, 10), dtype=np.uint8)
    im = Image.fromarray(idx, mode="P")
    im.putpalette(palette.tobytes())
    im.save(tmp_path / "p.png")
    out = open_image(tmp_path / "p.png")
    assert out.mode == "RGB" and np.array_equal(np.asarray(out), palette[idx])
    # A transparent palette entry is composited on white.
    im.info["transparency"] = int(idx[0, 0])
    im.save(tmp_path / "pt.png", transparency=int(idx[0, 0]))
    out = np.asarray(open_image(tmp_path / "pt.png"))
    expected = palette[idx].copy()
    expected[idx == idx[0, 0]] = 255
    assert np.array_equal(out, expected)


def test_rgba_and_la_composited_on_white(tmp_path):
    rgba = np.random.default_rng(6).integers(0, 256, (8, 9, 4), dtype=np.uint8)
    save_png(tmp_path / "a.png", rgba)
    out = open_image(tmp_path / "a.png")
    alpha = rgba[..., 3:4] / 255.0
    expected = rgba[..., :3] * alpha + 255.0 * (1 - alpha)
    assert out.mode == "RGB"
    assert np.abs(np.asarray(out) - expected).max() <= 1.0

    la = rgba[..., [0, 3]]
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    out = open_image(tmp_path / "la.png")
    alpha = la[..., 1] / 255.0
    expected = la[..., 0] * alpha + 255.0 * (1 - alpha)
    assert out.mode == "L"
    assert np.abs(np.asarray(out) - expected).max() <= 1.0


@pytest.mark.parametrize(
    "dtype,suffix",
    [(np.uint16, "png"), (np.uint16, "tif"), (np.int32, "tif"), (np.float32, "tif")],
)
def test_high_bit_depth_greyscale_scaled_by_range(tmp_path, dtype, suffix):
    rng = np.random.default_rng(7)
    # A 12-bit-style range inside a 16-bit container: clipping or /257 would give a near-black image.
    a = rng.integers(100, 4096, (10, 11)).astype(dtype)
    if dtype == np.float32:
        a = a / 7.5 - 50.0
    path = tmp_path / f"hi.{suffix}"
    Image.fromarray(a).save(path)
    out = open_image(path)
    lo, hi = float(a.min()), float(a.max())
    expected = np.rint((a.astype(np.float64) - lo) / (hi - lo) * 255.0)
    assert out.mode == "L"
    assert np.abs(np.asarray(out).astype(np.float64) - expected).max() <= 0.5
    assert np.asarray(out).min() == 0 and np.asarray(out).max() == 255


def test_float_greyscale_nan_and_constant(tmp_path):
    a = np.array([[0.0, np.nan], [0.5, 1.0]], np.float32)
    Image.fromarray(a).save(tmp_path / "f.tif")
    assert np.asarray(open_image(tmp_path / "f.tif")).tolist() == [[0, 0], [128, 255]]
    Image.fromarray(np.full((3, 3), 7, np.uint16)).save(tmp_path / "c.png")
    assert np.asarray(open_image(tmp_path / "c.png")).max() == 0


def test_exif_orientation_is_applied(tmp_path):
    # Stored 40 wide x 20 tall: left half red, right half blue, top row band green.
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    arr[:4] = (0, 255, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # viewers rotate 90 degrees clockwise
    Image.fromarray(arr).save(tmp_path / "rot.jpg", quality=95, exif=exif)
    Image.fromarray(arr).save(tmp_path / "plain.jpg", quality=95)

    out = np.asarray(open_image(tmp_path / "rot.jpg")).astype(int)
    expected = np.rot90(np.asarray(Image.open(tmp_path / "plain.jpg")), k=-1).astype(int)  # clockwise
    assert out.shape == (40, 20, 3)
    assert np.abs(out - expected).mean() < 3.0
    # After rotation the green band is on the right edge.
    assert out[20, -1, 1] > 200 and out[20, 0, 1] < 60


# ----------------------------------------------------------------------------------------------
# load_images: listing and labels


def make_class_folders(root: Path) -> dict[str, list[np.ndarray]]:
    data = {"dog": [rgb_array(seed=s) for s in range(3)], "cat": [rgb_array(seed=10 + s) for s in range(2)]}
    for cls, arrays in data.items():
        for i, arr in enumerate(arrays):
            save_png(root / cls / f"img{i}.png", arr)
    save_png(root / "cat" / ".hidden.png", rgb_array(seed=99))
    save_png(root / ".cache" / "x.png", rgb_array(seed=98))
    (root / "cat" / "notes.txt").write_text("not listed")
    save_png(root / "dog" / "deeper" / "UPPER.PNG", rgb_array(seed=97))
    return data


def test_class_folders_give_labels_in_sorted_order(tmp_path):
    make_class_folders(tmp_path)
    images = load_images(tmp_path)
    rel = [p.relative_to(tmp_path).as_posix() for p in images.paths]
    assert rel == ["cat/img0.png", "cat/img1.png", "dog/deeper/UPPER.PNG", "dog/img0.png", "dog/img1.png", "dog/img2.png"]
    assert images.class_names == ["cat", "dog"]
    assert images.labels == [0, 0, 1, 1, 1, 1]
    assert [r.image_id for r in images] == list(range(6))
    assert images.root == tmp_path.absolute()
    frame = images.to_frame()
    assert list(frame.columns) == ["image_id", "path", "label", "label_name"]
    assert frame["label_name"].tolist() == ["cat", "cat", "dog", "dog", "dog", "dog"]
    assert frame["path"].tolist() == [str(p) for p in images.paths]
    # Same inputs, same ids.
    assert load_images(tmp_path).records == images.records


def test_class_folders_mapped_through_class_names(tmp_path):
    make_class_folders(tmp_path)
    images = load_images(tmp_path, class_names=["Dog", "bird", "cat"])
    assert images.labels == [2, 2, 0, 0, 0, 0]
    assert images.class_names == ["Dog", "bird", "cat"]
    with pytest.raises(DataError, match=r"class folder .*dog.*not one of the 2 given class names"):
        load_images(tmp_path, class_names=["cat", "bird"])


def test_symlinked_class_folders_are_followed_once(tmp_path):
    save_png(tmp_path / "store" / "a.png", rgb_array())
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "cat").symlink_to(tmp_path / "store", target_is_directory=True)
    (tmp_path / "store" / "loop").symlink_to(tmp_path / "store", target_is_directory=True)
    images = load_images(tmp_path / "data")
    assert [p.relative_to(tmp_path / "data").as_posix() for p in images.paths] == ["cat/a.png"]
    assert images.class_names == ["cat"] and images.labels == [0]


def test_numbered_class_folders_are_indices(tmp_path):
    for k in (0, 2, 10):
        save_png(tmp_path / str(k) / "a.png", rgb_array(seed=k))
    images = load_images(tmp_path)
    assert images.labels == [0, 10, 2] and images.class_names is None  # paths sort as text: 0, 10, 2


def test_mixed_layout_and_non_recursive_have_no_labels(tmp_path):
    make_class_folders(tmp_path)
    save_png(tmp_path / "top.png", rgb_array(seed=50))
    images = load_images(tmp_path)
    assert len(images) == 7 and images.labels == [None] * 7
    flat = load_images(tmp_path, recursive=False)
    assert [p.name for p in flat.paths] == ["top.png"] and flat.labels == [None]


def test_limit_takes_first_in_sorted_order(tmp_path):
    make_class_folders(tmp_path)
    full = load_images(tmp_path)
    assert load_images(tmp_path, limit=2).records == full.records[:2]
    assert len(load_images(tmp_path, limit=100)) == len(full)
    with pytest.raises(DataError, match="limit"):
        load_images(tmp_path, limit=0)


def test_empty_or_missing_source(tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=r"no images found in .* \(looked for .jpg, .jpeg, .png"):
        load_images(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_images(tmp_path / "missing")


def test_file_list_and_single_file(tmp_path):
    paths = [save_png(tmp_path / f"{n}.png", rgb_array(seed=i)) for i, n in enumerate("cab")]
    images = load_images(paths, labels=[2, None, "1"])
    assert [p.name for p in images.paths] == ["c.png", "a.png", "b.png"]  # given order kept
    assert images.labels == [2, None, 1]
    one = load_images(paths[0])
    assert len(one) == 1 and one.labels == [None] and one.root == tmp_path.absolute()
    with pytest.raises(DataError, match="2 entries but there are 3 images"):
        load_images(paths, labels=[1, 2])
    with pytest.raises(FileNotFoundError, match="item 1"):
        load_images([paths[0], tmp_path / "zzz.png"])


def test_csv_labels_by_index(tmp_path):
    paths = [save_png(tmp_path / "imgs" / f"{i}.png", rgb_array(seed=i)) for i in range(4)]
    csv_path = write_csv(tmp_path / "labels.csv", ["path", "label"], [["imgs/0.png", 3], ["imgs/1.png", 0], ["imgs/3.png", ""]])
    images = load_images(tmp_path / "imgs", labels=csv_path)
    assert images.paths == [p.absolute() for p in paths]
    assert images.labels == [3, 0, None, None]  # 2.png has no row, 3.png an empty label
    assert images.class_names is None
    with pytest.raises(DataError, match="out of range"):
        load_images(tmp_path / "imgs", labels=csv_path, class_names=["a", "b"])


def test_csv_labels_by_name_and_class_names(tmp_path):
    for i in range(3):
        save_png(tmp_path / f"{i}.png", rgb_array(seed=i))
    write_csv(tmp_path / "labels.csv", ["path", "label"], [["0.png", "zebra"], ["1.png", "ant"], ["2.png", "zebra"]])
    # labels.csv inside the folder is picked up automatically.
    images = load_images(tmp_path)
    assert images.class_names == ["ant", "zebra"] and images.labels == [1, 0, 1]
    mapped = load_images(tmp_path, class_names=["cat", "zebra", "ant"])
    assert mapped.labels == [1, 2, 1] and mapped.class_names == ["cat", "zebra", "ant"]
    assert mapped.to_frame()["label_name"].tolist() == ["zebra", "ant", "zebra"]
    with pytest.raises(DataError, match=r"labels.csv line 3: class name 'ant' is not one of"):
        load_images(tmp_path, class_names=["cat", "zebra"])


def test_name_numbering_uses_the_whole_csv_and_mapping_labels(tmp_path):
    save_png(tmp_path / "imgs" / "z.png", rgb_array())
    save_png(tmp_path / "other" / "a.png", rgb_array(seed=1))
    csv_path = write_csv(tmp_path / "l.csv", ["path", "label"], [["other/a.png", "ant"], ["imgs/z.png", "zebra"]])
    images = load_images(tmp_path / "imgs", labels=csv_path)
    assert images.class_names == ["ant", "zebra"] and images.labels == [1]
    by_map = load_images(tmp_path / "imgs", labels={"z.png": 4})
    assert by_map.labels == [4]


def test_class_name_matching_synonyms_and_ambiguity(tmp_path):
    for i in range(3):
        save_png(tmp_path / f"{i}.png", rgb_array(seed=i))
    names = ["tench, Tinca tinca", "goldfish, Carassius auratus", "crane", "crane"]
    write_csv(tmp_path / "a.csv", ["path", "label"], [["0.png", "GOLDFISH"], ["1.png", "tench, Tinca tinca"], ["2.png", "Tinca tinca"]])
    assert load_images(tmp_path, labels=tmp_path / "a.csv", class_names=names).labels == [1, 0, 0]
    write_csv(tmp_path / "b.csv", ["path", "label"], [["0.png", "crane"]])
    with pytest.raises(DataError, match="matches several classes: 2 .* 3"):
        load_images(tmp_path, labels=tmp_path / "b.csv", class_names=names)


def test_csv_errors_name_the_problem(tmp_path):
    save_png(tmp_path / "0.png", rgb_array())
    write_csv(tmp_path / "bad.csv", ["file", "y"], [["0.png", 1]])
    with pytest.raises(DataError, match="needs a 'path' column and a 'label' or 'class_index' column"):
        load_images(tmp_path, labels=tmp_path / "bad.csv")
    write_csv(tmp_path / "missing.csv", ["path", "label"], [["0.png", 1], ["gone.png", 2]])
    with pytest.raises(FileNotFoundError, match=r"missing.csv line 3: image gone.png not found"):
        load_images(tmp_path, labels=tmp_path / "missing.csv")
    write_csv(tmp_path / "dup.csv", ["path", "label"], [["0.png", 1], ["./0.png", 2]])
    with pytest.raises(DataError, match="already has label 1"):
        load_images(tmp_path, labels=tmp_path / "dup.csv")
    write_csv(tmp_path / "mixed.csv", ["path", "label"], [["0.png", 1], ["0.png", "cat"]])
    with pytest.raises(DataError):
        load_images(tmp_path, labels=tmp_path / "mixed.csv")


def test_csv_paths_relative_to_source_or_absolute(tmp_path):
    img = save_png(tmp_path / "data" / "x.png", rgb_array())
    other = save_png(tmp_path / "elsewhere" / "y.png", rgb_array(seed=1))
    (tmp_path / "meta").mkdir()
    write_csv(tmp_path / "meta" / "l.csv", ["path", "label"], [["x.png", 4], [str(other), 5]])
    images = load_images(tmp_path / "data", labels=tmp_path / "meta" / "l.csv")
    assert images.paths == [img.absolute()] and images.labels == [4]
    # With no source, the CSV itself lists the images (in its row order).
    write_csv(tmp_path / "list.csv", ["path", "class_index", "description"], [["elsewhere/y.png", 1, "b"], ["data/x.png", 0, "a"]])
    listed = load_images(labels=tmp_path / "list.csv")
    assert listed.paths == [other.absolute(), img.absolute()]
    assert listed.labels == [1, 0] and listed.class_names == ["a", "b"]


def test_imagenet_sample_csv_format(imagenet_sample, tmp_path):
    with open(imagenet_sample / "labels.csv") as fh:
        rows = list(csv.DictReader(fh))
    by_path = {str((imagenet_sample / r["path"]).absolute()): r for r in rows}

    images = load_images(imagenet_sample, limit=4)  # picks up its labels.csv
    assert len(images) == 4
    for rec in images:
        row = by_path[str(rec.path)]
        assert rec.label == int(row["class_index"])
        assert images.label_name(rec.label) == row["description"]
    assert len(images.class_names) == 1000

    # The sample's descriptions are the ImageNet-1k class names that timm models carry.
    model_names = [""] * 1000
    for r in rows:
        model_names[int(r["class_index"])] = r["description"]
    listed = load_images(labels=imagenet_sample / "labels.csv", limit=3, class_names=model_names)
    assert listed.labels == [int(r["class_index"]) for r in rows[:3]]
    assert listed.class_names == model_names

    # Labels given by class name (a synonym) map through the model's class names.
    picked = rows[::200][:3]
    by_name = write_csv(
        tmp_path / "names.csv",
        ["path", "label"],
        [[str(imagenet_sample / r["path"]), r["description"].split(",")[-1].strip()] for r in picked],
    )
    named = load_images(labels=by_name, class_names=model_names)
    assert named.labels == [int(r["class_index"]) for r in picked]

    batches = list(iter_batches(listed, _resize32, batch_size=2))
    assert [b.image_ids for b in batches] == [[0, 1], [2]]
    assert batches[0].x.shape == (2, 3, 32, 32)
    assert batches[0].labels.tolist() == listed.labels[:2]
    ref = np.asarray(Image.open(listed.paths[2]).convert("RGB").resize((32, 32), Image.Resampling.BILINEAR), np.float32) / 255
    assert torch.allclose(batches[1].x[0], torch.from_numpy(ref.transpose(2, 0, 1).copy()))


def _resize32(img: Image.Image) -> torch.Tensor:
    return to_tensor(img.resize((32, 32), Image.Resampling.BILINEAR))


# ----------------------------------------------------------------------------------------------
# iter_batches


@pytest.fixture
def mixed_folder(tmp_path: Path) -> tuple[Path, dict[str, str], dict[str, np.ndarray]]:
    folder = tmp_path / "mixed"
    expected = make_bad_files(folder)
    good = {f"{c}_good{i}.png": rgb_array(seed=20 + 5 * i + ord(c)) for c in "abg" for i in range(2)}
    for name, arr in good.items():
        save_png(folder / name, arr)
    return folder, expected, good


def run_batches(images, num_workers: int, batch_size: int = 2):
    seen: list[tuple[int, str]] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(
            iter_batches(
                images,
                to_tensor,
                batch_size=batch_size,
                num_workers=num_workers,
                on_failure=lambda rec, reason: seen.append((rec.image_id, reason)),
                max_pixels=HUGE_LIMIT,
            )
        )
    data_warnings = [str(w.message) for w in caught if issubclass(w.category, VitscopeDataWarning)]
    return batches, seen, data_warnings


def test_iter_batches_skips_failures_and_batches_the_rest(mixed_folder):
    folder, expected, good = mixed_folder
    images = load_images(folder)
    assert len(images) == len(expected) + len(good)
    batches, seen, data_warnings = run_batches(images, num_workers=0)

    # Every bad file: one warning naming it and its reason, one failure entry, one callback.
    assert len(images.failures) == len(expected) == len(seen) == len(data_warnings)
    for (path, reason), msg in zip(images.failures, data_warnings):
        name = Path(path).name
        assert expected[name] in reason
        assert path in msg and reason in msg
    assert [images[i].path.name for i, _ in seen] == sorted(expected)

    # The good files, in sorted order, filled into full batches, pixels equal to a direct PIL read.
    got_ids = [i for b in batches for i in b.image_ids]
    assert [images[i].path.name for i in got_ids] == sorted(good)
    assert [len(b) for b in batches] == [2, 2, 2]
    for b in batches:
        assert isinstance(b, Batch) and b.x.dtype == torch.float32
        assert b.labels.dtype == torch.long and b.labels.tolist() == [-1] * len(b)
        assert [r.image_id for r in b.records] == b.image_ids
        for rec, x in zip(b.records, b.x):
            ref = good[rec.path.name].astype(np.float32).transpose(2, 0, 1) / 255.0
            assert torch.equal(x, torch.from_numpy(ref))


def test_iter_batches_workers_match_in_process(mixed_folder):
    folder, _, _ = mixed_folder
    a = load_images(folder)
    b = load_images(folder)
    batches0, seen0, warn0 = run_batches(a, num_workers=0, batch_size=3)
    batches2, seen2, warn2 = run_batches(b, num_workers=2, batch_size=3)
    assert [x.image_ids for x in batches0] == [x.image_ids for x in batches2]
    for x0, x2 in zip(batches0, batches2):
        assert torch.equal(x0.x, x2.x) and torch.equal(x0.labels, x2.labels)
    assert a.failures == b.failures and seen0 == seen2 and warn0 == warn2


def test_iter_batches_labels_and_plain_record_lists(tmp_path):
    make_class_folders(tmp_path)
    images = load_images(tmp_path)
    records = images.records[1:4]
    batches = list(iter_batches(records, to_tensor, batch_size=8))
    assert len(batches) == 1
    assert batches[0].image_ids == [1, 2, 3]
    assert batches[0].labels.tolist() == [0, 1, 1]


def test_iter_batches_reports_preprocess_errors_and_shape_mismatch(tmp_path):
    paths = [save_png(tmp_path / "a.png", rgb_array(8, 8)), save_png(tmp_path / "b.png", rgb_array(8, 9))]
    images = load_images(paths)

    def broken(img: Image.Image) -> torch.Tensor:
        raise ValueError("boom")

    with pytest.raises(RuntimeError, match=r"preprocessing .*a.png failed: ValueError: boom"):
        next(iter_batches(images, broken))
    with pytest.raises(ValueError, match=r"b.png shape \(3, 8, 9\)"):
        list(iter_batches(images, to_tensor))
    with pytest.raises(ValueError, match="batch_size"):
        next(iter_batches(images, to_tensor, batch_size=0))


# ----------------------------------------------------------------------------------------------
# ImageSet, embedded sample, lazy exports


def test_imageset_indexing_and_frame_dtypes(tmp_path):
    recs = [ImageRecord(i, tmp_path / f"{i}.png", lab) for i, lab in enumerate([1, None, 0])]
    s = ImageSet(recs, class_names=["a", "b"])
    assert len(s) == 3 and s[1] is recs[1] and list(s) == recs
    sub = s[1:]
    assert isinstance(sub, ImageSet) and [r.image_id for r in sub] == [1, 2] and sub.class_names == ["a", "b"]
    frame = s.to_frame()
    assert str(frame["label"].dtype) == "Int64" and frame["label"].isna().tolist() == [False, True, False]
    assert frame["label_name"].tolist() == ["b", None, "a"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        recs[0].label = 5  # frozen


def test_embedded_sample():
    from importlib.resources import files

    csv_file = files("vitscope").joinpath("assets", "sample", "labels.csv")
    if not csv_file.is_file():
        pytest.skip("the embedded sample (vitscope/assets/sample/labels.csv) is not in this checkout yet")
    sample = embedded_sample()
    with open(str(csv_file), newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(sample) == len(rows) > 0
    assert sample.labels == [int(r["label"]) for r in rows]
    assert [sample.label_name(r.label) for r in sample] == [r["label_name"] for r in rows]
    assert load_images("sample", limit=2).records == sample.records[:2]
    assert load_images(None).records == sample.records
    img = open_image(sample[0].path)
    assert img.mode in ("RGB", "L")


def test_embedded_sample_reader(tmp_path, monkeypatch):
    """The sample reader on a stand-in folder with the shipped layout (path,label,label_name)."""
    import vitscope.data.sources as images_mod

    monkeypatch.setattr(images_mod, "_sample_dir", lambda: tmp_path)
    with pytest.raises(FileNotFoundError, match="embedded sample is missing"):
        embedded_sample()
    for i in range(3):
        save_png(tmp_path / "img" / f"{i}.png", rgb_array(seed=i))
    write_csv(
        tmp_path / "labels.csv",
        ["path", "label", "label_name"],
        [["img/0.png", 1, "Trouser"], ["img/1.png", 0, "T-shirt/top"], ["img/2.png", 1, "Trouser"]],
    )
    sample = embedded_sample()
    assert [p.name for p in sample.paths] == ["0.png", "1.png", "2.png"]
    assert sample.labels == [1, 0, 1] and sample.class_names == ["T-shirt/top", "Trouser"]
    assert sample.root == tmp_path.absolute()
    assert load_images("sample", limit=1).records == sample.records[:1]
    with pytest.raises(DataError, match="has its own labels"):
        load_images("sample", labels=[1, 2, 3])
    # Names for indices with gaps still name the labels, without inventing a full class list.
    write_csv(tmp_path / "labels.csv", ["path", "label", "label_name"], [["img/0.png", 9, "Ankle boot"]])
    sparse = embedded_sample()
    assert sparse.class_names is None and sparse.to_frame()["label_name"].tolist() == ["Ankle boot"]


def test_load_fashion_mnist_is_lazy(monkeypatch):
    import importlib

    monkeypatch.delitem(vdata.__dict__, "load_fashion_mnist", raising=False)
    monkeypatch.setitem(sys.modules, "vitscope.data.fashion_mnist", None)  # as if the module were absent
    importlib.reload(vdata)  # importing the package does not need it
    assert not hasattr(vdata, "load_fashion_mnist")
    assert "load_fashion_mnist" in dir(vdata)
    with pytest.raises(AttributeError):
        vdata.no_such_name  # noqa: B018
