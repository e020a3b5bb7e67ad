"""Images inside containers: WebDataset tar shards and Hugging Face datasets on disk (Arrow, Parquet).

Every shard and dataset here is written by the test: tar files with the standard library, datasets
with the ``datasets`` package itself (``save_to_disk``, ``to_parquet``), so the readers are checked
against the real formats; pixels are compared with the same images decoded from plain files.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitscope.data import DataError, ImageError, iter_batches, load_images, open_image
from vitscope.data.containers import open_record, read_member


def _png(seed: int, size: int = 28, mode: str = "L") -> bytes:
    rng = np.random.default_rng(seed)
    shape = (size, size) if mode == "L" else (size, size, 3)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buf, "PNG")
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    with tarfile.open(path, "w") as tf:
        for key, members in samples:
            for ext, data in members.items():
                _add(tf, f"{key}.{ext}", data)
    return path


@pytest.fixture
def shards(tmp_path):
    """Two shards: six images with labels (.cls or .json), plus a sample without an image and a hidden file."""
    _shard(tmp_path / "train-000.tar", [
        ("s/000", {"png": _png(0), "cls": b"3"}),
        ("s/001", {"png": _png(1), "cls": b" 1\n"}),
        ("s/002", {"txt": b"caption only"}),  # no image: not part of the set
        ("s/003", {"png": _png(3), "json": json.dumps({"label": 0}).encode()}),
    ])  # fmt: skip
    b = _shard(tmp_path / "train-001.tar", [
        ("s/004", {"png": _png(4), "cls": b"2"}),
        ("s/005.x", {"png": _png(5), "cls": b"1"}),  # key "s/005", extension "x.png"? no: WebDataset splits at the first dot
        ("s/006", {"png": _png(6)}),  # no label
    ])  # fmt: skip
    with tarfile.open(b, "a") as tf:
        _add(tf, "s/.hidden.png", _png(9))
    return tmp_path


def test_webdataset_shards_list_in_order_with_labels_and_stable_members(shards):
    images = load_images(str(shards / "train-*.tar"))
    assert [(r.path.name, r.member, r.label) for r in images] == [
        ("train-000.tar", "s/000.png", 3),
        ("train-000.tar", "s/001.png", 1),
        ("train-000.tar", "s/003.png", 0),
        ("train-001.tar", "s/004.png", 2),
        ("train-001.tar", "s/006.png", None),
    ]
    # "s/005.x.png" has the extension "x.png" under WebDataset's first-dot rule: not an image member.
    assert [r.image_id for r in images] == list(range(5))
    assert images[0].location == f"{shards / 'train-000.tar'}::s/000.png"
    # The same set from a folder of shards, a list, and with a limit.
    assert [r.member for r in load_images(shards)] == [r.member for r in images]
    assert [r.member for r in load_images([shards / "train-001.tar"])] == ["s/004.png", "s/006.png"]
    assert len(load_images(str(shards / "train-*.tar"), limit=2)) == 2
    frame = images.to_frame()
    assert list(frame.columns) == ["image_id", "path", "member", "label", "label_name"]


def test_webdataset_pixels_equal_the_files(shards, tmp_path):
    images = load_images(str(shards / "train-*.tar"))
    seeds = [0, 1, 3, 4, 6]
    for rec, seed in zip(images, seeds):
        file = tmp_path / f"ref{seed}.png"
        file.write_bytes(_png(seed))
        assert read_member(rec.path, rec.member) == _png(seed)
        np.testing.assert_array_equal(np.asarray(open_record(rec)), np.asarray(open_image(file)))


def test_worker_processes_read_shards_like_the_main_process(shards):
    images = load_images(str(shards / "train-*.tar"))
    prep = lambda im: __import__("torch").from_numpy(np.asarray(im, dtype=np.float32).copy())  # noqa: E731
    one = [b for b in iter_batches(images, prep, batch_size=2)]
    two = [b for b in iter_batches(images, prep, batch_size=2, num_workers=2)]
    assert [b.image_ids for b in one] == [b.image_ids for b in two]
    for x, y in zip(one, two):
        assert (x.x == y.x).all() and (x.labels == y.labels).all()


def test_bad_members_are_skipped_with_their_location(tmp_path):
    shard = _shard(tmp_path / "bad.tar", [("a", {"png": _png(0), "cls": b"0"}), ("b", {"png": b"not a png", "cls": b"1"})])
    images = load_images(shard)
    with pytest.warns(UserWarning, match=r"bad\.tar::b\.png"):
        batches = list(iter_batches(images, lambda im: __import__("torch").zeros(1), batch_size=4))
    assert batches[0].image_ids == [0] and images.failures[0][0].endswith("bad.tar::b.png")
    with pytest.raises(ImageError, match="no such member"):
        read_member(shard, "c.png")


def test_container_errors_say_what_to_do(tmp_path):
    (tmp_path / "x.tar.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(DataError, match="decompress it to a plain .tar"):
        load_images(tmp_path / "x.tar.gz")
    shard = _shard(tmp_path / "ok.tar", [("a", {"png": _png(0), "cls": b"zero"})])
    with pytest.raises(DataError, match=r"ok\.tar::a\.cls.*class index"):
        load_images(shard)
    shard = _shard(tmp_path / "ok2.tar", [("a", {"png": _png(0), "cls": b"0"})])
    with pytest.raises(DataError, match="leave labels out"):
        load_images(shard, labels=[1])
    with pytest.raises(FileNotFoundError, match="no files match"):
        load_images(str(tmp_path / "none-*.tar"))
    (tmp_path / "notatar.tar").write_bytes(b"hello" * 200)
    with pytest.raises(DataError, match="not a readable"):
        load_images(tmp_path / "notatar.tar")


# --------------------------------------------------------------------------------------------------
# Hugging Face datasets on disk


@pytest.fixture
def hf_dataset(tmp_path):
    import datasets

    pictures = [Image.open(io.BytesIO(_png(i, mode="RGB"))) for i in range(6)]
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog", "eel"]), "note": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"img": pictures, "label": [2, 0, 1, 1, -1, 0], "note": list("abcdef")}, features=features)
    folder = tmp_path / "saved"
    ds.save_to_disk(str(folder), num_shards=2)
    parquet = tmp_path / "data.parquet"
    ds.to_parquet(str(parquet))
    dd = datasets.DatasetDict({"train": ds, "test": ds})
    dd.save_to_disk(str(tmp_path / "dict"))
    return tmp_path


def test_hf_save_to_disk_and_parquet_list_images_labels_and_names(hf_dataset):
    for source in (hf_dataset / "saved", hf_dataset / "data.parquet"):
        images = load_images(source)
        assert images.class_names == ["cat", "dog", "eel"], source
        assert [r.label for r in images] == [2, 0, 1, 1, None, 0]  # ClassLabel -1 = no label
        assert [r.image_id for r in images] == list(range(6))
        for i, rec in enumerate(images):
            np.testing.assert_array_equal(np.asarray(open_record(rec)), np.asarray(Image.open(io.BytesIO(_png(i, mode="RGB"))).convert("RGB")))
    saved = load_images(hf_dataset / "saved")
    assert len({r.path for r in saved}) == 2 and [r.member for r in saved] == ["0", "1", "2", "0", "1", "2"]
    with pytest.raises(DataError, match="DatasetDict with splits train, test.*dict/train"):
        load_images(hf_dataset / "dict")
    assert [r.label for r in load_images(hf_dataset / "dict" / "test")] == [2, 0, 1, 1, None, 0]


def test_analyze_runs_and_resumes_on_webdataset_shards(tmp_path):
    """The built-in model over grey 28x28 images in a shard: a run, its images table, and a resume."""
    import vitscope
    from vitscope.analysis.settings import AnalyzeSettings

    shard = _shard(tmp_path / "fm-000.tar", [(f"{i:03d}", {"png": _png(i), "cls": str(i % 10).encode()}) for i in range(6)])
    settings = AnalyzeSettings(batch_size=3, n_boot=20, ae_epochs=1, ae_min_steps=5, n_clusters=2, curve_images=4, curve_points=3, projection="pca")
    run = vitscope.analyze("fmnist_vit_tiny", str(shard), tmp_path / "run", settings=settings, progress=False)
    images = run.table("images")
    assert list(images["member"]) == [f"{i:03d}.png" for i in range(6)]
    assert list(images["label"]) == [i % 10 for i in range(6)]
    assert run.manifest["images"]["records"][2]["member"] == "002.png"
    again = vitscope.analyze("fmnist_vit_tiny", str(shard), tmp_path / "run", settings=settings, progress=False)
    assert again.manifest["fingerprint"] == run.manifest["fingerprint"]
    # The model's logits for a shard image equal those for the same image read from a file.
    vit = vitscope.load_model("fmnist_vit_tiny", device="cpu")
    file = tmp_path / "002.png"
    file.write_bytes(_png(2))
    from vitscope.data.containers import open_record as _open

    x_member = vit.preprocessing(_open(load_images(shard)[2]))
    x_file = vit.preprocessing(open_image(file))
    assert (x_member == x_file).all()


def test_server_serves_and_queries_images_inside_shards(tmp_path):
    """A run over a shard: the app's image is the shard member as the model sees it, and a live
    partial pruning of it equals the library's on the same image read from a file."""
    import io as _io

    from fastapi.testclient import TestClient

    import vitscope
    from vitscope.analysis.settings import AnalyzeSettings
    from vitscope.server.app import create_app
    from vitscope.server.data import model_view

    shard = _shard(tmp_path / "fm-000.tar", [(f"{i:03d}", {"png": _png(10 + i), "cls": str(i % 10).encode()}) for i in range(4)])
    settings = AnalyzeSettings(batch_size=4, n_boot=10, ae_epochs=1, ae_min_steps=4, n_clusters=2, curve_images=2, curve_points=3, projection="pca")
    run = vitscope.analyze("fmnist_vit_tiny", str(shard), tmp_path / "run", settings=settings, progress=False)
    vit = vitscope.load_model("fmnist_vit_tiny", device="cpu")
    client = TestClient(create_app(run.path, vit, warm=False))
    file = tmp_path / "002.png"
    file.write_bytes(_png(12))
    r = client.get("/api/image/2.png")
    assert r.status_code == 200
    want = model_view(vit.preprocessing, file)
    np.testing.assert_array_equal(np.asarray(Image.open(_io.BytesIO(r.content))), np.asarray(want))
    got = client.get("/api/live/partial_pruning/2/3/1").json()
    ref = vitscope.partial_pruning(vit, file, 3, 1, label=2)
    np.testing.assert_allclose([m["label_prob"] for m in got["modes"]], ref["label_prob"], atol=1e-6)
