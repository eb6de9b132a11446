"""Reports: the report model and its two renderers, trajectories, and a tiny STATES run whose report must
be self-contained, traceable to metrics.json and rebuildable from the run folder alone."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from difflab.cli import main
from difflab.data.states import load_states
from difflab.diffusion.schedule import NoiseSchedule
from difflab.errors import DataError
from difflab.metrics.points import KDE
from difflab.report.document import Code, Figure, MetricRow, MetricTable, Paragraph, Report, Table, Value, lookup
from difflab.report.markdown import fmt
from difflab.report.references import reference_text, reference_value
from difflab.report.render import inline_html, to_html, to_markdown
from difflab.sampling.ddim import ddim_sample
from difflab.sampling.ddpm import ddpm_sample
from difflab.sampling.trajectory import Trajectory, TrajectoryRecorder, choose_frames
from difflab.viz.trajectory import render_frame

TINY_STATES = [
    "progress=false",
    "denoiser_train.steps=100",
    "denoiser_train.eval_every=50",
    "denoiser_train.log_every=20",
    "denoiser_train.batch_size=256",
    "denoiser_train.warmup_steps=10",
    "classifier_train.steps=40",
    "classifier_train.eval_every=20",
    "classifier_train.log_every=10",
    "classifier_train.batch_size=256",
    "classifier_train.warmup_steps=10",
    "sampling.n_uncond=300",
    "sampling.n_cond=60",
    "sampling.cond_steps=10",
    "figures.prediction_map_steps=[1]",
    "figures.trajectory_points=200",
]


class _Tags(HTMLParser):
    """Every start tag with its attributes, and the text of each <td>."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.cells: list[tuple[dict[str, str], str]] = []
        self._cell: dict[str, str] | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {k: v or "" for k, v in attrs}
        self.tags.append((tag, attributes))
        if tag == "td":
            self._cell, self._text = attributes, []

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None:
            self.cells.append((self._cell, "".join(self._text).strip()))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._text.append(data)


def parse_html(text: str) -> _Tags:
    parser = _Tags()
    parser.feed(text)
    return parser


# ---------------------------------------------------------------- the model and renderers


def test_one_report_renders_to_markdown_and_html(tmp_path: Path) -> None:
    (tmp_path / "figures").mkdir()
    png = render_frame(
        Trajectory(torch.tensor([1, 0]), torch.randn(2, 30, 2), torch.randn(2, 30, 2)),
        0,
    )
    (tmp_path / "figures" / "a.png").write_bytes(png)
    metrics = {"x": {"nll": 2.34567, "share": 0.98765}, "rows": [{"value": 1.5}]}
    report = Report("A <title>")
    report.add(Paragraph("Uses `eps_hat = eps - s grad` and **bold** <b>raw</b>."))
    report.section(
        "Scores",
        MetricTable(
            (
                MetricRow("nll", Value(2.34567, "x.nll"), Value(2.1, "real.nll"), "2.5 (pass line)", "a | pipe"),
                MetricRow("share", Value(0.98765, "x.share", 2, percent=True)),
            )
        ),
        Table(("a", "b"), ((1234567, 0.5),), digits=2),
        Figure("figures/a.png", "A figure"),
        Figure("figures/missing.png", "Gone"),
        Code("seed: 0\n", "yaml", "Resolved config"),
    )
    report.section("Empty", None)  # left out
    md = to_markdown(report)
    assert md.startswith("# A <title>\n")
    assert "| nll | 2.346 | 2.100 | 2.5 (pass line) | a \\| pipe |" in md
    assert "| share | 98.77% | - | - |  |" in md
    assert "| 1,234,567 | 0.50 |" in md
    assert "![A figure](figures/a.png)" in md
    assert "<details><summary>Resolved config</summary>" in md and "```yaml\nseed: 0\n```" in md
    assert "## Empty" not in md

    page = to_html(report, tmp_path)
    parsed = parse_html(page)
    images = [a for tag, a in parsed.tags if tag == "img"]
    assert len(images) == 1 and images[0]["src"] == "data:image/png;base64," + base64.b64encode(png).decode()
    assert "Figure missing from the run folder" in page
    assert "&lt;title&gt;" in page and "<code>eps_hat = eps - s grad</code>" in page and "&lt;b&gt;raw" in page
    sources = {a.get("data-source"): text for a, text in parsed.cells if a.get("data-source")}
    assert sources == {"x.nll": "2.346", "real.nll": "2.100", "x.share": "98.77%"}
    assert "<details><summary>Resolved config</summary>" in page
    assert lookup(metrics, "rows.0.value") == 1.5 and lookup(metrics, "x.missing") is None
    assert [v.source for v in report.values()] == ["x.nll", "real.nll", "x.share"]


def test_inline_html_escapes_everything_but_code_and_bold() -> None:
    assert inline_html("a `<x>` **b** <script>") == "a <code>&lt;x&gt;</code> <strong>b</strong> &lt;script&gt;"


def test_reference_registry() -> None:
    assert reference_value("states", "nll_course", "pass line") == 2.5
    assert reference_value("states", "nll_course", "bug-free") == 2.3
    assert reference_text("states", "nll_course") == "2.5 (pass line) / 2.3 (bug-free)"
    assert "139.9" in reference_text("ncsn", "fid") and "1.99" in reference_text("ncsn", "inception_score")
    assert "11.5" in reference_text("rgb2ir", "psnr") and "0.07" in reference_text("rgb2ir", "ssim")
    assert reference_text("swissroll", "nll_course") == ""


# ---------------------------------------------------------------- trajectories


def test_choose_frames_spreads_and_keeps_both_ends() -> None:
    visited = list(range(499, -1, -1))
    frames = choose_frames(visited, 20)
    assert len(frames) == 20 and frames[0] == 499 and frames[-1] == 0 and frames == sorted(frames, reverse=True)
    assert choose_frames([9, 5, 1], 20) == [9, 5, 1]
    assert choose_frames(visited, 0) == []


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_recorder_captures_the_sampler_and_round_trips(sampler: str, fixed_eps, tmp_path: Path) -> None:
    schedule = NoiseSchedule.linear(100)
    generator = torch.Generator().manual_seed(0)
    if sampler == "ddpm":
        keep = choose_frames(list(range(99, -1, -1)), 20)
        recorder = TrajectoryRecorder(keep, 16, {"sampler": sampler})
        final = ddpm_sample(fixed_eps, schedule, (64, 2), generator=generator, callback=recorder)
    else:
        from difflab.sampling.common import timestep_list

        keep = choose_frames(timestep_list(100, 10), 20)
        recorder = TrajectoryRecorder(keep, 16, {"sampler": sampler})
        final = ddim_sample(fixed_eps, schedule, (64, 2), steps=10, generator=generator, callback=recorder)
    trajectory = recorder.trajectory()
    assert trajectory.x_t.shape == (len(keep), 16, 2) and trajectory.timesteps.tolist() == keep
    # At t = 0 the update returns x0_pred itself (DDPM: posterior mean with alpha_bar_prev = 1; DDIM: sqrt(1) x0).
    torch.testing.assert_close(trajectory.x0_pred[-1], final[:16], atol=1e-5, rtol=1e-5)
    path = trajectory.save(tmp_path / "trajectory.safetensors")
    loaded = Trajectory.load(path)
    assert loaded.kind == "points" and loaded.metadata["sampler"] == sampler
    torch.testing.assert_close(loaded.x_t, trajectory.x_t)
    assert loaded.timesteps.dtype == torch.int64
    first, last = render_frame(loaded, 0), render_frame(loaded, loaded.num_frames - 1)
    assert first[:8] == b"\x89PNG\r\n\x1a\n" and first != last


def test_image_trajectories_render_as_grids(tmp_path: Path) -> None:
    x = torch.rand(3, 5, 1, 8, 8) * 2 - 1
    trajectory = Trajectory(torch.tensor([20, 10, 0]), x, x.flip(0))
    loaded = Trajectory.load(trajectory.save(tmp_path / "t.safetensors"))
    assert loaded.kind == "images"
    assert render_frame(loaded, 0) != render_frame(loaded, 1)


def test_bad_trajectory_files_fail_cleanly(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(DataError, match="not a readable safetensors"):
        Trajectory.load(bad)
    with pytest.raises(DataError, match="does not exist"):
        Trajectory.load(tmp_path / "none.safetensors")
    with pytest.raises(DataError, match="one shape"):
        Trajectory(torch.tensor([0]), torch.zeros(1, 2, 2), torch.zeros(1, 3, 2))


# ---------------------------------------------------------------- a tiny STATES run


@pytest.fixture(scope="module")
def states_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("report") / "states"
    assert main(["run", "states", f"run_dir={run_dir}", *TINY_STATES]) == 0
    return run_dir


def _section(md: str, title: str) -> str:
    start = md.index(f"## {title}\n")
    end = md.find("\n## ", start + 1)
    return md[start : end if end >= 0 else None]


def _tables(section: str) -> list[list[list[str]]]:
    """The Markdown tables of a section, each a list of body rows of cells."""
    tables: list[list[list[str]]] = []
    previous = ""
    for line in section.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            if not previous.startswith("|"):
                tables.append([])  # a header row starts a table
            else:
                tables[-1].append([c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]])
        previous = line
    return tables


def _printed_forms(metrics: object) -> set[str]:
    """Every number of metrics.json as a report could print it: 1 to 4 decimals, or a percentage."""
    forms: set[str] = set()

    def visit(node: object) -> None:
        if isinstance(node, dict):
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)
        elif isinstance(node, (int, float)) and not isinstance(node, bool):
            forms.add(fmt(node))
            for digits in range(0, 5):
                forms.add(fmt(float(node), digits))
                forms.add(f"{node:.{digits}%}")

    visit(metrics)
    return forms


def test_states_run_writes_both_reports_and_a_trajectory(states_run: Path) -> None:
    assert (states_run / "report.md").is_file() and (states_run / "report.html").is_file()
    assert json.loads((states_run / "run.json").read_text())["status"] == "complete"
    trajectory = Trajectory.load(states_run / "samples" / "trajectory.safetensors")
    assert trajectory.x_t.shape == (20, 200, 2) and trajectory.timesteps[0] == 499 and trajectory.timesteps[-1] == 0
    samples = torch.load(states_run / "samples" / "uncond_gen_samples.pt", weights_only=True)
    torch.testing.assert_close(trajectory.x0_pred[-1], samples[:200], atol=1e-5, rtol=1e-5)
    # The trajectory shows learning even after 100 steps: the final prediction scores far better under a KDE of
    # the outlines than the noise it started from (3.2 against 3.8 nats here; a trained model gets 2.2).
    kde = KDE(load_states("train").data)
    assert kde.nll(trajectory.x0_pred[-1]) < kde.nll(trajectory.x_t[0]) - 0.3


def test_states_report_html_is_self_contained(states_run: Path) -> None:
    page = (states_run / "report.html").read_text()
    parsed = parse_html(page)
    assert not [a for tag, a in parsed.tags if tag in ("link", "script", "iframe", "object", "embed")]
    assert "url(" not in page and "@import" not in page
    for tag, attributes in parsed.tags:
        assert not attributes.get("src", "data:").startswith(("http:", "https:", "//")), (tag, attributes)
        href = attributes.get("href", "#")
        assert href.startswith("#") or (tag == "a" and href.startswith(("http://", "https://"))), (tag, href)
    images = [a for tag, a in parsed.tags if tag == "img"]
    md = (states_run / "report.md").read_text()
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(a["data-path"] for a in images) == sorted(linked)
    assert len(linked) >= 7  # samples, per class, losses, prediction map, forward, reverse
    for attributes in images:
        header, payload = attributes["src"].split(",", 1)
        assert header == "data:image/png;base64"
        assert base64.b64decode(payload) == (states_run / attributes["data-path"]).read_bytes()
    for title in ("Data", "Unconditional samples (DDPM)", "Training", "Where the time goes", "Configuration"):
        assert f">{title}</h2>" in page
    assert "<details><summary>Resolved config (config.yaml)</summary>" in page
    assert "torch_threads" in page and "denoiser/val_loss" in page


def test_every_number_of_the_states_metric_tables_is_in_metrics_json(states_run: Path) -> None:
    metrics = json.loads((states_run / "metrics.json").read_text())
    # HTML: each traced cell prints exactly its metrics.json value.
    cells = [
        (a["data-source"], text)
        for a, text in parse_html((states_run / "report.html").read_text()).cells
        if a.get("data-source")
    ]
    traced = [(key, text) for key, text in cells if not key.startswith("metrics.jsonl:")]
    assert len(traced) >= 40
    for key, text in traced:
        value = lookup(metrics, key)
        assert value is not None, key
        assert text in {fmt(value, d) for d in range(0, 5)} | {f"{value:.2%}"}, (key, text, value)
    # Markdown: every number in the metric tables is in metrics.json at the printed precision.
    md = (states_run / "report.md").read_text()
    printed = _printed_forms(metrics)
    checked = 0
    metric_tables = [
        table
        for title in ("Unconditional samples (DDPM)", "Classifier-guided samples", "Where the time goes", "Targets")
        for table in _tables(_section(md, title))
    ]
    metric_tables.append(_tables(_section(md, "Training"))[0])  # the second one summarises metrics.jsonl
    for table in metric_tables:
        for row in table:
            for cell in row[1:]:
                if re.fullmatch(r"-?[\d,]+(\.\d+)?%?", cell):
                    assert cell in printed, (row, cell)
                    checked += 1
    assert checked >= 40
    unconditional = _tables(_section(md, "Unconditional samples (DDPM)"))[0]
    assert unconditional[0][:4] == [
        "nll_course",
        f"{metrics['uncond']['nll_course']:.3f}",
        f"{metrics['real']['nll_course']:.3f}",
        "2.5 (pass line) / 2.3 (bug-free)",
    ]


def test_report_command_rebuilds_the_report_from_the_folder_alone(states_run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("run.json", "config.yaml", "metrics.json", "metrics.jsonl"):
        shutil.copy(states_run / name, copy / name)
    shutil.copytree(states_run / "figures", copy / "figures")
    (copy / "samples").mkdir()
    shutil.copy(states_run / "samples" / "trajectory.safetensors", copy / "samples")
    assert main(["report", str(copy)]) == 0
    for name in ("report.md", "report.html"):
        original = (states_run / name).read_text()
        rebuilt = (copy / name).read_text().replace(str(copy), str(states_run))  # the run folder line
        assert rebuilt == original, name


def test_report_command_refuses_what_is_not_a_completed_run(tmp_path: Path, states_run: Path, capsys) -> None:
    (tmp_path / "plain").mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "difflab", "report", str(tmp_path / "plain")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == f"difflab: error: {tmp_path / 'plain'} is not a difflab run folder (no run.json)\n"

    def refuse(*args: str) -> str:
        assert main(["report", *args]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1 and err.startswith("difflab: error: "), err
        return err

    assert "not a folder" in refuse(str(tmp_path / "missing"))
    running = tmp_path / "running"
    running.mkdir()
    record = json.loads((states_run / "run.json").read_text()) | {"status": "running"}
    (running / "run.json").write_text(json.dumps(record))
    assert "not a completed run (status: running)" in refuse(str(running))
    assert "no report style 'nope'" in refuse(str(states_run), "--style", "nope")
    other = tmp_path / "ncsn"  # a recipe's report in a style it does not have: the styles it has are named
    other.mkdir()
    (other / "run.json").write_text(json.dumps(record | {"recipe": "mnist-ncsn", "status": "complete"}))
    (other / "metrics.json").write_text("{}")
    # a config.yaml that is missing (or of another recipe) would make a report of this difflab's defaults
    assert f"{other / 'config.yaml'} is missing, empty or of another recipe" in refuse(str(other))
    (other / "config.yaml").write_text("recipe: mnist-ncsn\n")
    assert "recipe mnist-ncsn has no report style 'ddpm-vs-ddim'; choose one of default" in refuse(
        str(other), "--style", "ddpm-vs-ddim"
    )
    # a builder that needs a number metrics.json lacks: one line naming the file, no traceback
    message = refuse(str(other))
    assert f"{other / 'metrics.json'} lacks what the mnist-ncsn report needs (KeyError: 'main')" in message


def test_a_hand_written_markdown_report_reads_back_as_a_report(tmp_path: Path) -> None:
    from difflab.report.document import BulletList, Code, Figure, Paragraph, Section, Table
    from difflab.report.render import report_from_markdown, to_html

    text = "\n".join(
        [
            "# A run",
            "",
            "Run folder `x`; **bold** words",
            "over two lines.",
            "",
            "## Samples",
            "",
            "| metric | value |",
            "|---|---|",
            "| a \\| b | 1.5 |",
            "",
            "![Samples over the data](figures/s.png)",
            "",
            "*Samples over the data*",
            "",
            "- one",
            "- two",
            "",
            "### Detail",
            "```yaml",
            "key: 1",
            "",
            "other: 2",
            "```",
        ]
    )
    report = report_from_markdown(text)
    assert report.title == "A run"
    intro, samples, detail = report.blocks
    assert intro == Paragraph("Run folder `x`; **bold** words over two lines.")
    assert isinstance(samples, Section) and samples.title == "Samples"
    table, figure, bullets = samples.blocks  # the caption line under the figure is the figure's own
    assert table == Table(("metric", "value"), (("a | b", "1.5"),))
    assert figure == Figure("figures/s.png", "Samples over the data")
    assert bullets == BulletList(("one", "two"))
    assert detail == Section("Detail", (Code("key: 1\n\nother: 2", "yaml"),), 3)
    page = to_html(report, tmp_path)
    assert "<code>x</code>" in page and "<strong>bold</strong>" in page and "Figure missing" in page
