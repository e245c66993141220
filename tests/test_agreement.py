"""The agreement stage: image–text agreement scores and filters, image-verified senses, the scorers it loads."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from curate.agreement import (AgreementConfig, ensemble, leave_one_out, percentile_bounds,
                              run_agreement, sense_prompts)
from curate.catalog import Catalog
from curate.download import DownloadConfig, load_selection, run_download
from httpserver import make_build
from tether.recipe import RecipeError, parse
from tether.scorers import ClipScorer, Scorer, load_scorer

INSECT, GAME = "n02229544", "n00476389"  # WordNet 3.0: cricket the insect, cricket the game
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}


class ColourScorer(Scorer):
    """Images → their dominant colour's axis; texts → the axes of the words they use (insect/chirping = red,
    game/bat/ball = blue, grass = green). Counts what it embedded."""

    AXES = {"red": 0, "blue": 1, "green": 2}
    WORDS = {"insect": 0, "chirping": 0, "leaping": 0, "game": 1, "bat": 1, "ball": 1, "played": 1, "grass": 2}

    def __init__(self):
        super().__init__("colour", "colour-v1")
        self.images = 0

    def encode_image(self, images, batch_size=32):
        self.images += len(images)
        out = np.zeros((len(images), 4), np.float32)
        for i, im in enumerate(images):
            r, g, b = np.asarray(im.convert("RGB"), np.float32).reshape(-1, 3).mean(0)
            out[i, int(np.argmax([r, b, g]))] = 1.0
        return out

    def encode_text(self, texts, batch_size=64):
        out = np.full((len(texts), 4), 0.05, np.float32)
        out[:, 3] = 1.0  # the words it does not know
        for i, t in enumerate(texts):
            for w in t.lower().replace(",", " ").replace(".", " ").split():
                if w in self.WORDS:
                    out[i, self.WORDS[w]] += 1.0
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def _build(tmp_path: Path) -> tuple[Path, Path]:
    img = tmp_path / "img"
    img.mkdir()
    for name, rgb in COLOURS.items():
        Image.new("RGB", (48, 40), rgb).save(img / f"{name}.jpg", quality=95)
    rows = [  # (uid, image, caption, concepts)
        ("a", "red", "a cricket chirping on a leaf", [INSECT]),          # the insect, and it looks it
        ("b", "blue", "boys play cricket with a bat", [INSECT]),         # the game matched as the insect: refuted
        ("c", "red", "a leaping cricket", [INSECT]),                     # same image bytes as a: one embedding
        ("d", "green", "a dog on the grass", ["n02084071"]),             # no rival sense checked: kept
        ("e", "blue", "a red leaf", []),                                 # caption disagrees with its image
        ("f", "blue", "a dog watches a cricket game", [INSECT, "n02084071"]),  # loses the insect, keeps the dog
    ]
    sel = make_build(tmp_path / "b", [{"uid": u, "path": str(img / f"{c}.jpg"), "caption": t, "concept_ids": ids,
                                        "source": "s1" if u in "abc" else "s2"} for u, c, t, ids in rows])
    with Catalog(tmp_path / "b" / "catalog.duckdb") as cat:
        cat.execute("UPDATE matches SET span = 'cricket' WHERE concept_id = ?", [INSECT])
        cat.execute("INSERT INTO surface_forms VALUES ('cricket', ?, 0, 'lemma', 'cricket')", [INSECT])
        cat.execute("INSERT INTO concepts(concept_id, name, gloss) VALUES (?, 'cricket', 'leaping insect')", [INSECT])
        cat.execute("INSERT INTO concepts(concept_id, name, gloss) VALUES ('n02084071', 'dog', 'a domestic dog')")
        load_selection(cat, sel)
        run_download(cat, DownloadConfig(), tmp_path / "b", progress=False)
    return tmp_path / "b", sel


def test_pure_helpers():
    assert sense_prompts(["a photo of a {lemma}, {gloss}.", "{name}"], "cricket", "cricket (game)",
                         "a game played; teams take turns") == ["a photo of a cricket, a game played.", "cricket (game)"]
    e = ensemble(np.eye(3, dtype=np.float32), [2, 1])
    assert np.allclose(e, [[2 ** -0.5, 2 ** -0.5, 0], [0, 0, 1]])
    assert percentile_bounds(np.array([1.0, 2, 3, 4, 10]), ["x", "x", "x", "x", "y"], 50) == {"x": 2.5, "y": 10.0}
    emb = np.array([[1, 0], [1, 0], [0, 1], [1, 0]], np.float32)
    sims = leave_one_out(emb, np.array([0, 1, 2, 3]), np.array(["c"] * 4), min_samples=2)
    assert np.allclose(sims, [2 / np.sqrt(5), 2 / np.sqrt(5), 0.0, 2 / np.sqrt(5)])
    assert np.isnan(leave_one_out(emb, np.array([0, 1]), np.array(["c", "c"]), min_samples=2)).all()


def test_recipe_errors_are_one_line():
    with pytest.raises(RecipeError, match="needs a scorer"):
        parse(AgreementConfig, {"enabled": True}, "media.agreement")
    with pytest.raises(RecipeError, match="names none of"):
        parse(AgreementConfig, {"senses": {"templates": ["a photo"]}}, "media.agreement")
    with pytest.raises(RecipeError, match="bottom_percentile"):
        parse(AgreementConfig, {"bottom_percentile": 150}, "media.agreement")
    with pytest.raises(RecipeError, match="not a tether model folder"):
        load_scorer("/nonexistent/folder", kind="aligned")
    with pytest.raises(RecipeError, match="cannot load"):
        load_scorer("/nonexistent/folder")


def test_agreement_filters_and_sense_checks(tmp_path):
    build, _ = _build(tmp_path)
    scorer = ColourScorer()
    cfg = parse(AgreementConfig, {"enabled": True, "scorer": "colour", "min_score": 0.2,
                                  "senses": {"enabled": True, "margin": 0.05}}, "media.agreement")
    with Catalog(build / "catalog.duckdb") as cat:
        res = run_agreement(cat, cfg, build, scorer=scorer, progress=False)
        assert res.candidates == 6 and res.images == 3 and scorer.images == 3  # a and c share one image
        dec = {u: (k, r) for u, k, r in cat.execute(
            "SELECT uid, kept, reason FROM decisions WHERE stage = 'agreement'").fetchall()}
        assert dec["a"][0] and dec["c"][0] and dec["d"][0]
        assert not dec["e"][0] and "image-text agreement" in dec["e"][1] and "< min_score 0.200" in dec["e"][1]
        assert not dec["b"][0] and dec["b"][1].startswith("image sense check: 'cricket' looks like cricket")
        assert GAME in dec["b"][1]
        checks = {(u, c): (k, o) for u, c, k, o in cat.execute(
            "SELECT uid, concept_id, kept, other_id FROM sense_checks").fetchall()}
        assert checks == {("a", INSECT): (True, GAME), ("b", INSECT): (False, GAME), ("c", INSECT): (True, GAME),
                          ("f", INSECT): (False, GAME)}
        assert dec["f"][0] and "refuted 1 of 2 concepts" in dec["f"][1]
        scores = dict(cat.execute("SELECT uid, score FROM agreement_scores").fetchall())
        assert scores["a"] > 0.7 and scores["e"] < 0.2
        # a rerun reuses every cached image embedding and caption score
        again = ColourScorer()
        run_agreement(cat, cfg, build, scorer=again, progress=False)
        assert again.images == 0
        # the per-source percentile rule: the bottom half of each source
        cfg2 = parse(AgreementConfig, {"enabled": True, "scorer": "colour", "bottom_percentile": 50},
                     "media.agreement")
        res2 = run_agreement(cat, cfg2, build, scorer=again, progress=False)
        gone = {u for (u,) in cat.execute("SELECT uid FROM decisions WHERE stage='agreement' AND NOT kept").fetchall()}
        assert res2.dropped["bottom_percentile"] == len(gone) and "e" in gone and "a" not in gone
        assert cat.scalar("SELECT count(*) FROM sense_checks") == 0  # senses off: no checks left behind


def test_media_stages_run_agreement_then_rebalance_without_refuted_pairs(tmp_path):
    from curate.media import MediaRecipe, run_after_download

    build, _ = _build(tmp_path)
    recipe = parse(MediaRecipe, {"image_dedup": {"phash": {"enabled": False}, "exact": False},
                                 "agreement": {"enabled": True, "scorer": "colour",
                                               "senses": {"enabled": True}},
                                 "rebalance": {"balance": {"method": "t", "t": 100}},
                                 "shards": {"samples_per_shard": 10}}, "media")
    with Catalog(build / "catalog.duckdb") as cat:
        cat.mark_done("download")
        rep = run_after_download(cat, recipe, build, progress=False, scorer=ColourScorer())
        assert rep["agreement"] == {"kept": 5, "senses": 1} and rep["concept_matches_refuted"] == 2
        # the refuted sample is gone before the re-balance: it counts for no concept there
        assert cat.scalar("SELECT count(*) FROM decisions WHERE stage='rebalance' AND uid='b'") == 0
        # rerun: every stage skips (same parameters and inputs; the shards stage re-checks its files)
        before = cat.execute("SELECT stage, finished FROM stages WHERE stage <> 'shards' ORDER BY 1").fetchall()
        run_after_download(cat, recipe, build, progress=False, scorer=ColourScorer())
        assert cat.execute("SELECT stage, finished FROM stages WHERE stage <> 'shards' ORDER BY 1").fetchall() == before
    meta = {}
    for tar in sorted((build / "shards").glob("shard-*.tar")):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                if m.name.endswith(".json"):
                    j = json.loads(t.extractfile(m).read())
                    meta[j["uid"]] = j["concept_ids"]
    assert "b" not in meta and meta["f"] == ["n02084071"] and meta["a"] == [INSECT]
    assert (build / "media" / "report.json").is_file()
    from curate.card import write_card

    with Catalog(build / "catalog.duckdb") as cat:
        text = write_card(cat, build, "t").read_text()
    assert "## Image checks (media.agreement)" in text and "| senses | 1 |" in text and "| min_score | 0 |" in text
    assert "2 of 4 checked concept matches refuted" in text and "| cricket | n02229544 | 2 | 4 |" in text
    # the explorer: the concept's samples by agreement, worst first, with this concept's sense check
    from fastapi.testclient import TestClient

    from curate.serve import create_app

    with Catalog(build / "catalog.duckdb") as cat:
        worst_first = [u for (u,) in cat.execute(
            "SELECT uid FROM agreement_scores WHERE uid IN ('a', 'b', 'c', 'f') ORDER BY score, uid").fetchall()]
    page = TestClient(create_app(build)).get(f"/concept/{INSECT}").text
    assert "By image–text agreement, worst first" in page
    section = page[page.index('id="agreement"'):]
    order = [section.index(f">{u}</a></div></div>") for u in worst_first]
    assert order == sorted(order) and len(order) == 4
    assert "refuted: &#39;cricket&#39; looks like cricket" in section and "confirmed" in section
    assert TestClient(create_app(build)).get(f"/concept/{INSECT}?apage=0").status_code == 400


def test_tiny_clip_folder_scores_like_its_model(tmp_path, tiny_text_dir):
    """A Hugging Face CLIPModel saved locally (tiny, random) loads by path through the real loading code and
    scores exactly what transformers' own get_*_features give."""
    import torch
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel

    tok = AutoTokenizer.from_pretrained(tiny_text_dir)
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config={"vocab_size": tok.vocab_size, "hidden_size": 32, "intermediate_size": 64,
                                  "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 64},
                     vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                    "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
                     projection_dim=16)
    model = CLIPModel(cfg).eval()
    d = tmp_path / "tiny-clip"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(d)
    s = load_scorer(str(d))
    assert isinstance(s, ClipScorer) and s.fingerprint.startswith("clip:")
    ims = [Image.new("RGB", (40, 36), c) for c in COLOURS.values()]
    texts = ["a dog on the grass", "a cat"]
    got_i, got_t = s.encode_image(ims), s.encode_text(texts)
    with torch.no_grad():
        px = CLIPImageProcessor.from_pretrained(d)(images=ims, return_tensors="pt")["pixel_values"]
        want_i = model.get_image_features(pixel_values=px)
        b = tok(texts, padding=True, return_tensors="pt")
        want_t = model.get_text_features(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    want_i = getattr(want_i, "pooler_output", want_i)
    want_t = getattr(want_t, "pooler_output", want_t)
    want_i = (want_i / want_i.norm(dim=-1, keepdim=True)).numpy()
    want_t = (want_t / want_t.norm(dim=-1, keepdim=True)).numpy()
    assert got_i.shape == (3, 16) and np.abs(got_i - want_i).max() < 1e-5 and np.abs(got_t - want_t).max() < 1e-5
    assert load_scorer(str(d)).fingerprint == s.fingerprint


def test_scorer_path_resolves_against_the_recipe_folder(tmp_path):
    from curate.media import load_media_recipe

    (tmp_path / "recipes").mkdir()
    r = tmp_path / "recipes" / "m.yaml"
    r.write_text("agreement: {enabled: true, scorer: ../runs/model}\n")
    media, _ = load_media_recipe(tmp_path, str(r))
    assert media.agreement.scorer == str(tmp_path / "runs" / "model")
    r.write_text("agreement: {enabled: true, scorer: openai/clip-vit-base-patch32}\n")  # a hub id stays
    assert load_media_recipe(tmp_path, str(r))[0].agreement.scorer == "openai/clip-vit-base-patch32"
