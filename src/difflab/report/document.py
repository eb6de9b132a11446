"""The report model: a report is a title and a list of blocks (text, tables, figures, metric rows, code,
sections); :mod:`difflab.report.render` writes one report as Markdown and as self-contained HTML.

Recipes build a :class:`Report` from a run folder (see :mod:`difflab.report.rundata`); numbers taken from
``metrics.json`` are :class:`Value` objects that remember their dotted key, so every printed number can
be traced back (the HTML carries it as ``data-source``). Inline text may use two bits of Markdown,
```code``` and ``**bold**``; nothing else is interpreted. A paragraph or a bullet may also be a sequence of
strings and :class:`Value` objects (:func:`prose`), so numbers in running text keep their source too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from difflab.report.markdown import fmt


@dataclass(frozen=True)
class Value:
    """A number (or ``None``: not measured) printed with ``digits`` decimals, or as a percentage.

    ``source`` says where it came from: a dotted key into ``metrics.json`` (``uncond.nll_course``),
    ``reference:<recipe>.<metric>`` for a published reference figure, or empty.
    """

    value: Any
    source: str = ""
    digits: int = 3
    percent: bool = False

    def text(self) -> str:
        if self.percent and isinstance(self.value, (int, float)) and not isinstance(self.value, bool):
            return "nan" if self.value != self.value else f"{self.value:.{self.digits}%}"
        return fmt(self.value, self.digits)


Cell = Any  # a Value, or any plain value (formatted with fmt)


def lookup(data: Any, key: str) -> Any:
    """``data["a"]["b"]`` for ``key="a.b"`` (a digit indexes a list); ``None`` when any part is missing."""
    node = data
    for part in key.split("."):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return None
    return node


def metric(metrics: dict[str, Any], key: str, digits: int = 3, percent: bool = False) -> Value:
    """The value at dotted ``key`` of ``metrics`` (``metrics.json``), remembering the key."""
    return Value(lookup(metrics, key), key, digits, percent)


Inline = str | Value
Text = str | tuple[Inline, ...]  # plain text, or strings and values in order


def parts_of(text: Text) -> tuple[Inline, ...]:
    """The pieces of a text: a string alone, or the strings and :class:`Value` objects in order."""
    return (text,) if isinstance(text, str) else tuple(text)


def plain_text(text: Text) -> str:
    """A text with each :class:`Value` printed (as the Markdown shows it)."""
    return "".join(part.text() if isinstance(part, Value) else part for part in parts_of(text))


@dataclass(frozen=True)
class Paragraph:
    """Text; a tuple of strings and values prints each value with its own digits (and the HTML marks its
    source). Each string piece must close its own ```code``` and ``**bold**`` spans."""

    text: Text


def prose(*parts: Inline) -> Paragraph:
    """``prose("DDIM took ", metric(m, "ddim.seconds", 1), " s.")``: a paragraph whose numbers are values."""
    return Paragraph(tuple(parts))


@dataclass(frozen=True)
class BulletList:
    items: tuple[Text, ...]


@dataclass(frozen=True)
class Table:
    """headers (C,), rows (R, C) of cells; plain numbers get ``digits`` decimals."""

    headers: tuple[str, ...]
    rows: tuple[tuple[Cell, ...], ...]
    digits: int = 3
    caption: str = ""


@dataclass(frozen=True)
class MetricRow:
    """One metric: this run's value, what real data scores (the floor) and the reference's own figure."""

    name: str
    value: Value
    floor: Value | None = None
    reference: str = ""
    description: str = ""


@dataclass(frozen=True)
class MetricTable:
    rows: tuple[MetricRow, ...]
    value_header: str = "this run"
    floor_header: str = "real data (floor)"
    reference_header: str = "reference's figure"
    caption: str = ""

    def as_table(self) -> Table:
        headers = ["metric", self.value_header, self.floor_header]
        with_reference = any(r.reference for r in self.rows)
        if with_reference:
            headers.append(self.reference_header)
        headers.append("what it measures")
        rows = []
        for r in self.rows:
            row: list[Cell] = [r.name, r.value, r.floor if r.floor is not None else None]
            if with_reference:
                row.append(r.reference or None)
            row.append(r.description)
            rows.append(tuple(row))
        return Table(tuple(headers), tuple(rows), caption=self.caption)


@dataclass(frozen=True)
class Figure:
    """A PNG of the run folder (``path`` relative to it, e.g. ``figures/samples.png``)."""

    path: str
    caption: str


@dataclass(frozen=True)
class Code:
    """Preformatted text; with a ``summary`` it is collapsible (HTML ``<details>``)."""

    text: str
    language: str = ""
    summary: str = ""


@dataclass(frozen=True)
class Section:
    title: str
    blocks: tuple[Block, ...]
    level: int = 2

    @property
    def anchor(self) -> str:
        return "".join(c if c.isalnum() else "-" for c in self.title.lower()).strip("-")


Block = Paragraph | BulletList | Table | MetricTable | Figure | Code | Section


@dataclass
class Report:
    """What a recipe fills: a title and blocks, in order."""

    title: str
    blocks: list[Block] = field(default_factory=list)

    def add(self, *blocks: Block) -> Report:
        self.blocks.extend(blocks)
        return self

    def section(self, title: str, *blocks: Block | None) -> Report:
        """Append a section of the non-``None`` ``blocks`` (an empty one is left out)."""
        kept = tuple(b for b in blocks if b is not None)
        if kept:
            self.blocks.append(Section(title, kept))
        return self

    def sections(self) -> list[Section]:
        return [b for b in self.blocks if isinstance(b, Section)]

    def values(self) -> list[Value]:
        """Every :class:`Value` in the report's tables and text (for tests and tracing)."""
        found: list[Value] = []

        def visit(blocks: Sequence[Block]) -> None:
            for block in blocks:
                if isinstance(block, Section):
                    visit(block.blocks)
                elif isinstance(block, (Table, MetricTable)):
                    table = block.as_table() if isinstance(block, MetricTable) else block
                    found.extend(c for row in table.rows for c in row if isinstance(c, Value))

        visit(self.blocks)
        return found
