"""Build the run report (HTML + Markdown) from the files of a run directory alone.

The report reads only what the pipeline wrote (docs/CONTRACTS.md, "Run directory"): run.json,
gaps/*.parquet, splits/*/split.json and eval/*.json. Every number shown is computed from those
files here; a stage whose files are absent is replaced by a line saying it was not run.

Both outputs are rendered from one list of sections, so HTML and Markdown always agree.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from simgap.io import write_bytes
from simgap.report import figures

# Columns of gaps/<benchmark>.parquet that are not a split's NN similarity.
_GAP_ID_COLUMNS = ("test_key", "label")
_GAP_BASE_SETS = ("reference", "pool")
# split.json keys that may hold the guarantee check's verdict, in order of preference.
_VERDICT_KEYS = ("ok", "holds", "passed", "satisfied", "valid")
_FIGURE_FILES = ("fig-gaps.png", "fig-accuracy.png", "fig-removed.png")

# ----------------------------------------------------------------------------- reading the run


@dataclass(frozen=True)
class RunFiles:
    """Everything the report reads from a run directory, already parsed."""

    run: dict
    gaps: dict[str, dict[str, np.ndarray]]  # benchmark -> set name -> NN similarities
    splits: dict[str, dict]  # split name -> split.json
    evals: dict[str, dict]  # split name -> eval/<split>.json


def load_run(run_dir: Path) -> RunFiles:
    """Parse a run directory; run.json is required, every other part may be missing."""
    run_dir = Path(run_dir)
    run_json = run_dir / "run.json"
    if not run_json.is_file():
        raise FileNotFoundError(f"{run_json} not found: not a simgap run directory")
    return RunFiles(
        run=_read_json(run_json),
        gaps={p.stem: _read_gaps(p) for p in sorted((run_dir / "gaps").glob("*.parquet"))},
        splits={
            p.parent.name: _read_json(p) for p in sorted((run_dir / "splits").glob("*/split.json"))
        },
        evals=dict(_read_eval(p) for p in sorted((run_dir / "eval").glob("*.json"))),
    )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def _read_gaps(path: Path) -> dict[str, np.ndarray]:
    table = pq.read_table(path)
    missing = [c for c in _GAP_BASE_SETS if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: missing gap columns {missing}")
    # Every float column is a set's NN similarity; keys and labels are not.
    return {
        f.name: table.column(f.name).to_numpy(zero_copy_only=False).astype(np.float64)
        for f in table.schema
        if f.name not in _GAP_ID_COLUMNS and pa.types.is_floating(f.type)
    }


def _read_eval(path: Path) -> tuple[str, dict]:
    # The file name is the contract's key; the "split" field inside is only checked against it.
    data = _read_json(path)
    if data.get("split", path.stem) != path.stem:
        raise ValueError(f"{path}: names split {data['split']!r}, file name says {path.stem!r}")
    return path.stem, data


# ----------------------------------------------------------------------------- ordering


def benchmark_order(files: RunFiles) -> list[str]:
    """Benchmarks in the config's order where it lists them, the rest sorted by name."""
    seen: set[str] = set(files.gaps)
    for ev in files.evals.values():
        seen.update(ev.get("benchmarks", {}))
    for sp in files.splits.values():
        seen.update(_split_benchmarks(sp))
    configured = [b for b in _configured_benchmarks(files.run) if b in seen]
    return list(dict.fromkeys(configured + sorted(seen)))


def _configured_benchmarks(run: Mapping) -> list[str]:
    """Benchmark names as the config or the world lists them (the world's order is the roles')."""
    out: list[str] = []
    for section in ("config", "world"):
        listed = (run.get(section) or {}).get("benchmarks", [])
        if isinstance(listed, list):
            out += [b if isinstance(b, str) else b.get("name") for b in listed]
    return [b for b in out if isinstance(b, str)]


# Splits sort by policy first: the full pool, then the gap-matched splits, then the rest.
_POLICY_RANK = {"full": 0, "gapmatch": 1, "near": 2, "far": 3}


def split_order(files: RunFiles) -> list[str]:
    """All known splits, each control right after the split it controls. Roots sort by policy,
    then single-benchmark splits in benchmark order before multi-benchmark ones, then name."""
    bench_rank = {b: i for i, b in enumerate(benchmark_order(files))}

    def key(name: str) -> tuple:
        split = files.splits.get(name, {})
        policy = "gapmatch" if _is_gap_matched(split) else str(split.get("policy", ""))
        benches = _split_benchmarks(split)
        first = bench_rank.get(benches[0], len(bench_rank)) if len(benches) == 1 else 0
        return (_POLICY_RANK.get(policy, len(_POLICY_RANK)), len(benches) > 1, first, name)

    names = sorted(set(files.splits) | set(files.evals), key=key)
    controls = _controls(files)
    controlled = {c for cs in controls.values() for c in cs}
    order: list[str] = []

    def visit(name: str) -> None:
        if name not in order:  # guards against control_of cycles
            order.append(name)
            for control in controls.get(name, []):
                visit(control)

    for name in names:
        if name not in controlled:
            visit(name)
    for name in names:  # splits in a control_of cycle have no root
        visit(name)
    return order


def _controls(files: RunFiles) -> dict[str, list[str]]:
    """split -> its size-matched controls (splits whose split.json has control_of == split)."""
    known = set(files.splits) | set(files.evals)
    out: dict[str, list[str]] = {}
    for name in sorted(files.splits):
        target = files.splits[name].get("control_of")
        if target and target in known and target != name:
            out.setdefault(target, []).append(name)
    return out


def _split_benchmarks(split: Mapping) -> list[str]:
    value = split.get("benchmarks") or []
    return [value] if isinstance(value, str) else list(value)


def _is_gap_matched(split: Mapping) -> bool:
    policy = str(split.get("policy", "")).lower().replace("-", "").replace("_", "")
    return policy.startswith("gap")


# ----------------------------------------------------------------------------- document model


@dataclass(frozen=True)
class Table:
    header: list[str]
    rows: list[list[str]]
    caption: str = ""
    # Indices of the numeric (right-aligned) columns; None: every column but the first.
    numeric: tuple[int, ...] | None = None

    def is_numeric(self, column: int) -> bool:
        return column > 0 if self.numeric is None else column in self.numeric


@dataclass(frozen=True)
class FigureBlock:
    filename: str
    png: bytes
    alt: str
    caption: str


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Note:
    """A stage that was not run (or a caveat): shown highlighted."""

    text: str


@dataclass(frozen=True)
class Pre:
    title: str
    text: str


Block = Table | FigureBlock | Paragraph | Note | Pre


@dataclass
class Section:
    title: str
    blocks: list[Block] = field(default_factory=list)


# ----------------------------------------------------------------------------- formatting


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def _pp(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:+.1f}"


def _sim(x: float) -> str:
    return "—" if not math.isfinite(x) else f"{x:.3f}"


def _top1(files: RunFiles, split: str, bench: str) -> float | None:
    entry = files.evals.get(split, {}).get("benchmarks", {}).get(bench)
    return None if entry is None else float(entry["top1"])


def _diff(a: Sequence[float | None], b: Sequence[float | None]) -> list[float | None]:
    return [None if x is None or y is None else x - y for x, y in zip(a, b, strict=True)]


def _mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


# ----------------------------------------------------------------------------- sections


def _intro(files: RunFiles) -> Section:
    parts = [
        f"{len(files.gaps)} benchmark(s) with similarity gaps",
        f"{len(files.splits)} split(s)",
        f"{len(files.evals)} evaluated split(s)",
    ]
    return Section(
        "simgap report",
        [
            Paragraph(
                "Does CLIP's generalization mainly stem from high train–test similarity? "
                "This run measures how similar each benchmark's test points are to a small "
                "reference training set and to a large pool, prunes the pool until its "
                "similarity to the benchmarks is no higher than the reference's "
                "(gap-matched splits), and compares models trained on each split, against "
                "random splits of the same size."
            ),
            Paragraph("This run directory holds: " + "; ".join(parts) + "."),
        ],
    )


def _gaps_section(files: RunFiles, colors: Mapping[str, str]) -> Section:
    section = Section("1. Similarity gaps")
    if not files.gaps:
        section.blocks.append(Note("Similarity gaps were not run: no gaps/*.parquet files."))
        return section
    benches = [b for b in benchmark_order(files) if b in files.gaps]
    panels = [figures.GapPanel(b, _plotted_sets(files, b)) for b in benches]
    section.blocks += [
        Paragraph(
            "For every test point, its NN similarity (highest cosine similarity of its "
            "embedding to any image of a set). Grey area: the reference set; blue outline: "
            "the full pool; other outlines: the gap-matched splits made for that benchmark. "
            "The pool sits to the right of the reference (its images are more similar to "
            "the test points); after pruning, a gap-matched split should trace the grey area "
            "or lie left of it."
        ),
        FigureBlock(
            "fig-gaps.png",
            figures.gap_histograms(panels, colors),
            "Histograms of NN similarity per benchmark",
            "NN similarity of test points to the reference set, the pool and the gap-matched "
            "splits, one panel per benchmark.",
        ),
        _gap_median_table(files, benches),
    ]
    check = _gap_check_table(files, benches)
    if check.rows:
        section.blocks.append(check)
    return section


def _plotted_sets(files: RunFiles, bench: str) -> dict[str, np.ndarray]:
    """Reference, pool, then the gap-matched splits made for this benchmark (controls would crowd
    the plot; their medians are in the table)."""
    columns = files.gaps[bench]
    matched = [
        name
        for name in columns
        if (split := files.splits.get(name))
        and _is_gap_matched(split)
        and bench in _split_benchmarks(split)
    ]
    # Splits made for more benchmarks first, so the benchmark's own split is drawn on top.
    matched.sort(key=lambda name: -len(_split_benchmarks(files.splits[name])))
    return {name: columns[name] for name in [*_GAP_BASE_SETS, *matched]}


def _gap_median_table(files: RunFiles, benches: Sequence[str]) -> Table:
    # Splits in the report's split order; columns of unknown splits last, in file order.
    present = [name for b in benches for name in files.gaps[b]]
    known = [s for s in split_order(files) if s in present]
    sets = list(dict.fromkeys([*_GAP_BASE_SETS, *known, *present]))
    rows = []
    for name in sets:
        cells = [_sim(_nanmedian(files.gaps[b].get(name))) for b in benches]
        rows.append([name, *cells])
    return Table(
        ["set", *benches],
        rows,
        caption="Median NN similarity of each benchmark's test points to each set.",
    )


def _nanmedian(values: np.ndarray | None) -> float:
    if values is None:
        return float("nan")
    finite = values[np.isfinite(values)]
    return float(np.median(finite)) if finite.size else float("nan")


def _gap_check_table(files: RunFiles, benches: Sequence[str]) -> Table:
    """Per gap-matched split and target benchmark: test points more similar to the split than to
    the reference (strict >, the pruning rule; the method promises none) and test points whose
    NN similarity equals the reference's (all of them when the reference set is part of the
    split: the gap is replicated exactly)."""
    rows = []
    for name in split_order(files):
        split = files.splits.get(name)
        if not split or not _is_gap_matched(split):
            continue
        for bench in benches:
            columns = files.gaps[bench]
            if name not in columns or bench not in _split_benchmarks(split):
                continue
            split_nn, reference = columns[name], columns["reference"]
            rows.append(
                [
                    name,
                    bench,
                    f"{split_nn.size:,}",
                    f"{int(np.count_nonzero(split_nn > reference)):,}",
                    f"{int(np.count_nonzero(split_nn == reference)):,}",
                ]
            )
    return Table(
        ["split", "benchmark", "test points", "above reference", "equal to reference"],
        rows,
        caption="Gap check, from the gap files: test points whose NN similarity to a "
        "gap-matched split is above (must be none) or equal to their NN similarity to the "
        "reference set.",
        numeric=(2, 3, 4),
    )


def _accuracy_section(files: RunFiles, colors: Mapping[str, str]) -> Section:
    section = Section("2. Zero-shot accuracy")
    if not files.evals:
        section.blocks.append(Note("Evaluation was not run: no eval/*.json files."))
        return section
    benches = [
        b for b in benchmark_order(files) if any(_evaluated(files, s, b) for s in files.evals)
    ]
    evaluated = [s for s in split_order(files) if s in files.evals]
    section.blocks += [
        Paragraph(
            "Zero-shot top-1 accuracy (%) of the model trained on each split. The mean is "
            "over the benchmarks a split was evaluated on."
        ),
        _accuracy_table(files, evaluated, benches),
    ]
    pairs = _control_pairs(files)
    if pairs:
        section.blocks.append(_control_table(files, pairs, benches))
    else:
        section.blocks.append(Note("No evaluated split has an evaluated size-matched control."))
    unevaluated = [s for s in split_order(files) if s not in files.evals]
    if unevaluated:
        section.blocks.append(Note("Not evaluated: " + ", ".join(unevaluated) + "."))
    section.blocks.append(
        FigureBlock(
            "fig-accuracy.png",
            figures.accuracy_bars(
                [*benches, "mean"], _accuracy_bars(files, evaluated, benches, colors)
            ),
            "Bar chart of top-1 accuracy per benchmark and split",
            "Top-1 (%) per benchmark and the mean over benchmarks; hatched bars are random "
            "controls, drawn in the colour of the split they control.",
        )
    )
    return section


def _evaluated(files: RunFiles, split: str, bench: str) -> bool:
    return _top1(files, split, bench) is not None


def _accuracy_table(files: RunFiles, splits: Sequence[str], benches: Sequence[str]) -> Table:
    rows = []
    for split in splits:
        values = [_top1(files, split, b) for b in benches]
        policy = str(files.splits.get(split, {}).get("policy", "—"))
        rows.append([split, policy, *map(_pct, values), _pct(_mean(values))])
    header = ["split", "policy", *benches, "mean"]
    return Table(header, rows, "Top-1 (%).", numeric=tuple(range(2, len(header))))


def _control_pairs(files: RunFiles) -> list[tuple[str, str]]:
    controls = _controls(files)
    return [
        (split, control)
        for split in split_order(files)
        for control in controls.get(split, [])
        if split in files.evals and control in files.evals
    ]


def _control_table(
    files: RunFiles, pairs: Sequence[tuple[str, str]], benches: Sequence[str]
) -> Table:
    rows = []
    for split, control in pairs:
        own = [_top1(files, split, b) for b in benches]
        ctl = [_top1(files, control, b) for b in benches]
        diff = _diff(own, ctl)
        rows += [
            [split, *map(_pct, own), _pct(_mean(own))],
            [f"control: {control}", *map(_pct, ctl), _pct(_mean(ctl))],
            [f"Δ {split} − control", *map(_pp, diff), _pp(_mean(diff))],
        ]
    return Table(
        ["split", *benches, "mean"],
        rows,
        caption="Each split against its size-matched random control: top-1 (%) and the "
        "difference in percentage points (computed from unrounded values).",
    )


def _accuracy_bars(
    files: RunFiles, splits: Sequence[str], benches: Sequence[str], colors: Mapping[str, str]
) -> list[figures.AccuracyBar]:
    controls = {c for cs in _controls(files).values() for c in cs}
    bars = []
    for split in splits:
        values = [_top1(files, split, b) for b in benches]
        hatched = split in controls
        bars.append(figures.AccuracyBar(split, [*values, _mean(values)], colors[split], hatched))
    return bars


def _splits_section(files: RunFiles, colors: Mapping[str, str]) -> Section:
    section = Section("3. Splits")
    if not files.splits:
        section.blocks.append(Note("Split selection was not run: no splits/*/split.json files."))
        return section
    section.blocks += [
        Paragraph(
            "Each split is the subset of the pool a model was trained on. Removed = pool size − "
            "kept size. A control is a random split of the same size as the split it names."
        ),
        _sizes_table(files),
    ]
    bars = _removed_bars(files, colors)
    if bars:
        section.blocks.append(
            FigureBlock(
                "fig-removed.png",
                figures.removed_counts(bars),
                "Bar chart of pool points removed by each gap-matched split",
                "Pool points removed by each gap-matched split (the benchmarks it was pruned "
                "for in brackets), with the share of the pool.",
            )
        )
    else:
        section.blocks.append(Note("No gap-matched split in this run."))
    return section


def _sizes_table(files: RunFiles) -> Table:
    rows = []
    for name in split_order(files):
        split = files.splits.get(name)
        if split is None:
            continue
        size, pool = int(split["size"]), int(split["pool_size"])
        rows.append(
            [
                name,
                str(split.get("policy", "—")),
                ", ".join(_split_benchmarks(split)) or "—",
                f"{size:,}",
                f"{pool - size:,}",
                f"{100 * size / pool:.1f}" if pool else "—",
                "yes" if split.get("reference_added") else "no",
                str(split.get("control_of") or "—"),
                _guarantee_text(split.get("guarantee")),
                json.dumps(split.get("params", {}), sort_keys=True),
            ]
        )
    return Table(
        [
            "split",
            "policy",
            "benchmarks",
            "kept",
            "removed",
            "% of pool",
            "reference added",
            "control of",
            "guarantee",
            "params",
        ],
        rows,
        caption="Split sizes.",
        numeric=(3, 4, 5),
    )


def _guarantee_text(guarantee: object) -> str:
    if not guarantee:
        return "—"
    if not isinstance(guarantee, Mapping):
        return str(guarantee)
    verdict = next((k for k in _VERDICT_KEYS if isinstance(guarantee.get(k), bool)), None)
    details = [
        f"{k}={json.dumps(v) if not isinstance(v, str) else v}"
        for k, v in sorted(guarantee.items())
        if k != verdict
    ]
    head = [] if verdict is None else ["pass" if guarantee[verdict] else "FAIL"]
    return "; ".join(head + details)


def _removed_bars(files: RunFiles, colors: Mapping[str, str]) -> list[figures.RemovedBar]:
    bars = []
    for name in split_order(files):
        split = files.splits.get(name)
        if not split or not _is_gap_matched(split):
            continue
        benches = _split_benchmarks(split)
        target = benches[0] if len(benches) == 1 else f"{len(benches)} benchmarks"
        label = name if target == name else f"{name} ({target})"
        size, pool = int(split["size"]), int(split["pool_size"])
        bars.append(figures.RemovedBar(label, pool - size, pool, colors[name]))
    return sorted(bars, key=lambda b: -b.removed)


def _provenance_section(files: RunFiles) -> Section:
    run = files.run
    section = Section("4. Run provenance")
    for key, title in (("config", "Configuration"), ("world", "World")):
        if key in run:
            section.blocks.append(Pre(title, json.dumps(run[key], indent=2, ensure_ascii=False)))
    versions = run.get("versions") or {}
    if versions:
        rows = [[k, v if isinstance(v, str) else json.dumps(v)] for k, v in versions.items()]
        section.blocks.append(Table(["package", "version"], rows, "Versions.", numeric=()))
    timings = run.get("timings") or {}
    if timings:
        section.blocks.append(_timings_table(timings))
    else:
        section.blocks.append(Note("No stage timings recorded in run.json."))
    return section


def _timings_table(timings: Mapping[str, float]) -> Table:
    total = sum(float(v) for v in timings.values())
    rows = [
        [stage, f"{float(s):.1f}", f"{100 * float(s) / total:.1f}" if total else "—"]
        for stage, s in timings.items()
    ]
    rows.append(["total", f"{total:.1f}", "100.0" if total else "—"])
    return Table(["stage", "seconds", "% of total"], rows, "Stage timings.")


def _colors(files: RunFiles) -> dict[str, str]:
    """One colour per split for every figure; a control shares its split's colour (it is told
    apart by hatching), so controls do not use up the palette."""
    controls = {c: split for split, cs in _controls(files).items() for c in cs}
    colors = figures.split_colors([s for s in split_order(files) if s not in controls])
    colors.update({c: colors[split] for c, split in controls.items()})
    return colors


def build_sections(files: RunFiles) -> list[Section]:
    """The report's content, independent of output format."""
    colors = _colors(files)
    return [
        _intro(files),
        _gaps_section(files, colors),
        _accuracy_section(files, colors),
        _splits_section(files, colors),
        _provenance_section(files),
    ]


# ----------------------------------------------------------------------------- HTML

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1100px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .3em; }
h2 { margin-top: 2em; border-bottom: 1px solid #eee; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .8em 0 1.6em; font-size: 14px; }
caption { caption-side: top; text-align: left; color: #555; padding-bottom: .3em; }
th, td { border: 1px solid #ddd; padding: 4px 9px; }
th { background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.delta td { font-weight: 600; background: #fafafa; }
figure { margin: 1em 0 2em; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 14px; }
.note { background: #fff6e0; border-left: 4px solid #f0b400; padding: .5em .8em; }
pre { background: #f7f7f7; padding: .8em; overflow-x: auto; font-size: 13px; }
"""


def render_html(sections: Sequence[Section]) -> str:
    body = []
    for i, section in enumerate(sections):
        tag = "h1" if i == 0 else "h2"
        body.append(f"<{tag}>{html.escape(section.title)}</{tag}>")
        body.extend(_html_block(b) for b in section.blocks)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(sections[0].title)}</title>\n<style>{_CSS}</style>\n</head>\n"
        "<body>\n" + "\n".join(body) + "\n</body>\n</html>\n"
    )


def _html_block(block: Block) -> str:
    if isinstance(block, Paragraph):
        return f"<p>{html.escape(block.text)}</p>"
    if isinstance(block, Note):
        return f'<p class="note">{html.escape(block.text)}</p>'
    if isinstance(block, Pre):
        return f"<h3>{html.escape(block.title)}</h3>\n<pre>{html.escape(block.text)}</pre>"
    if isinstance(block, FigureBlock):
        data = base64.b64encode(block.png).decode("ascii")
        return (
            f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(block.alt)}">'
            f"<figcaption>{html.escape(block.caption)}</figcaption></figure>"
        )
    return _html_table(block)


def _html_table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.header)
    rows = []
    for row in table.rows:
        cells = "".join(
            f'<td class="num">{html.escape(c)}</td>'
            if table.is_numeric(j)
            else f"<td>{html.escape(c)}</td>"
            for j, c in enumerate(row)
        )
        cls = ' class="delta"' if row[0].startswith("Δ") else ""
        rows.append(f"<tr{cls}>{cells}</tr>")
    caption = f"<caption>{html.escape(table.caption)}</caption>" if table.caption else ""
    return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


# ----------------------------------------------------------------------------- Markdown


def render_markdown(sections: Sequence[Section]) -> str:
    out = []
    for i, section in enumerate(sections):
        out.append(("# " if i == 0 else "## ") + section.title)
        out.extend(_md_block(b) for b in section.blocks)
    return "\n\n".join(out) + "\n"


def _md_block(block: Block) -> str:
    if isinstance(block, Paragraph):
        return block.text
    if isinstance(block, Note):
        return f"> **Note:** {block.text}"
    if isinstance(block, Pre):
        return f"### {block.title}\n\n```json\n{block.text}\n```"
    if isinstance(block, FigureBlock):
        return f"![{block.alt}]({block.filename})\n\n*{block.caption}*"
    return _md_table(block)


def _md_table(table: Table) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    align = ["---:" if table.is_numeric(j) else "---" for j in range(len(table.header))]
    lines = [line(table.header), "|" + "|".join(align) + "|", *(line(r) for r in table.rows)]
    caption = f"*{table.caption}*\n\n" if table.caption else ""
    return caption + "\n".join(lines)


# ----------------------------------------------------------------------------- writing


def build_report(run_dir: Path) -> dict[str, Path]:
    """Write run/report/report.html (self-contained) and report.md (+ PNGs); return their paths."""
    run_dir = Path(run_dir)
    sections = build_sections(load_run(run_dir))
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    written = set()
    for block in (b for s in sections for b in s.blocks):
        if isinstance(block, FigureBlock):
            write_bytes(out / block.filename, block.png)
            written.add(block.filename)
    # A figure left from an earlier, fuller build of this run would no longer match the report.
    for stale in set(_FIGURE_FILES) - written:
        (out / stale).unlink(missing_ok=True)
    paths = {"html": out / "report.html", "markdown": out / "report.md"}
    write_bytes(paths["markdown"], render_markdown(sections).encode("utf-8"))
    write_bytes(paths["html"], render_html(sections).encode("utf-8"))
    return paths


# ----------------------------------------------------------------------------- terminal


def summary_table(run_dir: Path) -> str:
    """Top-1 (%) per evaluated split × benchmark, each control followed by its split's lead over
    it, as aligned text; splits without evaluation are listed on a last line."""
    files = load_run(Path(run_dir))
    splits = split_order(files)
    if not splits:
        return "no splits in this run"
    if not files.evals:
        return "evaluation was not run (no eval/*.json); splits: " + ", ".join(splits)
    benches = [b for b in benchmark_order(files) if any(_evaluated(files, s, b) for s in splits)]
    rows: list[list[str]] = []
    for split in (s for s in splits if s in files.evals):
        own = [_top1(files, split, b) for b in benches]
        parent = files.splits.get(split, {}).get("control_of")
        if parent not in files.evals or parent == split:
            rows.append([split, *map(_pct, own), _pct(_mean(own))])
            continue
        # A control is indented under its split and followed by the split's lead over it.
        rows.append([f"  {split} (control)", *map(_pct, own), _pct(_mean(own))])
        ref = [_top1(files, parent, b) for b in benches]
        diff = _diff(ref, own)
        rows.append([f"  Δ {parent} − control", *map(_pp, diff), _pp(_mean(diff))])
    text = _text_table(["top-1 (%)", *benches, "mean"], rows)
    unevaluated = [s for s in splits if s not in files.evals]
    return text + ("\nnot evaluated: " + ", ".join(unevaluated) if unevaluated else "")


def _text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[j]) for r in [header, *rows]) for j in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in rows)])
