"""Render a :class:`~difflab.report.document.Report` as Markdown (``report.md``) and as one self-contained
HTML file (``report.html``: CSS inline, images embedded as base64 ``data:`` URIs, no script, nothing
fetched from elsewhere, so it opens offline and can be mailed as one file)."""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from pathlib import Path

from difflab.report.document import (
    Block,
    BulletList,
    Code,
    Figure,
    MetricTable,
    Paragraph,
    Report,
    Section,
    Table,
    Text,
    Value,
    parts_of,
    plain_text,
)
from difflab.report.markdown import fmt
from difflab.training.checkpoint import atomic_write_bytes

IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}

# ---------------------------------------------------------------- Markdown


def _cell_text(cell: object, digits: int) -> str:
    return cell.text() if isinstance(cell, Value) else fmt(cell, digits)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_table(table: Table) -> list[str]:
    lines = [
        "| " + " | ".join(_md_cell(h) for h in table.headers) + " |",
        "|" + "|".join("---" for _ in table.headers) + "|",
    ]
    for row in table.rows:
        lines.append("| " + " | ".join(_md_cell(_cell_text(c, table.digits)) for c in row) + " |")
    if table.caption:
        lines += ["", f"*{table.caption}*"]
    return lines


def _md_blocks(blocks: Sequence[Block], out: list[str]) -> None:
    for block in blocks:
        if isinstance(block, Section):
            out += ["#" * block.level + " " + block.title, ""]
            _md_blocks(block.blocks, out)
            continue
        if isinstance(block, Paragraph):
            out.append(plain_text(block.text))
        elif isinstance(block, BulletList):
            out += [f"- {plain_text(item)}" for item in block.items]
        elif isinstance(block, MetricTable):
            out += _md_table(block.as_table())
        elif isinstance(block, Table):
            out += _md_table(block)
        elif isinstance(block, Figure):
            out += [f"![{block.caption}]({block.path})", "", f"*{block.caption}*"]
        elif isinstance(block, Code):
            fence = "```" + block.language
            body = [fence, block.text.rstrip("\n"), "```"]
            if block.summary:
                body = [f"<details><summary>{html.escape(block.summary)}</summary>", "", *body, "", "</details>"]
            out += body
        else:  # pragma: no cover - a new block type without a renderer
            raise TypeError(f"no Markdown renderer for {type(block).__name__}")
        out.append("")


def to_markdown(report: Report) -> str:
    """The report as GitHub-flavoured Markdown (figures linked relative to the run folder)."""
    out = [f"# {report.title}", ""]
    _md_blocks(report.blocks, out)
    return "\n".join(out).rstrip("\n") + "\n"


# ---------------------------------------------------------------- HTML

CSS = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#222;max-width:1100px;
margin:0 auto;padding:1.5em 2em 4em;background:#fff}
h1{font-size:1.7em;border-bottom:2px solid #ddd;padding-bottom:.3em}
h2{font-size:1.35em;margin-top:1.8em;border-bottom:1px solid #eee;padding-bottom:.2em}
h3{font-size:1.1em}
code{background:#f3f3f3;padding:.1em .3em;border-radius:3px;font-size:.92em}
pre{background:#f7f7f7;border:1px solid #e3e3e3;padding:.8em;overflow:auto;font-size:.85em}
table{border-collapse:collapse;margin:.6em 0 1em;font-size:.92em}
th,td{border:1px solid #d9d9d9;padding:.3em .6em;vertical-align:top}
th{background:#f3f5f8;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr:nth-child(even) td{background:#fbfbfb}
figure{margin:1em 0 1.5em}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#555;font-style:italic;font-size:.92em}
nav{background:#f7f9fb;border:1px solid #e5e9ef;padding:.5em 1em;font-size:.92em;display:flex;flex-wrap:wrap;
gap:.2em 1.2em}
nav a{white-space:nowrap}
details summary{cursor:pointer;font-weight:600}
.missing{color:#a33}
"""

_INLINE = re.compile(r"`([^`]+)`|\*\*([^*]+)\*\*")


def inline_html(text: str) -> str:
    """Escape ``text`` and turn its ```code``` and ``**bold**`` spans into HTML."""
    out, last = [], 0
    for match in _INLINE.finditer(text):
        out.append(html.escape(text[last : match.start()]))
        if match.group(1) is not None:
            out.append(f"<code>{html.escape(match.group(1))}</code>")
        else:
            out.append(f"<strong>{html.escape(match.group(2))}</strong>")
        last = match.end()
    out.append(html.escape(text[last:]))
    return "".join(out)


def _value_span(value: Value) -> str:
    source = f' data-source="{html.escape(value.source)}"' if value.source else ""
    return f'<span class="value"{source}>{html.escape(value.text())}</span>'


def text_html(text: Text) -> str:
    """A text as HTML: its strings through :func:`inline_html`, each value a ``<span data-source=...>`` (a
    ```code``` or ``**bold**`` span may enclose values)."""
    values: list[Value] = []
    pieces = []
    for part in parts_of(text):
        if isinstance(part, Value):
            pieces.append(f"\x00{len(values)}\x00")  # a marker that escaping leaves alone
            values.append(part)
        else:
            pieces.append(part.replace("\x00", ""))
    return re.sub(
        "\x00(\\d+)\x00", lambda match: _value_span(values[int(match.group(1))]), inline_html("".join(pieces))
    )


def _html_cell(cell: object, digits: int) -> str:
    if isinstance(cell, Value):
        source = f' data-source="{html.escape(cell.source)}"' if cell.source else ""
        return f'<td class="num"{source}>{html.escape(cell.text())}</td>'
    numeric = isinstance(cell, (int, float)) and not isinstance(cell, bool)
    cls = ' class="num"' if numeric else ""
    return f"<td{cls}>{inline_html(fmt(cell, digits))}</td>"


def _html_table(table: Table) -> list[str]:
    out = ["<table>", "<thead><tr>" + "".join(f"<th>{inline_html(h)}</th>" for h in table.headers) + "</tr></thead>"]
    out.append("<tbody>")
    for row in table.rows:
        out.append("<tr>" + "".join(_html_cell(c, table.digits) for c in row) + "</tr>")
    out.append("</tbody></table>")
    if table.caption:
        out.append(f"<p><em>{inline_html(table.caption)}</em></p>")
    return out


def data_uri(path: Path) -> str | None:
    """The file as a base64 ``data:`` URI, or ``None`` when it is missing or not an image type."""
    mime = IMAGE_TYPES.get(path.suffix.lower())
    if mime is None or not path.is_file():
        return None
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def _html_blocks(blocks: Sequence[Block], run_dir: Path, out: list[str]) -> None:
    for block in blocks:
        if isinstance(block, Section):
            level = min(block.level, 6)
            out.append(f'<section id="{block.anchor}"><h{level}>{html.escape(block.title)}</h{level}>')
            _html_blocks(block.blocks, run_dir, out)
            out.append("</section>")
        elif isinstance(block, Paragraph):
            out.append(f"<p>{text_html(block.text)}</p>")
        elif isinstance(block, BulletList):
            out.append("<ul>" + "".join(f"<li>{text_html(item)}</li>" for item in block.items) + "</ul>")
        elif isinstance(block, MetricTable):
            out += _html_table(block.as_table())
        elif isinstance(block, Table):
            out += _html_table(block)
        elif isinstance(block, Figure):
            uri = data_uri(run_dir / block.path)
            caption = inline_html(block.caption)
            if uri is None:
                out.append(
                    f'<p class="missing">Figure missing from the run folder: <code>{html.escape(block.path)}</code></p>'
                )
            else:
                alt, where = html.escape(block.caption), html.escape(block.path)
                image = f'<img src="{uri}" alt="{alt}" data-path="{where}">'
                out.append(f"<figure>{image}<figcaption>{caption}</figcaption></figure>")
        elif isinstance(block, Code):
            pre = f"<pre><code>{html.escape(block.text)}</code></pre>"
            if block.summary:
                pre = f"<details><summary>{html.escape(block.summary)}</summary>{pre}</details>"
            out.append(pre)
        else:  # pragma: no cover
            raise TypeError(f"no HTML renderer for {type(block).__name__}")


def to_html(report: Report, run_dir: str | Path) -> str:
    """The report as one HTML document; figures are read from ``run_dir`` and embedded."""
    run_dir = Path(run_dir)
    title = html.escape(report.title)
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{title}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>{title}</h1>",
    ]
    sections = report.sections()
    if len(sections) > 1:
        links = "".join(f'<a href="#{s.anchor}">{html.escape(s.title)}</a>' for s in sections)
        out.append(f"<nav>{links}</nav>")
    _html_blocks(report.blocks, run_dir, out)
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_report(report: Report, run_dir: str | Path, name: str = "report") -> tuple[Path, Path]:
    """Write ``{name}.md`` and ``{name}.html`` (``report.md``, ``report.html``) into ``run_dir``; returns both
    paths."""
    run_dir = Path(run_dir)
    md_path, html_path = run_dir / f"{name}.md", run_dir / f"{name}.html"
    atomic_write_bytes(md_path, to_markdown(report).encode())
    atomic_write_bytes(html_path, to_html(report, run_dir).encode())
    return md_path, html_path


# ---------------------------------------------------------------- Markdown written by hand


_HEADING = re.compile(r"(#{1,6}) (.+)")
_IMAGE_LINE = re.compile(r"!\[(?P<caption>[^\]]*)\]\((?P<path>[^)\s]+)\)")
_CELL_SPLIT = re.compile(r"(?<!\\)\|")


def _table_cells(line: str) -> tuple[str, ...]:
    inner = line.strip().removeprefix("|").removesuffix("|")
    return tuple(cell.strip().replace("\\|", "|") for cell in _CELL_SPLIT.split(inner))


def report_from_markdown(text: str) -> Report:
    """A report written as Markdown text by a recipe (not built as a :class:`Report`) read back as one: ``#``
    title, ``##``/``###`` sections, paragraphs, pipe tables, ``- `` lists, fenced code and ``![caption](path)``
    figures (the ``*caption*`` line :func:`~difflab.report.markdown.figure` writes under each is the figure's own).
    For the recipes that write their report's body as Markdown (:func:`~difflab.report.sections.markdown_report`)."""
    lines = text.splitlines()
    title, top, sections = "", [], []  # blocks before the first section, then (title, level, blocks)
    last_caption = None
    i = 0
    while i < len(lines):
        line = lines[i]
        target = sections[-1][2] if sections else top
        if not line.strip():
            i += 1
            continue
        if line.startswith("```"):
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), len(lines))
            target.append(Code("\n".join(lines[i + 1 : end]), line[3:].strip()))
            i = end + 1
            continue
        heading = _HEADING.fullmatch(line)
        if heading:
            level, name = len(heading.group(1)), heading.group(2).strip()
            if level == 1 and not title and not sections:
                title = name
            else:
                sections.append((name, max(level, 2), []))
            i += 1
            continue
        chunk = []
        while (
            i < len(lines) and lines[i].strip() and not lines[i].startswith("```") and not _HEADING.fullmatch(lines[i])
        ):
            chunk.append(lines[i])
            i += 1
        image = _IMAGE_LINE.fullmatch(chunk[0].strip()) if len(chunk) == 1 else None
        if image:
            last_caption = image.group("caption")
            target.append(Figure(image.group("path"), last_caption))
            continue
        if len(chunk) >= 2 and all(row.lstrip().startswith("|") for row in chunk):
            rows = [_table_cells(row) for row in chunk]
            target.append(Table(rows[0], tuple(rows[2:]) if set("".join(rows[1])) <= set("-: ") else tuple(rows[1:])))
        elif all(row.startswith("- ") for row in chunk):
            target.append(BulletList(tuple(row[2:] for row in chunk)))
        elif not (len(chunk) == 1 and last_caption is not None and chunk[0].strip() == f"*{last_caption}*"):
            target.append(Paragraph(" ".join(row.strip() for row in chunk)))
        last_caption = None
    blocks = top + [Section(name, tuple(body), level) for name, level, body in sections]
    return Report(title or "Report", blocks)
