import numpy as np
import pytest
from PIL import Image

from tether.recipe import RecipeError, Strict, load_recipe, expand


class Inner(Strict):
    t: int = 3


class Outer(Strict):
    name: str
    inner: Inner = Inner()


def test_recipe_errors_are_one_line(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: x\ninner: {t: abc}\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(p, Outer)
    assert "inner.t" in str(e.value) and "\n" not in str(e.value)
    p.write_text("name: x\nbogus: 1\n")
    with pytest.raises(RecipeError, match="bogus: unknown key"):
        load_recipe(p, Outer)
    p.write_text("name: [x\n")
    with pytest.raises(RecipeError, match="malformed YAML"):
        load_recipe(p, Outer)
    p.write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(RecipeError, match="not UTF-8"):
        load_recipe(p, Outer)
    p.write_text("")
    with pytest.raises(RecipeError, match="empty"):
        load_recipe(p, Outer)
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml", Outer)
    p.write_text("name: x\n")
    assert load_recipe(p, Outer, overrides=["inner.t=7"]).inner.t == 7


def test_expand_default(monkeypatch):
    monkeypatch.delenv("TETHER_X", raising=False)
    assert expand("${TETHER_X:-abc}/d") == "abc/d"
    monkeypatch.setenv("TETHER_X", "q")
    assert expand("${TETHER_X:-abc}/d") == "q/d"


def test_tiny_encoders(tiny_text, tiny_vision):
    e = tiny_text.encode(["a dog runs", "two cats"])
    assert e.shape == (2, 32) and np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    assert not np.allclose(e[0], e[1], atol=1e-3), "tiny tokenizer maps every word to [UNK]"
    ims = [Image.new("RGB", (80, 60), c) for c in ("red", "blue")]
    for pooling, d in (("cls", 32), ("mean", 32), ("cls+mean", 64)):
        assert tiny_vision.encode(ims, pooling=pooling).shape == (2, d)
    assert tiny_vision.encode(ims, layer=1).shape == (2, 32)
    assert len(tiny_text.fingerprint) == 16 and tiny_text.fingerprint != tiny_vision.fingerprint
