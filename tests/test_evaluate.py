"""simgap.evaluate: zero-shot accuracy against hand-known answers and a numpy brute force."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from simgap.data.clip_benchmark import (
    imagenet_classnames,
    imagenet_wnids,
    open_benchmark,
    openai_imagenet_templates,
    write_wds,
)
from simgap.evaluate import (
    accuracy_metrics,
    evaluate_benchmark,
    write_predictions,
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


def test_open_folder_benchmark(tmp_path):
    root = write_benchmark(
        tmp_path / "b", ["red", "green", "blue"], {"blue": [RGB["blue"]], "red": [RGB["red"]] * 2}
    )
    bench = open_benchmark(root)
    assert bench.layout == "folder" and bench.templates is None
    assert bench.classnames == ("red", "green", "blue")
    assert [(k, label) for k, _, label in bench.items] == [
        ("bench-00000", 2),
        ("bench-00001", 0),
        ("bench-00002", 0),
    ]
    assert bench.items[0][1] == str(root / "blue" / "bench-00000.jpg")
    with pytest.raises(ValueError, match="no templates of its own"):
        evaluate_benchmark(colour_model(), root)
    (root / "red" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="notes.txt: not an image"):
        open_benchmark(root)
    (root / "red" / "notes.txt").unlink()
    (root / "purple").mkdir()
    with pytest.raises(ValueError, match="purple"):
        open_benchmark(root)


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

    samples = open_benchmark(root).items
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


# --- benchmark layouts as CLIP_benchmark reads them, with their class masks ---------------


class IndexModel(torch.nn.Module):
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens


def index_model(vocab: list[str]) -> LoadedModel:
    """A text embeds as the one-hot of its class name in ``vocab``; an image as the one-hot of
    the vocab index painted in its (lossless PNG) pixels: the image "shows" that class."""
    index: dict[str, int] = {}
    for i, name in enumerate(vocab):  # OpenAI's ImageNet names repeat "missile", "sunglasses"
        index.setdefault(name, i)

    def tokenizer(texts: list[str]) -> torch.Tensor:
        return F.one_hot(torch.tensor([index[t] for t in texts]), len(vocab)).float()

    def preprocess(img: Image.Image) -> torch.Tensor:
        r, g, _ = img.getpixel((0, 0))
        return F.one_hot(torch.tensor(r * 256 + g), len(vocab)).float()

    return LoadedModel(IndexModel(), preprocess, tokenizer, {"arch": "index"})


def paint(path: Path, index: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (index // 256, index % 256, 0)).save(path, format="PNG")


def _cb_builder():
    # CLIP_benchmark is a test dependency (pyproject [test]): imported here, not at the top,
    # because importing it (and sklearn) takes seconds.
    import clip_benchmark.datasets.builder

    return clip_benchmark.datasets.builder


def test_imagenet_r_class_mask_and_labels_match_clip_benchmark(tmp_path):
    builder = _cb_builder()
    names, wnids = imagenet_classnames(), imagenet_wnids()
    mask = imagenet_wnids("imagenet-r")
    root = tmp_path / "imagenet-r"
    for i, w in enumerate(mask):  # one image per class, showing its own class ...
        paint(root / w / f"r-{i:05d}.png", wnids.index(w))
    # ... except one showing a class outside ImageNet-R and one showing another R class.
    outside = next(w for w in wnids if w not in mask)
    paint(root / mask[0] / "r-90000.png", wnids.index(outside))
    paint(root / mask[1] / "r-90001.png", wnids.index(mask[2]))

    bench = open_benchmark(root)
    assert bench.layout == "imagenet-r" and len(bench.classnames) == 200
    assert bench.templates == tuple(openai_imagenet_templates()) and len(bench.templates) == 80
    # CLIP_benchmark's own reading of the same folder: classes and per-image labels.
    ds = builder.build_dataset("imagenet-r", root=str(root), download=False)
    assert list(bench.classnames) == ds.classes
    cb = {Path(p).stem: label for p, label in ds.samples}
    assert {k: label for k, _, label in bench.items} == cb

    res = evaluate_benchmark(index_model(names), root, ["{c}"])
    assert res["n"] == 202
    # The out-of-mask image: every masked logit is 0, argmax picks class 0 = its label: right.
    assert res["top1"] == pytest.approx(201 / 202)
    wrong = [p for p in res["predictions"] if p[1] != p[2]]
    assert wrong == [("r-90001", 1, 2)]


def test_partial_wnid_folders_need_an_explicit_layout_and_keep_labels(tmp_path):
    mask, wnids = imagenet_wnids("imagenet-a"), imagenet_wnids()
    only_a = [i for i, w in enumerate(mask) if w not in imagenet_wnids("imagenet-r")]
    first, second = only_a[3], only_a[-2]
    root = tmp_path / "a"
    paint(root / mask[first] / "a-00000.png", wnids.index(mask[first]))
    paint(root / mask[second] / "a-00001.png", wnids.index(mask[second]))
    with pytest.raises(ValueError, match="cannot tell the benchmark layout"):
        open_benchmark(root)
    bench = open_benchmark(root, "imagenet-a")
    assert len(bench.classnames) == 200
    # Labels index the 200-class mask, not the 2 folders present.
    assert [label for _, _, label in bench.items] == [first, second]
    res = evaluate_benchmark(index_model(imagenet_classnames()), bench, ["{c}"])
    assert res["top1"] == 1.0
    with pytest.raises(ValueError, match="not in the imagenet-r class mask"):
        open_benchmark(root, "imagenet-r")
    with pytest.raises(ValueError, match="unknown benchmark layout"):
        open_benchmark(root, "imagenet-z")


def test_imagenet_v2_layout(tmp_path):
    names = imagenet_classnames()
    folder = tmp_path / "v2" / "ImageNetV2-matched-frequency"
    paint(folder / "0" / "aa11.jpeg", 0)
    paint(folder / "999" / "bb22.jpeg", 999)
    paint(folder / "5" / "cc33.jpeg", 6)  # shows class 6, filed under 5
    for root in (tmp_path / "v2", folder):  # CLIP_benchmark's root, or the extracted folder
        bench = open_benchmark(root)
        assert bench.layout == "imagenet-v2" and len(bench.classnames) == 1000
        assert [(k, label) for k, _, label in bench.items] == [
            ("aa11", 0),
            ("bb22", 999),
            ("cc33", 5),
        ]
    res = evaluate_benchmark(index_model(names), tmp_path / "v2", ["{c}"])
    assert res["top1"] == pytest.approx(2 / 3)
    assert res["predictions"][2] == ("cc33", 5, 6)
    paint(folder / "1000" / "dd44.jpeg", 0)
    with pytest.raises(ValueError, match="0..999"):
        open_benchmark(folder)


def _objectnet_root(root: Path) -> None:
    import json

    folder_to_label = {
        "alarm_clock": "Alarm clock",
        "air_freshener": "Air freshener",  # an ObjectNet class without an ImageNet class
        "banana": "Banana",
        "still_camera": "Still Camera",
    }
    to_imagenet = {"Alarm clock": "analog clock; digital clock", "Banana": "banana"}
    to_imagenet["Still Camera"] = "Polaroid camera"
    (root / "objectnet-1.0" / "images").mkdir(parents=True)
    (root / "folder_to_objectnet_label.json").write_text(json.dumps(folder_to_label))
    (root / "objectnet_to_imagenet_1k.json").write_text(json.dumps(to_imagenet))
    # The two files only CLIP_benchmark's loader needs (ImageNet ids of the mapped classes).
    inet = ["analog clock", "digital clock", "banana", "Polaroid camera"]
    (root / "imagenet_to_label_2012_v2").write_text("\n".join(inet) + "\n")
    pytorch_ids = {str(i): i for i in range(len(inet))}
    (root / "pytorch_to_imagenet_2012_id.json").write_text(json.dumps(pytorch_ids))


def test_objectnet_layout_matches_clip_benchmark(tmp_path):
    builder = _cb_builder()
    root = tmp_path / "objectnet"
    _objectnet_root(root)
    vocab = ["alarm clock", "banana", "still camera", "air freshener"]
    images = root / "objectnet-1.0" / "images"
    paint(images / "alarm_clock" / "o-1.png", 0)
    paint(images / "banana" / "o-2.png", 1)
    paint(images / "banana" / "o-3.png", 2)  # shows a camera
    paint(images / "still_camera" / "o-4.png", 2)
    paint(images / "air_freshener" / "o-5.png", 3)  # not part of the 113-class benchmark

    bench = open_benchmark(root)
    assert bench.layout == "objectnet"
    assert bench.classnames == ("alarm clock", "banana", "still camera")
    ds = builder.build_dataset("objectnet", root=str(root), download=False)
    assert list(bench.classnames) == ds.classes
    assert {k: label for k, _, label in bench.items} == {
        Path(p).stem: ds.label_map[Path(p).parent.name] for p, _ in ds.samples
    }
    res = evaluate_benchmark(index_model(vocab), root, ["{c}"])
    assert res["n"] == 4 and res["top1"] == 0.75
    assert res["mean_per_class_recall"] == pytest.approx((1 + 0.5 + 1) / 3)


def test_shipped_imagenet_metadata():
    templates = openai_imagenet_templates()
    assert len(templates) == 80 and len(set(templates)) == 80
    assert all(t.count("{c}") == 1 for t in templates)
    assert templates[0] == "a bad photo of a {c}."
    wnids = imagenet_wnids()
    assert len(wnids) == 1000 == len(set(wnids)) and wnids == sorted(wnids)
    for mask in ("imagenet-r", "imagenet-a"):
        sub = imagenet_wnids(mask)
        assert len(sub) == 200 and set(sub) <= set(wnids) and sub == sorted(sub)
    assert imagenet_classnames()[wnids.index("n01440764")] == "tench"


# --- CLIP_benchmark's wds layout and the cross-check against its zero-shot code ----------


def _wds_colour_benchmark(root: Path, n: int = 36, n_classes: int = 6, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    classes = ["red", "green", "blue", "yellow", "cyan", "grey"][:n_classes]
    samples = []
    for i in range(n):
        buf = io.BytesIO()
        Image.new("RGB", (20, 20), tuple(int(v) for v in rng.integers(0, 256, 3))).save(buf, "PNG")
        samples.append((f"s{i:07d}", "png", buf.getvalue(), int(rng.integers(0, n_classes))))
    write_wds(root, classes, TEMPLATES, samples, n_shards=2)


def test_wds_layout_with_colour_model(tmp_path):
    root = tmp_path / "wds"
    classes = ["red", "green", "blue"]
    samples = []
    for i, (colour, label) in enumerate([("red", 0), ("blue", 2), ("green", 1), ("red", 2)]):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), RGB[colour]).save(buf, "PNG")
        samples.append((f"s{i:07d}", "png", buf.getvalue(), label))
    samples.append(("s0000009", "webp", b"not an image", 0))
    write_wds(root, classes, TEMPLATES, samples, n_shards=2)
    res = evaluate_benchmark(colour_model(), root)  # the wds's own templates
    assert res["n"] == 4 and res["top1"] == 0.75
    assert res["skipped"] == {"corrupt_image": 1}
    assert res["predictions"][3] == ("s0000003", 2, 0)
    write_wds(root, classes, TEMPLATES, [("s0000000", "png", samples[0][2], 3)])
    with pytest.raises(ValueError, match="label 3, not in 0..2"):
        evaluate_benchmark(colour_model(), root)


def test_predictions_table(tmp_path):
    write_predictions(tmp_path / "p.parquet", [("a", 1, 1), ("b", 0, 2)])
    table = pq.read_table(tmp_path / "p.parquet")
    assert table.to_pylist() == [
        {"key": "a", "label": 1, "pred": 1, "correct": True},
        {"key": "b", "label": 0, "pred": 2, "correct": False},
    ]


def test_accuracy_equals_clip_benchmark_on_same_model_and_data(tmp_path):
    """Cross-check: a real open_clip model from a local checkpoint, CLIP_benchmark's wds reader
    and its zero-shot evaluate() in-process, against simgap's evaluate_benchmark."""
    builder = _cb_builder()
    import clip_benchmark.metrics.zeroshot_classification as zsc

    root = tmp_path / "wds"
    _wds_colour_benchmark(root)
    random = load_model(ModelSpec("simgap-tiny"), allow_random=True)
    ckpt = tmp_path / "tiny.pt"
    torch.save({"state_dict": random.model.state_dict()}, ckpt)
    loaded = load_model(ModelSpec("simgap-tiny", checkpoint=str(ckpt)))

    ours = evaluate_benchmark(loaded, root, batch_size=8)

    ds = builder.build_dataset("wds/colours", root=str(root), transform=loaded.preprocess)
    loader = torch.utils.data.DataLoader(ds.batched(8), batch_size=None, num_workers=0)
    theirs = zsc.evaluate(
        loaded.model, loader, loaded.tokenizer, ds.classes, ds.templates, "cpu", amp=False
    )
    classifier = zsc.zero_shot_classifier(
        loaded.model, loaded.tokenizer, ds.classes, ds.templates, "cpu", amp=False
    )
    logits, target = zsc.run_classification(loaded.model, classifier, loader, "cpu", amp=False)

    assert ours["n"] == len(target) == 36
    assert [p for _, _, p in ours["predictions"]] == logits.argmax(dim=1).tolist()
    assert [y for _, y, _ in ours["predictions"]] == target.tolist()
    assert 0 < ours["top1"] < 1  # a random model: not a degenerate all-right/all-wrong case
    assert ours["top1"] == pytest.approx(theirs["acc1"], abs=1e-12)
    assert ours["top5"] == pytest.approx(theirs["acc5"], abs=1e-12)
    assert ours["mean_per_class_recall"] == pytest.approx(
        theirs["mean_per_class_recall"], abs=1e-12
    )


def test_cli_evaluate_writes_metrics_and_predictions(tmp_path, capsys):
    import json

    from simgap.cli import main

    root = tmp_path / "colours"
    _wds_colour_benchmark(root, n=12)
    random = load_model(ModelSpec("simgap-tiny"), allow_random=True)
    ckpt = tmp_path / "tiny.pt"
    torch.save({"state_dict": random.model.state_dict()}, ckpt)
    out = tmp_path / "eval"
    argv = ["evaluate", str(root), "--checkpoint", str(ckpt), "-o", str(out), "--batch-size", "5"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((out / "eval.json").read_text())
    assert saved["benchmarks"] == printed and printed["colours"]["n"] == 12
    assert saved["model"]["checkpoint_sha256"] is not None
    table = pq.read_table(out / "predictions" / "colours.parquet")
    assert table.num_rows == 12
    assert np.mean(table.column("correct").to_pylist()) == pytest.approx(printed["colours"]["top1"])
    assert main(["evaluate", str(root), str(root), "--checkpoint", str(ckpt)]) == 2
    assert "must differ" in capsys.readouterr().err
