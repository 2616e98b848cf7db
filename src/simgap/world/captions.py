"""Web-like captions of the pool (pure): style words of each domain, and the planted caption
noise (no class word, the wrong class word, class-less distractors)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from simgap.world.plan import DISTRACTOR, WorldConfig

_STYLE_CAPTIONS: dict[str, tuple[str, ...]] = {
    "photo": (
        "a photo of a {c}",
        "photo of my {c} on the table",
        "{c} in the garden",
        "close-up of a {c}",
        "a {c} outside on a sunny day",
        "my new {c}",
        "a picture of a {c}",
        "the {c} we found today",
    ),
    "photo-v2": (
        "a photo of a {c} indoors",
        "{c}, evening light",
        "a dim photo of a {c}",
        "warm photo of the {c}",
        "snapshot of a {c}",
        "a {c} at home",
    ),
    "sketch": (
        "a sketch of a {c}",
        "pencil drawing of a {c}",
        "{c} line art",
        "hand drawn {c} doodle",
        "black and white sketch of a {c}",
        "how to draw a {c}",
    ),
    "rendition": (
        "cartoon {c} drawing",
        "a painting of a {c}",
        "{c} clipart",
        "colorful {c} illustration",
        "{c} sticker design",
        "cute cartoon {c}",
        "{c} icon vector art",
    ),
    "hard": (
        "a small {c} in a messy room",
        "cluttered desk with a {c}",
        "can you spot the {c}",
        "{c} among other things",
        "a {c} half hidden behind stuff",
        "junk pile with a {c}",
    ),
    "pose": (
        "upside down {c}",
        "a {c} lying on its side",
        "weird angle photo of a {c}",
        "tilted {c} on the floor",
        "{c} on my bed",
        "a {c} on the kitchen tiles",
    ),
}

_NO_CLASS_CAPTIONS: dict[str, tuple[str, ...]] = {
    "photo": ("a photo of this thing", "untitled", "look what i found", "nice day outside"),
    "photo-v2": ("evening at home", "indoor shot", "untitled photo"),
    "sketch": ("pencil drawing", "my sketchbook page", "line art study"),
    "rendition": ("cartoon illustration", "colorful clipart", "sticker design"),
    "hard": ("my messy room", "so much stuff", "cluttered desk"),
    "pose": ("on the floor", "weird angle", "bedroom photo"),
}

_DISTRACTOR_CAPTIONS = (
    "abstract texture background",
    "seamless pattern wallpaper",
    "noise texture",
    "random stuff on the floor",
    "colorful abstract art",
    "doodles on paper",
    "fabric pattern",
    "background image",
)

_EXTRA_WORDS = (
    "free shipping",
    "stock image",
    "HD",
    "4k wallpaper",
    "best price",
    "#art",
    "2019",
    "for sale",
    "high quality",
    "download",
    "| pinterest",
    "new",
)


def _decorate(text: str, rng: np.random.Generator) -> str:
    """Web-caption noise: trailing junk words and inconsistent capitalisation."""
    n_extra = int(rng.choice([0, 0, 1, 2]))
    words = [text] + [str(w) for w in rng.choice(_EXTRA_WORDS, n_extra, replace=False)]
    text = " ".join(words)
    return text[:1].upper() + text[1:] if rng.random() < 0.5 else text


def caption_noise(kind: str, u: float, cfg: WorldConfig) -> str:
    """Which caption a pool sample of ``kind`` gets, from its caption stream's first draw ``u``:
    ``clean`` (its class word), ``no-class``, ``wrong-class``, or ``distractor`` (no class)."""
    if kind == DISTRACTOR:
        return "distractor"
    if u < cfg.no_class_caption_fraction:
        return "no-class"
    if u < cfg.no_class_caption_fraction + cfg.wrong_class_caption_fraction:
        return "wrong-class"
    return "clean"


def pool_caption(
    kind: str, label: int, cfg: WorldConfig, classnames: Sequence[str], rng: np.random.Generator
) -> str:
    """A noisy caption: style words of the domain, sometimes the wrong or no class word."""
    if kind == DISTRACTOR:
        return _decorate(str(rng.choice(_DISTRACTOR_CAPTIONS)), rng)
    noise = caption_noise(kind, rng.random(), cfg)
    if noise == "no-class":
        return _decorate(str(rng.choice(_NO_CLASS_CAPTIONS[kind])), rng)
    word = classnames[label]
    if noise == "wrong-class":
        other = int(rng.integers(len(classnames) - 1))
        word = classnames[other + (other >= label)]
    return _decorate(str(rng.choice(_STYLE_CAPTIONS[kind])).format(c=word), rng)


def clean_caption(
    kind: str, label: int, classnames: Sequence[str], rng: np.random.Generator
) -> str:
    return _decorate(str(rng.choice(_STYLE_CAPTIONS[kind])).format(c=classnames[label]), rng)
