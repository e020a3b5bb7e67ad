"""`analyze` under torchrun: 2 processes (gloo, CPU) give the same run as 1, and a job whose rank
dies mid-run is finished by a rerun with another process count."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_analyze import assert_runs_equal  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# 8 images in 4 chunks, taken by ranks 0 and 1 of a 2-process job as they become free; then they share
# the pattern catalogues (patch on rank 0, CLS on rank 1) and the curves (4 images in 4 groups).
ARGS = ["-m", "fmnist_vit_tiny", "-i", "sample", "-n", "8", "-b", "2", "--boot", "50", "--ae-epochs", "1",
        "--ae-min-steps", "10", "--clusters", "3", "--projection", "pca", "--curve-images", "4", "--threads", "1", "--quiet"]

# A rank of the job that SIGKILLs itself when it starts its second chunk (the job then stops).
DYING = r"""
import os, signal, sys
from vitscope.pipeline import chunks
original, calls = chunks.analyze_batch, [0]
def dying(*a, **k):
    calls[0] += 1
    if os.environ["RANK"] == "1" and calls[0] == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*a, **k)
chunks.analyze_batch = dying
from vitscope.cli import main
sys.argv = ["vitscope", *sys.argv[1:]]
main()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(n: int, out: Path, script: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), *script, "analyze", *ARGS, "-o", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def _single(out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vitscope", "analyze", *ARGS, "-o", str(out)], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same command in this process (one process, no torchrun)."""
    from vitscope.pipeline import AnalyzeSettings, analyze

    settings = AnalyzeSettings(batch_size=2, n_boot=50, ae_epochs=1, ae_min_steps=10, n_clusters=3, projection="pca", curve_images=4)
    return analyze("fmnist_vit_tiny", "sample", tmp_path_factory.mktemp("one") / "run", limit=8, settings=settings, progress=False, device="cpu")


def test_two_processes_give_the_same_run_as_one(reference, tmp_path):
    from vitscope.store import open_run

    done = _torchrun(2, tmp_path / "run", ["-m", "vitscope"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("wrote ") == 1, "only the first process reports"
    run = open_run(tmp_path / "run")
    assert_runs_equal(run, reference)
    # The curves' shares are added in batch order: the same table bit for bit, not only within 1e-6.
    pd.testing.assert_frame_equal(run.store.read_table("curves"), reference.store.read_table("curves"), check_exact=True)
    assert run.store.read_table("curves")["n_images"].eq(4).all()


def test_a_dead_rank_loses_only_its_chunk_and_a_rerun_with_one_process_finishes(reference, tmp_path):
    from vitscope.store import RunStore, UnfinishedRunError, open_run

    out = tmp_path / "run"
    script = tmp_path / "dying.py"
    script.write_text(DYING)
    died = _torchrun(2, out, [str(script)])
    assert died.returncode != 0, "the job should have failed when its rank died"
    with pytest.raises(UnfinishedRunError):
        open_run(out)
    done_chunks = RunStore(out).done_chunks()
    assert 1 <= len(done_chunks) < 4, done_chunks  # rank 1 finished its first chunk, not its second
    resumed = _single(out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run = open_run(out)
    assert run.manifest["resumed"] == 1
    assert_runs_equal(run, reference)


def test_two_nodes_give_the_same_run_as_one(reference, tmp_path):
    """Two torchrun launchers of one process each, as on two machines that share the run folder
    (torchrun's static rendezvous: --nnodes 2, --node-rank 0 and 1): both ranks are LOCAL_RANK 0,
    so nothing may take the local rank for the job's rank; the run equals the one-process run."""
    from vitscope.store import open_run

    port = _free_port()
    out = tmp_path / "run"

    def node(rank: int) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1",
               "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "vitscope", "analyze", *ARGS, "-o", str(out)]  # fmt: skip
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    nodes = [node(0), node(1)]
    results = [p.communicate(timeout=600) for p in nodes]
    for p, (_, err) in zip(nodes, results):
        assert p.returncode == 0, err[-3000:]
    assert sum(err.count("wrote ") for _, err in results) == 1, "only the job's first rank reports"
    assert_runs_equal(open_run(out), reference)
