"""Every path of a run folder, named once.

A run folder (``simgap run``) holds::

    run.json                 provenance: config, versions, stage timings
    stages/<stage>.json      each stage's cached result under its key (runner)
    logs/                    one log per stage
    world/                   the built-in world, when the sources are the world
    models/similarity/       the similarity model, when trained on the pool
    stores/<name>/           embedding stores: reference, pool, bench-<benchmark>
    scans/pool/              the pool against every benchmark (simgap scan's layout)
    scans/pool/reference/    the reference set against every benchmark: the thresholds
    splits/<split>/          split files (simgap.select.splitfile)
    gaps/                    per-benchmark NN similarities; check/ and by-split/ per split
    shards/<split>/          materialized training shards
    reference-line/          the reference-line models' (empty) split
    train/                   checkpoints; by-inputs/ indexes them by their inputs
    eval/                    zero-shot results: <model>.json, seeds/, predictions/, reference-line/
    analysis/                robustness, statistics, accuracy by similarity, composition
    audit/                   the contamination audit
    report/                  the HTML/Markdown report

This module is a leaf (pathlib only) so that everything that reads or writes a run folder (the
experiment, the runner, the console, the analyses and the report) can use it without importing
the experiment.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

BENCH_PREFIX = "bench-"  # a benchmark's store is stores/bench-<benchmark>


def bench_store_name(benchmark: str) -> str:
    """The store name of a benchmark (``sketch`` → ``bench-sketch``)."""
    return f"{BENCH_PREFIX}{benchmark}"


def benchmark_name(store_name: str) -> str:
    """A benchmark's name from its store name (``bench-sketch`` → ``sketch``); a name without
    the prefix (a store outside a run) is the benchmark's name as it is."""
    return store_name[len(BENCH_PREFIX) :] if store_name.startswith(BENCH_PREFIX) else store_name


@dataclass(frozen=True)
class RunLayout:
    """The paths of the run folder ``root``. ``RunLayout(Path())`` gives them relative to the run
    folder (what a stage names as the folders it owns)."""

    root: Path

    # ---- provenance and bookkeeping
    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    @property
    def stages(self) -> Path:
        return self.root / "stages"

    def stage_record(self, stage: str) -> Path:
        return self.stages / f"{stage}.json"

    def stage_marker(self, stage: str) -> Path:
        """Present while a stage runs: a killed stage is redone."""
        return self.stages / f"{stage}.started"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    # ---- sources and models
    @property
    def world(self) -> Path:
        return self.root / "world"

    def world_truth(self, file: str) -> Path:
        return self.world / "ground_truth" / file

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def similarity_model(self) -> Path:
        return self.models / "similarity"

    # ---- embeddings and scans
    @property
    def stores(self) -> Path:
        return self.root / "stores"

    def store(self, name: str) -> Path:
        return self.stores / name

    def bench_store(self, benchmark: str) -> Path:
        return self.store(bench_store_name(benchmark))

    @property
    def scans(self) -> Path:
        return self.root / "scans"

    @property
    def pool_scan(self) -> Path:
        """The pool against every benchmark (simgap scan's layout)."""
        return self.scans / "pool"

    @property
    def reference_scan(self) -> Path:
        """The thresholds: the reference set's NN similarities to every benchmark."""
        return self.pool_scan / "reference"

    # ---- splits and their gaps
    @property
    def splits(self) -> Path:
        return self.root / "splits"

    def split(self, name: str) -> Path:
        return self.splits / name

    @property
    def gaps(self) -> Path:
        return self.root / "gaps"

    def gap_table(self, benchmark: str) -> Path:
        return self.gaps / f"{benchmark}.parquet"

    @property
    def check_scan(self) -> Path:
        """Every split's NN similarities, from the written keys."""
        return self.gaps / "check"

    @property
    def gaps_by_split(self) -> Path:
        return self.gaps / "by-split"

    def split_gap(self, split: str, benchmark: str) -> Path:
        return self.gaps_by_split / split / f"{benchmark}.npy"

    # ---- training
    def shards(self, split: str) -> Path:
        return self.root / "shards" / split

    @property
    def reference_line(self) -> Path:
        return self.root / "reference-line"

    @property
    def reference_line_shards(self) -> Path:
        """The reference set alone, as training shards (the reference-line models' data)."""
        return self.shards("reference-line")

    @property
    def train(self) -> Path:
        return self.root / "train"

    @property
    def train_by_inputs(self) -> Path:
        return self.train / "by-inputs"

    # ---- evaluation, analyses, report
    @property
    def eval(self) -> Path:
        return self.root / "eval"

    def eval_result(self, model: str) -> Path:
        return self.eval / f"{model}.json"

    @property
    def eval_seeds(self) -> Path:
        return self.eval / "seeds"

    @property
    def predictions(self) -> Path:
        return self.eval / "predictions"

    def prediction(self, model: str, benchmark: str) -> Path:
        return self.predictions / f"{model}-{benchmark}.parquet"

    @property
    def reference_line_eval(self) -> Path:
        return self.eval / "reference-line"

    @property
    def analysis(self) -> Path:
        return self.root / "analysis"

    @property
    def robustness(self) -> Path:
        return self.analysis / "robustness.json"

    @property
    def statistics(self) -> Path:
        return self.analysis / "statistics.json"

    @property
    def accuracy_by_similarity(self) -> Path:
        return self.analysis / "accuracy_by_similarity.parquet"

    @property
    def separation(self) -> Path:
        return self.analysis / "separation.json"

    @property
    def composition(self) -> Path:
        return self.analysis / "composition.json"

    @property
    def audit(self) -> Path:
        """The contamination audit's folder (audit.json, pairs.parquet)."""
        return self.root / "audit"

    @property
    def report(self) -> Path:
        return self.root / "report"


# Per-shard records that mark work finished (resume compares their fingerprints). Three folder
# names, kept because existing stores, scans and shard folders resume from them (docs/formats.md):
DONE = "done"  # stores (embed) and scans: <store or scan>/done/<shard>.json
SHARDS_DONE = ".done"  # materialized shards: <shards>/.done/<shard>.json, hidden beside the tars
KEY_INDEX = ".index"  # materialize's per-source key index: <shards>/.index/<source shard>.json


def done_record(folder: Path, shard: str, records: str = DONE) -> Path:
    """The one place that names a shard's done record: ``<folder>/<records>/<shard>.json``."""
    return folder / records / f"{shard}.json"
