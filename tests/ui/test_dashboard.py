"""The dashboard in a real headless Chromium against a live routerd serving the real SmolLM2
on llama-server. One daemon and one browser for the module; the tests run in file order and
build on each other (load → chat → activity → pull → unload → crash).

Each test asserts the page logged no console error and fetched nothing from another host;
screenshots of every page land in the test's tmp dir (and in $ROUTERD_UI_SCREENSHOTS).
"""

from __future__ import annotations

import os
import signal
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.conftest import MOON, Daemon
from tests.fakes.registry import FakeRegistry
from tests.ui.conftest import Watch, screenshot

pytestmark = [pytest.mark.timeout(240), pytest.mark.engine]
LOAD_BOUND_MS = 60_000  # a cold SmolLM2 load takes ~0.5 s here; the bound is generous


@pytest.fixture(scope="module")
def dash(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[Daemon]:
    d = Daemon({
        "default_model": "smollm2", "keep_alive": "10m",
        "models": {"smollm2": {"model": str(model_path), "backend": "llama-server",
                               "parallel": 2, "ctx_size": 2048}},
    }, tmp_path_factory.mktemp("dash"))
    yield d
    assert d.stop() == 0, d.log()


def clean(watch: Watch, daemon: Daemon) -> None:
    assert watch.console_errors == [], watch.console_errors
    assert watch.hosts == {f"127.0.0.1:{daemon.port}"}, watch.hosts


async def open_page(page: Any, daemon: Daemon, where: str = "overview") -> None:
    await page.goto(f"{daemon.base_url}/ui/#{where}")
    await page.wait_for_selector("#live[data-state=live]")


async def test_load_from_the_models_page(dash: Daemon, watched_page: Any,
                                         tmp_path: Path) -> None:
    page, watch = watched_page
    await open_page(page, dash)
    # Before any load: the RAM budget with nothing booked, the model listed on Models.
    await page.wait_for_selector(".budget[data-resource=ram] .bar .seg.free")
    assert await page.locator(".bar[data-resource=ram] .seg.model").count() == 0
    assert "RAM" in await page.inner_text(".budget[data-resource=ram]")
    await page.click("#nav a[data-page=models]")
    await page.click("tr[data-model=smollm2] button[data-action=load]")
    await page.wait_for_selector("tr[data-model=smollm2][data-state=ready]",
                                 timeout=LOAD_BOUND_MS)
    await page.click("#nav a[data-page=overview]")
    card = page.locator(".card[data-model=smollm2]")
    await card.locator(".badge[data-state=ready]").wait_for()
    seg = page.locator(".bar[data-resource=ram] .seg.model[data-model=smollm2]")
    await seg.wait_for()
    booked = int(await seg.get_attribute("data-booked") or 0)
    ps = dash.get("/api/ps")["models"][0]
    assert ps["name"] == "smollm2" and booked == sum(ps["routerd"]["booked"].values())
    assert 50 * 2**20 < booked < 2 * 2**30  # SmolLM2 Q4_1 at ctx 2048: ~190 MiB
    text = await card.inner_text()
    assert "0 / 2" in text and "2048" in text and "llama-server" in text
    assert await page.locator(".budget[data-resource=ram] .legend").inner_text()
    await page.wait_for_selector("#chart-memory .line", state="attached")  # its line
    await screenshot(page, tmp_path, "dashboard")
    await page.set_viewport_size({"width": 390, "height": 844})
    await page.wait_for_timeout(100)
    assert await page.evaluate("document.documentElement.scrollWidth") <= 390
    await screenshot(page, tmp_path, "dashboard-phone")
    await page.set_viewport_size({"width": 1280, "height": 800})
    # Dark when the system is dark.
    background = "getComputedStyle(document.body).backgroundColor"
    assert await page.evaluate(background) == "rgb(246, 247, 249)"
    await page.emulate_media(color_scheme="dark")
    assert await page.evaluate(background) == "rgb(18, 21, 26)"
    await screenshot(page, tmp_path, "dashboard-dark")
    await page.emulate_media(color_scheme="light")
    clean(watch, dash)


async def test_playground_streams_the_answer(dash: Daemon, watched_page: Any,
                                             tmp_path: Path) -> None:
    page, watch = watched_page
    await open_page(page, dash, "playground")
    await page.wait_for_selector("#pg-model option[value=smollm2]", state="attached")
    await page.select_option("#pg-model", "smollm2")
    await page.fill("#pg-temperature", "0")
    await page.fill("#pg-seed", "1")
    await page.fill("#pg-max-tokens", "24")
    await page.fill("#pg-input", MOON)
    await page.click("#pg-send")
    answer = page.locator(".msg.assistant[data-done='1']")
    await answer.wait_for(timeout=180_000)  # a bound: the full suite on 2 busy cores is slow
    text = await answer.locator(".text").inner_text()
    assert "Armstrong" in text, text
    chunks = int(await answer.get_attribute("data-chunks") or 0)
    assert chunks > 3, f"answer arrived in {chunks} chunk(s), not streamed"
    stats = await page.inner_text("#pg-stats")
    assert "tokens/s" in stats and "first token" in stats, stats
    await screenshot(page, tmp_path, "playground")
    clean(watch, dash)


async def test_activity_lists_the_request_live(dash: Daemon, watched_page: Any,
                                               tmp_path: Path) -> None:
    page, watch = watched_page
    await open_page(page, dash, "activity")
    row = page.locator("#activity-table tr[data-model=smollm2]", has_text="/api/chat")
    await row.first.wait_for()
    cells = await row.first.locator("td").all_inner_texts()
    assert cells[3] == "ollama" and cells[5] == "200", cells
    assert int(cells[7]) > 0 and float(cells[9]) > 0, cells  # output tokens, tokens/s
    # Live: a request made elsewhere appears without a reload; an error is highlighted.
    before = await page.locator("#activity-table tbody tr[data-model]").count()
    dash.post("/api/generate", {"model": "smollm2", "prompt": "Hi", "stream": False,
                                "options": {"num_predict": 4, "temperature": 0}})
    with pytest.raises(urllib.error.HTTPError):
        dash.post("/api/chat", {"model": "smollm2", "keep_alive": "soon",
                                "messages": [{"role": "user", "content": "Hi"}]})
    bad = page.locator("#activity-table tr.bad[data-status='400']")
    await bad.wait_for()
    assert await page.locator("#activity-table tbody tr[data-model]").count() >= before + 2
    assert "invalid duration 'soon'" in await page.inner_text("#activity-table")
    await page.select_option("#activity-model", "smollm2")
    await screenshot(page, tmp_path, "activity")
    clean(watch, dash)


async def test_pull_shows_progress_then_the_model(dash: Daemon, watched_page: Any,
                                                  tmp_path: Path, model_path: Path) -> None:
    page, watch = watched_page
    async with FakeRegistry() as reg:
        reg.add_smollm2(model_path)
        name = f"{reg.host}/library/smollm2:latest"
        await open_page(page, dash, "models")
        await page.fill("#pull-name", name)
        await page.check("#pull-insecure")
        # A slow pull, cancelled from the page once it shows progress...
        reg.faults.delay = 0.05
        await page.click("#pull-button")
        await page.wait_for_function(
            "() => parseInt(document.querySelector('#pull-percent').textContent) >= 1")
        await page.click("#pull-cancel")
        await page.wait_for_selector("#pull-progress[data-result=cancelled]")
        assert name not in [m["name"] for m in dash.get("/api/tags")["models"]]
        # ... then pulled again at full speed (it resumes), to 100 %.
        reg.faults.reset()
        await page.click("#pull-button")
        await page.wait_for_selector("#pull-progress[data-result=success]", timeout=120_000)
    assert await page.inner_text("#pull-percent") == "100%"
    assert await page.eval_on_selector("#pull-overall", "e => e.value") == 1
    layers = page.locator("#pull-progress .layer progress")
    assert await layers.count() >= 2
    for i in range(await layers.count()):
        assert await layers.nth(i).evaluate("e => e.value === e.max")
    row = page.locator(f"tr[data-model='{name}']")
    await row.wait_for()
    assert "store" in await row.inner_text()
    await screenshot(page, tmp_path, "models-pull")
    # Details: GGUF metadata, the argv, estimate vs measured.
    await row.locator("button[data-action=details]").click()
    details = page.locator(f"tr[data-details-of='{name}']")
    await details.locator("pre.argv").wait_for()
    assert "llama-server" in await details.locator("pre.argv").inner_text()
    assert "general.architecture" in await details.inner_text()
    # Delete, after a confirmation naming what goes.
    await row.locator("button[data-action=delete]").click()
    dialog = page.locator("#confirm-dialog")
    await dialog.wait_for()
    assert name in await dialog.inner_text() and "MiB" in await dialog.inner_text()
    await page.click("#confirm-ok")
    await row.wait_for(state="detached")
    assert name not in [m["name"] for m in dash.get("/api/tags")["models"]]
    clean(watch, dash)


async def test_unload_frees_the_bar(dash: Daemon, watched_page: Any, tmp_path: Path) -> None:
    page, watch = watched_page
    await open_page(page, dash)
    card = page.locator(".card[data-model=smollm2]")
    await card.wait_for()
    await card.locator("button[data-action=unload]").click()
    await card.wait_for(state="detached")
    await page.locator(".bar[data-resource=ram] .seg.model").first.wait_for(state="detached")
    budget = dash.get("/api/ui/overview")["budgets"][0]
    free = await page.get_attribute(".bar[data-resource=ram] .seg.free", "data-free")
    assert budget["booked"] == 0 and int(free or 0) == budget["budget"]
    assert dash.get("/api/ps")["models"] == []
    clean(watch, dash)


async def test_killed_worker_shows_its_failure(dash: Daemon, watched_page: Any,
                                               tmp_path: Path) -> None:
    page, watch = watched_page
    await open_page(page, dash)
    dash.post("/api/generate", {"model": "smollm2", "prompt": ""})
    card = page.locator(".card[data-model=smollm2]")
    await card.locator(".badge[data-state=ready]").wait_for()
    pid = dash.worker_pids()[0]
    os.kill(pid, signal.SIGKILL)
    failure = page.locator(".last-failure[data-failure=smollm2]")
    await failure.wait_for(timeout=30_000)
    reason = await failure.inner_text()
    assert "exited with code -9" in reason, reason
    # It comes back by itself (restarted after its backoff), still saying what happened.
    await page.wait_for_function(
        "pid => { const c = document.querySelector('.card[data-model=smollm2]');"
        " return c && c.dataset.state === 'ready' && !c.textContent.includes(String(pid)); }",
        arg=pid, timeout=180_000)  # a bound, not a timing: seconds alone, more under load
    assert "restarted after a failure" in await failure.inner_text()
    await screenshot(page, tmp_path, "overview-after-crash")
    await page.click("#nav a[data-page=logs]")
    await page.select_option("#logs-model", "smollm2")
    await page.wait_for_function(
        "() => document.querySelector('#logs-output').textContent.includes('llama')")
    assert "exited with code -9" in await page.inner_text("#logs-crash")
    await screenshot(page, tmp_path, "logs")
    clean(watch, dash)


def _request(url: str, headers: dict[str, str]) -> int:
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_page_and_events_pass_the_host_and_origin_checks(dash: Daemon) -> None:
    base = dash.base_url
    assert _request(base + "/ui/", {}) == 200
    assert _request(base + "/ui/", {"Host": "attacker.example"}) == 403
    assert _request(base + "/api/events", {"Host": "attacker.example"}) == 403
    assert _request(base + "/api/ui/overview", {"Origin": "http://attacker.example"}) == 403
    assert _request(base + "/ui/static/../../app.py", {}) == 404
    with urllib.request.urlopen(base + "/ui/", timeout=10) as r:
        csp = r.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A routerd that wants a key from everyone (as from another host): no model loads."""
    work = tmp_path_factory.mktemp("keyed")
    keys = work / "keys"
    keys.write_text("sesame-7f3a\n")
    d = Daemon({"auth": {"api_keys_file": str(keys), "exempt_loopback": False},
                "models": {"nothing": {"backend": "command", "command": ["false"]}}}, work)
    yield d
    assert d.stop() == 0, d.log()


async def test_page_asks_for_a_key_and_keeps_it_in_the_tab(keyed: Daemon, watched_page: Any,
                                                           tmp_path: Path) -> None:
    page, watch = watched_page
    sent: list[tuple[str, str | None]] = []
    page.on("request", lambda r: sent.append((r.url, r.headers.get("authorization"))))
    await page.goto(f"{keyed.base_url}/ui/")
    dialog = page.locator("#key-dialog")
    await dialog.wait_for()
    await page.fill("#key-input", "wrong-key")
    await page.click("#key-form button")
    await page.wait_for_selector("#key-error:has-text('invalid API key')")
    await page.fill("#key-input", "sesame-7f3a")
    await page.click("#key-form button")
    await page.wait_for_selector("#live[data-state=live]")
    await page.wait_for_selector("tr[data-model=nothing]", state="attached")
    assert await page.evaluate("sessionStorage.getItem('routerd.api_key')") == "sesame-7f3a"
    assert await page.evaluate("localStorage.length") == 0
    assert await page.evaluate("document.cookie") == ""
    keyed_urls = {u for u, auth in sent if auth}
    assert keyed_urls and all(u.startswith(keyed.base_url + "/") for u in keyed_urls)
    assert all(auth in (None, "Bearer wrong-key", "Bearer sesame-7f3a") for _, auth in sent)
    await screenshot(page, tmp_path, "key-dialog-done")
    # The 401s before the key are the only console errors (Chromium logs failed fetches).
    assert all("401" in e for e in watch.console_errors), watch.console_errors
    assert watch.hosts == {f"127.0.0.1:{keyed.port}"}, watch.hosts
