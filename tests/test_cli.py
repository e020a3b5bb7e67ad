"""The command line: `analyze` killed and resumed, `report`, `serve` and `demo`, `train` on folders
and on Fashion-MNIST IDX files; each through the same entry points a user types."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_analyze import assert_runs_equal  # noqa: E402
from test_train import TINY_ARCH, write_folder, write_idx  # noqa: E402
from vitscope.data import fashion_mnist as fm  # noqa: E402
from vitscope.store import RunStore, UnfinishedRunError, open_run  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def patterns_module():
    from vitscope.analysis import patterns

    return patterns


# ----------------------------------------------------------------------------- analyze

def _cli(args: list[str]) -> list[str]:
    return [sys.executable, "-c", "from vitscope.cli import main; main()", *args]


@pytest.mark.slow
def test_cli_resumes_after_sigkill(tmp_path, patterns_module):
    """Kill `vitscope analyze` (SIGKILL) after its first chunk, run it again: equal to an uninterrupted run.

    The built-in Fashion-MNIST model on a copy of the embedded sample with one corrupt file added,
    one image per chunk (so the kill lands with most chunks still to do; the corrupt file makes
    chunk 0 a chunk without rows).
    """
    import shutil

    from vitscope.data.sources import _sample_dir
    from vitscope.models import BUILTIN_MODELS

    assert BUILTIN_MODELS["fmnist_vit_tiny"].weights_path.is_file(), "the built-in fmnist_vit_tiny weights are not installed"
    images = tmp_path / "sample"
    shutil.copytree(_sample_dir(), images)
    (images / "aaa_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")  # sorts first
    args = ["analyze", "--model", "fmnist_vit_tiny", "--images", str(images), "--limit", "10", "--batch-size", "1",
            "--boot", "100", "--clusters", "3", "--latent-dim", "4", "--ae-epochs", "5", "--ae-min-steps", "40",
            "--projection", "pca", "--device", "cpu", "--threads", "1", "--quiet"]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    ref = subprocess.run(_cli([*args, "--out", str(tmp_path / "ref")]), env=env, capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr

    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli([*args, "--out", str(out)]), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = RunStore(out).chunk_dir(0) / "chunk.json"
    deadline = time.monotonic() + 240
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "running"
    done = RunStore(out).done_chunks()
    assert 1 <= len(done) < 10, "the kill should land after the first chunk and before the last"
    with pytest.raises(UnfinishedRunError, match="rerun the same command"):
        open_run(out)

    loud = [a for a in args if a != "--quiet"]  # progress output says what the resumed run skipped
    again = subprocess.run(_cli([*loud, "--out", str(out)]), env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"resuming: {len(done)} of 10 chunks already done" in " ".join(again.stderr.split())
    resumed, reference = open_run(out), open_run(tmp_path / "ref")
    assert resumed.manifest["resumed"] == 1
    assert_runs_equal(resumed, reference)
    assert len(resumed.manifest["failures"]) == 1

    # a different command on the same folder is refused with a readable message (in-process CLI)
    from typer.testing import CliRunner

    from vitscope.cli import app

    changed = [*args[: args.index("--batch-size") + 1], "2", *args[args.index("--batch-size") + 2 :]]
    other = CliRunner().invoke(app, [*changed, "--out", str(out)])
    assert other.exit_code == 2
    text = " ".join(other.output.split())
    assert "different command" in text and "batch_size: 1 -> 2" in text and "--overwrite" in text


# ----------------------------------------------------------------------------- report, serve, demo
def test_report_cli(server_run, tmp_path):
    from typer.testing import CliRunner

    from vitscope.cli import app

    res = CliRunner().invoke(app, ["report", str(server_run.path), "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "r" / "index.html").is_file()
    bad = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert bad.exit_code == 2 and "not a vitscope run folder" in " ".join(bad.output.split())


def test_serve_refuses_a_busy_port_clearly(server_run):
    import socket

    from typer.testing import CliRunner

    from vitscope.cli import app as cli

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        res = CliRunner().invoke(cli, ["serve", str(server_run.path), "--port", str(port), "--no-model"])
    assert res.exit_code == 2, res.output
    out = " ".join(res.output.split())
    assert "already in use" in out and "--port" in out


def test_serve_refuses_a_folder_that_is_not_a_run(tmp_path):
    from typer.testing import CliRunner

    from vitscope.cli import app as cli

    res = CliRunner().invoke(cli, ["serve", str(tmp_path), "--no-model"])
    assert res.exit_code == 2 and "not a vitscope run folder" in " ".join(res.output.split())


def test_demo_serves_after_the_summary_unless_no_serve(server_run, monkeypatch):
    from typer.testing import CliRunner

    import vitscope.pipeline as run_module
    import vitscope.cli.serve as serve_module
    from vitscope.cli import app as cli

    calls: list[dict] = []
    monkeypatch.setattr(run_module, "analyze", lambda *a, **k: server_run)
    monkeypatch.setattr(serve_module, "serve_run", lambda run, console, **k: calls.append({"run": run, **k}))
    res = CliRunner().invoke(cli, ["demo", "--no-serve"])
    assert res.exit_code == 0, res.output
    assert "Most important heads" in res.output and not calls
    assert not (server_run.path / "report").exists()  # the static report is opt-in now
    res = CliRunner().invoke(cli, ["demo", "--port", "9123", "--host", "127.0.0.1"])
    assert res.exit_code == 0, res.output
    assert len(calls) == 1 and calls[0]["run"] is server_run and calls[0]["port"] == 9123 and calls[0]["host"] == "127.0.0.1"
    assert calls[0]["open_browser"] is False and calls[0]["vit"] is not None


# ----------------------------------------------------------------------------- train
FOLDER_ARGS = ["-a", "img_size=16", "-a", "patch_size=4", "-a", "embed_dim=16", "-a", "depth=2", "-a", "num_heads=2"]


def test_cli_trains_on_image_folder(tmp_path):
    from typer.testing import CliRunner

    import vitscope
    from vitscope.cli import app

    write_folder(tmp_path / "data" / "train", 40, seed=0)
    write_folder(tmp_path / "data" / "val", 10, seed=1)
    out = tmp_path / "run"
    args = ["train", "--arch", TINY_ARCH, "--dataset", str(tmp_path / "data"), "--out", str(out), "--epochs", "4",
            "--batch-size", "16", "--lr", "3e-3", "--warmup-epochs", "1", "--no-progress", *FOLDER_ARGS]  # fmt: skip
    # Without augmentation a 2-layer ViT separates the classes within these few steps; the augmentation
    # itself is checked against a direct crop-and-flip above.
    res = CliRunner().invoke(app, [*args, "--no-augment"])
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["classes"] == ["check", "h", "plain", "v"]  # sorted class folders
    assert metrics["epochs"][-1]["test_count"] == 40
    assert metrics["final_test_accuracy"] >= 0.8, metrics["epochs"]  # chance is 0.25
    vit = vitscope.load_model(str(out / f"{TINY_ARCH}.safetensors"), device="cpu")
    assert vit.preprocessing.input_size == (3, 16, 16)
    # load_model's preprocessing of the original (24x28) files gives the accuracy the loop measured.
    files = sorted((tmp_path / "data" / "val").rglob("*.png"))
    labels = torch.tensor([metrics["classes"].index(p.parent.name) for p in files])
    acc = float((vit.logits(vit.preprocess(files)).argmax(-1) == labels).float().mean())
    assert acc == pytest.approx(metrics["final_test_accuracy"])

    bad = CliRunner().invoke(app, ["train", "--dataset", str(tmp_path / "nope"), "--out", str(out)])
    assert bad.exit_code == 2 and "unknown data set" in bad.output
    bad = CliRunner().invoke(app, ["train", "--dataset", str(tmp_path / "data"), "--out", str(out), "-a", "depth"])
    assert bad.exit_code != 0 and "KEY=VALUE" in bad.output


def test_cli_fashion_mnist_from_idx_folder_resumes(tmp_path):
    """`--dataset fashion-mnist --data-root` reads IDX files; `--stop-after` then a plain re-run finishes the run."""
    from typer.testing import CliRunner

    from vitscope.cli import app

    rng = np.random.default_rng(0)
    (tmp_path / "idx").mkdir()
    for split, n in (("train", 64), ("t10k", 32)):
        write_idx(tmp_path / "idx" / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)), fm.IDX_IMAGES_MAGIC)
        write_idx(tmp_path / "idx" / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10, fm.IDX_LABELS_MAGIC)
    args = ["train", "--dataset", "fashion-mnist", "--data-root", str(tmp_path / "idx"), "--out", str(tmp_path / "run"),
            "--epochs", "2", "--batch-size", "32", "--no-progress", "-a", "depth=1", "-a", "embed_dim=16"]  # fmt: skip
    first = CliRunner().invoke(app, [*args, "--stop-after", "1"])
    assert first.exit_code == 0, first.output
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["complete"] is False
    second = CliRunner().invoke(app, [*args, "--progress"])
    assert second.exit_code == 0, second.output
    assert "resuming" in second.output and "epoch 2/2:" in second.output and "epoch 1/2:" not in second.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["complete"] and metrics["classes"] == fm.CLASSES and metrics["epochs"][-1]["test_count"] == 32
    assert metrics["model"] == {"arch": "fmnist_vit_tiny", "kwargs": {"depth": 1, "embed_dim": 16, "num_classes": 10}}
