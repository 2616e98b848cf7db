"""The run's analyses, from its files: effective robustness, accuracy against NN similarity, the
contamination audit. Each returns {"computed": bool, ...}; `guarded` turns an analysis the data
cannot support (:class:`simgap.stats.NotComputable`) into a recorded "not computed, because ..."
instead of a failed run; unreadable or inconsistent files still fail it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from simgap import claims, stats
from simgap.audit import audit
from simgap.io import read_json, write_json, write_parquet
from simgap.layout import RunLayout
from simgap.robustness import (
    Line,
    accuracy_by_similarity,
    effective_robustness,
    fit_line,
    logit,
)
from simgap.store import Store
from simgap.types import Log

MEAN_OOD = "mean-ood"  # the pseudo-benchmark of every table: mean top-1 over the OOD benchmarks


# ----------------------------------------------------------------------------- model outcomes


def model_names(split: str, seeds: int) -> list[str]:
    return [split if k == 0 else f"{split}@s{k}" for k in range(seeds)]


def correct_matrix(folder: Path, models: list[str], bench: str) -> tuple[list[str], np.ndarray]:
    """``models x tests`` 0/1 outcomes from ``<folder>/predictions/<model>-<bench>.parquet``,
    every model's rows in the same (sorted key) order."""
    keys: list[str] | None = None
    rows = []
    for model in models:
        path = folder / "predictions" / f"{model}-{bench}.parquet"
        t = pq.read_table(path, columns=["key", "label", "pred"]).to_pydict()
        order = np.argsort(np.array(t["key"], dtype=object), kind="stable")
        k = [t["key"][i] for i in order]
        if keys is None:
            keys = k
        elif k != keys:
            raise ValueError(f"{path}: test keys differ from {models[0]}'s on {bench}")
        rows.append((np.array(t["pred"])[order] == np.array(t["label"])[order]).astype(np.float64))
    return keys or [], np.stack(rows)


@dataclass(frozen=True)
class Sampling:
    """The settings every interval of the analyses depends on: which benchmark is in
    distribution, how many seeds each split was trained with, the bootstrap's replicates and
    its seed."""

    id_benchmark: str  # "" = the first benchmark
    seeds: int
    bootstrap: int
    seed: int


def _id_and_ood(id_benchmark: str, benchmarks: list[str]) -> tuple[str, list[str]]:
    id_bench = id_benchmark or benchmarks[0]
    return id_bench, [b for b in benchmarks if b != id_bench]


class Outcomes:
    """Every trained split's outcomes and their bootstrap replicates (shared draws)."""

    def __init__(self, run: Path, sampling: Sampling, trained: list[str], benchmarks: list[str]):
        self.seeds = sampling.seeds
        self.id_bench, self.ood = _id_and_ood(sampling.id_benchmark, benchmarks)
        self.benchmarks = benchmarks
        self.correct = {
            (s, b): correct_matrix(RunLayout(run).eval, model_names(s, self.seeds), b)[1]
            for s in trained
            for b in benchmarks
        }
        tests = {b: self.correct[(trained[0], b)].shape[1] for b in benchmarks} if trained else {}
        self.boot = stats.Bootstrap(tests, sampling.bootstrap, sampling.seed)
        self.trained = trained
        self._cache: dict[tuple[str, str], tuple[float, np.ndarray]] = {}

    def estimate(self, split: str, bench: str) -> tuple[float, np.ndarray]:
        """(point, replicates) of a split's top-1 on a benchmark, or on MEAN_OOD."""
        key = (split, bench)
        if key not in self._cache:
            if bench == MEAN_OOD:
                parts = [self.estimate(split, b) for b in self.ood]
                point = float(np.mean([p for p, _ in parts]))
                self._cache[key] = (point, np.mean(np.stack([r for _, r in parts]), axis=0))
            else:
                c = self.correct[key]
                self._cache[key] = (float(c.mean()), self.boot.replicate(c, bench))
        return self._cache[key]

    def columns(self) -> list[str]:
        return [*self.benchmarks, MEAN_OOD] if self.ood else list(self.benchmarks)


def _as_interval(est: tuple[float, np.ndarray]) -> stats.Interval:
    return stats.interval(est[0], est[1])


# ----------------------------------------------------------------------------- robustness


def read_reference_points(path: Path, id_bench: str, ood: list[str]) -> dict[str, dict]:
    """``analysis.reference_points``: published models' accuracies (docs/reference-points.md):
    a CSV with a ``model`` column, the ID benchmark's column and one per OOD benchmark, each an
    accuracy in [0, 1] or, when any value is above 1, in percent. Other columns are ignored."""
    import csv

    if not Path(path).is_file():
        raise ValueError(f"{path}: no such file (analysis.reference_points)")
    with open(path, newline="", encoding="utf-8") as f:
        # Lines starting with # are comments (where the numbers come from).
        rows = list(csv.DictReader(line for line in f if not line.lstrip().startswith("#")))
    if not rows:
        raise ValueError(f"{path}: no reference points")
    header = list(rows[0])
    need = ["model", id_bench, *ood]
    missing = [c for c in need if c not in header]
    if missing:
        raise ValueError(f"{path}: missing columns {missing} (has {header})")
    percent = any(float(r[c]) > 1 for r in rows for c in need[1:] if r[c].strip())
    out = {}
    for i, r in enumerate(rows, start=2):
        try:
            accs = {c: float(r[c]) / (100 if percent else 1) for c in need[1:]}
        except ValueError as err:
            raise ValueError(f"{path}: line {i}: {err}") from None
        if not all(0 <= v <= 1 for v in accs.values()):
            raise ValueError(f"{path}: line {i}: accuracies must be in [0, 1] or [0, 100]")
        out[r["model"]] = accs
    return out


def _fit_rows(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares slope and intercept per row of ``x``/``y`` (replicates x models)."""
    xm, ym = x.mean(axis=1, keepdims=True), y.mean(axis=1, keepdims=True)
    var = ((x - xm) ** 2).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        slope = ((x - xm) * (y - ym)).sum(axis=1) / var
    return slope, ym[:, 0] - slope * xm[:, 0]


def _line_replicates(
    ref_id: list[tuple[float, np.ndarray]], ref_ood: list[tuple[float, np.ndarray]]
) -> tuple[Line, np.ndarray, np.ndarray]:
    """The line through the reference models, and its slope/intercept in every replicate."""
    line = fit_line(np.array([p for p, _ in ref_id]), np.array([p for p, _ in ref_ood]))
    x = logit(np.stack([r for _, r in ref_id], axis=1))
    y = logit(np.stack([r for _, r in ref_ood], axis=1))
    slope, intercept = _fit_rows(x, y)
    return line, slope, intercept


def _er(
    line: Line,
    slopes: np.ndarray,
    intercepts: np.ndarray,
    id_est: tuple[float, np.ndarray],
    ood_est: tuple[float, np.ndarray],
) -> stats.Interval:
    point = effective_robustness(line, id_est[0], ood_est[0])
    z = slopes * logit(id_est[1]) + intercepts
    reps = ood_est[1] - 1.0 / (1.0 + np.exp(-z))
    return stats.interval(point, reps)


Estimate = tuple[float, np.ndarray]  # a point and its bootstrap replicates
References = dict[str, dict[str, Estimate]]  # reference model -> benchmark -> its top-1


def _reference_estimates(
    run: Path,
    boot: stats.Bootstrap,
    benchmarks: list[str],
    line_models: list[str],
    points: tuple[Path, str, list[str]] | None,
) -> References:
    """The reference models' top-1: published points (``points``: the CSV, the ID and the OOD
    benchmarks), or the reference-line models' predictions, resampled like the splits'."""
    ref: References = {}
    if points is not None:
        for model, accs in read_reference_points(*points).items():
            # Published points carry no test-level outcomes: fixed in every replicate.
            ref[model] = {b: (v, np.full(boot.replicates, v)) for b, v in accs.items()}
        return ref
    folder = RunLayout(run).reference_line_eval
    for model in line_models:
        ref[model] = {}
        for b in benchmarks:
            c = correct_matrix(folder, [model], b)[1]
            ref[model][b] = (float(c.mean()), boot.replicate(c, b))
    return ref


def _add_mean_ood(ref: References, ood: list[str]) -> None:
    """Each reference model's MEAN_OOD estimate, as Outcomes.estimate makes a split's."""
    for model in ref:
        parts = [ref[model][b] for b in ood]
        ref[model][MEAN_OOD] = (
            float(np.mean([p for p, _ in parts])),
            np.mean(np.stack([r for _, r in parts]), axis=0),
        )


def _ci(est: Estimate) -> list[float]:
    iv = stats.interval(*est)
    return [iv.lo, iv.hi]


def _point(name: str, id_est: Estimate, ood_est: Estimate, er: float, reference: bool) -> dict:
    """One model on the figure: its ID and mean OOD top-1 with intervals, and its ER."""
    return {
        "split": name,
        "id_acc": id_est[0],
        "ood_acc": ood_est[0],
        "id_ci": _ci(id_est),
        "ood_ci": _ci(ood_est),
        "effective_robustness": er,
        "reference": reference,
    }


def _robustness_points(
    out: Outcomes, ref: References, er: dict[str, dict], mean_line: dict[str, float]
) -> list[dict]:
    """Every trained split, then every reference model, against the mean OOD line."""
    id_bench, line = out.id_bench, Line(mean_line["slope"], mean_line["intercept"])
    splits = [
        _point(
            s, out.estimate(s, id_bench), out.estimate(s, MEAN_OOD), er[s][MEAN_OOD]["mean"], False
        )
        for s in out.trained
    ]
    references = [
        _point(
            m,
            ref[m][id_bench],
            ref[m][MEAN_OOD],
            float(effective_robustness(line, ref[m][id_bench][0], ref[m][MEAN_OOD][0])),
            True,
        )
        for m in ref
    ]
    return splits + references


def robustness_analysis(
    run: Path,
    sampling: Sampling,
    trained: list[str],
    benchmarks: list[str],
    line_models: list[str],
    reference_points: Path | None = None,
) -> dict:
    """Effective robustness (Taori et al. 2020), per OOD benchmark and for the mean OOD top-1:
    a line of OOD vs ID top-1 on logit axes through the reference models (the world: models
    trained on the reference set alone; a real run: the published ``reference_points``), then
    every trained split's distance above it, in accuracy, with its bootstrap interval (the line
    is refitted in every replicate: the reference models' test points are resampled too)."""
    id_bench, ood = _id_and_ood(sampling.id_benchmark, benchmarks)
    if not ood:
        return {"computed": False, "why": "needs an OOD benchmark besides the ID one"}
    out = Outcomes(run, sampling, trained, benchmarks)
    points = None if reference_points is None else (reference_points, id_bench, ood)
    ref = _reference_estimates(run, out.boot, benchmarks, line_models, points)
    if len(ref) < 2:
        return {
            "computed": False,
            "why": f"needs at least two reference models, has {len(ref)} (analysis."
            "reference_epochs x reference_seeds, or analysis.reference_points)",
        }
    _add_mean_ood(ref, ood)
    lines, er = {}, {s: {} for s in trained}
    for bench in [*ood, MEAN_OOD]:
        line, slopes, intercepts = _line_replicates(
            [ref[m][id_bench] for m in ref], [ref[m][bench] for m in ref]
        )
        lines[bench] = {"slope": line.slope, "intercept": line.intercept}
        for s in trained:
            iv = _er(line, slopes, intercepts, out.estimate(s, id_bench), out.estimate(s, bench))
            er[s][bench] = iv.as_dict()
    source = "reference-line" if reference_points is None else str(reference_points)
    doc = {
        "line": {
            **lines[MEAN_OOD],
            "id_benchmark": id_bench,
            "ood_benchmarks": ood,
            "ood_aggregate": "mean top-1 over ood_benchmarks",
            "reference_models": list(ref),
            "source": source,
        },
        "lines": lines,
        "points": _robustness_points(out, ref, er, lines[MEAN_OOD]),
        "effective_robustness": er,
        "reference_models": len(ref),
    }
    write_json(RunLayout(run).robustness, doc)
    return {"computed": True, "reference_models": len(ref)}


# ----------------------------------------------------------------------------- statistics


def _pairs(run: Path, trained: list[str]) -> list[tuple[str, str]]:
    """Each split against its size-matched control, near-f and far-f against random-f, and
    each split against the full pool with the reference set added as in the split (or not)."""
    meta = {s: read_json(RunLayout(run).split(s) / "split.json") for s in trained}
    out = []
    for s in trained:
        control_of = meta[s].get("control_of")
        if control_of in meta:
            out.append((control_of, s))
    # near-f and far-f against random-f: the same kept fraction (the paper's curves).
    random_at = {
        meta[s]["params"]["fraction"]: s
        for s in trained
        if meta[s].get("policy") == "random" and "fraction" in (meta[s].get("params") or {})
    }
    for s in trained:
        fraction = (meta[s].get("params") or {}).get("fraction")
        if meta[s].get("policy") in ("near", "far") and fraction in random_at:
            out.append((s, random_at[fraction]))
    for s in trained:
        full = claims.baseline(meta, s)
        if full and full != s:
            out.append((s, full))
    return list(dict.fromkeys(out))


def pair_name(a: str, b: str) -> str:
    return f"{a} - {b}"


def statistics_analysis(
    run: Path, sampling: Sampling, trained: list[str], benchmarks: list[str]
) -> dict:
    """Every split's top-1 with its 95% interval, the paired differences (split - control,
    split - full), and the paper's two claims, computed: ``analysis/statistics.json``."""
    if not trained:
        return {"computed": False, "why": "no trained split"}
    out = Outcomes(run, sampling, trained, benchmarks)
    cols = out.columns()
    top1 = {s: {b: _as_interval(out.estimate(s, b)).as_dict() for b in cols} for s in trained}
    differences = {}
    for a, b in _pairs(run, trained):
        differences[pair_name(a, b)] = {
            bench: stats.difference(out.estimate(a, bench), out.estimate(b, bench))[0].as_dict(
                resolved=True
            )
            for bench in cols
        }
    first_eval = read_json(RunLayout(run).eval_result(trained[0]))["benchmarks"]
    chance = {
        b: 1.0 / first_eval[b]["classes"] if first_eval[b].get("classes") else None
        for b in benchmarks
    }
    meta = {s: read_json(RunLayout(run).split(s) / "split.json") for s in trained}
    doc = {
        "seeds": out.seeds,
        "test_points": dict(out.boot.tests),
        "chance": chance,
        "id_benchmark": out.id_bench,
        "ood_benchmarks": out.ood,
        "bootstrap": {"replicates": out.boot.replicates, "level": stats.LEVEL},
        "top1": top1,
        "differences": differences,
        "claims": claims.compute(out, meta),
    }
    write_json(RunLayout(run).statistics, doc)
    return {"computed": True}


def similarity_analysis(run: Path, trained: list[str], benchmarks: list[str], bins: int) -> dict:
    """Accuracy against each test point's NN similarity to the split the model was trained on
    (with the reference set added, the max of the reference and split columns)."""
    tables = []
    for bench in benchmarks:
        gaps = pq.read_table(RunLayout(run).gap_table(bench)).to_pydict()
        order = {k: i for i, k in enumerate(gaps["test_key"])}
        reference = np.array(gaps["reference"], np.float32)
        for split in trained:
            preds = pq.read_table(RunLayout(run).prediction(split, bench)).to_pydict()
            unknown = [k for k in preds["key"] if k not in order]
            if unknown:
                raise ValueError(
                    f"{RunLayout(run).prediction(split, bench)}: "
                    f"{len(unknown)} keys not in gaps/{bench}.parquet (first: {unknown[0]})"
                )
            rows = np.array([order[k] for k in preds["key"]])
            nn = np.array(gaps[split], np.float32)[rows]
            if read_json(RunLayout(run).split(split) / "split.json").get("reference_added"):
                nn = np.maximum(nn, reference[rows])
            correct = np.array(preds["pred"]) == np.array(preds["label"])
            t = accuracy_by_similarity(correct, nn, bins=bins)
            n = t.num_rows
            t = t.add_column(0, "benchmark", pa.array([bench] * n, pa.string()))
            tables.append(t.add_column(0, "split", pa.array([split] * n, pa.string())))
    if not tables:
        return {"computed": False, "why": "no trained split"}
    write_parquet(RunLayout(run).accuracy_by_similarity, pa.concat_tables(tables))
    return {"computed": True}


def audit_analysis(
    tests: dict[str, Store],
    pool: Store,
    method: str,
    threshold: float,
    truth: pa.Table | None,
    out: Path,
    log: Log,
) -> dict:
    """The contamination audit: test points with a near-duplicate in the pool (simgap.audit),
    scored against the world's injected near-duplicates when there are some. ``method``:
    "embedding" (pairs above ``threshold``) or "pixels" (those pairs verified on pixels)."""
    verify = "none" if method == "embedding" else "pixels"
    result = audit(tests, pool, threshold, ground_truth=truth, out_dir=out, verify=verify)
    log(f"audit ({result.get('method', 'embedding')}): {result['pairs']} near-duplicate pairs")
    return {"computed": True, "pairs": result["pairs"]}


def guarded(name: str, fn: Callable[[], dict], log: Log) -> dict:
    """An analysis that the data cannot support (e.g. a robustness line through models of equal
    ID accuracy) is recorded as not computed, with why, and the report says so. Only
    NotComputable: a ValueError from corrupt or inconsistent files must fail the stage, not
    become a quiet "not computed"."""
    try:
        return fn()
    except stats.NotComputable as err:
        log(f"{name}: not computed: {err}")
        return {"computed": False, "why": str(err)}
