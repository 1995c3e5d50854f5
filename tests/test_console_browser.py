"""The web console in a real browser: Debian's chromium driven by Playwright, against a
real server process (`trainctl server --http`) and a real worker training digits.

Skipped with the reason when Playwright or chromium is missing (`./dev test` installs
them where it can). Each test saves a screenshot in its tmp dir; with
TRAINCTL_CONSOLE_SHOTS=DIR they are also copied there (docs/img/ is made that way).
"""
from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import pytest

from trainctl.client import Client

from .conftest import RESNET10T, Cluster, digits_spec, free_port

CHROMIUM = os.environ.get("TRAINCTL_CHROMIUM", "/usr/bin/chromium")
try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # pragma: no cover - depends on the machine
    sync_playwright = None

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sync_playwright is None, reason="playwright is not installed (pip install playwright)"),
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no chromium at {CHROMIUM} (apt-get install chromium)"),
]
TIMEOUT_MS = 120_000  # real training on a shared 2-core box: generous, never tight
TOKEN = "console-test-token"
DOC_SHOTS = {"console-runs", "console-run", "console-compare", "console-workers", "console-token"}  # docs/console.md


def shot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    out = os.environ.get("TRAINCTL_CONSOLE_SHOTS")
    if out and name in DOC_SHOTS:
        Path(out).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(out) / path.name)
    return path


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-dev-shm-usage"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """One server with the console and one worker, shared by the tests below (in order)."""
    tmp = tmp_path_factory.mktemp("console")
    http_port = free_port()
    c = Cluster(tmp, server_args=["--http", f"127.0.0.1:{http_port}"])
    c.add_worker("w-browser")
    c.wait_serving()  # the console's port is up too
    c.url = f"http://127.0.0.1:{http_port}"
    c.ids = {}
    yield c
    c.stop()


@pytest.fixture
def page(browser):
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = ctx.new_page()
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    ctx.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def test_runs_table_shows_submitted_run_and_its_state_live(live, page, tmp_path):
    page.goto(f"{live.url}/#/")
    expect(page.locator("#runs")).to_be_visible()
    with Client(live.address) as c:  # submitted after the page loaded: it must appear without a reload
        x = c.submit(digits_spec("browser-short", epochs=2, max_steps=6))
    live.ids["short"] = x.id
    row = page.locator(f'#runs-body tr[data-id="{x.id}"]')
    expect(row).to_be_visible(timeout=TIMEOUT_MS)
    expect(row).to_have_attribute("data-state", re.compile("ASSIGNED|RUNNING"), timeout=TIMEOUT_MS)
    shot(page, tmp_path, "console-runs-live")
    expect(row).to_have_attribute("data-state", "COMPLETED", timeout=TIMEOUT_MS)
    expect(row.locator("td").nth(8)).not_to_have_text("—")  # val_top1 from the summary
    # Filter by state and by name, client side.
    page.select_option("#f-state", "FAILED")
    expect(row).to_have_count(0)
    page.select_option("#f-state", "")
    page.fill("#f-name", "browser-short")
    expect(row).to_be_visible()


def test_run_page_chart_grows_and_set_lr_from_the_page_is_acked_and_marked(live, page, tmp_path):
    with Client(live.address) as c:
        x = c.submit(digits_spec("browser-steer", epochs=4, max_steps=30,
                                 model=RESNET10T))  # still training when the page steers it
    live.ids["steer"] = x.id
    page.goto(f"{live.url}/#/run/{x.id}")
    charts = page.locator("#charts")
    # The chart grows while it trains: first points, then more of them, without reloading.
    page.wait_for_function("() => +document.querySelector('#charts')?.dataset.points > 0", timeout=TIMEOUT_MS)
    first = int(charts.get_attribute("data-points"))
    page.wait_for_function(f"() => +document.querySelector('#charts')?.dataset.points > {first}", timeout=TIMEOUT_MS)
    expect(page.locator("#chart-lr canvas")).to_have_count(1)  # charts are redrawn: wait, don't sample
    expect(page.locator("#chart-loss canvas")).to_have_count(1)

    # Steer: preview (dry run) first, then apply; the ack appears beside the panel.
    page.select_option("#steer-kind", "SET_LR")
    page.fill("#steer-value", "0.01")
    page.click("#steer-preview")
    expect(page.locator("#steer-answer")).to_contain_text("dry run", timeout=30_000)
    page.click("#steer-apply")
    answer = page.locator("#steer-answer")
    expect(answer).to_contain_text("applied at step", timeout=TIMEOUT_MS)
    step = int(re.search(r"applied at step (\d+)", answer.inner_text()).group(1))
    assert "→ 0.01" in answer.inner_text()
    # ... recorded through the same Control path, with source CONSOLE ...
    with Client(live.address) as c:
        recs = [r for r in c.controls(x.id) if r.kind == "SET_LR"]
    assert [(r.status, r.source, r.applied_step) for r in recs] == [("APPLIED", "CONSOLE", step)]
    # ... and drawn as a marker at the applied step, listed in the control log.
    expect(charts).to_have_attribute("data-markers", re.compile(rf"SET_LR 0\.01 \(console\)@{step}\b"),
                                     timeout=30_000)
    expect(page.locator("#control-log")).to_contain_text("CONSOLE")
    page.wait_for_function(f"() => +document.querySelector('#charts')?.dataset.lastStep > {step} + 2",
                           timeout=TIMEOUT_MS)
    shot(page, tmp_path, "console-run")
    # The other axes and the log scale redraw the same data (no script error: see `page`).
    for axis in ("wall", "epoch", "step"):
        page.select_option("#x-axis", axis)
        expect(page.locator("#chart-loss canvas")).to_have_count(1)
        page.wait_for_function("() => +document.querySelector('#charts')?.dataset.points > 0", timeout=30_000)
    page.check("#log-scale")
    expect(page.locator("#chart-lr canvas")).to_have_count(1)
    page.uncheck("#log-scale")

    # Tags and note, edited on the page, are what the CLI/SDK sees.
    page.fill("#tag-input", "steered")
    page.press("#tag-input", "Enter")
    expect(page.locator("#tags")).to_contain_text("steered")
    page.fill("#note-input", "LR cut to 0.01 from the console")
    page.click("#note-save")
    with Client(live.address) as c:
        deadline = time.monotonic() + 10
        while c.get(x.id).note != "LR cut to 0.01 from the console" and time.monotonic() < deadline:
            time.sleep(0.1)
        got = c.get(x.id)
    assert "steered" in got.tags and got.note == "LR cut to 0.01 from the console"

    # Cancel from the page (confirmed in the dialog) ends the run.
    page.on("dialog", lambda d: d.accept())
    page.click("#cancel-run")
    expect(page.locator("#run-state")).to_contain_text("CANCELLED", timeout=TIMEOUT_MS)


def test_compare_overlays_two_runs_with_their_controls(live, page, tmp_path):
    a, b = live.ids.get("short"), live.ids.get("steer")
    if a is None or b is None:
        pytest.skip("needs the two runs of the tests above")
    page.goto(f"{live.url}/#/")
    page.locator(f'#runs-body tr[data-id="{a}"] input[type=checkbox]').check()
    page.locator(f'#runs-body tr[data-id="{b}"] input[type=checkbox]').check()
    shot(page, tmp_path, "console-runs")
    page.click("#compare-btn")
    chart = page.locator("#compare-chart")
    expect(chart).to_have_attribute("data-series", "2", timeout=30_000)
    page.select_option("#compare-metric", "STEP/lr")
    expect(chart).to_have_attribute("data-series", "2")
    expect(chart).to_have_attribute("data-markers", re.compile(rf"{b}: SET_LR 0\.01@\d+"))
    expect(page.locator("#compare-table")).to_contain_text("browser-steer")
    shot(page, tmp_path, "console-compare")


def test_workers_page_lists_the_worker(live, page, tmp_path):
    page.goto(f"{live.url}/#/workers")
    row = page.locator('#workers-body tr[data-worker="w-browser"]')
    expect(row).to_be_visible(timeout=30_000)
    expect(row).to_contain_text("cpu:0")
    shot(page, tmp_path, "console-workers")


def test_wrong_token_gets_a_clear_message(tmp_path, browser):
    http_port = free_port()
    c = Cluster(tmp_path, server_args=["--http", f"127.0.0.1:{http_port}", "--client-token", TOKEN])
    try:
        c.wait_serving()
        ctx = browser.new_context(viewport={"width": 1200, "height": 500})
        page = ctx.new_page()
        page.goto(f"http://127.0.0.1:{http_port}/#/")
        expect(page.locator("#token-form")).to_be_visible()
        page.fill("#token-input", "not-the-token")
        page.click("#token-form button")
        expect(page.locator("#banner")).to_contain_text("UNAUTHENTICATED: invalid token")
        assert page.locator("#banner").inner_text().count("UNAUTHENTICATED") == 1
        expect(page.locator("#token-why")).to_contain_text("refused")
        shot(page, tmp_path, "console-token")
        # The right token opens it; it is in sessionStorage (this tab), never a cookie.
        page.fill("#token-input", TOKEN)
        page.click("#token-form button")
        expect(page.locator("#runs")).to_be_visible()
        assert ctx.cookies() == []
        assert page.evaluate("sessionStorage.getItem('trainctl.token')") == TOKEN
        ctx.close()
    finally:
        c.stop()
