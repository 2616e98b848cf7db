"""Render the report's sections as one self-contained HTML page (figures inlined as base64 PNG,
no scripts, no external links: it works offline) and as Markdown beside its PNG files."""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence

from simgap.report.blocks import Block, FigureBlock, Note, Paragraph, Pre, Section, Table

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
ul.contents { columns: 2; font-size: 14px; }
"""


def render_html(sections: Sequence[Section]) -> str:
    body = []
    for i, section in enumerate(sections):
        if i == 0:
            body.append(f"<h1>{html.escape(section.title)}</h1>")
        else:
            body.append(f'<h2 id="{anchor(section.title)}">{html.escape(section.title)}</h2>')
        body.extend(_html_block(b) for b in section.blocks)
        if i == 0 and len(sections) > 1:
            body.append(_contents(sections[1:]))
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(sections[0].title)}</title>\n<style>{_CSS}</style>\n</head>\n"
        "<body>\n" + "\n".join(body) + "\n</body>\n</html>\n"
    )


def anchor(title: str) -> str:
    """The id of a section's heading: its title in lower case, runs of other characters as -."""
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def _contents(sections: Sequence[Section]) -> str:
    items = "".join(
        f'<li><a href="#{anchor(s.title)}">{html.escape(s.title)}</a></li>' for s in sections
    )
    return f'<nav><ul class="contents">{items}</ul></nav>'


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
        return f"### {block.title}\n\n```{block.language}\n{block.text}\n```"
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
