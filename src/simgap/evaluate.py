"""Zero-shot classification, computed by simgap itself.

The classifier of a benchmark is built over that benchmark's own classes only (its class mask:
200 of the 1000 ImageNet classes for ImageNet-R and -A, 113 ObjectNet classes), from the mean of
the L2-normalised text embeddings of every template, re-normalised (METHOD.md section 6), as
CLIP_benchmark and open_clip do. Benchmark layouts are read by
:mod:`simgap.data.clip_benchmark`. Accuracy is counted here rather than with open_clip's helper
(``open_clip_train.zero_shot.accuracy``), which breaks on numpy >= 2.4.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from simgap.data.clip_benchmark import Benchmark, open_benchmark
from simgap.data.images import decode_rgb
from simgap.data.transforms import split_transform
from simgap.io import write_json, write_parquet
from simgap.models import LoadedModel, ieee_fp32, numerics_identity
from simgap.parallel import Progress
from simgap.types import Log

PREDICTION_SCHEMA = pa.schema(
    [("key", pa.string()), ("label", pa.int32()), ("pred", pa.int32()), ("correct", pa.bool_())]
)


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
        with ieee_fp32():  # float32 on a GPU as on the CPU (see evaluate_benchmark)
            emb = F.normalize(loaded.model.encode_text(tokens).float(), dim=-1)
        columns.append(F.normalize(emb.mean(dim=0), dim=-1))
    return torch.stack(columns, dim=1).cpu()


def accuracy_metrics(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    """top-1, top-k (k = min(5, C)) and mean per-class recall of (n, C) logits.

    top-1 is the argmax (first index on ties). A sample is top-k correct when fewer than k
    classes score strictly higher than its label, so exact ties never count against it.
    Mean per-class recall averages over the classes that have test samples (a class without
    samples has no recall), which is sklearn's balanced accuracy as CLIP_benchmark reports it.
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if not np.isfinite(logits).all():
        # NaN compares false with everything, so it would rank first: a diverged model must
        # not score well. Fail loudly instead.
        raise ValueError("logits hold NaN or Inf: the model's weights or inputs are broken")
    pred = logits.argmax(axis=1)
    own = logits[np.arange(len(labels)), labels]
    rank = (logits > own[:, None]).sum(axis=1)
    hit = pred == labels
    recall = [hit[labels == c].mean() for c in np.unique(labels)]
    return {
        "top1": float(hit.mean()),
        "top5": float((rank < min(5, num_classes)).mean()),
        "mean_per_class_recall": float(np.mean(recall)),
        "n": int(len(labels)),
    }


@torch.no_grad()
def evaluate_benchmark(
    loaded: LoadedModel,
    root: Path | Benchmark,
    templates: list[str] | None = None,
    batch_size: int = 256,
    *,
    layout: str = "auto",
    log: Log | None = None,
) -> dict:
    """Zero-shot accuracy on one benchmark, over that benchmark's classes only.

    ``root`` is a benchmark folder in any layout :func:`open_benchmark` reads (or an opened
    :class:`Benchmark`). ``templates`` None uses the benchmark's own (the wds templates file,
    OpenAI's 80 ImageNet templates for the ImageNet family). Returns ``{"top1", "top5",
    "mean_per_class_recall", "n", "skipped", "predictions"}`` with predictions
    ``[(key, label, pred), ...]`` sorted by key (indices into the benchmark's class names) and
    ``skipped`` the count of unreadable images by reason.
    """
    bench = root if isinstance(root, Benchmark) else open_benchmark(root, layout)
    templates = list(templates) if templates is not None else _own_templates(bench)
    weights = zero_shot_classifier(loaded, list(bench.classnames), templates)
    skipped: Counter[str] = Counter()
    keys, labels, chunks = [], [], []
    progress = Progress(f"evaluate {bench.root.name}", log, unit="images", every_s=10.0)
    seen = 0
    transform = split_transform(loaded.preprocess)  # bitwise the per-image transform, faster
    for batch in _batches(bench.samples(skipped), batch_size, len(bench.classnames), bench.root):
        pixels = []
        for key, data, label in batch:
            img = decode_rgb(data, skipped)
            if img is not None:
                keys.append(key)
                labels.append(label)
                pixels.append(transform.per_image(img))
        if pixels:
            # The forward is float32 (no autocast); on a GPU, IEEE float32: cuDNN's default
            # TF32 for the patch-embedding conv would flip near-tied top-1s against the CPU.
            with ieee_fp32():
                emb = loaded.model.encode_image(transform.batch(pixels).to(loaded.device)).float()
            chunks.append(F.normalize(emb, dim=-1).cpu() @ weights)
        seen += len(batch)
        progress.count(seen)
    if not keys:
        raise ValueError(
            f"benchmark {bench.root} has no readable images (skipped: {dict(skipped)})"
        )
    order = np.argsort(np.array(keys), kind="stable")
    logits = torch.cat(chunks).numpy()[order]
    label_arr = np.array(labels, dtype=np.int64)[order]
    sorted_keys = [keys[i] for i in order]
    if len(set(sorted_keys)) != len(sorted_keys):
        raise ValueError(f"benchmark {bench.root}: sample keys are not unique")
    metrics = accuracy_metrics(logits, label_arr, len(bench.classnames))
    metrics["skipped"] = dict(sorted(skipped.items()))
    pred = logits.argmax(axis=1)  # the same argmax as top-1
    metrics["predictions"] = [
        (k, int(y), int(p)) for k, y, p in zip(sorted_keys, label_arr, pred, strict=True)
    ]
    return metrics


def predictions_table(predictions: list[tuple[str, int, int]]) -> pa.Table:
    """Per-sample predictions as a table: key, label, pred, correct."""
    keys, labels, preds = zip(*predictions, strict=True) if predictions else ((), (), ())
    return pa.table(
        {
            "key": list(keys),
            "label": list(labels),
            "pred": list(preds),
            "correct": [y == p for y, p in zip(labels, preds, strict=True)],
        },
        schema=PREDICTION_SCHEMA,
    )


def write_predictions(path: Path, predictions: list[tuple[str, int, int]]) -> None:
    write_parquet(path, predictions_table(predictions))


def _own_templates(bench: Benchmark) -> list[str]:
    if bench.templates is None:
        raise ValueError(
            f"benchmark {bench.root} ({bench.layout} layout) has no templates of its own: "
            'pass templates (a file of prompts, one per line, each with "{c}")'
        )
    return list(bench.templates)


def _batches(
    samples: Iterable[tuple[str, bytes, int]], size: int, num_classes: int, root: Path
) -> Iterator[list[tuple[str, bytes, int]]]:
    batch = []
    for key, data, label in samples:
        if not 0 <= label < num_classes:
            raise ValueError(
                f"{root}: sample {key!r} has label {label}, not in 0..{num_classes - 1}"
            )
        batch.append((key, data, label))
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def evaluate_benchmarks(
    loaded: LoadedModel,
    benchmarks: dict[str, Path],
    out: Path | None = None,
    templates: list[str] | None = None,
    *,
    layout: str = "auto",
    batch_size: int = 256,
    log: Log | None = None,
) -> dict:
    """Evaluate several benchmarks (name -> folder); with ``out``, write ``out/eval.json``
    (model identity + metrics per benchmark) and ``out/predictions/<name>.parquet``."""
    results = {}
    for name, root in benchmarks.items():
        res = evaluate_benchmark(loaded, Path(root), templates, batch_size, layout=layout, log=log)
        predictions = res.pop("predictions")
        if out is not None:
            write_predictions(Path(out) / "predictions" / f"{name}.parquet", predictions)
        results[name] = res
        if log is not None:
            log(f"evaluate {name}: top1 {res['top1']:.4f} over {res['n']} images")
    with ieee_fp32():  # as the forwards ran
        numerics = numerics_identity(loaded.device, None)
    summary = {"model": loaded.identity, "numerics": numerics, "benchmarks": results}
    if out is not None:
        write_json(Path(out) / "eval.json", summary)
    return summary
