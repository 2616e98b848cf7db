"""The run's analyses, from its files: effective robustness, accuracy against NN similarity, the
contamination audit. Each returns {"computed": bool, ...}; `guarded` turns an analysis the data
cannot support into a recorded "not computed, because ..." instead of a failed run."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from simgap.config import Config
from simgap.io import read_json, write_json, write_parquet
from simgap.robustness import accuracy_by_similarity, effective_robustness, fit_line
from simgap.select import audit
from simgap.store import Store

Log = Callable[[str], None]


def robustness_analysis(run: Path, cfg: Config, trained: list[str], benchmarks: list[str]) -> dict:
    """Effective robustness (Taori et al.): the line of OOD vs ID top-1 (logit axes) through the
    reference models (trained without similarity control: the full pool and the random
    controls), then every trained split's distance above it. OOD accuracy is the mean over the
    shift benchmarks, as in CLIP's and the paper's robustness plots."""
    id_bench = cfg.analysis.id_benchmark or benchmarks[0]
    ood = [b for b in benchmarks if b != id_bench]
    patterns = cfg.analysis.reference_models
    reference = [s for s in trained if any(fnmatch.fnmatchcase(s, p) for p in patterns)]
    if len(reference) < 2 or not ood:
        return {
            "computed": False,
            "why": f"needs two trained reference models (analysis.reference_models = "
            f"{list(patterns)} matched {reference}) and an OOD benchmark",
        }
    evals = {s: read_json(run / "eval" / f"{s}.json")["benchmarks"] for s in trained}
    id_acc = {s: float(evals[s][id_bench]["top1"]) for s in trained}
    ood_acc = {s: float(np.mean([evals[s][b]["top1"] for b in ood])) for s in trained}
    line = fit_line(
        np.array([id_acc[s] for s in reference]), np.array([ood_acc[s] for s in reference])
    )
    points = [
        {
            "split": s,
            "id_acc": id_acc[s],
            "ood_acc": ood_acc[s],
            "effective_robustness": float(effective_robustness(line, id_acc[s], ood_acc[s])),
            "reference": s in reference,
        }
        for s in trained
    ]
    out = {
        "line": {
            "slope": float(line.slope),
            "intercept": float(line.intercept),
            "id_benchmark": id_bench,
            "ood_benchmarks": ood,
            "ood_aggregate": "mean top-1 over ood_benchmarks",
            "reference_models": reference,
        },
        "points": points,
    }
    write_json(run / "analysis" / "robustness.json", out)
    return {"computed": True}


def similarity_analysis(run: Path, cfg: Config, trained: list[str], benchmarks: list[str]) -> dict:
    """Accuracy against each test point's NN similarity to the split the model was trained on
    (with the reference set added, the max of the reference and split columns)."""
    tables = []
    for bench in benchmarks:
        gaps = pq.read_table(run / "gaps" / f"{bench}.parquet").to_pydict()
        order = {k: i for i, k in enumerate(gaps["test_key"])}
        reference = np.array(gaps["reference"], np.float32)
        for split in trained:
            preds = pq.read_table(
                run / "eval" / "predictions" / f"{split}-{bench}.parquet"
            ).to_pydict()
            unknown = [k for k in preds["key"] if k not in order]
            if unknown:
                raise ValueError(
                    f"{run / 'eval' / 'predictions'}/{split}-{bench}.parquet: "
                    f"{len(unknown)} keys not in gaps/{bench}.parquet (first: {unknown[0]})"
                )
            rows = np.array([order[k] for k in preds["key"]])
            nn = np.array(gaps[split], np.float32)[rows]
            if read_json(run / "splits" / split / "split.json").get("reference_added"):
                nn = np.maximum(nn, reference[rows])
            correct = np.array(preds["pred"]) == np.array(preds["label"])
            t = accuracy_by_similarity(correct, nn, bins=cfg.analysis.bins)
            n = t.num_rows
            t = t.add_column(0, "benchmark", pa.array([bench] * n, pa.string()))
            tables.append(t.add_column(0, "split", pa.array([split] * n, pa.string())))
    if not tables:
        return {"computed": False, "why": "no trained split"}
    write_parquet(run / "analysis" / "accuracy_by_similarity.parquet", pa.concat_tables(tables))
    return {"computed": True}


def audit_analysis(
    tests: dict[str, Store], pool: Store, cfg: Config, truth: pa.Table | None, out: Path, log: Log
) -> dict:
    """The contamination audit: test points with a near-duplicate in the pool (select.audit),
    scored against the world's injected near-duplicates when there are some."""
    verify = "none" if cfg.analysis.audit == "embedding" else "pixels"
    result = audit(
        tests, pool, cfg.analysis.audit_threshold, ground_truth=truth, out_dir=out, verify=verify
    )
    log(f"audit ({result.get('method', 'embedding')}): {result['pairs']} near-duplicate pairs")
    return {"computed": True, "pairs": result["pairs"]}


def guarded(name: str, fn: Callable[[], dict], log: Log) -> dict:
    """An analysis that the data cannot support (e.g. a robustness line through models of equal
    ID accuracy) is recorded as not computed, with why, and the report says so."""
    try:
        return fn()
    except ValueError as err:
        log(f"{name}: not computed: {err}")
        return {"computed": False, "why": str(err)}
