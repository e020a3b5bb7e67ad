"""Faithfulness scores and the cascading-randomisation sanity check.

- `analyze --explain ... --explain-faithfulness` stores one row per (image, method) whose AUCs equal
  a naive recomputation written here: every perturbed image built one at a time with explicit
  per-patch loops (tokens dropped by index, pixels filled patch by patch, the blur by
  scipy.ndimage), one forward each, the areas summed by hand;
- an interrupted run resumes to the same table, scoring only what was not scored;
- randomising a tiny random model's blocks changes the gradient maps and never the user's model.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_analyze import _make_images, _save_tiny_model, _tiny_settings  # noqa: E402
from interruption import interrupt_at_call  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = ("rollout", "relevance", "random")
N_IMAGES = 6  # plus one unreadable file; batches of 4 -> two scoring batches


def _analyze(root: Path, out: Path, **kw):
    from vitscope.pipeline import analyze

    settings = _tiny_settings(explain=METHODS, explain_faithfulness=True, **kw)
    return analyze(str(root / "tiny.safetensors"), root / "images", out, settings=settings, progress=False, device="cpu")


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    root = tmp_path_factory.mktemp("faith")
    _save_tiny_model(root / "tiny.safetensors")
    _make_images(root / "images", N_IMAGES, corrupt=True)
    return _analyze(root, root / "run"), root


# --------------------------------------------------------------------------- the naive reference
def _trapezoid(y: list[float], dx: float) -> float:
    return sum((y[i] + y[i + 1]) / 2 * dx for i in range(len(y) - 1))


def _blur(x: np.ndarray) -> np.ndarray:
    """11-tap Gaussian, sigma 5, reflect padding (scipy's 'mirror'), rows then columns."""
    from scipy.ndimage import gaussian_filter1d

    y = gaussian_filter1d(x.astype(np.float64), 5.0, axis=-1, mode="mirror", truncate=1.0)
    return gaussian_filter1d(y, 5.0, axis=-2, mode="mirror", truncate=1.0).astype(np.float32)


def naive_aucs(vit, x: torch.Tensor, m: np.ndarray, target: int) -> dict[str, float]:
    """Every AUC of one image (``x`` (1, C, H, W)) and one map, one perturbed image at a time."""
    lay = vit.layout
    rows, cols = lay.grid
    ph, pw = lay.patch_size
    P = rows * cols
    flat = m.reshape(-1)
    order = sorted(range(P), key=lambda j: (-flat[j], j))  # most relevant first, ties by patch index

    def prob_correct(logits: torch.Tensor) -> tuple[float, float]:
        p = logits.softmax(-1)[0]
        return float(p[target]), float(int(p.argmax()) == target)

    def on_tokens(keep: list[int]) -> tuple[float, float]:
        with torch.no_grad():
            h = vit.embed(x)
            seq = torch.cat([h[:, : lay.num_prefix], h[:, [lay.num_prefix + j for j in keep]]], dim=1)
            return prob_correct(vit.readout(vit.run_blocks(seq)))

    img = x[0].numpy()
    mean = img.mean(axis=(1, 2), keepdims=True) * np.ones_like(img)
    blurred = _blur(img)

    def paste(base: np.ndarray, src: np.ndarray, patches: list[int]) -> tuple[float, float]:
        out = base.copy()
        for j in patches:
            r, c = divmod(j, cols)
            out[:, r * ph : (r + 1) * ph, c * pw : (c + 1) * pw] = src[:, r * ph : (r + 1) * ph, c * pw : (c + 1) * pw]
        with torch.no_grad():
            return prob_correct(vit.logits(torch.from_numpy(out)[None]))

    curves: dict[str, list[float]] = {k: [] for k in ("tp", "ta", "np", "na", "pp", "pa", "qp", "qa", "ins", "del")}
    for k in range(11):
        n = P * k // 10
        if k < 10:
            for key, res in (("t", on_tokens(order[n:])), ("n", on_tokens(order[: P - n])),
                             ("p", paste(img, mean, order[:n])), ("q", paste(img, mean, order[P - n :]))):
                curves[key + "p"].append(res[0])
                curves[key + "a"].append(res[1])
        curves["ins"].append(paste(blurred, img, order[:n])[0])
        curves["del"].append(paste(img, mean, order[:n])[0])
    x100 = lambda c: 100 * _trapezoid(c, 0.1)  # noqa: E731
    return {
        "tokens_pos_prob": x100(curves["tp"]), "tokens_pos_acc": x100(curves["ta"]),
        "tokens_neg_prob": x100(curves["np"]), "tokens_neg_acc": x100(curves["na"]),
        "pixels_pos_prob": x100(curves["pp"]), "pixels_pos_acc": x100(curves["pa"]),
        "pixels_neg_prob": x100(curves["qp"]), "pixels_neg_acc": x100(curves["qa"]),
        "insertion": _trapezoid(curves["ins"], 0.1), "deletion": _trapezoid(curves["del"], 0.1),
    }


# --------------------------------------------------------------------------- the run's table
def test_run_table_equals_naive_recomputation(scored):
    import vitscope
    from vitscope.analysis.faithfulness import METRICS

    run, root = scored
    vit = vitscope.load_model(str(root / "tiny.safetensors"), device="cpu")
    table = run.table("explain_faithfulness")
    images = run.images
    assert list(table.columns) == ["image_id", "method", *METRICS]
    assert len(table) == len(images) * len(METHODS) == N_IMAGES * len(METHODS)
    assert list(table["method"][: len(METHODS)]) == list(METHODS)
    assert table[list(METRICS)].notna().all().all()
    checked = 0
    for row, (image_id, path, target) in enumerate(zip(images["image_id"], images["path"], images["target"])):
        x = vit.preprocess([path])
        for method in METHODS:
            got = table[(table["image_id"] == image_id) & (table["method"] == method)]
            assert len(got) == 1
            want = naive_aucs(vit, x, np.asarray(run.array(f"explain/{method}")[row]), int(target))
            for k, v in want.items():
                tol = 1e-6 if k in ("insertion", "deletion") else 1e-4
                assert abs(float(got[k].iloc[0]) - v) <= tol, f"{k} of {method}, image {image_id}: {float(got[k].iloc[0])} vs {v}"
                checked += 1
    assert checked == N_IMAGES * len(METHODS) * len(METRICS)
    # the scores are about real differences between methods, not constants
    assert table.groupby("method")["pixels_pos_prob"].mean().std() > 0


@pytest.mark.parametrize("stage", ["scoring", "overview"])
def test_interrupted_run_resumes_to_the_same_table(stage, scored, tmp_path, monkeypatch):
    from vitscope.analysis import faithfulness, patterns
    from vitscope.store import RunStore, UnfinishedRunError, open_run

    run, root = scored
    module, name, when = {"scoring": (faithfulness, "faithfulness_aucs", 2), "overview": (patterns, "image_overview", 1)}[stage]
    original = getattr(module, name)
    interrupt_at_call(monkeypatch, module, name, when)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        _analyze(root, out)
    with pytest.raises(UnfinishedRunError):
        open_run(out)
    store = RunStore(out)
    assert store.has_table("explain_faithfulness") == (stage == "overview")
    monkeypatch.setattr(module, name, original)
    scorings = {"n": 0}
    original_curves = faithfulness.perturbation_curves

    def counting(*a, **k):
        scorings["n"] += 1
        return original_curves(*a, **k)

    monkeypatch.setattr(faithfulness, "perturbation_curves", counting)
    resumed = _analyze(root, out)
    assert resumed.manifest["resumed"] == 1
    # the first batch's scores were kept: only the second is scored again (none after the table exists)
    assert scorings["n"] == (1 if stage == "scoring" else 0)
    pd.testing.assert_frame_equal(resumed.table("explain_faithfulness"), run.table("explain_faithfulness"))


def test_settings_and_fingerprint(scored, tmp_path):
    from vitscope.analysis.settings import AnalyzeSettings
    from vitscope.store import RunMismatchError

    with pytest.raises(ValueError, match="pass --explain METHODS"):
        AnalyzeSettings(explain_faithfulness=True).validate()
    with pytest.raises(ValueError, match="explain_faithfulness must be True or False"):
        AnalyzeSettings(explain=("rollout",), explain_faithfulness=1).validate()  # type: ignore[arg-type]
    assert "explain_faithfulness" not in AnalyzeSettings(explain=("rollout",)).to_dict()  # old runs resume as before
    run, root = scored
    assert run.manifest["settings"]["explain_faithfulness"] is True
    from vitscope.pipeline import analyze

    with pytest.raises(RunMismatchError, match="explain_faithfulness"):
        analyze(str(root / "tiny.safetensors"), root / "images", run.path, settings=_tiny_settings(explain=METHODS),
                progress=False, device="cpu")


def test_report_draws_the_faithfulness_figure(scored):
    from vitscope.report import figure_plan

    run, _ = scored
    entry = next(e for e in figure_plan(run) if e.stem == "explain_faithfulness")
    fig = entry.draw()
    bars = [p for ax in fig.get_axes() for p in ax.patches]
    assert len(bars) == len(METHODS) * 10  # every method, every measure


def test_cli_option(tmp_path):
    from typer.testing import CliRunner

    from vitscope.cli import app

    import typer

    params = {o: p for p in typer.main.get_command(app).commands["analyze"].params for o in (*p.opts, *p.secondary_opts)}
    option = params["--explain-faithfulness"]
    assert "--no-explain-faithfulness" in option.secondary_opts and option.default is False
    assert "needs --explain" in option.help and "forwards per image" in option.help
    res = CliRunner().invoke(app, ["analyze", "-m", "fmnist_vit_tiny", "-i", "sample", "-o", str(tmp_path / "r"),
                                   "--explain-faithfulness"])
    assert res.exit_code == 2 and "--explain" in res.output


# --------------------------------------------------------------------------- the library functions
def test_library_forms_and_errors(random_vit):
    from vitscope.analysis.explain import explain_all
    from vitscope.analysis.faithfulness import FORM_METRICS, METRICS, curve_auc, faithfulness_aucs, faithfulness_table

    torch.manual_seed(1)
    x = torch.randn(3, 3, 32, 32)
    maps = explain_all(random_vit, x, ["rollout", "random"])
    target = random_vit.logits(x).argmax(-1)
    both = faithfulness_aucs(random_vit, x, maps, target)
    pixels = faithfulness_aucs(random_vit, x, maps, target, forms=("pixels",))
    assert set(pixels["rollout"]) == set(FORM_METRICS["pixels"]) and set(both["rollout"]) == set(METRICS)
    for k in FORM_METRICS["pixels"]:
        np.testing.assert_allclose(pixels["rollout"][k], both["rollout"][k], rtol=0, atol=1e-12)
    table = faithfulness_table([7, 8, 9], pixels)
    assert list(table["image_id"]) == [7, 7, 8, 8, 9, 9] and table["tokens_pos_acc"].isna().all()
    np.testing.assert_allclose(curve_auc(np.ones((2, 10)), "tokens_pos_prob"), [90.0, 90.0])
    np.testing.assert_allclose(curve_auc(np.ones((2, 11)), "insertion"), [1.0, 1.0])
    with pytest.raises(ValueError, match="forms must be one or both of tokens, pixels"):
        faithfulness_aucs(random_vit, x, maps, target, forms=("blur",))
    with pytest.raises(ValueError, match="map 'rollout' has shape"):
        faithfulness_aucs(random_vit, x, {"rollout": maps["rollout"][:2]}, target)
    with pytest.raises(ValueError, match="target .* are not class indices"):
        faithfulness_aucs(random_vit, x, maps, torch.tensor([0, 1, 9]))
    with pytest.raises(ValueError, match="unknown faithfulness metric"):
        curve_auc(np.ones((1, 10)), "accuracy")


# --------------------------------------------------------------------------- cascading randomisation
def test_randomisation_changes_gradient_maps_and_never_the_model(random_vit):
    from vitscope.analysis.explain import explain_all
    from vitscope.analysis.faithfulness import randomisation_check, randomisation_summary

    torch.manual_seed(2)
    x = torch.randn(4, 3, 32, 32)
    sha = random_vit.state_sha256()
    before = explain_all(random_vit, x)
    methods = ["attention", "rollout", "grad_rollout", "relevance", "interaction", "random"]
    table = randomisation_check(random_vit, x, methods)
    L = random_vit.num_layers
    assert random_vit.state_sha256() == sha, "the check must not change the user's model"
    after = explain_all(random_vit, x)
    for m in before:  # and the model still explains exactly as before (its attention capture untouched)
        torch.testing.assert_close(after[m], before[m], rtol=0, atol=0)
    assert len(table) == (L + 1) * len(methods) * 4
    summary = randomisation_summary(table).set_index(["method", "randomised"])
    for m in methods:
        assert summary.loc[(m, 0), "spearman_mean"] == pytest.approx(1.0)
        assert list(table[(table["method"] == m) & (table["randomised"] == L)]["lowest_layer"].unique()) == [0]
    for m in ("grad_rollout", "relevance", "interaction"):
        assert summary.loc[(m, L), "spearman_mean"] < 0.8, f"{m} did not change with every block random"
    assert summary.loc[("random", L), "spearman_mean"] == pytest.approx(1.0)  # a map that ignores the model
    # seeded: the same check gives the same numbers
    again = randomisation_check(random_vit, x, ["relevance"])
    pd.testing.assert_frame_equal(again.reset_index(drop=True), table[table["method"] == "relevance"].reset_index(drop=True))


def test_randomisation_figure(random_vit):
    from vitscope.analysis.faithfulness import randomisation_check, randomisation_summary
    from vitscope.figures.explain import plot_randomisation

    torch.manual_seed(3)
    summary = randomisation_summary(randomisation_check(random_vit, torch.randn(2, 3, 32, 32), ["rollout", "relevance"]))
    fig = plot_randomisation(summary)
    ax = fig.get_axes()[0]
    assert [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")] == ["rollout", "relevance"]
    assert len(ax.get_lines()[0].get_xdata()) == random_vit.num_layers + 1
