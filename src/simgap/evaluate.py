"""Zero-shot classification, computed by simgap itself.

The classifier of a benchmark is built over that benchmark's own classes only (the ImageNet-R /
ImageNet-A way: a class mask over the global list), from the mean of the L2-normalised text
embeddings of every template, re-normalised (METHOD.md section 6). Accuracy is counted here
rather than with open_clip's helper (``open_clip_train.zero_shot.accuracy``), which breaks
on numpy >= 2.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from simgap.models import LoadedModel

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def read_benchmark(root: Path) -> tuple[list[str], list[tuple[str, Path, int]]]:
    """A benchmark folder: ``classnames.txt`` plus ``<classname>/<key>.jpg``.

    Returns the benchmark's class names (in file order) and its samples sorted by key, each
    ``(key, path, label)`` with label an index into those class names.
    """
    root = Path(root)
    classnames = [c for c in (root / "classnames.txt").read_text().splitlines() if c.strip()]
    if len(set(classnames)) != len(classnames):
        raise ValueError(f"{root}/classnames.txt repeats a class name")
    folders = {p.name for p in root.iterdir() if p.is_dir()}
    unknown = folders - set(classnames)
    if unknown:
        raise ValueError(f"{root} has folders not in classnames.txt: {sorted(unknown)}")
    samples = []
    for label, name in enumerate(classnames):
        folder = root / name
        if not folder.is_dir():
            continue  # a class without test images is allowed; it still competes in the classifier
        for path in folder.iterdir():
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise ValueError(f"not an image file in a benchmark: {path}")
            samples.append((path.stem, path, label))
    samples.sort(key=lambda s: s[0])
    keys = [s[0] for s in samples]
    if len(set(keys)) != len(keys):
        raise ValueError(f"{root}: image keys are not unique across class folders")
    return classnames, samples


@torch.no_grad()
def zero_shot_classifier(
    loaded: LoadedModel, classnames: list[str], templates: list[str]
) -> torch.Tensor:
    """(d, C) float32: per class, the mean of normalised template embeddings, renormalised."""
    if not templates or any("{c}" not in t for t in templates):
        raise ValueError('every template must contain "{c}" (for example "a photo of a {c}.")')
    columns = []
    for name in classnames:
        tokens = loaded.tokenizer([t.format(c=name) for t in templates]).to(loaded.device)
        emb = F.normalize(loaded.model.encode_text(tokens).float(), dim=-1)
        columns.append(F.normalize(emb.mean(dim=0), dim=-1))
    return torch.stack(columns, dim=1).cpu()


@torch.no_grad()
def image_embeddings(loaded: LoadedModel, paths: list[Path], batch_size: int = 256) -> torch.Tensor:
    """(n, d) float32 L2-normalised image embeddings, with the model's eval transform."""
    chunks = []
    for start in range(0, len(paths), batch_size):
        batch = torch.stack([_load(loaded, p) for p in paths[start : start + batch_size]])
        emb = loaded.model.encode_image(batch.to(loaded.device)).float()
        chunks.append(F.normalize(emb, dim=-1).cpu())
    if not chunks:
        raise ValueError("no images to embed")
    return torch.cat(chunks)


def accuracy_metrics(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    """top-1, top-k (k = min(5, C)) and mean per-class recall of (n, C) logits.

    top-1 is the argmax (first index on ties). A sample is top-k correct when fewer than k
    classes score strictly higher than its label, so exact ties never count against it.
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    pred = logits.argmax(axis=1)
    own = logits[np.arange(len(labels)), labels]
    rank = (logits > own[:, None]).sum(axis=1)
    hit = pred == labels
    present = np.unique(labels)  # recall is undefined for a class without test images
    recall = [hit[labels == c].mean() for c in present]
    return {
        "top1": float(hit.mean()),
        "top5": float((rank < min(5, num_classes)).mean()),
        "mean_per_class_recall": float(np.mean(recall)),
        "n": int(len(labels)),
    }


def evaluate_benchmark(
    loaded: LoadedModel, root: Path, templates: list[str], batch_size: int = 256
) -> dict:
    """Zero-shot accuracy on one benchmark folder, over that benchmark's classes only.

    Returns ``{"top1", "top5", "mean_per_class_recall", "n", "predictions"}`` with
    predictions ``[(key, label, pred), ...]`` (indices into the benchmark's class names).
    """
    classnames, samples = read_benchmark(root)
    if not samples:
        raise ValueError(f"benchmark {root} has no images")
    weights = zero_shot_classifier(loaded, classnames, templates)
    images = image_embeddings(loaded, [s[1] for s in samples], batch_size)
    logits = (images @ weights).numpy()
    labels = np.array([s[2] for s in samples])
    metrics = accuracy_metrics(logits, labels, len(classnames))
    pred = logits.argmax(axis=1)  # the same argmax as top-1
    metrics["predictions"] = [
        (key, int(label), int(p)) for (key, _, label), p in zip(samples, pred, strict=True)
    ]
    return metrics


def _load(loaded: LoadedModel, path: Path) -> torch.Tensor:
    with Image.open(path) as img:
        return loaded.preprocess(img.convert("RGB"))
