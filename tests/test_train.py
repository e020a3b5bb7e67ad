"""Fashion-MNIST IDX reading, the training loop (seeding, resume, DDP, folders) and `vitscope train`."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vitscope.data import fashion_mnist as fm
from vitscope.training import (
    DatasetSplits,
    EpochAugmentation,
    ModelSpec,
    Recipe,
    TensorImageDataset,
    TrainError,
    data_config_for,
    evaluate,
    mimetic_init,
    sincos_2d,
    train,
    warmup_cosine,
)

REPO = Path(__file__).resolve().parents[1]
#: A 2-layer, 2-head timm ViT on 28x28 grey images (4x4 grid of 7 px patches): fast on one core.
TINY_ARCH = "vit_tiny_patch16_224"
TINY_ARGS = dict(img_size=28, patch_size=7, in_chans=1, embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0)
FAST = dict(batch_size=32, lr=3e-3, warmup_epochs=0.5, eval_batch_size=64)


pytestmark = pytest.mark.usefixtures("one_thread")


def pattern_images(n: int, seed: int, size: int = 28, channels: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy images of 4 classes: horizontal stripes, vertical stripes, checkerboard, plain.

    The classes survive flips and small shifts (the training augmentation), so a tiny ViT learns
    them in a few dozen steps.
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    r = (torch.arange(size) // max(1, size // 8)) % 2
    patterns = torch.stack([r[:, None].expand(size, size), r[None, :].expand(size, size), r[:, None] ^ r[None, :],
                            torch.zeros(size, size, dtype=torch.long)])  # fmt: skip
    img = 40 + 170 * patterns[labels] + torch.randint(0, 40, (n, size, size), generator=g)
    img = img.clamp(0, 255).to(torch.uint8)
    if channels:
        img = img[:, None].repeat(1, channels, 1, 1)
    return img, labels


def tiny_splits(n_train: int = 256, n_test: int = 64) -> DatasetSplits:
    cfg = data_config_for(ModelSpec(TINY_ARCH, {**TINY_ARGS, "num_classes": 4}).build())
    tr, te = pattern_images(n_train, 0), pattern_images(n_test, 1)
    return DatasetSplits("patterns", TensorImageDataset(*tr, cfg), TensorImageDataset(*te, cfg), ["h", "v", "check", "plain"])


def weights(result) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in result.model.state_dict().items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs (max {float((a[k] - b[k]).abs().max()):.3g})"


def strip_times(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.endswith("time_s")} for r in rows]


def write_folder(root: Path, n_per_class: int, seed: int, size: tuple[int, int] = (24, 28)) -> None:
    """Class sub-folders of RGB PNGs (not at the model's input size, so they get resized)."""
    imgs, labels = pattern_images(4 * n_per_class, seed, size=max(size))
    names = ["h", "v", "check", "plain"]
    for i, (im, y) in enumerate(zip(imgs, labels)):
        d = root / names[int(y)]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im.numpy()).convert("RGB").resize(size[::-1]).save(d / f"{i:04d}.png")


# --------------------------------------------------------------------------------------------------
# Fashion-MNIST IDX files
# --------------------------------------------------------------------------------------------------


def write_idx(path: Path, arr: np.ndarray, magic: int, compress: bool = True, truncate: int = 0) -> None:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    data = (header + arr.astype(np.uint8).tobytes())[: -truncate or None]
    (gzip.open if compress else open)(path, "wb").write(data)


@pytest.mark.parametrize("compress", [True, False])
def test_idx_reader_roundtrip(tmp_path, compress):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (7, 28, 28)), rng.integers(0, 10, 7)
    sfx = ".gz" if compress else ""
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{sfx}", images, fm.IDX_IMAGES_MAGIC, compress)
    write_idx(tmp_path / f"t10k-labels-idx1-ubyte{sfx}", labels, fm.IDX_LABELS_MAGIC, compress)
    x, y = fm.load_fashion_mnist("test", root=tmp_path)
    assert x.dtype == torch.uint8 and x.shape == (7, 28, 28) and y.dtype == torch.int64
    assert np.array_equal(x.numpy(), images) and np.array_equal(y.numpy(), labels)
    with pytest.raises(fm.DatasetNotFoundError, match="train"):
        fm.load_fashion_mnist("train", root=tmp_path)


def test_idx_reader_rejects_bad_files(tmp_path):
    img = np.zeros((3, 28, 28))
    write_idx(tmp_path / "a.gz", img, fm.IDX_LABELS_MAGIC)  # labels magic on an image file
    with pytest.raises(ValueError, match="magic"):
        fm.read_idx(tmp_path / "a.gz", fm.IDX_IMAGES_MAGIC)
    write_idx(tmp_path / "b.gz", img, fm.IDX_IMAGES_MAGIC, truncate=5)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        fm.read_idx(tmp_path / "b.gz", fm.IDX_IMAGES_MAGIC)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", img, fm.IDX_IMAGES_MAGIC)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(4), fm.IDX_LABELS_MAGIC)
    with pytest.raises(ValueError, match="3 images but .* 4 labels"):
        fm.load_fashion_mnist("test", root=tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.full(3, 10), fm.IDX_LABELS_MAGIC)
    with pytest.raises(ValueError, match="out of range"):
        fm.load_fashion_mnist("test", root=tmp_path)


def test_missing_dataset_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(fm, "SYSTEM_ROOT", tmp_path / "absent")
    with pytest.raises(fm.DatasetNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fm.load_fashion_mnist("test", download=False)
    with pytest.raises(ValueError, match="split"):
        fm.load_fashion_mnist("validation")


def test_real_fashion_mnist_counts_and_reference(tmp_path):
    if not fm.SYSTEM_ROOT.is_dir():
        pytest.skip(f"Fashion-MNIST not installed at {fm.SYSTEM_ROOT} (apt-get install dataset-fashion-mnist)")
    from torchvision.datasets.mnist import read_sn3_pascalvincent_tensor

    x, y = fm.load_fashion_mnist("test")
    assert x.shape == (10000, 28, 28) and y.shape == (10000,)
    assert torch.bincount(y).tolist() == [1000] * 10
    # Independent reader: torchvision's IDX parser on the decompressed files.
    for stem, ours in (("t10k-images-idx3-ubyte", x), ("t10k-labels-idx1-ubyte", y)):
        plain = tmp_path / stem
        plain.write_bytes(gzip.open(fm.SYSTEM_ROOT / f"{stem}.gz").read())
        assert torch.equal(read_sn3_pascalvincent_tensor(str(plain)).long(), ours.long())
    xt, yt = fm.load_fashion_mnist("train")
    assert xt.shape == (60000, 28, 28) and torch.bincount(yt).tolist() == [6000] * 10


# --------------------------------------------------------------------------------------------------
# Loop building blocks
# --------------------------------------------------------------------------------------------------


def test_augmentation_matches_naive_crop_and_flip():
    x = torch.randint(0, 256, (6, 2, 9, 7), dtype=torch.uint8)
    aug = EpochAugmentation.draw(20, padding=3, hflip=True, seed=5)
    index = torch.tensor([0, 19, 4, 4, 11, 7])
    got = aug.apply(x, index)
    for b, i in enumerate(index.tolist()):
        top, left = aug.offsets[i].tolist()
        ref = F.pad(x[b], (3, 3, 3, 3))[:, top : top + 9, left : left + 7]
        if aug.flips[i]:
            ref = ref.flip(-1)
        assert torch.equal(got[b], ref)
    assert aug.flips.any() and not aug.flips.all() and (aug.offsets.max() == 6) and (aug.offsets.min() == 0)
    assert not EpochAugmentation.draw(20, 3, hflip=False, seed=5).flips.any()
    assert torch.equal(EpochAugmentation.draw(20, 0, hflip=False, seed=5).apply(x, index), x)


def test_warmup_cosine_schedule():
    lrs = [warmup_cosine(s, 4, 20, 0.1) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == pytest.approx(1.0) and lrs[-1] > 0.1 and warmup_cosine(20, 4, 20, 0.1) == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))
    assert lrs[12] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 8 / 16)))


def test_recipe_and_spec_validation(tmp_path):
    with pytest.raises(TrainError, match="lr"):
        Recipe(lr=0).validate()
    with pytest.raises(TrainError, match="warmup_epochs"):
        Recipe(epochs=2, warmup_epochs=3).validate()
    with pytest.raises(TrainError, match="not a timm-registered"):
        ModelSpec("no_such_vit_xyz").build()
    with pytest.raises(TrainError, match="JSON"):
        train(ModelSpec(TINY_ARCH, {**TINY_ARGS, "mask": torch.ones(2)}), tiny_splits(8, 4), tmp_path, progress=False)
    with pytest.raises(TrainError, match="num_classes=3 but the data set has 4"):
        train(TINY_ARCH, tiny_splits(8, 4), tmp_path, model_args={**TINY_ARGS, "num_classes": 3}, progress=False)
    with pytest.raises(TrainError, match="init='xavier' must be one of default, mimetic"):
        Recipe(init="xavier").validate()


def test_mimetic_init_makes_attention_start_local():
    """After mimetic initialisation W_q^T W_k is close to alpha Z + beta I (self-similar queries and
    keys), the patch position codes are 2-D sine-cosine, and the first block's heads attend nearer
    on the patch grid than with timm's default initialisation (captured attention, Chebyshev distance)."""
    import vitscope
    from vitscope.models.builtin import create_fmnist_vit_tiny

    torch.manual_seed(0)
    model = mimetic_init(create_fmnist_vit_tiny())
    D, H, g = model.embed_dim, model.blocks[0].attn.num_heads, 7
    dh = D // H
    # sine-cosine codes by a direct loop
    ref = torch.zeros(g * g, D)
    omega = [1.0 / 10000 ** (i / (D // 4 - 1)) for i in range(D // 4)]
    for r in range(g):
        for c in range(g):
            for i, w in enumerate(omega):
                ref[r * g + c, i], ref[r * g + c, D // 4 + i] = np.sin(c * w), np.cos(c * w)
                ref[r * g + c, D // 2 + i], ref[r * g + c, 3 * D // 4 + i] = np.sin(r * w), np.cos(r * w)
    torch.testing.assert_close(sincos_2d(g, g, D), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.pos_embed[0, 1:], ref, rtol=1e-5, atol=1e-5)
    w = model.blocks[0].attn.qkv.weight.detach()
    for h in range(H):
        m = w[h * dh : (h + 1) * dh].T @ w[D + h * dh : D + (h + 1) * dh]
        assert float(m.diagonal().mean()) > 2.5 * float((m - torch.diag(m.diagonal())).abs().mean()), h  # random: about 1x
    rows, cols = np.divmod(np.arange(g * g), g)
    cheb = np.maximum(np.abs(rows[:, None] - rows[None]), np.abs(cols[:, None] - cols[None]))
    pixels = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (8, 1, 28, 28), dtype=np.uint8))

    def first_block_distance(net) -> np.ndarray:
        attn = vitscope.load_model(net.eval()).attention(pixels)[:, 0, :, 1:, 1:].double().numpy()  # (B, H, P, P)
        return (attn * cheb).sum(-1).mean((0, 2))

    torch.manual_seed(0)
    default = first_block_distance(create_fmnist_vit_tiny())
    mimetic = first_block_distance(model)
    assert (mimetic < 0.9 * default).all(), (mimetic, default)
    with pytest.raises(TrainError, match="timm VisionTransformer"):
        mimetic_init(torch.nn.Linear(2, 2))


def test_mimetic_weights_and_frozen_position_codes(tmp_path):
    """``mimetic_beta`` weighs the identity part of W_q^T W_k (a larger beta: larger self-similarity,
    i.e. sharper positional attention at the start), ``pos_scale`` scales the codes, and ``freeze_pos_embed`` trains every weight but the
    position embeddings, which end where initialisation put them."""
    from vitscope.models.builtin import create_fmnist_vit_tiny

    def diagonal(beta: float) -> float:
        torch.manual_seed(0)
        model = mimetic_init(create_fmnist_vit_tiny(), alpha=0.3, beta=beta)
        D, H = model.embed_dim, model.blocks[0].attn.num_heads
        w, dh = model.blocks[0].attn.qkv.weight.detach(), D // H
        m = w[:dh].T @ w[D : D + dh]
        assert float(m.diagonal().mean()) > 3 * float((m - torch.diag(m.diagonal())).abs().mean())
        return float(m.diagonal().mean())

    assert diagonal(3.0) > 2.5 * diagonal(0.7)
    torch.manual_seed(0)
    scaled = mimetic_init(create_fmnist_vit_tiny(), pos_scale=4.0)
    torch.testing.assert_close(scaled.pos_embed[0, 1:], 4.0 * sincos_2d(7, 7, scaled.embed_dim))

    recipe = Recipe(epochs=1, seed=3, init="mimetic", pos_scale=2.0, freeze_pos_embed=True, **FAST)
    spec = ModelSpec(TINY_ARCH, {**TINY_ARGS, "num_classes": 4})
    torch.manual_seed(3)
    start = mimetic_init(spec.build(), pos_scale=2.0)
    result = train(TINY_ARCH, tiny_splits(), tmp_path, recipe, model_args=TINY_ARGS, progress=False)
    trained = result.model.state_dict()
    assert torch.equal(trained["pos_embed"], start.state_dict()["pos_embed"])
    assert not torch.equal(trained["patch_embed.proj.weight"], start.state_dict()["patch_embed.proj.weight"])
    for bad, field_name in ((dict(pos_scale=0.0), "pos_scale"), (dict(mimetic_beta=-1.0), "mimetic_beta")):
        with pytest.raises(TrainError, match=field_name):
            Recipe(**bad).validate()


# --------------------------------------------------------------------------------------------------
# Reproducibility and resume
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """An uninterrupted 2-epoch run on 256 synthetic images."""
    out = tmp_path_factory.mktemp("straight")
    return train(TINY_ARCH, tiny_splits(), out, Recipe(epochs=2, seed=3, **FAST), model_args=TINY_ARGS, progress=False)


def test_seeded_runs_are_identical(straight_run, tmp_path):
    again = train(TINY_ARCH, tiny_splits(), tmp_path / "a", Recipe(epochs=2, seed=3, **FAST), model_args=TINY_ARGS, progress=False)
    assert_same_weights(weights(straight_run), weights(again))
    assert strip_times(again.metrics["epochs"]) == strip_times(straight_run.metrics["epochs"])
    other = train(TINY_ARCH, tiny_splits(), tmp_path / "b", Recipe(epochs=2, seed=4, **FAST), model_args=TINY_ARGS, progress=False)
    assert not torch.equal(weights(other)["head.weight"], weights(straight_run)["head.weight"])


def test_resume_equals_uninterrupted(straight_run, tmp_path):
    recipe = Recipe(epochs=2, seed=3, **FAST)
    first = train(TINY_ARCH, tiny_splits(), tmp_path, recipe, model_args=TINY_ARGS, stop_after=1, progress=False)
    assert not first.complete and first.weights_path is None
    assert not (tmp_path / f"{TINY_ARCH}.safetensors").exists()
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and set(ckpt) >= {"state_dict", "optimizer", "scheduler", "rng", "metrics"}
    # Different settings must not silently continue the run.
    with pytest.raises(TrainError, match="lr"):
        train(TINY_ARCH, tiny_splits(), tmp_path, Recipe(epochs=2, seed=3, **{**FAST, "lr": 1e-3}), model_args=TINY_ARGS, progress=False)
    resumed = train(TINY_ARCH, tiny_splits(), tmp_path, recipe, model_args=TINY_ARGS, progress=False)
    assert resumed.complete
    assert_same_weights(weights(straight_run), weights(resumed))
    assert strip_times(resumed.metrics["epochs"]) == strip_times(straight_run.metrics["epochs"])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["epoch"] for r in metrics["epochs"]] == [1, 2] and metrics["complete"]
    assert metrics["final_test_accuracy"] == resumed.metrics["epochs"][-1]["test_accuracy"]
    assert all(r["wall_time_s"] > 0 and r["train_loss"] > 0 for r in metrics["epochs"])
    # Running the finished command again changes nothing.
    again = train(TINY_ARCH, tiny_splits(), tmp_path, recipe, model_args=TINY_ARGS, progress=False)
    assert_same_weights(weights(straight_run), weights(again))


def test_weights_file_rebuilds_model_with_load_model(straight_run, tmp_path):
    import vitscope
    from vitscope.models.weights import META_ARCH, META_CFG

    path = straight_run.weights_path
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta[META_ARCH] == TINY_ARCH and json.loads(meta[META_CFG])["input_size"] == [1, 28, 28]
    vit = vitscope.load_model(str(path), device="cpu")
    assert vit.class_names == ["h", "v", "check", "plain"] and vit.num_layers == 2 and vit.num_heads == 2
    assert vit.preprocessing.input_size == (1, 28, 28)
    # Same logits as the trained module on normalised tensors ...
    splits = tiny_splits()
    cfg = straight_run.metrics["data_config"]
    x = torch.stack([splits.test[i][0] for i in range(16)])
    from vitscope.training import normalize

    xn = normalize(x, cfg["mean"], cfg["std"])
    torch.testing.assert_close(vit.logits(xn), straight_run.model(xn), rtol=1e-5, atol=1e-5)
    # ... and the same accuracy from PNG files through load_model's own preprocessing.
    paths = []
    for i in range(len(splits.test)):
        p = tmp_path / f"{i}.png"
        Image.fromarray(splits.test[i][0][0].numpy()).save(p)
        paths.append(p)
    labels = torch.tensor([splits.test[i][1] for i in range(len(splits.test))])
    acc = float((vit.logits(vit.preprocess(paths)).argmax(-1) == labels).float().mean())
    ref = evaluate(straight_run.model, splits.test, cfg)
    assert acc == pytest.approx(ref["accuracy"]) == pytest.approx(straight_run.final_test_accuracy)


def test_builtin_architecture_roundtrip(tmp_path):
    """A file trained from the registered name ``fmnist_vit_tiny`` loads by path with its own metadata."""
    import vitscope

    splits = tiny_splits(64, 16)
    res = train("fmnist_vit_tiny", splits, tmp_path, Recipe(epochs=1, **FAST), model_args={"depth": 1, "embed_dim": 16},
                progress=False)  # fmt: skip
    vit = vitscope.load_model(str(res.weights_path), device="cpu")
    assert vit.num_layers == 1 and vit.layout.grid == (7, 7) and vit.preprocessing.mean == (0.2860,)
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(vit.logits(x), res.model(x), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Image folders, the CLI and DDP
# --------------------------------------------------------------------------------------------------


def test_folder_holdout_split(tmp_path):
    from vitscope.training import folder_splits

    write_folder(tmp_path, 10, seed=0)
    cfg = {"input_size": [3, 16, 16], "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center",
           "mean": [0.5] * 3, "std": [0.5] * 3, "num_classes": 4}  # fmt: skip
    s = folder_splits(tmp_path, cfg, holdout_fraction=0.25, seed=0)
    assert len(s.train) == 30 and len(s.test) == 10
    assert not set(s.train.indices) & set(s.test.indices)
    assert s.train[0][0].shape == (3, 16, 16) and s.train[0][0].dtype == torch.uint8
    assert folder_splits(tmp_path, cfg, 0.25, seed=1).test.indices != s.test.indices
    assert folder_splits(tmp_path, cfg, 0.0).test is None


DDP_SCRIPT = """
import sys
from vitscope.training import Recipe, train
recipe = Recipe(epochs=2, batch_size=16, lr=3e-3, holdout_fraction=0.25)
args = dict(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2)
train("vit_tiny_patch16_224", sys.argv[1], sys.argv[2], recipe, model_args=args, progress=False)
"""


@pytest.mark.skipif(not (Path(sys.executable).parent / "torchrun").exists(), reason="torchrun not installed next to python")
def test_torchrun_two_processes_match_one_process(tmp_path):
    """DDP on CPU (gloo): 2 processes with the same global batch train the same model as 1 process."""
    write_folder(tmp_path / "data", 16, seed=0)
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    torchrun = str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path / "data"), str(tmp_path / "ddp")],
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ddp_metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert ddp_metrics["world_size"] == 2 and ddp_metrics["complete"]
    # Only rank 0 wrote: one checkpoint, no temporary files left behind.
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == ["checkpoint.pt", "metrics.json", f"{TINY_ARCH}.safetensors"]

    exec_globals: dict = {}
    single = tmp_path / "single"
    exec(compile(DDP_SCRIPT.replace("sys.argv[1]", repr(str(tmp_path / "data"))).replace("sys.argv[2]", repr(str(single))), "ddp", "exec"),
         exec_globals)  # fmt: skip
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "ddp" / f"{TINY_ARCH}.safetensors"))
    b = load_file(str(single / f"{TINY_ARCH}.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=f"{k} differs between 1 and 2 processes")
    # The tolerance is far below how much training moved the weights.
    torch.manual_seed(0)
    init = ModelSpec(TINY_ARCH, {"img_size": 16, "patch_size": 4, "embed_dim": 16, "depth": 2, "num_heads": 2, "num_classes": 4}).build()
    moved = max(float((b[k] - v).abs().max()) for k, v in init.state_dict().items())
    assert moved > 100 * 1e-5
    one = json.loads((single / "metrics.json").read_text())
    for r1, r2 in zip(one["epochs"], ddp_metrics["epochs"], strict=True):
        assert r1["test_count"] == r2["test_count"] == 16
        assert r1["train_loss"] == pytest.approx(r2["train_loss"], abs=1e-5)
        assert r1["test_accuracy"] == r2["test_accuracy"]


def test_packaged_model_and_sample_agree_with_training_evaluation():
    """The shipped weights classify the shipped sample PNGs exactly as the training loop's evaluation
    classifies the same Fashion-MNIST test tensors."""
    import csv

    import vitscope
    from vitscope.models.builtin import BUILTIN_MODELS, create_fmnist_vit_tiny

    weights_path = BUILTIN_MODELS["fmnist_vit_tiny"].weights_path
    sample = weights_path.parents[1] / "sample"
    if not weights_path.exists() or not (sample / "labels.csv").exists():
        pytest.skip("built-in weights or sample not generated (python scripts/train_builtin.py)")
    if not fm.SYSTEM_ROOT.is_dir():
        pytest.skip("Fashion-MNIST test split not installed")
    from safetensors.torch import load_file

    rows = list(csv.DictReader(open(sample / "labels.csv")))
    assert len(rows) == 300 and [sum(int(r["label"]) == k for r in rows) for k in range(10)] == [30] * 10
    assert all(r["label_name"] == fm.CLASSES[int(r["label"])] for r in rows)
    index = [int(r["path"][4:9]) for r in rows]  # test<index>_<class>.png
    x, y = fm.load_fashion_mnist("test")
    assert y[index].tolist() == [int(r["label"]) for r in rows]
    # First 30 of each class in test-set order.
    for k in range(10):
        assert [i for i in index if y[i] == k] == torch.nonzero(y == k).flatten()[:30].tolist()

    vit = vitscope.load_model("fmnist_vit_tiny", device="cpu")
    with torch.no_grad():
        pred_png = vit.logits(vit.preprocess([sample / r["path"] for r in rows])).argmax(-1)
    net = create_fmnist_vit_tiny()
    net.load_state_dict(load_file(str(weights_path)))
    cfg = data_config_for(net)
    ref = evaluate(net, TensorImageDataset(x, y, cfg), cfg, indices=index)
    with torch.no_grad():
        from vitscope.training import normalize

        pred_ref = net.eval()(normalize(x[index][:, None], cfg["mean"], cfg["std"])).argmax(-1)
    assert torch.equal(pred_png, pred_ref)
    assert int((pred_png == y[index]).sum()) == ref["correct"]
    assert ref["accuracy"] > 0.85  # a trained model, not a random one (chance is 0.1)
