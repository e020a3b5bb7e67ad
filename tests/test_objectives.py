"""The zero-shot and probe objectives: class logits for backbones from a CLIP / SigLIP text tower or
from a cross-fitted linear probe, checked against the libraries' own computations (transformers'
``logits_per_image``, scikit-learn's ``predict_proba``) and a cross-fitting written out here."""

from __future__ import annotations

import dataclasses
import json
import string

import numpy as np
import pytest
import torch
from PIL import Image

import vitscope
from vitscope.analysis.settings import AnalyzeSettings

SETTINGS = AnalyzeSettings(batch_size=4, n_boot=20, ae_epochs=1, ae_min_steps=4, n_clusters=2, curve_images=4, curve_points=3,
                           projection="pca", probe_folds=3)
CLASSES = ["cat", "dog", "fish"]


def _randomise(model: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "logit" not in name:  # (keep the model's own logit scale and bias)
                p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if p.ndim == 1 and p.shape[0] > 0 and p.mean() == 1.0 else 0.0))
    return model.eval()


def _char_vocab() -> dict[str, int]:
    chars = list(string.ascii_lowercase) + list(".,'-")
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    return vocab


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A whole random-weight CLIP (image and text towers) with a character-level tokenizer, saved
    as a Hugging Face folder."""
    import transformers as tr

    root = tmp_path_factory.mktemp("clip")
    vocab = _char_vocab()
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    tok = tr.CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"))
    eos = vocab["<|endoftext|>"]
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=40, eos_token_id=eos, bos_token_id=vocab["<|startoftext|>"], pad_token_id=eos)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
    torch.manual_seed(0)
    model = _randomise(tr.CLIPModel(tr.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)))
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return root / "model"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """12 images in three named class folders (4 each)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(12):
        cls = root / CLASSES[i % 3]
        cls.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(cls / f"{i}.png")
    return root


def test_zero_shot_readout_equals_clip_logits_per_image(clip_folder):
    import transformers as tr

    from vitscope.models.zero_shot import zero_shot_readout

    whole = tr.CLIPModel.from_pretrained(clip_folder).eval()
    tok = tr.AutoTokenizer.from_pretrained(clip_folder)
    vit = vitscope.load_model(f"hf:{clip_folder}", device="cpu")
    assert not vit.num_classes
    x = torch.randn(5, 3, 32, 32)
    # a whole CLIP loads with its projection: the embedding is CLIP's image_embeds
    with torch.no_grad():
        torch.testing.assert_close(vit.embeddings(x), whole.get_image_features(pixel_values=x).pooler_output, atol=1e-5, rtol=1e-5)
    readout = zero_shot_readout(f"hf:{clip_folder}", CLASSES, project=False)
    zs = vit.with_readout(readout)
    assert zs.num_classes == 3 and zs.class_names == CLASSES and vit.readout_head is None  # (a view; the model is unchanged)
    with torch.no_grad():
        want = whole(**tok([f"a photo of a {c}." for c in CLASSES], padding=True, return_tensors="pt"), pixel_values=x).logits_per_image
    torch.testing.assert_close(zs.logits(x), want, atol=1e-5, rtol=1e-5)
    # through the explicit path too, and with a head pruned: equal to the masked embedding's readout
    pruned = zs.logits(x, masks={(1, 0): "all"})
    torch.testing.assert_close(pruned, readout(vit.embeddings(x, masks={(1, 0): "all"})), atol=1e-6, rtol=1e-6)
    assert (pruned - want).abs().max() > 1e-4  # (the head matters)
    # prompt ensembling: the mean of the prompts' unit text embeddings, renormalised
    two = zero_shot_readout(whole, CLASSES, ["a photo of a {}.", "a {}"], tokenizer=lambda t: tok(t, padding=True, return_tensors="pt"))
    with torch.no_grad():
        f = [torch.nn.functional.normalize(whole.get_text_features(**tok([p.format(c) for c in CLASSES], padding=True, return_tensors="pt")).pooler_output, dim=-1)
             for p in ("a photo of a {}.", "a {}")]
    torch.testing.assert_close(two.text, torch.nn.functional.normalize((f[0] + f[1]) / 2, dim=-1), atol=1e-6, rtol=1e-6)
    with pytest.raises(vitscope.ModelLoadError, match="whole CLIPModel or SiglipModel"):
        zero_shot_readout(vit.module, CLASSES, tokenizer=tok)
    with pytest.raises(ValueError, match=r"'\{\}'"):
        zero_shot_readout(whole, CLASSES, ["no slot"], tokenizer=tok)


def test_zero_shot_readout_equals_siglip_logits_per_image():
    import transformers as tr

    from vitscope.models.zero_shot import zero_shot_readout

    c = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    torch.manual_seed(0)
    whole = _randomise(tr.SiglipModel(tr.SiglipConfig(text_config=dict(**c, vocab_size=50, max_position_embeddings=8),
                                                      vision_config=dict(**c, image_size=32, patch_size=8))))
    with torch.no_grad():
        whole.logit_bias.fill_(-2.0)

    def tokenizer(texts):  # SigLIP pads every prompt to max length
        ids = torch.tensor([[(ord(ch) % 48) + 1 for ch in t[:8]] + [0] * (8 - len(t[:8])) for t in texts])
        return {"input_ids": ids}

    readout = zero_shot_readout(whole, CLASSES, tokenizer=tokenizer)
    vit = vitscope.load_model(whole.vision_model, device="cpu").with_readout(readout)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = whole(input_ids=tokenizer([f"a photo of a {k}." for k in CLASSES])["input_ids"], pixel_values=x).logits_per_image
    torch.testing.assert_close(vit.logits(x), want, atol=1e-5, rtol=1e-5)


def test_probe_folds_are_stratified_and_refuse_lone_classes():
    from vitscope.analysis.probe import probe_folds

    labels = [0] * 7 + [1] * 5 + [2] * 3
    folds = probe_folds(labels, 3, seed=1)
    assert set(folds) == {0, 1, 2}
    for c in range(3):  # each class spread over min(its size, 3) folds, as evenly as its size allows
        counts = np.bincount(folds[np.array(labels) == c], minlength=3)
        assert counts.max() - counts.min() <= 1
    np.testing.assert_array_equal(folds, probe_folds(labels, 3, seed=1))  # seeded
    with pytest.raises(ValueError, match="single image.*class index 3"):
        probe_folds([0, 0, 1, 1, 3], 2)


def test_fit_probe_equals_scikit_learn_predict_proba():
    from sklearn.linear_model import LogisticRegression

    from vitscope.analysis.probe import fit_probe

    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 6)) * [1, 2, 3, 1, 0.5, 4] + 3
    y = rng.integers(0, 3, 40)
    X[y == 1, 0] += 2  # (something to learn)
    probe = fit_probe(X, y, ["a", "b", "c", "unseen"])
    got = torch.softmax(probe(torch.from_numpy(X).float()).double(), -1).numpy()
    mean, std = X.mean(0), X.std(0)
    want = LogisticRegression(C=1.0, max_iter=2000).fit((X - mean) / std, y).predict_proba((X - mean) / std)
    np.testing.assert_allclose(got[:, :3], want, atol=2e-5)
    assert got[:, 3].max() < 1e-30  # a class the probe never saw is never predicted
    two = fit_probe(X, (y == 1).astype(int), ["no", "yes"])  # binary: a sigmoid, as two softmax logits
    want2 = LogisticRegression(C=1.0, max_iter=2000).fit((X - mean) / std, y == 1).predict_proba((X - mean) / std)
    np.testing.assert_allclose(torch.softmax(two(torch.from_numpy(X).float()).double(), -1).numpy(), want2, atol=2e-5)


def test_analyze_probe_scores_each_image_by_the_probe_of_the_other_folds(clip_folder, folder, tmp_path):
    """A backbone (CLIP's vision tower) analysed under ``objective="probe"``: the stored probes are the
    ones fitted here on the other folds, each image's base probability and pruned probability are
    its own fold's probe on the unpruned / head-pruned embedding."""
    from sklearn.linear_model import LogisticRegression

    from vitscope.data import iter_batches, load_images

    vit = vitscope.load_model(f"hf:{clip_folder}", device="cpu")
    run = vitscope.analyze(vit, folder, tmp_path / "run", settings=dataclasses.replace(SETTINGS, objective="probe"), progress=False)
    assert run.manifest["status"] == "complete" and run.manifest["settings"]["objective"] == "probe"
    images = load_images(folder)
    batch = next(iter_batches(images, vit.preprocessing, batch_size=12))
    labels = np.array([r.label for r in images.records])
    folds = np.asarray(run.array("readout/probe_fold")[...])
    assert sorted(np.bincount(folds).tolist()) == [4, 4, 4]
    for c in range(3):
        assert len(set(folds[labels == c])) == 3  # stratified: every class in every fold
    emb = vit.embeddings(batch.x).double().numpy()
    weight, bias = np.asarray(run.array("readout/probe_weight")[...]), np.asarray(run.array("readout/probe_bias")[...])
    table = run.images.set_index("image_id")
    ih = run.table("image_heads").set_index(["image_id", "layer", "head"])
    pruned_emb = vit.embeddings(batch.x, masks={(1, 1): "all"}).double().numpy()
    for f in range(3):
        train, test = folds != f, folds == f
        mean, std = emb[train].mean(0), emb[train].std(0)
        ref = LogisticRegression(C=1.0, max_iter=2000).fit((emb[train] - mean) / std, labels[train])
        want = ref.predict_proba((emb[test] - mean) / std)
        logits = emb[test] @ weight[f].T.astype(np.float64) + bias[f]
        np.testing.assert_allclose(torch.softmax(torch.from_numpy(logits), -1).numpy(), want, atol=1e-4)
        ids = np.array(batch.image_ids)[test]
        np.testing.assert_allclose(table.loc[ids, "base_prob"].to_numpy(), want[np.arange(test.sum()), labels[test]], atol=1e-4)
        pruned = ref.predict_proba((pruned_emb[test] - mean) / std)[np.arange(test.sum()), labels[test]]
        np.testing.assert_allclose(ih.loc[[(int(i), 1, 1) for i in ids], "pruned_prob"].to_numpy(), pruned, atol=1e-4)
    curves = run.table("curves")
    assert curves["accuracy"].notna().all() and (curves["n_images"] == 4).all()
    # resumable with the same probes: a rerun is a no-op, and the probe needs labels and 2+ images per class
    lone = tmp_path / "lone"
    (lone / "a").mkdir(parents=True)
    (lone / "b").mkdir()
    for i, cls in enumerate("aab"):
        Image.fromarray(np.full((40, 40, 3), 40 * i, dtype=np.uint8)).save(lone / cls / f"{i}.png")
    with pytest.raises(ValueError, match="single image"):
        vitscope.analyze(vit, lone, tmp_path / "lone-run", settings=dataclasses.replace(SETTINGS, objective="probe"), progress=False)
    with pytest.raises(ValueError, match="interactions"):
        dataclasses.replace(SETTINGS, objective="probe", interactions=True).validate()


def test_analyze_zero_shot_measures_heads_through_the_text_tower(clip_folder, folder, tmp_path):
    from vitscope.data import iter_batches, load_images
    from vitscope.models.zero_shot import zero_shot_readout

    vit = vitscope.load_model(f"hf:{clip_folder}", device="cpu")
    run = vitscope.analyze(vit, folder, tmp_path / "run", settings=dataclasses.replace(SETTINGS, objective="zero-shot"), progress=False)
    assert run.manifest["status"] == "complete"
    zs = vit.with_readout(zero_shot_readout(f"hf:{clip_folder}", CLASSES, project=False))
    batch = next(iter_batches(load_images(folder), vit.preprocessing, batch_size=12))
    labels = torch.as_tensor(batch.labels)
    base = zs.logits(batch.x).softmax(-1)
    table = run.images.set_index("image_id").loc[batch.image_ids]
    np.testing.assert_allclose(table["base_prob"].to_numpy(), base[torch.arange(12), labels].numpy(), atol=1e-5)
    assert list(table["prediction_name"]) == [CLASSES[i] for i in base.argmax(-1).tolist()]
    pruned = zs.logits(batch.x, masks={(0, 1): "all"}).softmax(-1)[torch.arange(12), labels].numpy()
    ih = run.table("image_heads").set_index(["layer", "head", "image_id"]).loc[(0, 1)]
    np.testing.assert_allclose(ih.loc[batch.image_ids, "pruned_prob"].to_numpy(), pruned, atol=1e-5)
    # a model without a text tower is refused with what to use instead
    import transformers as tr

    bare = tr.CLIPVisionModel(tr.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                                  image_size=32, patch_size=8))
    with pytest.raises(ValueError, match="zero-shot needs a whole Hugging Face CLIP.*with_readout"):
        vitscope.analyze(vitscope.load_model(bare, device="cpu"), folder, tmp_path / "bare",
                         settings=dataclasses.replace(SETTINGS, objective="zero-shot"), progress=False)


def test_prompt_names_and_the_report_sentence_per_objective():
    from vitscope.pipeline.readout import class_prompt_names
    from vitscope.report.html import objective_sentence

    assert class_prompt_names(["tench, Tinca tinca", "goldfish", " ,x"]) == ["tench", "goldfish", " ,x"]
    assert "zero-shot" in objective_sentence({"objective": "zero-shot", "zero_shot_prompt": "an {} photo"})
    assert "'an {} photo'" in objective_sentence({"objective": "zero-shot", "zero_shot_prompt": "an {} photo"})
    assert "3 folds" in objective_sentence({"objective": "probe", "probe_folds": 3})
    assert "own classifier" in objective_sentence({})
