"""Smoke test of the benchmark package: it imports, its pure parts work, no timing asserted."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

import bench.__main__ as bench_main
from bench import loadgen, procs, profiling, report
from bench.results import Row, paired_diff, paired_ratio
from bench.translate import bench as translate_bench


def test_converter_micro_bench_runs_once() -> None:
    result = translate_bench(200)
    assert result["chunks"] == 200 and result["out_bytes"] > 0


def test_rows_compare_and_render(tmp_path: Path) -> None:
    direct = Row("warm", "direct", "ms", [10.0, 11.0, 12.0])
    routerd = Row("warm", "routerd", "ms", [10.5, 11.5, 12.5], target="≤ +1 ms")
    routerd.compare(direct.samples, None)
    assert routerd.vs_direct == 0.5
    assert paired_ratio([2.0, 4.0], [1.0, 2.0]) == 2.0
    assert paired_diff([1.0], [1.0]) == 0.0
    text = report.table([direct, routerd])
    assert "+0.50 ms" in text and "routerd" in text


def test_router_mode_gets_routerds_flags_without_per_process_ones() -> None:
    flags = procs.shared_flags(Path("/m.gguf"))
    assert "--port" not in flags and "--api-key" not in flags and "-m" not in flags
    assert "-np" in flags and "-c" in flags


def test_cli_quick_counts() -> None:
    args = bench_main.parse_args(["--quick"])
    assert args.warm_rounds < 10 and not args.write_docs


def test_profile_summary_of_raw_stacks(tmp_path: Path) -> None:
    raw = tmp_path / "p.raw"
    raw.write_text("run (asyncio/base_events.py:1) ;handle (routerd/api/openai.py:20) 3\n"
                   "run (asyncio/base_events.py:1) 1\n")
    top = profiling.summarize(raw)
    assert top is not None and top.samples == 4
    assert top.inclusive[0][0].startswith("handle (routerd/api/openai.py")


async def test_loadgen_reads_sized_and_chunked_answers(aiohttp_server) -> None:  # type: ignore[no-untyped-def]
    async def sized(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"ok": True})

    async def chunked(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(b"data: x\n\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/sized", sized)
    app.router.add_post("/chunked", chunked)
    server = await aiohttp_server(app)
    for path in ("/sized", "/chunked"):
        res = await loadgen.run(str(server.make_url(path)), {"a": 1}, {}, connections=2,
                                seconds=0.2, warmup=0.05)
        assert res.errors == 0 and res.requests > 0
