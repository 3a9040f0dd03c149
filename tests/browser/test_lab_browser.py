"""Chapter 02 in a real browser: JupyterLab on loopback, headless Chromium, Run All, live dashboard.

    DS_LAB_BROWSER=1 pytest -s tests/browser        (scripts/browser_check.sh installs what it needs)

Opt-in (slow, needs chromium and playwright): skipped unless DS_LAB_BROWSER=1. It starts JupyterLab on
127.0.0.1 with a random token on a copy of chapter 02 without its saved outputs (the tracked notebook
is never saved over), runs all cells, and while a training cell runs takes two screenshots showing two
different images of its dashboard (it redraws live), then one at the end, when every code cell has run, every
Dashboard has drawn its final picture and no cell holds an error. The screenshots go to
$DS_LAB_BROWSER_OUT (default build/browser_screenshots), printed by the test. Chromium: $DS_LAB_CHROMIUM
or `chromium` on PATH (Playwright's own browser download is not needed).
"""
import json
import os
import pathlib
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHAPTER = "02_data_parallel.ipynb"
RUN_LIMIT_S = 900

pytestmark = pytest.mark.skipif(os.environ.get("DS_LAB_BROWSER") != "1",
                                reason="browser test: set DS_LAB_BROWSER=1 (scripts/browser_check.sh)")

# The notebook as JupyterLab holds it: per code cell, its execution count, output types, PNG payloads.
CELLS_JS = """() => {
  if (!window.jupyterapp || !window.jupyterapp.shell) return null;
  const panel = window.jupyterapp.shell.currentWidget;
  if (!panel || !panel.content || !panel.sessionContext) return null;
  const cells = [];
  for (const cell of panel.content.widgets) {
    if (cell.model.type !== 'code') continue;
    const outputs = cell.model.outputs.toJSON();
    cells.push({count: cell.model.executionCount, source: cell.model.sharedModel.getSource(),
                types: outputs.map(o => o.output_type),
                pngs: outputs.filter(o => o.data && o.data['image/png']).map(o => o.data['image/png'])});
  }
  return {status: panel.sessionContext.kernelDisplayStatus, cells: cells};
}"""
# Log every image a code cell receives (index, still running?, a key of the PNG) and keep the
# running cell in view, so that a screenshot taken now shows its dashboard.
WATCH_JS = """() => {
  window.__dsLive = [];
  const cells = window.jupyterapp.shell.currentWidget.content.widgets.filter(c => c.model.type === 'code');
  cells.forEach((cell, index) => cell.model.outputs.changed.connect(() => {
    const png = cell.model.outputs.toJSON().map(o => o.data && o.data['image/png']).filter(Boolean)[0];
    if (!png) return;
    const running = cell.model.executionCount === null;
    if (running) cell.node.scrollIntoView({block: 'end'});
    window.__dsLive.push({index: index, running: running, t: Date.now(), key: png.length + ':' + png.slice(-200)});
  }));
}"""
# the last image logged, and whether its cell is running now (not when the image came)
LATEST_JS = """() => {
  const last = window.__dsLive[window.__dsLive.length - 1];
  if (!last) return null;
  const cells = window.jupyterapp.shell.currentWidget.content.widgets.filter(c => c.model.type === 'code');
  return {index: last.index, key: last.key, n: window.__dsLive.length,
          running: last.running && cells[last.index].model.executionCount === null};
}"""
DONE_JS = """() => window.jupyterapp.shell.currentWidget.sessionContext.kernelDisplayStatus === 'idle' &&
  window.jupyterapp.shell.currentWidget.content.widgets.every(c => c.model.type !== 'code' ||
                                                                   c.model.executionCount !== null)"""
SCROLL_JS = """(index) => window.jupyterapp.shell.currentWidget.content.widgets
  .filter(c => c.model.type === 'code')[index].node.scrollIntoView({block: 'end'})"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture
def lab_server(tmp_path):
    """JupyterLab on loopback, token-protected, serving a scratch copy of the chapter."""
    pytest.importorskip("jupyterlab")
    workdir = tmp_path / "notebooks"
    workdir.mkdir()
    notebook = json.loads((ROOT / "notebooks" / CHAPTER).read_text(encoding="utf-8"))
    for cell in notebook["cells"]:  # no saved outputs: every image the test sees, this run drew
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
    (workdir / CHAPTER).write_text(json.dumps(notebook), encoding="utf-8")
    port, token = _free_port(), secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_CURRENT_TEST", "DS_LAB_DASHBOARD")}
    settings = tmp_path / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)  # no "get notified about Jupyter news?" toast over the screenshots
    (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')
    env.update(JUPYTERLAB_SETTINGS_DIR=str(tmp_path / "settings"), JUPYTER_CONFIG_DIR=str(tmp_path / "config"),
               JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"), MPLBACKEND="Agg")  # no PYTEST_CURRENT_TEST: the kernel is interactive, its dashboards live
    log = open(tmp_path / "jupyterlab.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={workdir}",
         "--LabApp.expose_app_in_browser=True",
         f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}", "--LabApp.news_url=None",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
        + (["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []),
        cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def up():
        try:
            with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2) as reply:
                return json.load(reply) is not None
        except OSError:
            return server.poll() is not None and pytest.fail((tmp_path / "jupyterlab.log").read_text())

    try:
        _wait_for(up, 120, "JupyterLab to answer")
        yield f"{base}/lab/tree/{CHAPTER}?token={token}"
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def test_chapter_02_runs_in_jupyterlab_with_a_live_dashboard(lab_server):
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = os.environ.get("DS_LAB_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("no chromium: run scripts/browser_check.sh (it installs Debian's chromium)")
    out = pathlib.Path(os.environ.get("DS_LAB_BROWSER_OUT", ROOT / "build" / "browser_screenshots")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):
        old.unlink()
    print(f"\nscreenshots: {out}")
    started = time.monotonic()
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(lab_server)
        state = lambda: page.evaluate(CELLS_JS)
        _wait_for(lambda: (s := state()) and s["status"] == "idle", 180, "the kernel to start")
        n_code = len(state()["cells"])
        # Every dashboard image that reaches a code cell is logged in the page as it arrives; a cell
        # that is still running has no execution count yet, so "running" means the image came live.
        page.evaluate(WATCH_JS)
        # (not awaited: the command's promise settles only when the last cell has run)
        page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")

        # During training: screenshots of the running cell, taken one after another, until two of the
        # same cell, each taken while it was still running, differ (its dashboard redrew in between).
        latest = lambda: page.evaluate(LATEST_JS)
        shots = []  # (cell index, the dashboard image shown, the screenshot's bytes)
        deadline = time.monotonic() + RUN_LIMIT_S
        while len(shots) < 2 and time.monotonic() < deadline:
            before = latest()
            if not (before and before["running"]):
                if page.evaluate(DONE_JS):
                    break  # Run All finished before two different live images could be caught
                time.sleep(0.02)
                continue
            path = out / "attempt.png"
            page.evaluate(SCROLL_JS, before["index"])  # its dashboard, drawn by now, in view
            page.screenshot(path=str(path))
            after = latest()
            if not (after["running"] and after["n"] == before["n"]):
                continue  # the cell finished, or a new image came, during the screenshot: not sure what it shows
            if shots and shots[0][0] != after["index"]:
                shots = []  # another cell is training now: start over there
            if not shots or (after["key"] != shots[0][1] and path.read_bytes() != shots[0][2]):
                shots.append((after["index"], after["key"], path.read_bytes()))
        log = page.evaluate("window.__dsLive.map(e => [e.index, e.running, e.t])")
        assert len(shots) == 2, f"no cell showed two different dashboard images while training; images: {log}"
        assert shots[0][1] != shots[1][1] and shots[0][2] != shots[1][2], "the two live screenshots show one image"
        for number, (_, _, png) in enumerate(shots, start=1):
            (out / f"{number}_training_live.png").write_bytes(png)
        (out / "attempt.png").unlink()

        # The end: every code cell ran, no error output, every Dashboard drew its final picture.
        def finished():
            s = state()
            done = s["status"] == "idle" and all(c["count"] is not None for c in s["cells"])
            return done and s

        s = _wait_for(finished, RUN_LIMIT_S, "Run All to finish")
        errors = [c["source"][:60] for c in s["cells"] if "error" in c["types"]]
        assert errors == [], f"cells with an error output: {errors}"
        dashboard_cells = [i for i, c in enumerate(s["cells"]) if "Dashboard(" in c["source"] and "launch(" in c["source"]]
        assert dashboard_cells and all(s["cells"][i]["pngs"] for i in dashboard_cells), dashboard_cells
        page.evaluate(SCROLL_JS, dashboard_cells[-1])
        page.screenshot(path=str(out / "3_finished.png"))
        browser.close()
    print(f"{n_code} code cells, {len(dashboard_cells)} dashboards, ran in {time.monotonic() - started:.0f} s; "
          f"screenshots in {out}")
