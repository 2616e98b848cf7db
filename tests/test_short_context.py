"""simgap-tiny-ctx17 is simgap-tiny with a 17-token text context instead of 32: on the world's
captions it computes the same function at about half the text tower's cost (~9% of a training)."""

from __future__ import annotations

import itertools
import json

import open_clip
import torch

from simgap.models import register_shipped_configs, shipped_configs_dir
from simgap.world import captions
from simgap.world.shapes import CLASSNAMES
from simgap.world.writer import TEMPLATES

SHORT = 17  # the longest caption the world writes, in tokens


def every_world_caption() -> list[str]:
    """Every caption the world can write (pool, labelled, distractors) and every zero-shot
    prompt. Capitalisation and word order do not change a token count (the tokenizer
    lowercases; trailing words are separate words), so each set of trailing words is taken once."""
    styles = [t for ts in captions._STYLE_CAPTIONS.values() for t in ts]
    bodies = [t.format(c=c) for t in styles for c in CLASSNAMES]
    bodies += [t for ts in captions._NO_CLASS_CAPTIONS.values() for t in ts]
    bodies += list(captions._DISTRACTOR_CAPTIONS)
    extras = [()] + [(w,) for w in captions._EXTRA_WORDS]
    extras += list(itertools.combinations(captions._EXTRA_WORDS, 2))
    texts = [" ".join((b, *e)) for b in bodies for e in extras]
    return texts + [t.format(c=c) for t in TEMPLATES for c in CLASSNAMES]


def test_configs_differ_only_in_context_length() -> None:
    tiny = json.loads((shipped_configs_dir() / "simgap-tiny.json").read_text())
    short = json.loads((shipped_configs_dir() / "simgap-tiny-ctx17.json").read_text())
    assert short["text_cfg"].pop("context_length") == SHORT
    assert tiny["text_cfg"].pop("context_length") == 32
    assert short == tiny


def test_every_world_caption_fits_the_short_context() -> None:
    texts = every_world_caption()
    assert len(texts) > 20_000
    tokens = open_clip.get_tokenizer("RN50")(texts, context_length=77)
    lengths = (tokens != 0).sum(1)  # start and end tokens included
    longest = int(lengths.max())
    assert longest <= SHORT, texts[int(lengths.argmax())]


def test_short_context_computes_the_same_text_features() -> None:
    register_shipped_configs()
    torch.manual_seed(0)
    tiny = open_clip.create_model("simgap-tiny").eval()
    short = open_clip.create_model("simgap-tiny-ctx17").eval()
    state = tiny.state_dict()
    state["positional_embedding"] = state["positional_embedding"][:SHORT]
    short.load_state_dict(state)
    assert torch.equal(short.positional_embedding, tiny.positional_embedding[:SHORT])

    texts = every_world_caption()[::97]
    with torch.no_grad():
        long_features = tiny.encode_text(open_clip.get_tokenizer("simgap-tiny")(texts))
        short_tokens = open_clip.get_tokenizer("simgap-tiny-ctx17")(texts)
        short_features = short.encode_text(short_tokens)
    assert short_tokens.shape == (len(texts), SHORT)
    # The causal mask keeps padding after the end token out of the pooled feature: the same
    # function, over 17 positions instead of 32 (the last bits may differ).
    torch.testing.assert_close(short_features, long_features, rtol=1e-5, atol=1e-6)
