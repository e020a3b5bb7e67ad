"""One writer per run folder: a second command is refused, a dead holder frees the folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vitscope.store import RunLock, RunLockedError, RunStore
from vitscope.store.lock import LOCK_NAME, read_holder

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
