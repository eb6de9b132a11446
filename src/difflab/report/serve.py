"""``difflab serve RUNS_DIR``: a small local, read-only web page over run folders.

Pages (all generated here; the only script is a few inline lines, nothing is fetched from elsewhere):

    /                      every run folder under RUNS_DIR (folders holding run.json, up to 3 levels down)
                           with its headline metrics; tick runs to compare them
    /run?id=ID             one run: status, metrics, training curves (inline SVG from metrics.jsonl), the
                           denoising-trajectory viewer (a slider over timesteps: x_t and predicted x_0),
                           figures, config
    /compare?id=A&id=B     metrics side by side, the config keys that differ, overlaid curves
    /trajectory?id=ID&frame=K   frame K of samples/trajectory.safetensors as a PNG (rendered once, cached)
    /files/PATH            a file under RUNS_DIR (figures, report.html, metrics.json, ...); nothing else

Only GET and HEAD are answered; a path that leaves RUNS_DIR (``..``, a link pointing outside) gets 404.
It binds to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import errno
import html
import json
import math
import os
import socket
import sys
import threading
from collections import OrderedDict
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import yaml

from difflab.errors import ConfigError, DifflabError, first_line
from difflab.report.markdown import fmt
from difflab.report.references import HEADLINE_METRICS
from difflab.report.render import CSS
from difflab.report.rundata import TRAJECTORY_FILE, finish_command, trained_only
from difflab.report.svg import line_chart
from difflab.training.logging import read_all_series

MAX_DEPTH = 3
FILE_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".svg": "image/svg+xml",
    ".html": "text/html; charset=utf-8",
    ".md": "text/markdown; charset=utf-8",
    ".json": "application/json",
    ".jsonl": "text/plain; charset=utf-8",
    ".yaml": "text/plain; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
    ".csv": "text/plain; charset=utf-8",
}
SECURITY_HEADERS = {
    # Nothing may be loaded from anywhere but this server (and data: images of the reports).
    "Content-Security-Policy": "default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; "
    "script-src 'unsafe-inline'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
PAGE_CSS = (
    CSS
    + """
body{max-width:1300px}
.top{font-size:.9em;margin-bottom:1em}.top a{margin-right:1em}
.status-complete{color:#286a2e}.status-trained{color:#2b5d8a}.status-failed{color:#a33}.status-running{color:#a66a00}.status-stopped{color:#a33}
.differs td{background:#fff6e0!important}
.viewer{border:1px solid #e3e3e3;padding:.8em;margin:.5em 0 1.5em}
.viewer input[type=range]{width:60%;vertical-align:middle}
.viewer img{display:block;margin-top:.6em;max-width:100%}
.charts svg{margin:0 1em 1em 0;border:1px solid #f0f0f0}
.grid img{max-width:48%;margin:0 1% 1em 0;vertical-align:top;border:1px solid #eee}
input.filter{width:24em;padding:.2em .4em;margin:.4em 0}
"""
)

esc = html.escape


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(data, list) and data and all(isinstance(v, dict) for v in data):
        out = {}
        for k, value in enumerate(data):
            out.update(_flatten(value, f"{prefix}.{k}"))
        return out
    return {prefix: data}


def numeric_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Every number in ``metrics.json`` by dotted key (booleans and text left out)."""
    return {
        k: v
        for k, v in _flatten(metrics).items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.startswith("targets.")
    }


def _cell(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value) and 0 < abs(value) < 1e-3:
        return f"{value:.3e}"
    return fmt(value, 4)


def find_runs(root: Path) -> dict[str, Path]:
    """Run folders (holding run.json) under ``root``, by id (their path relative to root, ``.`` for root).

    Hidden folders are skipped, and so is anything that a link takes outside ``root``."""
    root = root.resolve()
    found: dict[str, Path] = {}
    if (root / "run.json").is_file():
        found["."] = root
    for depth in range(1, MAX_DEPTH + 1):
        for record in root.glob("/".join(["*"] * depth) + "/run.json"):
            folder = record.parent
            relative = folder.relative_to(root)
            if any(part.startswith(".") for part in relative.parts) or not folder.resolve().is_relative_to(root):
                continue
            found[relative.as_posix()] = folder
    return dict(sorted(found.items()))


def _process_gone(record: dict[str, Any]) -> bool:
    """Whether the process a run record names (``pid`` on ``host``) no longer exists: a run left ``running`` by a
    kill. False when that cannot be told (another host, an older record without a pid)."""
    pid = record.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or record.get("host") != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, owned by someone else
        return False
    return False


class RunView:
    """What the browser shows of one run folder, read leniently (running and failed runs too)."""

    def __init__(self, run_id: str, path: Path) -> None:
        self.id, self.path = run_id, path
        self.problems: list[str] = []  # files that exist but cannot be read: the run page is then refused
        self.record = self._json("run.json")
        self.metrics = self._json("metrics.json")
        config_path = path / "config.yaml"
        self.config_text = config_path.read_text(errors="replace") if config_path.is_file() else ""
        try:
            config = yaml.safe_load(self.config_text) or {}
        except yaml.YAMLError as exc:
            self.problems.append(f"config.yaml is not valid YAML ({first_line(exc)})")
            config = {}
        self.config = config if isinstance(config, dict) else {}

    def _json(self, name: str) -> dict[str, Any]:
        path = self.path / name
        if not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            self.problems.append(f"{name} cannot be read ({first_line(exc)})")
            return {}
        if not isinstance(data, dict):
            self.problems.append(f"{name} holds a {type(data).__name__}, not a JSON object")
            return {}
        return data

    @property
    def recipe(self) -> str:
        return str(self.record.get("recipe", "?"))

    @property
    def status(self) -> str:
        if self.problems:
            return "damaged"
        status = str(self.record.get("status", "damaged" if (self.path / "run.json").is_file() else "?"))
        if status == "complete" and trained_only(self.path, self.record):
            return "trained"  # weights only: nothing sampled or scored yet
        return "stopped" if status == "running" and _process_gone(self.record) else status

    def series(self) -> dict[str, tuple[list[int], list[float]]]:
        return read_all_series(self.path / "metrics.jsonl")

    def figures(self) -> list[str]:
        folder = self.path / "figures"
        return sorted(p.name for p in folder.glob("*.png")) if folder.is_dir() else []

    def headline(self) -> list[str]:
        keys = HEADLINE_METRICS.get(self.recipe)
        if keys:
            return list(keys)
        numbers = numeric_metrics(self.metrics)
        return [k for k in numbers if not k.startswith("timings")][:4] + (
            ["timings_seconds.total"] if "timings_seconds.total" in numbers else []
        )


def _link(run_id: str) -> str:
    return f'<a href="/run?id={quote(run_id)}">{esc(run_id)}</a>'


def _file_url(run_id: str, relative: str) -> str:
    prefix = "" if run_id == "." else run_id + "/"
    return "/files/" + quote(prefix + relative)


def _page(title: str, body: list[str]) -> bytes:
    head = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<title>{esc(title)}</title><link rel="icon" href="data:,"><style>{PAGE_CSS}</style></head><body>'
        '<div class="top"><a href="/">all runs</a><a href="/compare">compare all</a></div>'
    )
    return (head + "\n".join(body) + "</body></html>\n").encode()


def group_series(series: dict[str, tuple[list[int], list[float]]]) -> dict[str, dict[str, tuple]]:
    """Charts to draw: the series of one network (tag prefix) and kind (losses together, others alone)."""
    groups: dict[str, dict[str, tuple]] = {}
    for tag, values in series.items():
        prefix, _, name = tag.rpartition("/")
        if name == "lr":
            continue
        kind = "loss" if "loss" in name else name
        groups.setdefault(f"{prefix or 'run'}: {kind}", {})[name] = values
    return groups


class RunBrowser:
    """The pages and files of ``difflab serve`` over ``root``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise ConfigError(f"{root} is not a folder")
        self._lock = threading.Lock()
        self._frames: OrderedDict[tuple[str, int, int], bytes] = OrderedDict()
        self._trajectories: dict[tuple[str, int], Any] = {}

    def runs(self) -> dict[str, Path]:
        return find_runs(self.root)

    def view(self, run_id: str) -> RunView | None:
        path = self.runs().get(run_id)
        return RunView(run_id, path) if path is not None else None

    # ------------------------------------------------------------ pages

    def index_page(self) -> bytes:
        views = [RunView(i, p) for i, p in self.runs().items()]
        body = [f"<h1>difflab runs</h1><p>{len(views)} run folder(s) under <code>{esc(str(self.root))}</code>.</p>"]
        if not views:
            body.append("<p>No run folders (folders holding <code>run.json</code>) here yet.</p>")
            return _page("difflab runs", body)
        body.append('<form action="/compare" method="get">')
        by_recipe: dict[str, list[RunView]] = {}
        for view in views:
            by_recipe.setdefault(view.recipe, []).append(view)
        for recipe, group in by_recipe.items():
            keys: list[str] = []
            for view in group:
                keys += [k for k in view.headline() if k not in keys]
            body.append(f"<h2>{esc(recipe)}</h2><table><thead><tr><th></th><th>run</th><th>status</th><th>updated</th>")
            body.append("".join(f"<th>{esc(k)}</th>" for k in keys) + "</tr></thead><tbody>")
            for view in group:
                numbers = numeric_metrics(view.metrics)
                cells = "".join(f'<td class="num">{esc(_cell(numbers.get(k)))}</td>' for k in keys)
                body.append(
                    f'<tr class="run"><td><input type="checkbox" name="id" value="{esc(view.id)}"></td>'
                    f'<td>{_link(view.id)}</td><td class="status-{esc(view.status)}">{esc(view.status)}</td>'
                    f"<td>{esc(str(view.record.get('updated', '')))}</td>{cells}</tr>"
                )
            body.append("</tbody></table>")
        body.append('<p><button type="submit">Compare the ticked runs</button></p></form>')
        return _page("difflab runs", body)

    def run_page(self, view: RunView) -> bytes:
        if view.problems:  # answered 500 with this line: a page with a section silently missing would mislead
            raise DifflabError(f"run {view.id}: {'; '.join(view.problems)}")
        record = view.record
        body = [f"<h1>{esc(view.id)}</h1>", "<table>"]
        for label, value in (
            ("recipe", view.recipe),
            (
                "status",
                f"stopped: marked running, but its process (pid {record.get('pid')}) is gone; run its command again "
                "to resume from the last checkpoint"
                if view.status == "stopped"
                else view.status,
            ),
            ("message", record.get("message", "")),
            ("updated", record.get("updated", "")),
            ("command", record.get("command", "")),
        ):
            if value:
                body.append(f"<tr><th>{label}</th><td>{esc(str(value))}</td></tr>")
        styled = sorted(p.name for p in view.path.glob("report-*.html"))  # other report styles
        links = [
            f'<a href="{_file_url(view.id, name)}">{esc(name)}</a>'
            for name in ("report.html", "report.md", *styled, "metrics.json", "config.yaml")
            if (view.path / name).is_file()
        ]
        if links:
            body.append(f"<tr><th>files</th><td>{' &middot; '.join(links)}</td></tr>")
        body.append("</table>")

        numbers = numeric_metrics(view.metrics)
        if numbers:
            headline = [k for k in view.headline() if k in numbers]
            body.append("<h2>Metrics</h2><table><tbody>")
            body += [f'<tr><th>{esc(k)}</th><td class="num">{esc(_cell(numbers[k]))}</td></tr>' for k in headline]
            body.append("</tbody></table>")
            body.append(f"<details><summary>All {len(numbers)} numbers of metrics.json</summary><table><tbody>")
            body += [f'<tr><th>{esc(k)}</th><td class="num">{esc(_cell(v))}</td></tr>' for k, v in numbers.items()]
            body.append("</tbody></table></details>")
        else:
            body.append(
                f"<p>No metrics.json: the folder holds trained weights only (difflab train); "
                f"{esc(finish_command(view.path, record))}.</p>"
                if view.status == "trained"
                else "<p>No metrics.json yet (the run is not complete).</p>"
            )

        groups = group_series(view.series())
        if groups:
            body.append('<h2>Training curves</h2><div class="charts">')
            body += [line_chart(series, title) for title, series in groups.items()]
            body.append("</div>")

        trajectory = self.trajectory(view)
        if trajectory is not None:
            body += self._viewer(view, trajectory)

        figures = view.figures()
        if figures:
            body.append('<h2>Figures</h2><div class="grid">')
            body += [
                f'<img src="{_file_url(view.id, "figures/" + name)}" alt="{esc(name)}" title="{esc(name)}">'
                for name in figures
            ]
            body.append("</div>")
        if view.config_text:
            body.append(
                f"<h2>Config</h2><details><summary>config.yaml</summary><pre>{esc(view.config_text)}</pre></details>"
            )
        return _page(f"{view.id} - difflab", body)

    def _viewer(self, view: RunView, trajectory: Any) -> list[str]:
        timesteps = [int(t) for t in trajectory.timesteps]
        last = len(timesteps) - 1
        base = f"/trajectory?id={quote(view.id)}&frame="
        return [
            "<h2>Denoising trajectory</h2>",
            f"<p>{trajectory.x_t.shape[1]} samples of <code>{TRAJECTORY_FILE}</code>: x_t (left) and the model's "
            f"predicted x_0 (right) at {len(timesteps)} timesteps of the sampler "
            f"({esc(trajectory.metadata.get('sampler', ''))}).</p>",
            '<div class="viewer">',
            f'<input type="range" id="frame" min="0" max="{last}" value="0" step="1" aria-label="timestep"> ',
            '<button type="button" id="play">play</button> <span id="frame-label"></span>',
            f'<img id="trajectory" src="{base}0" alt="trajectory frame">',
            "</div>",
            "<script>",
            f"const timesteps = {json.dumps(timesteps)}; const base = {json.dumps(base)};",
            "const slider = document.getElementById('frame'), image = document.getElementById('trajectory');",
            "const label = document.getElementById('frame-label'); let timer = null;",
            "function show(k) { image.src = base + k;"
            " label.textContent = 'frame ' + (k + 1) + ' of ' + timesteps.length + ', t = ' + timesteps[k]; }",
            "slider.addEventListener('input', () => show(Number(slider.value)));",
            "document.getElementById('play').addEventListener('click', () => {",
            "  if (timer) { clearInterval(timer); timer = null; return; }",
            "  timer = setInterval(() => { const k = (Number(slider.value) + 1) % timesteps.length;",
            "    slider.value = k; show(k);",
            "    if (k === timesteps.length - 1) { clearInterval(timer); timer = null; } }, 400);",
            "});",
            "show(0);",
            "</script>",
        ]

    def compare_page(self, ids: list[str]) -> bytes:
        runs = self.runs()
        unknown = [i for i in ids if i not in runs]
        views = [RunView(i, runs[i]) for i in (ids or list(runs)) if i in runs]
        body = ["<h1>Compare runs</h1>"]
        if unknown:
            body.append(f'<p class="missing">Not run folders here: {esc(", ".join(unknown))}</p>')
        if not views:
            body.append("<p>No runs to compare.</p>")
            return _page("compare - difflab", body)
        header = "".join(f"<th>{_link(v.id)}<br><small>{esc(v.recipe)}</small></th>" for v in views)

        numbers = [numeric_metrics(v.metrics) for v in views]
        keys: list[str] = []
        for view in views:
            keys += [k for k in view.headline() if k not in keys]
        for found in numbers:
            keys += [k for k in found if k not in keys]
        body.append(f"<h2>Metrics</h2><p>{len(keys)} numbers of metrics.json; rows that differ are shaded.</p>")
        body.append('<input class="filter" id="filter" placeholder="filter keys, e.g. nll">')
        body.append(f'<table id="metrics"><thead><tr><th>metric</th>{header}</tr></thead><tbody>')
        for key in keys:
            values = [found.get(key) for found in numbers]
            differs = len({json.dumps(v) for v in values}) > 1
            cells = "".join(f'<td class="num">{esc(_cell(v))}</td>' for v in values)
            body.append(f"<tr{' class=differs' if differs else ''}><th>{esc(key)}</th>{cells}</tr>")
        body.append("</tbody></table>")
        body.append(
            "<script>document.getElementById('filter').addEventListener('input', e => {"
            " const q = e.target.value.toLowerCase();"
            " for (const row of document.querySelectorAll('#metrics tbody tr'))"
            " row.style.display = row.cells[0].textContent.toLowerCase().includes(q) ? '' : 'none'; });</script>"
        )

        configs = [_flatten(v.config) for v in views]
        config_keys = sorted(set().union(*configs))
        differing = [k for k in config_keys if len({json.dumps(c.get(k), default=str) for c in configs}) > 1]
        body.append(
            f"<h2>Config differences</h2><p>{len(differing)} of {len(config_keys)} config keys differ.</p>"
            if len(views) > 1
            else "<h2>Config</h2>"
        )
        shown = differing if len(views) > 1 else config_keys
        if shown:
            body.append(f"<table><thead><tr><th>key</th>{header}</tr></thead><tbody>")
            for key in shown:
                cells = "".join(f"<td>{esc(json.dumps(c.get(key), default=str))}</td>" for c in configs)
                body.append(f"<tr><th>{esc(key)}</th>{cells}</tr>")
            body.append("</tbody></table>")

        all_series = [v.series() for v in views]
        tags = sorted({t for s in all_series for t in s if not t.endswith("/lr")})
        charts = []
        for tag in tags:
            overlay = {v.id: s[tag] for v, s in zip(views, all_series) if tag in s}
            if len(views) == 1 or len(overlay) > 1:
                charts.append(line_chart(overlay, tag))
        if charts:
            body.append('<h2>Training curves</h2><div class="charts">' + "\n".join(charts) + "</div>")
        return _page("compare - difflab", body)

    # ------------------------------------------------------------ trajectory frames and files

    def trajectory(self, view: RunView) -> Any:
        """The run's trajectory (cached by file and modification time), or ``None`` when it has none."""
        from difflab.sampling.trajectory import Trajectory

        path = view.path / TRAJECTORY_FILE
        if not path.is_file():
            return None
        key = (str(path), path.stat().st_mtime_ns)
        with self._lock:
            if key not in self._trajectories:
                try:
                    self._trajectories[key] = Trajectory.load(path)
                except DifflabError as exc:
                    raise DifflabError(f"{TRAJECTORY_FILE} of run {view.id} cannot be read: {exc}") from None
            return self._trajectories[key]

    def frame_png(self, view: RunView, frame: int) -> bytes | None:
        from difflab.viz.trajectory import render_frame

        trajectory = self.trajectory(view)
        if trajectory is None or not 0 <= frame < trajectory.num_frames:
            return None
        path = view.path / TRAJECTORY_FILE
        key = (str(path), path.stat().st_mtime_ns, frame)
        with self._lock:  # matplotlib's font cache and friends are shared: render one frame at a time
            if key not in self._frames:
                self._frames[key] = render_frame(trajectory, frame)
                while len(self._frames) > 512:
                    self._frames.popitem(last=False)
            return self._frames[key]

    def resolve_file(self, relative: str) -> Path | None:
        """The file at ``relative`` under the root, or ``None`` when it is outside it, missing or of a type
        not served."""
        parts = [p for p in relative.split("/") if p not in ("", ".")]
        if not parts or any(p == ".." or "\\" in p or "\x00" in p for p in parts):
            return None
        try:
            path = self.root.joinpath(*parts).resolve()
        except (OSError, ValueError):
            return None
        if not path.is_relative_to(self.root) or not path.is_file() or path.suffix.lower() not in FILE_TYPES:
            return None
        return path


class Handler(BaseHTTPRequestHandler):
    server_version = "difflab-serve"
    browser: RunBrowser  # set on the subclass made by make_server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass  # quiet: the terminal shows where the server is, not every request

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self._answer(head=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(head=True)

    def _send(self, status: int, body: bytes, content_type: str, head: bool, cache: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "max-age=60" if cache else "no-store")
        for name, value in SECURITY_HEADERS.items():
            self.send_header(name, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _not_found(self, head: bool) -> None:
        self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain; charset=utf-8", head)

    def _answer(self, head: bool) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        route = url.path
        browser = self.browser
        try:
            if route in ("/", "/index.html"):
                self._send(HTTPStatus.OK, browser.index_page(), "text/html; charset=utf-8", head)
            elif route == "/run":
                view = browser.view(query.get("id", [""])[0])
                if view is None:
                    return self._not_found(head)
                self._send(HTTPStatus.OK, browser.run_page(view), "text/html; charset=utf-8", head)
            elif route == "/compare":
                self._send(HTTPStatus.OK, browser.compare_page(query.get("id", [])), "text/html; charset=utf-8", head)
            elif route == "/trajectory":
                view = browser.view(query.get("id", [""])[0])
                frame = query.get("frame", [""])[0]
                png = browser.frame_png(view, int(frame)) if view is not None and frame.isdigit() else None
                if png is None:
                    return self._not_found(head)
                self._send(HTTPStatus.OK, png, "image/png", head, cache=True)
            elif route.startswith("/files/"):
                path = browser.resolve_file(unquote(route[len("/files/") :]))
                if path is None:
                    return self._not_found(head)
                self._send(HTTPStatus.OK, path.read_bytes(), FILE_TYPES[path.suffix.lower()], head)
            else:
                self._not_found(head)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the browser went away
        except Exception as exc:  # a damaged run folder must not take the page (or the server) down
            message = f"cannot show {route}: {type(exc).__name__}: {exc}"
            print(f"difflab serve: {message}", file=sys.stderr, flush=True)
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, (message + "\n").encode(), "text/plain; charset=utf-8", head)


def make_server(root: str | Path, host: str = "127.0.0.1", port: int = 8765) -> ThreadingHTTPServer:
    """A ready (not yet serving) server over ``root``; ``port=0`` picks a free port
    (``server.server_address[1]`` says which)."""
    browser = RunBrowser(root)
    handler = type("RunBrowserHandler", (Handler,), {"browser": browser})
    try:
        server = ThreadingHTTPServer((host, port), handler)
    except OSError as exc:
        advice = "choose another --port" if exc.errno == errno.EADDRINUSE else "check --host and --port"
        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); {advice}") from None
    server.daemon_threads = True
    return server


def serve_forever(root: str | Path, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serve until Ctrl-C."""
    server = make_server(root, host, port)
    bound_host, bound_port = server.server_address[:2]
    count = len(find_runs(Path(root).resolve()))
    print(
        f"difflab: serving {count} run(s) from {root} at http://{bound_host}:{bound_port}/ (Ctrl-C stops)", flush=True
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
