"""The run browser: pages, comparisons, refusal of paths outside RUNS_DIR, and the trajectory viewer driven
in headless Chromium (Debian's chromium + chromedriver, which `make dev` installs)."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from difflab.cli import main
from difflab.report.markdown import fmt
from difflab.report.serve import make_server

TINY_SWISSROLL = [
    "progress=false",
    "data.n_train=600",
    "data.n_heldout=300",
    "denoiser_train.steps=80",
    "denoiser_train.batch_size=256",
    "denoiser_train.warmup_steps=10",
    "denoiser_train.eval_every=40",
    "denoiser_train.log_every=20",
    "sampling.n=300",
    "figures.trajectory_points=150",
]


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory) -> Path:
    """Two runs: a tiny swiss roll, and a copy of it posing as a run with another seed (for comparisons)."""
    root = tmp_path_factory.mktemp("runs")
    assert main(["run", "swissroll", f"run_dir={root / 'roll'}", *TINY_SWISSROLL]) == 0
    other = root / "group" / "roll-seed7"
    shutil.copytree(root / "roll", other)
    config = yaml.safe_load((other / "config.yaml").read_text())
    config["seed"] = 7
    (other / "config.yaml").write_text(yaml.safe_dump(config))
    metrics = json.loads((other / "metrics.json").read_text())
    metrics["samples"]["nll_course"] += 0.5
    (other / "metrics.json").write_text(json.dumps(metrics))
    (root / "not-a-run").mkdir()
    (root / "not-a-run" / "notes.txt").write_text("hello")
    (root / "outside").symlink_to("/etc")
    elsewhere = tmp_path_factory.mktemp("elsewhere") / "run"
    shutil.copytree(root / "roll", elsewhere)
    (root / "linked").symlink_to(elsewhere)  # a run reached through a link out of RUNS_DIR is not shown
    return root


@contextlib.contextmanager
def serving(root: Path) -> Iterator[tuple[str, int]]:
    """``difflab serve ROOT`` on a free port in a thread, for the length of the block: its (host, port)."""
    httpd = make_server(root, "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield "127.0.0.1", httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def server(runs_root: Path) -> Iterator[tuple[str, int]]:
    with serving(runs_root) as address:
        yield address


def request(server: tuple[str, int], path: str, method: str = "GET") -> tuple[int, bytes, dict[str, str]]:
    """A raw request: the path goes on the wire as written (no client-side normalisation of ``..``)."""
    connection = http.client.HTTPConnection(*server, timeout=30)
    connection.putrequest(method, path, skip_accept_encoding=True)
    connection.endheaders()
    response = connection.getresponse()
    body = response.read()
    connection.close()
    return response.status, body, dict(response.getheaders())


def test_index_lists_the_runs_with_headline_metrics(server, runs_root: Path) -> None:
    status, body, headers = request(server, "/")
    page = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert 'value="roll"' in page and 'value="group/roll-seed7"' in page and "not-a-run" not in page
    assert "linked" not in page and request(server, "/run?id=linked")[0] == 404
    metrics = json.loads((runs_root / "roll" / "metrics.json").read_text())
    assert f">{fmt(metrics['samples']['nll_course'], 4)}<" in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in page


def test_run_page_has_curves_figures_viewer_and_config(server, runs_root: Path) -> None:
    status, body, _ = request(server, "/run?id=roll")
    page = body.decode()
    assert status == 200
    assert page.count("<svg") >= 1 and "denoiser: loss" in page and "<polyline" in page
    assert 'id="frame"' in page and 'max="19"' in page and "/trajectory?id=roll&frame=0" in page
    assert "/files/roll/figures/samples.png" in page and "/files/roll/report.html" in page
    assert "denoiser_train:" in page  # the config
    status, png, headers = request(server, "/trajectory?id=roll&frame=0")
    assert status == 200 and headers["Content-Type"] == "image/png" and png.startswith(b"\x89PNG")
    assert request(server, "/trajectory?id=roll&frame=19")[1] != png
    assert request(server, "/trajectory?id=roll&frame=20")[0] == 404
    assert request(server, "/trajectory?id=nope&frame=0")[0] == 404
    assert request(server, "/run?id=nope")[0] == 404
    assert request(server, "/run?id=not-a-run")[0] == 404


def test_compare_page_shows_metrics_and_config_differences(server) -> None:
    status, body, _ = request(server, "/compare?id=roll&id=group/roll-seed7")
    page = body.decode()
    assert status == 200
    assert "1 of " in page and "config keys differ" in page
    config_table = page[page.index("Config differences") :]
    assert "<th>seed</th><td>0</td><td>7</td>" in config_table
    assert re.search(r"<tr class=differs><th>samples\.nll_course</th>", page)
    assert "denoiser/val_loss" in page  # overlaid curves


def test_files_are_served_from_runs_dir_only(server, runs_root: Path) -> None:
    status, body, headers = request(server, "/files/roll/metrics.json")
    assert status == 200 and json.loads(body) == json.loads((runs_root / "roll" / "metrics.json").read_text())
    status, body, _ = request(server, "/files/roll/report.html")
    assert status == 200 and body.startswith(b"<!DOCTYPE html>")
    for path in (
        "/../../etc/passwd",
        "/files/../../etc/passwd",
        "/files/roll/../../../etc/passwd",
        "/files/%2e%2e/%2e%2e/etc/passwd",
        "/files/..%2f..%2fetc%2fpasswd",
        "/files//etc/passwd",
        "/files/outside/passwd",  # a link inside RUNS_DIR pointing out of it
        "/files/roll/checkpoints/denoiser.safetensors",  # not a type that is served
        "/files/roll",
        "/etc/passwd",
    ):
        status, body, _ = request(server, path)
        assert status == 404, path
        assert b"root:" not in body
    assert request(server, "/", "POST")[0] == 501  # read-only
    assert request(server, "/files/roll/metrics.json", "HEAD")[0] == 200


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# Debian's packages by default; elsewhere point these variables at a Chromium and its chromedriver.
CHROMIUM = os.environ.get("DIFFLAB_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = os.environ.get("DIFFLAB_CHROMEDRIVER") or shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture
def browser(monkeypatch) -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium must not look for browsers or drivers online
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="difflab-chromium-")
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1200,1000",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_trajectory_slider_in_headless_chromium(runs_root: Path, browser) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    serve = subprocess.Popen(
        [sys.executable, "-m", "difflab", "serve", str(runs_root), "--port", str(_free_port())],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = serve.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+/", line)
        assert url, (line, serve.stderr.read() if serve.poll() is not None else "")
        wait = WebDriverWait(browser, 20)
        browser.get(url.group(0))
        runs = [a.text for a in browser.find_elements(By.CSS_SELECTOR, "tr.run a")]
        assert runs == ["group/roll-seed7", "roll"]
        browser.find_element(By.LINK_TEXT, "roll").click()
        wait.until(lambda d: d.find_elements(By.ID, "trajectory"))

        def loaded(d) -> bool:
            return d.execute_script(
                "const i = document.getElementById('trajectory'); return i.complete && i.naturalWidth > 0"
            )

        wait.until(loaded)
        image = browser.find_element(By.ID, "trajectory")
        before_src, before_png = image.get_attribute("src"), image.screenshot_as_png
        label = browser.find_element(By.ID, "frame-label").text
        assert label.startswith("frame 1 of 20, t = 99")
        slider = browser.find_element(By.ID, "frame")
        slider.click()  # a click on the middle of the slider moves it there
        slider.send_keys(Keys.END)  # then the keyboard takes it to the last frame
        wait.until(lambda d: d.find_element(By.ID, "trajectory").get_attribute("src") != before_src)
        wait.until(loaded)
        assert image.get_attribute("src").endswith("frame=19")
        assert browser.find_element(By.ID, "frame-label").text == "frame 20 of 20, t = 0"
        assert image.screenshot_as_png != before_png
        # Everything the page loaded came from this server.
        resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert resources and all(r.startswith(url.group(0)) for r in resources), resources
    finally:
        serve.terminate()
        serve.wait(timeout=10)
        serve.stdout.close()
        serve.stderr.close()


def test_serve_refuses_a_missing_folder(tmp_path: Path, capsys) -> None:
    assert main(["serve", str(tmp_path / "nowhere"), "--port", "0"]) == 2
    assert capsys.readouterr().err == f"difflab: error: {tmp_path / 'nowhere'} is not a folder\n"


def test_a_page_that_fails_is_a_500_and_the_server_serves_on(runs_root: Path, monkeypatch, capsys) -> None:
    from difflab.report.serve import RunBrowser

    def broken(self, view) -> bytes:
        raise ValueError("metrics.json holds a list")

    with serving(runs_root) as address:
        _, index, _ = request(address, "/")
        run_id = index.decode().split("/run?id=")[1].split('"')[0]
        monkeypatch.setattr(RunBrowser, "run_page", broken)
        status, body, _ = request(address, f"/run?id={run_id}")
        assert status == 500 and b"ValueError: metrics.json holds a list" in body
        assert request(address, "/")[0] == 200  # the server is still up
        assert "cannot show /run" in capsys.readouterr().err


def test_a_damaged_file_of_a_run_is_a_500_naming_it(runs_root: Path, tmp_path: Path, capsys) -> None:
    """A run whose metrics.json or trajectory cannot be read is marked damaged in the list, and its page is a 500
    that names the file: not a page with the section silently missing."""
    root = tmp_path / "runs"
    for name, damage in (("metrics", "metrics.json"), ("trajectory", "samples/trajectory.safetensors")):
        shutil.copytree(runs_root / "roll", root / name)
        (root / name / damage).write_bytes(b"{not json, nor safetensors")
    with serving(root) as address:
        status, index, _ = request(address, "/")
        assert status == 200 and index.decode().count('class="status-damaged">damaged<') == 1
        status, body, _ = request(address, "/run?id=metrics")
        assert status == 500 and b"run metrics: metrics.json cannot be read (Expecting" in body
        status, body, _ = request(address, "/run?id=trajectory")
        assert status == 500 and b"samples/trajectory.safetensors of run trajectory cannot be read" in body
        assert body.count(b"\n") == 1
        printed = capsys.readouterr().err
        assert "cannot show /run: DifflabError: run metrics: metrics.json cannot be read" in printed


def test_a_run_left_running_by_a_killed_process_is_shown_as_stopped(runs_root: Path, tmp_path: Path) -> None:
    """run.json names the process that writes it: a run still marked running whose process is gone was killed."""
    import socket

    root = tmp_path / "runs"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    for name, pid in (("killed", gone.pid), ("alive", os.getpid())):
        shutil.copytree(runs_root / "roll", root / name)
        record = json.loads((root / name / "run.json").read_text())
        assert record["host"] == socket.gethostname() and isinstance(record["pid"], int)  # written by the recipe
        record.update(status="running", pid=pid)
        (root / name / "run.json").write_text(json.dumps(record))
    with serving(root) as address:
        index = request(address, "/")[1].decode()
        assert index.count('class="status-stopped">stopped<') == 1 and 'class="status-running">running<' in index
        page = request(address, "/run?id=killed")[1].decode()
        assert f"stopped: marked running, but its process (pid {gone.pid}) is gone" in page


def test_a_folder_of_difflab_train_is_shown_as_trained(runs_root: Path, tmp_path: Path) -> None:
    """The index said "complete" with no metrics, the run page "No metrics.json yet (the run is not complete)"."""
    root = tmp_path / "runs"
    shutil.copytree(runs_root / "roll", root / "weights")
    record = json.loads((root / "weights" / "run.json").read_text())
    record["message"] = "trained (difflab train): weights in checkpoints/; `difflab run` samples and scores them"
    (root / "weights" / "run.json").write_text(json.dumps(record))
    for name in ("metrics.json", "report.md", "report.html"):
        (root / "weights" / name).unlink()
    with serving(root) as address:
        assert 'class="status-trained">trained<' in request(address, "/")[1].decode()
        page = request(address, "/run?id=weights")[1].decode()
        assert "No metrics.json: the folder holds trained weights only (difflab train)" in page
        assert f"difflab run {record['recipe']} --config {root / 'weights' / 'config.yaml'}" in page
