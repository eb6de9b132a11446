"""Checks shared by the report tests: the HTML is self-contained, and every number a report prints is in the
``metrics.json`` of one of its runs at the printed precision."""

from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from difflab.report.document import lookup
from difflab.report.markdown import fmt

NUMBER = re.compile(r"(?<![\w.])(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?%?")


class Tags(HTMLParser):
    """Every start tag with its attributes, and the text of each element carrying ``data-source``."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.sourced: list[tuple[str, str]] = []
        self._open: list[tuple[str, str, list[str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {k: v or "" for k, v in attrs}
        self.tags.append((tag, attributes))
        if "data-source" in attributes and tag in ("td", "span"):
            self._open.append((tag, attributes["data-source"], []))

    def handle_endtag(self, tag: str) -> None:
        if self._open and self._open[-1][0] == tag:
            _, source, text = self._open.pop()
            self.sourced.append((source, "".join(text).strip()))

    def handle_data(self, data: str) -> None:
        for _, _, text in self._open:
            text.append(data)


def parse_html(text: str) -> Tags:
    parser = Tags()
    parser.feed(text)
    return parser


def assert_self_contained(run_dir: Path, name: str = "report", min_images: int = 0) -> Tags:
    """``name``.html loads nothing from elsewhere and embeds exactly the figures ``name``.md links."""
    page = (run_dir / f"{name}.html").read_text()
    parsed = parse_html(page)
    assert not [a for tag, a in parsed.tags if tag in ("link", "script", "iframe", "object", "embed")]
    assert "url(" not in page and "@import" not in page
    for tag, attributes in parsed.tags:
        assert not attributes.get("src", "data:").startswith(("http:", "https:", "//")), (tag, attributes)
        assert attributes.get("href", "#").startswith("#"), (tag, attributes)
    images = [a for tag, a in parsed.tags if tag == "img"]
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (run_dir / f"{name}.md").read_text())
    assert sorted(a["data-path"] for a in images) == sorted(linked)
    assert len(images) >= min_images
    for attributes in images:
        header, payload = attributes["src"].split(",", 1)
        assert header == "data:image/png;base64"
        assert base64.b64decode(payload) == (run_dir / attributes["data-path"]).read_bytes()
    return parsed


def printed_forms(*documents: Any) -> set[str]:
    """Every number of the documents (metrics.json contents) as a report could print it: as is, with 0 to 4
    decimals, as a percentage, without its sign; and the numbers inside their strings (row names)."""
    forms: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)
        elif isinstance(node, str):
            forms.update(NUMBER.findall(node))
        elif isinstance(node, (int, float)) and not isinstance(node, bool):
            for number in (node, abs(node)):
                forms.add(fmt(number))
                for digits in range(0, 5):
                    forms.add(fmt(float(number), digits))
                    forms.add(f"{number:.{digits}%}")

    for document in documents:
        visit(document)
    return forms


def numbers_in_markdown(md: str) -> list[str]:
    """Every number a reader sees in a Markdown report, except inside ```code``` spans (formulas, paths,
    commands) and the numbers of numbered headings; a minus sign is not part of the number."""
    found = []
    for line in md.splitlines():
        if line.startswith("|---"):
            continue
        line = re.sub(r"^(#+) \d+ ", r"\1 ", line)
        line = re.sub(r"`[^`]*`", "", line)
        found += NUMBER.findall(line)
    return found


def assert_sources(run_dir: Path, name: str, metrics: dict[str, dict[str, Any]], min_values: int) -> None:
    """Every ``data-source`` of ``name``.html (``key`` of the main run, role "", or ``role:key``) prints its
    metrics.json value; the summaries of ``metrics.jsonl`` are left out."""
    sourced = [
        (source, text)
        for source, text in parse_html((run_dir / f"{name}.html").read_text()).sourced
        if not source.startswith("metrics.jsonl:")
    ]
    assert len(sourced) >= min_values, len(sourced)
    for source, text in sourced:
        if source.endswith(".json"):  # a whole file a command wrote beside the run (inversion.json, ...)
            assert text == "-" or text in printed_forms(json.loads((run_dir / source).read_text())), (source, text)
            continue
        role, _, key = source.rpartition(":")
        value = lookup(metrics[role], key)
        if value is None:  # not measured (no FID on the digits): printed as a dash
            assert text == "-", (source, text)
            continue
        if isinstance(value, bool):
            assert text == fmt(value), (source, text)
            continue
        shown = {fmt(value, d) for d in range(0, 5)} | {f"{value:.{d}%}" for d in range(0, 5)}
        assert text in shown, (source, text, value)


def assert_traceable(run_dir: Path, name: str, metrics: dict[str, dict[str, Any]], min_numbers: int) -> None:
    """Every number of ``name``.md is in one of ``metrics`` (role -> metrics.json; the main run is role "")
    at its printed precision, and every ``data-source`` of ``name``.html prints its metrics.json value."""
    md = (run_dir / f"{name}.md").read_text()
    forms = printed_forms(*metrics.values())
    numbers = numbers_in_markdown(md)
    untraced = sorted({n for n in numbers if n not in forms})
    assert not untraced, f"numbers of {name}.md not in metrics.json: {untraced}"
    assert len(numbers) >= min_numbers, len(numbers)
    assert_sources(run_dir, name, metrics, min_numbers // 2)


def assert_rebuilds(run_dir: Path) -> None:
    """``difflab report RUN`` writes, from the folder alone, the very report.md and report.html the recipe wrote."""
    from difflab.cli import main

    written = {name: (run_dir / name).read_text() for name in ("report.md", "report.html")}
    for name in written:
        (run_dir / name).unlink()
    assert main(["report", str(run_dir)]) == 0
    for name, text in written.items():
        assert (run_dir / name).read_text() == text, name
