"""Nearest-neighbour galleries: a few test images of each benchmark beside their nearest reference
and pool images, with similarities (the paper's first figure).

Read from the run's scan results (scans/pool/ and scans/pool/reference/, per benchmark: per test
point the top-k similarities and global base rows) and the stores' keys tables (stores/bench-<b>,
stores/reference, stores/pool: the `source` locator of every row); the image bytes are fetched
again from those sources. Only the keys tables of the shards that hold a shown row are read, so a
pool of 10^8 rows costs no more than a small one. An image that cannot be found again (a source
moved or deleted) is drawn as a grey cell and counted, never an error.
"""

from __future__ import annotations

import tarfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simgap.data.images import decode_rgb, pick_image
from simgap.data.sources import fetch_samples
from simgap.layout import RunLayout, bench_store_name
from simgap.report.blocks import FigureBlock, Note, Paragraph, Section, Table, sim
from simgap.report.imagegrid import Thumb, nn_gallery
from simgap.report.runfiles import NOT_COMPUTED, RunFiles, benchmark_order
from simgap.store import Store, StoreError, open_store

NEIGHBOURS = 3  # per set, beside each test image
THUMB_PIXELS = 256


@dataclass(frozen=True)
class GallerySample:
    """A row of a store, found by its key and where its image lives."""

    key: str
    source: str | None


@dataclass(frozen=True)
class Neighbour:
    sample: GallerySample
    similarity: float


@dataclass(frozen=True)
class GalleryRow:
    label: str  # why this test image was picked
    test: GallerySample
    reference: list[Neighbour]
    pool: list[Neighbour]


class KeyIndex:
    """Global row -> sample for one store, reading each shard's keys table once, on demand."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._offsets = np.array([s.offset for s in store.shards], dtype=np.int64)
        self._tables: dict[str, tuple[list[str], list[str | None]]] = {}

    def __getitem__(self, row: int) -> GallerySample:
        if not 0 <= row < self._store.rows:
            raise IndexError(f"{self._store.path}: row {row} out of range")
        shard = self._store.shards[int(np.searchsorted(self._offsets, row, side="right")) - 1]
        if shard.name not in self._tables:
            table = self._store.read_keys(shard.name)
            keys = table.column("key").to_pylist()
            has_source = "source" in table.column_names
            sources = table.column("source").to_pylist() if has_source else [None] * len(keys)
            self._tables[shard.name] = (keys, sources)
        keys, sources = self._tables[shard.name]
        return GallerySample(keys[row - shard.offset], sources[row - shard.offset])


def pick_tests(pool_nn: np.ndarray) -> list[tuple[str, int]]:
    """Test images to show: the highest, median and lowest NN similarity to the pool (ties to
    the lowest index, so the choice is deterministic); duplicates dropped for tiny benchmarks."""
    order = np.argsort(-pool_nn, kind="stable")
    picks = [("highest", order[0]), ("median", order[len(order) // 2]), ("lowest", order[-1])]
    out: list[tuple[str, int]] = []
    for label, index in picks:
        if int(index) not in [i for _, i in out]:
            out.append((label, int(index)))
    return out


def gallery_rows(run_dir: Path, bench: str, stores: dict[str, KeyIndex]) -> list[GalleryRow]:
    """The gallery of one benchmark, from its two scans; FileNotFoundError if one is missing."""
    # Imported here: simgap.scan loads torch (its kernel), which a report without scans, and
    # `simgap report --help`, should not pay for.
    from simgap.scan.layout import benchmark_scan

    # One scan of every benchmark (scans/pool/) with its reference pass (scans/pool/reference/).
    layout = RunLayout(run_dir)
    ref_scan = benchmark_scan(layout.reference_scan, bench_store_name(bench))
    pool_scan = benchmark_scan(layout.pool_scan, bench_store_name(bench))
    tests = _store(stores, run_dir, bench_store_name(bench))
    if ref_scan.topk_sim.shape[0] != pool_scan.topk_sim.shape[0]:
        raise ValueError(
            f"{run_dir}/scans: pool and pool/reference have different test counts for {bench}"
        )
    if pool_scan.topk_sim.shape[0] == 0:
        return []
    ref, pool = _store(stores, run_dir, "reference"), _store(stores, run_dir, "pool")
    return [
        GalleryRow(
            label,
            tests[i],
            _neighbours(ref, ref_scan.topk_sim[i], ref_scan.topk_row[i]),
            _neighbours(pool, pool_scan.topk_sim[i], pool_scan.topk_row[i]),
        )
        for label, i in pick_tests(pool_scan.topk_sim[:, 0])
    ]


def _store(stores: dict[str, KeyIndex], run_dir: Path, name: str) -> KeyIndex:
    if name not in stores:
        stores[name] = KeyIndex(open_store(RunLayout(run_dir).store(name)))
    return stores[name]


def _neighbours(index: KeyIndex, sims: np.ndarray, rows: np.ndarray) -> list[Neighbour]:
    # A base set smaller than k pads with row -1 / similarity -inf: those are not neighbours.
    return [
        Neighbour(index[int(r)], float(s))
        for s, r in zip(sims[:NEIGHBOURS], rows[:NEIGHBOURS], strict=True)
        if r >= 0 and np.isfinite(s)
    ]


def fetch_thumbnails(
    samples: Iterable[GallerySample], missing: Counter[str]
) -> dict[GallerySample, np.ndarray]:
    """Sample -> RGB thumbnail for every sample found again; reasons for the others in `missing`.
    Each source (a tar shard holds many samples) is read once."""
    by_source: dict[str, set[str]] = {}
    for sample in set(samples):
        if sample.source is None:
            missing["no_source_column"] += 1
        else:
            by_source.setdefault(sample.source, set()).add(sample.key)
    out: dict[GallerySample, np.ndarray] = {}
    for source, keys in sorted(by_source.items()):
        try:
            found = fetch_samples(source, keys)
        except (OSError, ValueError, tarfile.TarError):
            missing["source_unreadable"] += len(keys)
            continue
        if len(found) < len(keys):
            missing["not_in_source"] += len(keys - set(found))
        for key, members in found.items():
            image = decode_rgb(pick_image(members), missing)
            if image is not None:
                image.thumbnail((THUMB_PIXELS, THUMB_PIXELS))  # bounds memory for huge images
                out[GallerySample(key, source)] = np.asarray(image)
    return out


def _thumbs(row: GalleryRow, images: dict[GallerySample, np.ndarray]) -> list[Thumb]:
    pool_nn = row.pool[0].similarity if row.pool else float("nan")
    cells = [
        Thumb(images.get(row.test), f"test ({row.label})\n{row.test.key}\npool NN {sim(pool_nn)}")
    ]
    for role, neighbours in (("reference", row.reference), ("pool", row.pool)):
        cells += [
            Thumb(images.get(n.sample), f"{role} #{j}\n{n.sample.key}\n{sim(n.similarity)}")
            for j, n in enumerate(neighbours, start=1)
        ]
    return cells


def _groups(rows: Sequence[GalleryRow]) -> list[int]:
    """Columns that start the reference and the pool group of the gallery grid."""
    n_ref = max(len(r.reference) for r in rows)
    return [1, 1 + n_ref]


def _table(galleries: dict[str, list[GalleryRow]]) -> Table:
    rows = [
        [
            bench,
            row.label,
            row.test.key,
            row.reference[0].sample.key if row.reference else "—",
            sim(row.reference[0].similarity) if row.reference else "—",
            row.pool[0].sample.key if row.pool else "—",
            sim(row.pool[0].similarity) if row.pool else "—",
        ]
        for bench, gallery in galleries.items()
        for row in gallery
    ]
    return Table(
        [
            "benchmark",
            "picked by pool NN",
            "test key",
            "nearest reference",
            "similarity",
            "nearest pool",
            "similarity",
        ],
        rows,
        caption="Gallery test images and their nearest reference and pool images.",
        numeric=(4, 6),
    )


def gallery_section(files: RunFiles, benches: Sequence[str] | None = None) -> Section:
    section = Section("Nearest-neighbour galleries")
    run_dir = files.run_dir
    benches = list(benchmark_order(files) if benches is None else benches)
    stores: dict[str, KeyIndex] = {}
    galleries: dict[str, list[GalleryRow]] = {}
    absent: list[str] = []
    for bench in benches:
        try:
            rows = gallery_rows(run_dir, bench, stores) if run_dir is not None else []
        except (FileNotFoundError, KeyError, StoreError):  # KeyError: not in the scan
            rows = []
        if rows:
            galleries[bench] = rows
        else:
            absent.append(bench)
    if not galleries:
        section.blocks.append(
            Note(
                f"Nearest-neighbour galleries: {NOT_COMPUTED} (no scans/pool/ and "
                "scans/pool/reference/ results with their stores)."
            )
        )
        return section
    missing: Counter[str] = Counter()
    samples = [
        s
        for rows in galleries.values()
        for r in rows
        for s in [r.test, *(n.sample for n in r.reference + r.pool)]
    ]
    images = fetch_thumbnails(samples, missing)
    section.blocks.append(
        Paragraph(
            "For three test images of each benchmark (the highest, the median and the lowest "
            "NN similarity to the pool), the test image, then its nearest images in the "
            "reference set, then in the pool, each with its cosine similarity to the test image."
        )
    )
    for bench, rows in galleries.items():
        section.blocks.append(
            FigureBlock(
                f"fig-gallery-{bench}.png",
                nn_gallery([_thumbs(r, images) for r in rows], _groups(rows)),
                f"Image grid: {bench} test images beside their nearest reference and pool images",
                f"{bench}: test image, its {NEIGHBOURS} nearest reference images, its "
                f"{NEIGHBOURS} nearest pool images.",
            )
        )
    section.blocks.append(_table(galleries))
    if absent:
        section.blocks.append(Note(f"Galleries {NOT_COMPUTED} for: {', '.join(absent)}."))
    lost = sum(missing.values())
    if lost:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(missing.items()))
        section.blocks.append(
            Note(
                f"{lost} of {len(set(samples))} gallery images could not be found again "
                f"({reasons})."
            )
        )
    return section
