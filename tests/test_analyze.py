"""`vitscope analyze` and `open_run` on the runs it writes (the run store alone: tests/test_store.py).

Checked against independent references: pruned probabilities against an explicit-kernel masked
forward, strength against a direct loop over patch pairs, Taylor importance against a finite
difference of the head gate, the mean attention against `ViT.attention`; resumption against an
uninterrupted run (in-process interruptions at every stage, and a real SIGKILL of the CLI).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from vitscope.store import NotARunError, RunMismatchError, RunStore, UnfinishedRunError, open_run
from vitscope.store.layout import TABLES
from interruption import interrupt_at_call

# ----------------------------------------------------------------------------- helpers

TINY_ARGS = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)


def _save_tiny_model(path: Path, seed: int = 0) -> Path:
    """A small random ViT (2 layers x 2 heads, 7x7 grid + CLS, 1 channel) as a self-describing file."""
    import timm
    from safetensors.torch import save_file

    from vitscope.models.builtin import fmnist_pretrained_cfg

    torch.manual_seed(seed)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY_ARGS)
    meta = {
        "vitscope.architecture": "vit_tiny_patch16_224",
        "vitscope.model_args": json.dumps(TINY_ARGS),
        "vitscope.pretrained_cfg": json.dumps(fmnist_pretrained_cfg()),
        "vitscope.class_names": json.dumps([f"class {i}" for i in range(10)]),
    }
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path), metadata=meta)
    return path


def _make_images(folder: Path, n: int, size: int = 28, seed: int = 0, corrupt: bool = True) -> Path:
    """``n`` labelled greyscale PNGs (smooth random blobs) plus, optionally, one corrupt file."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    rows = ["path,label"]
    for i in range(n):
        cx, cy, w = rng.uniform(0.2, 0.8, 3)
        img = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (0.02 + 0.1 * w)) * 255
        Image.fromarray(img.astype(np.uint8), mode="L").save(folder / f"img{i:03d}.png")
        rows.append(f"img{i:03d}.png,{i % 10}")
    if corrupt:
        (folder / "img_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
        rows.append("img_broken.png,3")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder


def _table_equal(a: pd.DataFrame, b: pd.DataFrame, name: str, tol: float = 1e-6) -> None:
    assert list(a.columns) == list(b.columns), name
    assert len(a) == len(b), name
    for col in a.columns:
        x, y = a[col], b[col]
        if x.dtype == object and len(x) and isinstance(x.iloc[0], (np.ndarray, list)):
            np.testing.assert_allclose(np.stack(x.to_numpy()), np.stack(y.to_numpy()), rtol=tol, atol=tol, err_msg=f"{name}.{col}")
        elif pd.api.types.is_float_dtype(x):
            np.testing.assert_allclose(x.to_numpy(dtype=float), y.to_numpy(dtype=float), rtol=tol, atol=tol, err_msg=f"{name}.{col}")
        else:
            pd.testing.assert_series_equal(x, y, check_names=False, obj=f"{name}.{col}")


def assert_runs_equal(a, b, tol: float = 1e-6) -> None:
    """Every table and array of two runs equal (floats within ``tol``), and the same manifest facts."""
    for name in TABLES:
        _table_equal(a.store.read_table(name), b.store.read_table(name), name, tol)
    assert a.arrays() == b.arrays()
    for name in a.arrays():
        x, y = a.array(name)[...], b.array(name)[...]
        assert x.shape == y.shape, name
        np.testing.assert_allclose(x, y, rtol=tol, atol=tol, err_msg=name)
    for key in ("fingerprint", "failures", "counts", "settings", "images"):
        assert a.manifest[key] == b.manifest[key], key


# Many small forwards: one thread avoids thread start-up costs (shared fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def patterns_module():
    from vitscope.analysis import patterns

    return patterns


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {"model": _save_tiny_model(root / "tiny.safetensors"), "images": _make_images(root / "images", 9)}


def _tiny_settings(**kw):
    from vitscope.pipeline import AnalyzeSettings

    # PCA instead of UMAP keeps the suite fast: UMAP compiles its numba kernels in every new process.
    # (Fewer than 10 images also give a PCA image overview.)
    base = dict(batch_size=4, n_boot=200, n_clusters=3, curve_points=4, latent_dim=4, ae_epochs=5, ae_min_steps=40, projection="pca")
    base.update(kw)
    return AnalyzeSettings(**base)


@pytest.fixture(scope="module")
def tiny_run(tiny, tmp_path_factory, patterns_module):
    from vitscope.pipeline import analyze

    out = tmp_path_factory.mktemp("runs") / "tiny"
    return analyze(str(tiny["model"]), tiny["images"], out, settings=_tiny_settings(), progress=False, device="cpu")


# ----------------------------------------------------------------------------- a whole run (tiny random model)


def test_run_tables_follow_the_contract(tiny_run, tiny):
    run = open_run(tiny_run.path)
    L, H = run.num_layers, run.num_heads
    assert (L, H) == (2, 2)
    im, ih, heads = run.images, run.image_heads, run.heads
    for col in ("image_id", "path", "label", "prediction", "probability", "overview_x", "overview_y"):
        assert col in im.columns
    for col in ("pruned_prob", "layer_change", "hop_profile", "entropy", "mean_distance", "cls_self", "cls_to_patch", "patch_to_cls", "taylor"):
        assert col in ih.columns
    for m in ("acc_drop", "prob_drop", "loss_increase", "layer_change", "taylor"):
        assert {m, f"{m}_lo", f"{m}_hi"} <= set(heads.columns)
        assert (heads[f"{m}_lo"] <= heads[m] + 1e-12).all() and (heads[m] <= heads[f"{m}_hi"] + 1e-12).all()
    assert {"entropy_mean", "entropy_q25", "entropy_median", "entropy_q75", "pattern_cluster"} <= set(heads.columns)
    assert set(heads["target"]) == {"label"} and set(heads["n_labelled"]) == {9}
    # Michel et al.'s per-layer L2 normalisation, by a direct loop
    for l in range(L):
        t = heads.loc[heads["layer"] == l, "taylor"].to_numpy()
        np.testing.assert_allclose(heads.loc[heads["layer"] == l, "taylor_layer_norm"], t / math.sqrt(sum(v * v for v in t)), rtol=1e-12)
    assert len(im) == 9 and len(ih) == 9 * L * H and len(heads) == L * H
    assert not ih.duplicated(["image_id", "layer", "head"]).any()
    assert set(ih["image_id"]) == set(im["image_id"])
    # the corrupt file is skipped and listed with its reason
    fails = run.manifest["failures"]
    assert len(fails) == 1 and fails[0]["path"].endswith("img_broken.png") and fails[0]["reason"]
    assert run.failures["path"].tolist() == [fails[0]["path"]]
    assert run.manifest["counts"] == {"listed": 10, "analysed": 9, "failed": 1}
    assert run.manifest["model"]["weights_sha256"] and len(run.manifest["images"]["records"]) == 10
    # head summaries are means of the per-image rows
    merged = ih.merge(im[["image_id", "base_prob"]], on="image_id")
    drop = (merged["base_prob"] - merged["pruned_prob"]).groupby([merged["layer"], merged["head"]]).mean()
    np.testing.assert_allclose(heads.set_index(["layer", "head"])["prob_drop"].loc[drop.index], drop.to_numpy(), rtol=1e-9, atol=1e-12)
    ent = ih.groupby(["layer", "head"])["entropy"].mean()
    np.testing.assert_allclose(heads.set_index(["layer", "head"])["entropy_mean"].loc[ent.index], ent.to_numpy(), rtol=1e-5)
    # agreement: every pair of the five metrics
    assert len(run.agreement) == 10
    # curves: one per metric plus random, held out and in-sample; k = 0 is the unpruned accuracy on
    # the evaluation images (at most half the images; the others rank the heads)
    cv = run.curves
    assert set(cv["metric"]) == {"acc_drop", "prob_drop", "loss_increase", "layer_change", "taylor", "random"}
    assert set(cv["ranking"]) == {"held_out", "in_sample"}
    evaluate = im[im["curve_split"] == "evaluate"]
    assert len(evaluate) == 4 and (im["curve_split"] == "rank").sum() == 5
    k0 = cv[cv["k"] == 0]["accuracy"]
    np.testing.assert_allclose(k0, evaluate["correct"].mean())
    assert set(cv["n_images"]) == {4} and set(cv.loc[cv["ranking"] == "held_out", "n_rank_images"]) == {5}
    assert cv["k"].max() == L * H


def test_unlabelled_and_mixed_runs_say_what_their_metrics_measure(tiny, tmp_path):
    from vitscope.pipeline import analyze
    from vitscope.data import VitscopeDataWarning

    paths = sorted(tiny["images"].glob("img0*.png"))[:4]
    run = analyze(str(tiny["model"]), paths, tmp_path / "none", settings=_tiny_settings(n_boot=10), progress=False, device="cpu")
    assert set(run.heads["target"]) == {"prediction"} and set(run.heads["n_labelled"]) == {0}
    # the unlabelled images' accuracy is agreement with the unpruned prediction: 1 when nothing is pruned
    assert (run.images["target"] == run.images["prediction"]).all() and run.images["correct"].all()
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    rows = ["path,label"]
    for i, p in enumerate(paths):
        (mixed / p.name).write_bytes(p.read_bytes())
        rows.append(f"{p.name},{i if i % 2 else ''}")
    (mixed / "labels.csv").write_text("\n".join(rows) + "\n")
    with pytest.warns(VitscopeDataWarning, match="2 of 4 images have a label"):
        run = analyze(str(tiny["model"]), mixed, tmp_path / "mixed-run", settings=_tiny_settings(n_boot=10), progress=False, device="cpu")
    assert set(run.heads["target"]) == {"mixed"} and set(run.heads["n_labelled"]) == {2}


def test_held_out_curves_rank_on_other_images_than_they_measure(tiny_run):
    """The held-out prob_drop curve prunes the heads ranked on the `rank` images only (pandas here),
    and its accuracy is the pruned model's on the `evaluate` images (masked logits here)."""
    import vitscope

    run = open_run(tiny_run.path)
    vit = vitscope.load_model(run.manifest["model"]["spec"], device="cpu")
    im, ih, T = run.images, run.image_heads, vit.num_tokens
    rank = im[im["curve_split"] == "rank"]
    evaluate = im[im["curve_split"] == "evaluate"]
    assert not set(rank["image_id"]) & set(evaluate["image_id"])
    rows = ih[ih["image_id"].isin(rank["image_id"])].merge(rank[["image_id", "base_prob"]], on="image_id")
    drop = (rows["base_prob"] - rows["pruned_prob"]).groupby([rows["layer"], rows["head"]]).mean()
    order = sorted(drop.index, key=lambda lh: (-drop[lh], lh[0], lh[1]))
    cv = run.curves[(run.curves["ranking"] == "held_out") & (run.curves["metric"] == "prob_drop")].set_index("k")
    x = vit.preprocess(list(evaluate["path"]))
    targets = torch.tensor(evaluate["target"].to_numpy())
    for k in [k for k in cv.index if 0 < k < len(order)]:
        pruned = vit.logits(x, masks={lh: torch.ones(T, T, dtype=torch.bool) for lh in order[:k]})
        acc = float((pruned.argmax(-1) == targets).double().mean())
        prob = float(pruned.double().softmax(-1).gather(1, targets[:, None]).mean())
        assert math.isclose(cv.loc[k, "accuracy"], acc) and math.isclose(cv.loc[k, "mean_prob"], prob, rel_tol=1e-5), k


def test_run_numbers_match_independent_references(tiny_run):
    """Pruned probability, strength, Taylor and mean attention recomputed directly for one image."""
    import vitscope
    from vitscope.capture.runtime import LayerPlan

    run = open_run(tiny_run.path)
    vit = vitscope.load_model(run.manifest["model"]["spec"], device="cpu")
    im = run.images.iloc[3]
    x = vit.preprocess([im["path"]])
    target = int(im["label"])
    T, L, H = vit.num_tokens, vit.num_layers, vit.num_heads
    rows = run.image_heads[run.image_heads["image_id"] == im["image_id"]].set_index(["layer", "head"])

    logits = vit.logits(x)[0].double()
    assert int(logits.argmax()) == im["prediction"]
    assert math.isclose(float(logits.softmax(-1).max()), im["probability"], rel_tol=1e-5)

    attn = vit.attention(x)[0]  # (L, H, T, T)
    g = vit.layout.grid[0]
    for l in range(L):
        for h in range(H):
            # pruning through the explicit kernel (a boolean mask), not the head gate the sweep uses
            pruned = vit.logits(x, masks={(l, h): torch.ones(T, T, dtype=torch.bool)})[0].double().softmax(-1)[target]
            assert math.isclose(float(pruned), rows.loc[(l, h), "pruned_prob"], rel_tol=1e-4, abs_tol=1e-7)
            # hop profile and entropy by a direct loop over patch pairs
            a = attn[l, h, 1:, 1:].double().numpy()
            sums, counts = np.zeros(g), np.zeros(g)
            for i in range(g * g):
                for j in range(g * g):
                    d = max(abs(i // g - j // g), abs(i % g - j % g))
                    sums[d] += a[i, j]
                    counts[d] += 1
            prof = sums / counts
            p = prof / prof.sum()
            np.testing.assert_allclose(rows.loc[(l, h), "hop_profile"], prof, rtol=1e-4)
            assert math.isclose(rows.loc[(l, h), "entropy"], float(-(p * np.log(p)).sum()), rel_tol=1e-4)
            assert math.isclose(rows.loc[(l, h), "cls_self"], float(attn[l, h, 0, 0]), rel_tol=1e-5)

    # Taylor: central difference of the image's loss in the head gate (float64 copy of the model)
    vit64 = vitscope.load_model(run.manifest["model"]["spec"], device="cpu")
    vit64.module.double()
    x64 = x.double()
    l, h, eps = 1, 0, 1e-4

    def loss(gate_value: float) -> float:
        gate = torch.ones(1, H, dtype=torch.float64)
        gate[0, h] = gate_value
        with torch.no_grad():
            out = vit64.readout(vit64.run_blocks(vit64.embed(x64), plans={l: LayerPlan(head_gate=gate)}))
        return float(torch.nn.functional.cross_entropy(out, torch.tensor([target])))

    fd = abs(loss(1 + eps) - loss(1 - eps)) / (2 * eps)
    assert math.isclose(rows.loc[(l, h), "taylor"], fd, rel_tol=1e-3, abs_tol=1e-7)

    # mean attention over every analysed image
    xs = vit.preprocess(run.images["path"].tolist())
    np.testing.assert_allclose(run.array("attention_mean")[...], vit.attention(xs).mean(0).numpy(), rtol=1e-4, atol=1e-6)


def test_run_patterns_and_overview(tiny_run):
    run = open_run(tiny_run.path)
    N, L, H = len(run.images), run.num_layers, run.num_heads
    assert run.array("pattern_inputs/patch").shape[:3] == (N, L, H)
    assert run.array("pattern_inputs/cls").shape == (N, L, H, 2, 14, 14)
    assert run.array("pattern_inputs/offset").shape == (N, L, H, 2, 15, 15)
    for kind in ("patch", "cls"):
        cat = run.patterns[kind]
        assert len(cat.maps) == N * L * H
        assert cat.clusters["size"].sum() == N * L * H
        assert len(cat.prototypes) == len(cat.clusters) == 3
        assert cat.density.ndim == 2 and len(cat.extent) == 4
        assert run.array(f"patterns/{kind}/codes").shape == (N, L, H, 4)
        assert cat.clusters["name"].map(lambda s: isinstance(s, str) and len(s) > 0).all()
    # a head's dominant cluster is its most frequent cluster over images (ties: lower number)
    maps = run.patterns["patch"].maps
    for r in run.heads.itertuples():
        counts = maps[(maps["layer"] == r.layer) & (maps["head"] == r.head)]["cluster"].value_counts()
        best = min(c for c, n in counts.items() if n == counts.max())
        assert r.pattern_cluster == best
        assert math.isclose(r.pattern_share, counts.max() / N)
    assert np.isfinite(run.images[["overview_x", "overview_y"]].to_numpy()).all()
    np.testing.assert_array_equal(run.array("overview")[...], run.images[["overview_x", "overview_y"]].to_numpy())
    np.testing.assert_array_equal(run.image_head_array("pruned_prob")[2], run.image_heads[run.image_heads["image_id"] == run.images["image_id"][2]]
                                  .sort_values(["layer", "head"])["pruned_prob"].to_numpy().reshape(L, H))
    assert run.head_matrix("prob_drop").shape == (L, H)


def test_rerun_is_a_no_op_and_other_commands_are_refused(tiny_run, tiny, tmp_path):
    from vitscope.pipeline import analyze

    stamp = {p: p.stat().st_mtime_ns for p in tiny_run.path.glob("*.parquet")}
    again = analyze(str(tiny["model"]), tiny["images"], tiny_run.path, settings=_tiny_settings(), progress=False, device="cpu")
    assert {p: p.stat().st_mtime_ns for p in again.path.glob("*.parquet")} == stamp
    with pytest.raises(RunMismatchError, match=r"settings: batch_size: 4 -> 5.*--overwrite"):
        analyze(str(tiny["model"]), tiny["images"], tiny_run.path, settings=_tiny_settings(batch_size=5), progress=False, device="cpu")
    with pytest.raises(RunMismatchError, match=r"images: was 10 images.*now 6"):
        analyze(str(tiny["model"]), tiny["images"], tiny_run.path, limit=6, settings=_tiny_settings(), progress=False, device="cpu")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(NotARunError, match="not empty and is not a vitscope run folder"):
        analyze(str(tiny["model"]), tiny["images"], tmp_path, settings=_tiny_settings(), progress=False, device="cpu")
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("stage", ["chunk", "curves", "catalogue", "overview"])
def test_interrupted_run_resumes_to_the_same_result(stage, tiny_run, tiny, tmp_path, monkeypatch):
    """An exception in any stage, then the same call again: equal to the uninterrupted run, no redone chunks."""
    from vitscope.analysis import importance
    from vitscope.pipeline import batch as batch_mod, chunks as chunks_mod
    import vitscope.pipeline as run_mod

    patterns = batch_mod.patterns_module()
    target = {
        "chunk": (chunks_mod, "analyze_batch", 2),
        "curves": (importance, "ranking_curves_table", 1),
        "catalogue": (patterns, "catalogue_patterns", 2),
        "overview": (patterns, "image_overview", 1),
    }[stage]
    interrupt_at_call(monkeypatch, *target)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_mod.analyze(str(tiny["model"]), tiny["images"], out, settings=_tiny_settings(), progress=False, device="cpu")
    with pytest.raises(UnfinishedRunError):
        open_run(out)
    done_before = RunStore(out).done_chunks()
    batches = {"n": 0}
    original_batch = chunks_mod.analyze_batch

    def counting(*a, **k):
        batches["n"] += 1
        return original_batch(*a, **k)

    monkeypatch.setattr(chunks_mod, "analyze_batch", counting)
    resumed = run_mod.analyze(str(tiny["model"]), tiny["images"], out, settings=_tiny_settings(), progress=False, device="cpu")
    assert batches["n"] == 3 - len(done_before)  # finished chunks are not redone
    assert resumed.manifest["resumed"] == 1
    # both commands are recorded, each with the package versions it ran with
    assert [sorted(i) for i in resumed.manifest["invocations"]] == [["command", "started", "versions"]] * 2
    assert resumed.manifest["invocations"][1]["versions"]["torch"] == torch.__version__.split("+")[0]
    assert_runs_equal(resumed, tiny_run)


def test_in_memory_model_with_other_weights_is_refused(tiny, tmp_path):
    """The fingerprint covers the weights actually loaded, not only a file's hash (absent in memory)."""
    from vitscope.pipeline import analyze
    from vitscope.models import load_model
    from vitscope.models import wrap_timm

    first = load_model(str(tiny["model"]))
    vit = wrap_timm(first.module, name="mine", spec="mine")  # an in-memory module: no weights file hash
    assert vit.weights_sha256 is None
    out = tmp_path / "run"
    run = analyze(vit, tiny["images"], out, settings=_tiny_settings(), progress=False, device="cpu")
    assert run.manifest["model"]["state_sha256"] == vit.state_sha256() and run.manifest["model"]["dtype"] == "float32"
    with torch.no_grad():
        next(vit.module.parameters()).add_(1e-3)
    with pytest.raises(RunMismatchError, match="loaded weights sha256"):
        analyze(vit, tiny["images"], out, settings=_tiny_settings(), progress=False, device="cpu")


def test_a_run_made_on_another_device_type_is_refused(tiny, tmp_path):
    """The fingerprint covers the device type (kernels differ in their last bits): a run whose
    manifest says it was made on cuda is not resumed on cpu."""
    from vitscope.pipeline import analyze
    from vitscope.store.manifest import fingerprint

    out = tmp_path / "run"
    run = analyze(str(tiny["model"]), tiny["images"], out, settings=_tiny_settings(n_boot=10), progress=False, device="cpu")
    m = json.loads((out / "manifest.json").read_text())
    assert m["model"]["device_type"] == "cpu"
    # the same run as if made on a GPU: its model part says cuda, and so does its fingerprint
    m["model"]["device_type"] = "cuda"
    model_part = {k: m["model"][k] for k in ("spec", "weights_sha256", "state_sha256", "dtype", "device_type")}
    images_part = [[r["image_id"], r["path"], r["label"], r["size"]] for r in m["images"]["records"]]
    fp, parts = fingerprint({"model": model_part, "images": images_part, "settings": m["settings"]})
    assert parts["images"] == m["fingerprint_parts"]["images"] and parts["model"] != m["fingerprint_parts"]["model"]
    m["fingerprint"], m["fingerprint_parts"] = fp, parts
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(RunMismatchError, match=r"model: was .*device cuda\), now .*device cpu\)"):
        analyze(str(tiny["model"]), tiny["images"], out, settings=_tiny_settings(n_boot=10), progress=False, device="cpu")
    assert run.manifest["model"]["device_type"] == "cpu"


def test_state_sha256_follows_the_weights_not_the_object(tiny):
    import hashlib

    from vitscope.models import load_model

    a, b = load_model(str(tiny["model"])), load_model(str(tiny["model"]))
    assert a.state_sha256() == b.state_sha256()
    # an independent digest of the same state: names, dtypes, shapes and raw bytes in name order
    h = hashlib.sha256()
    for name, t in sorted(a.module.state_dict().items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(bytes(t.contiguous().numpy().tobytes()))
    assert a.state_sha256() == h.hexdigest()
    b.module.to(torch.float64)
    assert b.state_sha256() != a.state_sha256() and b.dtype == torch.float64


# ----------------------------------------------------------------------------- resume after SIGKILL (CLI)


# ----------------------------------------------------------------------------- real DeiT-Tiny


@pytest.fixture(scope="module")
def deit_run(deit_weights, imagenet_images, tmp_path_factory, patterns_module):
    from vitscope.pipeline import analyze

    paths, labels = imagenet_images
    paths, labels = paths[:2], labels[:2]
    out = tmp_path_factory.mktemp("deit") / "run"
    settings = _tiny_settings(batch_size=2, n_clusters=4, latent_dim=8, curve_images=2, curve_points=3, ae_epochs=3)
    return analyze("deit_tiny_patch16_224", [str(p) for p in paths], out, weights=str(deit_weights), labels=labels,
                   settings=settings, progress=False, device="cpu")


def test_deit_tiny_run(deit_run, deit_tiny):
    run = open_run(deit_run.path)
    L, H = 12, 3
    assert (run.num_layers, run.num_heads) == (L, H)
    assert len(run.images) == 2 and len(run.image_heads) == 2 * L * H
    assert run.manifest["model"]["weights_sha256"] == "feb465dcfedcc2d9f508ad557ba587cd23f5d24994a4183a73658688e70cfb52"
    # predictions and one head's pruned probability against direct forwards of the loaded model
    im = run.images.iloc[1]
    x = deit_tiny.preprocess([im["path"]])
    logits = deit_tiny.logits(x)[0].double()
    assert int(logits.argmax()) == im["prediction"]
    T = deit_tiny.num_tokens
    for l, h in [(0, 1), (11, 2)]:
        p = deit_tiny.logits(x, masks={(l, h): torch.ones(T, T, dtype=torch.bool)})[0].double().softmax(-1)[int(im["label"])]
        row = run.image_heads[(run.image_heads["image_id"] == im["image_id"]) & (run.image_heads["layer"] == l) & (run.image_heads["head"] == h)]
        assert math.isclose(float(p), float(row["pruned_prob"].iloc[0]), rel_tol=1e-4, abs_tol=1e-7)
    # strength is bounded by ln 14 and the grids have the model's shape
    assert (run.image_heads["entropy"] <= math.log(14) + 1e-5).all()
    assert run.array("pattern_inputs/cls").shape == (2, L, H, 2, 14, 14)
    assert run.array("attention_mean").shape == (L, H, T, T)
    np.testing.assert_allclose(run.array("attention_mean")[...].sum(-1), 1.0, atol=1e-4)
