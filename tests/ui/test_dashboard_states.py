"""The states a real engine passes too quickly to watch, held open by the fake worker
(tests/fakes): loading (a 3 s start), busy with slots in use (a slow stream), and an unload
asked while that stream runs (it waits for the stream); each shown as it happens."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from routerd.app import make_app
from routerd.config import parse_config
from tests.conftest import fake_model
from tests.ui.conftest import screenshot


@pytest.fixture
async def slow_routerd(tmp_path: Path) -> AsyncIterator[str]:
    config = parse_config({
        "host": "127.0.0.1", "port": 0, "state_dir": str(tmp_path / "s"),
        "models_dir": str(tmp_path / "m"), "memory": {"ram_budget": "50%", "gpus": []},
        "models": {"slow": fake_model("--slow-start", "3", "--token-delay", "0.05",
                                      "--tokens", "60", parallel=2)}})
    runner = web.AppRunner(make_app(config), handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def test_loading_busy_and_unload_when_idle_show_live(slow_routerd: str, watched_page: Any,
                                                   tmp_path: Path) -> None:
    page, watch = watched_page
    await page.goto(f"{slow_routerd}/ui/#models")
    await page.wait_for_selector("#live[data-state=live]")
    await page.click("tr[data-model=slow] button[data-action=load]")
    await page.click("#nav a[data-page=overview]")
    loading = page.locator(".card[data-model=slow][data-state=loading]")
    await loading.wait_for()
    assert await loading.locator("progress.load").count() == 1
    await page.locator(".card[data-model=slow][data-state=ready]").wait_for()
    # Pin (keep_alive -1) and unpin (back to the model's keep-alive, counting down).
    card = page.locator(".card[data-model=slow]")
    await card.locator("button[data-action=pin]").click()
    await card.locator("button[data-action=unpin]").wait_for()
    assert "pinned" in await card.inner_text()
    await card.locator("button[data-action=unpin]").click()
    await card.locator("button[data-action=pin]").wait_for()
    assert await card.locator(".countdown").count() == 1

    async with aiohttp.ClientSession() as http:
        async def stream() -> str:
            body = {"model": "slow", "messages": [{"role": "user", "content": "go"}]}
            async with http.post(f"{slow_routerd}/api/chat", json=body) as r:
                return (await r.read()).decode()

        task = asyncio.ensure_future(stream())
        busy = page.locator(".card[data-model=slow] .badge[data-state=busy]")
        await busy.wait_for()
        assert await busy.inner_text() == "busy 1/2"
        assert "1 / 2" in await page.inner_text(".card[data-model=slow]")
        await screenshot(page, tmp_path, "overview-busy")
        # Unload while busy (Ollama's keep_alive 0): it goes once its stream has finished.
        await page.click(".card[data-model=slow] button[data-action=unload]")
        await page.locator(".card[data-model=slow] [data-unloading]").wait_for()
        answer = await asyncio.wait_for(task, 60)
    assert '"done":true' in answer  # the in-flight stream was not cut
    await page.locator(".card[data-model=slow]").wait_for(state="detached")
    assert watch.console_errors == [], watch.console_errors
    assert watch.hosts == {slow_routerd.removeprefix("http://")}, watch.hosts
