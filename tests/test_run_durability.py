"""A run survives being killed anywhere and damaged by hand: resuming ends with the same results.

- SIGKILL at seeded random points of the writes (before or after any atomic publication: a
  chunk's files written but the chunk not yet published, a table half-way through the final steps,
  the manifest), several times in a row on one folder, then a resume: every table and array equals
  an uninterrupted run's.
- A finished chunk with a truncated, deleted or altered file is found on resume (its size/SHA-256
  list in ``chunk.json``), analysed again and reported; the results equal the uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from test_analyze import assert_runs_equal
from vitscope.store import DamagedChunkWarning, RunStore, UnfinishedRunError, open_run

pytestmark = pytest.mark.usefixtures("one_thread")

LIMIT = 16
SETTINGS = dict(batch_size=4, n_boot=50, ae_epochs=1, ae_min_steps=20, n_clusters=3, projection="pca",
                curve_images=4, curve_points=2, interactions=True)

# The child analyses like the test does, but dies by SIGKILL (no clean-up of any kind) at the
# `kill_at`-th atomic publication, just before it ("before") or just after it ("after").
CHILD = r"""
import json, os, signal, sys
import torch
torch.set_num_threads(1)
from vitscope.store import files
from vitscope.pipeline import AnalyzeSettings, analyze

out, kill_at, when, settings = sys.argv[1], int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
calls = [0]
publish = files.publish

def dying_publish(tmp, final):
    calls[0] += 1
    if calls[0] == kill_at and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    publish(tmp, final)
    if calls[0] == kill_at and when == "after":
        os.kill(os.getpid(), signal.SIGKILL)

from vitscope.core import atomic
files.publish = atomic.publish = dying_publish  # every writer publishes through one of these names
analyze("fmnist_vit_tiny", "sample", out, limit=%d, settings=AnalyzeSettings(**settings), progress=False, device="cpu")
print("publications", calls[0])
""" % LIMIT


def _analyze(out: Path):
    from vitscope.pipeline import AnalyzeSettings, analyze

    return analyze("fmnist_vit_tiny", "sample", out, limit=LIMIT, settings=AnalyzeSettings(**SETTINGS), progress=False, device="cpu")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _analyze(tmp_path_factory.mktemp("reference") / "run")


def _child(out: Path, kill_at: int, when: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD, str(out), str(kill_at), when, json.dumps(SETTINGS)],
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def publications(tmp_path_factory) -> int:
    """How many atomic publications an uninterrupted run makes (so kill points cover all of them)."""
    done = _child(tmp_path_factory.mktemp("count") / "run", 0, "never")
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1])


def test_killed_at_random_points_then_resumed_equals_the_uninterrupted_run(tmp_path, reference, publications):
    # One seeded sequence of kills (set VITSCOPE_KILL_SEED to try others); the kill points of
    # different seeds cover different publications, and every one of them must resume exactly.
    seed = int(os.environ.get("VITSCOPE_KILL_SEED", "0"))
    rng = np.random.default_rng(seed)
    out = tmp_path / "run"
    kills = 0
    for attempt in range(5):
        # the first kill anywhere (late points included: final steps, manifest); later ones early in
        # what a resumed invocation still has to write, so that most of them land
        kill_at = int(rng.integers(1, (publications if attempt == 0 else max(2, publications // 4)) + 1))
        when = str(rng.choice(["before", "after"]))
        done = _child(out, kill_at, when)
        if done.returncode == 0:
            break  # the kill point lay beyond what this (resumed) invocation still had to write
        assert done.returncode == -signal.SIGKILL, f"the child failed instead of being killed: {done.stderr[-2000:]}"
        kills += 1
        if (out / "manifest.json").is_file():
            with pytest.raises(UnfinishedRunError):
                open_run(out)
    assert kills >= 3, f"only {kills} of the kills landed"
    resumed = _analyze(out)
    print(f"seed {seed}: {kills} SIGKILLs survived out of {publications} publication points; the resumed run equals the uninterrupted one")
    assert_runs_equal(resumed, reference)
    assert not list(out.rglob(".tmp-*")), "temporary files were left behind"


def test_killed_between_a_chunks_files_and_its_publication(tmp_path, reference):
    """Kill exactly when chunk 1's folder is complete under its temporary name: it must not count."""
    code = CHILD.replace("if calls[0] == kill_at and when == \"before\":", "if when == 'chunk' and final.name == '00001' and final.parent.name == 'chunks':")
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-c", code, str(out), "0", "chunk", json.dumps(SETTINGS)], capture_output=True, text=True, timeout=600)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    store = RunStore(out)
    assert store.done_chunks() == [0]
    assert [p.name for p in (out / "chunks").iterdir() if p.name.startswith(".tmp-")], "the unpublished chunk should be a temporary folder"
    resumed = _analyze(out)
    assert_runs_equal(resumed, reference)


def _stop_before_final_steps(out: Path, monkeypatch) -> None:
    from vitscope.pipeline import steps as steps_mod

    def stop(ctx, prog):
        raise KeyboardInterrupt("stopped after the chunks")

    with monkeypatch.context() as m:
        m.setattr(steps_mod, "finish", stop)
        with pytest.raises(KeyboardInterrupt):
            _analyze(out)


def test_damaged_chunks_are_found_redone_and_reported(tmp_path, reference, monkeypatch):
    out = tmp_path / "run"
    _stop_before_final_steps(out, monkeypatch)
    store = RunStore(out)
    assert store.done_chunks() == [0, 1, 2, 3]
    assert all(store.verify_chunk(i) is None for i in range(4))
    # chunk 0: a table truncated to half its size
    table = store.chunk_dir(0) / "images.parquet"
    table.write_bytes(table.read_bytes()[: table.stat().st_size // 2])
    # chunk 1: one zarr chunk file of an array deleted (zarr would read it back as zeros)
    array_files = sorted(p for p in (store.chunk_dir(1) / "arrays.zarr" / "attention_sum").rglob("*") if p.is_file() and p.name != "zarr.json")
    array_files[0].unlink()
    # chunk 2: one byte of the interaction statistics changed, size kept
    state = store.chunk_dir(2) / "interaction_state.npz"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    assert "images.parquet is" in store.verify_chunk(0) and "bytes, expected" in store.verify_chunk(0)
    assert "is missing" in store.verify_chunk(1)
    assert "interaction_state.npz does not match its checksum" in store.verify_chunk(2)
    assert store.verify_chunk(3) is None

    from vitscope.pipeline import chunks as chunks_mod

    batches = {"n": 0}
    original = chunks_mod.analyze_batch

    def counting(*a, **k):
        batches["n"] += 1
        return original(*a, **k)

    monkeypatch.setattr(chunks_mod, "analyze_batch", counting)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = _analyze(out)
    said = [str(w.message) for w in caught if issubclass(w.category, DamagedChunkWarning)]
    assert len(said) == 3 and all("analysing it again" in m for m in said)
    assert batches["n"] == 3  # one batch per redone chunk, chunk 3 kept
    assert [r["chunk"] for r in resumed.manifest["redone_chunks"]] == [0, 1, 2]
    assert_runs_equal(resumed, reference)


def test_a_chunk_without_its_checksum_list_is_redone(tmp_path, reference, monkeypatch):
    out = tmp_path / "run"
    _stop_before_final_steps(out, monkeypatch)
    store = RunStore(out)
    meta_path = store.chunk_dir(3) / "chunk.json"
    meta = json.loads(meta_path.read_text())
    del meta["files"]
    meta_path.write_text(json.dumps(meta))
    assert "no list of files" in store.verify_chunk(3)
    with pytest.warns(DamagedChunkWarning, match="chunk 3"):
        resumed = _analyze(out)
    assert_runs_equal(resumed, reference)


def test_fsync_tree_and_publish_reach_every_file_and_folder(tmp_path, monkeypatch):
    """Durability by construction: every file and folder of a published chunk was fsynced."""

    synced: list[str] = []
    real = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    store = RunStore(tmp_path / "run")
    import pandas as pd

    store.write_chunk(0, tables={"images": pd.DataFrame({"a": [1, 2]})}, arrays={"x/y": np.ones((3, 2))}, meta={"chunk": 0})
    final = store.chunk_dir(0)
    # files are fsynced under their temporary names (".tmp-<12 hex>-<name>"), before the rename
    names = {re.sub(r"^\.tmp-[0-9a-f]{12}-", "", Path(p).name) for p in synced}
    for p in final.rglob("*"):
        assert p.name in names, f"{p.relative_to(final)} was never fsynced"
    assert "chunks" in names, "the folder the chunk was renamed into was not fsynced"
    listed = json.loads((final / "chunk.json").read_text())["files"]
    assert set(listed) == {p.relative_to(final).as_posix() for p in final.rglob("*") if p.is_file() and p.name != "chunk.json"}
    assert store.verify_chunk(0) is None
