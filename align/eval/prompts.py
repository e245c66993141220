"""Prompt sets for zero-shot classification.

* ``clip80`` — the 80 CLIP-style ImageNet templates ("a bad photo of a {c}.", "a sculpture of a {c}.", …).
* ``photo`` — the single template "a photo of a {c}.".
* ``wordnet`` — WordNet-gloss prompts "{c}, {gloss}" (the paper's VDT+WordNet prompts use the synset gloss to
  disambiguate class names such as *crane* the bird vs the machine); needs one gloss per class.
* ``clip80+wordnet`` — both sets; the class vector averages all of them.

A prompt set is identified by its name AND a hash of its templates (:func:`prompt_set_id`), so cached classifier
weights are invalidated when a template list changes.
"""

from __future__ import annotations

import hashlib
from typing import Sequence, Union

CLIP80: tuple[str, ...] = (
    "a bad photo of a {c}.", "a photo of many {c}.", "a sculpture of a {c}.", "a photo of the hard to see {c}.",
    "a low resolution photo of the {c}.", "a rendering of a {c}.", "graffiti of a {c}.", "a bad photo of the {c}.",
    "a cropped photo of the {c}.", "a tattoo of a {c}.", "the embroidered {c}.", "a photo of a hard to see {c}.",
    "a bright photo of a {c}.", "a photo of a clean {c}.", "a photo of a dirty {c}.", "a dark photo of the {c}.",
    "a drawing of a {c}.", "a photo of my {c}.", "the plastic {c}.", "a photo of the cool {c}.",
    "a close-up photo of a {c}.", "a black and white photo of the {c}.", "a painting of the {c}.",
    "a painting of a {c}.", "a pixelated photo of the {c}.", "a sculpture of the {c}.", "a bright photo of the {c}.",
    "a cropped photo of a {c}.", "a plastic {c}.", "a photo of the dirty {c}.", "a jpeg corrupted photo of a {c}.",
    "a blurry photo of the {c}.", "a photo of the {c}.", "a good photo of the {c}.", "a rendering of the {c}.",
    "a {c} in a video game.", "a photo of one {c}.", "a doodle of a {c}.", "a close-up photo of the {c}.",
    "a photo of a {c}.", "the origami {c}.", "the {c} in a video game.", "a sketch of a {c}.",
    "a doodle of the {c}.", "a origami {c}.", "a low resolution photo of a {c}.", "the toy {c}.",
    "a rendition of the {c}.", "a photo of the clean {c}.", "a photo of a large {c}.", "a rendition of a {c}.",
    "a photo of a nice {c}.", "a photo of a weird {c}.", "a blurry photo of a {c}.", "a cartoon {c}.",
    "art of a {c}.", "a sketch of the {c}.", "a embroidered {c}.", "a pixelated photo of a {c}.",
    "itap of the {c}.", "a jpeg corrupted photo of the {c}.", "a good photo of a {c}.", "a plushie {c}.",
    "a photo of the nice {c}.", "a photo of the small {c}.", "a photo of the weird {c}.", "the cartoon {c}.",
    "art of the {c}.", "a drawing of the {c}.", "a photo of the large {c}.", "a black and white photo of a {c}.",
    "the plushie {c}.", "a dark photo of a {c}.", "itap of a {c}.", "graffiti of the {c}.", "a toy {c}.",
    "itap of my {c}.", "a photo of a cool {c}.", "a photo of a small {c}.", "a tattoo of the {c}.",
)
assert len(CLIP80) == 80 and len(set(CLIP80)) == 80

PHOTO: tuple[str, ...] = ("a photo of a {c}.",)
GLOSS_TEMPLATE = "{c}, {gloss}"
PROMPT_SETS = ("clip80", "photo", "wordnet", "clip80+wordnet")


PromptSet = Union[str, Sequence[str]]  # a set's name, or the templates themselves


def templates_for(prompt_set: PromptSet) -> tuple[str, ...]:
    """The templates of a named prompt set (``{c}`` = class name, ``{gloss}`` = WordNet definition), or the given
    templates themselves (a list; ``{}`` is read as ``{c}``, CLIP_benchmark's and open_clip's style)."""
    if not isinstance(prompt_set, str):
        temps = tuple(str(t).replace("{}", "{c}") for t in prompt_set)
        bad = [t for t in temps if "{c}" not in t]
        if not temps or bad:
            raise ValueError(f"every prompt template needs {{c}} (or {{}}) for the class name: {bad[:1] or 'none given'}")
        for t in temps:
            try:
                t.format(c="x", gloss="x")
            except (KeyError, IndexError, ValueError) as e:
                raise ValueError(f"prompt template {t!r}: only {{c}} and {{gloss}} may be in braces ({e!r})") from None
        return temps
    if prompt_set not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {prompt_set!r}; choose one of {', '.join(PROMPT_SETS)}")
    return {"clip80": CLIP80, "photo": PHOTO, "wordnet": (GLOSS_TEMPLATE,),
            "clip80+wordnet": CLIP80 + (GLOSS_TEMPLATE,)}[prompt_set]


def prompt_set_id(prompt_set: PromptSet) -> str:
    """``name:hash`` of the templates (``custom:hash`` for a list): part of the classifier cache key."""
    h = hashlib.sha1("\n".join(templates_for(prompt_set)).encode()).hexdigest()[:10]
    return f"{prompt_set if isinstance(prompt_set, str) else 'custom'}:{h}"


def prompt_label(prompt_set: PromptSet) -> str:
    """How a report names the prompts: the set's name, or ``N templates`` for a list."""
    if isinstance(prompt_set, str):
        return prompt_set
    n = len(templates_for(prompt_set))
    return f"{n} template{'s' if n != 1 else ''}"


def uses_glosses(prompt_set: PromptSet) -> bool:
    return any("{gloss}" in t for t in templates_for(prompt_set))


def build_prompts(classnames: Sequence[str], prompt_set: PromptSet = "clip80",
                  glosses: Sequence[str | None] | None = None) -> list[list[str]]:
    """One list of prompts per class. Gloss templates need ``glosses``; a class without a gloss falls back to
    "a photo of a {c}." for that template (so every class gets the same number of prompts)."""
    temps = templates_for(prompt_set)
    needs_gloss = any("{gloss}" in t for t in temps)
    if needs_gloss and (glosses is None or len(glosses) != len(classnames)):
        raise ValueError(f"prompt set {prompt_set!r} needs one WordNet gloss per class "
                         f"({len(classnames)} classes, {0 if glosses is None else len(glosses)} glosses)")
    out: list[list[str]] = []
    for i, c in enumerate(classnames):
        ps = []
        for t in temps:
            if "{gloss}" in t:
                g = (glosses[i] or "").strip() if glosses is not None else ""
                ps.append(t.format(c=c, gloss=g) if g else PHOTO[0].format(c=c))
            else:
                ps.append(t.format(c=c))
        out.append(ps)
    return out
