"""simgap.evaluate: zero-shot accuracy against hand-known answers and a numpy brute force."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simgap.evaluate import (
    accuracy_metrics,
    evaluate_benchmark,
    read_benchmark,
    zero_shot_classifier,
)
from simgap.models import LoadedModel, ModelSpec, load_model

RGB = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}
TEMPLATES = ["a {c} square.", "a photo of something {c}."]


def write_benchmark(root: Path, classnames: list[str], images: dict[str, list[tuple]]) -> Path:
    """root/classnames.txt + root/<class>/<key>.jpg; keys bench-00000... in insertion order."""
    root.mkdir(parents=True)
    (root / "classnames.txt").write_text("\n".join(classnames) + "\n")
    n = 0
    for cls, colours in images.items():
        (root / cls).mkdir()
        for colour in colours:
            Image.new("RGB", (16, 16), colour).save(root / cls / f"bench-{n:05d}.jpg", quality=100)
            n += 1
    return root


class ColourModel(torch.nn.Module):
    """Embeddings we control: an image embeds as its mean RGB, a text as its colour word."""

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens


def colour_model() -> LoadedModel:
    def preprocess(img: Image.Image) -> torch.Tensor:
        return torch.tensor(np.asarray(img, dtype=np.float32).mean(axis=(0, 1)) / 255)

    def tokenizer(texts: list[str]) -> torch.Tensor:
        words = [next(w.strip(".") for w in t.split() if w.strip(".") in RGB) for t in texts]
        return torch.tensor([RGB[w] for w in words], dtype=torch.float32) / 255

    return LoadedModel(ColourModel(), preprocess, tokenizer, {"arch": "colour"})


def test_read_benchmark(tmp_path):
    root = write_benchmark(
        tmp_path / "b", ["red", "green", "blue"], {"blue": [RGB["blue"]], "red": [RGB["red"]] * 2}
    )
    classnames, samples = read_benchmark(root)
    assert classnames == ["red", "green", "blue"]
    assert [(k, label) for k, _, label in samples] == [
        ("bench-00000", 2),
        ("bench-00001", 0),
        ("bench-00002", 0),
    ]
    assert samples[0][1] == root / "blue" / "bench-00000.jpg"
    (root / "purple").mkdir()
    with pytest.raises(ValueError, match="purple"):
        read_benchmark(root)


def test_known_accuracy_with_class_mask(tmp_path):
    # Benchmark of 3 of the 4 global classes. The orange image labelled red would be "yellow"
    # over all four classes; over the benchmark's own classes it is red (correct). The red
    # image filed under blue is wrong: top-1 = 4/5; its label ranks 2nd of 3 (top-5 = 1).
    root = write_benchmark(
        tmp_path / "b",
        ["red", "green", "blue"],
        {
            "red": [RGB["red"], (255, 200, 0)],
            "green": [RGB["green"]],
            "blue": [RGB["blue"], (255, 0, 60)],
        },
    )
    res = evaluate_benchmark(colour_model(), root, TEMPLATES, batch_size=2)
    assert res["n"] == 5
    assert res["top1"] == pytest.approx(4 / 5)
    assert res["top5"] == 1.0  # min(5, C) = 3 of 3 classes
    assert res["mean_per_class_recall"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert res["predictions"] == [
        ("bench-00000", 0, 0),
        ("bench-00001", 0, 0),
        ("bench-00002", 1, 1),
        ("bench-00003", 2, 2),
        ("bench-00004", 2, 0),
    ]


def test_classifier_is_mean_of_normalised_template_embeddings():
    model = colour_model()
    weights = zero_shot_classifier(model, ["red", "yellow"], TEMPLATES)
    assert weights.shape == (3, 2)
    assert torch.allclose(weights[:, 1], torch.tensor([1.0, 1.0, 0.0]) / np.sqrt(2))
    assert torch.allclose(weights.norm(dim=0), torch.ones(2))
    with pytest.raises(ValueError, match="{c}"):
        zero_shot_classifier(model, ["red"], ["a photo of a {}"])


def test_accuracy_metrics_topk_and_ties():
    logits = np.array(
        [
            [0.9, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0],  # label 0 first
            [0.5, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0],  # tie: argmax picks 0, label 1 not top-1
            [0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1],  # label 5 ranks 6th: outside top-5
            [0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1],  # label 4 ranks 5th: inside top-5
        ]
    )
    m = accuracy_metrics(logits, np.array([0, 1, 5, 4]), num_classes=7)
    assert m["top1"] == 0.25
    assert m["top5"] == 0.75
    assert m["mean_per_class_recall"] == pytest.approx(0.25)  # classes 0, 1, 4, 5 present


def test_real_model_matches_numpy_brute_force(tmp_path):
    loaded = load_model(ModelSpec("simgap-tiny"), allow_random=True)
    rng = np.random.default_rng(0)
    classes = ["red", "green", "blue", "yellow", "cyan", "grey"]
    images = {
        c: [tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(4)] for c in classes
    }
    root = write_benchmark(tmp_path / "b", classes, images)
    res = evaluate_benchmark(loaded, root, TEMPLATES, batch_size=7)

    _, samples = read_benchmark(root)
    with torch.no_grad():
        pixels = torch.stack(
            [loaded.preprocess(Image.open(p).convert("RGB")) for _, p, _ in samples]
        )
        img = loaded.model.encode_image(pixels).numpy().astype(np.float64)
        txt = [
            loaded.model.encode_text(loaded.tokenizer([t.format(c=c) for t in TEMPLATES])).numpy()
            for c in classes
        ]
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    cols = []
    for emb in txt:
        emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
        mean = emb.mean(axis=0)
        cols.append(mean / np.linalg.norm(mean))
    logits = img @ np.stack(cols, axis=1)
    labels = np.array([label for _, _, label in samples])
    pred = logits.argmax(axis=1)
    top5 = np.array(
        [label in np.argsort(-row)[:5] for row, label in zip(logits, labels, strict=True)]
    )

    assert res["n"] == 24
    assert [p for _, _, p in res["predictions"]] == pred.tolist()
    assert res["top1"] == pytest.approx((pred == labels).mean())
    assert res["top5"] == pytest.approx(top5.mean())
