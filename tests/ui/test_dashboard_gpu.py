"""One bar per budget, GPUs included: the dashboard in headless Chromium against routerd with
two simulated NVML GPUs (tests/fakes/nvml.py; this machine has none), one of them partly
held by another process."""

from __future__ import annotations

from pathlib import Path
from typing import Any, AsyncIterator

import pytest
from aiohttp import web

from routerd.app import make_app
from routerd.config import parse_config
from routerd.scheduler.accounting import Accountant
from tests.fakes.nvml import SimulatedGpus
from tests.ui.conftest import screenshot

GiB = 1 << 30


@pytest.fixture
async def gpu_routerd(tmp_path: Path) -> AsyncIterator[str]:
    sim = SimulatedGpus(24 * GiB, 12 * GiB, name="Simulated GPU")
    sim.hold_other(1, 3 * GiB)
    config = parse_config({"host": "127.0.0.1", "port": 0, "state_dir": str(tmp_path / "s"),
                           "models_dir": str(tmp_path / "m"),
                           "memory": {"ram_budget": "50%", "gpus": "auto",
                                      "gpu_reserve": "512MiB"}})
    runner = web.AppRunner(make_app(config, accountant=Accountant(config, gpu=sim)))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def test_a_bar_per_gpu(gpu_routerd: str, watched_page: Any, tmp_path: Path) -> None:
    page, watch = watched_page
    await page.goto(f"{gpu_routerd}/ui/")
    await page.wait_for_selector("#live[data-state=live]")
    for res in ("ram", "gpu0", "gpu1"):
        await page.wait_for_selector(f".budget[data-resource={res}] .bar .seg.free")
    gpu1 = await page.inner_text(".budget[data-resource=gpu1]")
    assert "GPU 1 · Simulated GPU" in gpu1 and "other processes 3.0 GiB" in gpu1, gpu1
    assert await page.locator(".budget[data-resource=gpu0] .seg.other").count() == 0
    assert await page.locator(".budget[data-resource=gpu1] .seg.other").count() == 1
    assert "of 24.0 GiB" in await page.inner_text(".budget[data-resource=gpu0]")
    assert "Simulated GPU" in await page.inner_text("#host")
    await screenshot(page, tmp_path, "overview-gpus")
    assert watch.console_errors == [], watch.console_errors
    assert watch.hosts == {gpu_routerd.removeprefix("http://")}, watch.hosts
