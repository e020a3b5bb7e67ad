"""The run store: atomic tables, chunks and arrays, leftovers, `open_run`'s errors, the fingerprint,
and the one-writer lock (a second command is refused, a dead holder frees the folder)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from test_analyze import _table_equal
from vitscope.store import NotARunError, RunLock, RunLockedError, RunStore, UnfinishedRunError, open_run
from vitscope.store import files as store_files
from vitscope.store.lock import LOCK_NAME, read_holder
from vitscope.store.manifest import describe_mismatch, fingerprint

# ----------------------------------------------------------------------------- tables, chunks, arrays


def test_table_write_is_atomic_and_round_trips(tmp_path):
    store = RunStore(tmp_path)
    df = pd.DataFrame({"image_id": [1, 2], "x": [0.5, np.nan], "prof": [np.arange(3.0), np.ones(3)], "name": ["a", None]})
    store.write_table("images", df)
    back = store.read_table("images")
    _table_equal(df, back, "images")
    assert pd.isna(back["name"].iloc[1])
    bad = pd.DataFrame({"x": [object()]})
    with pytest.raises(pa.ArrowInvalid):
        store.write_table("images", bad)
    _table_equal(df, store.read_table("images"), "images")  # the old file is untouched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(store_files.TMP_PREFIX)]


def test_chunk_appears_whole_or_not_at_all(tmp_path):
    store = RunStore(tmp_path)
    t = pd.DataFrame({"image_id": [0, 1]})
    with pytest.raises(ValueError, match="Zarr data type"):
        store.write_chunk(0, tables={"images": t}, arrays={"a": np.array([object()])}, meta={"chunk": 0})
    assert not store.chunk_done(0) and store.done_chunks() == []
    assert not list(store.chunks_path.iterdir())  # no temporary folder left behind
    store.write_chunk(0, tables={"images": t}, arrays={"pattern_inputs/patch": np.ones((2, 3))}, meta={"chunk": 0, "failures": []})
    assert store.done_chunks() == [0]
    np.testing.assert_array_equal(store.read_chunk_array(0, "pattern_inputs/patch"), np.ones((2, 3)))
    assert store.read_chunk_meta(0)["chunk"] == 0
    pd.testing.assert_frame_equal(store.read_chunk_table(0, "images"), t)


def test_arrays_are_plain_zarr_groups(tmp_path):
    import zarr

    store = RunStore(tmp_path)
    data = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    store.write_array("patterns/patch/codes", data, chunks=(1, 3, 4), attrs={"dims": ["a", "b", "c"]})
    store.write_array("overview", np.zeros((2, 2)))
    g = zarr.open_group(str(tmp_path / "arrays.zarr"), mode="r")  # readable without vitscope
    np.testing.assert_array_equal(g["patterns/patch/codes"][...], data)
    assert g["patterns/patch/codes"].attrs["dims"] == ["a", "b", "c"]
    assert store.array_names() == ["overview", "patterns/patch/codes"]
    with pytest.raises(KeyError, match="overview"):
        store.array("patterns/cls/codes")
    with pytest.raises(ValueError, match="invalid array name"):
        store.write_array("../escape", data)


def test_leftovers_of_a_killed_writer_are_removed(tmp_path):
    store = RunStore(tmp_path)
    (tmp_path / "chunks").mkdir()
    (tmp_path / "chunks" / f"{store_files.TMP_PREFIX}abc-00001").mkdir()
    (tmp_path / f"{store_files.TMP_PREFIX}x-heads.parquet").write_bytes(b"partial")
    store.remove_leftovers()
    assert not list((tmp_path / "chunks").iterdir())
    assert not list(tmp_path.glob(f"{store_files.TMP_PREFIX}*"))


def test_open_run_says_what_is_wrong(tmp_path):
    with pytest.raises(NotARunError, match="does not exist"):
        open_run(tmp_path / "nope")
    with pytest.raises(NotARunError, match="no manifest.json"):
        open_run(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "something-else"}')
    with pytest.raises(NotARunError, match="not a vitscope run manifest"):
        open_run(tmp_path)
    m = {"format": "vitscope-run", "format_version": 1, "status": "running", "chunks": {"count": 5},
         "command": "vitscope analyze --model m --images d --out r"}
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UnfinishedRunError, match=r"0 of 5 image chunks done.*vitscope analyze --model m"):
        open_run(tmp_path)


def test_fingerprint_names_the_difference():
    base = {"model": {"spec": "m", "weights_sha256": "ab"}, "images": [[0, "a.png", 1, 10]], "settings": {"batch_size": 32}}
    fp, parts = fingerprint(base)
    assert fingerprint(dict(base))[0] == fp
    other = {**base, "settings": {"batch_size": 16}}
    fp2, parts2 = fingerprint(other)
    assert fp2 != fp and parts2["model"] == parts["model"] and parts2["settings"] != parts["settings"]
    msg = describe_mismatch({"fingerprint_parts": parts, "settings": base["settings"]}, {"fingerprint_parts": parts2, "settings": other["settings"]})
    assert msg == "settings: batch_size: 32 -> 16"



# ----------------------------------------------------------------------------- the lock
pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ["--limit", "24", "--batch-size", "4", "--boot", "50", "--ae-epochs", "1", "--ae-min-steps", "20",
        "--clusters", "3", "--projection", "pca", "--curve-images", "4", "--threads", "1", "--quiet"]


def _settings():
    from vitscope.pipeline import AnalyzeSettings

    return AnalyzeSettings(batch_size=4, n_boot=50, ae_epochs=1, ae_min_steps=20, n_clusters=3, projection="pca", curve_images=4)


def _wait_for_holder(folder: Path, pid: int, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while read_holder(folder).get("pid") != pid:
        if proc.poll() is not None:
            raise AssertionError(f"the holder exited early: {proc.stderr.read() if proc.stderr else ''}")
        if time.monotonic() > deadline:
            raise AssertionError("the holder never took the lock")
        time.sleep(0.05)


def _hold_lock_in_child(folder: Path) -> subprocess.Popen:
    code = (
        "import sys, time\n"
        "from vitscope.store import RunLock\n"
        "lock = RunLock(sys.argv[1], command='holder').acquire()\n"
        "time.sleep(600)\n"
    )
    return subprocess.Popen([sys.executable, "-c", code, str(folder)], stderr=subprocess.PIPE, text=True)


def test_second_analyze_is_refused_and_the_first_finishes_intact(tmp_path):
    from vitscope.pipeline import analyze

    out = tmp_path / "run"
    first = subprocess.Popen([str(Path(sys.executable).with_name("vitscope")), "analyze", "--model", "fmnist_vit_tiny", "--images", "sample", "--out", str(out), *FAST],
                             stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        _wait_for_holder(out, first.pid, first)
        with pytest.raises(RunLockedError) as err:
            analyze("fmnist_vit_tiny", "sample", out, limit=24, settings=_settings(), progress=False, device="cpu")
        message = str(err.value)
        assert f"process {first.pid}" in message and "vitscope" in message and "--out" in message
        _, stderr = first.communicate(timeout=300)
        assert first.returncode == 0, stderr
    finally:
        if first.poll() is None:
            first.kill()
    from vitscope import open_run

    run = open_run(out)
    assert len(run.images) == 24 and run.manifest["status"] == "complete"
    # the folder is free again once the holder has exited
    with RunLock(out) as lock:
        assert lock.held


def test_a_killed_holder_releases_the_lock(tmp_path):
    folder = tmp_path / "run"
    child = _hold_lock_in_child(folder)
    try:
        _wait_for_holder(folder, child.pid, child)
        with pytest.raises(RunLockedError, match=f"process {child.pid} .*holder"):
            RunLock(folder).acquire()
        os.kill(child.pid, signal.SIGKILL)  # no clean-up code runs: the OS must release the lock
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    with RunLock(folder, command="me") as lock:
        assert lock.held and read_holder(folder)["pid"] == os.getpid() and read_holder(folder)["command"] == "me"
    assert not lock.held


def test_lock_file_alone_counts_as_an_empty_folder(tmp_path):
    folder = tmp_path / "run"
    with RunLock(folder):
        assert (folder / LOCK_NAME).exists()
        assert RunStore(folder).is_empty()
    (folder / "other.txt").write_text("x")
    assert not RunStore(folder).is_empty()
