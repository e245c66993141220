"""Evaluation metrics against hand-computed cases, prompts/class names, classifier cache, reports and CLIs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from align.eval.classnames import (imagenet_wnids, load_labeled_images, names_for_wnids, wnid_gloss,
                                   wnid_lemmas, _wordnet_synset, wordnet_dict_dir)
from align.eval.prompts import CLIP80, build_prompts, prompt_set_id
from align.eval.retrieval import PairedSet, paired_ranks, ranks, recall_at, retrieval_metrics
from align.eval.zeroshot import class_embeddings, classification_metrics, zeroshot_classifier


# --------------------------------------------------------------------------------------------- ranking / R@K
def test_ranks_hand_computed_several_captions_per_image():
    # 2 images, 4 captions; captions 0,1 belong to image 0, captions 2,3 to image 1
    img = np.array([[1.0, 0.0], [0.0, 1.0]])
    cap = np.array([[0.2, 0.98], [0.9, 0.43], [0.6, 0.8], [0.0, 1.0]])
    owner = np.array([0, 0, 1, 1])
    # image 0 scores captions: .2 .9 .6 0 -> best correct .9 (cap 1), wrong >= .9: none -> rank 0
    # image 1 scores captions: .98 .43 .8 1 -> best correct 1.0 (cap 3) -> rank 0
    assert ranks(img, cap, [0, 1], owner).tolist() == [0, 0]
    # text->image: cap0 scores (.2,.98) correct img0 .2 < .98 -> rank 1; cap1 (.9,.43) -> 0;
    # cap2 (.6,.8) correct img1 -> 0; cap3 (0,1) -> 0
    assert ranks(cap, img, owner, [0, 1]).tolist() == [1, 0, 0, 0]
    m = retrieval_metrics(img, cap, owner, ks=(1, 5))
    assert m["i2t_R@1"] == 100.0 and m["t2i_R@1"] == 75.0 and m["t2i_R@5"] == 100.0
    assert m["n_images"] == 2 and m["n_texts"] == 4


def test_hit_if_any_correct_item_in_top_k():
    # one query, gallery of 5: correct items are 3 and 4 with scores .5 and .1; wrong items .9 .8 .7
    q = np.array([[1.0]])
    g = np.array([[0.9], [0.8], [0.7], [0.5], [0.1]])
    r = ranks(q, g, [7], [1, 2, 3, 7, 7])
    assert r.tolist() == [3]           # three wrong items above the best correct one
    assert recall_at(r, (1, 3, 4)) == {1: 0.0, 3: 0.0, 4: 1.0}


def test_ties_are_pessimistic():
    q = np.ones((3, 4))
    g = np.ones((5, 4))                 # every score identical
    r = ranks(q, g, [0, 1, 2], [0, 1, 2, 3, 3])
    assert r.tolist() == [4, 4, 4]      # all 4 wrong items tie with the correct one and count above it
    assert retrieval_metrics(np.ones((2, 3)), np.ones((4, 3)), [0, 0, 1, 1], ks=(1,))["t2i_R@1"] == 0.0
    # a tie with ANOTHER correct item does not hurt
    assert ranks(np.ones((1, 2)), np.ones((3, 2)), [5], [5, 5, 9]).tolist() == [1]


def test_k_larger_than_gallery_counts_every_query():
    rng = np.random.default_rng(0)
    img, cap = rng.normal(size=(3, 8)), rng.normal(size=(6, 8))
    m = retrieval_metrics(img, cap, [0, 0, 1, 1, 2, 2], ks=(1, 10, 1000))
    assert m["i2t_R@10"] == 100.0 and m["t2i_R@10"] == 100.0 and m["t2i_R@1000"] == 100.0
    assert m["i2t_R@1"] <= 100.0


def test_chunking_matches_brute_force():
    rng = np.random.default_rng(1)
    img = rng.normal(size=(37, 16)).astype(np.float32)
    owner = rng.integers(0, 37, size=120)
    owner[:37] = np.arange(37)
    cap = (img[owner] + rng.normal(scale=1.5, size=(120, 16))).astype(np.float32)
    brute = []
    for i in range(37):
        s = img[i] @ cap.T
        correct = owner == i
        best = s[correct].max()
        brute.append(int(((s >= best) & ~correct).sum()))
    for chunk in (1, 7, 4096):
        assert ranks(img, cap, np.arange(37), owner, chunk=chunk).tolist() == brute
    # the one-pass pair ranking used by retrieval_metrics agrees with two generic ranks() passes
    t2i = ranks(cap, img, owner, np.arange(37))
    for chunk in (1, 5, 1024):
        a, b = paired_ranks(img, cap, owner, chunk=chunk)
        assert a.tolist() == brute and b.tolist() == t2i.tolist()


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="no correct item"):
        ranks(np.ones((2, 2)), np.ones((2, 2)), [0, 5], [0, 1])
    with pytest.raises(ValueError, match="NaN"):
        ranks(np.array([[np.nan, 1.0]]), np.ones((1, 2)), [0], [0])
    with pytest.raises(ValueError, match="dim"):
        ranks(np.ones((1, 3)), np.ones((1, 2)), [0], [0])
    with pytest.raises(ValueError, match="text_image"):
        retrieval_metrics(np.ones((2, 2)), np.ones((2, 2)), [0, 2])


# --------------------------------------------------------------------------------------------- zero-shot
def test_classification_metrics_hand_computed():
    classes = np.eye(3)
    # image labels 0,0,0,1 (class 2 has no image). scores = image @ classes.T = the image vector itself
    imgs = np.array([[0.9, 0.1, 0.0],     # label 0: rank 0
                     [0.2, 0.7, 0.1],     # label 0: rank 1 (class 1 above)
                     [0.1, 0.2, 0.8],     # label 0: rank 2
                     [0.0, 0.9, 0.1]])    # label 1: rank 0
    m = classification_metrics(imgs, classes, [0, 0, 0, 1], ks=(1, 2, 5))
    assert m["top1"] == pytest.approx(50.0)
    assert m["top2"] == pytest.approx(75.0)
    assert m["top5"] == pytest.approx(100.0)                       # k > number of classes
    assert m["mean_per_class_recall"] == pytest.approx(100 * (1 / 3 + 1) / 2)   # classes 0 and 1 only
    assert m["n_classes"] == 3


def test_class_vector_is_renormalised_mean_of_normalised_prompts():
    table = {"p a": [3.0, 0.0], "q a": [0.0, 1.0], "p b": [1.0, 1.0]}
    w = class_embeddings(lambda xs: np.array([table[x] for x in xs]), [["p a", "q a"], ["p b"]], progress=False)
    # class a: mean of (1,0) and (0,1) = (.5,.5) -> renormalised (.7071,.7071); NOT the mean of raw (3,0),(0,1)
    np.testing.assert_allclose(w, [[2 ** -0.5, 2 ** -0.5], [2 ** -0.5, 2 ** -0.5]], atol=1e-6)


def test_prompt_sets():
    assert len(CLIP80) == 80 and all("{c}" in t for t in CLIP80)
    p = build_prompts(["crane", "tench"], "wordnet", ["lifts and moves heavy objects", None])
    assert p == [["crane, lifts and moves heavy objects"], ["a photo of a tench."]]
    assert len(build_prompts(["dog"], "clip80+wordnet", ["a domestic animal"])[0]) == 81
    with pytest.raises(ValueError, match="gloss"):
        build_prompts(["dog"], "wordnet")
    with pytest.raises(ValueError, match="unknown prompt set"):
        build_prompts(["dog"], "nope")
    assert prompt_set_id("photo") != prompt_set_id("clip80")


def test_classifier_cache_skips_text_encoder(tmp_path):
    calls = []

    def enc(xs):
        calls.append(len(xs))
        return np.stack([np.array([len(x), x.count("a") + 1.0, 1.0]) for x in xs])

    names = ["cat", "dog", "sea lion"]
    w1 = zeroshot_classifier(enc, names, "photo", cache_dir=tmp_path, model_fingerprint="m1", progress=False)
    n = len(calls)
    w2 = zeroshot_classifier(enc, names, "photo", cache_dir=tmp_path, model_fingerprint="m1", progress=False)
    assert len(calls) == n and np.array_equal(w1, w2)             # served from disk
    zeroshot_classifier(enc, names, "clip80", cache_dir=tmp_path, model_fingerprint="m1", progress=False)
    zeroshot_classifier(enc, names[:2], "photo", cache_dir=tmp_path, model_fingerprint="m1", progress=False)
    zeroshot_classifier(enc, names, "photo", cache_dir=tmp_path, model_fingerprint="m2", progress=False)
    assert len(calls) == n + 3                                    # prompt set / classes / model each re-embed
    assert len(list(tmp_path.glob("zs-*.npy"))) == 4


def test_classnames_from_wordnet():
    wnids = imagenet_wnids()
    assert len(wnids) == 1000 and wnids[0] == "n01440764"
    names = names_for_wnids(wnids)
    assert names[:2] == ["tench", "goldfish"]
    assert names.count("maillot") == 1                            # two synsets share "maillot": disambiguated
    assert "freshwater" in wnid_gloss("n01440764")
    if wordnet_dict_dir() is not None:                            # dictionary fallback agrees with timm's table
        lem, gloss = _wordnet_synset("n03126707")
        assert lem == wnid_lemmas("n03126707") and gloss == wnid_gloss("n03126707")


def _write_images(paths, size=40, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(p)


def test_labeled_image_folders(tmp_path):
    _write_images([tmp_path / "tree" / "red_fox" / "a.jpg", tmp_path / "tree" / "n01443537" / "b.png",
                   tmp_path / "flat" / "n01440764_x.jpg", tmp_path / "flat" / "n01443537_y.jpg"])
    d = load_labeled_images(tmp_path / "tree")
    assert d.classnames == ["goldfish", "red fox"] and d.labels.tolist() == [0, 1] and d.images[0].name == "b.png"
    f = load_labeled_images(tmp_path / "flat")
    assert f.class_ids == ["n01440764", "n01443537"] and f.labels.tolist() == [0, 1] and f.glosses[0]


def _flickr_like(root: Path, n: int = 12) -> Path:
    from conftest import TINY_WORDS

    names = [f"im{i:03d}.jpg" for i in range(n)]
    _write_images([root / "images" / x for x in names])
    rng = np.random.default_rng(0)
    lines = [f"{x}#{j}\t{' '.join(rng.choice(TINY_WORDS, 6))}" for x in names for j in range(3)]
    (root / "captions.txt").write_bytes(("\r\n".join(lines) + "\r\n").encode())
    (root / "train_images.txt").write_text("\n".join(names[: n - 4]) + "\n")
    (root / "test_images.txt").write_text("\n".join(names[n - 4:]) + "\n")
    return root


def test_paired_set_flickr_layout(tmp_path):
    root = _flickr_like(tmp_path / "f8k")
    p = PairedSet.from_flickr8k(root, "test")
    assert len(p) == 4 and len(p.captions) == 12 and not p.captions[0].endswith("\r")
    assert p.caption_image.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    s = PairedSet.from_flickr8k(root, "train").subset(3, seed=1)
    assert len(s) == 3 and len(s.captions) == 9 and sorted(set(s.caption_image.tolist())) == [0, 1, 2]
    by = s.captions_by_image()
    assert all(len(c) == 3 for c in by)


# --------------------------------------------------------------------------------------------- CLIs and model
@pytest.fixture(scope="module")
def tiny_model_dir(tiny_vision, tiny_text, tmp_path_factory):
    import torch

    from align.model import AlignedModel, DualProjector
    from align.projectors import ProjectorConfig

    cfg = ProjectorConfig(kind="linear", out_dim=16, dropout=0.0)
    torch.manual_seed(0)
    heads = DualProjector(cfg, cfg, tiny_vision.dim, tiny_text.dim)
    m = AlignedModel.from_parts(heads, tiny_vision, tiny_text, cfg, cfg, pooling="cls")
    return m.save_pretrained(tmp_path_factory.mktemp("model") / "tiny")


def _paths_for_tiny(model_dir: Path, tiny_vision_dir: Path, tiny_text_dir: Path) -> list[str]:
    return ["--vision-path", str(tiny_vision_dir), "--text-path", str(tiny_text_dir)]


def test_align_eval_cli_retrieval_and_cached_features(tmp_path, tiny_model_dir, tiny_vision, tiny_vision_dir,
                                                      tiny_text_dir):
    from align.cli import main

    root = _flickr_like(tmp_path / "f8k")
    extra = _paths_for_tiny(tiny_model_dir, tiny_vision_dir, tiny_text_dir)
    out = tmp_path / "rep"
    assert main(["eval", str(tiny_model_dir), "--task", "retrieval", "--data", str(root), "--out", str(out)]
                + extra) == 0
    res = json.loads((out / "retrieval.json").read_text())
    assert res["metrics"]["n_images"] == 4 and res["metrics"]["n_texts"] == 12
    assert (out / "retrieval.png").stat().st_size > 1000 and "t2i_R@1" in (out / "retrieval.md").read_text()
    # same numbers from cached frozen features (no image re-encoding)
    pairs = PairedSet.from_flickr8k(root, "test")
    from align.eval.retrieval import embed_images

    feats = embed_images(lambda ims: tiny_vision.encode(ims, pooling="cls"), pairs.image_paths, progress=False)
    np.savez(tmp_path / "f.npz", features=feats, keys=np.array([p.name for p in pairs.image_paths]))
    out2 = tmp_path / "rep2"
    assert main(["eval", str(tiny_model_dir), "--task", "retrieval", "--data", str(root), "--features",
                 str(tmp_path / "f.npz"), "--out", str(out2)] + extra) == 0
    res2 = json.loads((out2 / "retrieval.json").read_text())
    for k in ("i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5"):
        assert res2["metrics"][k] == pytest.approx(res["metrics"][k])


def test_align_eval_cli_zeroshot_and_errors(tmp_path, tiny_model_dir, tiny_vision_dir, tiny_text_dir, capsys):
    from align.cli import main

    _write_images([tmp_path / "zs" / c / f"{i}.jpg" for c in ("dog", "cat", "bird") for i in range(2)])
    extra = _paths_for_tiny(tiny_model_dir, tiny_vision_dir, tiny_text_dir)
    out = tmp_path / "rep"
    assert main(["eval", str(tiny_model_dir), "--task", "zeroshot", "--data", str(tmp_path / "zs"),
                 "--prompts", "photo", "--out", str(out)] + extra) == 0
    m = json.loads((out / "zeroshot.json").read_text())["metrics"]
    assert m["n_images"] == 6 and m["n_classes"] == 3 and m["top5"] == 100.0
    assert len(list((out / "cache").glob("zs-*.npy"))) == 1       # classifier cached for the next run
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "nomodel"), "--task", "zeroshot", "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "not an aligned model" in err[0]


def test_clip_benchmark_adapter(tiny_model_dir, tiny_vision_dir, tiny_text_dir):
    import torch
    from PIL import Image

    from align.eval import ClipBenchmarkModel
    from align.model import AlignedModel

    model = AlignedModel.from_pretrained(tiny_model_dir, vision_path=str(tiny_vision_dir),
                                         text_path=str(tiny_text_dir))
    cb = ClipBenchmarkModel(model, image_size=64)
    rng = np.random.default_rng(0)
    ims = [Image.fromarray(rng.integers(0, 255, (70 + 9 * i, 90, 3), dtype=np.uint8)) for i in range(3)]
    batch = torch.stack([cb.transform(im) for im in ims])
    assert batch.shape == (3, 3, 64, 64) and batch.dtype == torch.uint8
    e = cb.encode_image(batch)
    direct = model.encode_image([Image.fromarray(x.permute(1, 2, 0).numpy()) for x in batch])
    np.testing.assert_allclose(e.numpy(), direct, atol=1e-6)
    t = cb.encode_text(cb.tokenizer(["a dog", "a cat"]).to("cpu"))
    assert t.shape == (2, 16) and torch.allclose(t.norm(dim=1), torch.ones(2), atol=1e-5)


def test_align_select_cli_ranks_and_resumes(tmp_path, tiny_vision_dir, tiny_text_dir):
    from align.cli import main

    root = _flickr_like(tmp_path / "f8k", n=30)
    out = tmp_path / "sel"
    args = ["select", "--vision", str(tiny_vision_dir), f"{tiny_vision_dir}@layer=1,pooling=mean",
            "--text", str(tiny_text_dir), "--data", str(root), "--split", "train", "--limit", "20",
            "--knn-k", "3", "--batch-size", "8", "--out", str(out), "--probe-steps", "5"]
    assert main(args) == 0
    res = json.loads((out / "selection.json").read_text())
    rows = res["rows"]
    assert [r["rank"] for r in rows] == [1, 2] and rows[0]["linear_cka"] >= rows[1]["linear_cka"]
    assert all(0.0 <= r["linear_cka"] <= 1.0 and 0.0 <= r["mutual_knn"] <= 1.0 for r in rows)
    assert "val_loss" in rows[0] and (out / "selection.png").stat().st_size > 1000
    parts = sorted((out / "cache").rglob("part-*.npy"))
    assert len(parts) == 2 * 3                                     # 20 images / batch 8 = 3 parts per encoder
    parts[-1].unlink()                                             # simulate a kill before the last batch
    assert main(args) == 0
    res2 = json.loads((out / "selection.json").read_text())
    assert [r["linear_cka"] for r in res2["rows"]] == pytest.approx([r["linear_cka"] for r in rows])
    assert main(["select", "--vision", "x@depth=3", "--text", "y", "--data", str(root)]) == 2


def test_align_eval_from_feature_cache_matches_encoding(tmp_path, tiny_model_dir, tiny_vision, tiny_text,
                                                         tiny_vision_dir, tiny_text_dir, capsys):
    """`align eval --features <align extract cache>`: projectors only, same numbers as full re-encoding."""
    from align.cli import main
    from align.data import Sample
    from align.features import FeatureConfig, extract_features

    root = _flickr_like(tmp_path / "f8k")
    pairs = PairedSet.from_flickr8k(root, "test")
    by = pairs.captions_by_image()
    samples = [Sample(key=p.name, image=str(p), captions=by[i]) for i, p in enumerate(pairs.image_paths)]
    extract_features(samples, tiny_vision, tiny_text, tmp_path / "feats", FeatureConfig(dtype="float32"),
                     progress=False)
    extra = ["--vision-path", str(tiny_vision_dir), "--text-path", str(tiny_text_dir)]
    assert main(["eval", str(tiny_model_dir), "--task", "retrieval", "--features", str(tmp_path / "feats"),
                 "--out", str(tmp_path / "a")] + extra) == 0
    # what was evaluated, from the cache (was "language: unknown (? images, ? captions)")
    printed = capsys.readouterr().out
    assert "?" not in printed and "queries: 4 images, 12 captions" in printed, printed
    assert main(["eval", str(tiny_model_dir), "--task", "retrieval", "--data", str(root),
                 "--out", str(tmp_path / "b")] + extra) == 0
    ra = json.loads((tmp_path / "a" / "retrieval.json").read_text())
    a, b = ra["metrics"], json.loads((tmp_path / "b" / "retrieval.json").read_text())["metrics"]
    assert a["n_texts"] == b["n_texts"] == 12
    # the report names the features it came from (was "data: `None`", plot "retrieval (None)")
    assert ra["meta"]["data"] == str(tmp_path / "feats") and ra["meta"]["name"] == "features feats"
    md = (tmp_path / "a" / "retrieval.md").read_text()
    assert "None" not in md and "features feats" in md
    for k in ("i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5", "t2i_median_rank"):
        assert a[k] == pytest.approx(b[k]), k


def test_hf_dataset_label_column(tmp_path):
    import datasets
    from PIL import Image

    from align.eval.classnames import from_hf_dataset

    ims = [Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(4)]
    feats = datasets.Features({"image": datasets.Image(),
                               "label": datasets.ClassLabel(names=["n01440764", "n01443537", "n01484850"])})
    ds = datasets.Dataset.from_dict({"image": ims, "label": [2, 0, 0, 1]}, features=feats)
    d = from_hf_dataset(ds)
    assert d.classnames[:2] == ["tench", "goldfish"] and d.labels.tolist() == [2, 0, 0, 1]
    assert d.open(0).size == (8, 8) and d.glosses[2]
    plain = datasets.Dataset.from_dict({"img": ims[:2], "y": ["red_fox", "cat"]},
                                       features=datasets.Features({"img": datasets.Image(), "y": datasets.Value("string")}))
    p = from_hf_dataset(plain, label_column="y", image_column="img")
    assert p.classnames == ["cat", "red fox"] and p.labels.tolist() == [1, 0]
    from tether.recipe import RecipeError

    with pytest.raises(RecipeError, match="no column"):
        from_hf_dataset(plain, label_column="label")


def test_spearman_and_ranking_agreement():
    from align.eval.select import ranking_agreement, spearman

    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties share average ranks: a = ranks (0.5, 0.5, 2, 3) vs b = (0, 1, 2, 3) -> rho = 0.9486833
    assert spearman([5, 5, 7, 9], [1, 2, 3, 4]) == pytest.approx(0.9486833, abs=1e-6)
    rows = [{"linear_cka": c, "unbiased_cka": c, "mutual_knn": c, "val_loss": 3 - c, "val_t2i_R@1": 10 * c}
            for c in (0.1, 0.5, 0.9)]
    agree = ranking_agreement(rows)
    assert agree["linear_cka_vs_val_loss"] == pytest.approx(1.0)          # lower loss = better: sign flipped
    assert agree["mutual_knn_vs_val_t2i_R@1"] == pytest.approx(1.0)


def test_align_eval_cli_coco_json_and_a_broken_image(tmp_path, tiny_model_dir, tiny_vision_dir, tiny_text_dir,
                                                     capsys):
    """`align eval --data annotations/captions_val2017.json` (COCO layout, images in val2017/ beside it) with one
    truncated image: evaluated, the file named on stderr and counted in the report."""
    from align.cli import main
    from conftest import TINY_WORDS

    coco = tmp_path / "coco"
    names = [f"{i:012d}.jpg" for i in range(5)]
    _write_images([coco / "val2017" / n for n in names])
    broken = coco / "val2017" / names[3]
    broken.write_bytes(broken.read_bytes()[:200])
    rng = np.random.default_rng(0)
    doc = {"images": [{"id": i + 1, "file_name": n} for i, n in enumerate(names)],
           "annotations": [{"id": 10 * i + j, "image_id": i + 1, "caption": " ".join(rng.choice(TINY_WORDS, 5))}
                           for i in range(5) for j in range(2)]}
    (coco / "annotations").mkdir()
    (coco / "annotations" / "captions_val2017.json").write_text(json.dumps(doc))
    out = tmp_path / "rep"
    capsys.readouterr()
    assert main(["eval", str(tiny_model_dir), "--task", "retrieval", "--data",
                 str(coco / "annotations" / "captions_val2017.json"), "--out", str(out)]
                + _paths_for_tiny(tiny_model_dir, tiny_vision_dir, tiny_text_dir)) == 0
    err = capsys.readouterr().err
    assert f"skipped {broken}: corrupt_image" in err
    res = json.loads((out / "retrieval.json").read_text())
    assert res["metrics"]["n_images"] == 4 and res["metrics"]["n_texts"] == 8 and res["metrics"]["n_skipped"] == 1
    assert len(res["curves"]["K"]) == 50 and "captions_val2017" in (out / "retrieval.md").read_text()
    # the flags: images moved away (--image-root), and a JSONL with its own column names
    (coco / "val2017").rename(tmp_path / "pics")
    extra = _paths_for_tiny(tiny_model_dir, tiny_vision_dir, tiny_text_dir)
    assert main(["eval", str(tiny_model_dir), "--task", "retrieval", "--data",
                 str(coco / "annotations" / "captions_val2017.json"), "--image-root", str(tmp_path / "pics"),
                 "--out", str(tmp_path / "rep2")] + extra) == 0
    jl = tmp_path / "pairs.jsonl"
    jl.write_text("".join(json.dumps({"file_name": f"pics/{n}", "text": "a dog on grass"}) + "\n" for n in names))
    assert main(["eval", str(tiny_model_dir), "--task", "retrieval", "--data", str(jl), "--image-column",
                 "file_name", "--caption-column", "text", "--out", str(tmp_path / "rep3")] + extra) == 0
    assert json.loads((tmp_path / "rep3" / "retrieval.json").read_text())["metrics"]["n_skipped"] == 1


def _per_class(n_classes: int, n: int) -> list[dict]:
    return [{"class": f"c{i:02d}", "n": n, "top1": 100.0 if i % 3 == 0 else 0.0, "top5": 100.0 if i % 2 == 0 else 0.0,
             "confused_with": "c00 (1)"} for i in range(n_classes)]


@pytest.mark.parametrize("n, collapsed", [(1, True), (8, False)])
def test_zero_shot_report_collapses_best_worst_tables_with_few_images_per_class(tmp_path, n, collapsed):
    from align.eval.report import write_eval

    result = {"metrics": {"top1": 34.0}, "meta": {"data": "x"}, "per_class": _per_class(30, n)}
    write_eval(result, tmp_path, "zeroshot")
    md = (tmp_path / "zeroshot.md").read_text()
    assert ("Best 10 classes" not in md) == collapsed and ("Worst 10 classes" not in md) == collapsed
    if collapsed:
        assert "30 classes with a median of 1 image(s) each" in md
        assert "10 classes all right at top-1, 20 all wrong, 0 mixed; 15 all right at top-5" in md
