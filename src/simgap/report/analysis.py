"""Report sections on how accuracy depends on similarity: near / far / random split curves,
accuracy per NN-similarity bin, and effective robustness (run layout: splits/near-<f>,
analysis/accuracy_by_similarity.parquet, analysis/robustness.json)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from simgap.report import figures
from simgap.report.blocks import (
    FigureBlock,
    Note,
    Paragraph,
    Section,
    Table,
    mean,
    pct,
    pct_ci,
    pp,
)
from simgap.report.runfiles import (
    MEAN_OOD,
    NOT_COMPUTED,
    RunFiles,
    benchmark_order,
    difference_ci,
    split_order,
    top1,
    top1_ci,
    why_not_computed,
)

CURVE_POLICIES = ("near", "far", "random")


def curve_splits(files: RunFiles) -> dict[str, list[str]]:
    """policy -> its splits <policy>-<fraction> (params.fraction), smallest first. Random
    controls of other splits carry no fraction and are left out."""
    out: dict[str, list[str]] = {}
    for name, split in files.splits.items():
        policy = str(split.get("policy", ""))
        # The name check keeps out splits made with these policies for another purpose (runs made
        # before the coreset policy existed recorded it as far): the curves are <policy>-<fraction>.
        named = name.startswith(f"{policy}-")
        if policy in CURVE_POLICIES and named and "fraction" in (split.get("params") or {}):
            out.setdefault(policy, []).append(name)
    for names in out.values():
        names.sort(key=lambda n: (int(files.splits[n]["size"]), n))
    return {p: out[p] for p in CURVE_POLICIES if p in out}


def curves_section(files: RunFiles) -> Section:
    section = Section("Near, far and random splits")
    by_policy = curve_splits(files)
    if not by_policy:
        section.blocks.append(
            Note(
                f"Near / far / random splits: {NOT_COMPUTED} (no splits/near-*, far-*, random-* "
                "with a 'fraction' parameter)."
            )
        )
        return section
    names = [n for p in by_policy.values() for n in p]
    benches = [
        b for b in benchmark_order(files) if any(top1(files, n, b) is not None for n in names)
    ]
    section.blocks += [
        Paragraph(
            "Near-pruning removes the pool points most similar to the benchmarks' test points "
            "first, so it keeps the least similar ones; far-pruning removes the least similar "
            "first and keeps the most similar; random keeps a uniform sample of the same size. "
            "If accuracy mainly came from train–test similarity, near-pruned splits would "
            "trail random ones and far-pruned splits would beat them at every size."
        ),
        _curve_table(files, by_policy, benches),
    ]
    verdicts = _curve_verdicts(files, by_policy)
    if verdicts:
        section.blocks.append(Paragraph(" ".join(verdicts)))
    if not benches:
        section.blocks.append(Note(f"Evaluation of these splits: {NOT_COMPUTED}."))
        return section
    stats = files.statistics is not None
    panels = [*benches, "mean OOD" if stats else "mean"]
    curves = [
        figures.SizeCurve(
            policy,
            [int(files.splits[n]["size"]) for n in splits],
            *(
                _panel_intervals(files, splits, benches)
                if stats
                else (_panel_values(files, splits, benches), None)
            ),
        )
        for policy, splits in by_policy.items()
    ]
    section.blocks.append(
        FigureBlock(
            "fig-size-curves.png",
            figures.size_curves(panels, curves, _full_point(files, benches)),
            "Line charts of top-1 accuracy against split size for near, far and random splits",
            "Top-1 (%) against split size (pool points kept), one line per policy; the star is "
            "the model trained on the full pool"
            + ("; error bars: 95% intervals." if stats else "."),
        )
    )
    return section


def _panel_values(
    files: RunFiles, splits: Sequence[str], benches: Sequence[str]
) -> dict[str, list[float | None]]:
    values = {b: [top1(files, n, b) for n in splits] for b in benches}
    values["mean"] = [mean(top1(files, n, b) for b in benches) for n in splits]
    return values


def _panel_intervals(
    files: RunFiles, splits: Sequence[str], benches: Sequence[str]
) -> tuple[dict[str, list[float | None]], dict[str, list[tuple[float, float] | None]]]:
    """Per panel (benchmarks and the mean OOD top-1) the means and their 95% intervals."""
    values: dict[str, list[float | None]] = {}
    errors: dict[str, list[tuple[float, float] | None]] = {}
    for panel, key in [*((b, b) for b in benches), ("mean OOD", MEAN_OOD)]:
        ivs = [top1_ci(files, n, key) for n in splits]
        values[panel] = [None if iv is None else iv["mean"] for iv in ivs]
        errors[panel] = [None if iv is None else (iv["lo"], iv["hi"]) for iv in ivs]
    return values, errors


def _full_point(files: RunFiles, benches: Sequence[str]) -> dict[str, tuple[int, float]]:
    """The full pool's accuracy, the curves' common end point, where it was evaluated."""
    full = _full_split(files)
    if full is None or full not in files.evals:
        return {}
    size = int(files.splits[full]["size"])
    if files.statistics is not None:
        points = {}
        for panel, key in [*((b, b) for b in benches), ("mean OOD", MEAN_OOD)]:
            if (iv := top1_ci(files, full, key)) is not None:
                points[panel] = (size, iv["mean"])
        return points
    points = {b: (size, v) for b in benches if (v := top1(files, full, b)) is not None}
    if (m := mean(top1(files, full, b) for b in benches)) is not None:
        points["mean"] = (size, m)
    return points


def _full_split(files: RunFiles) -> str | None:
    return next((n for n, s in files.splits.items() if s.get("policy") == "full"), None)


def _curve_verdicts(files: RunFiles, by_policy: Mapping[str, Sequence[str]]) -> list[str]:
    """One computed sentence per near / far policy: at each size, its mean OOD top-1 against the
    random split of the same fraction (paired difference and whether it is resolved)."""
    if files.statistics is None or "random" not in by_policy:
        return []
    random_at = {files.splits[n]["params"]["fraction"]: n for n in by_policy["random"]}
    out = []
    for policy in ("near", "far"):
        parts = []
        for name in by_policy.get(policy, []):
            other = random_at.get(files.splits[name]["params"]["fraction"])
            d = difference_ci(files, name, other, MEAN_OOD) if other else None
            if d is None:
                continue
            side = "above" if d["mean"] >= 0 else "below"
            verdict = "resolved" if d.get("resolved") else "not resolved"
            parts.append(
                f"{name} is {abs(100 * d['mean']):.1f} points {side} {other} "
                f"[{pp(d['lo'])}, {pp(d['hi'])}], {verdict}"
            )
        if parts:
            out.append(f"Mean OOD top-1, {policy}-pruned against random: " + "; ".join(parts) + ".")
    return out


def _curve_table(
    files: RunFiles, by_policy: Mapping[str, Sequence[str]], benches: Sequence[str]
) -> Table:
    rows = []
    stats = files.statistics is not None
    for policy, splits in by_policy.items():
        for name in splits:
            split = files.splits[name]
            if stats:
                cells = [pct_ci(top1_ci(files, name, b)) for b in [*benches, MEAN_OOD]]
            else:
                values = [top1(files, name, b) for b in benches]
                cells = [*map(pct, values), pct(mean(values))]
            rows.append(
                [
                    name,
                    policy,
                    f"{float(split['params']['fraction']):g}",
                    f"{int(split['size']):,}",
                    *cells,
                ]
            )
    return Table(
        ["split", "policy", "fraction", "kept", *benches, "mean OOD" if stats else "mean"],
        rows,
        caption="Near / far / random splits: kept fraction, size and top-1 (%)"
        + (", with 95% intervals." if stats else "."),
        numeric=tuple(range(2, 5 + len(benches))),
    )


def similarity_section(files: RunFiles, colors: Mapping[str, str]) -> Section:
    section = Section("Accuracy against NN similarity")
    table = files.accuracy_by_similarity
    if table is None or table.num_rows == 0:
        section.blocks.append(
            Note(
                f"Accuracy against NN similarity: {NOT_COMPUTED} "
                "(no analysis/accuracy_by_similarity.parquet"
                f"{why_not_computed(files, 'analysis-similarity')})."
            )
        )
        return section
    rows = table.to_pylist()
    order = {s: i for i, s in enumerate(split_order(files))}
    bench_rank = {b: i for i, b in enumerate(benchmark_order(files))}
    panels: dict[str, list[figures.BinnedAccuracy]] = {}
    groups = sorted(
        {(r["benchmark"], r["split"]) for r in rows},
        key=lambda g: (
            bench_rank.get(g[0], len(bench_rank)),
            g[0],
            order.get(g[1], len(order)),
            g[1],
        ),
    )
    for bench, split in groups:
        part = sorted(
            (r for r in rows if r["benchmark"] == bench and r["split"] == split),
            key=lambda r: r["bin_lo"],
        )
        panels.setdefault(bench, []).append(
            figures.BinnedAccuracy(
                split,
                np.array([r["bin_lo"] for r in part], dtype=float),
                np.array([r["bin_hi"] for r in part], dtype=float),
                np.array([r["accuracy"] for r in part], dtype=float),
            )
        )
    section.blocks += [
        Paragraph(
            "Each benchmark's test points are put into equal-count bins by their NN similarity "
            "to the training set; the line is the model's top-1 within each bin. A line that "
            "rises steeply means accuracy follows train–test similarity."
        ),
        FigureBlock(
            "fig-accuracy-similarity.png",
            figures.accuracy_by_similarity_figure(panels, colors),
            "Line charts of top-1 accuracy per NN-similarity bin, one panel per benchmark",
            "Top-1 (%) per bin of NN similarity (horizontal bars: the bin's range), a line "
            "per split.",
        ),
        _bin_table(panels),
    ]
    return section


def _finite(x: float) -> float | None:
    """An empty bin's accuracy is NaN: shown as a dash, not as "nan"."""
    return float(x) if np.isfinite(x) else None


def _bin_table(panels: Mapping[str, Sequence[figures.BinnedAccuracy]]) -> Table:
    rows = [
        [
            bench,
            s.split,
            f"{len(s.accuracy)}",
            pct(_finite(s.accuracy[0])),
            pct(_finite(s.accuracy[-1])),
            pp(_finite(s.accuracy[-1] - s.accuracy[0])),
        ]
        for bench, series in panels.items()
        for s in series
        if len(s.accuracy)
    ]
    return Table(
        ["benchmark", "split", "bins", "least similar bin", "most similar bin", "difference"],
        rows,
        caption="Top-1 (%) in the least and the most similar bin of test points.",
        numeric=(2, 3, 4, 5),
    )


def robustness_section(files: RunFiles) -> Section:
    section = Section("Effective robustness")
    data = files.robustness
    if data is None:
        section.blocks.append(
            Note(
                f"Effective robustness: {NOT_COMPUTED} (no analysis/robustness.json"
                f"{why_not_computed(files, 'analysis-robustness')})."
            )
        )
        return section
    line = data["line"]
    refs = set(line.get("reference_models") or [])
    points = [
        figures.RobustnessPoint(
            p["split"],
            float(p["id_acc"]),
            float(p["ood_acc"]),
            p["split"] in refs,
            _pair(p.get("id_ci")),
            _pair(p.get("ood_ci")),
        )
        for p in data.get("points", [])
    ]
    id_name = str(line.get("id_benchmark", "ID benchmark"))
    ood = line.get("ood_benchmarks") or []
    ood_name = ", ".join(ood) if isinstance(ood, list) else str(ood)
    source = line.get("source")
    if source == "reference-line":
        fitted = (
            f"fitted to the {len(refs)} models trained on the reference set alone (the role of "
            "the paper's ImageNet-trained models), varying budget and seed"
        )
    elif source:
        fitted = f"fitted to the {len(refs)} published models of {source}"
    else:
        fitted = "fitted to the models named below"
    section.blocks += [
        Paragraph(
            f"Mean top-1 on the out-of-distribution benchmarks ({ood_name or 'OOD'}) against "
            f"top-1 on {id_name}, on logit axes. The line, logit(OOD) = "
            f"{float(line['slope']):.3f} · logit(ID) + {float(line['intercept']):.3f}, is "
            f"{fitted}; effective robustness is a model's distance above it in accuracy "
            "(Taori et al. 2020)."
        ),
        FigureBlock(
            "fig-robustness.png",
            figures.robustness_plot(
                float(line["slope"]),
                float(line["intercept"]),
                points,
                f"top-1 on {id_name} (%, logit scale)",
                "mean top-1 on the OOD benchmarks (%, logit scale)",
            ),
            "Scatter plot of OOD against ID accuracy on logit axes with the fitted line",
            "OOD against ID top-1 on logit axes; circles are the models the line was fitted "
            "to, diamonds the splits; error bars: 95% intervals where the run computed them.",
        ),
        _robustness_table(data, refs),
    ]
    per_benchmark = data.get("effective_robustness")
    if per_benchmark:
        section.blocks.append(_robustness_by_benchmark(per_benchmark, ood))
    return section


def _pair(value: object) -> tuple[float, float] | None:
    if isinstance(value, list | tuple) and len(value) == 2:
        return float(value[0]), float(value[1])
    return None


def _robustness_table(data: Mapping, refs: set[str]) -> Table:
    rows = []
    for p in data.get("points", []):
        er = p.get("effective_robustness")
        rows.append(
            [
                str(p["split"]),
                pct(float(p["id_acc"])),
                pct(float(p["ood_acc"])),
                pp(None if er is None else float(er)),
                "yes" if p["split"] in refs else "no",
            ]
        )
    return Table(
        ["split", "ID top-1", "OOD top-1", "effective robustness (pp)", "fits the line"],
        rows,
        caption="Effective robustness per split: OOD top-1 above (+) or below (−) the line, in "
        "percentage points; 'fits the line': one of the models the line was fitted to.",
        numeric=(1, 2, 3),
    )


def _robustness_by_benchmark(per_split: Mapping, ood: Sequence[str]) -> Table:
    """Effective robustness per OOD benchmark (a line per benchmark, as the paper quotes
    ImageNet-Sketch alone) and for the mean OOD top-1, with 95% intervals."""
    cols = [*ood, MEAN_OOD]
    rows = []
    for split, by_bench in per_split.items():
        cells = []
        for b in cols:
            iv = by_bench.get(b)
            cells.append(
                pct_ci({**iv, "resolved": iv["lo"] > 0 or iv["hi"] < 0} if iv else None, True)
            )
        rows.append([split, *cells])
    return Table(
        ["split", *ood, "mean OOD"],
        rows,
        caption="Effective robustness (pp) per OOD benchmark, each against its own line, with "
        "95% intervals (seeds and test points resampled, the line refitted in every "
        "replicate); * marks an interval that excludes 0.",
    )
