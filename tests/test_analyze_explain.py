"""`vitscope analyze --explain`: every image's explanation maps stored in the run (equal to
`explain_all` on the image alone), settings that refuse unknown methods, and the report's grid."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_analyze import _make_images, _save_tiny_model, _tiny_settings  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = ("rollout", "relevance", "attention", "interaction")


@pytest.fixture(scope="module")
def explained(tmp_path_factory):
    from vitscope.pipeline import analyze

    root = tmp_path_factory.mktemp("explain")
    model = _save_tiny_model(root / "tiny.safetensors")
    images = _make_images(root / "images", 6, corrupt=True)
    run = analyze(str(model), images, root / "run", settings=_tiny_settings(explain=METHODS), progress=False, device="cpu")
    return run, model


def test_stored_maps_equal_each_image_explained_alone(explained):
    import vitscope
    from vitscope.analysis.explain import explain_all

    run, model = explained
    vit = vitscope.load_model(str(model), device="cpu")
    images = run.images
    assert sorted(n for n in run.arrays() if n.startswith("explain/")) == sorted(f"explain/{m}" for m in METHODS)
    for row, (path, target) in enumerate(zip(images["path"], images["target"])):
        alone = explain_all(vit, vit.preprocess([path]), list(METHODS), target=torch.tensor([int(target)]))
        for m in METHODS:
            stored = np.asarray(run.array(f"explain/{m}")[row])
            assert stored.shape == tuple(vit.layout.grid)
            np.testing.assert_allclose(stored, alone[m][0].numpy(), rtol=1e-5, atol=1e-6, err_msg=f"{m}, image {path}")
    assert run.manifest["settings"]["explain"] == list(METHODS)


def test_settings_refuse_unknown_methods_and_keep_old_fingerprints():
    from vitscope.analysis.settings import AnalyzeSettings

    with pytest.raises(ValueError, match=r"unknown explanation method\(s\) \['gradcam'\]"):
        AnalyzeSettings(explain=("rollout", "gradcam")).validate()
    with pytest.raises(ValueError, match="tuple of method names"):
        AnalyzeSettings(explain="rollout").validate()  # type: ignore[arg-type]
    assert "explain" not in AnalyzeSettings().to_dict()  # runs made without explanations resume as before


def test_report_draws_the_explanation_grid(explained, tmp_path):
    from vitscope.report import figure_plan, write_report

    run, _ = explained
    entry = next(e for e in figure_plan(run) if e.stem == "explanations")
    fig = entry.draw()
    panels = [ax for ax in fig.get_axes() if ax.get_label() != "<colorbar>"]
    assert len(panels) == len(run.images) * len(METHODS)
    index = write_report(run, tmp_path / "rep")
    assert (index.parent / "explanations.png").is_file() and 'src="explanations.png"' in index.read_text()


def test_cli_explain_option(tmp_path):
    from typer.testing import CliRunner

    from vitscope.cli import app

    res = CliRunner().invoke(app, ["analyze", "-m", "fmnist_vit_tiny", "-i", "sample", "-o", str(tmp_path / "r"), "--explain", "rollout,gradcam"])
    assert res.exit_code == 2 and "gradcam" in res.output
