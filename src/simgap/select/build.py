"""Make one split from stores and scan outputs, write it with its provenance, check gapmatch.

This is what ``simgap select`` runs, and what every select stage of ``simgap run`` runs: one
implementation of each policy, of the size resolution and of the guarantee check. Per-benchmark
inputs are a benchmark store (its test points) and/or a pool scan against it (``simgap scan``:
per-row max and margin); thresholds come from a reference store (scanned here) or from reference
scans (their top-1 similarity). When a pool scan and thresholds are both given, the scan's
recorded input hashes must match them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from simgap.data.keylist import read_key_list
from simgap.io import read_json, sha256_bytes, write_json, write_parquet
from simgap.layout import benchmark_name
from simgap.select.policies import (
    coreset,
    far_pruned,
    gapmatch,
    near_pruned,
    random_split,
    resolve_size,
    split_seed,
    union_score,
)
from simgap.select.splitfile import write_split
from simgap.store import Store, check_compatible, open_store
from simgap.types import Log

POLICIES = ("full", "gapmatch", "near", "far", "random", "coreset", "semdedup", "image-based")
SEEDED = ("random", "semdedup", "image-based")  # the policies a seed changes


def store_fingerprint(store: Store) -> str:
    """Content identity of a store: its manifest holds every shard's checksum and the model."""
    return sha256_bytes(json.dumps(store.manifest, sort_keys=True).encode())


def scan_fingerprint(path: Path) -> str:
    return sha256_bytes((Path(path) / "scan.json").read_bytes())


def _bench_name(path: Path, prefix: str) -> str:
    name = Path(path).name
    return name[len(prefix) :] if name.startswith(prefix) else name


@dataclass(frozen=True)
class SelectConfig:
    policy: str
    pool: Path
    out: Path
    benchmarks: tuple[Path, ...] = ()  # benchmark stores
    scans: tuple[Path, ...] = ()  # pool scans, one per benchmark (same order when both given)
    reference: Path | None = None  # reference store
    reference_scans: tuple[Path, ...] = ()  # reference-vs-benchmark scans, one per benchmark
    size: int | float | None = None
    seed: int = 0
    add_reference: bool = True
    check: bool = True
    control: bool = False
    clusters: int = 100
    eps: float = 0.124
    rule: str = "kept"
    control_of: str | None = None  # the split this one is a size-matched random control of
    params: dict[str, Any] = field(default_factory=dict)


def size_param(size: int | float) -> dict[str, int | float]:
    """A size as split.json records it: ``{"fraction": f}`` of the pool or ``{"size": n}`` rows."""
    return {"fraction": size} if isinstance(size, float) else {"size": size}


@dataclass
class _Bench:
    name: str
    store: Store | None = None
    tests: np.ndarray | None = None
    thresholds: np.ndarray | None = None
    row_max: np.ndarray | None = None
    row_margin: np.ndarray | None = None


def _check_scan(scan: Path, pool: Store, doc: dict[str, Any], bench: _Bench, span: slice) -> None:
    inputs = doc.get("inputs", {})
    if doc["rows"] != pool.rows or inputs.get("base", {}).get("shards_sha256") not in (
        None,
        [s.sha256 for s in pool.shards],
    ):
        raise ValueError(f"{scan}/scan.json: the scan was not made over the pool {pool.path}")
    scanned = Path(scan) / "inputs" / "tests.npy"
    if bench.tests is not None and scanned.exists():
        if not np.array_equal(np.load(scanned, mmap_mode="r")[span], bench.tests):
            raise ValueError(
                f"{scan}/scan.json: the scan's test points are not those of {bench.store.path}"
            )
    recorded = Path(scan) / "inputs" / "thresholds.npy"
    if bench.thresholds is not None and doc.get("thresholds") and recorded.exists():
        if not np.array_equal(np.load(recorded, mmap_mode="r")[span], np.float32(bench.thresholds)):
            raise ValueError(
                f"{scan}/scan.json: the scan's thresholds differ from the reference's NN "
                "similarities"
            )


@dataclass(frozen=True)
class ScanPart:
    """One benchmark's part of a scan folder: the whole folder (a scan of one set of tests) or
    its ``index``-th benchmark (``layout.py``), whose tests are ``span`` of the scan's."""

    folder: Path
    name: str
    index: int | None
    span: slice


def scan_parts(folders: tuple[Path, ...], prefix: str) -> list[ScanPart]:
    from simgap.scan.layout import benchmarks_of, read_meta

    parts = []
    for folder in folders:
        doc = read_meta(folder)
        entries = benchmarks_of(doc)
        if not entries:
            name = _bench_name(folder, prefix)
            parts.append(ScanPart(Path(folder), name, None, slice(0, doc["tests"])))
        for i, e in enumerate(entries):
            name = benchmark_name(Path(e["name"]).name)
            parts.append(ScanPart(Path(folder), name, i, slice(e["start"], e["stop"])))
    return parts


def match_parts(parts: list[ScanPart], names: list[str], what: str) -> list[ScanPart]:
    """The scan part of each benchmark: by name, or (scans of one benchmark each, as many as
    the benchmarks) in the order given."""
    if len(parts) == len(names) and all(p.index is None for p in parts):
        return parts
    by_name = {p.name: p for p in parts}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ValueError(
            f"{what}: no scan of benchmark(s) {', '.join(missing)} "
            f"(the scans hold: {', '.join(by_name) or 'none'})"
        )
    return [by_name[n] for n in names]


def _load_benches(cfg: SelectConfig, pool: Store, fp: dict[str, Any], log: Log) -> list[_Bench]:
    from simgap.scan import ScanOptions, load_scan, scan_store
    from simgap.scan.layout import benchmark_rows

    for f in (*cfg.scans, *cfg.reference_scans):
        if not (Path(f) / "scan.json").exists():
            raise FileNotFoundError(f"{f}: not a finished scan (no scan.json)")
    stores = [open_store(b) for b in cfg.benchmarks]
    scans = scan_parts(cfg.scans, "pool-")
    names = [benchmark_name(s.path.name) for s in stores] or [p.name for p in scans]
    if scans:
        scans = match_parts(scans, names, "--scans")
    refs = scan_parts(cfg.reference_scans, "reference-")
    if refs:
        refs = match_parts(refs, names, "--reference-scans")
    reference = open_store(cfg.reference) if cfg.reference else None
    if reference is not None:
        check_compatible(pool, reference)
        fp["reference"] = store_fingerprint(reference)
    benches = []
    for i, name in enumerate(names):
        if stores:
            store = stores[i]
            check_compatible(pool, store)
            b = _Bench(name, store, store.embeddings())
            fp.setdefault("benchmarks", {})[b.name] = store_fingerprint(store)
        else:
            b = _Bench(name)
        if refs:
            ref = refs[i]
            b.thresholds = load_scan(ref.folder, rows=False).topk_sim[ref.span, 0].copy()
            fp.setdefault("reference_scans", {})[b.name] = scan_fingerprint(ref.folder)
        elif reference is not None and b.tests is not None:
            log(f"select: thresholds of {b.name} from the reference store")
            b.thresholds = (
                scan_store(reference, b.tests, options=ScanOptions(topk=1)).topk_sim[:, 0].copy()
            )
        elif scans and (scans[i].folder / "inputs" / "thresholds.npy").exists():
            # The thresholds the pool scan's margins were computed against.
            b.thresholds = np.load(scans[i].folder / "inputs" / "thresholds.npy")[scans[i].span]
        if scans:
            part = scans[i]
            doc = read_json(part.folder / "scan.json")
            _check_scan(part.folder, pool, doc, b, part.span)
            # Only the per-row field the policy reads stays in memory: a LAION pool's is 800 MB
            # per benchmark. A scan without thresholds has no margins: _need_scores scans.
            if cfg.policy != "gapmatch":
                b.row_max = benchmark_rows(part.folder, "max", part.index)
            elif doc["thresholds"]:
                b.row_margin = benchmark_rows(part.folder, "margin", part.index)
            fp.setdefault("scans", {})[b.name] = scan_fingerprint(part.folder)
        benches.append(b)
    return benches


def _need_scores(pool: Store, benches: list[_Bench], margin: bool, log: Log) -> None:
    """Scan the pool against benchmarks that came without a (suitable) pool scan."""
    from simgap.scan import ScanOptions, scan_store

    for b in benches:
        if (b.row_margin if margin else b.row_max) is not None:
            continue
        if b.tests is None:
            raise ValueError(f"benchmark {b.name}: its scan lacks margins and no store was given")
        if margin and b.thresholds is None:
            raise ValueError(
                f"gapmatch on {b.name} needs thresholds: give --reference or --reference-scans, "
                "or a pool scan made with --thresholds-from"
            )
        log(f"select: scanning the pool against {b.name}")
        res = scan_store(pool, b.tests, b.thresholds if margin else None, ScanOptions(topk=1))
        b.row_max, b.row_margin = res.row_max, res.row_margin


def _pool_keys(pool: Store, mask: np.ndarray) -> list[str]:
    keys: list[str] = []
    for s in pool.shards:
        part = mask[s.offset : s.offset + s.rows]
        keys += pool.read_keys(s.name).column("key").filter(pa.array(part)).to_pylist()
    return keys


def make_mask(
    cfg: SelectConfig, pool: Store, fp: dict[str, Any], log: Log
) -> tuple[np.ndarray, dict[str, Any], list[_Bench], pa.Table | None]:
    """The policy's keep mask over pool rows, its parameters, the benchmarks it used and (for
    semdedup) its per-cluster statistics."""
    p = cfg.policy
    params: dict[str, Any] = dict(cfg.params)
    if p == "full":
        return np.ones(pool.rows, bool), params, [], None
    if p == "random":
        if cfg.size is None:
            raise ValueError("random needs --size")
        n = resolve_size(cfg.size, pool.rows)
        params.update(size_param(cfg.size))
        return random_split(pool.rows, n, cfg.seed), params, [], None
    if p == "semdedup":
        from simgap.select.semdedup import semdedup

        params.update(clusters=cfg.clusters, eps=cfg.eps, rule=cfg.rule)
        keep, stats = semdedup(pool, cfg.clusters, cfg.eps, cfg.seed, rule=cfg.rule, log=log)
        return keep, params, [], stats
    if p == "image-based":
        from simgap.select.image_based import image_based

        if cfg.reference is None:
            raise ValueError("image-based needs --reference (the store whose clusters are kept)")
        reference = open_store(cfg.reference)
        fp["reference"] = store_fingerprint(reference)
        params["clusters"] = cfg.clusters
        return image_based(pool, reference, cfg.clusters, cfg.seed), params, [], None
    benches = _load_benches(cfg, pool, fp, log)
    if not benches:
        raise ValueError(f"{p} needs --benchmarks or --scans")
    _need_scores(pool, benches, margin=p == "gapmatch", log=log)
    if p == "gapmatch":
        return gapmatch([b.row_margin for b in benches]), params, benches, None
    score = union_score([b.row_max for b in benches])
    size = cfg.size if cfg.size is not None else (0.5 if p == "coreset" else None)
    if size is None:
        raise ValueError(f"{p} needs --size (a count or a fraction of the pool)")
    params.update(size_param(size))
    n = resolve_size(size, pool.rows)
    policy = {"near": near_pruned, "far": far_pruned, "coreset": coreset}.get(p)
    if policy is None:
        raise ValueError(f"unknown policy {p!r}: choose one of {', '.join(POLICIES)}")
    return policy(score, n), params, benches, None


def split_rows(pool: Store, split: Path) -> np.ndarray:
    """The pool rows whose keys the split's written key list holds: the check reads what will be
    trained, not the mask that made it."""
    kept = pa.array(sorted(read_key_list(split, allow_empty=True)), pa.string())
    rows = np.zeros(pool.rows, bool)
    for s in pool.shards:
        keys = pool.read_keys(s.name).column("key")
        rows[s.offset : s.offset + s.rows] = pc.is_in(keys, value_set=kept).to_numpy(
            zero_copy_only=False
        )
    return rows


def split_nn(pool: Store, rows: np.ndarray, tests: np.ndarray) -> np.ndarray:
    """Each test point's NN similarity among the pool's ``rows`` (-inf when there are none)."""
    from simgap.scan import ScanOptions, scan_store

    if not rows.any():
        return np.full(len(tests), -np.inf, np.float32)
    spans = {s.name: (s.offset, s.rows) for s in pool.shards}

    def keep(shard: str) -> np.ndarray:
        start, n = spans[shard]
        return rows[start : start + n]

    return scan_store(pool, tests, options=ScanOptions(topk=1, keep=keep)).topk_sim[:, 0]


def nearest(store: Store, tests: np.ndarray) -> np.ndarray:
    """Each test point's NN similarity in a whole store (the reference set's: the thresholds)."""
    from simgap.scan import ScanOptions, scan_store

    return scan_store(store, tests, options=ScanOptions(topk=1)).topk_sim[:, 0]


def guarantee(
    nn: list[np.ndarray],
    thresholds: list[np.ndarray],
    reference_nn: list[np.ndarray] | None = None,
) -> dict[str, Any]:
    """The verdict, per benchmark given the split's NN similarities: every one ≤ its threshold;
    with the reference set added (``reference_nn``), the NN similarity of split ∪ reference
    equal to the threshold."""
    total = violations = equal = 0
    worst = -np.inf
    for i, (split, thr) in enumerate(zip(nn, thresholds, strict=True)):
        split, thr = np.asarray(split, np.float32), np.asarray(thr, np.float32)
        total += len(thr)
        violations += int((split > thr).sum())
        if len(thr):
            worst = max(worst, float(np.max(split - thr)))
        if reference_nn is not None:
            equal += int((np.maximum(split, reference_nn[i]) == thr).sum())
    out: dict[str, Any] = {
        "tests": total,
        "violations": violations,
        "max_excess": worst if np.isfinite(worst) else None,
        "holds": violations == 0,
    }
    if reference_nn is not None:
        out["equal"] = equal
        out["holds"] = violations == 0 and equal == total
    return out


def check_guarantee(
    pool: Store,
    split: Path,
    tests: list[np.ndarray],
    thresholds: list[np.ndarray],
    reference: Store | None = None,
) -> dict[str, Any]:
    """Rescan the pool restricted to the split's written keys: every test point's NN similarity
    must be ≤ its threshold; with the reference set added, the NN similarity of split ∪ reference
    must equal the threshold."""
    rows = split_rows(pool, split)
    nn = [split_nn(pool, rows, t) for t in tests]
    reference_nn = None if reference is None else [nearest(reference, t) for t in tests]
    return guarantee(nn, thresholds, reference_nn)


def record_guarantee(split: Path, check: dict[str, Any]) -> dict[str, Any]:
    """Write the check's result into split.json; stop, naming the split, if it does not hold."""
    split = Path(split)
    meta = {**read_json(split / "split.json"), "guarantee": check}
    write_json(split / "split.json", meta)
    if not check["holds"]:
        why = (
            f"{check['violations']} of {check['tests']} test points have a split neighbour "
            "above their threshold"
        )
        if "equal" in check and check["equal"] != check["tests"]:
            why += (
                f", {check['tests'] - check['equal']} differ from it with the reference set added"
            )
        raise RuntimeError(
            f"split {meta.get('name', split.name)}: the gap-matching guarantee does not hold: "
            f"{why} (see {split / 'split.json'})"
        )
    return meta


def select(
    cfg: SelectConfig, log: Log = lambda _: None, pool: Store | None = None
) -> dict[str, Any]:
    """Make, write and (gapmatch) check one split; with ``control`` also its size-matched random
    control in ``<out>-random``. ``pool``: the pool store already opened (a clip-retrieval folder
    opened with its model), else ``cfg.pool`` is opened. Returns the split's metadata."""
    if cfg.policy not in POLICIES:
        raise ValueError(f"unknown policy {cfg.policy!r}: choose one of {', '.join(POLICIES)}")
    pool = pool if pool is not None else open_store(cfg.pool)
    fp: dict[str, Any] = {"pool": store_fingerprint(pool)}
    mask, params, benches, stats = make_mask(cfg, pool, fp, log)
    out = Path(cfg.out)
    name = out.name
    meta: dict[str, Any] = {
        "name": name,
        "policy": cfg.policy,
        "params": params,
        "seed": cfg.seed if cfg.policy in SEEDED else None,
        "benchmarks": [b.name for b in benches],
        "pool_size": pool.rows,
        "removed": int(pool.rows - mask.sum()),
        "reference_added": cfg.add_reference,
        "control_of": cfg.control_of,
        "fingerprints": fp,
    }
    if stats is not None:
        write_parquet(out / "clusters.parquet", stats)
    meta = write_split(out, _pool_keys(pool, mask), meta)
    if cfg.policy == "gapmatch" and cfg.check:
        meta = run_check(cfg, pool, benches, out, log)
    if cfg.control:
        control_name = f"{name}-random"
        control = dataclasses.replace(
            cfg,
            policy="random",
            out=out.parent / control_name,
            # The runner's rule: seeded by name, so the controls of two splits are not nested.
            seed=split_seed(cfg.seed, control_name),
            size=int(mask.sum()),
            control=False,
            control_of=name,
        )
        select(control, log, pool)
    return meta


def run_check(
    cfg: SelectConfig, pool: Store, benches: list[_Bench], out: Path, log: Log
) -> dict[str, Any]:
    missing = [b.name for b in benches if b.tests is None or b.thresholds is None]
    if missing:
        raise ValueError(
            f"the guarantee check needs the benchmark stores and thresholds of {missing}: "
            "give --benchmarks and --reference/--reference-scans, or pass --no-check"
        )
    reference = open_store(cfg.reference) if cfg.reference and cfg.add_reference else None
    log("select: checking the gap-matching guarantee by rescanning the split")
    check = check_guarantee(
        pool, out, [b.tests for b in benches], [b.thresholds for b in benches], reference
    )
    return record_guarantee(out, check)
