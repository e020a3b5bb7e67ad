"""Reading a run and the command line's help stay light: they import no torch, timm or transformers.

(`import torch` alone takes seconds; a user reading a table or asking for --help should not wait
for it. The layers below the model — the store, the CLI's argument parsing — must not need it.)
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "timm", "transformers", "torchvision")


def _heavy_modules_after(code: str) -> list[str]:
    probe = code + f"\nimport sys, json\nprint(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_import_vitscope_is_light():
    assert _heavy_modules_after("import vitscope; vitscope.__version__") == []


@pytest.mark.parametrize("argv", [["--help"], ["analyze", "--help"], ["serve", "--help"], ["analyze", "--no-such-option"]])
def test_cli_help_and_argument_errors_are_light(argv):
    code = (
        "from vitscope.cli import app\n"
        "try:\n"
        f"    app({argv!r}, standalone_mode=True)\n"
        "except SystemExit:\n"
        "    pass\n"
    )
    assert _heavy_modules_after(code) == []


def test_reading_a_run_and_drawing_its_report_are_light(tmp_path):
    import vitscope
    from vitscope.pipeline import AnalyzeSettings

    settings = AnalyzeSettings(batch_size=4, n_boot=10, ae_epochs=1, ae_min_steps=5, n_clusters=2, projection="pca", curve_images=2, curve_points=2)
    run = vitscope.analyze("fmnist_vit_tiny", "sample", tmp_path / "run", limit=4, settings=settings, device="cpu", progress=False)
    code = (
        "import vitscope\n"
        f"run = vitscope.open_run({str(run.path)!r})\n"
        "assert len(run.heads) == 24 and len(run.images) == 4\n"
        "run.array('attention_mean')[0, 0]\n"
        "run.patterns['patch'].maps\n"
        "from vitscope.report import write_report\n"
        f"write_report(run, {str(tmp_path / 'report')!r})\n"
    )
    assert _heavy_modules_after(code) == []
    # and the names still resolve to the real objects
    assert vitscope.load_model.__module__.startswith("vitscope.models") and "analyze" in dir(vitscope)
