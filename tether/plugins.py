"""Plugins found through package entry points, so that one half can use what the other provides without
importing it.

``curate serve --model DIR`` needs an exported aligned model (image and text embeddings), which the ``align``
half provides. ``curate`` never imports ``align``: it asks :func:`load_model` instead, which loads the first
installed loader of the ``tether.model_loaders`` entry-point group (``align`` registers ``aligned`` in
pyproject.toml). Any package can register its own: a loader takes a folder and returns a :class:`LoadedModel`.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tether.recipe import RecipeError

MODEL_LOADERS = "tether.model_loaders"


@dataclass
class LoadedModel:
    """A model that embeds images and texts into one space (``encode_image(list of PIL images)`` and
    ``encode_text(list of str)``, both returning L2-normalised float32 arrays), with the files whose exact bytes
    identify it (``files``: hashed for caches keyed by the model).

    ``patch_similarity`` (optional): for models whose image head embeds every patch token,
    ``patch_similarity(image, text) -> [h, w]`` array: the cosine of ``text``'s embedding with the embedding of each
    patch of ``image`` (a PIL image), on the grid the vision encoder sees (its preprocessing's center square);
    ``None`` for models with pooled heads only.

    ``about`` (optional): what a viewer may show about the model, label → one line (the explorer's model page);
    the model object itself is opaque to callers."""

    model: Any
    files: list[Path] = field(default_factory=list)
    patch_similarity: Callable[[Any, str], Any] | None = None
    about: dict[str, str] = field(default_factory=dict)


def model_loaders() -> dict[str, Any]:
    """Installed loaders by entry-point name (``{"aligned": <EntryPoint>}``)."""
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=MODEL_LOADERS)}


def load_model(path: str | Path, kind: str | None = None) -> LoadedModel:
    """Load the model folder ``path`` with the loader named ``kind`` (default: the only, or ``aligned``)."""
    loaders = model_loaders()
    if not loaders:
        raise RecipeError(f"no model loader is installed (entry-point group {MODEL_LOADERS!r}); install tether "
                          "with `pip install -e .` so that align registers its own")
    name = kind or ("aligned" if "aligned" in loaders else sorted(loaders)[0])
    if name not in loaders:
        raise RecipeError(f"unknown model loader {name!r}; installed: {', '.join(sorted(loaders))}")
    loaded = loaders[name].load()(Path(path))
    if not isinstance(loaded, LoadedModel):
        raise RecipeError(f"model loader {name!r} returned {type(loaded).__name__}, not a LoadedModel")
    return loaded
