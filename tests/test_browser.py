"""A learner's session in a real browser: JupyterLab started by `quantcourse lab`, Debian's Chromium
driven headless by Playwright, lecture 01 run with Run All, a slider moved, the figure redrawn.

Needs /usr/bin/chromium (apt-get install chromium) and the playwright package in the venv; it never
downloads a browser (`playwright install` is not used). Skipped, with the reason, when either is missing.
The screenshot is written under pytest's tmp_path and copied to $QUANTCOURSE_ARTIFACTS (default: a
`quantcourse-artifacts` folder in the system temp directory); the test prints where.
"""

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = "course/01_affine.ipynb"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip
# JupyterLab settings for the test's server: never save the notebook (autosave would write the
# outputs into the committed file), attach every cell to the page, make no requests to the internet.
LAB_SETTINGS = {
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false", "checkForUpdates": False},
}
RUN_ALL_TIMEOUT = 900  # seconds; lecture 01 in fast mode takes 1-3 minutes on 2 busy cores

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"{CHROMIUM} is missing: apt-get install -y chromium"),
]
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed in this venv: pip install playwright"
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def api(port: int, token: str, path: str, method: str = "GET"):
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                     headers={"Authorization": f"token {token}"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=10) as response:
        body = response.read()
    return json.loads(body) if body else None


@pytest.fixture
def lab_server(tmp_path):
    """JupyterLab on 127.0.0.1 with a token, from `python -m quantcourse lab`; always stopped afterwards,
    its kernels first."""
    settings = tmp_path / "lab-settings"
    for relative, values in LAB_SETTINGS.items():
        (settings / relative).parent.mkdir(parents=True, exist_ok=True)
        (settings / relative).write_text(json.dumps(values))
    port, token = free_port(), secrets.token_hex(16)
    env = {
        **os.environ,
        "QUANTCOURSE_FAST": "1",  # the kernels inherit it
        "JUPYTERLAB_SETTINGS_DIR": str(settings),
        "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "lab-workspaces"),
    }
    log_path = tmp_path / "jupyterlab.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "quantcourse", "lab", "--no-browser", "--port", str(port), "--token", token],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while True:
                if server.poll() is not None:
                    pytest.fail(f"JupyterLab exited with code {server.returncode}:\n{log_path.read_text()[-3000:]}")
                try:
                    api(port, token, "/api/status")
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        pytest.fail(f"JupyterLab did not answer within 120 s:\n{log_path.read_text()[-3000:]}")
                    time.sleep(0.5)
            yield {"url": f"http://127.0.0.1:{port}", "token": token, "port": port, "log": log_path}
        finally:
            try:
                for kernel in api(port, token, "/api/kernels") or []:
                    api(port, token, f"/api/kernels/{kernel['id']}", method="DELETE")
            except OSError:
                pass  # the server is gone already; it took its kernels with it
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGTERM)  # the group started above: the server and its helpers
                try:
                    server.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(server.pid, signal.SIGKILL)
                    server.wait(10)


PAGE_STATE = """() => {
    const cells = Array.from(document.querySelectorAll('.jp-Notebook .jp-CodeCell'));
    const prompts = cells.map(c => (c.querySelector('.jp-InputPrompt') || {}).textContent || '');
    const errors = Array.from(document.querySelectorAll('.jp-Notebook .jp-OutputArea-output'))
        .map(o => o.textContent).filter(t => t.includes('Traceback (most recent call last)'));
    const indicator = document.querySelector('.jp-Notebook-ExecutionIndicator');
    return {
        cells: cells.length,
        executed: prompts.filter(p => /\\[\\d+\\]/.test(p)).length,
        running: prompts.filter(p => p.includes('*')).length,
        idle: indicator !== null && indicator.getAttribute('data-status') === 'idle',
        errors: errors.map(t => t.slice(-1500)),
    };
}"""


def wait_for_run_all(page) -> dict:
    """Poll the notebook until every code cell has run (or one failed) and the kernel is idle."""
    deadline = time.monotonic() + RUN_ALL_TIMEOUT
    state = page.evaluate(PAGE_STATE)
    while time.monotonic() < deadline:
        state = page.evaluate(PAGE_STATE)
        if state["idle"] and state["running"] == 0 and (state["errors"] or state["executed"] == state["cells"]):
            time.sleep(1)  # let the last outputs render
            return page.evaluate(PAGE_STATE)
        time.sleep(2)
    pytest.fail(f"Run All did not finish within {RUN_ALL_TIMEOUT} s: {state}")


def save_screenshot(page, tmp_path: Path, capsys, record_property) -> None:
    shot = tmp_path / "01_affine.png"
    page.screenshot(path=str(shot), full_page=True)
    artifacts = Path(os.environ.get("QUANTCOURSE_ARTIFACTS") or Path(tempfile.gettempdir()) / "quantcourse-artifacts")
    artifacts.mkdir(parents=True, exist_ok=True)
    copy = shutil.copy(shot, artifacts / "test_browser_01_affine.png")
    record_property("screenshot", str(copy))
    with capsys.disabled():
        print(f"\nbrowser screenshot: {copy}")


def test_lecture_01_runs_in_jupyterlab_and_its_slider_redraws(lab_server, tmp_path, capsys, record_property):
    notebook_file = REPO / NOTEBOOK
    committed = notebook_file.read_bytes()
    checkpoint = REPO / "course" / ".ipynb_checkpoints" / "01_affine-checkpoint.ipynb"
    checkpoint_dir_existed, checkpoint_existed = checkpoint.parent.exists(), checkpoint.exists()
    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.set_default_timeout(120_000)
                try:
                    page.goto(f"{lab_server['url']}/lab/tree/{NOTEBOOK}?token={lab_server['token']}")
                    page.wait_for_selector(".jp-Notebook .jp-CodeCell")
                    # the kernel is started and connected once the status bar says so
                    page.wait_for_selector(".jp-StatusBar-TextItem:has-text('Python (quantcourse) | Idle')")
                    page.wait_for_timeout(1000)

                    page.get_by_role("menuitem", name="Run", exact=True).click()
                    page.get_by_text("Run All Cells", exact=True).click()
                    state = wait_for_run_all(page)
                    assert not state["errors"], "a cell failed in the browser:\n" + "\n\n".join(state["errors"])
                    assert state["executed"] == state["cells"], f"not every cell ran: {state}"

                    slider = page.locator(".widget-hslider", has=page.locator("label", has_text=re.compile(r"^bits$")))
                    assert slider.count() == 1, "expected one 'bits' slider in lecture 01"
                    cell = page.locator(".jp-Notebook .jp-CodeCell", has=slider)
                    figure = cell.locator(".jp-OutputArea-output img").first
                    readout = slider.locator(".widget-readout")
                    figure_before, readout_before = figure.get_attribute("src"), readout.text_content()
                    slider.locator(".noUi-handle").click()
                    page.keyboard.press("ArrowRight")
                    deadline = time.monotonic() + 120  # the kernel redraws; JupyterLab may swap the <img>
                    while figure.get_attribute("src") == figure_before:
                        assert time.monotonic() < deadline, "the figure was not redrawn within 120 s of moving the slider"
                        page.wait_for_timeout(500)
                    assert readout.text_content() != readout_before, "the slider's readout did not move"
                    figure.scroll_into_view_if_needed()
                finally:
                    save_screenshot(page, tmp_path, capsys, record_property)
            finally:
                browser.close()
    finally:
        if notebook_file.read_bytes() != committed:
            notebook_file.write_bytes(committed)
            pytest.fail(f"the browser session changed {NOTEBOOK} on disk (restored); autosave must stay off")
        if not checkpoint_existed:
            checkpoint.unlink(missing_ok=True)
        if not checkpoint_dir_existed and checkpoint.parent.is_dir() and not any(checkpoint.parent.iterdir()):
            checkpoint.parent.rmdir()
